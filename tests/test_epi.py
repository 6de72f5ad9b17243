"""Tests of Evolving Parameter Isolation (epi_mini/epi.py), the static baseline (epi_mini/baselines.py) and
the drift tools (epi_mini/drift.py). Run: python -m pytest tests/test_epi.py -q

The module must work on any nn.Module with any element-wise torch optimizer, so most tests use a small
MLP, not the project's GPT."""
import copy
import warnings

import pytest
import torch

from epi_mini.adaptive import AdaptiveIsolation
from epi_mini.baselines import StaticIsolation, core_region, group_by_overlap
from epi_mini.drift import jaccard, layer_share, rank_correlation
from epi_mini.epi import EvolvingIsolation, normalize, top_fraction

OPTIMIZERS = {
    "adamw_wd": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.5),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
}


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                               torch.nn.Linear(16, 4))


def backward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
    model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), y).backward()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("seed", range(4))
def test_isolated_entries_are_bit_identical_and_the_rest_move_as_plain(opt_name, seed):
    model = mlp(seed)
    epi = EvolvingIsolation(model, isolation_ratio=0.3, mask_interval=3, warmup_steps=2)
    opt = OPTIMIZERS[opt_name](model.parameters())
    for step in range(8):
        backward(model, seed * 100 + step)
        # The plain optimizer from the very same state, on a copy: what every free entry must become.
        twin = copy.deepcopy(model)
        twin_opt = OPTIMIZERS[opt_name](twin.parameters())
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # a deep copy: state tensors are shared otherwise
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        twin_opt.step()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        epi.step(opt)
        iso = epi.isolated
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p[iso[n]], before[n][iso[n]]), f"{n}: an isolated entry moved"
            assert torch.equal(p[~iso[n]], q[~iso[n]]), f"{n}: a free entry did not move as plain {opt_name}"
        if step >= 2:  # after warm-up something is isolated, and (with weight decay or momentum) it would have moved
            assert any(iso[n].any() for n in iso)
            assert any(not torch.equal(q[iso[n]], before[n][iso[n]])
                       for (n, _), q in zip(model.named_parameters(), twin.parameters()))


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.3, 0.77])
def test_isolated_fraction_is_rho_even_with_ties(ratio):
    model = mlp()
    for p in model.parameters():  # heavy ties: scores take only three values
        p.grad = torch.randint(0, 3, p.shape).float()
    epi = EvolvingIsolation(model, isolation_ratio=ratio, warmup_steps=0)
    epi.step(torch.optim.SGD(model.parameters(), lr=0.0))
    total = n_params(model)
    assert sum(int(m.sum()) for m in epi.isolated.values()) == round(ratio * total)
    again = EvolvingIsolation(model, isolation_ratio=ratio, warmup_steps=0)
    again.step(torch.optim.SGD(model.parameters(), lr=0.0))
    assert all(torch.equal(again.isolated[n], epi.isolated[n]) for n in epi.isolated)  # ties: deterministic


def test_nothing_isolated_in_warmup_mask_constant_between_refreshes_changes_at_refresh():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    epi = EvolvingIsolation(model, isolation_ratio=0.2, mask_interval=4, warmup_steps=5, ema_beta=0.5)
    masks = []
    for step in range(1, 22):
        backward(model, step)
        epi.step(opt)
        masks.append(epi.isolated)
        if step <= 5:
            assert not any(m.any() for m in masks[-1].values()), "isolated during warm-up"
    refresh_steps = [h["step"] for h in epi.history]
    assert refresh_steps == [6, 10, 14, 18]
    for i in range(6, 21):
        same = all(torch.equal(masks[i][n], masks[i - 1][n]) for n in masks[i])
        step = i + 1
        if step not in refresh_steps:
            assert same, f"mask changed at step {step}, not a refresh"
    assert any(not all(torch.equal(masks[s - 1][n], masks[s - 2][n]) for n in masks[0]) for s in refresh_steps[1:])
    assert epi.history[1]["jaccard_previous"] < 1.0


def test_once_refreshes_exactly_once_and_auto_refreshes_on_drift():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    once = EvolvingIsolation(model, isolation_ratio=0.2, mask_interval="once", warmup_steps=3)
    for step in range(30):
        backward(model, step)
        once.step(opt)
    assert [h["step"] for h in once.history] == [4]

    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    auto = AdaptiveIsolation(model, isolation_ratio=0.2, mask_interval="auto", warmup_steps=3, ema_beta=0.5,
                             drift_threshold=0.3)
    auto.auto_check_every = 1
    for step in range(40):
        backward(model, step % 2 if step < 20 else 1000 + step)  # stable stream, then a shifted one
        auto.step(opt)
    steps = [h["step"] for h in auto.history]
    assert steps[0] == 4 and len(steps) >= 2 and max(steps) > 20
    assert 0.0 <= auto.estimated_drift() <= 1.0
    with pytest.raises(ValueError, match="affine"):
        AdaptiveIsolation(mlp(), mask_interval="auto", normalizer="rank")
    with pytest.raises(ValueError, match="AdaptiveIsolation"):  # "auto" is the adaptive class's, and says so
        EvolvingIsolation(mlp(), mask_interval="auto")


