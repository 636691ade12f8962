"""model.py: chunked log-probs/entropy equal the naive full-logits computation; loading errors; save/load."""
import pytest
import torch

from model import ALIASES, ModelNotFound, load_model, resolve, save_model, token_logprobs


def _naive(model, ids, mask, T=1.0):
    logits = model(ids).logits[:, :-1].float() / T  # (B, T-1, V): the thing token_logprobs never builds
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    z = torch.zeros(ids.shape[0], 1)
    m = mask[:, 1:].float()
    return torch.cat([z, logp * m], 1), torch.cat([z, ent * m], 1)


def test_chunked_logprobs_and_entropy_match_naive(tiny):
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (3, 17))
    mask = (torch.rand(3, 17) > 0.4).long()
    mask[:, 0] = 1  # position 0 has no prefix: must come back as 0
    for T in (1.0, 0.7):
        logp, ent = token_logprobs(tiny, ids, mask, temperature=T, chunk=5)
        rl, re_ = _naive(tiny, ids, mask, T)
        assert torch.allclose(logp, rl, atol=1e-5) and torch.allclose(ent, re_, atol=1e-4)
        assert (logp[:, 0] == 0).all() and (logp[mask == 0] == 0).all()


def test_chunked_gradient_matches_naive(tiny):
    torch.manual_seed(1)
    ids = torch.randint(0, 49152, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    w = torch.randn(2, 11)
    grads = []
    for fn in (lambda: token_logprobs(tiny, ids, mask, chunk=4), lambda: _naive(tiny, ids, mask)):
        tiny.zero_grad()
        logp, ent = fn()
        ((logp * w).sum() + 0.1 * ent.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny.parameters()]).clone())
    tiny.zero_grad()
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_unknown_model_fails_with_a_fix(tmp_path):
    with pytest.raises(ModelNotFound, match="Fix:"):
        load_model(str(tmp_path / "no-such-model"))


def test_aliases_map_to_the_paper_instruct_models():
    assert resolve("Qwen2.5-1.5B") == "Qwen/Qwen2.5-1.5B-Instruct"
    assert all(v.endswith("-Instruct") for v in ALIASES.values())


def test_save_then_load_as_model(tiny, tok, tmp_path):
    save_model(tiny, tok, str(tmp_path / "ck"))
    m2, t2 = load_model(str(tmp_path / "ck"), device="cpu")
    ids = torch.randint(0, 49152, (1, 9))
    with torch.no_grad():
        assert torch.equal(tiny(ids).logits, m2(ids).logits)
    assert t2("hello").input_ids == tok("hello").input_ids


def test_unreachable_hub_id_fails_fast():
    import time
    t = time.time()
    with pytest.raises(ModelNotFound, match="Fix:"):
        load_model("nobody-spear-test/no-such-model")
    assert time.time() - t < 30
