"""Losses for GRPO, Dr.BoT and SPEAR (arXiv 2509.22601): group advantages, the Dr.BoT response and
group filters, `agg_loss`, and the PPO surrogate with clip-higher, dual-clip, Clip-Cov and KL-Cov.
README, "Reading the code next to the paper", maps each of them to the paper.

Everything here is a pure function of tensors / plain data: no model, no buffer, no config object.

SPEAR's objective is L = L_on + lambda(s) * L_SIL, both terms computed by `policy_loss` with the same
surrogate and aggregation (L_SIL on replayed samples, with their stored old log-probs, so the ratio is
the true off-policy ratio). As in the official trainer, update.py takes the on-policy mini-batches'
optimizer steps first and then the replay mini-batches' own steps on lambda(s) * L_SIL
(`--sil_update summed`: one step on the sum, the objective as written).

Micro-batching (gradient accumulation). `agg_loss` normalizes over the whole MINI-batch: compute once
    global_tokens = mask.sum()          # loss tokens in the whole mini-batch
    global_seqs   = mask.shape[0]       # rows in the whole mini-batch (rows with no loss tokens count)
pass both to every micro-batch's `policy_loss`/`agg_loss` call and backward the sum of the returned
losses: the gradient equals the full-batch gradient for every `agg_mode` and any split. L_on and L_SIL
are two mini-batches, each with its own totals (then L = L_on + lambda(s) * L_SIL).
Clip-Cov / KL-Cov pick their tokens per call (per micro-batch), exactly like the official code, so
only their token selection depends on the split.
"""
from __future__ import annotations

import re
from collections import Counter

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
FILTERS = ("overlong", "incomplete", "repetitive", "unreadable")  # Dr.BoT's response filters, in this order
LOSS_MODES = ("vanilla", "clip_cov", "kl_cov")


# ---------------------------------------------------------------------------------------------------
# Advantages and the group filter (GRPO; the paper's Dr.BoT baseline)

def _group_index(group_ids):
    """ids (list of hashables or a tensor) -> (inverse (N,) long tensor, unique ids in first-seen order)."""
    if isinstance(group_ids, torch.Tensor):
        group_ids = group_ids.tolist()
    first = {}
    inverse = [first.setdefault(g, len(first)) for g in group_ids]
    return torch.tensor(inverse, dtype=torch.long), list(first)


def _group_stats(rewards, group_ids):
    """-> (r (N,) float64, inverse (N,), groups, count (G,), mean (G,), unbiased var (G,), NaN for size 1)."""
    r = torch.as_tensor(rewards).detach().to("cpu", torch.float64).reshape(-1)  # (N,)
    inv, groups = _group_index(group_ids)
    if inv.numel() != r.numel():
        raise ValueError(f"got {r.numel()} rewards but {inv.numel()} group ids")
    G = len(groups)
    count = torch.zeros(G, dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))  # (G,)
    mean = torch.zeros(G, dtype=torch.float64).index_add_(0, inv, r) / count  # (G,)
    sq = torch.zeros(G, dtype=torch.float64).index_add_(0, inv, (r - mean[inv]) ** 2)  # (G,)
    var = sq / (count - 1)  # (G,) unbiased; 0/0 = NaN for a group of one
    return r, inv, groups, count, mean, var


def group_advantages(rewards, group_ids, norm_by_std):
    """Outcome advantage per trajectory, relative to its group (GRPO, Shao et al. 2024; Dr.BoT):
        A_i = R_i - mean_g(R)                                  (Dr.BoT / SPEAR, norm_by_std=False)
        A_i = (R_i - mean_g(R)) / (std_g(R) + 1e-6)            (GRPO, norm_by_std=True, unbiased std)
    Groups are formed by id (task id), wherever their rows sit in the batch, as verl's GRPO advantage
    does (by uid). A zero-variance group gets A = 0.
    GRPO needs groups of >= 2 (a one-row group has no std) and raises otherwise; without std a
    one-row group gets A = 0. Returns (N,) float32 (or the rewards' floating dtype), on their device.
    """
    r, inv, groups, count, mean, var = _group_stats(rewards, group_ids)
    adv = r - mean[inv]  # (N,)
    if norm_by_std:
        if (count < 2).any():
            g = groups[int((count < 2).nonzero()[0])]
            raise ValueError(f"group {g!r} has one trajectory: GRPO's std needs group size >= 2 "
                             "(raise --n)")
        adv = adv / (var.sqrt()[inv] + 1e-6)
    is_t = isinstance(rewards, torch.Tensor)
    return adv.to(dtype=rewards.dtype if is_t and rewards.is_floating_point() else torch.float32,
                  device=rewards.device if is_t else "cpu")