def test_resume_from_state_dict_is_bit_identical():
    def run(split):
        model = mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        epi = AdaptiveIsolation(model, isolation_ratio=0.25, mask_interval="auto", warmup_steps=2,
                                ema_beta=0.8, drift_threshold=0.05)
        for step in range(20):
            if step == split:  # rebuild everything from saved state, as a resumed process would
                state = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), epi.state_dict())
                model = mlp(seed=99)
                model.load_state_dict(state[0])
                opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
                opt.load_state_dict(state[1])
                epi = AdaptiveIsolation(model, isolation_ratio=0.25, mask_interval="auto", warmup_steps=2,
                                        ema_beta=0.8, drift_threshold=0.05)
                epi.load_state_dict(state[2])
            backward(model, step)
            epi.step(opt)
        return model, epi

    a, ea = run(split=None)
    b, eb = run(split=9)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(torch.equal(ea.scores[n], eb.scores[n]) for n in ea.scores)
    assert ea.history == eb.history
    with pytest.raises(ValueError, match="saved state does not match these parameters"):
        EvolvingIsolation(torch.nn.Linear(2, 2)).load_state_dict(ea.state_dict())


def test_nonfinite_gradient_skips_the_step_and_never_poisons_scores():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    epi = EvolvingIsolation(model, isolation_ratio=0.2, warmup_steps=0)
    backward(model, 0)
    epi.step(opt)
    scores = {n: s.clone() for n, s in epi.scores.items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = copy.deepcopy(opt.state_dict())
    backward(model, 1)
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="non-finite gradient"):
        assert epi.step(opt) is False
    assert epi.skipped_steps == 1 and epi.num_steps == 1
    assert all(torch.equal(scores[n], epi.scores[n]) for n in scores)
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())
    assert str(opt.state_dict()) == str(moments)


def test_parameters_without_gradients_are_handled():
    model = mlp()
    frozen_head = model[3]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    epi = EvolvingIsolation(model, isolation_ratio=0.2, warmup_steps=0)
    backward(model, 0)
    frozen_head.weight.grad = None
    epi.step(opt)
    assert torch.count_nonzero(epi.scores["3.weight"]) == 0  # no gradient, no importance


@pytest.mark.parametrize("kwargs, message", [
    (dict(isolation_ratio=1.0), "invalid isolation_ratio=1.0: must be in \\[0, 1\\)"),
    (dict(isolation_ratio=-0.1), "isolation_ratio=-0.1"),
    (dict(mask_interval=0), "invalid mask_interval=0: must be an integer >= 1"),
    (dict(mask_interval=2.5), "mask_interval=2.5"),
    (dict(ema_beta=1.0), "invalid ema_beta=1.0: must be in \\[0, 1\\)"),
    (dict(warmup_steps=-1), "invalid warmup_steps=-1: must be an integer >= 0"),
    (dict(normalizer="median"), "invalid normalizer='median': must be one of"),
    (dict(importance="magic"), "invalid importance='magic': must be one of"),
    (dict(ema_storage="bf16", ema_beta=0.999), "bf16"),
    (dict(ema_storage="fp16"), "ema_storage='fp16'"),
    (dict(mask_storage="dense"), "mask_storage"),
])
def test_out_of_range_arguments_raise_valueerror_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvolvingIsolation(mlp(), **kwargs)


