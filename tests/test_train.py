"""train.py end to end on CPU: config validation, learning on a toy task for every algo, smoke runs,
exact resume after a crash, checkpoints loadable as --model."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--model", "tiny-random", "--max_turns", "1", "--max_turn_tokens", "1", "--max_total_tokens", "64",
       "--train_batch_size", "4", "--n", "4", "--lr", "0.05", "--eval_every", "0", "--ckpt_every", "100"]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f]


@pytest.mark.parametrize("bad, msg", [
    (["--n", "1"], "group size"), (["--loss_mode", "nope"], "loss_mode"), (["--rollout_filter_ratio", "0"], "(0, 1]"),
    (["--rollout_filter_ratio", "1.5"], "(0, 1]"), (["--algo", "ppo"], "unknown --algo"),
    (["--use_toolcall_reward", "linear"], "use_toolcall_reward"), (["--response_filters", "long"], "response_filters"), (["--weight_decay_trajectory_replay", "2"], "-1"),
    (["--algo", "spear", "--train_batch_size", "4", "--baseline_buffer_size", "3"], "raise it to at least --train_batch_size (4)"),
])
def test_invalid_config_fails_before_any_work(bad, msg, capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_args(bad)
    assert msg in str(e.value)


def test_algo_bundles_follow_the_design():
    g, d, s = (config.parse_args(["--algo", a]) for a in ("grpo", "drbot", "spear"))
    assert (g.norm_adv_by_std_in_grpo, g.loss_agg_mode, g.clip_ratio_high, g.rollout_filter_ratio) == (True, "token-mean", 0.2, 1.0)
    assert (d.norm_adv_by_std_in_grpo, d.loss_agg_mode, d.clip_ratio_high, d.response_filters) == (False, "seq-mean-token-sum-norm", 0.28, "overlong,incomplete,repetitive,unreadable")
    assert (s.loss_mode, s.use_toolcall_reward, s.use_replay, s.max_replay_loss_steps) == ("clip_cov", "cosine", True, s.steps)
    assert s.trajectory_buffer_size == s.train_batch_size * s.n // 2  # half a step, as the official small script
    assert config.parse_args(["--algo", "spear", "--clip_ratio_high", "0.3"]).clip_ratio_high == 0.3  # flags win


@pytest.mark.parametrize("algo", ["grpo", "drbot", "spear"])
def test_tiny_model_learns_toy_task(algo, toy_train, tmp_path):
    run = toy_train.main(TOY + ["--algo", algo, "--steps", "15", "--out_dir", str(tmp_path), "--run_name", algo,
                                "--trajectory_buffer_size", "2"])
    m = _metrics(run)
    first, last = sum(x["success"] for x in m[:3]) / 3, sum(x["success"] for x in m[-3:]) / 3
    assert last >= first + 0.3, (algo, [round(x["success"], 2) for x in m])
    if algo == "spear":
        assert any(x["n_replayed"] > 0 for x in m)  # self-imitation actually ran
        assert m[-1]["lambda_sil"] == 1.0 and m[0]["w_toolcall"] < 1.0


def test_resume_after_crash_matches_uninterrupted_run(toy_train, tmp_path, monkeypatch):
    args = TOY + ["--algo", "spear", "--steps", "4", "--ckpt_every", "2", "--trajectory_buffer_size", "2",
                  "--out_dir", str(tmp_path)]
    full = toy_train.main(args + ["--run_name", "full"])
    real_step = toy_train.train_step

    def crash_at_3(step, *a, **k):
        if step == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_step(step, *a, **k)

    monkeypatch.setattr(toy_train, "train_step", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        toy_train.main(args + ["--run_name", "crashed"])
    monkeypatch.setattr(toy_train, "train_step", real_step)
    resumed = toy_train.main(args + ["--run_name", "crashed", "--resume", "auto"])
    timing = ("s", "tok_s", "mem_gb")
    strip = lambda ms: [{k: v for k, v in x.items() if not k.endswith(timing)} for x in ms]
    assert strip(_metrics(full)) == strip(_metrics(resumed))
    from safetensors.torch import load_file
    a = load_file(os.path.join(full, "checkpoints", "step_4", "model.safetensors"))
    b = load_file(os.path.join(resumed, "checkpoints", "step_4", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], toy_train.load_model("tiny-random")[0].model.embed_tokens.weight)


@pytest.mark.parametrize("env, algo", [("math", "grpo"), ("math", "drbot"), ("math", "spear"),
                                       ("alfworld", "spear"), ("shop", "spear")])
def test_train_py_cli_smoke(env, algo, tmp_path):
    """The real CLI on a real env (tiny random model): runs, logs, writes a loadable checkpoint."""
    cmd = [sys.executable, "train.py", "--env", env, "--model", "tiny-random", "--steps", "2", "--algo", algo,
           "--train_batch_size", "2", "--n", "2", "--max_turn_tokens", "16", "--eval_n", "2", "--eval_every", "2",
           "--out_dir", str(tmp_path), "--run_name", "r"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    m = _metrics(os.path.join(tmp_path, "r"))
    assert [x["step"] for x in m] == [0, 1, 2] and "eval_pass@1" in m[-1]
    ck = os.path.join(tmp_path, "r", "checkpoints", "step_2")
    assert os.path.exists(os.path.join(ck, "COMMITTED"))
    from model import load_model
    load_model(ck, device="cpu")


def test_overlong_is_the_response_budget_not_the_turn_or_step_cap(tiny, tok, scripted_env):
    """Dr.BoT's overlong filter as the official reward managers define it: math masks a trajectory whose
    token budget ran out and trains one that used up its turns (a failure); an agent's step row whose
    response reached its per-step budget is overlong, an episode that hit the step cap is not."""
    import train
    from rollout import StepRow, Trajectory, rollout
    cfg = types.SimpleNamespace(response_filters="overlong,incomplete")
    tasks = [{"id": "x", "question": "Go.", "turns": 99}]
    kw = dict(temperature=1.0, generator=torch.Generator().manual_seed(0))
    capped = rollout(tiny, tok, tasks, scripted_env, 2, max_turns=3, max_turn_tokens=7, max_total_tokens=1000, **kw)
    assert all(t.finish == "max_turns" and not t.out_of_budget and t.n_cut == 3 for t in capped)
    assert [r.reasons for r in train.training_rows(capped, cfg)] == [[], []]  # trained, as failures
    out = rollout(tiny, tok, tasks, scripted_env, 2, max_turns=50, max_turn_tokens=7,
                  max_total_tokens=capped[0].prompt_len + 30, **kw)
    assert all(t.finish == "budget" and t.out_of_budget for t in out)
    assert [r.reasons for r in train.training_rows(out, cfg)] == [["overlong"]] * 2

    def step(cut, valid):
        return StepRow(prompt=[1, 2], response=[3, 4, 5], logprobs=[-0.5] * 3, text="t", cut=cut, valid=valid)

    at_step_cap = Trajectory(tokens=[], loss_mask=[], logprobs=[], prompt_len=0, task_id="a", group=0,
                             finish="max_turns", reward=1.5, rows=[step(False, True), step(True, True), step(False, False)])
    rows = train.training_rows([at_step_cap], cfg)
    assert [r.reasons for r in rows] == [[], ["overlong"], ["incomplete"]]  # per row; the step cap masks nothing
    assert [r.reward for r in rows] == [1.5, 1.5, 1.5 - train.INVALID_ACTION_PENALTY]  # the penalty: its own row
    assert (rows[0].tokens, rows[0].loss_mask, rows[0].logprobs) == ([1, 2, 3, 4, 5], [0, 0, 1, 1, 1],
                                                                     [0.0, 0.0, -0.5, -0.5, -0.5])
    cut_by_prompt = Trajectory(tokens=[], loss_mask=[], logprobs=[], prompt_len=0, task_id="a", group=0,
                               finish="budget", out_of_budget=True, rows=[step(False, True)])
    assert [r.reasons for r in train.training_rows([cut_by_prompt], cfg)] == [["overlong"]]
    cut_at_once = Trajectory(tokens=[], loss_mask=[], logprobs=[], prompt_len=0, task_id="a", group=0, finish="budget",
                             out_of_budget=True)
    assert train.training_rows([cut_at_once], cfg) == []


def test_bonus_only_groups_counts_kept_groups_that_the_bonus_alone_splits():
    import train
    from rollout import Trajectory

    def traj(g, outcome, reward):
        return Trajectory(tokens=[1], loss_mask=[1], logprobs=[0.0], prompt_len=0, task_id=str(g), group=g,
                          outcome=outcome, reward=reward)

    trajs = [traj(0, -1, -1.0), traj(0, -1, -0.9),  # one outcome, the bonus splits R: counted
             traj(1, -1, -1.0), traj(1, -1, -1.0),  # one outcome, one R
             traj(2, 1, 1.0), traj(2, -1, -1.0),  # the outcomes split it
             traj(3, -1, -1.0), traj(3, -1, -0.8)]  # bonus-split but dropped by the group filter
    m = train.step_metrics(1, trajs, [[]] * 8, {0, 1, 2}, [], [], {}, {}, torch.device("cpu"))
    assert (m["bonus_only_groups"], m["n_groups"], m["kept_groups"]) == (1, 4, 3)