def std_group_filter(rewards, group_ids, ratio):
    """Dr.BoT group filter (`rollout_filter_ratio`, type std): keep the
    max(1, int(ratio * #groups)) groups with the largest reward std, drop the rest.
    Order: larger unbiased std first, ties by first appearance, so zero-variance groups (std 0) are
    dropped first. Returns the kept group ids in that order. The `max(1, .)` is our choice: plain int()
    would drop every group when ratio * #groups < 1 (e.g. 0.75 with one task per step), leaving nothing
    to train on. Groups by id; the official trainer reshapes the batch into contiguous chunks of n rows
    after its batch balancing reorder (as it does for the p50 baseline's group means), which groups rows
    of different tasks whenever the reorder mixed them.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"rollout_filter_ratio must be in (0, 1], got {ratio} (use 1.0 to keep all groups)")
    r, inv, groups, count, mean, var = _group_stats(rewards, group_ids)
    std = torch.nan_to_num(var, nan=0.0).sqrt().tolist()  # a group of one has std 0
    order = sorted(range(len(groups)), key=lambda g: (-std[g], g))  # stable: ties by first appearance
    k = max(1, int(ratio * len(groups)))
    return [groups[g] for g in order[:k]]


# ---------------------------------------------------------------------------------------------------
# Response filters (the paper's Dr.BoT baseline): a filtered trajectory keeps its place in the group
# statistics but gets loss mask 0.

def is_repetitive(token_ids, n=20, times=10):
    """True if some n-gram of token ids occurs >= `times` times (overlapping occurrences count).
    Pass the sampled tokens only (loss_mask == 1), concatenated across turns."""
    if n < 1 or times < 1:
        raise ValueError(f"need n >= 1 and times >= 1, got n={n}, times={times}")
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    counts = Counter()
    for i in range(len(ids) - n + 1):
        gram = tuple(ids[i:i + n])
        counts[gram] += 1
        if counts[gram] >= times:
            return True
    return False


def _mojibake_pattern():
    """UTF-8 bytes shown as Latin-1 / cp1252: a lead 'Â'/'Ã' (bytes C2/C3) or 'â€' (E2 80) followed by
    the rendering of a continuation byte 0x80-0xBF ('Ã©' for 'é', 'â€™' for '’'), or a BOM 'ï»¿'."""
    cont = set()
    for b in range(0x80, 0xC0):
        cont.add(chr(b))  # Latin-1 rendering
        try:
            cont.add(bytes([b]).decode("cp1252"))  # cp1252 rendering (€ ™ “ ” ...)
        except UnicodeDecodeError:
            pass
    cls = "[" + "".join(re.escape(c) for c in sorted(cont)) + "]"
    return re.compile(f"[\u00c2\u00c3]{cls}|\u00e2\u20ac{cls}|\u00ef\u00bb\u00bf")


_MOJIBAKE = _mojibake_pattern()
# The official list (verl/workers/reward_manager/agentConcurrent.py, duplicates dropped): U+FFFD, itself as
# cp1252 mojibake ('ï¿½', also after GPT-2's byte-level space 'Ġ'), and the fullwidth '？' (U+FF1F) as mojibake.
UNREADABLE_STRINGS = ("\ufffd", "\u00ef\u00bf\u00bd", "\u00ef\u00bc\ufffd", "\u00ef\u00bc\u0178",
                      "\u0120\u00ef\u00bf\u00bd")


def is_unreadable(text):
    """True if the decoded response text holds one of the official UNREADABLE_STRINGS, or common UTF-8 read
    as Latin-1/cp1252 mojibake that the official list misses ('Ã©', 'â€™', 'Â°', 'ï»¿')."""
    return any(s in text for s in UNREADABLE_STRINGS) or _MOJIBAKE.search(text) is not None


def response_filter_reasons(response_ids, response_text, *, overlong, incomplete, rep_n=20, rep_times=10):
    """Which of Dr.BoT's response filters one response row trips, in the order of FILTERS, with the official
    reward managers' definitions (agentConcurrent.py for math, verl-agent's episode.py for agents). The
    caller (train.training_rows) knows the row's budgets and action, and passes the first two:
      overlong    the response reached its token budget (official: valid_response_length >= max_response_len).
                  Math, one sequence: the trajectory's token budget ran out. A step row: its response hit
                  the per-step budget, or its episode was cut because a step's prompt outgrew its budget.
                  Never the turn or step cap: a trajectory that used up its turns trains as the failure it is.
      incomplete  the response holds no valid action. Math: its last turn held neither an answer nor a tool
                  call (void); the official check (pred == "[INVALID]") never fires with math_dapo's strict
                  box verification. A step row: verl-agent's projection rejects it (envbase.is_valid_response).
      repetitive  some rep_n-gram of response token ids occurs >= rep_times times (20, 10).
      unreadable  `is_unreadable(response_text)`.
    response_ids / response_text: math, everything after the prompt (sampled turns and tool outputs: verl's
    response); a step row, its sampled tokens."""
    hits = (overlong, incomplete, is_repetitive(response_ids, rep_n, rep_times), is_unreadable(response_text))
    return [name for name, hit in zip(FILTERS, hits) if hit]


# ---------------------------------------------------------------------------------------------------
# Aggregation (`loss_agg_mode`, verl's names)

def agg_loss(loss_mat, mask, mode, max_len=None, *, global_tokens=None, global_seqs=None):
    """Aggregate a (B, T) per-token loss over the mini-batch, m = mask:
        token-mean               Σ m·ℓ / global_tokens
        seq-mean-token-mean      Σ_seq (Σ_t m·ℓ / Σ_t m) / global_seqs
        seq-mean-token-sum       Σ_seq Σ_t m·ℓ / global_seqs
        seq-mean-token-sum-norm  Σ m·ℓ / (global_seqs · max_len)   (Dr.GRPO; max_len = the configured
                                 response budget, a constant. verl divides by the padded length only.)
    global_tokens / global_seqs are the MINI-batch totals (Σ mask, #rows) when this call sees one
    micro-batch of it; None = this batch's own. Rows with no loss tokens add 0 but count in
    global_seqs (as verl counts every row). Positions with mask 0 contribute exactly 0 (even NaN/inf).
    An all-masked batch gives 0.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; expected one of {AGG_MODES}")
    if loss_mat.dim() != 2 or loss_mat.shape != mask.shape:
        raise ValueError(f"loss_mat and mask must both be (B, T); got {tuple(loss_mat.shape)}, {tuple(mask.shape)}")
    m = mask.bool()  # (B, T)
    lm = torch.where(m, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device))  # (B, T)
    B = m.shape[0]
    seqs = B if global_seqs is None else global_seqs
    if seqs < B:
        raise ValueError(f"global_seqs={seqs} is smaller than this batch's {B} rows; pass the mini-batch's row count")
    if mode == "token-mean":
        tokens = m.sum() if global_tokens is None else global_tokens
        if global_tokens is not None and float(global_tokens) < float(m.sum()):
            raise ValueError(f"global_tokens={float(global_tokens)} is smaller than this batch's "
                             f"{int(m.sum())} loss tokens; pass the mini-batch's mask.sum()")
        return lm.sum() / torch.as_tensor(tokens, dtype=lm.dtype, device=lm.device).clamp(min=1)
    if mode == "seq-mean-token-mean":
        seq_loss = lm.sum(-1) / m.sum(-1).clamp(min=1)  # (B,) 0 for rows without loss tokens
        return seq_loss.sum() / max(seqs, 1)
    if mode == "seq-mean-token-sum":
        return lm.sum() / max(seqs, 1)
    if max_len is None or max_len <= 0:
        raise ValueError("seq-mean-token-sum-norm needs max_len > 0: the configured response token budget")
    return lm.sum() / (max(seqs, 1) * max_len)


