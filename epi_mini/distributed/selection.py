"""Exact global top-rho over scores that are spread across ranks, without gathering them.

:func:`sharded_top_fraction` computes exactly
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
DDP all-reduces the gradients (4 N bytes of payload in fp32) plus 16 bytes (global token count and loss).
FSDP2 (``--fsdp``) all-gathers each block's weights for forward and again for backward (4 N / R bytes of
payload, 4 N come back, each time; the root's only once) and reduce-scatters the gradients (4 N of payload,
4 N / R come back), plus the same 16 bytes.
"""
import math

import torch
import torch.distributed as dist

from ..epi import EPS
from .comm import _all_gather, _all_reduce

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
