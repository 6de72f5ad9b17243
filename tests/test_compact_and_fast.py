"""EPI's cost cuts, checked for exactness: the 8-bit importance state, the O(N) threshold methods and the
overlap from the selection itself, and the training step that makes no host sync on an accelerator.
Run: python -m pytest tests/test_compact_and_fast.py -q   (the speed and memory figures are benchmarks/cost.py's)"""
import pytest
import torch

from epi_mini.compact import BlockwiseEMA8
from epi_mini.config import make_config
from epi_mini.epi import EvolvingIsolation, kth_largest, top_fraction
from epi_mini.isolation import overlap_counts
from epi_mini.strategy import PlainUpdate, sft_step
from epi_mini.train import Run


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 300), torch.nn.GELU(), torch.nn.Linear(300, 4))


def backward(model, seed):
    g = torch.Generator().manual_seed(seed)
    model.zero_grad(set_to_none=True)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
    torch.nn.functional.mse_loss(model(x), y).backward()


def test_8bit_ema_tracks_the_fp32_ema_and_costs_under_1_2_bytes_with_the_bit_mask():
    g = torch.Generator().manual_seed(1)
    shapes = {"a": (200, 100), "b": (50,), "c": (96, 40)}
    spread = {n: torch.rand(s, generator=g) ** 6 for n, s in shapes.items()}   # many orders of magnitude
    q, ref = BlockwiseEMA8(shapes), {n: torch.zeros(s) for n, s in shapes.items()}
    for _ in range(200):
        inc = {n: (spread[n] * 2 * torch.rand(s, generator=g)) ** 2 for n, s in shapes.items()}
        q.update(inc, 0.99)
        for n in ref:
            ref[n].mul_(0.99).add_(inc[n], alpha=0.01)
    got = q.values()
    for n in ref:
        big = ref[n] > ref[n].max() * 1e-4
        rel = ((got[n] - ref[n]).abs() / ref[n])[big]
        assert float(rel.median()) < 0.1, n                          # per entry: within ~6% typically
        assert float(got[n].sum() / ref[n].sum()) == pytest.approx(1.0, abs=0.05), n  # no drift, no stall
    total = sum(float(got[n].sum()) for n in ref) / sum(float(ref[n].sum()) for n in ref)
    assert total == pytest.approx(1.0, abs=0.01)
    model = Run(make_config("cpu", device="cpu")).model  # every tensor is padded to whole blocks of 256
    epi = EvolvingIsolation(model, isolation_ratio=0.1, warmup_steps=0, ema_storage="int8", mask_storage="bits")
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    epi.step(torch.optim.SGD(model.parameters(), lr=0.1))
    assert epi.state_bytes()["per_param"] <= 1.2 and epi.isolated_fraction() == pytest.approx(0.1, abs=1e-5)


def test_8bit_epi_isolates_exactly_and_resumes_bit_identically():
    def run(split=None):
        model = mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        make = lambda: EvolvingIsolation(model, isolation_ratio=0.2, mask_interval=3, warmup_steps=2,  # noqa: E731
                                         ema_storage="int8", mask_storage="bits")
        epi = make()
        for step in range(12):
            if step == split:
                state = epi.state_dict()
                epi = make()
                epi.load_state_dict(state)
            backward(model, step)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            epi.step(opt)
            for n, p in model.named_parameters():
                mask = epi.isolated[n]
                assert torch.equal(p.detach()[mask], before[n][mask])
        return model, epi
    (a, ea), (b, eb) = run(), run(split=7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(ea._ema8.codes, eb._ema8.codes) and ea.history == eb.history
    with pytest.raises(ValueError, match="ema_storage"):
        EvolvingIsolation(mlp(), ema_storage="fp32").load_state_dict(ea.state_dict())


@pytest.mark.parametrize("kind", ["ints", "floats", "signed", "zeros"])
def test_every_threshold_method_selects_exactly_what_kthvalue_selects(kind):
    g = torch.Generator().manual_seed(len(kind))
    shapes = [(7, 3), (5,), (1,), (300, 40), (13,), (2, 3, 3)]
    make = {"ints": lambda s: torch.randint(0, 4, s, generator=g).float(), "floats": lambda s: torch.rand(s, generator=g) ** 3,
            "signed": lambda s: torch.randn(s, generator=g), "zeros": lambda s: torch.zeros(s)}[kind]
    scores = {f"t{i}": make(s) for i, s in enumerate(shapes)}
    for normalizer in (None, "mean", "max", "zscore", "rank"):
        for ratio in (0.0, 0.05, 0.3, 0.77, 0.999):
            expected = top_fraction(scores, ratio, normalizer, method="kthvalue")
            assert sum(int(i.numel()) for i in expected.values()) == round(ratio * 12_058)  # entries in all
            for method in ("topk", "histogram", "auto"):
                got = top_fraction(scores, ratio, normalizer, method=method)
                assert all(torch.equal(got[n], expected[n]) for n in expected), (normalizer, ratio, method)
            earlier = top_fraction({n: s.flip(0) for n, s in scores.items()}, 0.2, normalizer)
            assert expected.count_of(earlier) == overlap_counts(earlier, dict(expected))[0]
    flat = torch.rand(5000, generator=g)
    assert torch.equal(kth_largest(flat, 37, "histogram"), torch.sort(flat, descending=True).values[36])


def _counting_host_reads(monkeypatch):
    calls = []
    for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: (calls.append(_n), _o(self, *a))[1])
    return calls


