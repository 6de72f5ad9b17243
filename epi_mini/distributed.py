"""EPI beyond one process: data-parallel training (DDP) and a sharded EPI state, with ``torch.distributed``.

Launch (one process per GPU, or per CPU socket with gloo; every ``python -m epi_mini`` option works)::

    torchrun --standalone --nproc_per_node=N -m epi_mini.distributed --method epi [--shard] [--check-sync]

**DDP (the default).** Every rank holds the whole model. Rank ``r`` trains on ``examples[r::N]`` of each
global batch (:meth:`MixtureStream.batch`) and DistributedDataParallel averages the gradients, so every
rank sees the same gradient, updates its EMA the same way and selects the same isolated set: EPI itself
runs unchanged on every rank. Two details make the run equal to a single process on the same global batch:

* the loss is normalised by the *global* number of response tokens (:meth:`DistributedRun.loss_on`): a
  per-rank mean would weight a rank with few response tokens as much as one with many;
* the loss value the loop sees is the global mean, identical on every rank, so every rank takes the same
  decision about skipping a non-finite step (a rank that skipped alone would deadlock or diverge).

``--check-sync`` verifies the claim "identical on every rank" at every refresh with a cheap checksum
all-reduce (:class:`SyncCheckedIsolation`) and stops with a clear error if it fails.

**Sharded (``--shard``).** Every rank *owns* a contiguous slice of every tensor (:func:`shard_range`:
``torch.chunk`` of the flattened tensor; FSDP2's ``fully_shard`` chunks dim 0, which is also a contiguous
range of the flat tensor, and :func:`sharded_top_fraction` accepts either): it alone keeps that
slice's AdamW moments, importance EMA and isolated indices, and it alone updates the slice; the updated
slices are all-gathered into the replicated model used for forward and backward (ZeRO-1 style:
optimizer and EPI state sharded, parameters and DDP-averaged gradients replicated; FSDP2 would also free
the parameters it does not own between uses, which changes memory, not EPI). EPI's global top-rho over
*all* tensors is then the one step that needs every rank: :func:`sharded_top_fraction` computes exactly
the selection of :func:`epi_mini.epi.top_fraction` on the whole, unsharded score set without gathering
the scores anywhere:

1. layer-wise normaliser: per-tensor partial statistics are all-reduced (count and sum; the max; for
   z-scores a second round with the sum of squared deviations from the global mean) and turned into the
   same float32 (shift, scale) that :func:`epi_mini.epi.normalize` computes: bit for bit whenever torch's
   float32 reductions over each whole tensor are exact (see :func:`_normalized_local_values` for the
   rare exception: it can only matter for two entries of different tensors within one ulp at the threshold);
2. threshold: exact radix select of the k-th largest value, k = round(rho * N). Floats are mapped to
   integer keys with the same order (:func:`order_preserving_keys`); each round all-reduces a histogram
   of the next ``bits_per_round`` bits of the candidates' keys and fixes those bits of the threshold;
3. ties: entries tied at the threshold are taken in global flat order (tensors in dict order, then
   element index). When some but not all of them are taken, one all-gather of every rank's per-tensor tie
   counts tells each rank how many ties come before its own.

Communication per refresh of the sharded selection, per rank (T tensors, R ranks, b = ``bits_per_round`` = 8).
It does not depend on N, the number of parameters. "Payload" is the buffer a rank hands to a collective (a
ring all-reduce of p bytes moves about 2p(R-1)/R bytes per rank); an all-gather brings back R payloads:

==============  ====================================  ===============================================
step            rounds                                payload per rank
==============  ====================================  ===============================================
statistics      1, +1 for ``max`` or ``zscore``       16 T bytes, +8 T
radix select    32 / b = 4                            2**b * 8 = 2 KiB each, 8 KiB in all
tie split       1, only if some but not all of the    8 T bytes, all-gathered (8 T R bytes come back)
                entries tied at the threshold are
                taken
refresh log     1 (EPI's refresh history)             32 bytes: isolated count, Jaccard with previous
==============  ====================================  ===============================================

In all: 5 to 7 rounds (+1 for the log) and 16T + 8192 to 32T + 8192 bytes of payload. For the ``cpu``
preset's model (T = 40, N = 364k) that is 8.8 to 9.5 KB, against 1.46 MB (4 N) to all-gather every fp32
score; for the ``gpu`` preset (T = 76, N = 4.8 M), 9.4 to 10.6 KB against 19 MB. :func:`selection_cost`
returns these figures and ``benchmarks/distributed_comm.py`` prints and measures them. Per training step,
DDP all-reduces the gradients (4 N bytes of payload in fp32) plus 16 bytes (global token count and loss);
``--shard`` adds one all-gather of the updated slices (4 N / R bytes of payload, 4 N come back).

The single-process path does not use this module: ``python -m epi_mini`` runs exactly as before.
"""
import io
import math
import os
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .epi import EPS, EvolvingIsolation
from .methods import build_strategy, epi_options, epi_summary
from .train import PlainUpdate, Run, fit, pick_device

