"""Evolving Parameter Isolation (EPI) and the static isolation baselines, for any model and optimizer.

EPI (Xue, Liang et al., 2026, arXiv 2604.14010) protects the parameters that currently matter most:

1. importance, online:  ``I <- beta * I + (1 - beta) * score(theta, g)``, by default ``score = g**2``
   (an EMA of squared gradients: a running, diagonal, Fisher-like sensitivity of the current stream);
2. layer-wise normalisation, so tensors with very different gradient scales compete fairly: ``I / mean(I)``;
3. global selection: every ``mask_interval`` (K) steps after warm-up, the top ``isolation_ratio`` (rho)
   fraction of normalised scores over all tensors becomes the *isolated* set;
4. isolation = no update: isolated entries are left exactly at their pre-step values.

Step 4 masks the optimizer's *final* delta, not the gradient. Zeroing the gradient is not enough: AdamW
still moves a zero-gradient weight through its momentum and its decoupled weight decay (Avalanche's
PackNet warns of the same). So :meth:`step` saves the isolated entries, runs ``optimizer.step()`` and
writes them back. The optimizer's moments keep updating for isolated entries; they are neither frozen nor
reset, so an entry released at a refresh resumes with its momentum. This is exact for element-wise
optimizers (SGD, Adam, AdamW, ...): every other entry moves exactly as the plain optimizer moves it.

:class:`StaticIsolation` has the same ``step(optimizer)`` contract with a mask that never changes by
itself (CPI-FT core regions, grown stage by stage with :meth:`StaticIsolation.freeze`). The "static EPI
score" control is ``EvolvingIsolation(..., mask_interval="once")``: EPI's own score, taken once after
warm-up and never refreshed. The module imports nothing but torch, so it works on any ``nn.Module``.

Memory per parameter (N parameters, rho the isolation ratio; see :meth:`state_bytes`):
  EMA: 4 bytes (fp32, default) or 2 bytes (``ema_dtype=torch.bfloat16``);
  isolated set: 4*rho bytes as int32 indices (``mask_storage="index"``, default, fastest) or 1/8 byte as
  packed bits (``mask_storage="bits"``, unpacked on every step: slower, smallest for rho > 3%).
  A refresh also needs a transient N-float buffer. bf16 has an 8-bit mantissa: an EMA with beta > 0.99
  cannot absorb increments smaller than 2**-8 of itself, so the compact EMA requires beta <= 0.99.
"""
import warnings

import torch

EPS = 1e-12


# --- importance scores: f(param, grad) -> per-element score >= 0. Add your own in one line. ---------------
def squared_gradient(param, grad):
    """EPI's default: g**2, whose EMA is a diagonal empirical-Fisher estimate."""
    return grad * grad


def gradient_times_weight(param, grad):
    """|g * theta|: first-order estimate of the loss change if the weight were removed (SNIP, AdaLoRA)."""
    return (grad * param).abs()


IMPORTANCE_SCORES = {"squared_gradient": squared_gradient, "gradient_times_weight": gradient_times_weight}


# --- layer-wise normalisers: scores within one tensor -> comparable across tensors ------------------------
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
    return torch.sub(s, shift, out=out).div_(scale)


NORMALIZERS = ("mean", "max", "zscore", "rank")


def top_fraction(scores, ratio, normalizer="mean"):
    """Global top-``ratio`` entries of layer-normalised ``scores`` (name -> tensor) as name -> int32 flat indices.

    Exactly ``round(ratio * N)`` entries are chosen. The threshold is the k-th largest value (``kthvalue``:
    O(N), no full sort); entries tied at the threshold are taken in order of their global flat position, so
    the choice is deterministic. ``normalizer=None`` selects on the raw scores.
    """
    sizes = [s.numel() for s in scores.values()]
    flat = torch.empty(sum(sizes), device=next(iter(scores.values())).device)
    for s, chunk in zip(scores.values(), flat.split(sizes)):
        chunk.copy_(s.reshape(-1)) if normalizer is None else normalize(s, normalizer, out=chunk)
    k = round(ratio * flat.numel())
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
        chosen = flat > threshold
        need = k - int(chosen.sum())
        chosen[(flat == threshold).nonzero().squeeze(1)[:need]] = True
    return {name: c.nonzero().squeeze(1).to(torch.int32) for name, c in zip(scores, chosen.split(sizes))}


# --- drift tools: cheap enough to log at every refresh ---------------------------------------------------
def jaccard(a, b):
    """|A and B| / |A or B| of two isolated sets given as name -> bool tensor (1.0 when both are empty)."""
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / union if union else 1.0


