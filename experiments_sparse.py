"""SPEAR where the paper says it matters (README "Sparse regime"): rare wins, and a tool the model has not
learned yet. Built on experiments.py (its rollout of a run's first steps and its comparison harness).

    python experiments.py calibrate-sparse [--quick]   walk LADDER on the TRAIN split with the bundled model
                                                       at step 0 and stop at the first candidate that meets
                                                       every gate: results/calibration_sparse_math.{json,md}
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from bench import machine
from config import Config
from experiments import budgets, git_commit, group_signal, step_groups

# The ladder, fixed before it ran, from least help to most: the prompt (no example -> a non-math tool call ->
# the worked demonstration), then within a prompt the task levels from hardest to easiest. Levels 3-5 are
# solved by nobody greedily with the demonstration, L1 by 17 % and L2 (the demonstration's own kind, a
# product) by 42 % (README "Measurements"): L1 joins before L2.
LADDER = [(prompt, levels) for prompt in ("none", "toy", "demo")
          for levels in ((4, 5), (3, 4, 5), (1, 3, 4, 5), (1, 2, 3, 4, 5))]
GATES = {  # statistic -> inclusive [lo, hi]; plus "tool_lift" (tool_lift_ok)
    "tool_use_rate": (0.05, 0.40),  # the tool-call bonus must vary inside groups
    "sampled_success": (0.01, 0.12),  # wins are rare...
    "groups_with_success": (0.10, 1.0),  # ...but some groups hold one
}
PROTOCOL = dict(steps=16, P=4, G=8, temperature=0.7)  # 64 train tasks (steps 1-16 of seed 0) x 8 samples
QUICK = dict(steps=2, P=2, G=2, temperature=0.7)


def candidate_name(prompt: str, levels) -> str:
    return f"{prompt}/L{','.join(map(str, levels))}"


def tool_lift_ok(s: dict) -> bool:
    """Success among rollouts that called the tool >= 2x success among those that did not, or no success
    without the tool at all (also when every rollout called it)."""
    without, with_tool = s["success_without_tool"], s["success_with_tool"]
    return not without or (with_tool is not None and with_tool >= 2 * without)


def gates(s: dict) -> dict[str, bool]:
    """Every gate of a candidate's statistics: passed (True) or failed."""
    return {**{k: lo <= s[k] <= hi for k, (lo, hi) in GATES.items()}, "tool_lift": tool_lift_ok(s)}


def sparse_signal(groups: list[list], level_of: dict) -> dict:
    """group_signal plus what the gates read: groups holding a success, success with and without a tool
    call (None where no rollout falls in the class), and the same per task level."""
    rows = [t for g in groups for t in g]
    rate = lambda ts: sum(t.success for t in ts) / len(ts) if ts else None
    tool, plain = [t for t in rows if t.n_tool_calls > 0], [t for t in rows if not t.n_tool_calls]
    per_level = {}
    for lv in sorted({level_of[t.task_id] for t in rows}):
        ts = [t for t in rows if level_of[t.task_id] == lv]
        per_level[lv] = {"rows": len(ts), "success": rate(ts), "tool_use_rate": sum(t.n_tool_calls > 0 for t in ts) / len(ts)}
    return {**group_signal(groups), "groups_with_success": sum(any(t.success for t in g) for g in groups) / len(groups),
            "successes": sum(t.success for t in rows), "tool_rollouts": len(tool),
            "success_with_tool": rate(tool), "success_without_tool": rate(plain), "per_level": per_level}


def walk_ladder(measure, ladder=LADDER, on_candidate=lambda done: None) -> tuple[list[dict], tuple | None]:
    """Measure the candidates in order (measure(prompt, levels) -> statistics) and stop at the first one
    that passes every gate. Returns every evaluated candidate with its gates, and the chosen (prompt, levels)
    (None: none qualified). on_candidate(done) sees the list after each candidate."""
    done = []
    for prompt, levels in ladder:
        s = measure(prompt, levels)
        g = gates(s)
        done.append({"candidate": candidate_name(prompt, levels), "prompt": prompt, "levels": list(levels), **s,
                     "gates": g, "qualifies": all(g.values())})
        on_candidate(done)
        if all(g.values()):
            return done, (prompt, levels)
    return done, None


