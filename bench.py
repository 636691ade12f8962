"""Speed benchmarks, each a ratio measured side by side in one process (these machines are noisy).

    python bench.py rollout  [--quick]   our multi-turn sampler vs model.generate re-prefilling every turn
    python bench.py train    [--quick]   chunked log-prob fwd+bwd vs naive full (B, T, V) fp32 logits: tokens/s,
                                         peak memory, memory vs tokens per micro-batch, MFU vs measured matmul peak
    python bench.py spear-overhead [--quick]   update time of SPEAR vs Dr.BoT on the same rollout batch,
                                         without and with a replay batch
    python bench.py sandbox  [--quick]   executions/s and p50/p99 latency, with and without hostile neighbours
    python bench.py autocast [--quick]   --autocast bf16 vs fp32: trainer fwd+bwd, sampler prefill and decode steps
    python bench.py gpu      [--quick]   the GPU check (README "GPU"); --quick without a GPU: its CPU dry run

Results are printed and appended to results/bench.jsonl with the machine description. The learning
experiments (calibration, the SIL check, the comparison) are in experiments.py.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import platform
import statistics
import threading
import time

import torch


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def naive_rollout(model, tok, tasks, env_name, max_turns, max_turn_tokens):
    """The baseline a naive loop would write: every turn, model.generate on the whole conversation so far
    of every row (left-padded batch, greedy), re-prefilling everything. Observations use the same token
    format. `tasks` has one entry per row (a task repeated G times for a group). Returns the sampled
    tokens of each row and the number of decode steps (generate runs every turn to its longest row)."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    from envs import make_env
    from chat import ChatFormat
    fmt = ChatFormat(tok)
    envs = [make_env(env_name) for _ in tasks]
    ctx = [fmt.prompt(e.reset(t)) for e, t in zip(envs, tasks)]
    live, out_tokens, steps = list(range(len(tasks))), [[] for _ in tasks], 0

    class EnvStop(StoppingCriteria):
        def __init__(self, rows, start):
            self.rows, self.start = rows, start

        def __call__(self, input_ids, scores, **kw):
            return torch.tensor([envs[r].is_stop(tok.decode(input_ids[j, self.start:])) for j, r in
                                 enumerate(self.rows)], device=input_ids.device)

    for _ in range(max_turns):
        if not live:
            break
        n = max(len(ctx[r]) for r in live)
        ids = torch.tensor([[tok.pad_token_id] * (n - len(ctx[r])) + ctx[r] for r in live])
        att = torch.tensor([[0] * (n - len(ctx[r])) + [1] * len(ctx[r]) for r in live])
        gen = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_turn_tokens, do_sample=False,
                             eos_token_id=sorted(fmt.eos_ids), pad_token_id=tok.pad_token_id,
                             stopping_criteria=StoppingCriteriaList([EnvStop(live, n)]))[:, n:]
        steps += gen.shape[1]
        nxt = []
        for j, r in enumerate(live):
            turn = gen[j].tolist()  # generate pads a finished row (with a pad id that may equal EOS's):
            cut = next((i for i in range(1, len(turn) + 1)  # keep through the first EOS or env stop
                        if turn[i - 1] in fmt.eos_ids or envs[r].is_stop(tok.decode(turn[:i]))), len(turn))
            turn = turn[:cut]
            ended_eos = bool(turn) and turn[-1] in fmt.eos_ids
            out_tokens[r] += turn
            obs, done, _ = envs[r].step(tok.decode(turn[:-1] if ended_eos else turn))
            ctx[r] = ctx[r] + turn
            if not done:
                ctx[r] += fmt.observation(obs, ended_eos)
                nxt.append(r)
        live = nxt
    return out_tokens, steps