# --- communication: every collective of this module goes through these two helpers ------------------------
_comm_log = None  # a list while count_communication() is active: (operation, payload bytes) per collective


@contextmanager
def count_communication():
    """Record every collective this module issues: ``with count_communication() as log: ...`` leaves a list
    of ``(operation, payload_bytes)`` in ``log`` (used by the tests and the benchmark to check the
    documented costs)."""
    global _comm_log
    _comm_log, previous = [], _comm_log
    try:
        yield _comm_log
    finally:
        _comm_log = previous


def _all_reduce(tensor, op=dist.ReduceOp.SUM, group=None):
    if _comm_log is not None:
        _comm_log.append(("all_reduce", tensor.numel() * tensor.element_size()))
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _all_gather(tensor, group=None):
    """Every rank's ``tensor`` (all the same shape), stacked: shape ``(R, *tensor.shape)``."""
    if _comm_log is not None:
        _comm_log.append(("all_gather", tensor.numel() * tensor.element_size()))
    out = torch.empty((dist.get_world_size(group), *tensor.shape), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather(list(out.unbind(0)), tensor, group=group)  # rows of one buffer: no copies afterwards
    return out


def shard_range(numel, rank, world_size):
    """The flat range ``[start, end)`` of a ``numel``-entry tensor that ``rank`` owns: ``torch.chunk``'s split
    (chunks of ceil(numel / R) entries, the last ones shorter or empty). Ranks own consecutive ranges in rank
    order, which is what the tie rule of :func:`sharded_top_fraction` relies on."""
    chunk = -(-numel // world_size)
    start = min(rank * chunk, numel)
    return start, min(start + chunk, numel)


# --- exact global top-rho over sharded scores -------------------------------------------------------------
def order_preserving_keys(values):
    """float32 -> int64 keys in [0, 2**32) with ``a < b`` exactly when ``key(a) < key(b)``, and equal keys
    for equal values (finite values and infinities; scores are never NaN: EPI skips non-finite steps).

    The IEEE-754 bit pattern of a non-negative float, read as an integer, already grows with the value;
    for negative floats it grows with the *magnitude*, so their order is reversed. Adding ``2**31`` to the
    non-negative patterns and reflecting the negative ones below them gives one increasing scale. ``-0.0``
    equals ``+0.0`` as a float but not as a bit pattern, so it is turned into ``+0.0`` first (``x + 0.0``).
    """
    bits = (values.float() + 0.0).view(torch.int32).to(torch.int64)  # sign bit set <=> bits < 0
    magnitude = bits & 0x7FFFFFFF
    return torch.where(bits >= 0, bits + 2**31, 2**31 - 1 - magnitude)


def _normalized_local_values(local_scores, normalizer, group):
    """This rank's scores, layer-normalised with the statistics of the *whole* tensors, in one flat float32
    buffer (tensors in dict order); and the global number of entries.

    The (shift, scale) of each tensor is built with the same float32 operations as
    :func:`epi_mini.epi.normalize`, from all-reduced partial sums kept in float64. Whenever torch's own
    float32 reductions over the whole tensor are exact (e.g. integer or few-bit scores, the tie-heavy case)
    the normalised values are bit-identical to the single-process ones, so the selection is too. For general
    floats, torch's float32 sum rounds differently from the float64 one (a few ulps): a tensor's normalised
    values may then differ by an ulp, which changes the selection only if two entries of *different* tensors
    lie within an ulp of each other at the threshold.
    """
    tensors = [s.detach().reshape(-1).float() for s in local_scores.values()]
    device = tensors[0].device
    count_and_sum = torch.tensor([[t.numel(), t.double().sum().item()] for t in tensors], dtype=torch.float64,
                                 device=device)
    count_and_sum = _all_reduce(count_and_sum, group=group)  # round 1: (count, sum) of each tensor
    counts = [int(c) for c in count_and_sum[:, 0].tolist()]
    if normalizer is None:  # raw scores (core_region's use of top_fraction)
        return torch.cat(tensors), sum(counts)
    # torch's float32 mean of a whole tensor is (float32 sum) / numel: the same operation on the global sum.
    means = [torch.tensor(s, dtype=torch.float32, device=device).div_(n) for s, n in
             zip(count_and_sum[:, 1].tolist(), counts)]
    if normalizer == "mean":
        shifts, scales = [0.0] * len(tensors), [m + EPS for m in means]
    elif normalizer == "max":
        local_max = torch.tensor([t.max().item() if t.numel() else -math.inf for t in tensors],
                                 dtype=torch.float64, device=device)
        global_max = _all_reduce(local_max, dist.ReduceOp.MAX, group)  # round 2
        shifts = [0.0] * len(tensors)
        scales = [torch.tensor(m, dtype=torch.float32, device=device) + EPS for m in global_max.tolist()]
    elif normalizer == "zscore":
        # torch.std of a float32 tensor on the CPU: the float32 mean, then sum((x - mean)**2) in float64,
        # divided by numel - 1, square root, rounded to float32. Round 2 all-reduces the sums of squares.
        squares = torch.tensor([((t.double() - m.double()) ** 2).sum().item() for t, m in zip(tensors, means)],
                               dtype=torch.float64, device=device)
        squares = _all_reduce(squares, group=group)
        shifts = means
        scales = [(torch.tensor(math.sqrt(sq / (n - 1)), dtype=torch.float32, device=device) if n > 1 else 0.0)
                  + EPS for sq, n in zip(squares.tolist(), counts)]
    else:
        raise ValueError(f"unknown normalizer {normalizer!r}")
    flat = torch.empty(sum(t.numel() for t in tensors), device=device)
    for t, chunk, shift, scale in zip(tensors, flat.split([t.numel() for t in tensors]), shifts, scales):
        torch.sub(t, shift, out=chunk).div_(scale)  # exactly epi.normalize's two operations
    return flat, sum(counts)


def _kth_largest_key(keys, k, group, bits_per_round):
    """The k-th largest key over all ranks, by radix select, most significant digit first.

    Invariant: the threshold's bits above the current digit are fixed (``prefix``), ``candidates`` are this
    rank's keys that share them, and the threshold is the ``remaining``-th largest candidate over all
    ranks. One all-reduced histogram of the candidates' next digit fixes that digit: it is the largest
    digit ``d`` such that at least ``remaining`` candidates have a digit >= ``d``; candidates with a larger
    digit are above the threshold (taken), those with a smaller one below it (dropped).

    Returns ``(threshold_key, ties_to_take, ties_total)``: how many of the entries equal to the threshold
    are selected, and how many there are over all ranks.
    """
    digits = 1 << bits_per_round
    prefix, remaining, candidates = 0, k, keys
    for shift in range(32 - bits_per_round, -1, -bits_per_round):
        digit = (candidates >> shift) & (digits - 1)
        histogram = _all_reduce(torch.bincount(digit, minlength=digits), group=group)
        at_or_above = histogram.flip(0).cumsum(0).flip(0)  # at_or_above[d] = candidates with digit >= d
        d = int((at_or_above >= remaining).nonzero().max())
        remaining -= int(at_or_above[d] - histogram[d])  # the candidates with a larger digit are all taken
        prefix |= d << shift
        candidates = candidates[digit == d]
    return prefix, remaining, int(histogram[d])


def ties_taken_by_rank(tie_counts, rank, ties_to_take):
    """How many of its tied entries ``rank`` takes in each tensor, from every rank's per-tensor tie counts
    (``tie_counts[r, t]``), so that the first ``ties_to_take`` ties in global flat order are taken.

    Global flat order visits tensor 0 on ranks 0..R-1 (each rank's slice follows the previous rank's), then
    tensor 1 on ranks 0..R-1, and so on; a rank takes the leading ties of its slice that fall within the
    first ``ties_to_take`` of that order.
    """
    in_order = tie_counts.t().reshape(-1)                                       # (T * R,): tensor-major
    before = (in_order.cumsum(0) - in_order).view(tie_counts.shape[1], -1)[:, rank]  # ties preceding ours
    return (ties_to_take - before).clamp(min=0).minimum(tie_counts[rank])


def sharded_top_fraction(local_scores, ratio, normalizer="mean", group=None, bits_per_round=8):
    """The selection of :func:`epi_mini.epi.top_fraction` on the union of every rank's scores, computed
    without gathering them: name -> int32 indices *into this rank's slice* of the chosen entries.

    ``local_scores``: name -> this rank's slice of each tensor's scores (any shape, read flat), the same
    names in the same order on every rank; rank ``r``'s slice of a tensor must precede rank ``r + 1``'s
    (e.g. :func:`shard_range`; empty slices are fine). Exactly ``round(ratio * N)`` entries are chosen
    over all ranks (N: all entries of all ranks); entries tied at the threshold are taken in global flat
    order. ``normalizer``: ``"mean"``, ``"max"``, ``"zscore"`` or ``None``; ``"rank"`` is not supported.
    Communication: see the module docstring and :func:`selection_cost`; it does not grow with N.
    """
    if 32 % bits_per_round:
        raise ValueError(f"bits_per_round must divide 32 (1, 2, 4, 8 or 16), got {bits_per_round!r}")
    if normalizer == "rank":  # checked before any communication, so that every rank fails the same way
        raise ValueError("normalizer='rank' is not supported with sharded scores: an entry's rank inside its "
                         "tensor needs a distributed sort of that tensor; use 'mean', 'max' or 'zscore'")
    if normalizer not in (None, "mean", "max", "zscore"):
        raise ValueError(f"unknown normalizer {normalizer!r}")
    names = list(local_scores)
    if not names:
        raise ValueError("no scores given")
    sizes = [s.numel() for s in local_scores.values()]
    values, total = _normalized_local_values(local_scores, normalizer, group)
    k = round(ratio * total)
    if not 0 <= k <= total:
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    chosen = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if k > 0:
        keys = order_preserving_keys(values)
        threshold, ties_to_take, ties_total = _kth_largest_key(keys, k, group, bits_per_round)
        chosen = keys > threshold
        tied = keys == threshold
        tied_per_tensor = [t.sum() for t in tied.split(sizes)]
        take = tied_per_tensor  # every tie is chosen: their order does not matter
        if ties_to_take < ties_total:
            counts = _all_gather(torch.stack(tied_per_tensor).to(torch.int64), group)  # (R, T)
            take = ties_taken_by_rank(counts, dist.get_rank(group), ties_to_take)
        for chosen_part, tied_part, n in zip(chosen.split(sizes), tied.split(sizes), take):
            chosen_part[tied_part.nonzero().squeeze(1)[: int(n)]] = True
    return {name: part.nonzero().squeeze(1).to(torch.int32) for name, part in zip(names, chosen.split(sizes))}


def selection_cost(num_tensors, world_size, normalizer="mean", bits_per_round=8, ties_split=True):
    """Collectives of one :func:`sharded_top_fraction` call, per rank: ``{"rounds", "payload_bytes",
    "received_bytes"}``. Payload: the bytes of the buffers this rank hands to the collectives; received:
    the size of what the tie all-gather brings back (R payloads; 0 when ties are not split). Independent
    of the number of parameters. Assumes k > 0 (k = 0 costs only the first round)."""
    T, R = num_tensors, world_size
    extra_stats = normalizer in ("max", "zscore")
    radix_rounds = 32 // bits_per_round
    rounds = 1 + extra_stats + radix_rounds + ties_split
    payload = 16 * T + 8 * T * extra_stats + radix_rounds * 8 * (1 << bits_per_round) + 8 * T * ties_split
    return {"rounds": rounds, "payload_bytes": payload, "received_bytes": 8 * T * R * ties_split}


# --- checks and strategies --------------------------------------------------------------------------------
def assert_same_on_all_ranks(values, where, group=None):
    """Raise ``RuntimeError`` unless every rank holds the same ``values`` (name -> float).

    One all-reduce of ``(v, -v)`` with MAX gives the largest and (minus) the smallest value of each entry
    over all ranks: they are equal exactly when every rank agrees.
    """
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    v = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    both = _all_reduce(torch.cat([v, -v]), dist.ReduceOp.MAX, group)
    largest, smallest = both[: len(v)].tolist(), (-both[len(v):]).tolist()
    differ = [f"{name} from {lo!r} to {hi!r}" for name, lo, hi in zip(values, smallest, largest) if lo != hi]
    if differ:
        raise RuntimeError(
            f"{where}: the ranks disagree ({'; '.join(differ)}). Under DDP every rank receives the same averaged "
            "gradient, so the weights, the importance EMA and the isolated set must be identical on every rank. "
            "Look for a rank that skipped a step the others took, a parameter changed outside DDP, a "
            "nondeterministic kernel, or ranks started with different options.")


def isolation_checksum(strategy):
    """A few floats that summarise an :class:`EvolvingIsolation`'s state: cheap to all-reduce, and different
    (with overwhelming probability) when the scores, the isolated set or the weights differ."""
    isolated_count, index_hash = 0, 0
    for i, mask in enumerate(strategy.isolated.values()):
        idx = mask.view(-1).nonzero().squeeze(1)
        isolated_count += idx.numel()
        # A multiplicative mix of (position, tensor number), kept below 2**31 so that the sum over up to
        # 2**22 tensors stays an exact integer in float64.
        index_hash += int(((idx * 1_000_003 + i) % 2_147_483_647).sum()) % 2_147_483_647
    return {"importance sum": float(sum(s.double().sum() for s in strategy.scores.values())),
            "parameter sum": float(sum(p.detach().double().sum() for p in strategy.params.values())),
            "isolated count": float(isolated_count), "isolated index hash": float(index_hash)}


class SyncCheckedIsolation(EvolvingIsolation):
    """EPI on a DDP replica that checks, at every refresh, that all ranks hold the same state (debug mode:
    one all-reduce of 8 floats per refresh)."""
    summary = epi_summary

    def __init__(self, params, group=None, **options):
        super().__init__(params, **options)
        self.group = group

    @torch.no_grad()
    def refresh(self):
        super().refresh()
        assert_same_on_all_ranks(isolation_checksum(self), f"EPI refresh at step {self.num_steps}", self.group)


class ShardedEvolvingIsolation(EvolvingIsolation):
    """EPI over this rank's slices of the parameters (``params``: name -> 1-D slice, e.g.
    :attr:`ShardedOptimizer.shards`): the EMA and the isolated set exist for the owned entries only, and a
    refresh selects the global top-rho with :func:`sharded_top_fraction`. The update of the owned entries,
    masked or not, is exactly what single-process EPI does to them.

    ``isolated``, ``scores`` and :meth:`state_bytes` are this rank's; :meth:`isolated_fraction` and the
    refresh ``history`` are global (all ranks agree on them). ``mask_interval="auto"`` is not supported (its
    drift sample would have to be spread over the ranks).
    """
    summary = epi_summary

    def __init__(self, params, group=None, **options):
        if options.get("mask_interval") == "auto":
            raise ValueError("mask_interval='auto' is not supported with a sharded EPI state; use an integer "
                             "or 'once'")
        if options.get("normalizer") == "rank":
            raise ValueError("normalizer='rank' is not supported with a sharded EPI state; "
                             "use 'mean', 'max' or 'zscore'")
        super().__init__(params, **options)
        self.group = group

    def _global_counts(self, *counts):
        """Sums over all ranks of a few integers (one all-reduce)."""
        device = next(iter(self.params.values())).device
        return _all_reduce(torch.tensor(counts, dtype=torch.int64, device=device), group=self.group).tolist()

    @torch.no_grad()
    def refresh(self):
        previous = self.isolated if self.history else None
        self._set_isolated(sharded_top_fraction(self.scores, self.isolation_ratio, self.normalizer, self.group))
        current = self.isolated
        inter = sum(int((previous[n] & current[n]).sum()) for n in current) if previous else 0
        union = sum(int((previous[n] | current[n]).sum()) for n in current) if previous else 0
        isolated = sum(int(m.sum()) for m in current.values())
        entries = sum(p.numel() for p in self.params.values())
        isolated, entries, inter, union = self._global_counts(isolated, entries, inter, union)
        self.history.append({"step": self.num_steps, "isolated_fraction": isolated / entries,
                             "jaccard_previous": (inter / union if union else 1.0) if previous else None})

    def isolated_fraction(self):
        """Over all ranks (a collective: every rank must call it)."""
        isolated = sum(int(self._indices(n).numel()) for n in self._stored)
        isolated, entries = self._global_counts(isolated, sum(p.numel() for p in self.params.values()))
        return isolated / entries


class ShardedOptimizer:
    """The replicated model's optimizer, re-created over this rank's slices of every parameter (same class,
    same parameter groups and hyper-parameters), so its state (AdamW's two moments) is sharded too.

    The training loop sees it as ``run.optimizer``: it sets the learning rate through ``param_groups`` and
    calls ``zero_grad``; :class:`ShardedUpdate` moves gradients in and updated slices out.
    """

    def __init__(self, model, replicated_optimizer, rank, world_size, group=None):
        self.group, self.world_size = group, world_size
        self.full = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.ranges = {n: shard_range(p.numel(), rank, world_size) for n, p in self.full.items()}
        self.shards = {n: torch.nn.Parameter(p.detach().reshape(-1)[a:b].clone())
                       for (n, p), (a, b) in zip(self.full.items(), self.ranges.values())}
        shard_of = {id(p): self.shards[n] for n, p in self.full.items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [shard_of[id(p)] for p in g["params"]]}
                  for g in replicated_optimizer.param_groups]
        self.inner = type(replicated_optimizer)(groups)  # every option is in the groups

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self, set_to_none=True):
        self.inner.zero_grad(set_to_none=set_to_none)
        for p in self.full.values():  # DDP accumulates into existing .grad: the replicas' too must be cleared
            p.grad = None

    def grads_to_shards(self):
        """Each slice's gradient: a view of the replicated (DDP-averaged, clipped) gradient."""
        for (n, p), (a, b) in zip(self.full.items(), self.ranges.values()):
            self.shards[n].grad = None if p.grad is None else p.grad.reshape(-1)[a:b]

    def gather(self, local):
        """name -> this rank's slice (1-D) to name -> the whole flat tensor, on every rank: one all-gather of
        all tensors packed together, each slice padded to the chunk length ``ceil(numel / R)``."""
        chunks = {n: -(-p.numel() // self.world_size) for n, p in self.full.items()}
        first = next(iter(local.values()))
        packed = torch.zeros(sum(chunks.values()), dtype=first.dtype, device=first.device)
        for part, n in zip(packed.split(list(chunks.values())), chunks):
            part[: local[n].numel()] = local[n]
        rows = _all_gather(packed, self.group)  # (R, sum of chunks): row r is rank r's packed slices
        out, offset = {}, 0
        for n, chunk in chunks.items():  # rank r's slice of n starts at r * chunk: read the rows in order
            out[n] = rows[:, offset:offset + chunk].reshape(-1)[: self.full[n].numel()]
            offset += chunk
        return out

    @torch.no_grad()
    def shards_to_model(self):
        """Write every rank's updated slices into the replicated parameters."""
        for n, flat in self.gather({n: s.detach() for n, s in self.shards.items()}).items():
            self.full[n].view(-1).copy_(flat)

    def state_dict(self):
        raise NotImplementedError("checkpoints of the sharded mode are not implemented (each rank holds a "
                                  "different slice of the optimizer state)")

    load_state_dict = state_dict


class ShardedUpdate:
    """The update strategy of the sharded mode, around a strategy over the slices (EPI or plain): slice the
    gradients, let it step the sharded optimizer, all-gather the updated slices into the replicated model.
    Everything else (``isolated_fraction``, ``summary``, ...) is the wrapped strategy's."""

    def __init__(self, inner, optimizer, check_sync=False):
        self.inner, self.optimizer, self.check_sync = inner, optimizer, check_sync

    def step(self, optimizer):
        refreshes = len(getattr(self.inner, "history", ()))
        optimizer.grads_to_shards()
        stepped = self.inner.step(optimizer.inner)
        optimizer.shards_to_model()
        if self.check_sync and len(getattr(self.inner, "history", ())) > refreshes:
            # The EPI state differs between ranks by design here; the replicated weights must not.
            total = float(sum(p.detach().double().sum() for p in optimizer.full.values()))
            assert_same_on_all_ranks({"parameter sum": total}, f"sharded EPI refresh at step {self.inner.num_steps}",
                                     optimizer.group)
        return stepped

    def gather_isolated(self):
        """The whole isolated set on every rank, name -> bool tensor shaped like the parameter (for tests and
        inspection: it moves N bytes)."""
        local = {n: m.view(-1).to(torch.uint8) for n, m in self.inner.isolated.items()}
        return {n: flat.bool().view_as(self.optimizer.full[n]) for n, flat in self.optimizer.gather(local).items()}

    def __getattr__(self, name):  # only called for attributes ShardedUpdate itself lacks
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


# --- the distributed run ----------------------------------------------------------------------------------
class _GlobalLossValue(torch.autograd.Function):
    """Forward: the global mean loss (the same value on every rank). Backward: the gradient flows to this
    rank's share of the loss, as if the share itself had been returned.

    The loop uses the loss *value* to log it and to decide whether a step is finite; both must be the
    global, rank-independent value. The *gradient* must be that of this rank's share, for DDP to sum.
    """

    @staticmethod
    def forward(ctx, share, global_mean):
        return global_mean.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class DistributedRun(Run):
    """A :class:`~epi_mini.train.Run` for one rank of a process group (call :func:`init_distributed` first).

    The model is built as usual (same seed: same initial weights on every rank; DDP also broadcasts rank 0's
    weights) and wrapped in DDP as ``forward_model``; rank 0 alone writes outputs. With ``shard=True`` the
    optimizer becomes a :class:`ShardedOptimizer` over this rank's slices. ``fit(run, run.make_strategy())``
    trains it.
    """

    def __init__(self, cfg, shard=False, check_sync=False, group=None):
        if not dist.is_initialized():
            raise RuntimeError("no process group: call epi_mini.distributed.init_distributed() first, under "
                               "torchrun --nproc_per_node=N -m epi_mini.distributed")
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        if cfg.batch_size < world_size:
            raise ValueError(f"invalid batch_size={cfg.batch_size}: must be >= the number of processes "
                             f"({world_size}), each rank trains on its slice of every batch")
        device = pick_device(cfg.device)
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if device.type == "cuda":
            if device.index is not None and world_size > 1:
                raise ValueError(f"invalid device={cfg.device!r} under torchrun: each rank uses cuda:LOCAL_RANK; "
                                 "pass --device cuda or auto")
            torch.cuda.set_device(local_rank)  # torch.device("cuda") now means this rank's GPU
        elif device.type != "cpu":
            raise ValueError(f"device {device.type!r} has no torch.distributed backend; use --device cpu or cuda")
        super().__init__(cfg)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.group, self.sharded, self.check_sync = group, shard, check_sync
        self.forward_model = DistributedDataParallel(
            self.model, device_ids=[local_rank] if self.device.type == "cuda" else None, process_group=group)
        if shard:
            self.optimizer = ShardedOptimizer(self.model, self.optimizer, rank, world_size, group)

    def loss_on(self, batch):
        """This rank's share of the global-batch loss: DDP averages gradients over R ranks, so a rank's
        loss must be ``R * (sum of its masked token losses) / (response tokens of the whole global batch)``
        for the average to be the single-process gradient of the global mean. One all-reduce of two float64.
        """
        x, y, mask = (t.to(self.device) for t in (batch.x, batch.y, batch.loss_mask))
        _, local_mean = self.forward_model(x, y, mask)
        local_count = mask.sum()
        local_sum = local_mean * local_count.clamp(min=1.0)  # forward returned sum / max(count, 1)
        totals = _all_reduce(torch.stack([local_sum.detach(), local_count]).double(), group=self.group)
        global_count = totals[1].clamp(min=1.0)
        share = local_sum * (self.world_size / global_count).to(local_sum.dtype)
        return _GlobalLossValue.apply(share, (totals[0] / global_count).to(local_sum.dtype))

    def make_strategy(self):
        """The update strategy of ``cfg.method`` for this rank (:func:`epi_mini.methods.build_strategy` when
        nothing distributed is needed)."""
        cfg, is_epi = self.cfg, self.cfg.method in ("epi", "static-epi")
        if self.sharded:
            if cfg.method == "static":
                raise ValueError("method 'static' (CPI-FT) is not supported with --shard: its probe fine-tunes "
                                 "train whole-model copies; run it without --shard")
            inner = ShardedEvolvingIsolation(list(self.optimizer.shards.items()), self.group, **epi_options(cfg)) \
                if is_epi else PlainUpdate()
            return ShardedUpdate(inner, self.optimizer, self.check_sync)
        if is_epi and self.check_sync:
            return SyncCheckedIsolation(self.model, self.group, **epi_options(cfg))
        return build_strategy(self)


def init_distributed(backend="auto", device="auto", timeout_s=600):
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK). ``backend="auto"``: NCCL when ``device`` resolves to CUDA, else gloo.
    Returns ``(rank, world_size)``."""
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"environment variables {missing} are not set: launch with "
                           "torchrun --standalone --nproc_per_node=N -m epi_mini.distributed ...")
    if backend == "auto":
        backend = "nccl" if pick_device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


# --- entry point: torchrun --nproc_per_node=N -m epi_mini.distributed [python -m epi_mini options] ----------
def build_parser():
    from .cli import build_parser as single_process_parser
    p = single_process_parser()
    p.prog = "torchrun --standalone --nproc_per_node=N -m epi_mini.distributed"
    p.description = ("Train with N processes: each trains on its slice of every global batch (DDP). Options as "
                     "for python -m epi_mini; rank 0 writes the outputs.")
    p.add_argument("--shard", action="store_true",
                   help="each rank keeps the optimizer and EPI state of its slice of every tensor only "
                        "(ZeRO-1 style; EPI's global top-rho by an exact distributed selection)")
    p.add_argument("--check-sync", action="store_true",
                   help="debug: at every EPI refresh, check with a checksum all-reduce that all ranks agree")
    p.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                   help="torch.distributed backend (auto: nccl on CUDA, else gloo)")
    return p


def main(argv=None):
    import json

    from .checkpoint import CheckpointError, atomic_write_bytes, save_json
    from .cli import config_overrides, print_summary, summarize_runs
    from .config import make_config
    from .tasks import DataFormatError
    args = build_parser().parse_args(argv)
    overrides = config_overrides(args)
    try:
        configs = [make_config(args.preset, seed=s, **overrides) for s in args.seeds]
        if args.shard and (args.checkpoint_every or args.resume):
            raise ValueError("--checkpoint-every and --resume are not supported with --shard")
        if args.resume and not Path(args.resume).is_dir():
            raise ValueError(f"invalid --resume={args.resume!r}: no such output folder")
        rank, _ = init_distributed(args.backend, configs[0].device)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.resume or args.out or f"runs/{configs[0].method}-{configs[0].schedule}")
    records = []
    try:
        for cfg in configs:
            path = out / f"seed{cfg.seed}.json"
            if args.resume and path.exists():  # a finished seed (every rank reads the same file)
                records.append(json.loads(path.read_text()))
                continue
            run = DistributedRun(cfg, shard=args.shard, check_sync=args.check_sync)
            ckpt = out / f"checkpoint-seed{cfg.seed}" if args.checkpoint_every else None
            record = fit(run, run.make_strategy(), progress=not args.no_progress, checkpoint_dir=ckpt,
                         checkpoint_every=args.checkpoint_every, resume=bool(args.resume))
            record["distributed"] = {"world_size": run.world_size, "backend": dist.get_backend(),
                                     "sharded": args.shard}
            if run.is_main:
                buffer = io.BytesIO()
                torch.save(run.model.state_dict(), buffer)
                atomic_write_bytes(out / f"seed{cfg.seed}.pt", buffer.getvalue())
                save_json(path, record)
            records.append(record)
        if rank == 0:
            summary = summarize_runs(records)
            save_json(out / "summary.json", summary)
            print_summary(summary, records)
            print(f"\nwrote {out}/: seed<N>.json/.pt, summary.json")
        dist.barrier()  # leave together: a gloo peer that exits mid-message can abort the others
    except (ValueError, FileNotFoundError, CheckpointError, DataFormatError) as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
