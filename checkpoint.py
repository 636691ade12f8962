"""Atomic, resumable checkpoints: runs/<name>/checkpoints/step_N/ (DESIGN §8).

A checkpoint directory holds HF `save_pretrained` weights + tokenizer (so it is itself a valid
`--model`) and `trainer_state.pt`: optimizer, step, every RNG state (python, numpy, torch, cuda, and
the run's own generators), the replay buffer, config and counters. The schedules of curriculum.py are
pure functions of the step, so the step is their whole state.

Writing is atomic: temp dir -> fsync every file -> COMMITTED marker -> fsync -> rename -> fsync the
parent. A crash at any point leaves either the previous checkpoints or a `.tmp-*` dir that the loader
ignores (and the next save removes). Old checkpoints are pruned only after the new one is committed.
Non-finite weights are never saved.
"""
from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

from model import save_model

MARKER = "COMMITTED"


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(gens: dict) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "gens": {k: g.get_state() for k, g in gens.items()}}


def set_rng_state(s: dict, gens: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    for k, g in gens.items():
        g.set_state(s["gens"][k])


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Committed checkpoints as (step, path), oldest first; uncommitted or temp dirs are ignored."""
    d = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    out = []
    for name in os.listdir(d):
        m = re.fullmatch(r"step_(\d+)", name)
        if m and os.path.exists(os.path.join(d, name, MARKER)):
            out.append((int(m.group(1)), os.path.join(d, name)))
    return sorted(out)


def latest_checkpoint(run_dir: str) -> str | None:
    cks = list_checkpoints(run_dir)
    return cks[-1][1] if cks else None


def save_checkpoint(run_dir: str, step: int, model, tok, opt, buffer, gens: dict, config: dict, keep: int,
                    extra: dict | None = None) -> str:
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError(f"refusing to save non-finite weights at step {step}; the last checkpoint is intact")
    d = os.path.join(run_dir, "checkpoints")
    os.makedirs(d, exist_ok=True)
    for name in os.listdir(d):  # leftovers of a crashed save
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(d, name), ignore_errors=True)
    final = os.path.join(d, f"step_{step}")
    tmp = os.path.join(d, f".tmp-step_{step}")
    save_model(model, tok, tmp)
    torch.save({"step": step, "optimizer": opt.state_dict(), "rng": rng_state(gens), "buffer": buffer.state_dict(),
                "config": config, **(extra or {})}, os.path.join(tmp, "trainer_state.pt"))
    _fsync_tree(tmp)
    with open(os.path.join(tmp, MARKER), "w") as f:
        f.write(str(step))
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):  # re-saving a step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(d)
    for _, old in list_checkpoints(run_dir)[:-keep]:  # prune only after the new one is committed
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str, opt, buffer, gens: dict) -> dict:
    """Restore optimizer, buffer and RNG states (the weights are loaded as --model from `path`)."""
    if not os.path.exists(os.path.join(path, MARKER)):
        raise FileNotFoundError(f"{path} is not a committed checkpoint (no {MARKER} marker). "
                                f"Fix: pass a complete checkpoint dir, or --resume auto to pick the newest one.")
    s = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    opt.load_state_dict(s["optimizer"])
    buffer.load_state_dict(s["buffer"])
    set_rng_state(s["rng"], gens)
    return s
