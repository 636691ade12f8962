"""The batched multi-turn sampler: one KV cache per row across turns, token-in / token-out.

A `Trajectory` is one group member's whole episode (the paper's multi-turn trajectory of tool calls
and observations) as ONE token list: prompt | sampled turn 1 | observation 1 | sampled turn 2 | ...,
with loss_mask = 1 exactly on the tokens the policy sampled. Sampled tokens are never re-tokenized,
so their sampling log-probs stay valid for the policy ratio of the PPO surrogate (loss.py).

A wave of P tasks x G rows runs in three phases (`_wave`):
  1. prefill: each distinct prompt once, its cache fanned out to the G rows of its group;
  2. decode: the rows sample a turn in lockstep; a row whose turn ended moves behind the rows still
     sampling, so each forward runs on the sampling rows only and the others get a masked hole;
  3. step the envs: rows whose episode ended leave the batch, the others get their observation
     tokens prefilled, and the next turn starts.
Holes never shift positions and are masked from attention, so every row sees exactly the sequence
its Trajectory records.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from chat import ChatFormat
from model import kv_bytes_per_token


@dataclass
class Trajectory:
    tokens: list[int]  # (L,) prompt | turn | obs | turn ...
    loss_mask: list[int]  # (L,) 1 on sampled tokens
    logprobs: list[float]  # (L,) sampling log-probs at temperature T (0 where mask = 0)
    prompt_len: int
    task_id: str
    group: int  # index of the task in the batch: rows with the same group share a prompt
    outcome: float = 0.0  # env reward (math: +1 / -1)
    success: bool = False
    n_tool_calls: int = 0
    n_turns: int = 0
    n_steps: int = 0
    n_invalid: int = 0
    toolcall_bonus: float = 0.0
    finish: str = ""  # answer | void | max_turns | budget
    n_cut: int = 0  # sampled turns that ran into their token room (per-turn cap or total budget) unfinished
    out_of_budget: bool = False  # the total token budget ran out (a turn cut at it, or an observation not fitting)
    void: bool = False
    infra_error: bool = False
    reward: float = 0.0  # shaped R, filled in by the trainer
    text: str = ""  # decoded sampled turns + observations, for logs
    turns: list[str] = field(default_factory=list)  # decoded assistant turns

    @property
    def n_sampled(self) -> int:
        return sum(self.loss_mask)


M32 = 0xFFFFFFFF


def row_keys(base: int, groups: list[int], members: list[int]) -> list[int]:
    """A 32-bit random-stream key per row from (base seed, group id, member index)."""
    return [int(hashlib.sha256(f"{base}/{g}/{j}".encode()).hexdigest()[:8], 16) for g, j in zip(groups, members)]


def row_uniforms(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Counter-based uniforms in (0, 1): a hash of (row key, the row's own token counter), (R,) int64 each.
    A row's samples thus never depend on which rows share its batch, its wave or its DDP rank.
    All products stay below 2^63 (32-bit values times 31/32-bit constants), so int64 never overflows."""
    x = (keys + counters * 0x9E3779B1) & M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & M32
    x = x ^ (x >> 16)
    return (x.double() + 0.5) / 2.0 ** 32


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor | None = None):
    """logits (R, V), uniforms u (R,) -> tokens (R,), log-probs (R,) under softmax(logits / T) (before top-p
    truncation; the trainer scores tokens with the same tempered distribution), by inverse CDF.
    T = 0 is greedy (log-probs at T = 1)."""
    logits = logits.float()
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, -1)  # (R, V)
    probs = logp.exp()
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # keep the smallest prefix with mass >= top_p
        probs = probs.scatter(-1, si, sp.masked_fill(drop, 0.0))
    cdf = probs.double().cumsum(-1)  # (R, V)
    tok = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1])[:, None]).squeeze(-1).clamp(max=probs.shape[1] - 1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


class GrowingLayer(DynamicLayer):
    """A KV-cache layer that appends in place into preallocated room (grown in chunks of `CHUNK`
    tokens), instead of HF's torch.cat per decoded token, which copies the whole cache every step.
    A forward over n < B rows feeds the cache's first n rows; the other rows get a hole in the new
    columns (zeros, so that masked attention over them stays finite)."""
    CHUNK = 256

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.n, self._k, self._v = 0, key_states[:, :, :0], value_states[:, :, :0]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, n = key_states.shape[0], key_states.shape[2]
        if self.n + n > self._k.shape[2]:  # grow: one copy per CHUNK tokens
            B, H, _, D = self._k.shape
            cap = self.n + n + self.CHUNK
            k, v = self._k.new_zeros(B, H, cap, D), self._v.new_zeros(B, H, cap, self._v.shape[3])
            k[:, :, :self.n], v[:, :, :self.n] = self._k[:, :, :self.n], self._v[:, :, :self.n]
            self._k, self._v = k, v
        self._k[:rows, :, self.n:self.n + n] = key_states
        self._v[:rows, :, self.n:self.n + n] = value_states
        self.n += n
        self.keys, self.values = self._k[:, :, :self.n], self._v[:, :, :self.n]
        return self.keys[:rows], self.values[:rows]

    def swap_rows(self, i: int, j: int) -> None:
        self._k[[i, j]], self._v[[i, j]] = self._k[[j, i]], self._v[[j, i]]

    def get_seq_length(self) -> int:
        return self.n if self.is_initialized else 0

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._k = self._k[:, :, :self.n].repeat_interleave(repeats, 0)
        self._v = self._v[:, :, :self.n].repeat_interleave(repeats, 0)
        self.keys, self.values = self._k, self._v

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self.keys, self.values = self._k[:, :, :self.n], self._v[:, :, :self.n]


class GrowingCache(Cache):
    def __init__(self):
        super().__init__(layer_class_to_replicate=GrowingLayer)

    def swap_rows(self, i: int, j: int) -> None:
        for layer in self.layers:
            layer.swap_rows(i, j)


@contextlib.contextmanager
def packed_linears(model):
    """On CPU, run every fp32 nn.Linear of `model` through oneDNN with its weight prepacked once per
    rollout: MKL is slow at the few-row matmuls of decode steps (README, "Speed"). Costs one more copy
    of the weights while it runs; same fp32 math in another summation order. Elsewhere (CUDA, bf16) a no-op."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.device.type == "cpu"
               and m.weight.dtype == torch.float32] if torch.backends.mkldnn.is_available() else []
    for m in linears:
        packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), None)
        m.forward = functools.partial(_packed_linear, m, packed)
    try:
        yield
    finally:
        for m in linears:
            del m.forward


def _packed_linear(m, packed, x):  # x (..., in) -> (..., out)
    return torch.ops.mkldnn._linear_pointwise(x, packed, m.bias, "none", [], "")


@torch.no_grad()
def rollout(model, tok, tasks: list[dict], env_fn, group_size: int = 1, *, max_turns: int = 4,
            max_turn_tokens: int = 256, max_total_tokens: int = 2048, temperature: float = 1.0, top_p: float = 1.0,
            generator: torch.Generator | None = None, kv_budget_gb: float | None = None,
            fmt: ChatFormat | None = None, group_offset: int = 0) -> list[Trajectory]:
    """Run len(tasks) * group_size episodes; returns them grouped: tasks[0] x G, tasks[1] x G, ...

    env_fn() -> a fresh Env (one per row). An env may set `tools` (function schemas for the chat template's
    `tools` argument) and `obs_role` ("tool": its observations are tool turns); by default none and "user".
    Budgets: per-turn token cap, turn cap, and a total token budget per trajectory (prompt + everything);
    a trajectory that hits one ends with finish = which.
    Sampling: one draw from `generator` (default: torch's global RNG) seeds the call; row (group g,
    member j) then has its own random stream keyed by (seed, g, j), with g = group_offset + task index.
    So the sampled tokens do not depend on waves or batch composition (up to the float noise of batched
    kernels), and a DDP rank passing group_offset = its first task's index reproduces one process.
    """
    base = int(torch.randint(0, 2**62, (1,), generator=generator))
    fmt = fmt or ChatFormat(tok)
    device = next(model.parameters()).device
    if kv_budget_gb is None:
        kv_budget_gb = 0.5 * torch.cuda.mem_get_info(device)[0] / 2**30 if device.type == "cuda" else 6.0
    # Lockstep turns leave holes in the cache, so a row's cache can reach ~1.5x its token budget.
    rows_fit = max(1, int(kv_budget_gb * 2**30 // (kv_bytes_per_token(model) * max_total_tokens * 1.5)))
    tasks_per_wave = max(1, rows_fit // group_size)
    out: list[Trajectory] = []
    with packed_linears(model):
        for w in range(0, len(tasks), tasks_per_wave):
            out += _wave(model, fmt, tasks[w:w + tasks_per_wave], group_offset + w, env_fn, group_size, max_turns,
                         max_turn_tokens, max_total_tokens, temperature, top_p, base, device)
    return out


def _forward(model, ids, attn, pos, cache):
    """One cached forward of new tokens ids (R, n) -> next-token logits (R, V) at the last column."""
    o = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True,
              logits_to_keep=1)
    return o.logits[:, -1]


def _left_pad(seqs: list[list[int]], pad: int, device):
    """Left-pad token lists -> ids (R, n), mask (R, n)."""
    n = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (n - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


@dataclass
class SampledTurn:
    """What one row sampled in the current turn."""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ended_eos: bool = False  # the last token is an end-of-turn token
    cut: bool = False  # the turn hit the per-turn cap or the total budget


@dataclass
class LiveRows:
    """The wave's cache rows whose episode is still running; cache row i holds trajectory rows[i].
    Within a turn the rows still sampling are always the first n_sampling cache rows."""
    cache: GrowingCache
    attn: torch.Tensor  # (R, S) 1 on real tokens, 0 on left padding and on holes
    next_pos: torch.Tensor  # (R,) position of each row's next token (real tokens only)
    keys: torch.Tensor  # (R,) each row's random-stream key
    counters: torch.Tensor  # (R,) tokens each row has sampled
    logits: torch.Tensor  # (R, V) next-token logits; during a decode step (n_sampling, V)
    rows: list[int]  # (R,) trajectory index of each cache row

    def swap(self, i: int, j: int) -> None:
        """Exchange cache rows i and j, with every per-row tensor."""
        if i != j:
            for x in (self.attn, self.next_pos, self.keys, self.counters, self.logits):
                x[[i, j]] = x[[j, i]]
            self.cache.swap_rows(i, j)
            self.rows[i], self.rows[j] = self.rows[j], self.rows[i]

    def keep(self, keep: list[int]) -> None:
        """Drop every cache row not listed in `keep` (their episodes ended)."""
        if len(keep) < len(self.rows):
            idx = torch.tensor(keep, device=self.attn.device)
            self.cache.batch_select_indices(idx)
            self.attn, self.next_pos, self.keys, self.counters = (self.attn[idx], self.next_pos[idx], self.keys[idx],
                                                                  self.counters[idx])
        self.rows = [self.rows[j] for j in keep]


def _wave(model, fmt, tasks, offset, env_fn, G, max_turns, max_turn_tokens, max_total_tokens, temperature, top_p,
          base, device):
    """Run the episodes of P tasks x G rows in lockstep turns: prefill the prompts, then per turn decode,
    step the envs and prefill their observations (the module docstring's three phases)."""
    envs, prompts, trajs = _start_episodes(fmt, tasks, env_fn, G, offset, max_total_tokens)
    live = _prefill_prompts(model, prompts, G, base, trajs, fmt.tok.pad_token_id, device)
    trigger = fmt.stop_trigger(envs[0].stop_strings).to(device)
    eos = torch.tensor(sorted(fmt.eos_ids), device=device)
    with ThreadPoolExecutor(max_workers=8) as pool:
        for turn in range(max_turns):
            room = {r: min(max_turn_tokens, max_total_tokens - len(trajs[r].tokens)) for r in live.rows}
            sampled = _decode_turn(model, live, envs, room, trigger, eos, fmt.tok, temperature, top_p)
            _record_turn(trajs, sampled, fmt.tok)
            results = list(pool.map(lambda r: envs[r].step(trajs[r].turns[-1]), live.rows))
            keep, suffixes = _end_or_observe(trajs, envs, live.rows, sampled, results, fmt,
                                             last_turn=turn == max_turns - 1, max_total_tokens=max_total_tokens)
            if not keep:
                break
            live.keep(keep)
            _prefill_observations(model, live, suffixes, fmt.tok.pad_token_id)
    for t, e in zip(trajs, envs):
        t.outcome, t.success = float(e.reward), bool(e.success)
        t.n_tool_calls, t.n_steps, t.n_invalid = e.n_tool_calls, e.n_steps, e.n_invalid
        t.toolcall_bonus, t.void, t.infra_error = float(e.toolcall_bonus()), bool(e.void), bool(e.infra_error)
    return trajs


def _start_episodes(fmt, tasks, env_fn, G, offset, max_total_tokens):
    """One env per row, reset on its task; each task's prompt tokens; a Trajectory per row holding its prompt."""
    envs = [env_fn() for _ in range(len(tasks) * G)]
    prompts = [env_prompt(fmt, envs[i * G], t) for i, t in enumerate(tasks)]
    for i, t in enumerate(tasks):
        for e in envs[i * G + 1:(i + 1) * G]:
            e.reset(t)
    for p in prompts:
        if len(p) + 1 > max_total_tokens:
            raise ValueError(f"the prompt has {len(p)} tokens but max_total_tokens is {max_total_tokens}. "
                             f"Fix: raise --max_total_tokens (or shorten the prompt).")
    trajs = [Trajectory(tokens=list(prompts[i // G]), loss_mask=[0] * len(prompts[i // G]),
                        logprobs=[0.0] * len(prompts[i // G]), prompt_len=len(prompts[i // G]),
                        task_id=str(tasks[i // G]["id"]), group=offset + i // G) for i in range(len(envs))]
    return envs, prompts, trajs


def env_prompt(fmt, env, task) -> list[int]:
    """The prompt tokens of `env` reset on `task`, with the env's tools (if any) in the chat template."""
    return fmt.prompt(env.reset(task), tools=getattr(env, "tools", None))


def _prefill_prompts(model, prompts, G, base, trajs, pad, device) -> LiveRows:
    """Phase 1: prefill each distinct prompt once, then fan the cache out to its G rows."""
    cache = GrowingCache()
    ids, attn = _left_pad(prompts, pad, device)  # (P, n)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = _forward(model, ids, attn, pos, cache)  # (P, V)
    cache.batch_repeat_interleave(G)
    attn, logits = attn.repeat_interleave(G, 0), logits.repeat_interleave(G, 0)  # (R, n), (R, V)
    rows = list(range(len(trajs)))
    keys = torch.tensor(row_keys(base, [t.group for t in trajs], [i % G for i in rows]), device=device)
    return LiveRows(cache, attn, next_pos=attn.sum(-1), keys=keys,
                    counters=torch.zeros(len(rows), dtype=torch.long, device=device), logits=logits, rows=rows)


def _decode_turn(model, live: LiveRows, envs, room, trigger, eos, tok, temperature, top_p) -> dict[int, SampledTurn]:
    """Phase 2: every live row samples one turn, in lockstep (one token per row per forward). A row whose
    turn ended (end-of-turn token, an env stop string, its token room) swaps places with the last still
    sampling row, so each forward runs on the first n_sampling rows only; the others get a masked hole
    in that cache column. Returns each row's turn, by trajectory index."""
    R = len(live.rows)
    sampled = {r: SampledTurn() for r in live.rows}
    n_sampling = R  # cache rows [0, n_sampling) are still sampling this turn
    while n_sampling:
        s = slice(0, n_sampling)
        nxt, lp = sample_next(live.logits[s], temperature, top_p, row_uniforms(live.keys[s], live.counters[s]))
        live.counters[s] += 1
        is_eos, check = torch.isin(nxt, eos).tolist(), trigger[nxt].tolist()
        done = []
        for j, (x, lp_j) in enumerate(zip(nxt.tolist(), lp.tolist())):
            r = live.rows[j]
            turn = sampled[r]
            turn.tokens.append(x)
            turn.logprobs.append(lp_j)
            turn.ended_eos = is_eos[j]
            if not is_eos[j] and check[j] and envs[r].is_stop(tok.decode(turn.tokens)):
                done.append(j)
            elif is_eos[j] or len(turn.tokens) >= room[r]:
                turn.cut = not is_eos[j]
                done.append(j)
        fed = (torch.arange(R, device=live.attn.device) < n_sampling).to(live.attn.dtype)[:, None]  # (R, 1)
        live.attn = torch.cat([live.attn, fed], 1)
        live.logits = _forward(model, nxt[:, None], live.attn[s], live.next_pos[s, None], live.cache)  # (n_sampling, V)
        live.next_pos[s] += 1
        for j in reversed(done):  # the finished rows move behind the sampling ones
            n_sampling -= 1
            live.swap(j, n_sampling)
    return sampled


def _record_turn(trajs, sampled: dict[int, SampledTurn], tok) -> None:
    """Append each row's sampled turn to its Trajectory (loss_mask 1) and decode its text."""
    for r, turn in sampled.items():
        t = trajs[r]
        t.tokens += turn.tokens
        t.loss_mask += [1] * len(turn.tokens)
        t.logprobs += turn.logprobs
        t.n_turns += 1
        t.n_cut += turn.cut
        text = tok.decode(turn.tokens[:-1] if turn.ended_eos else turn.tokens)
        t.turns.append(text)
        t.text += text + "\n"


def _end_or_observe(trajs, envs, rows, sampled, results, fmt, *, last_turn, max_total_tokens):
    """Phase 3, after the envs stepped: end the episodes that are over (setting `finish`) and append the
    observation tokens to the others. Returns the cache rows that go on, and their observation tokens."""
    keep, suffixes = [], []
    for j, r in enumerate(rows):
        obs, done, info = results[j]
        t = trajs[r]
        t.out_of_budget = sampled[r].cut and len(t.tokens) >= max_total_tokens
        if done:  # a turn cut by a token cap that leaves no action counts as over budget, not void
            t.finish = ("max_turns" if info.get("truncated") else
                        ("budget" if sampled[r].cut else "void") if envs[r].void else "answer")
        elif last_turn:
            t.finish = "max_turns"
        else:
            suffix = fmt.observation(obs, sampled[r].ended_eos, role=getattr(envs[r], "obs_role", "user"))
            if len(t.tokens) + len(suffix) + 1 > max_total_tokens:
                t.finish, t.out_of_budget = "budget", True
            else:
                t.tokens += suffix
                t.loss_mask += [0] * len(suffix)
                t.logprobs += [0.0] * len(suffix)
                t.text += obs + "\n"
                keep.append(j)
                suffixes.append(suffix)
    return keep, suffixes


def _prefill_observations(model, live: LiveRows, suffixes, pad) -> None:
    """Phase 3, last: prefill each live row's observation tokens (left-padded within the batch)."""
    ids, m = _left_pad(suffixes, pad, live.attn.device)  # (R, n)
    pos = live.next_pos[:, None] + (m.cumsum(-1) - 1).clamp(min=0)
    live.attn = torch.cat([live.attn, m], 1)
    live.logits = _forward(model, ids, live.attn, pos, live.cache)
    live.next_pos = live.next_pos + m.sum(-1)
