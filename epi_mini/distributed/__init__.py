"""EPI beyond one process: data parallel (DDP) and fully sharded (PyTorch FSDP2), with ``torch.distributed``.

Launch (one process per GPU, or per CPU socket with gloo; every ``python -m epi_mini`` option is honoured or,
before launch, refused with a message: :func:`~.ddp.check_distributed_options`)::

    torchrun --standalone --nproc_per_node=N -m epi_mini.distributed --method epi [--fsdp] [--check-sync]

**DDP (the default)** (:mod:`.ddp`): every rank holds the whole model and trains on its slice of each
global batch; DDP averages the gradients, so EPI runs unchanged on every rank. ``--check-sync`` verifies at
every refresh that all ranks agree.

**FSDP2 (``--fsdp``; ``--shard`` is the same)** (:mod:`.fsdp`): ``fully_shard`` on every block and on the
root; every parameter is a ``DTensor`` and each rank keeps only its dim-0 shard of the weights, of the
(reduce-scattered) gradients, of AdamW's moments and of EPI's importance EMA and isolated set. EPI's masked
step runs on the local shards around FSDP2's own optimizer step; its global top-rho is found by an exact
distributed selection (:mod:`.selection`) that never gathers the scores. Checkpoints and final weights are
written shard by shard with ``torch.distributed.checkpoint`` (:mod:`.checkpoint`), every file with its
sha256, and read back without running code; resume is exact.

The modules, in reading order: :mod:`.comm` (every collective, counted), :mod:`.selection` (exact top-rho
over sharded scores), :mod:`.fsdp` (EPI on FSDP2 shards), :mod:`.checkpoint` (sharded checkpoints),
:mod:`.ddp` (the distributed run, DDP or FSDP2), :mod:`.launch` (the command line). The single-process path
does not use this package: ``python -m epi_mini`` runs no distributed code.
"""
from .checkpoint import load_sharded_checkpoint, save_sharded_checkpoint, save_sharded_weights
from .comm import assert_same_on_all_ranks, count_communication
from .ddp import (DistributedRun, SyncCheck, SyncCheckedIsolation, check_distributed_options, init_distributed,
                  isolation_checksum)
from .fsdp import FSDPEvolvingIsolation, check_fsdp_options, reshard, shard_model
from .launch import build_parser, main
from .selection import order_preserving_keys, selection_cost, shard_range, sharded_top_fraction, ties_taken_by_rank

__all__ = ["DistributedRun", "FSDPEvolvingIsolation", "SyncCheck", "SyncCheckedIsolation", "assert_same_on_all_ranks",
           "build_parser", "check_distributed_options", "check_fsdp_options", "count_communication",
           "init_distributed", "isolation_checksum", "load_sharded_checkpoint", "main", "order_preserving_keys",
           "reshard", "save_sharded_checkpoint", "save_sharded_weights", "selection_cost", "shard_model", "shard_range",
           "sharded_top_fraction", "ties_taken_by_rank"]
