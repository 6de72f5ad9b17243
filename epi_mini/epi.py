"""Evolving Parameter Isolation (EPI), for any model and any element-wise optimizer.

EPI (Lin, Xue, Liang et al., 2026, arXiv 2604.14010) protects the parameters that currently matter most:

1. importance, online:  ``I <- beta * I + (1 - beta) * score(theta, g)``, by default ``score = g**2``
   (an EMA of squared gradients: a running, diagonal, Fisher-like sensitivity of the current stream);
2. layer-wise normalisation, so tensors with very different gradient scales compete fairly: ``I / mean(I)``;
3. global selection: every ``mask_interval`` (K) steps after warm-up, the top ``isolation_ratio`` (rho)
   fraction of normalised scores over all tensors becomes the *isolated* set;
4. isolation = no update: isolated entries are left exactly at their pre-step values.

Step 4 masks the optimizer's *final* delta, not the gradient: AdamW still moves a zero-gradient weight
through its momentum and its decoupled weight decay. The mechanism -- save the isolated entries, let the
optimizer step, write them back -- is :class:`~epi_mini.isolation.MaskedUpdate`, which CPI-FT's static mask
shares; this module decides *which* entries it holds, and when that changes.

This module is the method and nothing else; it imports only torch and the project's isolation mechanism.
The static baseline (CPI-FT) is in :mod:`epi_mini.baselines`, the tools that measure drift in
:mod:`epi_mini.drift`.
"""
import warnings

import torch

from .compact import BlockwiseEMA8, kth_largest
from .inputs import check_gradient, unscale_for_fused_step
from .isolation import MaskedUpdate, Selection, StepCount, overlap_counts

EPS = 1e-12


# --- 1. importance scores: f(param, grad) -> per-element score >= 0. Add your own in one line. ------------
def squared_gradient(param, grad):
    """EPI's default: g**2 (|g|**2 for a complex g), whose EMA is a diagonal empirical-Fisher estimate."""
    return torch.view_as_real(grad).square().sum(-1) if grad.is_complex() else grad * grad


def gradient_times_weight(param, grad):
    """|g * theta|: first-order estimate of the loss change if the weight were removed (SNIP, AdaLoRA)."""
    return (grad * param).abs()


IMPORTANCE_SCORES = {"squared_gradient": squared_gradient, "gradient_times_weight": gradient_times_weight}


# --- 2. layer-wise normalisers: scores within one tensor -> comparable across tensors -----------------------
def _affine_stats(kind, s):
    """(shift, scale) such that the normalised score is (s - shift) / scale."""
    if kind == "mean":
        return 0.0, s.mean() + EPS
    if kind == "max":
        return 0.0, s.max() + EPS
    return s.mean(), (s.std() if s.numel() > 1 else 0.0) + EPS  # "zscore"


def normalize(score, kind="mean", out=None):
    """Normalise one tensor's scores: ``mean`` (I/mean I), ``max``, ``zscore`` or ``rank`` (rank/numel; the
    one normaliser that sorts, O(n log n))."""
    s = score.detach().reshape(-1).float()
    out = torch.empty_like(s) if out is None else out
    if kind == "rank":
        order = torch.argsort(s, stable=True)  # ties ranked by position: deterministic
        ranks = torch.arange(1, s.numel() + 1, dtype=out.dtype, device=out.device) / s.numel()
        return out.index_put_((order,), ranks)
    shift, scale = _affine_stats(kind, s)
    return torch.div(s, scale, out=out) if kind != "zscore" else torch.sub(s, shift, out=out).div_(scale)


NORMALIZERS = ("mean", "max", "zscore", "rank")


# --- 3. global selection -------------------------------------------------------------------------------------
def top_fraction(scores, ratio, normalizer="mean", method="auto"):
    """Global top-``ratio`` entries of layer-normalised ``scores`` (name -> tensor): a :class:`Selection`,
    name -> int32 flat indices.

    Exactly ``round(ratio * N)`` entries are chosen: all those above the k-th largest value (:func:`kth_largest`,
    O(N), no sort), then the entries tied with it in order of their global flat position, so that the choice
    is deterministic. One pass normalises into a flat buffer; ``normalizer=None`` selects on the raw scores.
    """
    sizes = [s.numel() for s in scores.values()]
    flat = torch.empty(sum(sizes), dtype=torch.float32, device=next(iter(scores.values())).device)
    for s, chunk in zip(scores.values(), flat.split(sizes)):
        chunk.copy_(s.reshape(-1)) if normalizer is None else normalize(s, normalizer, out=chunk)
    k = round(ratio * flat.numel())
    if k == 0:
        if ratio > 0:
            warnings.warn(f"isolation_ratio={ratio} of {flat.numel()} entries rounds to 0: nothing is isolated")
        return Selection(list(scores), torch.zeros_like(flat, dtype=torch.bool), sizes)
    threshold = kth_largest(flat, k, method)
    chosen = flat >= threshold
    extra = int(chosen.sum()) - k
    if extra > 0:  # more ties at the threshold than places: keep the first ones in flat order
        chosen[(flat == threshold).nonzero().squeeze(1)[-extra:]] = False
    return Selection(list(scores), chosen, sizes)


