"""Token-level chat rendering: a conversation as token ids, derived from the tokenizer's own template.

The sampler (rollout.py) never re-tokenizes what the policy sampled: after a sampled turn it appends
only the tokens of the turn's closing and of the next observation turn (a user turn, or a `tool`
turn for a native function call). `ChatFormat` finds those tokens once per tokenizer and role by
diffing the template's rendering of a fixed dummy conversation.
"""
from __future__ import annotations

import re

import torch

ASST, OBS = "\x00ASSISTANT\x00", "\x00OBSERVATION\x00"
DUMMY = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ASST}]
PROBE_TOOL = {"type": "function", "function": {
    "name": "probe_tool", "description": "spear-probe-description",
    "parameters": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}}}


def renders_tools(tok) -> bool:
    """True when the chat template renders a `tools` schema (Qwen2.5: in the system turn) and appends a
    `tool` turn (Qwen2.5: <tool_response>) to a conversation; probed on a dummy one, a template error
    (e.g. a role it does not know) counts as False."""
    try:
        head = tok.apply_chat_template(DUMMY, tools=[PROBE_TOOL], tokenize=False)
        text = tok.apply_chat_template(DUMMY + [{"role": "tool", "content": OBS}], tools=[PROBE_TOOL], tokenize=False)
    except Exception:  # jinja's TemplateError, or whatever a template's raise_exception raises
        return False
    return "spear-probe-description" in head and text.startswith(head) and OBS in text[len(head):]


def tool_format(tok, requested: str | None = None) -> str:
    """The math env's tool-call format: `requested`, else "hermes" (the model's native function calling,
    as the official math runs use it) when the chat template renders tools, else "markdown" (```python
    blocks in plain turns, e.g. the bundled SmolLM2, whose template has no tools). Fails for a
    requested hermes the template cannot render."""
    if requested == "hermes" and not renders_tools(tok):
        raise ValueError("--tool_format hermes needs a chat template that renders a `tools` schema and appends "
                         "`tool` turns (e.g. Qwen2.5's); this tokenizer's does not. Fix: --tool_format markdown.")
    return requested or ("hermes" if renders_tools(tok) else "markdown")


class ChatFormat:
    """Token-level chat rendering for one tokenizer, derived from its own chat template.

    closing        : tokens that end an assistant turn (e.g. `<|im_end|>` `\\n`),
    frame(role)    : the template text before and after an observation's text in a `role` turn
                     ("user", or "tool" for a function result), through the next generation prompt;
    obs_pre_text, obs_post_text : frame("user").
    All come from diffing the template's rendering of a fixed dummy conversation; the prefix property
    (render(conv) is a prefix of render(conv + [obs])) is checked once per role. Template text is split
    at special and added tokens; observation text is tokenized with them disabled (`encode`), so a tool
    printing `<|im_end|>` or `</tool_response>` cannot forge a turn. Adjacent plain text is tokenized
    together, exactly as the tokenizer does on the whole rendered string.
    """

    def __init__(self, tok):
        self.tok = tok
        specials = sorted(set(tok.all_special_tokens) | set(getattr(tok, "added_tokens_encoder", {})), key=len,
                          reverse=True)
        self.special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        self._frames: dict = {}
        self.obs_pre_text, self.obs_post_text = self.frame("user")
        r1 = tok.apply_chat_template(DUMMY, tokenize=False)
        self.closing = self.encode([(r1[r1.index(ASST) + len(ASST):], True)])
        self._triggers: dict = {}
        self.eos_ids = {tok.eos_token_id} | ({tok.convert_tokens_to_ids("<|im_end|>")} if "<|im_end|>" in tok.get_vocab()
                                             else set())

    def frame(self, role: str) -> tuple[str, str]:
        """(pre, post): the template text around an observation in a `role` turn, from the diff of
        render(dummy + [obs], add_generation_prompt) and render(dummy), prefix property checked."""
        if role not in self._frames:
            r1 = self.tok.apply_chat_template(DUMMY, tokenize=False)
            r2 = self.tok.apply_chat_template(DUMMY + [{"role": role, "content": OBS}], tokenize=False,
                                              add_generation_prompt=True)
            if not r2.startswith(r1) or r1.count(ASST) != 1 or r2.count(OBS) != 1:
                fix = "" if role == "user" else ", or --tool_format markdown"
                raise ValueError(f"this tokenizer's chat template is not append-only for {role} turns (render(conv) "
                                 f"is not a prefix of render(conv + [{role}])), so multi-turn token-in/token-out is "
                                 f"impossible with it. Fix: use a model whose template keeps earlier turns verbatim "
                                 f"(e.g. Qwen2.5, SmolLM2){fix}.")
            self._frames[role] = tuple(r2[len(r1):].split(OBS))
        return self._frames[role]

    def stop_trigger(self, stop_strings) -> torch.Tensor:
        """(V,) bool: tokens whose text holds the last character of a stop string. Only after such a
        token does the sampler decode the turn and ask the env whether it is over (no per-token decode)."""
        key = tuple(stop_strings)
        if key not in self._triggers:
            chars = {s[-1] for s in stop_strings}
            texts = self.tok.batch_decode([[i] for i in range(len(self.tok))])
            self._triggers[key] = torch.tensor([any(c in t for c in chars) for t in texts], dtype=torch.bool)
        return self._triggers[key]

    def encode(self, segments: list[tuple[str, bool]]) -> list[int]:
        """Tokenize (text, trusted) segments. In trusted (template) text a special or added token's string
        is that token. In untrusted text it stays plain text: its first character and the rest are
        tokenized on their own, since split_special_tokens only splits *special* tokens and leaves added
        ones (Qwen2.5's `<tool_response>`, `</tool_response>`) whole."""
        parts: list = []  # str: plain text, tokenized in one call; int: a token id; tuple: text tokenized alone
        for text, trusted in segments:
            pieces = self.special_re.split(text) if self.special_re else [text]
            for i, p in enumerate(pieces):
                if i % 2 == 1:
                    parts += [self.tok.convert_tokens_to_ids(p)] if trusted else [(p[:1],), (p[1:],)]
                elif p:
                    if parts and isinstance(parts[-1], str):
                        parts[-1] += p
                    else:
                        parts.append(p)
        ids: list[int] = []
        for p in parts:
            text = p[0] if isinstance(p, tuple) else p
            ids += [p] if isinstance(p, int) else self.tok(text, add_special_tokens=False,
                                                           split_special_tokens=True).input_ids
        return ids

    def prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The prompt's tokens: `messages` rendered with the generation prompt, and `tools` (function
        schemas) given to the template's `tools` argument."""
        text = self.tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        return self.encode([(text, True)])

    def observation(self, obs: str, ended_with_eos: bool, role: str = "user") -> list[int]:
        """Tokens appended after a sampled turn: the rest of the turn's closing, then the `role` turn
        holding `obs` ("user", or "tool" for the result of a native function call)."""
        closing = self.closing[1:] if ended_with_eos and self.closing and self.closing[0] in self.eos_ids else self.closing
        pre, post = self.frame(role)
        return closing + self.encode([(pre, True), (obs, False), (post, True)])
