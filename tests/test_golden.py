"""Golden outputs: fixed-seed runs must reproduce recorded numbers bit for bit on CPU.

Three runs, each in a fresh subprocess with one thread (OMP_NUM_THREADS=1), so the numbers depend
neither on the machine's thread count nor on what other tests did in this process:
  tiny_spear  train.py, SPEAR on the tiny random model and the one-token toy task of conftest.py,
              8 steps, a replay buffer of 8 with trajectory_tolerate_steps 1: replay fires twice with
              part of its tokens inside the clip window (so L_SIL moves the weights), and the buffer
              holds three steps at times, so the order of pruning and admission shows in the numbers;
  smol_math   train.py, SPEAR on the bundled SmolLM2-135M and the real `math` env (sandboxed tool
              calls), 2 steps with small budgets; no response filters, so step 2 trains;
  rollout     the multi-turn sampler alone (tiny model, scripted env, 3 waves, sampled and greedy):
              every token, mask bit and sampling log-prob.
Recorded per run: metrics.jsonl without its wall-clock fields (*_s, *_tok_s, peak_mem_gb), and a sha256
of the final weights (tensor names, dtypes, shapes and bytes) or of the rollout's trajectories.

Bit for bit holds on one kind of CPU: torch and MKL pick their kernels by instruction set and vendor, and
float sums in another order differ in the last bits. So the goldens are kept per CPU class
(tests/golden/<machine>-<torch cpu capability>-<vendor>/): on a class with its own recording every field
and the sha256 must match exactly; on another class the numbers must match within rel 1e-4 (abs 1e-4:
the sampler-vs-trainer KL is float noise around 0) against a recorded class, without the sha256. Fields
the recording does not have (metrics added later) are not compared: a new metric is no numerics change.

A deliberate change of numerics re-records them (this CPU class's), in its own commit that says why:
    SPEAR_REGEN_GOLDEN=1 python -m pytest -q tests/test_golden.py
(or one run: python tests/test_golden.py tiny_spear tests/golden/<class>/tiny_spear).
"""
import hashlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
COMMON = ["--algo", "spear", "--seed", "0", "--temperature", "1.0", "--top_p", "1.0", "--ckpt_every", "100",
          "--run_name", "golden"]  # every flag the numbers depend on is pinned: a new default is no numerics change
ONE_STEP = ["--ppo_mini_batch_size", "4", "--ppo_epochs", "1", "--sil_update", "summed"]  # one step on L_on + lambda L_SIL
TINY = COMMON + ["--model", "tiny-random", "--steps", "8", "--train_batch_size", "4", "--n", "4", "--max_turns", "1",
                 "--max_turn_tokens", "1", "--max_total_tokens", "64", "--lr", "0.002", "--trajectory_buffer_size", "8",
                 "--trajectory_tolerate_steps", "1", "--eval_every", "0"]
RUNS = {
    "tiny_spear": TINY + ONE_STEP,
    "tiny_spear_ppo": TINY + ["--ppo_mini_batch_size", "2", "--ppo_epochs", "1", "--sil_update", "separate"],
    "smol_math": COMMON + ONE_STEP + ["--env", "math", "--model", "smollm2-135m", "--steps", "2", "--train_batch_size",
                                      "2", "--n", "3", "--max_turns", "2", "--max_turn_tokens", "40", "--max_total_tokens",
                                      "768", "--lr", "1e-4", "--eval_every", "0", "--response_filters", "none",
                                      "--max_toolcall_steps", "4"],
}
WALL_CLOCK = ("_s", "_tok_s", "peak_mem_gb")


def weights_sha256(ckpt_dir: str) -> str:
    import torch
    from safetensors.torch import load_file
    sd = load_file(os.path.join(ckpt_dir, "model.safetensors"))
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rollout_run():
    """The sampler alone: (metrics-like summary lines, sha256 of every token, mask bit and log-prob)."""
    import struct
    import torch
    from conftest import ScriptedEnv
    from model import bundled_tokenizer, tiny_random_model
    from rollout import rollout
    tok = bundled_tokenizer()
    model = tiny_random_model(tok, seed=0).eval()
    # prompts of decreasing length, so the total budget ends turns of one wave at different tokens:
    # finished rows swap behind the sampling ones, and rows leave the batch at different turns
    tasks = [{"id": f"t{i}", "question": "Compute " + " + ".join(str(7 * j) for j in range(6 - i)) + " with python.",
              "turns": (3, 3, 2, 3, 3, 1)[i]} for i in range(6)]
    h = hashlib.sha256()
    lines = []
    for temperature in (1.0, 0.0):  # sampled (top-p) and greedy; 2 tasks x 3 rows per wave: 3 waves
        trajs = rollout(model, tok, tasks, ScriptedEnv, group_size=3, max_turns=3, max_turn_tokens=12,
                        max_total_tokens=80, temperature=temperature, top_p=0.9, kv_budget_gb=9e-4,
                        generator=torch.Generator().manual_seed(0))
        for t in trajs:
            h.update(struct.pack(f"{len(t.tokens)}q", *t.tokens) + bytes(t.loss_mask))
            h.update(struct.pack(f"{len(t.logprobs)}d", *t.logprobs))
            lines.append({"T": temperature, "task": t.task_id, "group": t.group, "len": len(t.tokens),
                          "n_sampled": t.n_sampled, "n_turns": t.n_turns, "finish": t.finish, "outcome": t.outcome})
    return lines, h.hexdigest()


