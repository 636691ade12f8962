"""The flags of train.py: every setting of a run (verl's names where verl has one), the named recipes
(sizes and budgets per env: `cpu`, the calibrated miniature, and `paper`, the official scripts'; README
"Recipes"), the three --algo bundles GRPO, Dr.BoT and SPEAR (README "The algorithms"), and their validation,
which fails in one line naming the fix before any work is done.

Precedence: a flag given > the recipe (default: paper on CUDA, cpu elsewhere) > the --algo bundle > the
dataclass default. Recipes hold sizes and budgets, bundles algorithm switches: no key is in both.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

import torch

from checkpoint import MARKER
from envs import ENV_NAMES, MATH_PROMPTS, TOOL_FORMATS
from loss import AGG_MODES, FILTERS, LOSS_MODES
from mathtasks import parse_levels
from model import ALIASES, default_device


@dataclass
class Config:
    # what to train
    env: str = "math"
    model: str = "smollm2-135m"
    data: str | None = None  # math: JSONL of {question, answer} for the train split; alfworld: the data folder
    tool_format: str | None = None  # math: hermes | markdown; default hermes if the template has tools (docs/envs.md)
    algo: str = "spear"  # grpo | drbot | spear (a bundle of the defaults below)
    recipe: str | None = None  # cpu | paper (RECIPES: sizes and budgets); default paper on CUDA, cpu elsewhere
    run_name: str | None = None
    out_dir: str = "runs"
    seed: int = 0
    # math task regime (docs/sparse_regime.md): the prompt's prior turns and the built-in tasks' levels
    math_prompt: str = "demo"  # demo (one worked example) | toy (a non-math tool call) | none (system text only)
    levels: str | None = None  # comma list of mathtasks levels for the train AND test splits, e.g. 4,5 (None: all)
    # batch and budgets
    steps: int = 14  # the defaults of this block are the math miniature (RECIPES["cpu"]["math"])
    train_batch_size: int = 4  # P tasks per step
    n: int = 8  # G rollouts per task (group size); also --group_size (torchrun takes --n for its own flags)
    max_turns: int = 3  # math: assistant turns; alfworld/shop: env steps (one step row each)
    max_turn_tokens: int = 160  # tokens one turn / one step's response may sample (verl's max_response_length for agents)
    max_total_tokens: int = 1024  # math: the whole trajectory (prompt + turns + tool outputs)
    max_prompt_tokens: int = 2048  # alfworld/shop: one step row's prompt (verl's max_prompt_length)
    history_length: int = 2  # alfworld/shop: past (observation, action) pairs in a step's prompt (verl-agent's name)
    temperature: float = 0.7  # at 1.0 the bundled model's groups all fail (docs/learning.md)
    top_p: float = 1.0
    micro_token_budget: int = 4096  # max padded tokens per micro-batch (memory stays bounded)
    # the update (verl names): one optimizer step per mini-batch of prompts, then per replay mini-batch
    ppo_mini_batch_size: int | None = None  # prompts per mini-batch (x n sequences); default: math P // 2 (the
    #                                         official 4 / 2 and 128 / 64), agent envs P (their scripts: one)
    ppo_epochs: int = 1
    sil_update: str = "separate"  # separate: replay mini-batches take their own steps (official) | summed:
    #                               one step on L_on + lambda(s) L_SIL (one mini-batch, one epoch)
    # optimizer
    lr: float = 1e-5
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    entropy_coeff: float = 0.0
    max_nonfinite_steps: int = 5  # abort after this many non-finite steps in a row
    # policy loss (verl names); None = take the --algo bundle's value
    clip_ratio_low: float | None = None
    clip_ratio_high: float | None = None
    clip_ratio_c: float = 10.0
    loss_agg_mode: str | None = None
    norm_adv_by_std_in_grpo: bool | None = None
    rollout_filter_ratio: float | None = None  # std group filter; 1.0 keeps every group
    response_filters: str | None = None  # comma list of overlong,incomplete,repetitive,unreadable (or none) -> mask 0
    loss_mode: str | None = None  # vanilla | clip_cov | kl_cov
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    clip_cov_ratio_replay: float | None = None  # default: agent envs 0.02, math = on-policy value
    clip_cov_lb_replay: float | None = None  # default: agent envs 2, math = on-policy value
    clip_cov_ub_replay: float | None = None  # default: agent envs 60, math = on-policy value
    kl_cov_ratio: float = 2e-4
    kl_cov_coef: float = 1.0
    # SPEAR: intrinsic tool-call reward and self-imitation
    use_toolcall_reward: str | None = None  # cosine | constant | none
    max_toolcall_steps: int | None = None  # T_tc, default = steps
    use_replay: bool | None = None
    trajectory_buffer_size: int | None = None  # default = P * G / 2 (the official small-scale script: 32 for 4 x 16)
    trajectory_tolerate_steps: int = 5
    replay_loss_coef: float = 1.0
    max_replay_loss_steps: int | None = None  # T_sil, default = steps
    weight_decay_trajectory_replay: float = -1.0  # -1: A' = R - p50 baseline; w in (0, 1]: A' = w A
    baseline_buffer_size: int = 10240
    # evaluation, logging, checkpoints
    eval_every: int = 7
    eval_n: int = 32
    ckpt_every: int = 7
    keep_ckpts: int = 2
    resume: str = "none"  # none | auto | path to a checkpoint dir
    device: str | None = None
    fsdp: bool = False  # under torchrun: FSDP2 (shard weights, grads, Adam state) instead of DDP
    samples_per_step: int = 2
    sandbox: str = "default"  # math: default (run with the isolation layers this machine has) | strict
    # precision, memory and processes on GPUs (docs/gpu.md)
    autocast: str | None = None  # bf16 (autocast over fp32 weights) | none (fp32); default: bf16 on CUDA, none on CPU
    enable_gradient_checkpointing: bool = False  # verl's name: recompute each layer in backward (training forward only)
    dist_timeout_min: float = 60.0  # torchrun collectives' timeout (NCCL's 10 min: short while rank 0 alone evaluates)
    dry_run: bool = False  # print the resolved settings and exit, before loading anything or writing the run dir


ALGOS = {  # the three bundles (README: "The algorithms")
    "grpo": dict(clip_ratio_low=0.2, clip_ratio_high=0.2, loss_agg_mode="token-mean", norm_adv_by_std_in_grpo=True,
                 rollout_filter_ratio=1.0, response_filters="none", loss_mode="vanilla", use_toolcall_reward="none",
                 use_replay=False),
    "drbot": dict(clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode="seq-mean-token-sum-norm",
                  norm_adv_by_std_in_grpo=False, rollout_filter_ratio=0.75, response_filters=",".join(FILTERS),
                  loss_mode="vanilla", use_toolcall_reward="none", use_replay=False),
}
ALGOS["spear"] = {**ALGOS["drbot"], "loss_mode": "clip_cov", "use_toolcall_reward": "cosine", "use_replay": True}

# The recipes (README "Recipes"): sizes and budgets per env, never a key of ALGOS. A key a recipe leaves out
# keeps Config's default (T_tc, T_sil: --steps; the buffer: half a step's trajectories).
CPU_MATH = dict(  # the calibrated miniature (docs/learning.md), exactly Config's defaults
    steps=14, train_batch_size=4, n=8, max_turns=3, max_turn_tokens=160, max_total_tokens=1024, temperature=0.7,
    lr=1e-5)
CPU_AGENT = dict(steps=14, train_batch_size=4, n=8, max_turn_tokens=160, max_prompt_tokens=2048, history_length=2,
                 temperature=0.7, lr=1e-5)  # the miniature's sizes, with the step-row budgets of the paper's agents
PAPER_AGENT = dict(  # the paper's ALFWorld/WebShop runs (verl-agent scripts, Qwen2.5-1.5B-Instruct): 32 tasks x 8,
    # one row per env step of a 2048-token prompt (history_length 2) and a 512-token response, lr 1e-6,
    # temperature 1.0, entropy bonus 0.001, gradient checkpointing on; SPEAR: buffer 2048, T_sil 200, T_tc 200,
    # baseline 10240
    train_batch_size=32, n=8, max_turn_tokens=512, max_prompt_tokens=2048, history_length=2, temperature=1.0, lr=1e-6,
    entropy_coeff=0.001, enable_gradient_checkpointing=True, trajectory_buffer_size=2048, max_replay_loss_steps=200,
    max_toolcall_steps=200, baseline_buffer_size=10240)
RECIPES = {
    "cpu": {
        "math": CPU_MATH,
        # every generated game's walkthrough fits: the longest take 11 env steps (two objects, each fetched from
        # an openable receptacle, into an openable one; alfworld_games.walkthrough), one more step of slack
        "alfworld": {**CPU_AGENT, "max_turns": 12},
        "shop": {**CPU_AGENT, "max_turns": 10},  # the expert planner buys in 4-5 steps (shop.expert)
    },
    "paper": {
        # the official small-scale math script (verl recipe/spear, run_qwen2-32b_grpo.sh's shape on one GPU):
        # 4 prompts x 16 responses, 8 turns, a 2048-token prompt + 16384 response tokens over all turns (no
        # per-turn cap), micro-batches of prompt + response tokens (ppo_max_token_len_per_gpu), gradient
        # checkpointing on, lr 1e-6, temperature 1.0, no entropy bonus; SPEAR: buffer 32 (half a step's
        # trajectories), T_sil 300, T_tc 200, baseline 10240. Its runs stop at a wall-clock limit, not a step
        # count: 300 steps = T_sil, so both schedules run to their end.
        "math": dict(steps=300, train_batch_size=4, n=16, max_turns=8, max_turn_tokens=16384,
                     max_total_tokens=2048 + 16384, micro_token_budget=2048 + 16384, enable_gradient_checkpointing=True,
                     temperature=1.0, lr=1e-6, entropy_coeff=0.0, trajectory_buffer_size=32, max_replay_loss_steps=300,
                     max_toolcall_steps=200, baseline_buffer_size=10240),
        "alfworld": {**PAPER_AGENT, "steps": 200, "max_turns": 50},  # ALFWorld: 200 steps, 50 env steps
        "shop": {**PAPER_AGENT, "steps": 350, "max_turns": 15},  # WebShop: 350 steps, 15 env steps
    },
}


def default_recipe(device_type: str) -> str:
    """The recipe of a run that names none: the paper's on a CUDA device, the CPU miniature elsewhere."""
    return "paper" if device_type == "cuda" else "cpu"


