"""Atomic, resumable checkpoints: runs/<name>/checkpoints/step_N/.

A checkpoint directory holds HF `save_pretrained` weights + tokenizer (so it is itself a valid
`--model`) and `trainer_state.pt`: optimizer, step, every RNG state (python, numpy, torch, the current
CUDA device's, and the run's own generators), the replay buffer, config and counters. The schedules of
curriculum.py are pure functions of the step, so the step is their whole state.

Writing is atomic: temp dir -> fsync every file -> COMMITTED marker -> fsync -> rename -> fsync the
parent. A crash at any point leaves either the previous checkpoints or a `.tmp-*` dir that the loader
ignores (and the next save removes). Old checkpoints are pruned only after the new one is committed.
Non-finite weights are never saved. A failed write (disk full, I/O error) removes its temp dir and
raises StorageError naming the cause and the intact previous checkpoint.

Under FSDP (--fsdp) every rank calls save_checkpoint: the weights are gathered to rank 0 and written
with save_pretrained, the optimizer shards by every rank with torch.distributed.checkpoint into optim/
(distributed.py); rank 0 writes everything else. Loading re-shards for any world size, with or without
FSDP, and an FSDP run can also continue a checkpoint saved without it.

Test hook: SPEAR_TEST_CRASH=<point>@<step> SIGKILLs the process at a named point (`crash_point`), so the
crash-safety tests can kill a real trainer deterministically (tests/test_hardening.py).
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal

import numpy as np
import torch

import distributed
from model import save_model

MARKER = "COMMITTED"


class StorageError(RuntimeError):
    """The run directory or a checkpoint could not be written (the message names the cause and the fix)."""


def crash_point(name: str, step: int) -> None:
    """Test hook: SIGKILL this process when SPEAR_TEST_CRASH == f"{name}@{step}"; a no-op otherwise."""
    if os.environ.get("SPEAR_TEST_CRASH") == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _why(e: BaseException, path: str, need: int = 0) -> str:
    """The cause of a failed write in words; disk full is recognised by errno, message or free space (a full
    disk surfaces as ENOSPC, as safetensors' "os error 28", or as torch.save's "unexpected pos")."""
    free = shutil.disk_usage(path).free if os.path.isdir(path) else None
    if (getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)
            or (free is not None and free < max(need, 2**20))):
        return f"the disk is full ({(free or 0) / 2**20:.0f} MiB free, ~{need / 2**20:.0f} MiB needed)"
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def prepare_run_dir(run_dir: str, config: dict) -> None:
    """Create the run dir and write config.json (temp file + rename); StorageError if it is not writable."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        tmp = os.path.join(run_dir, ".tmp-config.json")
        with open(tmp, "w") as f:
            json.dump(config, f, indent=1)
        os.replace(tmp, os.path.join(run_dir, "config.json"))
    except OSError as e:
        raise StorageError(f"cannot write the run directory {run_dir!r}: {_why(e, run_dir)}. "
                           f"Fix: pass a writable --out_dir (or --run_name), or free disk space.") from None


def truncate_logs(path: str, last_step: int) -> None:
    """On (re)start, keep only the log lines of steps <= last_step, so a resumed run's logs match an
    uninterrupted one; a partial last line (killed mid-write) is dropped. Rewritten atomically."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for ln in f:
            try:
                if json.loads(ln)["step"] <= last_step:
                    keep.append(ln if ln.endswith("\n") else ln + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def append_logs(f, records: list[dict], run_dir: str) -> None:
    """Append JSON lines to an open log and flush. A failed write (a full disk) raises a StorageError that
    names the fix; the last committed checkpoint stays the resume point, and on --resume auto truncate_logs
    drops the lines written after it (a line cut in half included)."""
    try:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
    except OSError as e:
        raise StorageError(f"cannot append to {f.name}: {_why(e, run_dir)}; the last checkpoint "
                           f"({latest_checkpoint(run_dir) or 'none yet'}) is intact. Fix: free disk space (or pass "
                           f"--out_dir on a larger disk), then rerun with --resume auto.") from None


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
    """Every RNG state of this process; for CUDA only the current device's (the one this rank uses), so a
    run resumes with any number of visible GPUs."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "gens": {k: g.get_state() for k, g in gens.items()}}


