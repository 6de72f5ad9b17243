"""EPI in loops and models the project did not write: optimizer hooks, mixed precision (fused optimizers under a
GradScaler too), closures, memory layouts, dtypes (float64, complex), wrappers that move weights themselves
(Lookahead, SAM), and the misuses that used to fail silently. Run: python -m pytest tests/test_epi_in_your_loop.py -q"""
import copy
import pickle
import types
import warnings

import pytest
import torch

from epi_mini.adaptive import AdaptiveIsolation
from epi_mini.compact import kth_largest
from epi_mini.epi import EvolvingIsolation
from epi_mini.isolation import StepCount


def encoder(seed=0):
    """A model this project did not write: PyTorch's own TransformerEncoder with a linear head."""
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return torch.nn.Sequential(torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False),
                               torch.nn.Linear(16, 4))


def batch(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, 5, 16, generator=g), torch.randn(8, 5, 4, generator=g)


def epi_for(model, **kw):
    return EvolvingIsolation(model, **{"isolation_ratio": 0.3, "mask_interval": 3, "warmup_steps": 2, **kw})


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_isolated_unmoved(epi, before, model):
    for n, p in model.named_parameters():
        mask = epi.isolated[n]
        assert torch.equal(p.detach()[mask], before[n][mask]), f"{n}: an isolated entry moved"


def test_attach_and_step_are_one_implementation_and_give_identical_weights():
    models = [encoder(), encoder()]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in models]
    epis = [epi_for(m) for m in models]
    epis[1].attach(opts[1])                     # the user's loop stays: optimizer.step()
    for i in range(10):
        for m, o, e, attached in zip(models, opts, epis, (False, True)):
            x, y = batch(i)
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            before = snapshot(m)
            o.step() if attached else e.step(o)
            assert_isolated_unmoved(e, before, m)
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))
    assert epis[0].history == epis[1].history and len(epis[0].history) == 3
    with pytest.raises(RuntimeError, match="already attached"):  # the explicit form while attached: refused
        epis[1].step(opts[1])
    epis[1].detach()
    x, y = batch(99)
    torch.nn.functional.mse_loss(models[1](x), y).backward()
    opts[1].step()                              # detached: a plain step, EPI sees nothing
    assert epis[1].num_steps == 10


def test_an_unchanged_amp_loop_with_grad_scaler_isolates_exactly_and_skips_overflow_steps():
    model = encoder()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    epi = epi_for(model, mask_interval=5)
    losses = []
    with epi.attach(opt):
        for i in range(40):
            x, y = batch(i % 8)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            if i == 20:  # an overflow, as fp16 produces: the scaler skips the step
                next(model.parameters()).grad[0, 0] = float("inf")
                scores = {n: s.clone() for n, s in epi.scores.items()}
            before = snapshot(model)
            scaler.step(opt)
            scaler.update()
            if i == 20:
                assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # nothing moved
                assert all(torch.equal(scores[n], epi.scores[n]) for n in scores)          # EMA untouched
            else:
                assert_isolated_unmoved(epi, before, model)
            losses.append(loss.item())
    assert epi.num_steps == 39 and epi.isolated_fraction() == pytest.approx(0.3, abs=1e-3)
    # The EMA saw unscaled gradients (GradScaler unscales before the optimizer's hooks run), not x 65536.
    assert max(float(s.max()) for s in epi.scores.values()) < 10.0
    assert sum(losses[-5:]) < sum(losses[:5])   # and it still learned


def test_closure_optimizers_lbfgs_step_through_both_forms():
    results = []
    for attached in (False, True):
        model = encoder()
        opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
        epi = epi_for(model, warmup_steps=1, mask_interval=1)
        if attached:
            epi.attach(opt)
        x, y = batch(0)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        first = closure().item()
        for _ in range(4):
            before = snapshot(model)
            opt.step(closure) if attached else epi.step(opt, closure)
            if epi.history:
                assert_isolated_unmoved(epi, before, model)
        results.append((snapshot(model), first, closure().item()))
    (wa, first, last), (wb, _, _) = results
    assert all(torch.equal(wa[n], wb[n]) for n in wa) and last < first