def finalize(cfg: Config) -> Config:
    """Fill the --algo bundle and run-length defaults, then validate; fails before any work is done."""
    if cfg.algo not in ALGOS:
        raise SystemExit(f"error: unknown --algo {cfg.algo!r}; choose one of {sorted(ALGOS)}")
    for k, v in ALGOS[cfg.algo].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    agent = cfg.env != "math"
    for k, agent_v in (("clip_cov_ratio", 0.02), ("clip_cov_lb", 2.0), ("clip_cov_ub", 60.0)):
        if getattr(cfg, k + "_replay") is None:
            setattr(cfg, k + "_replay", agent_v if agent else getattr(cfg, k))
    cfg.max_toolcall_steps = cfg.max_toolcall_steps or cfg.steps
    cfg.max_replay_loss_steps = cfg.max_replay_loss_steps or cfg.steps
    cfg.trajectory_buffer_size = cfg.trajectory_buffer_size or max(cfg.train_batch_size * cfg.n // 2, 1)
    if cfg.ppo_mini_batch_size is None:
        cfg.ppo_mini_batch_size = max(cfg.train_batch_size // 2, 1) if cfg.env == "math" else cfg.train_batch_size
    cfg.run_name = cfg.run_name or f"{cfg.env}-{cfg.algo}-s{cfg.seed}"
    errors = []
    if cfg.env not in ENV_NAMES:
        errors.append(f"unknown --env {cfg.env!r}; choose one of {', '.join(ENV_NAMES)}")
    if cfg.tool_format is not None and (cfg.tool_format not in TOOL_FORMATS or cfg.env != "math"):
        errors.append(f"--tool_format is for --env math, one of {', '.join(TOOL_FORMATS)}; got {cfg.tool_format!r}")
    if cfg.n < 2:
        errors.append(f"--n (group size) must be >= 2 for group-relative advantages, got {cfg.n}")
    if not 0 < cfg.rollout_filter_ratio <= 1:
        errors.append(f"--rollout_filter_ratio must be in (0, 1], got {cfg.rollout_filter_ratio}")
    enabled = [f for f in cfg.response_filters.split(",") if f and f != "none"]
    if any(f not in FILTERS for f in enabled):
        errors.append(f"--response_filters must be 'none' or a comma list of {','.join(FILTERS)}, "
                      f"got {cfg.response_filters!r}")
    if cfg.loss_agg_mode not in AGG_MODES:
        errors.append(f"--loss_agg_mode must be one of {AGG_MODES}, got {cfg.loss_agg_mode!r}")
    if cfg.loss_mode not in LOSS_MODES:
        errors.append(f"--loss_mode must be vanilla, clip_cov or kl_cov, got {cfg.loss_mode!r}")
    if cfg.use_toolcall_reward not in ("cosine", "constant", "none"):
        errors.append(f"--use_toolcall_reward must be cosine, constant or none, got {cfg.use_toolcall_reward!r}")
    if not (cfg.weight_decay_trajectory_replay == -1 or 0 < cfg.weight_decay_trajectory_replay <= 1):
        errors.append("--weight_decay_trajectory_replay must be -1 (p50 baseline) or in (0, 1]")
    if min(cfg.steps, cfg.train_batch_size, cfg.max_turns, cfg.max_turn_tokens, cfg.ckpt_every, cfg.keep_ckpts,
           cfg.max_nonfinite_steps) < 1:
        errors.append("--steps, --train_batch_size, --max_turns, --max_turn_tokens, --ckpt_every, --keep_ckpts and "
                      "--max_nonfinite_steps must be >= 1")
    if cfg.use_replay and cfg.baseline_buffer_size < cfg.train_batch_size:
        errors.append(f"--baseline_buffer_size {cfg.baseline_buffer_size} cannot hold one step's group means: raise it "
                      f"to at least --train_batch_size ({cfg.train_batch_size})")
    if min(cfg.ppo_mini_batch_size, cfg.ppo_epochs) < 1:
        errors.append("--ppo_mini_batch_size and --ppo_epochs must be >= 1")
    if cfg.sil_update not in ("separate", "summed"):
        errors.append(f"--sil_update must be separate or summed, got {cfg.sil_update!r}")
    elif cfg.sil_update == "summed" and (cfg.ppo_mini_batch_size < cfg.train_batch_size or cfg.ppo_epochs != 1):
        errors.append(f"--sil_update summed takes ONE optimizer step per batch: it needs --ppo_mini_batch_size >= "
                      f"--train_batch_size ({cfg.train_batch_size}) and --ppo_epochs 1, got "
                      f"{cfg.ppo_mini_batch_size} and {cfg.ppo_epochs}")
    longest = cfg.max_prompt_tokens + cfg.max_turn_tokens if agent else cfg.max_total_tokens
    if cfg.micro_token_budget < longest:
        errors.append(f"--micro_token_budget {cfg.micro_token_budget} cannot hold one training sequence of up to "
                      f"{longest} tokens (" + ("--max_prompt_tokens + --max_turn_tokens" if agent else
                                               "--max_total_tokens") + f"); raise it to at least {longest}")
    if cfg.history_length < 0 or cfg.max_prompt_tokens < 1:
        errors.append(f"--history_length must be >= 0 and --max_prompt_tokens >= 1, got {cfg.history_length} and "
                      f"{cfg.max_prompt_tokens}")
    if cfg.resume not in ("none", "auto") and not os.path.exists(os.path.join(cfg.resume, MARKER)):
        errors.append(f"--resume must be none, auto or a committed checkpoint directory (with {MARKER}); "
                      f"{cfg.resume!r} is none of these")
    if cfg.sandbox not in ("default", "strict"):
        errors.append(f"--sandbox must be default or strict, got {cfg.sandbox!r}")
    if cfg.autocast not in (None, "bf16", "none"):
        errors.append(f"--autocast must be bf16 or none, got {cfg.autocast!r}")
    if cfg.dist_timeout_min <= 0:
        errors.append(f"--dist_timeout_min must be > 0, got {cfg.dist_timeout_min}")
    if cfg.math_prompt not in MATH_PROMPTS:
        errors.append(f"--math_prompt must be one of {', '.join(MATH_PROMPTS)}, got {cfg.math_prompt!r}")
    elif cfg.math_prompt != "demo" and cfg.env != "math":
        errors.append(f"--math_prompt is for --env math; drop it for --env {cfg.env}")
    if cfg.levels is not None:
        try:
            parse_levels(cfg.levels)
        except ValueError as e:
            errors.append(str(e))
        if cfg.env != "math" or cfg.data:
            errors.append("--levels selects the math env's built-in tasks; drop it with --data or another --env")
    if errors:
        raise SystemExit("error: invalid configuration:\n  " + "\n  ".join(errors))
    return cfg


def env_kwargs(cfg: Config) -> dict:
    """make_env's keyword arguments for the run's env: math's tool-call format and prompt; the agent envs'
    history window."""
    if cfg.env == "math":
        return {"tool_format": cfg.tool_format, "prompt": cfg.math_prompt}
    return {"history_length": cfg.history_length}


def budgets(cfg: Config) -> dict:
    """A config's rollout budgets, as rollout() and evaluate() take them."""
    return dict(max_turns=cfg.max_turns, max_turn_tokens=cfg.max_turn_tokens, max_total_tokens=cfg.max_total_tokens,
                max_prompt_tokens=cfg.max_prompt_tokens)


def task_kwargs(cfg: Config) -> dict:
    """load_tasks' keyword arguments for both splits (math: the levels, when --levels is set)."""
    return {"levels": parse_levels(cfg.levels)} if cfg.levels is not None else {}


def _bool(s: str) -> bool:
    if s.lower() not in ("true", "1", "false", "0"):
        raise ValueError(s)
    return s.lower() in ("true", "1")


def parser() -> argparse.ArgumentParser:
    """One flag per Config field. A flag not given is absent from the parsed namespace (argparse.SUPPRESS), so
    the recipe and the bundle fill only what the command line left open. A bare bool flag means true."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        kind = str(f.type).split(" ")[0]
        names = [f"--{f.name}"] + (["--group_size"] if f.name == "n" else [])  # torchrun reads --n as its own
        if kind == "bool":
            p.add_argument(*names, type=_bool, nargs="?", const=True, metavar="BOOL")
        else:
            p.add_argument(*names, type={"int": int, "float": float}.get(kind, str), metavar=kind.upper())
    return p


def resolve(argv=None, device: str | None = None) -> tuple[Config, dict]:
    """The run's Config and where each of its settings came from ({field: source}). The recipe is --recipe,
    else default_recipe of the run's device type: --device if given, else `device` (a test simulates one),
    else model.default_device() (CUDA if available)."""
    given = vars(parser().parse_args(argv))
    try:
        kind = torch.device(given["device"]).type if given.get("device") else device or default_device().type
    except RuntimeError:
        raise SystemExit(f"error: --device {given['device']!r} is not a torch device. "
                         f"Fix: cpu, cuda or cuda:N") from None
    name = given.get("recipe") or default_recipe(kind)
    if name not in RECIPES:
        raise SystemExit(f"error: unknown --recipe {name!r}; choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[name].get(given.get("env", Config.env), {})  # an unknown --env fails in finalize
    cfg = finalize(Config(**{**recipe, "recipe": name, **given}))
    sources = {"recipe": f"default for device {kind}", **{k: f"recipe {name}" for k in recipe},
               **{k: f"--algo {cfg.algo} bundle" for k in ALGOS[cfg.algo]}, **{k: "flag" for k in given}}
    return cfg, sources


def parse_args(argv=None, device: str | None = None) -> Config:
    """The validated Config of a command line (see resolve)."""
    return resolve(argv, device)[0]


def settings_block(cfg: Config, sources: dict) -> str:
    """Every resolved setting that differs from Config's default, with its source (flag, recipe, --algo bundle,
    or derived by finalize): what train.py prints before it loads anything."""
    default, rows = Config(), []
    for f in fields(Config):
        v = getattr(cfg, f.name)
        if v != getattr(default, f.name):
            shown = f"{v} (= {ALIASES[v]})" if f.name == "model" and v in ALIASES else str(v)
            rows.append((f.name, shown, sources.get(f.name, "derived (config.finalize)")))
    w, wv = max(len(k) for k, _, _ in rows), max(len(v) for _, v, _ in rows)
    return "\n".join([f"[spear] settings (those not at Config's default; recipe {cfg.recipe}):"] +
                     [f"  {k:<{w}}  {v:<{wv}}  {src}" for k, v, src in rows])


def recipe_table() -> str:
    """README's table of every recipe's values (a test keeps the README equal to it); – = Config's default."""
    cols = [(name, env) for env in ENV_NAMES for name in RECIPES]
    keys = [f.name for f in fields(Config) if any(f.name in RECIPES[n][e] for n, e in cols)]
    cell = lambda v: str(v).lower() if isinstance(v, bool) else str(v)
    lines = ["| setting | " + " | ".join(f"{env} `{name}`" for name, env in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for k in keys:
        cells = [cell(RECIPES[n][e][k]) if k in RECIPES[n][e] else "–" for n, e in cols]
        lines.append(f"| `{k}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