# ---------------------------------------------------------------------------------------------------
# Covariance-based entropy control (Clip-Cov / KL-Cov, arXiv 2505.22617)

def token_cov(adv, logp, mask):
    """cov_t = (A_t - mean A)(logp_t - mean logp), means over the loss tokens of this call, everything
    detached; 0 where mask = 0. (B, T) -> (B, T)."""
    m = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    a = torch.where(m, adv.detach().to(logp.dtype), zero)  # (B, T)
    lp = torch.where(m, logp.detach(), zero)  # (B, T)
    n = m.sum().clamp(min=1)
    return torch.where(m, (a - a.sum() / n) * (lp - lp.sum() / n), zero)


def clip_cov_mask(adv, logp, mask, clipped, *, ratio=2e-4, lb=1.0, ub=5.0, generator=None):
    """Clip-Cov token selection. Candidates: loss tokens that are NOT already clipped (`clipped`, (B, T)
    bool: tokens whose loss is already constant in logp, see `policy_loss`) with lb < cov_t < ub
    (strict). Pick k = max(floor(ratio * #loss tokens), 1) of them uniformly at random without
    replacement (torch.randperm on `generator`, a torch.Generator whose device torch.randperm accepts);
    all of them if fewer. Returns the (B, T) bool mask of tokens whose loss gets zeroed.
    SPEAR's settings (its official scripts): on-policy ratio 2e-4, [1, 5]; replay 0.02, [2, 60] on agent envs,
    the on-policy values on math: the math scripts pass replay values too, but the math trainer's
    core_algos Clip-Cov ignores its replay flag. (The official README lists 0.02, [1, 40]; its scripts do
    not use them.)"""
    m = mask.bool()
    cov = token_cov(adv, logp, m)  # (B, T)
    cand = (m & ~clipped & (cov > lb) & (cov < ub)).flatten().nonzero().squeeze(1)  # (n_cand,)
    k = max(int(ratio * int(m.sum())), 1)
    if cand.numel() > k:
        dev = generator.device if generator is not None else cand.device
        cand = cand[torch.randperm(cand.numel(), generator=generator, device=dev)[:k].to(cand.device)]
    sel = torch.zeros(m.numel(), dtype=torch.bool, device=m.device)
    sel[cand] = True
    return sel.view_as(m)