def rank_correlation(a, b, sample=None, seed=0):
    """Spearman rank correlation of two score snapshots (name -> tensor), over all entries or a fixed random
    ``sample`` of them (same positions in both)."""
    x = torch.cat([a[n].reshape(-1).float() for n in a])
    y = torch.cat([b[n].reshape(-1).float() for n in a])
    if sample is not None and sample < x.numel():
        pick = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))[:sample]
        x, y = x[pick.to(x.device)], y[pick.to(y.device)]
    rx, ry = (torch.argsort(torch.argsort(v)).float() for v in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / ((rx.norm() * ry.norm()) + EPS))


def layer_share(isolated):
    """Fraction of each tensor that is isolated: name -> float."""
    return {n: float(m.float().mean()) for n, m in isolated.items()}


def group_by_overlap(cores, tau=0.1):
    """CPI-FT task grouping: tasks whose core regions overlap with Jaccard >= ``tau`` (directly or through a
    chain of tasks) share a group. ``cores``: task -> (name -> bool tensor). Returns a list of task lists."""
    groups = []
    for task in cores:
        joined = [g for g in groups if any(jaccard(cores[task], cores[t]) >= tau for t in g)]
        groups = [g for g in groups if g not in joined] + [sum(joined, []) + [task]]
    return groups