def train_run(name: str, out_dir: str):
    """train.py with RUNS[name]; the tiny_spear runs swap the env for conftest's ToyEnv, as the toy_train fixture does."""
    import conftest
    import train
    args = RUNS[name] + ["--out_dir", out_dir]
    if name.startswith("tiny_spear"):
        from model import bundled_tokenizer
        tok = bundled_tokenizer()
        tok.pad_token = tok.pad_token or tok.eos_token
        conftest.use_toy_env(pytest.MonkeyPatch(), tok)
    run_dir = train.main(args)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [{k: v for k, v in json.loads(ln).items() if not k.endswith(WALL_CLOCK)} for ln in f]
    step = max(int(d.split("_")[1]) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.startswith("step_"))
    return lines, weights_sha256(os.path.join(run_dir, "checkpoints", f"step_{step}"))


def record(name: str, out: str, work: str) -> None:
    """Run `name` and write out/metrics.jsonl and out/sha256 (run in a subprocess by the test)."""
    lines, sha = rollout_run() if name == "rollout" else train_run(name, work)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
    with open(os.path.join(out, "sha256"), "w") as f:
        f.write(sha + "\n")


def _read(d):
    with open(os.path.join(d, "metrics.jsonl")) as f:
        lines = [json.loads(ln) for ln in f]
    with open(os.path.join(d, "sha256")) as f:
        return lines, f.read().strip()


def cpu_class() -> str:
    """The CPU class a bit-for-bit golden belongs to, e.g. x86_64-AVX2-AuthenticAMD."""
    import platform
    import torch
    vendor = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            vendor = next((ln.split(":")[1].strip() for ln in f if ln.startswith("vendor_id")), vendor)
    return f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability().replace(' ', '')}-{vendor}"


def _close(g, w) -> bool:
    if isinstance(w, float) and isinstance(g, (int, float)) and not isinstance(g, bool):
        return abs(g - w) <= 1e-4 + 1e-4 * abs(w)
    return g == w


@pytest.mark.parametrize("name", ["rollout", "tiny_spear", "tiny_spear_ppo", "smol_math"])
def test_golden(name, tmp_path):
    regen = os.environ.get("SPEAR_REGEN_GOLDEN") == "1"
    mine = os.path.join(GOLDEN, cpu_class(), name)
    recorded = sorted(d for d in os.listdir(GOLDEN) if os.path.exists(os.path.join(GOLDEN, d, name, "sha256")))
    exact = regen or os.path.exists(os.path.join(mine, "sha256"))
    assert exact or recorded, f"no golden of {name} recorded on any CPU class: SPEAR_REGEN_GOLDEN=1 records it"
    ref = mine if exact else os.path.join(GOLDEN, recorded[0], name)
    out = mine if regen else str(tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SPEAR_TEST_THREADS": "1"}
    p = subprocess.run([sys.executable, os.path.abspath(__file__), name, out, str(tmp_path / "work")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    got, want = _read(out), _read(ref)
    if name.startswith("tiny_spear"):
        assert sum(x.get("n_replayed", 0) for x in want[0]) > 0, "the golden run must exercise replay"
        assert any(x.get("sil_clipfrac_high", 1.0) < 1.0 for x in want[0]), "L_SIL must carry a gradient"
    same = (lambda g, w: g == w) if exact else _close
    assert len(got[0]) == len(want[0])
    for g, w in zip(got[0], want[0]):
        assert all(same(g.get(k), v) for k, v in w.items()), (name, ref, {k: (g.get(k), v) for k, v in w.items()
                                                                         if not same(g.get(k), v)})
    assert not exact or got[1] == want[1], f"{name}: final weights / trajectories differ from the golden sha256"


if __name__ == "__main__":
    os.environ["SPEAR_TEST_THREADS"] = "1"  # conftest.py sets torch's threads from it when imported
    sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
    import torch
    torch.set_num_threads(1)  # whatever OMP_NUM_THREADS says: the goldens are one-thread numbers
    record(sys.argv[1], os.path.abspath(sys.argv[2]), os.path.abspath(sys.argv[3] if len(sys.argv) > 3 else "/tmp"))
