"""**Sharded (``--shard``).** Every rank *owns* a contiguous slice of every tensor (:func:`shard_range`:
``torch.chunk`` of the flattened tensor; FSDP2's ``fully_shard`` chunks dim 0, which is also a contiguous
range of the flat tensor, and :func:`sharded_top_fraction` accepts either): it alone keeps that
slice's AdamW moments, importance EMA and isolated indices, and it alone updates the slice; the updated
slices are all-gathered into the replicated model used for forward and backward (ZeRO-1 style:
optimizer and EPI state sharded, parameters and DDP-averaged gradients replicated; FSDP2 would also free
the parameters it does not own between uses, which changes memory, not EPI). EPI's global top-rho over *all* tensors is then the one step that needs every rank:
:func:`~epi_mini.distributed.selection.sharded_top_fraction`.
"""
import torch

from ..methods import EPIUpdate
from ..strategy import UpdateStrategy
from .comm import _all_gather, _all_reduce, assert_same_on_all_ranks
from .selection import shard_range, sharded_top_fraction

class ShardedEvolvingIsolation(EPIUpdate):
    """EPI over this rank's slices of the parameters (``params``: name -> 1-D slice, e.g.
    :attr:`ShardedOptimizer.shards`): the EMA and the isolated set exist for the owned entries only, and a
    refresh (EPI's own :meth:`~epi_mini.epi.EvolvingIsolation.refresh`) selects the global top-rho with
    :func:`sharded_top_fraction` and sums its counts over the ranks. The update of the owned entries, masked
    or not, is exactly what single-process EPI does to them.

    ``isolated``, ``scores`` and :meth:`state_bytes` are this rank's; :meth:`isolated_fraction` and the
    refresh ``history`` are global (all ranks agree on them; both are collectives). ``mask_interval="auto"``
    is not supported (its drift sample would have to be spread over the ranks).
    """

    def __init__(self, params, group=None, **options):
        if options.get("mask_interval") == "auto":
            raise ValueError("mask_interval='auto' is not supported with a sharded EPI state; use an integer "
                             "or 'once'")
        if options.get("normalizer") == "rank":
            raise ValueError("normalizer='rank' is not supported with a sharded EPI state; "
                             "use 'mean', 'max' or 'zscore'")
        super().__init__(params, **options)
        self.group = group

    def select(self):
        return sharded_top_fraction(self.scores, self.isolation_ratio, self.normalizer, self.group)

    def _reduce_counts(self, *counts):
        device = next(iter(self.params.values())).device
        return _all_reduce(torch.tensor(counts, dtype=torch.int64, device=device), group=self.group).tolist()


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

    def load_state_dict(self, state):
        self.state_dict()  # the same message


class ShardedUpdate(UpdateStrategy):
    """The update strategy of the sharded mode, around a strategy over the slices (EPI or plain): slice the
    gradients, let it step the sharded optimizer, all-gather the updated slices into the replicated model.
    The other hooks are the wrapped strategy's."""

    def __init__(self, inner, optimizer, check_sync=False):
        self.inner, self.optimizer, self.check_sync = inner, optimizer, check_sync

    @property
    def history(self):
        """The wrapped EPI's refresh history (empty for plain SFT)."""
        return getattr(self.inner, "history", [])

    def begin_stage(self, stage):
        self.inner.begin_stage(stage)

    def end_stage(self, stage):
        self.inner.end_stage(stage)

    def isolated_fraction(self):
        return self.inner.isolated_fraction()

    def summary(self):
        return self.inner.summary()

    def step(self, optimizer):
        refreshes = len(self.history)
        optimizer.grads_to_shards()
        stepped = self.inner.step(optimizer.inner)
        optimizer.shards_to_model()
        if self.check_sync and len(self.history) > refreshes:
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
