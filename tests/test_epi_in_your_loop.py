"""EPI in loops and models the project did not write: optimizer hooks, mixed precision, closures, memory
layouts, and the misuses that used to fail silently. Run: python -m pytest tests/test_epi_in_your_loop.py -q"""
import copy
import types
import warnings

import pytest
import torch

from epi_mini.epi import EvolvingIsolation


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
