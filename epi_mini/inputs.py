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


def unwrap_optimizer(optimizer):
    """The torch optimizer that takes the step: ``optimizer`` itself, or the one a wrapper holds as
    ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, which the Hugging Face Trainer steps). Step hooks
    registered on such a wrapper never run (it never calls ``torch.optim.Optimizer.__init__``), and the
    wrapper's ``step`` may rightly skip the inner one (a GradScaler overflow, a gradient-accumulation micro-batch),
    so the masked step belongs on the inner optimizer. Raise ``TypeError`` for anything else."""
    inner = optimizer
    while "_optimizer_step_pre_hooks" not in vars(inner) and isinstance(getattr(inner, "optimizer", None),
                                                                        torch.optim.Optimizer):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer) or "_optimizer_step_pre_hooks" not in vars(inner):
        raise TypeError(f"EPI masks a step through torch.optim.Optimizer's step hooks; {type(optimizer).__name__} is "
                        "not a torch optimizer and holds none as .optimizer: pass the torch optimizer it wraps")
    return inner


def check_gradient(name, grad):
    """Raise ``ValueError`` for a gradient EPI cannot score (sparse, e.g. from ``nn.Embedding(sparse=True)``)."""
    if grad.is_sparse:
        raise ValueError(f"parameter {name!r} has a sparse gradient (nn.Embedding(sparse=True)?); EPI scores dense "
                         "gradients: use sparse=False, or leave this parameter out of the ones EPI manages")
