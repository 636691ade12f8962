"""Shared fixtures: the bundled tokenizer, a tiny random model on it, the bundled SmolLM2 model, and a
scripted env for sampler tests. Nothing here needs a network or a GPU."""
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(int(os.environ.get("SPEAR_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def tok():
    from model import bundled_tokenizer
    t = bundled_tokenizer()
    if t.pad_token_id is None:
        t.pad_token = t.eos_token
    return t


@pytest.fixture(scope="session")
def tiny(tok):
    from model import tiny_random_model
    return tiny_random_model(tok, seed=0).eval()


@pytest.fixture(scope="session")
def smol():
    from model import load_model
    return load_model("smollm2-135m", device="cpu")


class ScriptedEnv:
    """An env whose episode length is fixed by the task: every turn is a 'tool call' answered with
    task['obs'] until task['turns'] turns were taken. Stops a turn at a closed ```python block."""
    name = "scripted"
    stop_strings = ("```",)

    def __init__(self):
        self.reward, self.success, self.void, self.infra_error = -1.0, False, False, False
        self.n_tool_calls = self.n_steps = self.n_invalid = 0

    def is_stop(self, text):
        return bool(re.search(r"```python\n[\s\S]*?```\s*$", text))

    def reset(self, task):
        self.task = task
        return [{"role": "system", "content": "You are a helpful assistant. Use python."},
                {"role": "user", "content": task["question"]}]

    def step(self, text):
        self.n_steps += 1
        self.n_tool_calls += 1
        if self.n_steps >= self.task["turns"]:
            self.reward, self.success = 1.0, True
            return None, True, {}
        return self.task.get("obs", "```output\n42\n```"), False, {}

    def toolcall_bonus(self):
        return min(1.0, 0.1 * self.n_tool_calls)


@pytest.fixture
def scripted_env():
    return ScriptedEnv