def set_rng_state(s: dict, gens: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    cuda = s["cuda"]
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, list):  # older checkpoints: one state per GPU visible to the saving process
            i = torch.cuda.current_device()
            cuda = cuda[i] if i < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda)
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
                    extra: dict | None = None, policy=None) -> str:
    """Write runs/<name>/checkpoints/step_N atomically. `policy`: the FSDP-wrapped trainer module, when
    every rank calls this (FSDP); otherwise only rank 0 calls it."""
    fsdp = policy is not None
    rank0 = distributed.rank() == 0
    weights = distributed.full_state_dict(policy) if fsdp else None  # collective; rank 0 holds them, on CPU
    prev = latest_checkpoint(run_dir) or "none"
    d = os.path.join(run_dir, "checkpoints")
    final = os.path.join(d, f"step_{step}")
    tmp = os.path.join(d, f".tmp-step_{step}")
    err = None
    if rank0:
        try:
            if not all(torch.isfinite(p).all() for p in (weights.values() if fsdp else model.parameters())):
                raise StorageError(f"refusing to save non-finite weights at step {step}; the last checkpoint "
                                   f"({prev}) is intact. Fix: lower --lr or check the data, then rerun with "
                                   f"--resume auto.")
            os.makedirs(d, exist_ok=True)
            for name in os.listdir(d):  # leftovers of a crashed save
                if name.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(d, name), ignore_errors=True)
            save_model(model, tok, tmp, state_dict=weights)
            crash_point("save_after_weights", step)
        except Exception as e:
            err = e
    if fsdp:  # every rank learns rank 0's outcome before the collective optimizer save
        err = distributed.broadcast(None if err is None else StorageError(_failed(err, step, d, model, prev)))
        if err is None:
            distributed.save_optimizer(policy, opt, os.path.join(tmp, "optim"))
        distributed.barrier()
    try:
        if err is not None:
            raise err
        if not rank0:
            return final
        state = {"step": step, "rng": rng_state(gens), "buffer": buffer.state_dict(), "config": config, **(extra or {})}
        if not fsdp:
            state["optimizer"] = opt.state_dict()
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        _fsync_tree(tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(str(step))
            f.flush()
            os.fsync(f.fileno())
    except Exception as e:  # disk full surfaces as OSError, SafetensorError or RuntimeError: all end here
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(_failed(e, step, d, model, prev)) from e
    crash_point("save_before_rename", step)
    if os.path.exists(final):  # re-saving a step (e.g. after a resume): set the old one aside, then swap
        os.rename(final, os.path.join(d, f".tmp-old-step_{step}"))
    os.rename(tmp, final)
    _fsync_dir(d)
    shutil.rmtree(os.path.join(d, f".tmp-old-step_{step}"), ignore_errors=True)
    for _, old in list_checkpoints(run_dir)[:-keep]:  # prune only after the new one is committed
        shutil.rmtree(old, ignore_errors=True)
    return final


def _failed(e: BaseException, step: int, d: str, model, prev: str) -> str:
    """The StorageError message of a failed save of step_<step> in d (one line, with the fix)."""
    if isinstance(e, StorageError):
        return str(e)
    need = 3 * sum(p.numel() * p.element_size() for p in model.parameters())  # weights + Adam moments
    return (f"cannot write checkpoint step_{step} in {d}: {_why(e, d, need)}; the previous checkpoint ({prev}) "
            f"is intact. Fix: free disk space (or pass --out_dir on a larger disk), then rerun with --resume auto.")


def load_checkpoint(path: str, opt, buffer, gens: dict, policy=None) -> dict:
    """Restore optimizer, buffer and RNG states (the weights are loaded as --model from `path`). `policy`:
    the trainer module (LogProbs, FSDP-wrapped or not); every rank calls this. The state is read onto the
    CPU (a GPU run's checkpoint loads on any host, and no rank fills GPU 0 with it); the optimizer moves
    its moments to the parameters' device in load_state_dict."""
    if not os.path.exists(os.path.join(path, MARKER)):
        raise FileNotFoundError(f"{path} is not a committed checkpoint (no {MARKER} marker). "
                                f"Fix: pass a complete checkpoint dir, or --resume auto to pick the newest one.")
    s = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
    if os.path.isdir(os.path.join(path, "optim")):  # saved under FSDP: re-shard for this run
        distributed.load_optimizer(policy, opt, os.path.join(path, "optim"))
    elif policy is not None and distributed.is_fsdp(policy):  # saved whole, continued under FSDP
        distributed.load_full_optimizer(policy, opt, s["optimizer"])
    else:
        opt.load_state_dict(s["optimizer"])
    buffer.load_state_dict(s["buffer"])
    set_rng_state(s["rng"], gens)
    return s
