"""The mechanism EPI and CPI-FT share: an isolated set, and optimizer steps that leave it exactly unchanged.

"Isolated" means *not updated at all*. Zeroing a gradient is not enough: AdamW still moves a zero-gradient
weight through its momentum and its decoupled weight decay (Avalanche's PackNet warns of the same). So the
masked step saves the isolated entries, lets the optimizer take its whole step, and writes them back. The
moments of isolated entries keep updating (neither frozen nor reset), so an entry released later resumes
with its momentum. For element-wise optimizers (SGD, Adam, AdamW, ...) this is exact: every other entry
moves exactly as the plain optimizer moves it.

:class:`MaskedUpdate` holds the set; which entries it holds is decided elsewhere: by EPI's importance,
refreshed during training (:mod:`epi_mini.epi`), or once by CPI-FT's probes (:mod:`epi_mini.baselines`); both
select with :func:`epi_mini.epi.top_fraction`, which returns a :class:`Selection`.
"""
import functools
import warnings
import weakref

import torch

from .compact import pack_bits, pack_gaps, unpack_bits, unpack_gaps
from .inputs import canonical_name, check_optimizer, named_trainable, unwrap_optimizer


def indices_to_masks(indices, like):
    """name -> flat indices to name -> bool mask shaped like ``like[name]`` (a tensor); names absent from
    ``indices`` get an all-False mask."""
    out = {}
    for n, t in like.items():
        mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
        if n in indices:
            mask[indices[n].long()] = True
        out[n] = mask.view(t.shape)
    return out


def overlap_counts(previous, current):
    """(|A and B|, |A or B|) of two isolated sets given as name -> sorted flat indices."""
    inter = sum(int(torch.isin(current[n], previous[n]).sum()) for n in current if n in previous)
    size = sum(int(i.numel()) for i in previous.values()) + sum(int(i.numel()) for i in current.values())
    return inter, size - inter


class Selection(dict):
    """name -> int32 flat indices of a selection, and the flat mask it came from, so that its overlap with an
    earlier set costs one gather of that set's entries, not a rebuilt mask."""

    def __init__(self, names, chosen, sizes):
        self.chosen, self.offsets = chosen, dict(zip(names, [0, *torch.tensor(sizes).cumsum(0).tolist()[:-1]]))
        index = chosen.nonzero().squeeze(1)
        cut = torch.searchsorted(index, torch.tensor(sizes, device=index.device).cumsum(0))
        for name, part, offset in zip(names, index.tensor_split(cut[:-1].cpu()), self.offsets.values()):
            self[name] = (part - offset).to(torch.int32)

    def count_of(self, previous):
        """How many entries of ``previous`` (name -> flat indices) this selection holds too."""
        parts = [i.long() + self.offsets[n] for n, i in previous.items()]
        return int(self.chosen.take(torch.cat(parts)).sum()) if parts else 0