def test_the_step_without_host_sync_reads_nothing_back_and_skips_a_nonfinite_step_exactly(monkeypatch):
    """On an accelerator the loop does not read the loss or the gradient norm back at every step; a fused
    AdamW and EPI skip a non-finite step by a device flag instead. Checked on the CPU (fused AdamW runs here):
    no host read during steps that do not refresh, and a poisoned step leaves weights, moments and importance
    exactly as they were."""
    run = Run(make_config("tiny", method="epi", device="cpu", warmup_steps=2, mask_interval=50))
    run.optimizer = torch.optim.AdamW(run.model.parameters(), lr=1e-3, fused=True)
    epi = run.make_strategy()
    for step in range(3):  # warm-up, then the first refresh (a refresh may read counts back: every K steps)
        sft_step(run.loss_on, run.batch(step), run.model.parameters(), run.optimizer, epi, 1.0, sync=False)
    calls = _counting_host_reads(monkeypatch)
    loss, found_inf = sft_step(run.loss_on, run.batch(3), run.model.parameters(), run.optimizer, epi, 1.0, sync=False)
    assert calls == [] and found_inf.item() == 0.0
    monkeypatch.undo()
    before = ({n: p.detach().clone() for n, p in run.model.named_parameters()},
              {k: {n: v.clone() for n, v in s.items()} for k, s in run.optimizer.state.items()},
              {n: s.clone() for n, s in epi.scores.items()})
    poisoned = lambda batch: run.loss_on(batch) * float("nan")  # noqa: E731
    loss, found_inf = sft_step(poisoned, run.batch(4), run.model.parameters(), run.optimizer, epi, 1.0, sync=False)
    assert found_inf.item() == 1.0 and epi.summary()["skipped_steps"] == 1
    assert all(torch.equal(before[0][n], p) for n, p in run.model.named_parameters())
    assert all(torch.equal(before[1][k][n], v) for k, s in run.optimizer.state.items() for n, v in s.items())
    assert all(torch.equal(before[2][n], s) for n, s in epi.scores.items())
    # The same step with the host-synchronised path skips it as well: both forms agree.
    assert sft_step(poisoned, run.batch(4), run.model.parameters(), run.optimizer, PlainUpdate(), 1.0) is None


def test_the_loop_without_host_sync_gives_the_record_of_the_loop_with_it():
    """fit(sync=False) -- what an accelerator runs -- against fit(sync=True) on the CPU, both with fused AdamW:
    the very same record, for plain SFT with a poisoned step (skipped and counted either way; losses are read
    back in batches instead of one by one) and for EPI (its EMA update, gated on the device, rounds exactly as
    the host-checked one; a step skipped on the device is not counted, so the refreshes come at the same
    steps). One difference is by design: the host-checked loop never shows a poisoned step to EPI, the loop
    without host sync hands it over with its skip flag, so only there EPI counts it in ``skipped_steps``."""
    from epi_mini.train import fit

    def run_once(method, sync, poisoned_call=None):
        run = Run(make_config("tiny", method=method, device="cpu", steps_per_stage=15, warmup_steps=3,
                              mask_interval=4, eval_interval=15))
        run.optimizer = run.model.configure_optimizers(run.cfg.weight_decay, run.cfg.learning_rate, fused=True)
        calls = {"n": 0}

        def poison(module, args, output):
            calls["n"] += 1
            return (output[0], output[1] * float("nan")) if calls["n"] == poisoned_call else output
        run.model.register_forward_hook(poison)
        record = fit(run, progress=False, sync=sync)
        return {k: v for k, v in record.items() if k != "timing"}
    a, b = run_once("full", True, poisoned_call=7), run_once("full", False, poisoned_call=7)
    assert a == b and a["bad_steps"] == 1
    assert run_once("epi", True) == run_once("epi", False)
    a, b = run_once("epi", True, poisoned_call=6), run_once("epi", False, poisoned_call=6)
    assert (a["strategy"].pop("skipped_steps"), b["strategy"].pop("skipped_steps")) == (0, 1)
    assert a == b and a["bad_steps"] == 1  # (counted as a step, the poisoned one shifted every later refresh)
