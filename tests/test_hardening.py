"""Training-loop hardening (issue 7): crash-safe checkpoints, exact resume after a SIGKILL during a save
and mid-step, non-finite steps skipped/counted/aborted, and bad input failing in one line that names the
fix, before anything is written.

The SIGKILL tests run the real trainer (train.main on the toy env of conftest.py, tiny-random model) in
a child process -- this file is also that child's script -- and kill it deterministically with the
SPEAR_TEST_CRASH=<point>@<step> hook of checkpoint.crash_point.
"""
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]
import config  # noqa: E402
from test_train import TOY, _metrics  # noqa: E402  (shared toy flags and metrics reader)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
RUN = TOY + ["--algo", "spear", "--steps", "4", "--ckpt_every", "2", "--trajectory_buffer_size", "2"]
SHORT = TOY + ["--algo", "spear", "--steps", "2", "--ckpt_every", "1", "--keep_ckpts", "1",
               "--trajectory_buffer_size", "2"]
TIMING = ("_s", "tok_s", "mem_gb")


def _strip(ms):
    return [{k: v for k, v in m.items() if not k.endswith(TIMING)} for m in ms]


def _weights(ckpt):
    from safetensors.torch import load_file
    return load_file(os.path.join(ckpt, "model.safetensors"))


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _tree_hash(d):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(d)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def _toy_proc(args, crash=None):
    env = {**ENV, "SPEAR_TEST_CRASH": crash} if crash else ENV
    return subprocess.run([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


# ----------------------------------------------------------------------------- checkpoints and exact resume
def test_sigkill_during_save_and_mid_step_then_resume_matches_uninterrupted_run(toy_train, tmp_path):
    """One run killed three times: after step 4's save committed its temp dir but before the rename, then
    (resumed) mid-step 4 after its rollout, then (resumed) during step 4's save with the weights half
    written. Each time --resume auto restarts from step_2; the finished run is bitwise equal to an
    uninterrupted one, with no duplicated or partial log lines."""
    from checkpoint import MARKER, list_checkpoints
    full = toy_train.main(RUN + ["--out_dir", str(tmp_path), "--run_name", "full"])  # same threads as the child
    args = RUN + ["--out_dir", str(tmp_path), "--run_name", "r", "--resume", "auto"]
    run = os.path.join(tmp_path, "r")
    ck, tmp4 = os.path.join(run, "checkpoints"), os.path.join(run, "checkpoints", ".tmp-step_4")
    for crash, committed_tmp, logged in (("save_before_rename@4", True, [1, 2, 3, 4]),
                                         ("after_rollout@4", True, [1, 2, 3]),
                                         ("save_after_weights@4", False, [1, 2, 3, 4])):
        p = _toy_proc(args, crash=crash)
        assert p.returncode == -signal.SIGKILL, (crash, p.returncode, p.stderr[-3000:])
        assert [s for s, _ in list_checkpoints(run)] == [2], crash  # the loader sees only complete ones
        assert os.path.isdir(tmp4) and os.path.exists(os.path.join(tmp4, MARKER)) == committed_tmp, crash
        assert [m["step"] for m in _metrics(run)] == logged, crash
        if crash != "save_before_rename@4":
            assert "resumed from" in p.stdout and "step_2 at step 3" in p.stdout, crash
        with open(os.path.join(run, "metrics.jsonl"), "a") as f:
            f.write('{"step": 4, "rew')  # as if the kill had also cut a log line in half
    p = _toy_proc(args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _strip(_metrics(run)) == _strip(_metrics(full))
    assert sorted(os.listdir(ck)) == ["step_2", "step_4"]  # no temp dirs left
    a_dir, b_dir = os.path.join(ck, "step_4"), os.path.join(full, "checkpoints", "step_4")
    assert _same_weights(a_dir, b_dir)
    a, b = (torch.load(os.path.join(d, "trainer_state.pt"), weights_only=False) for d in (a_dir, b_dir))
    assert a["buffer"] == b["buffer"] and a["buffer"]["samples"]  # SPEAR's replay buffer, non-empty
    assert all(torch.equal(g, b["rng"]["gens"][k]) for k, g in a["rng"]["gens"].items())


def test_loader_ignores_uncommitted_dirs(tmp_path):
    from checkpoint import MARKER, list_checkpoints
    ck = tmp_path / "checkpoints"
    for name, marker in (("step_2", True), ("step_5", False), (".tmp-step_6", True), ("step_x", True)):
        (ck / name).mkdir(parents=True)
        if marker:
            (ck / name / MARKER).write_text("1")
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2]


# ----------------------------------------------------------------------------- non-finite steps
class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient (so grad norm) is NaN."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _inject_nan(monkeypatch, train, bad_steps, where):
    import update
    real_step, real_loss, cur = train.train_step, update.policy_loss, {}

    def step(s, *a, **k):
        cur["step"] = s
        return real_step(s, *a, **k)

    def loss(*a, **k):
        value, m = real_loss(*a, **k)
        if cur["step"] in bad_steps:
            value = value * float("nan") if where == "loss" else _NanGrad.apply(value)
        return value, m

    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(update, "policy_loss", loss)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_step_is_skipped_and_counted(where, toy_train, tmp_path, monkeypatch):
    _inject_nan(monkeypatch, toy_train, {2, 3}, where)
    run = toy_train.main(TOY + ["--algo", "grpo", "--steps", "4", "--ckpt_every", "1", "--keep_ckpts", "4",
                                "--max_nonfinite_steps", "3", "--out_dir", str(tmp_path), "--run_name", "r"])
    m = _metrics(run)
    assert [x["skipped"] for x in m] == [0, 1, 1, 0] and [x["skipped_total"] for x in m] == [0, 1, 2, 2]
    if where == "grad":
        assert m[1]["grad_norm"] is None and m[2]["grad_norm"] is None  # NaN logged as JSON null
    ck = lambda s: os.path.join(run, "checkpoints", f"step_{s}")
    assert _same_weights(ck(1), ck(2)) and _same_weights(ck(1), ck(3))  # skipped steps change nothing
    assert not _same_weights(ck(3), ck(4))  # and training goes on afterwards
    opt_steps = lambda s: torch.load(os.path.join(ck(s), "trainer_state.pt"), weights_only=False)["optimizer"]
    adam = lambda s: {v["step"].item() for v in opt_steps(s)["state"].values()}
    assert adam(1) == adam(3) == {2.0}  # step 1: its two mini-batch steps; the skipped steps did not advance Adam


def test_nonfinite_steps_in_a_row_abort_and_never_save_nan(toy_train, tmp_path, monkeypatch):
    _inject_nan(monkeypatch, toy_train, set(range(2, 100)), "loss")
    with pytest.raises(SystemExit) as e:
        toy_train.main(TOY + ["--algo", "spear", "--steps", "6", "--ckpt_every", "1", "--keep_ckpts", "9",
                              "--max_nonfinite_steps", "2", "--trajectory_buffer_size", "2",
                              "--out_dir", str(tmp_path), "--run_name", "r"])
    msg = str(e.value)
    assert "2 non-finite steps in a row" in msg and "step_2" in msg and "Fix: lower --lr" in msg
    run = os.path.join(tmp_path, "r")
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_1", "step_2"]
    assert [x["skipped_total"] for x in _metrics(run)] == [0, 1, 2]
    assert all(torch.isfinite(w).all() for w in _weights(os.path.join(run, "checkpoints", "step_2")).values())


def test_save_checkpoint_refuses_nonfinite_weights(tiny, tok, tmp_path):
    from checkpoint import StorageError, save_checkpoint
    model = type(tiny)(tiny.config)
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    with pytest.raises(StorageError, match="non-finite"):
        save_checkpoint(str(tmp_path), 3, model, tok, None, None, {}, {}, keep=2)
    assert os.listdir(tmp_path) == []  # nothing written


# ----------------------------------------------------------------------------- disk full
def _fill_disk_at_step_2(monkeypatch, where, snapshot):
    """Make the step-2 checkpoint write fail as a full disk does (weights: safetensors' error; state:
    an OSError ENOSPC), after hashing step_1 at the moment of failure."""
    import checkpoint
    real_save_model, real_torch_save = checkpoint.save_model, torch.save

    def fail(path):
        if ".tmp-step_2" in str(path):
            snapshot.append(_tree_hash(os.path.join(str(path).split(".tmp-step_2")[0], "step_1")))
            if where == "weights":
                raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
            raise OSError(errno.ENOSPC, "No space left on device")

    def save_model(model, tok, path, **kw):
        if where == "weights":
            fail(path)
        real_save_model(model, tok, path, **kw)

    def torch_save(obj, f, *a, **k):
        if where == "state":
            fail(f)
        return real_torch_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint, "save_model", save_model)
    monkeypatch.setattr(torch, "save", torch_save)


@pytest.mark.parametrize("where", ["weights", "state"])
def test_disk_full_during_save_keeps_previous_checkpoint(where, toy_train, tmp_path, monkeypatch):
    args = SHORT + ["--out_dir", str(tmp_path), "--run_name", "r"]
    snapshot = []
    with monkeypatch.context() as mp:
        _fill_disk_at_step_2(mp, where, snapshot)
        with pytest.raises(SystemExit) as e:
            toy_train.main(args)
    msg = str(e.value)
    assert "the disk is full" in msg and "step_1" in msg and "is intact" in msg and "Fix: free disk space" in msg
    ck = os.path.join(tmp_path, "r", "checkpoints")
    assert os.listdir(ck) == ["step_1"] and _tree_hash(os.path.join(ck, "step_1")) == snapshot[0]
    toy_train.main(args + ["--resume", "auto"])  # space freed: the run finishes from step_1
    assert os.listdir(ck) == ["step_2"] and [m["step"] for m in _metrics(os.path.join(tmp_path, "r"))] == [1, 2]


class _FillsUp:
    """A log file on a disk that fills up while the line of step `at` is being written: half of the line
    reaches the disk, then ENOSPC (as a real full disk does)."""
    def __init__(self, f, at):
        self._f, self._at, self.name = f, at, f.name

    def write(self, text):
        if f'"step": {self._at},' in text:
            self._f.write(text[:len(text) // 2])
            self._f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._f.write(text)

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.mark.parametrize("log", ["metrics.jsonl", "samples.jsonl"])
def test_disk_full_while_appending_logs_stops_cleanly_and_resumes(log, toy_train, tmp_path, monkeypatch):
    """The disk fills up while step 3 appends to a log: the run stops with one line naming the cause and
    the fix, step_2 (the last committed checkpoint) stays loadable, and --resume auto finishes the run with
    logs equal to an uninterrupted run's (the half-written line and step 3's other lines dropped)."""
    args = RUN + ["--out_dir", str(tmp_path)]
    full = toy_train.main(args + ["--run_name", "full"])
    real_open = open

    def full_disk_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return _FillsUp(f, at=3) if str(path).endswith(log) else f

    with monkeypatch.context() as mp:
        mp.setattr(toy_train, "open", full_disk_open, raising=False)
        with pytest.raises(SystemExit) as e:
            toy_train.main(args + ["--run_name", "r"])
    msg, run = str(e.value), os.path.join(tmp_path, "r")
    assert msg.startswith("error: cannot append to") and log in msg and "the disk is full" in msg, msg
    assert "step_2) is intact" in msg and "Fix: free disk space" in msg and "--resume auto" in msg, msg
    assert len(msg.splitlines()) == 1
    assert [s for s, _ in __import__("checkpoint").list_checkpoints(run)] == [2]
    toy_train.load_model(os.path.join(run, "checkpoints", "step_2"))  # loadable
    toy_train.main(args + ["--run_name", "r", "--resume", "auto"])
    assert _strip(_metrics(run)) == _strip(_metrics(full))
    with open(os.path.join(run, "samples.jsonl")) as a, open(os.path.join(full, "samples.jsonl")) as b:
        assert a.read() == b.read()
    assert _same_weights(os.path.join(run, "checkpoints", "step_4"), os.path.join(full, "checkpoints", "step_4"))


def test_real_disk_full_on_a_small_tmpfs(toy_train, tmp_path):
    """The same on a real full filesystem (a tmpfs that holds one checkpoint, not two), where torch.save
    fails with a RuntimeError that does not say ENOSPC. Needs mount rights (root); skipped otherwise."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with pytest.raises(SystemExit) as e:
            toy_train.main(SHORT + ["--out_dir", str(mnt), "--run_name", "r"])
        assert "the disk is full" in str(e.value) and "step_1" in str(e.value)
        ck = mnt / "r" / "checkpoints"
        assert os.listdir(ck) == ["step_1"] and (ck / "step_1" / "COMMITTED").exists()
        toy_train.load_model(str(ck / "step_1"))  # still loadable
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


# ----------------------------------------------------------------------------- bad input (real CLI)
def _bad_input_cases(tmp):
    (tmp / "bad.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", answer: 4}\n')
    (tmp / "empty.jsonl").write_text("\n\n")
    (tmp / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9?", "answer": "1"}\n')
    (tmp / "a_file").write_text("")
    if os.geteuid() == 0:  # root ignores permission bits: a path under a regular file is unwritable to anyone
        unwritable = str(tmp / "a_file" / "runs")
    else:
        (tmp / "ro").mkdir(mode=0o500)
        unwritable = str(tmp / "ro" / "runs")
    return {
        "unknown model": (["--model", "./no-such-model"], ["does not exist", "Fix: pass an existing directory"]),
        "unknown env": (["--env", "chess"], ["unknown --env 'chess'", "choose one of math, alfworld, shop"]),
        "missing dataset": (["--data", str(tmp / "missing.jsonl")], ["No such file", "Fix: pass a readable"]),
        "undecodable dataset": (["--data", str(tmp / "latin1.jsonl")], ["cannot read", "Fix: pass a readable UTF-8"]),
        "malformed dataset line": (["--data", str(tmp / "bad.jsonl")], ["bad.jsonl:2: not valid JSON", "Fix: make"]),
        "empty dataset": (["--data", str(tmp / "empty.jsonl")], ["holds no tasks", "Fix:"]),
        "prompt over token budget": (["--max_total_tokens", "32", "--micro_token_budget", "32"],
                                     ["is too small", "Fix: raise --max_total_tokens to at least"]),
        "micro budget under one sequence": (["--micro_token_budget", "100"], ["raise it to at least 1024"]),
        "unwritable run dir": (["--out_dir", unwritable], ["cannot write the run directory", "Fix: pass a writable"]),
    }


BAD = ["unknown model", "unknown env", "missing dataset", "undecodable dataset", "malformed dataset line",
       "empty dataset", "prompt over token budget", "micro budget under one sequence", "unwritable run dir"]


def _train_argv(out, args):
    return ["--model", "tiny-random", "--env", "math", "--steps", "1", "--eval_every", "0", "--out_dir", str(out),
            *args]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_before_anything_is_written(case, tmp_path):
    """train.main raises SystemExit("error: ... Fix ...") -- which the CLI prints as that one message,
    without a traceback -- and no run dir is created."""
    import train
    args, expected = _bad_input_cases(tmp_path)[case]
    with pytest.raises(SystemExit) as e:
        train.main(_train_argv(tmp_path / "runs", args))
    msg = str(e.value)
    assert msg.startswith("error: ") and len(msg.splitlines()) <= 2 and all(s in msg for s in expected), msg
    assert not (tmp_path / "runs").exists()


def test_a_long_prompt_drawn_at_a_later_step_fails_before_step_1(tmp_path):
    """Every task the run will draw is checked up front: a long question that step 1 does not draw (but a
    later step does) still fails at start-up, naming that task and the fix; nothing is written."""
    import train
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(7)]
    rows.append({"question": "What is 1 + 1? " + "Think hard. " * 400, "answer": "2"})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = train.load_tasks("math", "train", data=str(tmp_path / "d.jsonl"))
    long_id = tasks[-1]["id"]
    step_of = {t["id"]: s for s in (4, 3, 2, 1) for t in train.step_tasks(tasks, s, 2, 0)}
    assert step_of[long_id] > 1  # the first step alone would not see it
    args = ["--data", str(tmp_path / "d.jsonl"), "--train_batch_size", "2", "--steps", "4"]
    with pytest.raises(SystemExit) as e:
        train.main(_train_argv(tmp_path / "runs", args))  # --steps 4 overrides its --steps 1
    msg = str(e.value)
    assert f"the longest task {long_id!r} with" in msg and "1 of the 8 training tasks" in msg, msg
    assert "Fix: raise --max_total_tokens to at least" in msg and len(msg.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_fresh_start_refuses_to_overwrite_an_earlier_runs_checkpoints(tmp_path):
    import train
    from checkpoint import MARKER
    ck = tmp_path / "runs" / "r" / "checkpoints" / "step_3"
    ck.mkdir(parents=True)
    (ck / MARKER).write_text("3")
    with pytest.raises(SystemExit, match="already holds checkpoints.*Fix: --resume auto"):
        train.main(_train_argv(tmp_path / "runs", ["--run_name", "r"]))
    assert sorted(os.listdir(tmp_path / "runs" / "r")) == ["checkpoints"]


def test_bad_input_cli_prints_one_line_without_traceback(tmp_path):
    """The real CLI, one case per kind of failure (config, model, dataset, run dir): exit 1, a short
    stderr with the fix and no traceback, nothing written. Run concurrently (start-up dominates)."""
    cases = _bad_input_cases(tmp_path)
    out = tmp_path / "runs"
    procs = {name: subprocess.Popen([sys.executable, "train.py", *_train_argv(out, cases[name][0])], cwd=ROOT, env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("unknown env", "unknown model", "malformed dataset line", "unwritable run dir")}
    for name, p in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 1, (name, p.returncode, err[-1500:])
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, (name, err[-1500:])
        assert err.startswith("error: ") and all(s in err for s in cases[name][1]), (name, err)
    assert not out.exists()


def test_sandbox_strict_refuses_a_machine_with_a_missing_layer(monkeypatch, tmp_path):
    """--sandbox strict fails before anything is written when a layer is not in force (simulated here:
    this machine may have them all); an unknown --sandbox value is a config error."""
    import sandbox
    import train
    monkeypatch.setattr(sandbox, "_STRICT", False)  # restored after the test: strict must not leak
    monkeypatch.setattr(sandbox, "isolation_level",
                        lambda: "rlimits+setsid+tmpdir+subreaper+landlock(missing: ENOSYS, kernel without Landlock)")
    with pytest.raises(SystemExit) as e:
        train.main(_train_argv(tmp_path / "runs", ["--sandbox", "strict"]))
    assert str(e.value).startswith("error: sandbox strict mode") and "landlock(missing" in str(e.value)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit, match="--sandbox must be default or strict"):
        config.parse_args(["--sandbox", "paranoid"])


if __name__ == "__main__":  # the toy trainer as its own process (for the SIGKILL tests); argv = train.py flags
    import conftest  # noqa: F401  (also sets torch's thread count like the in-process tests)
    import eval as eval_mod
    import train
    from model import bundled_tokenizer, tiny_random_model
    tok = bundled_tokenizer()
    W = tiny_random_model(tok, seed=0).lm_head.weight.detach()  # the GOOD set of conftest's toy_train fixture
    u = torch.randn(W.shape[1], generator=torch.Generator().manual_seed(123))
    conftest.ToyEnv.GOOD, conftest.ToyEnv.tok = set(torch.nonzero(W @ u > 0).flatten().tolist()), tok
    train.make_env = eval_mod.make_env = lambda name, **kw: conftest.ToyEnv()
    train.load_tasks = conftest.toy_tasks
    train.main(sys.argv[1:])
