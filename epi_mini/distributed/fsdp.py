"""**EPI on FSDP2 (``--fsdp``).** PyTorch's own fully sharded data parallelism
(``torch.distributed.fsdp.fully_shard``) turns every parameter into a ``DTensor`` sharded on dim 0: rank ``r``
keeps rows ``[r * c, (r + 1) * c)`` (``c = ceil(dim0 / R)``, ``torch.chunk``'s split; the last shards may be
shorter or empty) and ``p.to_local()`` is that shard. Before a block runs, FSDP2 all-gathers its parameters
and frees them afterwards; backward reduce-scatters the gradients, so ``p.grad`` is a ``DTensor`` sharded the
same way, already averaged over the ranks. The optimizer (plain ``torch.optim.AdamW`` over the ``DTensor``
parameters) then keeps its moments for the local shard only.

:class:`FSDPEvolvingIsolation` is EPI on those shards: the importance EMA, the isolated set and the masked
step see only ``p.to_local()`` and ``p.grad.to_local()`` (EPI's ``_tensor`` / ``_grad`` hooks), so the masked
step is exactly single-process EPI's on the local entries: save the isolated entries of the shard, let the
optimizer step, write them back. A dim-0 shard is a contiguous range of the flat tensor and shards follow
each other in rank order, which is what :func:`~epi_mini.distributed.selection.sharded_top_fraction` (the
global top-rho, exact, ties split in global order) needs. EPI gathers nothing: the only all-gathers are
FSDP2's own, of one block's weights at a time.

:func:`shard_model` applies ``fully_shard`` as FSDP2's documentation does: each transformer block, then the
root (embeddings, final LayerNorm and the tied head).
"""
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard

from ..isolation import indices_to_masks
from ..methods import EPIUpdate
from .comm import _all_reduce
from .selection import sharded_top_fraction


