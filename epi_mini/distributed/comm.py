"""Every collective of :mod:`epi_mini.distributed` goes through here, so it can be counted and checked
(torch.distributed.checkpoint's own, and the barrier before the process group is destroyed, aside)."""
from contextlib import contextmanager

import torch
import torch.distributed as dist

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


def _all_gather_object(value, group=None):
    """Every rank's picklable ``value``, in rank order (``[value]`` when no process group exists); for the
    checkpoints' bookkeeping (checksums, random generator states), not counted."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


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


def on_rank0(action, group=None):
    """``action()`` on rank 0 only, and its result there; when it raises, every rank raises an exception of
    the same type and message (one broadcast tells them), so that no rank goes on to wait in a collective for
    rank 0, which has stopped. For what only rank 0 does: write a file, take the output folder's lock. (Not
    counted by :func:`count_communication`, which counts EPI's own collectives.)"""
    rank0 = dist.get_rank(group) == 0
    result, error, outcome = None, None, [None]
    if rank0:
        try:
            result = action()
        except Exception as e:
            error, outcome = e, [(type(e), str(e))]
    dist.broadcast_object_list(outcome, src=0 if group is None else dist.get_global_rank(group, 0), group=group)
    if error is not None:
        raise error
    if outcome[0] is not None:
        kind, message = outcome[0]
        try:
            failure = kind(message)
        except Exception:  # an exception type that cannot be built from its message alone
            failure = RuntimeError(f"{kind.__name__} on rank 0: {message}")
        raise failure
    return result