class MaskedUpdate:
    """Holds an isolated set (name -> flat indices) and makes optimizer steps leave it exactly unchanged.

    ``params``: an ``nn.Module``, ``(name, parameter)`` pairs or parameters (see :mod:`epi_mini.inputs`).
    Two ways to use it, one implementation: ``isolation.step(optimizer)`` in place of ``optimizer.step()``,
    or ``isolation.attach(optimizer)`` once (or ``with isolation.attach(optimizer):``), after which every
    ``optimizer.step()`` -- from your loop, ``scaler.step(optimizer)``, a Trainer, a closure -- is masked by
    the optimizer's own step hooks. Warning (as for PackNet): the optimizer's momentum of an isolated entry
    keeps evolving; the entry does not move only because every step is masked. Attach before you step.
    """

    def __init__(self, params, mask_storage="index"):
        self.params, self._frozen = named_trainable(params)
        if mask_storage not in ("index", "bits", "gaps"):
            raise ValueError(f"invalid mask_storage={mask_storage!r}: must be 'index', 'bits' or 'gaps'")
        self.mask_storage = mask_storage
        self._stored = {}  # name -> int32 indices, or uint8 codes (bits or gaps, see compact.py); absent = none
        self._fraction = 0.0  # isolated share of all entries; None = to be recounted
        self._hooks, self._saved, self._taken = [], None, True
        self._checked = None  # (weak reference to the optimizer last checked, its number of param groups then)
        self._depth = 0  # wrapper steps under way (see attach)

    def _tensor(self, name):
        """The tensor whose entries are isolated (a sharded subclass returns this process's shard)."""
        return self.params[name]

    def _grad(self, name):
        """The gradient of :meth:`_tensor` (None if the parameter got none this step)."""
        return self.params[name].grad

    def _set_isolated(self, indices):
        self._stored, self._fraction = {}, None
        for n, idx in indices.items():
            if idx.numel() == 0:
                continue
            if self.mask_storage == "index":
                self._stored[n] = idx
            else:
                self._stored[n] = pack_gaps(idx) if self.mask_storage == "gaps" else pack_bits(idx, self._tensor(n).numel())

    def _indices(self, name):
        stored = self._stored[name]
        if self.mask_storage == "gaps":
            return unpack_gaps(stored)
        return stored if self.mask_storage == "index" else unpack_bits(stored, self._tensor(name).numel())

    def isolated_indices(self):
        """name -> sorted flat indices of the isolated entries (tensors with none are absent)."""
        if self.mask_storage != "gaps" or not self._stored:
            return {n: self._indices(n) for n in self._stored}
        # Every tensor's gaps in one decode (a handful of operations instead of a handful per tensor): decoded as
        # one stream, a tensor's indices come out shifted by the byte sum and the count of the tensors before it.
        names, lengths = list(self._stored), [c.numel() for c in self._stored.values()]
        codes = torch.cat([self._stored[n] for n in names])
        running, ends = torch.cumsum(codes, 0, dtype=torch.int64), codes != 255
        decoded = running[ends] + torch.arange(int(ends.sum()), device=codes.device)
        last = torch.tensor(lengths, device=codes.device).cumsum(0) - 1          # each tensor's last byte
        count = ends.cumsum(0)[last]                                           # indices up to each tensor's end
        shift = torch.cat([torch.zeros(1, dtype=torch.int64, device=codes.device), (running[last] + count)[:-1]])
        return {n: part - s for n, part, s in zip(names, decoded.split(torch.diff(count, prepend=count[:1] * 0).tolist()),
                                                   shift)}

    @property
    def isolated(self):
        """name -> bool tensor shaped like the parameter; True = left unchanged by the next step."""
        return indices_to_masks(self.isolated_indices(), {n: self._tensor(n) for n in self.params})

    def _reduce_counts(self, *counts):
        """Sums of a few integers over every process that holds a part of the state (here: just this one)."""
        return list(counts)

    def isolated_fraction(self):
        """The isolated share of all managed entries (counted once per change of the set, then cached)."""
        if self._fraction is None:
            isolated = sum(int(self._indices(n).numel()) for n in self._stored)
            isolated, total = self._reduce_counts(isolated, sum(self._tensor(n).numel() for n in self.params))
            self._fraction = isolated / total
        return self._fraction

    # The masked step, as optimizer step hooks: save the isolated entries (rho * N values, not a full copy)
    # before the optimizer moves anything, write them back after. take/put_ index the logical (row-major)
    # order of any memory layout (channels_last, non-contiguous views), and need no flat view of the tensor.
    def step(self, optimizer, closure=None):
        """``optimizer.step(closure)`` with the isolated entries left exactly unchanged; False if skipped."""
        with self.attach(optimizer):
            optimizer.step() if closure is None else optimizer.step(closure)
        return self._taken

    def attach(self, optimizer):
        """Mask every ``optimizer.step()`` from now on (until :meth:`detach`, or the end of a ``with`` block).

        The hooks go on the torch optimizer that takes the step: for a wrapper -- accelerate's
        ``AcceleratedOptimizer``, Lookahead, SAM -- the one it holds (:func:`~epi_mini.inputs.unwrap_optimizer`),
        so a step the wrapper skips is not seen, and SAM's ``first_step``/``second_step`` are masked too. Each
        wrapper's own ``step`` is also wrapped (:class:`WrappedStep`): when it returns, the isolated entries are
        written back once more, over anything the wrapper moved after its inner step (Lookahead's sync)."""
        inner, wrappers = unwrap_optimizer(optimizer)
        if self._hooks:
            raise RuntimeError("this isolation is already attached to an optimizer: call optimizer.step(), which is "
                               "masked, not isolation.step(optimizer); or detach() first")
        self._check(inner)
        self._hooks = [inner.register_step_pre_hook(self._pre_step), inner.register_step_post_hook(self._post_step),
                       *(WrappedStep(w, self) for w in wrappers)]
        return self

    def _check(self, optimizer):
        """:func:`~epi_mini.inputs.check_optimizer`, again whenever the optimizer is another one (known by a weak
        reference: a new optimizer may reuse a freed ``id()``) or its param groups changed; a group added after
        the check holds parameters this isolation does not manage (torch refuses one parameter in two groups)."""
        same = self._checked is not None and self._checked[0]() is optimizer
        if same and self._checked[1] == len(optimizer.param_groups):
            return  # every step: the cheap case
        check_optimizer(self.params, optimizer)
        if same and len(optimizer.param_groups) > self._checked[1]:
            added = [p for group in optimizer.param_groups[self._checked[1]:] for p in group["params"]]
            warnings.warn(f"{len(added)} parameter(s) of shape(s) {sorted({tuple(p.shape) for p in added})[:5]} were "
                          f"added to the optimizer (add_param_group) after the {type(self).__name__} was attached: "
                          "they train without isolation; build the isolation over every parameter the optimizer steps")
        self._checked = (weakref.ref(optimizer), len(optimizer.param_groups))

    def detach(self):
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._depth = [], 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    def _pre_step(self, optimizer, args, kwargs):
        # args = (optimizer, *step's positional arguments): a closure, if any, is args[1] or kwargs["closure"]
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            return self._save(optimizer)

        saved = False

        def first_evaluation_saves():  # the gradients exist only once the closure has run
            nonlocal saved
            loss = closure()
            if not saved:
                self._save(optimizer)
                saved = True
            return loss
        return (args[0], first_evaluation_saves), {k: v for k, v in kwargs.items() if k != "closure"}

    @torch.no_grad()
    def _save(self, optimizer):
        self._check(optimizer)
        self._warn_unfrozen(optimizer)
        self._taken = self._observe(optimizer)
        if not self._taken:  # a skipped step: with no gradients the optimizer moves nothing, moments included
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        self._saved = [(self._tensor(n), i, self._tensor(n).take(i)) for n, i in
                       ((n, i.long()) for n, i in self.isolated_indices().items())]

    def _post_step(self, optimizer, args, kwargs):
        self._restore()

    @torch.no_grad()
    def _restore(self):
        for t, i, values in self._saved or ():
            t.put_(i, values)
        if not self._depth:  # inside a wrapper's step, kept: written back once more when that step returns
            self._saved = None

    def _observe(self, optimizer=None):
        """What a subclass learns from this step's gradients before it is taken; False skips the step."""
        return True

    def _warn_unfrozen(self, optimizer):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) in self._frozen:
                    warnings.warn(f"parameter {self._frozen.pop(id(p))!r} now has a gradient but did not require one "
                                  "when the isolation was built: it is trained without isolation; build the "
                                  "isolation after unfreezing it")

    def __getstate__(self):
        """Pickled (``torch.save(isolation)``, ``copy.deepcopy``), an isolation is copied detached: its hooks live
        on the optimizer. ``state_dict()`` is the way to save and resume one."""
        if self._hooks:
            warnings.warn(f"pickling an attached {type(self).__name__}: the copy is detached (its step hooks live on "
                          "the optimizer and are not copied); attach the copy to its optimizer, or save state_dict()")
        return {**vars(self), "_hooks": [], "_saved": None, "_checked": None, "_depth": 0}

    def state_dict(self):
        return {"mask_storage": self.mask_storage, "stored": {n: t.clone() for n, t in self._stored.items()}}

    def _by_our_names(self, saved):
        """Saved name -> tensor, keyed by this object's names (``torch.compile``'s ``_orig_mod.`` ignored)."""
        ours = {canonical_name(n): n for n in self.params}
        unknown = sorted(n for n in saved if canonical_name(n) not in ours)
        if unknown:
            raise ValueError(f"the saved state does not match these parameters: it names {unknown[:5]}, which this "
                             "model lacks (torch.compile's '_orig_mod.' prefix is ignored)")
        return {ours[canonical_name(n)]: t for n, t in saved.items()}

    def load_state_dict(self, state):
        if state["mask_storage"] != self.mask_storage:
            raise ValueError(f"state has mask_storage={state['mask_storage']!r}, this object {self.mask_storage!r}")
        self._stored = {n: t.to(self._tensor(n).device) for n, t in self._by_our_names(state["stored"]).items()}
        self._fraction = None


