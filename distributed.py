"""Data-parallel training on PyTorch's own engine: `torchrun --nproc_per_node N train.py ...` (DDP).

What is split and what is not, so that results do not depend on the world size:
  * rollouts: rank r rolls out a contiguous share of the step's P tasks (whole groups stay on one rank);
    rollout.py keys every row's random stream by its global group id, so the samples are the ones a
    single process would draw;
  * everything that needs the whole batch (shaped rewards, filters, advantages, the std group filter,
    the replay buffer and its baseline, metrics) runs on the all-gathered trajectories, identically on
    every rank; so the buffer is the same everywhere and the replay draw uses the same RNG state;
  * forward/backward: rank r trains a contiguous share of the sequences, with the loss normalizers of
    the whole mini-batch; DDP averages gradients, so each rank scales its loss by the world size and
    the summed gradient is the single-process one. Gradients accumulate locally (`no_sync`) and are
    all-reduced once per step by a zero-loss pass (`sync_grads`), so ranks with different numbers of
    micro-batches never wait on each other's collectives;
  * rank 0 evaluates, logs and checkpoints; trainer state is identical on every rank, so a checkpoint
    resumes under any world size.
CPU uses the gloo backend (that is how it is tested), CUDA uses NCCL with one GPU per local rank.
Clip-Cov / KL-Cov select tokens per micro-batch (as verl does), so with those loss modes a different
micro-batch partition, and hence a different world size, selects differently; vanilla is exact.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def init(device: torch.device | None) -> tuple[int, int, torch.device | None]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def shard(xs: list) -> list:
    """This rank's contiguous share of xs (rank r of W gets xs[r*n//W : (r+1)*n//W])."""
    n, w, r = len(xs), world(), rank()
    return xs[r * n // w:(r + 1) * n // w]


def gather(xs: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (the inverse of `shard`)."""
    if world() == 1:
        return list(xs)
    parts = [None] * world()
    dist.all_gather_object(parts, list(xs))
    return [x for part in parts for x in part]


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def wrap(policy: torch.nn.Module) -> torch.nn.Module:
    """DDP around the module whose forward the trainer runs (model.LogProbs). Buffers (rotary tables)
    are identical on every rank, so they are not broadcast: a forward then runs no collective."""
    if world() == 1:
        return policy
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(policy, broadcast_buffers=False)


def no_sync(policy):
    """Accumulate gradients locally (DDP), or do nothing (one process)."""
    return policy.no_sync() if hasattr(policy, "no_sync") else contextlib.nullcontext()


def sync_grads(policy, device) -> None:
    """All-reduce (average) the gradients accumulated under no_sync: one zero-loss forward/backward
    through DDP, which every rank runs exactly once per step."""
    if world() == 1:
        return
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    logp, _ = policy(ids, torch.tensor([[0, 1]], device=device))
    (logp.sum() * 0.0).backward()