def calibration_table(cands: list[dict]) -> str:
    f = lambda v: "–" if v is None else f"{v:.3f}"
    md = ["| candidate (prompt / levels) | tool use | sampled success | groups with a success | success with tool / "
          "without | mixed-outcome groups | gates failed |", "|---|---|---|---|---|---|---|"]
    for c in cands:
        failed = ", ".join(k for k, ok in c["gates"].items() if not ok) or "none: **chosen**"
        md.append(f"| {c['candidate']} | {c['tool_use_rate']:.3f} | {c['sampled_success']:.3f} ({c['successes']}/"
                  f"{c['rows']}) | {c['groups_with_success']:.3f} | {f(c['success_with_tool'])} / "
                  f"{f(c['success_without_tool'])} | {c['mixed_outcome_groups']:.3f} | {failed} |")
    return "\n".join(md)


def calibrate_sparse(a):
    """The sparse regime's calibration, on the TRAIN split only: for each LADDER candidate (in order) the
    model at step 0 rolls out the 64 tasks of steps 1-16 (seed 0) x 8 samples at temperature 0.7 with the
    CPU default budgets (3 turns x 160 tokens, 1024 in all); the first candidate that meets every gate is
    the regime. The JSON is rewritten after every candidate, so a cut walk shows how far it got."""
    from chat import ChatFormat
    from envs import load_tasks
    from model import load_model
    proto, model_name = (QUICK, "tiny-random") if a.quick else (PROTOCOL, a.model)
    budget = dict(max_turns=2, max_turn_tokens=48, max_total_tokens=1024) if a.quick else budgets(Config())
    out_path = a.out or os.path.join("results", "calibration_sparse_math" + ("_quick" if a.quick else "") + ".json")
    model, tok = load_model(model_name, device="cpu", dtype=torch.float32)
    fmt = ChatFormat(tok)
    record = {"what": "the sparse regime's calibration (experiments_sparse.calibrate_sparse): walk the ladder from "
                      "least help to most, stop at the first candidate meeting every gate",
              "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} python "
                         f"{' '.join(sys.argv)}",
              "commit": git_commit(), "machine": machine(), "model": model_name, "dtype": "float32",
              "protocol": {"split": "train", "task_seed": 0, "sampler_seed": "the step (1..steps)",
                           "tasks": proto["steps"] * proto["P"], **proto, **budget},
              "ladder": [candidate_name(*c) for c in LADDER], "gates": {**GATES, "tool_lift": ">= 2x or none without"},
              "candidates": [], "chosen": None, "finished": False}

    def save():
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        with open(out_path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(out_path + ".tmp", out_path)

    def measure(prompt, levels):
        tasks, t0 = load_tasks("math", "train", seed=0, levels=levels), time.time()
        groups = step_groups(model, tok, fmt, tasks, proto["steps"], proto["P"], proto["G"], proto["temperature"],
                             budget, env_kw={"prompt": prompt})
        s = {**sparse_signal(groups, {t["id"]: t["level"] for t in tasks}), "seconds": time.time() - t0}
        print(f"[calibrate-sparse] {candidate_name(prompt, levels)}: tool use {s['tool_use_rate']:.3f}, success "
              f"{s['sampled_success']:.3f}, groups with a success {s['groups_with_success']:.3f}, gates "
              f"{gates(s)} ({s['seconds']:.0f} s)", flush=True)
        return s

    t0 = time.time()
    cands, chosen = walk_ladder(measure, on_candidate=lambda done: (record.update(candidates=done), save()))
    record.update(candidates=cands, finished=True, wall_s=time.time() - t0,
                  chosen={"prompt": chosen[0], "levels": list(chosen[1]), "candidate": candidate_name(*chosen)}
                  if chosen else "none qualified")
    save()
    table = calibration_table(cands)
    with open(out_path[:-len(".json")] + ".md", "w") as f:
        f.write(table + "\n")
    print(table)
    return {"out": out_path, "chosen": record["chosen"], "wall_s": record["wall_s"]}