def bench_rollout(a):
    """Our sampler vs `naive_rollout`, greedy, on an RL batch; also where our time goes (the profile):
    cached forwards of one decode column vs prefill (prompts, observations) vs the rest (sampling,
    per-token Python, env steps in the sandbox)."""
    import rollout as R
    from envs import load_tasks, make_env
    from model import load_model
    model, tok = load_model(a.model)
    n, G, turns, cap = (4, 2, 2, 64) if a.quick else (8, 4, 3, 128)  # an RL batch: n tasks x G rollouts
    tasks = load_tasks("math", "test", n=n)
    res, spent, real_forward = {}, {"decode_s": 0.0, "decode_steps": 0, "prefill_s": 0.0}, R._forward

    def timed_forward(model, ids, attn, pos, cache):
        t0 = time.time()
        out = real_forward(model, ids, attn, pos, cache)
        spent["decode_s" if ids.shape[1] == 1 else "prefill_s"] += time.time() - t0
        spent["decode_steps"] += ids.shape[1] == 1
        return out

    R._forward = timed_forward
    t = time.time()
    try:
        ours = R.rollout(model, tok, tasks, functools.partial(make_env, "math"), G, max_turns=turns,
                         max_turn_tokens=cap, max_total_tokens=1024, temperature=0.0)
    finally:
        R._forward = real_forward
    res["ours_s"] = time.time() - t
    res["ours_profile"] = {**spent, "other_s": res["ours_s"] - spent["decode_s"] - spent["prefill_s"],
                           "decode_ms_per_step": 1000 * spent["decode_s"] / max(spent["decode_steps"], 1)}
    t = time.time()
    with torch.no_grad():
        naive, res["naive_decode_steps"] = naive_rollout(model, tok, [x for x in tasks for _ in range(G)], "math",
                                                         turns, cap)
    res["naive_s"] = time.time() - t
    ours_tok = [[x for x, m in zip(o.tokens, o.loss_mask) if m] for o in ours]
    n_tok = sum(len(x) for x in ours_tok)
    res.update(tasks=n, group_size=G, max_turns=turns, max_turn_tokens=cap, generated_tokens=n_tok,
               ours_tok_s=n_tok / res["ours_s"], naive_tok_s=sum(len(x) for x in naive) / res["naive_s"],
               identical_rows=sum(a_ == b_ for a_, b_ in zip(ours_tok, naive)))
    res["speedup"] = res["ours_tok_s"] / res["naive_tok_s"]
    return res


def peak_mem_reset(device) -> None:
    """Start a new peak-memory window: CUDA allocator peak, or the process's peak RSS (VmHWM) on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def mem_gb(device, peak: bool) -> float:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**30
    key = "VmHWM:" if peak else "VmRSS:"
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(key)) / 2**20


def matmul_peak(device, dtype, n=2048, reps=10) -> float:
    """Measured FLOP/s of an n x n matmul, the denominator of MFU (as nanoGPT reports it, but measured)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t = time.time()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.time() - t)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_flops(cfg, n_params: int, B: int, T: int, n_loss: int) -> float:
    """Model FLOPs of one fwd+bwd (6 per parameter per token): the transformer body on all B*T tokens,
    the LM head only on the n_loss target positions (token_logprobs never forms the others), and causal
    attention 6 * n_layer * d * T per token (nanoGPT's 12 L d T, halved for the causal mask)."""
    head = cfg.vocab_size * cfg.hidden_size
    return 6 * (n_params - head) * B * T + 6 * head * n_loss + 6 * cfg.num_hidden_layers * cfg.hidden_size * T * B * T