def kl_cov_mask(adv, logp, mask, *, ratio=2e-4):
    """KL-Cov token selection: the top k = max(floor(ratio * #loss tokens), 1) loss tokens by cov_t
    (ties: earlier position first). Returns a (B, T) bool mask."""
    m = mask.bool()
    n = int(m.sum())
    sel = torch.zeros(m.numel(), dtype=torch.bool, device=m.device)
    if n:
        cov = torch.where(m, token_cov(adv, logp, m), torch.full((), -float("inf"), device=m.device))
        k = max(int(ratio * n), 1)
        sel[torch.sort(cov.flatten(), descending=True, stable=True).indices[:k]] = True
    return sel.view_as(m)


# ---------------------------------------------------------------------------------------------------
# The PPO surrogate, for both terms of SPEAR's L = L_on + lambda(s) * L_SIL

def policy_loss(logp, old_logp, adv, mask, *, clip_low=0.2, clip_high=0.2, clip_c=10.0,
                agg_mode="token-mean", max_len=None, loss_mode="vanilla", cov_ratio=2e-4, cov_lb=1.0,
                cov_ub=5.0, kl_cov_coef=1.0, generator=None, global_tokens=None, global_seqs=None):
    """Clipped policy-gradient loss on (B, T) log-probs (adv may be (B,), broadcast over T):
        r = exp(clamp(logp - old_logp, -20, 20))                         only where mask = 1
        ℓ = max(-A·r, -A·clip(r, 1 - clip_low, 1 + clip_high))          PPO, clip-higher (DAPO)
        ℓ = min(ℓ, -A·clip_c)  for A < 0                                 dual clip
    then `agg_loss(ℓ, mask, agg_mode, max_len, global_tokens=..., global_seqs=...)`.
    Masked positions give exactly 0 loss and 0 gradient, even when logp there is -inf or NaN.

    A token is "already clipped" when its loss is constant in logp: the PPO clip branch is strictly
    active (-A·clip(r) > -A·r; at r = 1 ± ε exactly it is not) or the dual clip is active
    (A < 0 and -A·clip_c < the PPO loss). The official Clip-Cov has no dual clip, so there only the
    first condition exists.
    loss_mode:
      "vanilla"  the loss above.
      "clip_cov" zero ℓ on `clip_cov_mask` tokens (not already clipped, cov_lb < cov < cov_ub, k random);
                 they stay in the normalizer (the aggregation mask is unchanged).
      "kl_cov"   as in the KL-Cov paper and verl: NO ratio clipping; every loss token gets the plain
                 ℓ = -A·r, and the `kl_cov_mask` tokens (top-k cov) get ℓ = -A·r + kl_cov_coef·|logp -
                 old_logp| (unclamped log-ratio). On-policy (r = 1) this equals vanilla but for the penalty.
    Returns (loss, metrics) with metrics over loss tokens of this call: clipfrac_low/high (PPO clip
    active with r < 1 / r > 1), clipfrac_dual, ppo_kl (mean old_logp - logp), clip_cov_frac,
    kl_cov_frac, ratio_mean/min/max, n_loss_tokens.
    """
    if loss_mode not in LOSS_MODES:
        raise ValueError(f"unknown loss_mode {loss_mode!r}; expected one of {LOSS_MODES}")
    if agg_mode not in AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {agg_mode!r}; expected one of {AGG_MODES}")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if clip_c <= 1:
        raise ValueError(f"clip_ratio_c must be > 1 (dual clip), got {clip_c}")
    if loss_mode != "vanilla" and not (0 < cov_ratio <= 1 and cov_lb < cov_ub and kl_cov_coef >= 0):
        raise ValueError(f"need 0 < cov_ratio <= 1, cov_lb < cov_ub, kl_cov_coef >= 0; got {cov_ratio}, "
                         f"[{cov_lb}, {cov_ub}], {kl_cov_coef}")
    if logp.dim() != 2 or logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp, old_logp, mask must all be (B, T); got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(mask.shape)}")
    if adv.dim() == 1 and adv.shape[0] == logp.shape[0]:
        adv = adv[:, None].expand_as(logp)  # (B,) -> (B, T)
    if adv.shape != logp.shape:
        raise ValueError(f"adv must be (B,) or (B, T) = {tuple(logp.shape)}, got {tuple(adv.shape)}")

    m = mask.bool()  # (B, T)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    A = torch.where(m, adv.detach().to(logp.dtype), zero)  # (B, T)
    log_ratio = torch.where(m, logp - old_logp.detach(), zero)  # (B, T) exactly 0 (and no grad) off the mask
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))  # (B, T)
    surr = -A * ratio  # (B, T)
    surr_clip = -A * ratio.clamp(1 - clip_low, 1 + clip_high)  # (B, T)
    ppo = torch.maximum(surr, surr_clip)  # (B, T)
    ppo_clipped = m & (surr_clip > surr)  # (B, T) clip branch strictly active
    dual = m & (A < 0) & (-A * clip_c < ppo)  # (B, T)
    loss = torch.where(A < 0, torch.minimum(ppo, -A * clip_c), ppo)  # (B, T)

    sel = torch.zeros_like(m)
    if loss_mode == "clip_cov":
        sel = clip_cov_mask(A, logp, m, ppo_clipped | dual, ratio=cov_ratio, lb=cov_lb, ub=cov_ub,
                            generator=generator)
        loss = torch.where(sel, zero, loss)
    elif loss_mode == "kl_cov":
        sel = kl_cov_mask(A, logp, m, ratio=cov_ratio)
        loss = torch.where(sel, surr + kl_cov_coef * log_ratio.abs(), surr)
    pg_loss = agg_loss(loss, m, agg_mode, max_len, global_tokens=global_tokens, global_seqs=global_seqs)

    with torch.no_grad():
        n = m.sum()
        r = ratio.detach()
        inf = torch.full((), float("inf"), dtype=r.dtype, device=r.device)
        vals = torch.stack([x.double() for x in (
            (ppo_clipped & (r < 1)).sum(), (ppo_clipped & (r > 1)).sum(), dual.sum(),
            -log_ratio.detach().sum(), sel.sum(), torch.where(m, r, zero).sum(),
            torch.where(m, r, inf).min(), torch.where(m, r, -inf).max(), n)]).tolist()  # one sync
    k = max(vals[-1], 1.0)
    names = ["clipfrac_low", "clipfrac_high", "clipfrac_dual", "ppo_kl", "sel", "ratio_mean"]
    metrics = {name: v / k for name, v in zip(names, vals)}
    sel_frac = metrics.pop("sel")
    metrics["clip_cov_frac"] = sel_frac if loss_mode == "clip_cov" else 0.0
    metrics["kl_cov_frac"] = sel_frac if loss_mode == "kl_cov" else 0.0
    metrics["ratio_min"] = vals[6] if vals[-1] else 0.0
    metrics["ratio_max"] = vals[7] if vals[-1] else 0.0
    metrics["n_loss_tokens"] = vals[-1]
    return pg_loss, metrics