def test_any_memory_layout_isolates_exactly():
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    conv = conv.to(memory_format=torch.channels_last)
    odd = torch.nn.Parameter(torch.randn(6, 4).t())   # a non-contiguous (transposed) parameter
    assert not odd.is_contiguous() and not conv[0].weight.is_contiguous()
    params = [*conv.named_parameters(), ("odd", odd)]
    opt = torch.optim.AdamW([p for _, p in params], lr=1e-2, weight_decay=0.1)
    epi = EvolvingIsolation(params, isolation_ratio=0.3, mask_interval=2, warmup_steps=1)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    for i in range(6):
        opt.zero_grad()
        (conv(x).square().mean() + (odd @ torch.ones(6)).square().sum()).backward()
        before = {n: p.detach().clone() for n, p in params}
        epi.step(opt)
        for n, p in params:
            mask = epi.isolated[n]
            assert torch.equal(p.detach()[mask], before[n][mask]), n
            if i >= 1:
                assert mask.any() and not torch.equal(p.detach()[~mask], before[n][~mask]), n
    assert conv[0].weight.is_contiguous(memory_format=torch.channels_last)  # the layout is left as it was


def test_what_may_be_passed_in():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))  # every first dimension is 2
    bare = EvolvingIsolation(model.parameters(), warmup_steps=0)
    assert list(bare.params) == ["0", "1", "2", "3"]                           # generated names, in order
    assert all(a is b for a, b in zip(bare.params.values(), model.parameters()))
    with pytest.raises(TypeError, match="pass model or model.named_parameters"):
        EvolvingIsolation([("w", 3.0)])
    with pytest.raises(ValueError, match="no trainable parameters"):
        EvolvingIsolation(torch.nn.Linear(2, 2).requires_grad_(False))