# --- argument checks, shared with epi_mini.config (which checks the same options on the command line) ------
def check_options(isolation_ratio=0.1, mask_interval=20, ema_beta=0.99, warmup_steps=100, normalizer="mean",
                  importance="squared_gradient"):
    """Raise ``ValueError("invalid <name>=<value>: must be ...")`` for the first option out of range."""
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    for name, value, ok, allowed in (
            ("isolation_ratio", isolation_ratio, num(isolation_ratio) and 0 <= isolation_ratio < 1, "in [0, 1)"),
            ("mask_interval", mask_interval, mask_interval in ("once", "auto") or (whole(mask_interval) and
             mask_interval >= 1), "an integer >= 1, 'once' or 'auto'"),
            ("ema_beta", ema_beta, num(ema_beta) and 0 <= ema_beta < 1, "in [0, 1)"),
            ("warmup_steps", warmup_steps, whole(warmup_steps) and warmup_steps >= 0, "an integer >= 0"),
            ("normalizer", normalizer, normalizer in NORMALIZERS, f"one of {NORMALIZERS}"),
            ("importance", importance, callable(importance) or importance in IMPORTANCE_SCORES,
             f"one of {tuple(IMPORTANCE_SCORES)} or a function f(param, grad)")):
        if not ok:
            raise ValueError(f"invalid {name}={value!r}: must be {allowed}")
    if mask_interval == "auto" and normalizer == "rank":
        raise ValueError("invalid normalizer='rank' with mask_interval='auto': the drift estimate needs an affine "
                         "normalizer; use 'mean', 'max' or 'zscore'")