class WrappedStep:
    """``wrapper.step`` replaced, on that one object, by a step that writes the isolated entries back once more
    when it returns (its inner optimizer's hooks have saved them, and restored them once already); with the
    interface of a hook handle: :meth:`remove` puts the original back. The replacement carries the original's
    attributes (``functools.wraps``), such as the mark a learning-rate scheduler leaves on the step it wrapped."""

    def __init__(self, wrapper, isolation):
        self.wrapper, own, original = wrapper, vars(wrapper).get("step"), wrapper.step  # own: set on the object

        @functools.wraps(original)
        def step(*args, **kwargs):
            isolation._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                isolation._depth -= 1
                isolation._restore()
        self.own, self.step = own, step
        wrapper.step = step

    def remove(self):
        if vars(self.wrapper).get("step") is self.step:  # (unless something has replaced it since)
            if self.own is None:
                del self.wrapper.step
            else:
                self.wrapper.step = self.own


class StepCount:
    """Steps taken and skipped, when a step may be skipped by a flag on the device.

    An optimizer handed ``found_inf`` (a 0-dim device tensor; see :func:`~epi_mini.inputs.unscale_for_fused_step`)
    skips its update on the device when it is > 0, and reading it on the host at every step would stall the
    device. So :meth:`add` counts a flagged step as taken in ``upper`` (an upper bound, on the host) and adds its
    flag up on the device; :meth:`settle` reads the sum back (one host sync) and corrects the counts. EPI settles
    only when ``upper`` says a refresh may be due, so it refreshes at exactly the steps a host-checked loop would.
    ``taken`` and ``skipped`` settle first, then are exact (and may be set, e.g. on resume)."""

    def __init__(self, taken=0, skipped=0):
        self.upper, self._skipped, self._flags, self._last, self._last_taken = taken, skipped, None, None, True

    def add(self, found_inf=None):
        """Count one step; ``found_inf``: its device flag (> 0: skipped), or None for a step known to be taken."""
        self.upper += 1
        self._last_taken = found_inf is None
        if found_inf is not None:
            self._last = found_inf.reshape(()) > 0
            self._flags = self._last.long() if self._flags is None else self._flags + self._last

    def skip(self):
        """Count a step skipped on the host (which knows it already)."""
        self._skipped += 1

    def settle(self):
        """Read the flags back and correct the counts; return whether the latest step was taken."""
        if self._flags is not None:
            skipped, last = torch.stack([self._flags, self._last.long()]).tolist()
            self.upper, self._skipped, self._flags = self.upper - skipped, self._skipped + skipped, None
            self._last_taken = self._last_taken or not last
        return self._last_taken

    @property
    def taken(self):
        self.settle()
        return self.upper

    @taken.setter
    def taken(self, value):
        self.settle()
        self.upper = value

    @property
    def skipped(self):
        self.settle()
        return self._skipped

    @skipped.setter
    def skipped(self, value):
        self.settle()
        self._skipped = value
