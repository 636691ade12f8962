"""SPEAR's self-imitation replay buffer ("trust the wins"; README: paper-to-code map).

One step s, in the official trainer's order (verl-agent's ray_trainer_hybrid.py):
    trigger     maybe_replay(s) looks at the buffer as steps < s left it: replay only when more than
                1.5 * size stored samples have R > b, b = p50 (linear interpolation) of the recent
                kept-group mean rewards. Then recalibrate A' = R - b (or A' = w * A_stored), drop A' <= 0,
                draw min(2^floor(log2 n), size) uniformly without replacement, and EMPTY the buffer:
                each sample is replayed at most once.
    staleness   add(samples, s) first drops entries more than `tolerate_steps` steps older than step s - 1,
                then admits step s's samples: after step s the buffer spans s - tolerate - 1 .. s.
    admission   the trainer passes every kept, unfiltered trajectory with on-policy A > 0 (math: and >= 1
                tool call); the buffer admits what it is given.
    baseline    observe_groups(means, s) appends step s's kept-group mean rewards.

The drawn samples get their own optimizer steps on lambda(s) L_SIL after the on-policy ones (update.py, as
the official trainer runs them). The official `trajectory_score_threshold` knob is never read (we have
none); the other differences are listed in docs/differences.md. The buffer computes no loss: replayed
samples go through `loss.policy_loss` with their stored old log-probs (a true off-policy ratio).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Sample:
    """One training sequence: an on-policy trajectory of this step or a stored win. The buffer reads only
    reward, advantage and step; tokens, loss_mask, old_logp, sampler_logp and task_id are the trainer's
    (lists or tensors). Plain data, so that `state_dict` loads with torch.load(weights_only=True)."""
    tokens: Any  # (L,) token ids
    loss_mask: Any  # (L,) 1 on sampled tokens
    old_logp: Any  # (L,) log-probs from the step the sample was generated at (None until its forward)
    reward: float  # shaped R = outcome + w(s) * bonus
    advantage: float  # on-policy A at admission; the recalibrated A' on replay
    step: int = -1  # admission step, set by ReplayBuffer.add
    task_id: str = ""
    sampler_logp: Any = None  # (L,) the sampler's log-probs, on-policy only (logged against the trainer's)


SAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(Sample))


def p50(values):
    """50th percentile with linear interpolation (numpy's default); +inf for no values, so that no
    sample is "above the baseline" before any group was observed (nothing triggers)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), 50)) if len(values) else float("inf")


def recalibrate(rewards, advantages, baseline, weight=-1.0):
    """Replay advantages: A' = R - b (weight < 0, the default) or A' = weight * A_stored
    (`weight_decay_trajectory_replay` in (0, 1])."""
    if weight < 0:
        return [float(r) - baseline for r in rewards]
    return [weight * float(a) for a in advantages]


def replay_draw_size(n, size):
    """min(2^floor(log2 n), size) for n >= 1; 0 for n = 0 (exact integer arithmetic)."""
    return min(1 << (n.bit_length() - 1), size) if n > 0 else 0