def test_compact_mode_bits_and_bf16_isolate_the_same_entries():
    def run(**kw):
        model = mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        epi = EvolvingIsolation(model, isolation_ratio=0.2, warmup_steps=1, mask_interval=2, **kw)
        for step in range(6):
            backward(model, step)
            epi.step(opt)
        return model, epi
    (m1, e1), (m2, e2) = run(), run(mask_storage="bits")
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert all(torch.equal(e1.isolated[n], e2.isolated[n]) for n in e1.isolated)
    _, e3 = run(mask_storage="bits", ema_storage="bf16")
    assert jaccard(e1.isolated, e3.isolated) > 0.8  # bf16 rounding may swap entries near the threshold
    n = n_params(m1)
    assert e1.state_bytes()["ema"] == 4 * n and e3.state_bytes()["ema"] == 2 * n
    assert e1.state_bytes()["mask"] == 4 * round(0.2 * n)            # int32 indices
    assert e3.state_bytes()["mask"] <= sum(-(-p.numel() // 8) for p in m1.parameters())  # packed bits


def test_importance_is_pluggable():
    model = mlp()
    calls = []

    def my_score(param, grad):
        calls.append(param.shape)
        return grad.abs()
    epi = EvolvingIsolation(model, importance=my_score, warmup_steps=0, ema_beta=0.0)
    backward(model, 0)
    epi.step(torch.optim.SGD(model.parameters(), lr=0.0))
    assert len(calls) == len(list(model.parameters()))
    assert torch.equal(epi.scores["0.weight"], model[0].weight.grad.abs())
    epi2 = EvolvingIsolation(model, importance="gradient_times_weight", warmup_steps=0, ema_beta=0.0)
    epi2.step(torch.optim.SGD(model.parameters(), lr=0.0))
    assert torch.allclose(epi2.scores["0.weight"], (model[0].weight.grad * model[0].weight).abs())


def test_normalizers_and_global_selection():
    big, small = torch.arange(1.0, 101.0) * 1000, torch.arange(1.0, 101.0)  # same shape, scales 1000x apart
    raw = top_fraction({"big": big, "small": small}, 0.5, normalizer=None)
    assert raw["big"].numel() == 100 and raw["small"].numel() == 0      # without normalisation: one tensor wins
    for kind in ("mean", "max", "zscore", "rank"):
        picked = top_fraction({"big": big, "small": small}, 0.5, normalizer=kind)
        assert picked["big"].numel() == picked["small"].numel() == 50, kind
    assert torch.allclose(normalize(small, "mean").mean(), torch.tensor(1.0))
    assert normalize(torch.tensor([3.0, 1.0, 2.0]), "rank").tolist() == pytest.approx([1.0, 1 / 3, 2 / 3])


def test_static_isolation_freeze_grows_and_core_regions():
    model = mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.3)
    for step in range(5):
        backward(model, step)
        opt.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    core = core_region(before, after, 0.1)
    assert sum(int(m.sum()) for m in core.values()) == round(0.1 * n_params(model))
    moved = torch.cat([(after[n] - before[n]).abs().view(-1) for n in before])
    chosen = torch.cat([core[n].view(-1) for n in before])
    assert moved[chosen].min() >= moved[~chosen].max()  # the core is exactly the largest updates

    static = StaticIsolation(model, core)
    frac = static.isolated_fraction()
    other = {n: ~m for n, m in core.items()}
    static.freeze({"0.weight": other["0.weight"]})
    assert static.isolated_fraction() > frac and static.isolated["0.weight"].all()
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    backward(model, 9)
    static.step(opt)
    assert torch.equal(model[0].weight, snapshot["0.weight"])
    assert all(torch.equal(p[static.isolated[n]], snapshot[n][static.isolated[n]]) for n, p in model.named_parameters())
    restored = StaticIsolation(model)
    restored.load_state_dict(static.state_dict())
    assert all(torch.equal(restored.isolated[n], static.isolated[n]) for n in static.isolated)


def test_drift_tools():
    a = {"w": torch.tensor([True, True, False, False]), "b": torch.tensor([True])}
    b = {"w": torch.tensor([True, False, True, False]), "b": torch.tensor([True])}
    assert jaccard(a, b) == pytest.approx(2 / 4)
    assert jaccard(a, a) == 1.0
    assert layer_share(a) == {"w": 0.5, "b": 1.0}
    x = {"w": torch.arange(100.0)}
    assert rank_correlation(x, {"w": torch.arange(100.0) ** 2}) == pytest.approx(1.0)
    assert rank_correlation(x, {"w": -torch.arange(100.0)}) == pytest.approx(-1.0)
    assert rank_correlation(x, {"w": torch.arange(100.0) * 3}, sample=30) == pytest.approx(1.0)
    cores = {"t1": a, "t2": b, "t3": {"w": torch.tensor([False, False, False, True]), "b": torch.tensor([False])}}
    assert group_by_overlap(cores, tau=0.4) == [["t1", "t2"], ["t3"]]


def test_works_on_the_projects_gpt_too():
    from epi_mini.model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8))
    opt = model.configure_optimizers(0.1, 1e-2)
    epi = EvolvingIsolation(model, isolation_ratio=0.1, warmup_steps=0)
    idx = torch.randint(0, 16, (4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            _, loss = model(idx, idx)
            loss.backward()
            epi.step(opt)
            opt.zero_grad()
    assert abs(epi.isolated_fraction() - 0.1) < 1e-3