def test_tied_tensors_are_managed_once():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight                      # tied, as in GPT-2
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    twice = list(model.named_parameters(remove_duplicate=False))
    assert len(twice) == 2
    epi = EvolvingIsolation(twice, isolation_ratio=0.25, warmup_steps=0)
    assert list(epi.params) == ["emb.weight"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = head(emb(torch.tensor([1, 2, 3])))
    out.square().mean().backward()
    epi.step(opt)
    assert sum(int(m.sum()) for m in epi.isolated.values()) == round(0.25 * 40)  # counted once, one mask


def test_optimizer_with_none_or_only_some_of_the_parameters_is_refused():
    model, other = encoder(), encoder(1)
    epi = epi_for(model)
    with pytest.raises(ValueError, match="holds none of the"):
        epi.attach(torch.optim.AdamW(other.parameters()))
    head_only = torch.optim.AdamW(model[1].parameters())
    with pytest.raises(ValueError, match="holds only some of the managed parameters"):
        epi.step(head_only)
    part = EvolvingIsolation(model[1].named_parameters(), warmup_steps=0)   # what the message suggests
    x, y = batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert part.step(head_only)


def test_a_parameter_unfrozen_after_construction_is_reported_once():
    model = encoder()
    model[1].weight.requires_grad_(False)
    epi = epi_for(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model[1].weight.requires_grad_(True)            # unfrozen later: EPI does not manage it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3):
            x, y = batch(i)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            epi.step(opt)
    messages = [str(w.message) for w in caught if "did not require one" in str(w.message)]
    assert len(messages) == 1 and "'1.weight'" in messages[0]


def test_sparse_gradients_get_a_clear_error_naming_the_parameter():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    epi = EvolvingIsolation(emb, warmup_steps=0)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="'weight' has a sparse gradient"):
        epi.step(torch.optim.SGD(emb.parameters(), lr=0.1))


def test_state_saved_under_torch_compile_names_loads_into_the_plain_module_and_back():
    model = encoder()
    compiled = torch.compile(model)                 # names gain "_orig_mod."; nothing is compiled until called
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    a = epi_for(compiled, warmup_steps=0, mask_interval=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    a.step(opt)
    b = epi_for(model)
    b.load_state_dict(a.state_dict())               # compiled -> plain
    assert all(torch.equal(a.scores["_orig_mod." + n], s) for n, s in b.scores.items())
    assert all(torch.equal(a.isolated["_orig_mod." + n], m) for n, m in b.isolated.items())
    c = epi_for(compiled)
    c.load_state_dict(b.state_dict())               # plain -> compiled
    assert c.history == a.history and copy.deepcopy(c.num_steps) == 1


def test_a_wrapped_optimizer_is_attached_through_the_one_it_wraps_and_a_non_optimizer_is_refused():
    class Wrapper(torch.optim.Optimizer):  # like accelerate's AcceleratedOptimizer: no Optimizer.__init__ of its own
        def __init__(self, optimizer):
            self.optimizer = optimizer

        @property
        def param_groups(self):
            return self.optimizer.param_groups

        def step(self, closure=None):
            return self.optimizer.step(closure)

    model = encoder()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    epi = epi_for(model, warmup_steps=0, mask_interval=1)
    with epi.attach(Wrapper(inner)) as attached:
        assert attached is epi and len(inner._optimizer_step_pre_hooks) == 1
        x, y = batch(0)
        torch.nn.functional.mse_loss(model(x), y).backward()
        before = snapshot(model)
        Wrapper(inner).step()
        assert epi.num_steps == 1
        assert_isolated_unmoved(epi, before, model)
    with pytest.raises(TypeError, match="SimpleNamespace is not a torch optimizer"):
        epi.attach(types.SimpleNamespace(param_groups=inner.param_groups, step=inner.step))


# --- fused optimizers under a GradScaler: they are handed the gradients scaled, and skip an overflow on the device ---
def _counting_host_reads(monkeypatch):
    calls = []
    for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: (calls.append(_n), _o(self, *a))[1])
    return calls


def scaled_run(fused, overflows=(), unscale_first=False, steps=40, monkeypatch=None):
    """The textbook GradScaler loop, attached, with an fp16-like overflow at the steps in ``overflows``.
    Returns the isolation, the number of steps where an isolated entry moved, the scores after the first step,
    the first step's unscaled squared gradients, and the host reads during ``scaler.step`` (if ``monkeypatch``)."""
    model = encoder()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    epi = epi_for(model, mask_interval=5, ema_beta=0.9)
    moved, first, reads = 0, None, []
    with epi.attach(opt):
        for i in range(steps):
            x, y = batch(i % 8)
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            if i in overflows:
                next(model.parameters()).grad[0, 0] = float("inf")
            if unscale_first:  # as for gradient clipping: the scaler then hands grad_scale=None
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if i == 0:
                squared = {n: (p.grad / (1.0 if unscale_first else scaler.get_scale())) ** 2
                           for n, p in model.named_parameters()}
            before = snapshot(model)
            calls = _counting_host_reads(monkeypatch) if monkeypatch and i == 11 else None
            scaler.step(opt)
            if calls is not None:
                monkeypatch.undo()
                reads = calls
            scaler.update()
            moved += any(not torch.equal(p.detach()[epi.isolated[n]], before[n][epi.isolated[n]])
                         for n, p in model.named_parameters())
            if i == 0:
                first = {n: s.clone() for n, s in epi.scores.items()}
    return epi, moved, first, squared, reads


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscaled-then-clipped"])
def test_a_fused_optimizer_under_a_grad_scaler_sees_unscaled_gradients_and_skips_overflows_like_an_unfused_one(
        unscale_first, monkeypatch):
    assert torch.optim.AdamW(encoder().parameters(), fused=True)._step_supports_amp_scaling  # the case at hand
    overflows = (13, 22, 30, 31)  # 22: the step at which the count, if it took the skip, would say "refresh"
    plain, plain_moved, _, _, _ = scaled_run(False, overflows, unscale_first)
    fused, fused_moved, first, squared, reads = scaled_run(True, overflows, unscale_first, monkeypatch=monkeypatch)
    assert plain_moved == fused_moved == 0                           # isolated entries bit-identical, every step
    assert plain.num_steps == fused.num_steps == 40 - len(overflows)  # a skipped step is not counted
    assert (plain.skipped_steps, fused.skipped_steps) == (0, len(overflows))  # fused: handed the step, skipped it
    assert [h["step"] for h in fused.history] == [h["step"] for h in plain.history] == [3, 8, 13, 18, 23, 28, 33]
    for n, s in first.items():                                        # the EMA of unscaled g**2, not x 2**32
        assert torch.allclose(s, 0.1 * squared[n], rtol=1e-6, atol=0), n
    top = [max(float(s.max()) for s in e.scores.values()) for e in (plain, fused)]
    assert top[1] < 10.0 and 0.5 < top[1] / top[0] < 2.0
    assert reads == []                                                # no host sync in a step without a refresh


def test_a_device_skip_flag_is_settled_only_when_a_refresh_may_be_due():
    """StepCount directly: flags from the device, mixed with steps known on the host to be taken."""
    count = StepCount()
    for flag in (0.0, 1.0, None, 1.0, 0.0):
        count.add(None if flag is None else torch.tensor(flag))
    assert count.upper == 5 and count.settle() and count.upper == 3 and count.skipped == 2
    count.add(torch.tensor(1.0))
    assert count.upper == 4 and not count.settle() and (count.taken, count.skipped) == (3, 3)
    count.taken, count.skipped = 10, 0  # as on resume
    count.add(torch.tensor(0.0))
    assert count.taken == 11 and count.settle()


# --- dtypes --------------------------------------------------------------------------------------------------------
def test_a_float64_default_dtype_and_a_large_model_refresh():
    """2**18 entries and more take the histogram threshold, which reads float32 bit patterns."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = torch.nn.Linear(512, 512)                    # 262,656 entries >= 2**18, float64
        epi = EvolvingIsolation(model, isolation_ratio=0.1, warmup_steps=0)
        model(torch.randn(4, 512)).square().mean().backward()
        before = snapshot(model)
        epi.step(torch.optim.SGD(model.parameters(), lr=0.1))
    finally:
        torch.set_default_dtype(old)
    assert sum(int(m.sum()) for m in epi.isolated.values()) == round(0.1 * 262_656)
    assert_isolated_unmoved(epi, before, model)
    flat = torch.rand(300_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert kth_largest(flat, 1234, "histogram") == torch.sort(flat, descending=True).values[1233]


@pytest.mark.parametrize("complex_first", [True, False])
def test_complex_parameters_are_scored_by_squared_magnitude_and_isolated(complex_first):
    torch.manual_seed(0)
    real, cplx = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4, 4, dtype=torch.cfloat))
    params = [("c", cplx), ("r", real)] if complex_first else [("r", real), ("c", cplx)]
    opt = torch.optim.AdamW([real, cplx], lr=1e-2)
    epi = EvolvingIsolation(params, isolation_ratio=0.3, warmup_steps=0, mask_interval=1, ema_beta=0.5)
    for step in range(4):
        opt.zero_grad()
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(step))
        (x @ real).to(torch.cfloat).matmul(cplx).abs().square().mean().backward()
        g = cplx.grad.clone()
        before = {"r": real.detach().clone(), "c": cplx.detach().clone()}
        scores = epi.scores["c"].clone()
        epi.step(opt)
        assert torch.allclose(epi.scores["c"], 0.5 * scores + 0.5 * (g.real ** 2 + g.imag ** 2))  # |g|**2 >= 0
        for n, p in (("r", real), ("c", cplx)):
            assert torch.equal(p.detach()[epi.isolated[n]], before[n][epi.isolated[n]]), n
    assert epi.isolated["c"].any() and epi.scores["c"].dtype == torch.float32


# --- resume, and the optimizer check ----------------------------------------------------------------------------
@pytest.mark.parametrize("adaptive", [False, True])
def test_a_pending_ratio_change_is_saved_resumed_and_applied_at_the_next_step(adaptive):
    def make(model):
        if adaptive:
            return AdaptiveIsolation(model, isolation_ratio=0.1, warmup_steps=1, drift_threshold=1.0)
        return epi_for(model, isolation_ratio=0.1, warmup_steps=1, mask_interval=100)
    model = encoder()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    epi = make(model)
    for i in range(3):
        x, y = batch(i)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        epi.step(opt)
    epi.set_isolation_ratio(0.5)
    resumed = make(model)
    resumed.load_state_dict(epi.state_dict())
    for isolation in (epi, resumed):
        x, y = batch(3)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        isolation.step(opt)
        assert isolation.isolated_fraction() == pytest.approx(0.5, abs=1e-3)
        assert [h["step"] for h in isolation.history] == [2, 4]


def test_a_new_optimizer_is_checked_even_when_it_reuses_a_freed_id():
    model = encoder()
    epi = epi_for(model)
    x, y = batch(0)
    refused = 0
    for _ in range(8):
        torch.nn.functional.mse_loss(model(x), y).backward()
        try:
            epi.step(torch.optim.AdamW(model.parameters(), lr=1e-2))     # freed as soon as this returns, so ...
            epi.step(torch.optim.AdamW(model[1].parameters(), lr=1e-2))  # ... this one often gets its id()
        except ValueError as e:
            refused += "holds only some of the managed parameters" in str(e)
    assert refused == 8  # (checked by id(), 1 of 8 was refused)


# --- smaller misuses: each gets a warning that names it ----------------------------------------------------------
def test_a_group_added_after_attach_a_ratio_that_rounds_to_nothing_and_pickling_attached_are_reported():
    model = encoder()
    extra = torch.nn.Parameter(torch.zeros(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    epi = epi_for(model, warmup_steps=0).attach(opt)
    opt.add_param_group({"params": [extra]})
    x, y = batch(0)
    (torch.nn.functional.mse_loss(model(x), y) + extra.sum()).backward()
    with pytest.warns(UserWarning, match=r"1 parameter\(s\) of shape\(s\) \[\(3, 2\)\] were added to the optimizer"):
        opt.step()
    with pytest.warns(UserWarning, match="pickling an attached EvolvingIsolation: the copy is detached"):
        copied = pickle.loads(pickle.dumps(epi))
    assert not copied._hooks and all(torch.equal(copied.scores[n], s) for n, s in epi.scores.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()                                            # warned once, not at every step
        epi.detach()
        pickle.dumps(epi)                                     # detached: no warning
    tiny = epi_for(model, isolation_ratio=1e-6, warmup_steps=0)
    with pytest.warns(UserWarning, match=r"isolation_ratio=1e-06 of \d+ entries rounds to 0: nothing is isolated"):
        tiny.step(opt)


# --- wrappers that move the weights themselves: Lookahead, SAM ---------------------------------------------------
class Lookahead:
    """Lookahead (Zhang et al., 2019) as many implementations write it: not a torch optimizer, it holds one as
    ``.optimizer`` and, every k steps, pulls slow weights towards the fast ones and the fast ones onto them."""

    def __init__(self, optimizer, k=5, alpha=0.5):
        self.optimizer, self.k, self.alpha, self.steps = optimizer, k, alpha, 0
        self.param_groups = optimizer.param_groups
        self.slow = [p.detach().clone() for group in self.param_groups for p in group["params"]]

    def zero_grad(self):
        self.optimizer.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        self.steps += 1
        if self.steps % self.k == 0:
            for slow, p in zip(self.slow, (p for group in self.param_groups for p in group["params"])):
                slow.add_(p - slow, alpha=self.alpha)
                p.copy_(slow)
        return loss


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation (Foret et al., 2021) as the widely used implementation writes it: a torch
    optimizer holding its ``base_optimizer``; ``first_step`` climbs to w + e(w), ``second_step`` goes back to w and
    steps the base optimizer with the gradient taken there. ``step(closure)`` does both."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.norm(torch.stack([g.norm() for g in grads]))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["old_p"] = p.detach().clone()
                    p.add_(p.grad * group["rho"] / (norm + 1e-12))
        self.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()

    @torch.no_grad()
    def step(self, closure):
        self.first_step()
        with torch.enable_grad():
            closure()
        self.second_step()


@pytest.mark.parametrize("pattern", ["lookahead", "sam.step(closure)", "sam first_step/second_step"])
def test_wrappers_that_move_weights_outside_their_inner_step_isolate_exactly(pattern):
    model = encoder()
    if pattern == "lookahead":
        optimizer = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    else:
        optimizer = SAM(model.parameters(), torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    epi = epi_for(model).attach(optimizer)
    losses = []
    for i in range(40):
        x, y = batch(i % 8)

        def closure():
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        optimizer.zero_grad()
        losses.append(closure().item())
        before = snapshot(model)
        if pattern == "sam first_step/second_step":
            optimizer.first_step()
            closure()
            optimizer.second_step()
        else:
            optimizer.step(closure) if pattern == "sam.step(closure)" else optimizer.step()
        assert_isolated_unmoved(epi, before, model)
    assert epi.num_steps == 40 and len(epi.history) == 13 and sum(losses[-5:]) < sum(losses[:5])
    epi.detach()
    assert "step" not in vars(optimizer)  # the wrapper's own step is put back


def test_a_wrapper_holding_two_optimizers_is_refused_by_name():
    model = encoder()
    both = types.SimpleNamespace(encoder_optimizer=torch.optim.AdamW(model[0].parameters()),
                                 head_optimizer=torch.optim.AdamW(model[1].parameters()))
    with pytest.raises(TypeError, match="SimpleNamespace holds several torch optimizers "
                                        r"\(encoder_optimizer, head_optimizer\)"):
        epi_for(model).attach(both)
