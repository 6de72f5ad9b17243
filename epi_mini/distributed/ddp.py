"""The distributed run: one process per device, each on its slice of every global batch, with DDP (default)
or FSDP2 (``--fsdp``).

Rank ``r`` trains on ``examples[r::N]`` of each global batch (:meth:`MixtureStream.batch`) and the gradients
are averaged over the ranks: all-reduced by DistributedDataParallel, or reduce-scattered by FSDP2 (then each
rank holds the averaged gradient of its shard only). Two details make the run equal to a single process on the
same global batch:

* the loss is normalised by the *global* number of response tokens (:meth:`DistributedRun.loss_on`): a
  per-rank mean would weight a rank with few response tokens as much as one with many;
* the loss value the loop sees is the global mean, identical on every rank, so every rank takes the same
  decision about skipping a non-finite step (a rank that skipped alone would deadlock or diverge).

**DDP**: every rank holds the whole model, sees the same gradient, updates its EMA the same way and selects
the same isolated set: EPI itself runs unchanged on every rank. ``--check-sync`` verifies the claim
"identical on every rank" at every refresh with a cheap checksum all-reduce (:class:`SyncCheck`, combined
with whichever EPI-family strategy the options name).

**FSDP2**: the model is sharded by :func:`~epi_mini.distributed.fsdp.shard_model`, EPI is
:class:`~epi_mini.distributed.fsdp.FSDPEvolvingIsolation` over the local shards, and checkpoints and final
weights are written shard by shard with ``torch.distributed.checkpoint``
(:mod:`~epi_mini.distributed.checkpoint`).
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

from ..methods import EPIUpdate, build_epi, is_plugin
from ..train import Run, pick_device
from .checkpoint import load_sharded_checkpoint, save_sharded_checkpoint, save_sharded_weights
from .comm import _all_gather_object, _all_reduce, assert_same_on_all_ranks, on_rank0
from .fsdp import FSDPEvolvingIsolation, check_fsdp_options, reshard, shard_model

EPI_FAMILY = ("epi", "static-epi", "random-mask")


def check_distributed_options(cfg, fsdp=False, check_sync=False):
    """Raise ``ValueError`` naming the first option of ``cfg`` that a run under torchrun does not support
    (checked before launch, so that no option is silently ignored and none fails mid-run)."""
    if cfg.replay_importance:
        raise ValueError("--replay-importance true is not supported under torchrun: its extra backward pass over "
                         "the replayed rows runs outside DDP and FSDP2, so every rank would see only its own rows "
                         "(and the ranks' collectives would differ); run it with python -m epi_mini")
    if fsdp and cfg.base_importance:
        raise ValueError("--base-importance true is not supported with --fsdp: the base's Fisher is scored on the "
                         "whole model before training; run it under DDP (without --fsdp) or with python -m epi_mini")
    if is_plugin(cfg.method) and (fsdp or check_sync):
        raise ValueError(f"a method of your own ({cfg.method}) runs under torchrun with DDP only: --fsdp needs EPI "
                         "written for the local shards, --check-sync EPI's own state; leave them out")
    if fsdp:
        check_fsdp_options(cfg.method, cfg.mask_interval, cfg.normalizer, check_sync)


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


class SyncCheck:
    """Put before an EPI-family strategy on a DDP replica (``--check-sync``, see
    :func:`epi_mini.methods.build_epi`): at every refresh, check that all ranks hold the same state (debug
    mode: one all-reduce of 8 floats per refresh)."""

    def __init__(self, params, group=None, **options):
        super().__init__(params, **options)
        self.group = group

    @torch.no_grad()
    def refresh(self):
        super().refresh()
        assert_same_on_all_ranks(isolation_checksum(self), f"EPI refresh at step {self.num_steps}", self.group)


class SyncCheckedIsolation(SyncCheck, EPIUpdate):
    """EPI (refreshed every K steps) with the check of :class:`SyncCheck`."""


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

    The model is built as usual (same seed: same initial weights on every rank), then either wrapped in DDP
    as ``forward_model`` or, with ``fsdp=True``, sharded in place with FSDP2 (and the optimizer re-created
    over the shards); rank 0 alone writes files, except the sharded checkpoints and weights, which every rank
    writes its part of. ``fit(run, run.make_strategy())`` trains it.
    """

    def __init__(self, cfg, fsdp=False, check_sync=False, group=None):
        if not dist.is_initialized():
            raise RuntimeError("no process group: call epi_mini.distributed.init_distributed() first, under "
                               "torchrun --nproc_per_node=N -m epi_mini.distributed")
        check_distributed_options(cfg, fsdp, check_sync)
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
        self.group, self.fsdp, self.check_sync = group, fsdp, check_sync
        self.world_sizes = [world_size]  # the world size of every part of the run, in order (see read_checkpoint)
        if fsdp:
            self.forward_model = shard_model(self.model, group)
            self.optimizer = self.model.configure_optimizers(cfg.weight_decay, cfg.learning_rate)  # over the shards
        else:
            self.forward_model = DistributedDataParallel(
                self.model, device_ids=[local_rank] if self.device.type == "cuda" else None, process_group=group)

    def loss_on(self, batch):
        """This rank's share of the global-batch loss: DDP and FSDP2 average gradients over R ranks, so a rank's
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
        """The update strategy of ``cfg.method`` for this rank, with every option of the config
        (:func:`epi_mini.methods.build_epi`): EPI on the local shards under FSDP2, the sync check with
        ``check_sync``; :func:`epi_mini.methods.build_strategy` when nothing distributed is needed."""
        if self.cfg.method in EPI_FAMILY and self.fsdp:
            return build_epi(self, FSDPEvolvingIsolation)
        if self.cfg.method in EPI_FAMILY and self.check_sync:
            return build_epi(self, SyncCheck, group=self.group)
        return super().make_strategy()  # plain SFT needs nothing more under FSDP2: the optimizer steps the shards

    def on_main(self, action):
        return on_rank0(action, self.group)

    def evaluate(self):
        scores = super().evaluate()  # under FSDP2 every rank takes part: each forward all-gathers the weights
        if self.fsdp:
            reshard(self.model)  # the root keeps its weights gathered after a forward without backward
        return scores

    def lm_loss(self):
        loss = super().lm_loss()  # the base's held-out loss: forwards without backward, as in evaluate
        if self.fsdp:
            reshard(self.model)
        return loss

    # Under FSDP2 every rank writes and reads its own shards (epi_mini.distributed.checkpoint). Either way the
    # checkpoint keeps every rank's random number generator (a rank with a smaller slice of the batch draws
    # fewer dropout masks), and the world sizes the seed has trained with.
    def write_checkpoint(self, folder, strategy, state):
        generators = _all_gather_object(torch.get_rng_state(), self.group)
        state = {**state, "torch_rng_by_rank": generators, "world_sizes": self.world_sizes}
        if not self.fsdp:
            return super().write_checkpoint(folder, strategy, state)
        model, optimizer = get_state_dict(self.model, self.optimizer)
        save_sharded_checkpoint(folder, {**state, "world_size": self.world_size, "model": model,
                                         "optimizer": optimizer, "strategy": strategy.state_dict()}, self.group)

    def read_checkpoint(self, folder, strategy):
        if not self.fsdp:
            state = super().read_checkpoint(folder, strategy)
        else:
            model, optimizer = get_state_dict(self.model, self.optimizer)  # the live shards, filled in place
            state = load_sharded_checkpoint(folder, {"model": model, "optimizer": optimizer,
                                                     "strategy": strategy.state_dict()}, self.cfg, self.group)
            if state is not None:
                set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                               optim_state_dict=state["optimizer"])
                strategy.load_state_dict(state["strategy"])
        if state is not None:
            before = state.get("world_sizes", [state.get("world_size", 1)])
            self.world_sizes = before + [self.world_size] * (before[-1] != self.world_size)
            generators = state.get("torch_rng_by_rank")
            if generators is not None and len(generators) == self.world_size:  # fit sets state["torch_rng"]
                state["torch_rng"] = generators[self.rank]
        return state

    def write_weights(self, stem):
        """DDP: ``<stem>.pt`` from rank 0. FSDP2: the DCP folder ``<stem>.dcp/``, every rank writing its
        shards (``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` turns it into one file)."""
        if not self.fsdp:
            return super().write_weights(stem)
        return save_sharded_weights(f"{stem}.dcp", get_model_state_dict(self.model), self.group)


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