# --- the shared mechanism: an isolated set and a masked optimizer step ------------------------------------
class _MaskedUpdate:
    """Holds an isolated set and runs optimizer steps that leave it untouched."""

    def __init__(self, params, mask_storage="index"):
        named = params.named_parameters() if isinstance(params, torch.nn.Module) else params
        self.params = {n: p for n, p in named if p.requires_grad}
        if not self.params:
            raise ValueError("no trainable parameters given")
        if mask_storage not in ("index", "bits"):
            raise ValueError(f"mask_storage must be 'index' or 'bits', got {mask_storage!r}")
        self.mask_storage = mask_storage
        self._stored = {}  # name -> int32 indices ("index") or packed uint8 bits ("bits"); absent = none

    # Storage of the isolated set.
    def _set_isolated(self, indices):
        self._stored = {}
        for n, idx in indices.items():
            if idx.numel() == 0:
                continue
            if self.mask_storage == "index":
                self._stored[n] = idx
            else:
                bits = torch.zeros(-(-self.params[n].numel() // 8) * 8, dtype=torch.bool, device=idx.device)
                bits[idx.long()] = True
                weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=idx.device)
                self._stored[n] = (bits.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)

    def _indices(self, name):
        if self.mask_storage == "index":
            return self._stored[name]
        shifts = torch.arange(8, dtype=torch.uint8, device=self._stored[name].device)
        bits = ((self._stored[name].unsqueeze(1) >> shifts) & 1).view(-1)[: self.params[name].numel()]
        return bits.nonzero().squeeze(1).to(torch.int32)

    @property
    def isolated(self):
        """name -> bool tensor shaped like the parameter; True = left unchanged by the next step."""
        out = {}
        for n, p in self.params.items():
            mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
            if n in self._stored:
                mask[self._indices(n).long()] = True
            out[n] = mask.view_as(p)
        return out

    def isolated_fraction(self):
        n_iso = sum(int(self._indices(n).numel()) for n in self._stored)
        return n_iso / sum(p.numel() for p in self.params.values())

    @torch.no_grad()
    def _masked_optimizer_step(self, optimizer):
        # Save only the isolated entries (rho * N values, not a full copy), step, write them back.
        saved = [(p, idx, p.view(-1).index_select(0, idx)) for p, idx in
                 ((self.params[n], self._indices(n)) for n in self._stored)]
        optimizer.step()
        for p, idx, values in saved:
            p.view(-1).index_put_((idx,), values)

    def _mask_state(self):
        return {"mask_storage": self.mask_storage, "stored": {n: t.clone() for n, t in self._stored.items()}}

    def _load_mask_state(self, state):
        if state["mask_storage"] != self.mask_storage:
            raise ValueError(f"state has mask_storage={state['mask_storage']!r}, this object {self.mask_storage!r}")
        unknown = set(state["stored"]) - set(self.params)
        if unknown:
            raise ValueError(f"state names parameters this model lacks: {sorted(unknown)[:5]}")
        self._stored = {n: t.to(self.params[n].device) for n, t in state["stored"].items()}


class StaticIsolation(_MaskedUpdate):
    """A fixed isolated set (CPI-FT's frozen core regions). ``freeze(mask)`` adds entries, e.g. the cores of
    the task group that just finished its pipeline stage; nothing is ever released.

    Warning (as for PackNet): the optimizer's momentum of a frozen entry keeps evolving; the entry does not
    move only because every step is masked. Stepping the optimizer outside :meth:`step` would move it.
    """

    def __init__(self, params, isolated=None, mask_storage="index"):
        super().__init__(params, mask_storage)
        if isolated:
            self.freeze(isolated)

    def freeze(self, mask):
        """Add the True entries of ``mask`` (name -> bool tensor) to the isolated set."""
        current = self.isolated
        merged = {n: (current[n] | mask[n].to(current[n].device)) if n in mask else current[n] for n in current}
        self._set_isolated({n: m.view(-1).nonzero().squeeze(1).to(torch.int32) for n, m in merged.items()})

    def step(self, optimizer):
        self._masked_optimizer_step(optimizer)
        return True

    def state_dict(self):
        return self._mask_state()

    def load_state_dict(self, state):
        self._load_mask_state(state)


def core_region(before, after, ratio):
    """CPI-FT's core region of a probe fine-tune: the global top-``ratio`` entries by update magnitude
    ``|after - before|`` (name -> tensor dicts), as name -> bool tensor."""
    picked = top_fraction({n: (after[n] - before[n]).abs() for n in before}, ratio, normalizer=None)
    out = {}
    for n, t in before.items():
        mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
        mask[picked[n].long()] = True
        out[n] = mask.view_as(t)
    return out


class EvolvingIsolation(_MaskedUpdate):
    """EPI as an update strategy: ``strategy.step(optimizer)`` in place of ``optimizer.step()``.

    Arguments: ``isolation_ratio`` rho in [0, 1); ``mask_interval`` K >= 1 steps between refreshes, or
    ``"once"`` (refresh once after warm-up, then never: the static-EPI-score control), or ``"auto"`` (refresh
    when the isolated set has drifted by more than ``drift_threshold``, estimated every ``auto_check_every``
    steps on a fixed random sample of ``drift_sample`` entries); ``ema_beta`` in [0, 1); ``warmup_steps`` >= 0
    steps of statistics before anything is isolated; ``normalizer`` one of :data:`NORMALIZERS`;
    ``importance`` a name in :data:`IMPORTANCE_SCORES` or any ``f(param, grad) -> score``.

    Non-finite gradients: if any gradient holds NaN or inf, the whole step is skipped (no importance update,
    no optimizer step), a warning is issued, ``skipped_steps`` grows and ``step`` returns False. A step
    never writes a NaN into the importance scores.
    """
    auto_check_every = 10

    def __init__(self, params, isolation_ratio=0.1, mask_interval=20, ema_beta=0.99, warmup_steps=100,
                 normalizer="mean", importance="squared_gradient", ema_dtype=torch.float32,
                 mask_storage="index", drift_threshold=0.2, drift_sample=4096, seed=0):
        super().__init__(params, mask_storage)
        if not (isinstance(isolation_ratio, (int, float)) and 0 <= isolation_ratio < 1):
            raise ValueError(f"isolation_ratio must be in [0, 1), got {isolation_ratio!r}")
        if mask_interval not in ("once", "auto") and not (isinstance(mask_interval, int) and mask_interval >= 1):
            raise ValueError(f"mask_interval must be an integer >= 1, 'once' or 'auto', got {mask_interval!r}")
        if not (isinstance(ema_beta, (int, float)) and 0 <= ema_beta < 1):
            raise ValueError(f"ema_beta must be in [0, 1), got {ema_beta!r}")
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
        if mask_interval == "auto" and normalizer == "rank":
            raise ValueError("mask_interval='auto' estimates drift with an affine normalizer; "
                             "use normalizer 'mean', 'max' or 'zscore'")
        if not (isinstance(drift_threshold, (int, float)) and 0 < drift_threshold <= 1):
            raise ValueError(f"drift_threshold must be in (0, 1], got {drift_threshold!r}")
        if ema_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"ema_dtype must be torch.float32 or torch.bfloat16, got {ema_dtype!r}")
        if ema_dtype == torch.bfloat16 and ema_beta > 0.99:
            raise ValueError(f"ema_beta={ema_beta} with a bf16 EMA stalls (increments below bf16 precision); "
                             "use ema_beta <= 0.99 or ema_dtype=torch.float32")
        if isinstance(importance, str) and importance not in IMPORTANCE_SCORES:
            raise ValueError(f"importance must be one of {sorted(IMPORTANCE_SCORES)} or a function, got {importance!r}")
        self.isolation_ratio, self.mask_interval, self.ema_beta = isolation_ratio, mask_interval, ema_beta
        self.warmup_steps, self.normalizer, self.drift_threshold = warmup_steps, normalizer, drift_threshold
        self.importance = IMPORTANCE_SCORES[importance] if isinstance(importance, str) else importance
        self.scores = {n: torch.zeros_like(p, dtype=ema_dtype) for n, p in self.params.items()}  # the EMA
        self.num_steps, self.skipped_steps, self.history = 0, 0, []
        # Fixed random sample for mask_interval="auto": per tensor, positions proportional to its size.
        gen, total = torch.Generator().manual_seed(seed), sum(p.numel() for p in self.params.values())
        self._sample = {n: torch.randint(p.numel(), (max(1, drift_sample * p.numel() // total),), generator=gen)
                        .to(p.device) for n, p in self.params.items()} if mask_interval == "auto" else {}
        self._sample_member = None

    def _due(self):
        t = self.num_steps - self.warmup_steps  # steps since warm-up ended (>= 1 when isolation may start)
        if t < 1:
            return False
        if self.mask_interval == "once":
            return not self.history
        if self.mask_interval == "auto":
            return not self.history or (t % self.auto_check_every == 0 and self.estimated_drift() > self.drift_threshold)
        return (t - 1) % self.mask_interval == 0

    @torch.no_grad()
    def step(self, optimizer):
        """EMA update, refresh if due, optimizer step with the isolated entries left exactly unchanged."""
        grads = [(n, p.grad) for n, p in self.params.items() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack(torch._foreach_norm([g for _, g in grads]))).all():
            self.skipped_steps += 1
            warnings.warn(f"EvolvingIsolation: non-finite gradient at step {self.num_steps + 1}; step skipped "
                          f"({self.skipped_steps} so far), importance scores left unchanged")
            return False
        # A parameter without a gradient keeps its score (and the optimizer skips it too).
        emas = [self.scores[n] for n, _ in grads]
        if self.importance is squared_gradient and emas and emas[0].dtype == grads[0][1].dtype:
            torch._foreach_mul_(emas, self.ema_beta)  # fused over all tensors: the common case, fast
            torch._foreach_addcmul_(emas, [g for _, g in grads], [g for _, g in grads], value=1 - self.ema_beta)
        else:
            for ema, (n, g) in zip(emas, grads):
                ema.lerp_(self.importance(self.params[n], g).to(ema.dtype), 1 - self.ema_beta)
        self.num_steps += 1
        if self._due():
            self.refresh()
        self._masked_optimizer_step(optimizer)
        return True

    @torch.no_grad()
    def refresh(self):
        """Recompute the isolated set from the current scores; log its overlap with the previous set."""
        previous = self.isolated if self.history else None
        self._set_isolated(top_fraction(self.scores, self.isolation_ratio, self.normalizer))
        current = self.isolated
        if self._sample:
            self._sample_member = torch.cat([current[n].view(-1)[i] for n, i in self._sample.items()])
        self.history.append({"step": self.num_steps, "isolated_fraction": self.isolated_fraction(),
                             "jaccard_previous": jaccard(previous, current) if previous else None})

    @torch.no_grad()
    def estimated_drift(self):
        """1 - Jaccard between the current isolated set and the one a refresh would pick now, on the sample."""
        values = []
        for n, idx in self._sample.items():
            shift, scale = _affine_stats(self.normalizer, self.scores[n].float())
            values.append((self.scores[n].view(-1)[idx].float() - shift) / scale)
        values = torch.cat(values)
        k = max(1, round(self.isolation_ratio * values.numel()))
        would = values >= torch.kthvalue(values, values.numel() - k + 1).values
        inter, union = int((would & self._sample_member).sum()), int((would | self._sample_member).sum())
        return 1 - inter / union if union else 0.0

    def state_bytes(self):
        """Bytes of EPI state: {"ema", "mask", "total", "per_param"} (excluding the refresh's transient buffer)."""
        ema = sum(s.numel() * s.element_size() for s in self.scores.values())
        mask = sum(t.numel() * t.element_size() for t in self._stored.values())
        n = sum(p.numel() for p in self.params.values())
        return {"ema": ema, "mask": mask, "total": ema + mask, "per_param": (ema + mask) / n}

    def state_dict(self):
        return {**self._mask_state(), "scores": {n: s.clone() for n, s in self.scores.items()},
                "num_steps": self.num_steps, "skipped_steps": self.skipped_steps,
                "history": [dict(h) for h in self.history],
                "sample_member": None if self._sample_member is None else self._sample_member.clone()}

    def load_state_dict(self, state):
        if set(state["scores"]) != set(self.params):
            raise ValueError("importance state does not match these parameters: "
                             f"{sorted(set(state['scores']) ^ set(self.params))[:5]}")
        self._load_mask_state(state)
        for n, s in state["scores"].items():
            if s.shape != self.scores[n].shape or s.dtype != self.scores[n].dtype:
                raise ValueError(f"importance of {n!r}: saved {tuple(s.shape)} {s.dtype}, "
                                 f"expected {tuple(self.scores[n].shape)} {self.scores[n].dtype}")
            self.scores[n].copy_(s)
        self.num_steps, self.skipped_steps = state["num_steps"], state["skipped_steps"]
        self.history = [dict(h) for h in state["history"]]
        member = state["sample_member"]
        self._sample_member = None if member is None else member.to(next(iter(self.params.values())).device)
