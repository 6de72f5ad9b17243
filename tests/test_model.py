"""Tests of the tiny GPT (epi_mini/model.py). Run: python -m pytest tests/test_model.py -q"""
import pytest
import torch

from epi_mini.model import GPT, GPTConfig


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=2, n_head=2, n_embd=16, **kw))


def test_shapes_and_param_count():
    m = tiny()
    idx = torch.randint(0, 20, (3, 10))
    logits, loss = m(idx, idx)
    assert logits.shape == (3, 10, 20) and loss.ndim == 0
    logits, loss = m(idx)
    assert logits.shape == (3, 1, 20) and loss is None
    # The tied embedding / output matrix is counted once.
    assert m.num_params() == sum(p.numel() for p in m.parameters())
    assert m.lm_head.weight is m.transformer.wte.weight


def test_causal_a_future_token_cannot_change_an_earlier_logit():
    m = tiny().eval()
    idx = torch.randint(0, 20, (1, 12))
    changed = idx.clone()
    changed[0, 7] = (idx[0, 7] + 1) % 20
    a, _ = m(idx, idx)
    b, _ = m(changed, changed)
    assert torch.equal(a[0, :7], b[0, :7])          # positions before 7 are untouched, bit for bit
    assert not torch.allclose(a[0, 7:], b[0, 7:])   # and the change does reach later positions


def test_loss_mask_prompt_tokens_contribute_nothing():
    m = tiny()
    idx = torch.randint(0, 20, (2, 10))
    targets = torch.randint(0, 20, (2, 10))
    mask = torch.zeros(2, 10)
    mask[:, 6:] = 1.0
    _, loss = m(idx, targets, mask)
    other = targets.clone()
    other[:, :6] = (other[:, :6] + 3) % 20           # change only the masked-out (prompt) targets
    _, loss2 = m(idx, other, mask)
    assert torch.equal(loss, loss2)
    logits, _ = m(idx, targets)
    manual = torch.nn.functional.cross_entropy(logits[:, 6:].reshape(-1, 20), targets[:, 6:].reshape(-1))
    assert torch.allclose(loss, manual, atol=1e-6)


def test_generate_greedy_stops_on_end_token():
    m = tiny().eval()
    idx = torch.randint(0, 20, (2, 3))
    out = m.generate(idx, 8, temperature=0)
    assert out.shape == (2, 11)
    first = out[0, 3].item()                          # make the first greedy token the end token
    stopped = m.generate(idx[:1], 8, temperature=0, end_token=first)
    assert stopped.shape == (1, 4) and stopped[0, -1].item() == first
    sampled = m.generate(idx, 5, temperature=1.0, top_k=3)
    assert sampled.shape == (2, 8)
    with pytest.raises(ValueError, match="temperature"):
        m.generate(idx, 2, temperature=-1)


def test_configure_optimizers_decays_only_matrices():
    m = tiny()
    opt = m.configure_optimizers(weight_decay=0.1, learning_rate=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_config_errors_and_too_long_input():
    with pytest.raises(ValueError, match="n_embd"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))
