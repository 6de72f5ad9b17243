"""What EPI may be given, and the checks that turn silent misuse into clear errors.

:class:`~epi_mini.epi.EvolvingIsolation` (and :class:`~epi_mini.baselines.StaticIsolation`) accept:

* an ``nn.Module`` -- its parameters that require gradients, by their names (a tensor shared under two
  names, such as a tied embedding, is managed once, under its first name);
* ``(name, parameter)`` pairs, e.g. ``model.named_parameters()`` (duplicates, such as those of
  ``named_parameters(remove_duplicate=False)``, are managed once);
* a bare iterable of parameters, e.g. ``model.parameters()``: accepted, with generated names ``"0"``,
  ``"1"``, ... in order (state dicts then match only a model whose parameters come in the same order).

A name under ``torch.compile`` (``_orig_mod.transformer...``) and the plain module's name are the same
parameter: EPI state saved from one loads into the other (:func:`canonical_name`). What is checked, and
when, is in :func:`check_optimizer` and :func:`check_gradient`; the method's own options are checked by
:func:`epi_mini.epi.check_options`.
"""
import torch


def canonical_name(name):
    """The parameter's name without the ``_orig_mod.`` that ``torch.compile`` inserts."""
    return name.replace("_orig_mod.", "")


def named_trainable(params):
    """``(trainable, frozen)``: name -> parameter for those that require gradients, and id -> name of those
    that do not (remembered, so that one unfrozen later can be reported)."""
    items = list(params.named_parameters(remove_duplicate=False) if isinstance(params, torch.nn.Module) else params)
    if items and all(isinstance(p, torch.Tensor) for p in items):  # model.parameters(): no names
        items = [(str(i), p) for i, p in enumerate(items)]
    bad = [type(x).__name__ for x in items if not (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
                                                   and isinstance(x[1], torch.Tensor))]
    if bad:
        raise TypeError(f"expected an nn.Module, (name, parameter) pairs or parameters, got items of type {bad[0]}; "
                        "pass model or model.named_parameters()")
    trainable, frozen, seen = {}, {}, set()
    for name, p in items:
        if id(p) in seen:
            continue  # the same tensor under a second name (tied weights): managed once
        seen.add(id(p))
        if p.requires_grad:
            trainable[name] = p
        else:
            frozen[id(p)] = name
    if not trainable:
        raise ValueError("no trainable parameters given (none requires a gradient)")
    return trainable, frozen


def check_optimizer(managed, optimizer):
    """Raise ``ValueError`` unless ``optimizer`` holds every managed parameter: an optimizer over other
    tensors (another model, a copy) would train them with no isolation at all, and one that holds only some
    would leave the others unprotected by whatever steps them."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in managed.items() if id(p) not in held]
    if len(missing) == len(managed):
        raise ValueError(f"the optimizer holds none of the {len(managed)} parameters this isolation manages: build "
                         "both from the same model (not a copy, not another model)")
    if missing:
        raise ValueError(f"the optimizer holds only some of the managed parameters; it lacks {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}: pass the isolation only the (name, parameter) pairs "
                         "this optimizer steps, or give the optimizer all of them")


def held_optimizer(obj):
    """The torch optimizer that ``obj`` holds as one of its attributes (``.optimizer`` for accelerate's
    ``AcceleratedOptimizer`` and most Lookahead implementations, ``.base_optimizer`` for SAM and timm's
    Lookahead, ...), or None. Raise ``TypeError`` if it holds more than one: which of them steps is unknown."""
    held = {name: value for name, value in getattr(obj, "__dict__", {}).items()
            if isinstance(value, torch.optim.Optimizer) and value is not obj}
    if len({id(v) for v in held.values()}) > 1:
        raise TypeError(f"{type(obj).__name__} holds several torch optimizers ({', '.join(sorted(held))}): attach the "
                        "isolation to the one that steps the managed parameters")
    return next(iter(held.values()), None)


def unwrap_optimizer(optimizer):
    """``(inner, wrappers)``: the torch optimizer that takes the step, and the objects wrapped around it,
    outermost first (each holds the next as an attribute, see :func:`held_optimizer`).

    EPI's masked step belongs on ``inner``: there the gradients are final (a GradScaler has unscaled them, a
    SAM closure has run) and the step is known to happen (a wrapper may rightly skip it: a GradScaler overflow,
    a gradient-accumulation micro-batch). But a wrapper may also move the weights itself, after its inner step
    (Lookahead pulls them towards its slow weights every k steps): so the caller also wraps each wrapper's own
    ``step`` (:meth:`~epi_mini.isolation.MaskedUpdate.attach`). Raise ``TypeError`` if ``inner`` is not a torch
    optimizer with step hooks."""
    inner, wrappers = optimizer, []
    while (held := held_optimizer(inner)) is not None:
        inner, wrappers = held, [*wrappers, inner]
    if not isinstance(inner, torch.optim.Optimizer) or "_optimizer_step_pre_hooks" not in vars(inner):
        raise TypeError(f"EPI masks a step through torch.optim.Optimizer's step hooks; {type(inner).__name__} is "
                        "not a torch optimizer and holds none as an attribute: pass the torch optimizer it wraps")
    return inner, wrappers


def unscale_for_fused_step(optimizer):
    """The device flag ``found_inf`` handed to ``optimizer`` for this step (1: skip it), or None; and the
    gradients unscaled, if they were handed over scaled.

    ``GradScaler.step`` does not unscale for an optimizer that can do it in its own kernel
    (``_step_supports_amp_scaling``: a fused AdamW, ``adamw_torch_fused`` in the Hugging Face Trainer): it
    sets ``optimizer.grad_scale`` and ``optimizer.found_inf`` and calls ``step()``, which skips its update on the
    device when ``found_inf`` is 1 (so does the project's loop on an accelerator, :func:`epi_mini.strategy.sft_step`,
    with ``found_inf`` alone). EPI must score unscaled gradients, so this does what ``scaler.unscale_(optimizer)``
    would have done -- multiply every gradient of the optimizer by 1 / scale, in place, on the device -- and
    tells the optimizer (``grad_scale = None``, the scaler's own value after ``unscale_``)."""
    handed = getattr(optimizer, "__dict__", {})  # both are set on the object for one step; no getattr at every step
    if handed.get("grad_scale") is not None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch._foreach_mul_(grads, handed["grad_scale"].double().reciprocal().float())  # as GradScaler.unscale_
        optimizer.grad_scale = None
    return handed.get("found_inf")


def check_gradient(name, grad):
    """Raise ``ValueError`` for a gradient EPI cannot score (sparse, e.g. from ``nn.Embedding(sparse=True)``)."""
    if grad.is_sparse:
        raise ValueError(f"parameter {name!r} has a sparse gradient (nn.Embedding(sparse=True)?); EPI scores dense "
                         "gradients: use sparse=False, or leave this parameter out of the ones EPI manages")