# --- EPI: the four steps together ------------------------------------------------------------------------------
class EvolvingIsolation(MaskedUpdate):
    """EPI: ``isolation.step(optimizer)`` in place of ``optimizer.step()``, or ``isolation.attach(optimizer)``.

    Arguments: ``isolation_ratio`` rho in [0, 1); ``mask_interval`` K >= 1 steps between refreshes, or
    ``"once"`` (refresh once after warm-up, then never: the static-EPI-score control; for ``"auto"``, refresh
    when the set has drifted, see :class:`epi_mini.adaptive.AdaptiveIsolation`); ``ema_beta`` in [0, 1);
    ``warmup_steps`` >= 0 steps of statistics before anything is isolated; ``normalizer`` one of
    :data:`NORMALIZERS`; ``importance`` a name in :data:`IMPORTANCE_SCORES` or any ``f(param, grad) -> score``.

    A gradient with a NaN or inf skips the whole step (no importance update, no optimizer step) with a
    warning; ``skipped_steps`` grows and ``step`` returns False. No NaN ever reaches the scores. A step that
    a ``GradScaler`` skips never reaches EPI: it is not stepped, or (a fused optimizer) it is skipped on the
    device by the flag the scaler hands it, and so is EPI's part (see :meth:`_observe`).
    """

    def __init__(self, params, isolation_ratio=0.1, mask_interval=20, ema_beta=0.99, warmup_steps=100,
                 normalizer="mean", importance="squared_gradient", ema_storage="fp32", mask_storage="index"):
        super().__init__(params, mask_storage)
        check_options(isolation_ratio, mask_interval, ema_beta, warmup_steps, normalizer, importance)
        if mask_interval == "auto" and type(self) is EvolvingIsolation:
            raise ValueError("invalid mask_interval='auto' for EvolvingIsolation: use "
                             "epi_mini.adaptive.AdaptiveIsolation, which refreshes when the isolated set has drifted")
        if ema_storage not in ("fp32", "bf16", "int8") or (ema_storage == "bf16" and ema_beta > 0.99):
            raise ValueError(f"invalid ema_storage={ema_storage!r} (with ema_beta={ema_beta}): must be 'fp32', 'int8', "
                             "or 'bf16' with ema_beta <= 0.99 (a bf16 EMA stalls: its increments underflow)")
        self.isolation_ratio, self.mask_interval, self.ema_beta = isolation_ratio, mask_interval, ema_beta
        self.warmup_steps, self.normalizer = warmup_steps, normalizer
        self.importance = IMPORTANCE_SCORES[importance] if isinstance(importance, str) else importance
        # The EMA, one value per entry, in row-major order whatever the parameter's memory layout; or, in
        # 8 bits, BlockwiseEMA8 (then self.scores dequantizes it on demand).
        shapes = {n: self._tensor(n).shape for n in self.params}
        device = self._tensor(next(iter(self.params))).device
        self._ema8 = BlockwiseEMA8(shapes, device) if ema_storage == "int8" else None
        self._scores = {} if self._ema8 else {n: torch.zeros(s, dtype=torch.bfloat16 if ema_storage == "bf16" else
                                                             torch.float32, device=device) for n, s in shapes.items()}
        self._count, self.history, self._refresh_next = StepCount(), [], False

    @property
    def num_steps(self):
        """Steps taken (a step skipped by a device flag is not one; reading this may wait for the device)."""
        return self._count.taken

    @num_steps.setter
    def num_steps(self, value):
        self._count.taken = value

    @property
    def skipped_steps(self):
        """Steps skipped: by a non-finite gradient seen here, or by the device flag ``found_inf``."""
        return self._count.skipped

    @skipped_steps.setter
    def skipped_steps(self, value):
        self._count.skipped = value

    def set_isolation_ratio(self, ratio):
        """Change rho; the set is refreshed at the next step (once warm-up is over), whatever K says."""
        check_options(isolation_ratio=ratio)
        self.isolation_ratio, self._refresh_next = ratio, True

    def _due(self, t):
        """Is a refresh due after ``t`` steps since warm-up ended (>= 1 once it may start)? Cheap: called at
        every step, with an upper bound of ``t`` first (see _observe)."""
        if t < 1:
            return False
        if self._refresh_next:
            return True
        return not self.history if self.mask_interval == "once" else (t - 1) % self.mask_interval == 0

    def _wants_refresh(self):
        """The last word on a due refresh (AdaptiveIsolation: has the isolated set drifted?)."""
        return True

    @torch.no_grad()
    def _observe(self, optimizer=None):
        """Steps 1 and 3: the EMA update with this step's gradients, then a refresh if one is due.

        An optimizer handed a device flag ``found_inf`` (a fused one, under a GradScaler or the training loop on
        an accelerator) skips its update by that flag, and so does EPI, with nothing read back to the host: the
        EMA update is gated by the flag, and the step is counted by :class:`~epi_mini.isolation.StepCount`,
        read back only when a refresh may be due. Gradients the scaler left scaled are unscaled first."""
        found_inf = unscale_for_fused_step(optimizer)
        grads = [(n, g) for n, g in ((n, self._grad(n)) for n in self.params) if g is not None]
        for n, g in grads:
            check_gradient(n, g)
        finite = found_inf is not None or not grads or torch.isfinite(torch.stack(torch._foreach_norm(
            [g for _, g in grads]))).all()
        if not finite:
            self._count.skip()
            warnings.warn(f"EvolvingIsolation: non-finite gradient at step {self.num_steps + 1}; step skipped "
                          f"({self.skipped_steps} so far), importance scores left unchanged")
            return False
        self._update_ema(grads, None if found_inf is None else 1.0 - found_inf)
        self._count.add(found_inf)
        if self._due(self._count.upper - self.warmup_steps) and self._count.settle():  # the count is exact now
            if self._due(self.num_steps - self.warmup_steps) and self._wants_refresh():
                self._refresh_next = False
                self.refresh()
        return True

    def _update_ema(self, grads, keep=None):
        """``I <- beta I + (1 - beta) score(theta, g)``; with ``keep`` (0-dim device tensor), only where it is 1:
        the update goes to a copy, kept or dropped on the device. A parameter without a gradient keeps its score."""
        if self._ema8 is not None:
            return self._ema8.update({n: self.importance(self._tensor(n), g) for n, g in grads}, self.ema_beta, keep)
        old = {n: self._scores[n] for n, _ in grads}
        if keep is not None:
            self._scores.update({n: s.clone() for n, s in old.items()})
        if self.importance is squared_gradient and grads and all(self._scores[n].dtype == g.dtype for n, g in grads):
            emas, gs = [self._scores[n] for n, _ in grads], [g for _, g in grads]
            torch._foreach_mul_(emas, self.ema_beta)  # fused over all tensors: the common case, fast
            torch._foreach_addcmul_(emas, gs, gs, value=1 - self.ema_beta)
        else:
            for n, g in grads:
                self._scores[n].lerp_(self.importance(self._tensor(n), g).to(self._scores[n].dtype), 1 - self.ema_beta)
        if keep is not None:
            for n, was in old.items():
                self._scores[n] = was.copy_(torch.where(keep > 0, self._scores[n], was))

    @property
    def scores(self):
        """name -> the importance EMA (float32 or bfloat16; dequantized, transient, in 8-bit mode)."""
        return self._scores if self._ema8 is None else self._ema8.values()

    def select(self):
        """The set a refresh isolates: the global top-rho of the normalised scores (name -> int32 indices)."""
        return top_fraction(self.scores, self.isolation_ratio, self.normalizer)

    @torch.no_grad()
    def refresh(self):
        """Recompute the isolated set from the current scores; log its overlap with the previous set."""
        previous = self.isolated_indices() if self.history else None
        selection = self.select()
        self._set_isolated(selection)
        current = self.isolated_indices()
        if previous is None:
            inter, union = 0, 0
        elif isinstance(selection, Selection):  # the overlap from the selection itself: O(rho N)
            inter = selection.count_of(previous)
            union = sum(int(i.numel()) for i in previous.values()) + sum(int(i.numel()) for i in current.values()) - inter
        else:
            inter, union = overlap_counts(previous, current)
        isolated, total, inter, union = self._reduce_counts(sum(int(i.numel()) for i in current.values()),
                                                            sum(self._tensor(n).numel() for n in self.params), inter, union)
        self._fraction = isolated / total
        self.history.append({"step": self.num_steps, "isolated_fraction": isolated / total,
                             "jaccard_previous": (inter / union if union else 1.0) if previous is not None else None})

    def state_bytes(self):
        """Bytes of EPI state: {"ema", "mask", "total", "per_param"}. The EMA costs 4 bytes per parameter (fp32)
        or 2 (``ema_storage="bf16"``: needs beta <= 0.99, as bf16's 8-bit mantissa cannot absorb smaller
        increments) or 1.016 (``"int8"``, :class:`~epi_mini.compact.BlockwiseEMA8`); the isolated set 4*rho
        (int32 indices, ``mask_storage="index"``, fastest), about rho (``"gaps"``) or 1/8 (``"bits"``). A refresh
        also needs a transient N-float buffer (not counted)."""
        ema = self._ema8.nbytes if self._ema8 else sum(s.numel() * s.element_size() for s in self._scores.values())
        mask = sum(t.numel() * t.element_size() for t in self._stored.values())
        n = sum(self._tensor(n).numel() for n in self.params)
        return {"ema": ema, "mask": mask, "total": ema + mask, "per_param": (ema + mask) / n}

    def state_dict(self):
        ema = self._ema8.state_dict() if self._ema8 else {n: s.clone() for n, s in self._scores.items()}
        return {**super().state_dict(), "scores": ema,
                "num_steps": self.num_steps, "skipped_steps": self.skipped_steps, "refresh_next": self._refresh_next,
                "isolation_ratio": self.isolation_ratio, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state):
        if self._ema8 is not None or "codes" in state["scores"]:
            if self._ema8 is None or "codes" not in state["scores"]:
                raise ValueError("the saved importance and this object differ in ema_storage ('int8' or not)")
            super().load_state_dict(state)
            self._ema8.load_state_dict(state["scores"])
        else:
            scores = self._by_our_names(state["scores"])
            if set(scores) != set(self.params):
                raise ValueError("the saved state does not match these parameters: "
                                 f"{sorted(set(scores) ^ set(self.params))[:5]}")
            super().load_state_dict(state)
            for n, s in scores.items():
                if s.shape != self._scores[n].shape or s.dtype != self._scores[n].dtype:
                    raise ValueError(f"importance of {n!r}: saved {tuple(s.shape)} {s.dtype}, "
                                     f"expected {tuple(self._scores[n].shape)} {self._scores[n].dtype}")
                self._scores[n].copy_(s)
        self._count = StepCount(state["num_steps"], state["skipped_steps"])
        self.isolation_ratio = state.get("isolation_ratio", self.isolation_ratio)
        self._refresh_next = state.get("refresh_next", False)  # a set_isolation_ratio not yet applied
        self.history = [dict(h) for h in state["history"]]