def bench_train(a):
    from model import load_model, token_logprobs
    model, _ = load_model(a.model)
    model.train()
    device = next(model.parameters()).device
    B, T = (4, 256) if a.quick else (8, 512)
    g = torch.Generator().manual_seed(0)

    def batch(B, T):  # a rollout-shaped batch: the first quarter of every row is prompt
        ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g).to(device)
        mask = torch.zeros(B, T, dtype=torch.long, device=device)
        mask[:, T // 4:] = 1
        return ids, mask

    def ours(ids, mask):
        logp, _ = token_logprobs(model, ids, mask)
        logp.sum().backward()

    def naive(ids, mask):
        logits = model(ids).logits.float()  # (B, T, V) fp32: what token_logprobs avoids
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        (lp * mask[:, 1:]).sum().backward()

    def measure(fn, B, T):
        """Seconds and peak memory above the resting state of one fwd+bwd on a (B, T) batch, after a small
        warm-up. On CPU the freed heap is first handed back to the OS (malloc_trim), else the peak RSS would
        hide allocations that reuse memory freed earlier."""
        fn(*batch(1, 32))
        model.zero_grad(set_to_none=True)
        ids, mask = batch(B, T)
        sync(device)
        if device.type == "cpu":
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = mem_gb(device, peak=False)
        peak_mem_reset(device)
        t = time.time()
        fn(ids, mask)
        sync(device)
        dt = time.time() - t
        model.zero_grad(set_to_none=True)
        return dt, mem_gb(device, peak=True) - base

    n_loss = int(batch(B, T)[1][:, 1:].sum())
    res = {"B": B, "T": T, "loss_tokens": n_loss, "device": str(device), "dtype": str(next(model.parameters()).dtype)}
    for name, fn in (("ours", ours), ("naive", naive)):
        dt, peak = measure(fn, B, T)
        res.update({f"{name}_s": dt, f"{name}_loss_tok_s": n_loss / dt, f"{name}_peak_gb": peak})
    res["speedup"], res["mem_ratio"] = res["naive_s"] / res["ours_s"], res["naive_peak_gb"] / res["ours_peak_gb"]
    # memory vs tokens per micro-batch (ours): should be linear; extrapolate the largest micro-batch that fits
    sweep = []
    for t_ in ((128, 256, 512) if a.quick else (256, 512, 1024, 2048)):
        dt, peak = measure(ours, 4, t_)
        sweep.append({"tokens": 4 * t_, "peak_gb": peak, "s": dt})
    res["mem_sweep"] = sweep
    x, y = [p["tokens"] for p in sweep], [p["peak_gb"] for p in sweep]
    slope = (y[-1] - y[0]) / (x[-1] - x[0])  # GB per token
    free = (torch.cuda.mem_get_info()[0] / 2**30 if device.type == "cuda" else
            next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemAvailable:")) / 2**20)
    res.update(gb_per_1k_tokens=1000 * slope, free_gb=free, max_micro_batch_tokens_est=int(free / max(slope, 1e-12)))
    # utilization: achieved model FLOP/s of `ours` over the measured matmul peak of the training dtype
    n_params = sum(p.numel() for p in model.parameters())
    flops = train_flops(model.config, n_params, B, T, n_loss)
    peak = matmul_peak(device, next(model.parameters()).dtype)
    res.update(train_tflops=flops / res["ours_s"] / 1e12, matmul_peak_tflops=peak / 1e12,
               mfu=flops / res["ours_s"] / peak)
    return res


def bench_spear_overhead(a):
    """Step time of SPEAR vs Dr.BoT on ONE shared rollout batch (rollout timed once, identical for both):
    the update phase (filters, advantages, Clip-Cov, buffer bookkeeping, old log-probs, fwd+bwd, optimizer
    steps) with no replay, then SPEAR with a replay batch of R stored trajectories (the first R of the batch,
    cycled). Dr.BoT runs twice: with the default two mini-batches (old log-probs from an extra no-grad
    forward) and with one mini-batch (old = current, no extra forward).
    Equal work: outcomes alternate win/loss within each group and the group/response filters are off,
    so both algorithms train all P*G sequences (a time benchmark: which ones win does not matter)."""
    import copy
    import config
    import train
    from buffer import Sample
    from chat import ChatFormat
    from envs import load_tasks
    from model import load_model
    P, G, steps, replays, turns = (2, 4, 1, (4, 8), 2) if a.quick else (4, 4, 2, (8, 16, 32), 3)
    base = ["--env", "math", "--model", a.model, "--train_batch_size", str(P), "--n", str(G), "--steps", "100",
            "--max_turns", str(turns), "--rollout_filter_ratio", "1.0", "--response_filters", "none"]
    model, tok = load_model(a.model, dtype=torch.float32)
    device = next(model.parameters()).device
    fmt, tasks = ChatFormat(tok), load_tasks("math", "train")
    init = copy.deepcopy(model.state_dict())
    cfg = config.parse_args(base + ["--algo", "spear"])
    gens = {k: torch.Generator().manual_seed(i) for i, k in enumerate(("rollout", "buffer", "loss"))}
    t = time.time()
    with torch.no_grad():
        batch = train.rollout(model, tok, train.step_tasks(tasks, 1, P, 0), functools.partial(train.make_env, "math"),
                              G, max_turns=cfg.max_turns, max_turn_tokens=cfg.max_turn_tokens,
                              max_total_tokens=cfg.max_total_tokens, temperature=1.0, generator=gens["rollout"], fmt=fmt)
    t_roll = time.time() - t
    for i, traj in enumerate(batch):  # half of each group wins, so every sequence has A != 0 in both algos
        traj.outcome = 1.0 if i % 2 else -1.0
    real_rollout = train.rollout
    train.rollout = lambda *args, **kw: copy.deepcopy(batch)  # every step below trains on the same batch

    def run(algo, n_replay, flags=()):
        cfg = config.parse_args(base + ["--algo", algo, *flags])
        model.load_state_dict(init)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        buf = train.make_buffer(cfg)
        replay = [Sample(tokens=t.tokens, loss_mask=t.loss_mask, old_logp=t.logprobs, reward=1.0, advantage=1.0)
                  for t in (batch * 8)[:n_replay]]
        buf.maybe_replay = lambda step, generator=None: copy.deepcopy(replay)
        times = []
        for step in range(1, steps + 1):
            m, _ = train.train_step(step + 50, model, tok, fmt, opt, buf, tasks, cfg, gens, device)
            times.append(m["step_s"])
        return {"update_s": statistics.median(times), "old_logp_s": m["old_logp_s"],
                "optimizer_steps": m["optimizer_steps"], "trained_tokens": m.get("trained_tokens", 0),
                "sil_trained_tokens": m.get("sil_trained_tokens", 0), "lambda_sil": m["lambda_sil"]}

    try:
        run("drbot", 0)  # warm-up (first-call allocations), not reported
        res = {"P": P, "G": G, "rollout_s": t_roll, "sampled_tokens": sum(t.n_sampled for t in batch),
               "drbot_one_step": run("drbot", 0, ["--ppo_mini_batch_size", str(P)]),  # no extra forward
               "drbot": run("drbot", 0), "spear": run("spear", 0)}
        for r in replays:
            res[f"spear_replay{r}"] = run("spear", r)
    finally:
        train.rollout = real_rollout
    d = res["drbot"]["update_s"]
    res["drbot"]["update_ratio_vs_one_step"] = d / res["drbot_one_step"]["update_s"]
    for k in [k for k in res if k.startswith("spear")]:
        res[k]["update_ratio"] = res[k]["update_s"] / d
        res[k]["step_ratio"] = (t_roll + res[k]["update_s"]) / (t_roll + d)
    return res


def bench_sandbox(a):
    """`print(1)` executions/s and latency: one caller, then 4 concurrent callers (as rollout.py steps its
    envs from a thread pool), each also next to a hostile neighbour that spins until its 1 s timeout."""
    from concurrent.futures import ThreadPoolExecutor
    from sandbox import isolation_level, run_python
    n = 100 if a.quick else 400
    run_python("print(1)")  # start the pool

    def one(_):
        t0 = time.time()
        r = run_python("print(1)")
        assert r.status == "ok", r
        return time.time() - t0

    def measure(threads):
        t = time.time()
        with ThreadPoolExecutor(threads) as ex:
            lat = sorted(ex.map(one, range(n)))
        return {"exec_s": n / (time.time() - t), "p50_ms": 1000 * statistics.median(lat),
                "p99_ms": 1000 * lat[int(0.99 * (n - 1))]}

    res = {"isolation": isolation_level(), "quiet_1_caller": measure(1), "quiet_4_callers": measure(4)}
    stop = threading.Event()

    def hostile():  # a neighbour that spins until its timeout, over and over
        while not stop.is_set():
            run_python("while True: pass", timeout=1.0)

    th = threading.Thread(target=hostile)
    th.start()
    try:
        res["hostile_1_caller"], res["hostile_4_callers"] = measure(1), measure(4)
    finally:
        stop.set()
        th.join()
    return res


def bench_autocast(a):
    """--autocast bf16 vs none (fp32) on one device, alternating in one process: forward+backward of the
    trainer's log-probs (LogProbs), a prefill and cached decode steps of the sampler (rollout._forward,
    with the CPU's prepacked linears where they apply, as a rollout runs them)."""
    import rollout as R
    from model import LogProbs, autocast, load_model
    model, _ = load_model(a.model, dtype=torch.float32)
    device = next(model.parameters()).device
    (B, T), (P, n), steps, reps = ((1, 64), (4, 32), 4, 1) if a.quick else ((2, 128), (8, 128), 16, 2)
    g = torch.Generator().manual_seed(0)
    ids, prompt = (torch.randint(0, model.config.vocab_size, sh, generator=g).to(device) for sh in ((B, T), (P, n)))
    out = {mode: {"fwd_bwd_s": [], "prefill_s": [], "decode_step_ms": []} for mode in ("none", "bf16")}
    for _ in range(reps):
        for mode in ("none", "bf16"):
            model.train()
            t = time.time()
            LogProbs(model, mode)(ids, torch.ones_like(ids))[0].sum().backward()
            sync(device)
            out[mode]["fwd_bwd_s"].append(time.time() - t)
            model.zero_grad(set_to_none=True)
            model.eval()
            with torch.no_grad(), autocast(device, mode), R.packed_linears(model):
                cache, attn = R.GrowingCache(), torch.ones_like(prompt)
                t = time.time()
                logits = R._forward(model, prompt, attn, attn.cumsum(-1) - 1, cache)
                sync(device)
                out[mode]["prefill_s"].append(time.time() - t)
                t = time.time()
                for i in range(steps):
                    attn = torch.cat([attn, attn[:, :1]], 1)
                    pos = torch.full((P, 1), n + i, device=device)
                    logits = R._forward(model, logits.argmax(-1)[:, None], attn, pos, cache)
                sync(device)
                out[mode]["decode_step_ms"].append(1000 * (time.time() - t) / steps)
    res = {"device": str(device), "fwd_bwd_tokens": B * T, "prefill_tokens": P * n, "decode_rows": P, "reps": reps}
    for mode, m in out.items():
        res[mode] = {"fwd_bwd_tok_s": B * T / min(m["fwd_bwd_s"]), "prefill_tok_s": P * n / min(m["prefill_s"]),
                     "decode_step_ms": min(m["decode_step_ms"])}
    res["bf16_slowdown"] = {k: res["none"][k] / res["bf16"][k] for k in ("fwd_bwd_tok_s", "prefill_tok_s")}
    res["bf16_slowdown"]["decode_step_ms"] = res["bf16"]["decode_step_ms"] / res["none"]["decode_step_ms"]
    return res


QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True, rope_theta=1e6)  # Qwen2.5-1.5B-Instruct's config.json


def memory_report(quick: bool) -> dict:
    """Peak memory of one training micro-batch (one sequence of T tokens, all of them loss tokens, --autocast
    bf16) with and without --enable_gradient_checkpointing, on a Qwen2.5-1.5B-shaped model with random
    weights (no download; a 2-layer miniature with --quick), plus AdamW's state and the KV cache per token."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from model import LogProbs, gradient_checkpointing, kv_bytes_per_token
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = dict(QWEN25_15B, **(dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4) if quick else {}))
    with device:
        model = Qwen2ForCausalLM(Qwen2Config(**shape)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    n_params = sum(p.numel() for p in model.parameters())
    res = {"device": str(device), "params_b": n_params / 1e9, "weights_gb": 4 * n_params / 2**30,
           "kv_cache_mb_per_1k_tokens_bf16": kv_bytes_per_token(model, torch.bfloat16) * 1000 / 2**20}
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    LogProbs(model, "bf16")(ids, torch.ones_like(ids))[0].sum().backward()
    opt.step()  # AdamW's moments now exist, as in every step but the first
    res["after_adam_gb"] = mem_gb(device, peak=False)  # CUDA: weights + grads + moments; CPU: the process RSS
    for ckpt in (True, False):
        if ckpt:
            gradient_checkpointing(model)
        else:
            model.activation_checkpointing_disable()
        for T in ((64, 128) if quick else (4096, 8192, 16384)):
            ids = torch.randint(0, shape["vocab_size"], (1, T), device=device)
            peak_mem_reset(device)
            t = time.time()
            try:
                LogProbs(model, "bf16")(ids, torch.ones_like(ids))[0].sum().backward()
                sync(device)
                row = {"peak_gb": mem_gb(device, peak=True), "tok_s": T / (time.time() - t)}
            except torch.OutOfMemoryError:
                row = {"peak_gb": "OOM"}
            model.zero_grad(set_to_none=False)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            res[f"T{T}_{'ckpt' if ckpt else 'no_ckpt'}"] = row
    return res


def _cli(args: list[str], timeout: int = 600) -> dict:
    """Run one of this repository's scripts as a user would; its exit code, seconds and last lines."""
    import subprocess
    import sys
    t = time.time()
    p = subprocess.run([sys.executable] + args, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                       text=True, timeout=timeout)
    return {"rc": p.returncode, "s": time.time() - t, "tail": (p.stdout + p.stderr)[-600:] if p.returncode else ""}


def bench_gpu(a):
    """The GPU check (README "GPU"), under 10 min on one H100: eval.py --k 4; train.py SPEAR for one step
    with a checkpoint, then --resume auto for a second (gradient checkpointing on, --autocast default =
    bf16); `bench_rollout`; `memory_report`. A part that fails is recorded and the others still run.
    Without a GPU, --quick runs the same path on tiny-random (a dry run of the script, not a GPU check)."""
    import tempfile
    import types
    cuda = torch.cuda.is_available()
    if not cuda and not a.quick:
        raise SystemExit("error: bench.py gpu needs a CUDA GPU. Fix: run it on one, or add --quick for its CPU dry "
                         "run on tiny-random.")
    model = a.model if cuda else "tiny-random"
    work, res = tempfile.mkdtemp(prefix="spear-gpu-"), {"model": model}
    small = ["--max_turn_tokens", "16", "--max_turns", "2"] if not cuda else []
    res["eval"] = _cli(["eval.py", "--env", "math", "--model", model, "--n", "16", "--k", "4", *small,
                        "--out", f"{work}/eval.json"])
    if res["eval"]["rc"] == 0:
        e = json.load(open(f"{work}/eval.json"))
        res["eval"].update({k: e[k] for k in ("pass@1", "avg@4", "pass@4", "greedy_seconds", "sampled_seconds")})
    spear = ["train.py", "--env", "math", "--model", model, "--algo", "spear", "--train_batch_size", "4", "--n", "4",
             "--max_toolcall_steps", "2", "--max_replay_loss_steps", "2", "--trajectory_buffer_size", "2",
             "--ckpt_every", "1", "--eval_every", "1", "--eval_n", "8", "--enable_gradient_checkpointing", "true",
             "--out_dir", work, "--run_name", "spear", *small]
    res["train_step1"] = _cli(spear + ["--steps", "1"])
    res["train_resume_step2"] = _cli(spear + ["--steps", "2", "--resume", "auto"])
    if os.path.exists(f"{work}/spear/metrics.jsonl"):
        keep = ("step", "step_s", "rollout_s", "train_s", "peak_mem_gb", "kl_sampler_trainer", "n_replayed",
                "eval_pass@1", "eval_s", "grad_norm")
        lines = map(json.loads, open(f"{work}/spear/metrics.jsonl"))
        res["train_metrics"] = [{k: m[k] for k in keep if k in m} for m in lines]
    for name, fn in (("rollout", lambda: bench_rollout(types.SimpleNamespace(quick=a.quick, model=model))),
                     ("memory", lambda: memory_report(quick=not cuda))):
        try:
            res[name] = fn()
        except Exception as e:  # record it; the other parts still ran
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    res["failed"] = [k for k, v in res.items() if isinstance(v, dict) and (v.get("rc") or "error" in v)]
    return res


BENCHES = {"rollout": bench_rollout, "train": bench_train, "spear-overhead": bench_spear_overhead,
           "sandbox": bench_sandbox, "autocast": bench_autocast, "gpu": bench_gpu}


def record(res: dict) -> None:
    """Print a result and append it to results/bench.jsonl."""
    print(json.dumps(res, indent=1))
    os.makedirs("results", exist_ok=True)
    with open("results/bench.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=list(BENCHES))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default="smollm2-135m")
    a = p.parse_args()
    record({"bench": a.name, "quick": a.quick, "machine": machine(), **BENCHES[a.name](a)})


if __name__ == "__main__":
    main()
