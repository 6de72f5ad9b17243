"""EPI beyond one process: data-parallel training (DDP) and a sharded EPI state, with ``torch.distributed``.

Launch (one process per GPU, or per CPU socket with gloo; every ``python -m epi_mini`` option works)::

    torchrun --standalone --nproc_per_node=N -m epi_mini.distributed --method epi [--shard] [--check-sync]

**DDP (the default)** (:mod:`.ddp`): every rank holds the whole model and trains on its slice of each
global batch; DDP averages the gradients, so EPI runs unchanged on every rank. ``--check-sync`` verifies at
every refresh that all ranks agree.

**Sharded (``--shard``)** (:mod:`.sharded`): every rank owns a slice of every tensor and keeps only that
slice's optimizer moments, importance EMA and isolated set. EPI's global top-rho is then found by an exact
distributed selection (:mod:`.selection`) that never gathers the scores.

The modules, in reading order: :mod:`.comm` (every collective, counted), :mod:`.selection` (exact top-rho
over sharded scores), :mod:`.sharded` (the sharded EPI state), :mod:`.ddp` (the distributed run),
:mod:`.launch` (the command line). The single-process path does not use this package: ``python -m epi_mini``
runs no distributed code.
"""
from .comm import assert_same_on_all_ranks, count_communication
from .ddp import DistributedRun, SyncCheckedIsolation, init_distributed, isolation_checksum
from .launch import build_parser, main
from .selection import order_preserving_keys, selection_cost, shard_range, sharded_top_fraction, ties_taken_by_rank
from .sharded import ShardedEvolvingIsolation, ShardedOptimizer, ShardedUpdate

__all__ = ["DistributedRun", "ShardedEvolvingIsolation", "ShardedOptimizer", "ShardedUpdate", "SyncCheckedIsolation",
           "assert_same_on_all_ranks", "build_parser", "count_communication", "init_distributed",
           "isolation_checksum", "main", "order_preserving_keys", "selection_cost", "shard_range",
           "sharded_top_fraction", "ties_taken_by_rank"]