class ReplayBuffer:
    """size = `trajectory_buffer_size` (replay batch cap; trigger at > 1.5 * size above-baseline samples),
    tolerate_steps = `trajectory_tolerate_steps`, baseline_size = `baseline_buffer_size` (group means
    kept), recalibration = `weight_decay_trajectory_replay` (-1: A' = R - b; w in (0, 1]: A' = w * A).
    `stats` holds the last maybe_replay's numbers for logging."""

    def __init__(self, size, tolerate_steps=5, baseline_size=10240, recalibration=-1.0):
        if int(size) != size or size < 1:
            raise ValueError(f"trajectory_buffer_size must be an integer >= 1, got {size}")
        if int(tolerate_steps) != tolerate_steps or tolerate_steps < 0:
            raise ValueError(f"trajectory_tolerate_steps must be an integer >= 0, got {tolerate_steps}")
        if int(baseline_size) != baseline_size or baseline_size < 1:
            raise ValueError(f"baseline_buffer_size must be an integer >= 1, got {baseline_size}")
        if recalibration != -1.0 and not 0 < recalibration <= 1:
            raise ValueError(f"weight_decay_trajectory_replay must be -1 (A' = R - b) or in (0, 1], "
                             f"got {recalibration}")
        self.size, self.tolerate_steps = int(size), int(tolerate_steps)
        self.baseline_size, self.recalibration = int(baseline_size), float(recalibration)
        self._samples: list[Sample] = []
        self._history: list[tuple[int, list[float]]] = []  # (step, kept-group mean rewards), oldest first
        self.stats = {"buffer_size": 0, "n_above_baseline": 0, "baseline": float("inf"), "n_replayed": 0}

    def __len__(self):
        return len(self._samples)

    @property
    def group_means(self):
        return [x for _, means in self._history for x in means]

    def add(self, samples, step):
        """Prune, then admit (the official order): drop entries with (step - 1) - entry.step > tolerate_steps,
        then store every given Sample as a copy with .step = step and no sampler_logp (the caller's object
        is not touched)."""
        samples = list(samples)
        for s in samples:
            if not isinstance(s, Sample):
                raise TypeError(f"ReplayBuffer stores buffer.Sample objects, got {type(s).__name__}")
        self._samples = [s for s in self._samples if (step - 1) - s.step <= self.tolerate_steps]
        self._samples += [dataclasses.replace(s, step=int(step), sampler_logp=None) for s in samples]

    def observe_groups(self, group_mean_rewards, step):
        """Append this step's kept-group mean shaped rewards (one call per step, steps increasing), then
        evict WHOLE steps, oldest first, while more than baseline_size means are stored; the history may
        therefore hold fewer than baseline_size means. A step with more groups than baseline_size raises."""
        means = [float(x) for x in group_mean_rewards]
        if len(means) > self.baseline_size:
            raise ValueError(f"{len(means)} groups in one step exceed baseline_buffer_size="
                             f"{self.baseline_size}; raise --baseline_buffer_size")
        if self._history and step <= self._history[-1][0]:
            raise ValueError(f"observe_groups(step={step}) after step {self._history[-1][0]}: call it once per step")
        if means:
            self._history.append((int(step), means))
        while sum(len(m) for _, m in self._history) > self.baseline_size:
            self._history.pop(0)

    def baseline(self):
        """b = p50 of the stored group means (+inf while none is stored)."""
        return p50(self.group_means)

    def maybe_replay(self, step, generator=None):
        """Replay at this step if more than 1.5 * size stored samples have R > b (exactly 1.5 * size does
        not trigger). Then recalibrate, drop A' <= 0, draw min(2^floor(log2 n), size) of the n left
        uniformly without replacement (torch.randperm on `generator`, a CPU torch.Generator), and empty
        the buffer. Returns copies with .advantage = A' (empty list when not triggered)."""
        b = self.baseline()
        n_above = sum(s.reward > b for s in self._samples)
        self.stats = {"step": int(step), "buffer_size": len(self._samples), "n_above_baseline": n_above,
                      "baseline": b, "n_replayed": 0}
        if n_above <= 1.5 * self.size:
            return []
        adv = recalibrate([s.reward for s in self._samples], [s.advantage for s in self._samples], b,
                          self.recalibration)
        pool = [dataclasses.replace(s, advantage=a) for s, a in zip(self._samples, adv) if a > 0]
        k = replay_draw_size(len(pool), self.size)
        idx = torch.randperm(len(pool), generator=generator)[:k].tolist() if k else []
        self._samples = []
        self.stats["n_replayed"] = len(idx)
        return [pool[i] for i in idx]

    def state_dict(self):
        """Plain data (loads with torch.load(weights_only=True)); payloads are shared, not copied."""
        return {
            "config": {"size": self.size, "tolerate_steps": self.tolerate_steps,
                       "baseline_size": self.baseline_size, "recalibration": self.recalibration},
            "samples": [{k: getattr(s, k) for k in SAMPLE_FIELDS} for s in self._samples],
            "history": [[step, list(means)] for step, means in self._history],
            "stats": dict(self.stats),
        }

    def load_state_dict(self, d):
        """Restore samples, baseline history and stats; the buffer's settings must match the saved ones.
        Fields a Sample no longer has are dropped (a checkpoint from before `extra` became `sampler_logp`)."""
        mine = self.state_dict()["config"]
        for k, v in d["config"].items():
            if mine[k] != v:
                raise ValueError(f"checkpoint buffer has {k}={v} but this run has {mine[k]}; "
                                 "resume with the same buffer settings")
        self._samples = [Sample(**{k: v for k, v in s.items() if k in SAMPLE_FIELDS}) for s in d["samples"]]
        self._history = [(int(step), [float(x) for x in means]) for step, means in d["history"]]
        self.stats = dict(d["stats"])