def shard_model(model, group=None):
    """Shard a :class:`~epi_mini.model.GPT` in place with FSDP2: ``fully_shard`` on every block, then on the
    root, over a 1-D mesh of ``group``'s ranks (default: all of them). Returns the model (now also an
    ``FSDPModule``). Build the optimizer *after* this call: the parameters are new ``DTensor`` objects."""
    device_type = next(model.parameters()).device.type
    mesh = DeviceMesh.from_group(group if group is not None else dist.group.WORLD, device_type)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reshard(model):
    """Free every all-gathered parameter of an FSDP2 model (the root keeps its parameters unsharded after a
    forward pass, e.g. after an evaluation without backward)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def check_fsdp_options(method="epi", mask_interval=20, normalizer="mean", check_sync=False):
    """Raise ``ValueError`` naming the first option that ``--fsdp`` does not support (checked before launch)."""
    if method == "static":
        raise ValueError("method 'static' (CPI-FT) is not supported with --fsdp: its probe fine-tunes train "
                         "whole-model copies; run it without --fsdp")
    if method == "random-mask":
        raise ValueError("method 'random-mask' is not supported with --fsdp: its random set would have to be drawn "
                         "over the whole model on every rank; run it without --fsdp")
    if check_sync:
        raise ValueError("--check-sync is not supported with --fsdp: it compares state that DDP replicates on "
                         "every rank, and under FSDP2 every rank holds different shards")
    if mask_interval == "auto":
        raise ValueError("mask_interval='auto' is not supported with --fsdp (its drift sample would have to be "
                         "spread over the ranks); use an integer or 'once'")
    if normalizer == "rank":
        raise ValueError("normalizer='rank' is not supported with --fsdp: an entry's rank inside its tensor "
                         "needs a distributed sort; use 'mean', 'max' or 'zscore'")


def _is_dim0_shard(p):
    return isinstance(p, DTensor) and p.device_mesh.ndim == 1 and tuple(p.placements) == (Shard(0),)


class FSDPEvolvingIsolation(EPIUpdate):
    """EPI over the local shards of an FSDP2 model's parameters (``params``: the model or ``(name, DTensor)``
    pairs; every trainable parameter must be a ``DTensor`` sharded on dim 0 over one 1-D mesh).

    ``scores``, ``isolated`` and :meth:`state_bytes` are this rank's (shaped like ``p.to_local()``);
    :meth:`isolated_fraction` and the refresh ``history`` are global (collectives, the same on every rank).
    ``state_dict`` holds the scores and the isolated set as ``DTensor``s sharded like their parameters, for
    ``torch.distributed.checkpoint``; 8-bit scores (``ema_storage="int8"``) as two flat ``DTensor``s, each rank's
    codes and block scales padded to the longest rank's (their layout follows the shards, so they resume
    exactly, with the same number of ranks only). Not supported (:func:`check_fsdp_options`):
    ``mask_interval="auto"`` and ``normalizer="rank"``.

    Non-finite gradients: EPI's own check (:meth:`step`) sees only the local shard; in the training loop it
    never fires, because :func:`~epi_mini.strategy.sft_step` already skips the step on every rank when the
    *global* gradient norm (``clip_grad_norm_`` over the ``DTensor`` gradients) or the global loss is not finite.
    """

    def __init__(self, params, **options):
        check_fsdp_options(mask_interval=options.get("mask_interval"), normalizer=options.get("normalizer"))
        named = list(params.named_parameters() if isinstance(params, torch.nn.Module) else params)
        meshes = set()
        for name, p in named:
            if not p.requires_grad:
                continue
            if not _is_dim0_shard(p):
                kind = f"DTensor with placements {tuple(p.placements)}" if isinstance(p, DTensor) else type(p).__name__
                raise ValueError(f"FSDPEvolvingIsolation: parameter {name!r} is a {kind}, not an FSDP2 shard (a "
                                 "DTensor sharded on dim 0 over a 1-D mesh); apply fully_shard "
                                 "(epi_mini.distributed.shard_model) before building the strategy")
            meshes.add(p.device_mesh)
        if len(meshes) > 1:
            raise ValueError("FSDPEvolvingIsolation: the parameters are sharded over different device meshes; "
                             "the global top-rho needs one group of ranks")
        super().__init__(named, **options)
        self.mesh = next(iter(meshes))
        self.group = self.mesh.get_group()
        if self._ema8 is not None:  # the longest rank's 8-bit buffers: every rank's are padded to them
            self._ema8_lengths = _all_reduce(torch.tensor([self._ema8.codes.numel(), self._ema8.scales.numel()],
                                                          device=self._ema8.codes.device),
                                             dist.ReduceOp.MAX, self.group).tolist()

    def _tensor(self, name):
        return self.params[name].to_local()  # shares storage with the DTensor: writes land in the parameter

    def _grad(self, name):
        grad = self.params[name].grad
        return None if grad is None else grad.to_local()

    def select(self):
        return sharded_top_fraction(self.scores, self.isolation_ratio, self.normalizer, self.group)

    def _reduce_counts(self, *counts):
        device = next(iter(self.scores.values())).device
        return _all_reduce(torch.tensor(counts, dtype=torch.int64, device=device), group=self.group).tolist()

    def _as_dtensor(self, name, local):
        p = self.params[name]
        return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                  run_check=False)

    def _as_flat_dtensor(self, local, length):
        """A 1-D local buffer, padded with zeros to ``length``, as one ``DTensor`` split evenly over the ranks."""
        padded = torch.zeros(length, dtype=local.dtype, device=local.device)
        padded[: local.numel()] = local
        return DTensor.from_local(padded, self.mesh, (Shard(0),), shape=(length * self.mesh.size(),), stride=(1,),
                                  run_check=False)

    def _scores_state(self):
        if self._ema8 is None:
            return {n: self._as_dtensor(n, s.clone()) for n, s in self._scores.items()}
        return {"codes": self._as_flat_dtensor(self._ema8.codes, self._ema8_lengths[0]),
                "scales": self._as_flat_dtensor(self._ema8.scales, self._ema8_lengths[1]), "steps": self._ema8.steps}

    def state_dict(self):
        """The EMA and the isolated set (one uint8 per entry) as ``DTensor``s sharded like their parameters (the
        8-bit EMA: see the class), and the rank-independent counters, rho and history."""
        masks = self.isolated
        state = {"mask_storage": self.mask_storage, "num_steps": self.num_steps, "skipped_steps": self.skipped_steps,
                 "isolation_ratio": self.isolation_ratio, "refresh_next": self._refresh_next,
                 "history": [dict(h) for h in self.history], "scores": self._scores_state(),
                 "isolated": {n: self._as_dtensor(n, masks[n].to(torch.uint8)) for n in self.params}}
        if hasattr(self, "_anchors"):  # the loop's EPIUpdate: the sets its refreshes are compared with, as masks
            # Both kinds always, an absent one as an empty mask with step None: a sharded checkpoint's tensors must
            # be the ones a fresh run's template has (epi_mini.distributed.checkpoint).
            shards = {n: self._tensor(n) for n in self.params}
            state["anchors"] = {k: {"step": self._anchors[k]["step"] if k in self._anchors else None, "isolated": {
                n: self._as_dtensor(n, m.to(torch.uint8)) for n, m in indices_to_masks(
                    self._anchors[k]["set"] if k in self._anchors else {}, shards).items()}}
                for k in ("boundary", "within")}
            state["stage"], state["stage_start"] = self._stage, self._stage_start
        return state

    def load_state_dict(self, state):
        local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
        if set(state["isolated"]) != set(self.params):
            raise ValueError(f"FSDP EPI state: isolated do not match these parameters: "
                             f"{sorted(set(state['isolated']) ^ set(self.params))[:5]}")
        if state["mask_storage"] != self.mask_storage:
            raise ValueError(f"state has mask_storage={state['mask_storage']!r}, this object {self.mask_storage!r}")
        if (self._ema8 is not None) != ("codes" in state["scores"]):
            raise ValueError("the saved importance and this object differ in ema_storage ('int8' or not)")
        isolated = {n: local(m) for n, m in state["isolated"].items()}
        if self._ema8 is not None:
            codes, scales = (local(state["scores"][k]) for k in ("codes", "scales"))
            if (codes.numel(), scales.numel()) != tuple(self._ema8_lengths):
                raise ValueError(f"FSDP EPI 8-bit state on this rank: {codes.numel()} codes, {scales.numel()} scales, "
                                 f"expected {self._ema8_lengths[0]} and {self._ema8_lengths[1]} (another world size?)")
            self._ema8.load_state_dict({"codes": codes[: self._ema8.codes.numel()].clone(),
                                        "scales": scales[: self._ema8.scales.numel()].clone(),
                                        "steps": state["scores"]["steps"]})
        else:
            if set(state["scores"]) != set(self.params):
                raise ValueError(f"FSDP EPI state: scores do not match these parameters: "
                                 f"{sorted(set(state['scores']) ^ set(self.params))[:5]}")
            for n, s in ((n, local(s)) for n, s in state["scores"].items()):
                mine = self._scores[n]
                if s.shape != mine.shape or s.dtype != mine.dtype or isolated[n].shape != mine.shape:
                    raise ValueError(f"FSDP EPI state of {n!r} on this rank: scores {tuple(s.shape)} {s.dtype}, "
                                     f"isolated {tuple(isolated[n].shape)}, expected {tuple(mine.shape)} {mine.dtype}")
                mine.copy_(s)
        self._set_isolated({n: m.reshape(-1).nonzero().squeeze(1).to(torch.int32) for n, m in isolated.items()})
        self.num_steps, self.skipped_steps = state["num_steps"], state["skipped_steps"]
        self.isolation_ratio = state.get("isolation_ratio", self.isolation_ratio)
        self._refresh_next = state.get("refresh_next", False)  # a set_isolation_ratio not yet applied
        self.history = [dict(h) for h in state["history"]]
        if hasattr(self, "_anchors"):
            self._anchors = {k: {"step": a["step"], "set": {n: local(m).reshape(-1).nonzero().squeeze(1).to(torch.int32)
                                                           for n, m in a["isolated"].items()}}
                             for k, a in state.get("anchors", {}).items() if a["step"] is not None}
            self._stage, self._stage_start = state.get("stage", 0), state.get("stage_start", 0)
