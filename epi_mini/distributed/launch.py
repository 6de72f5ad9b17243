"""The command line of the multi-process run: ``torchrun --standalone --nproc_per_node=N -m epi_mini.distributed``.

Every ``python -m epi_mini`` option works (the parser is the same, plus ``--fsdp``, ``--check-sync`` and
``--backend``); the options are resolved as there (``--resume DIR`` reads ``DIR/options.json``), the seeds
are trained by the same :func:`~epi_mini.runner.run_seeds`, so the same checks apply, and the run ends as
there (table, figures, the folder's files, what to try next); rank 0 alone writes files and prints.
"""
import sys
import time

import torch.distributed as dist

from ..checkpoint import CheckpointError
from ..cli import build_parser as single_process_parser
from ..cli import configs_of, finish, resolve_options
from ..runner import run_seeds
from ..tasks import DataFormatError
from .ddp import DistributedRun, init_distributed
from .fsdp import check_fsdp_options


def build_parser():
    p = single_process_parser()
    p.prog = "torchrun --standalone --nproc_per_node=N -m epi_mini.distributed"
    p.description = ("Train with N processes: each trains on its slice of every global batch (DDP, or FSDP2 with "
                     "--fsdp). Options as for python -m epi_mini; rank 0 writes the outputs.")
    p.add_argument("--fsdp", "--shard", dest="fsdp", action="store_true",
                   help="shard the model with PyTorch FSDP2 (fully_shard per block and the root): each rank keeps "
                        "its shard of the weights, gradients, optimizer and EPI state; EPI's global top-rho by "
                        "an exact distributed selection; sharded checkpoints with torch.distributed.checkpoint")
    p.add_argument("--check-sync", action="store_true",
                   help="debug: at every EPI refresh, check with a checksum all-reduce that all ranks agree")
    p.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                   help="torch.distributed backend (auto: nccl on CUDA, else gloo)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    since = time.time()
    try:
        options, out = resolve_options(args)
        configs = configs_of(options)
        if args.fsdp:
            check_fsdp_options(configs[0].method, configs[0].mask_interval, configs[0].normalizer, args.check_sync)
        rank, _ = init_distributed(args.backend, configs[0].device)
    except (ValueError, RuntimeError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def annotate(record, run):
        record["distributed"] = {"world_size": run.world_size, "backend": dist.get_backend(), "fsdp": args.fsdp}
    try:
        records = run_seeds(configs, out, lambda cfg: DistributedRun(cfg, fsdp=args.fsdp, check_sync=args.check_sync),
                            resume=bool(args.resume), checkpoint_every=options["checkpoint_every"],
                            progress=not args.no_progress, annotate=annotate, options=options,
                            log=(lambda line: print(line, flush=True)) if rank == 0 else None)
        if rank == 0:
            finish(out, records, options, since, command="torchrun --standalone --nproc_per_node=N -m epi_mini.distributed")
        dist.barrier()  # leave together: a gloo peer that exits mid-message can abort the others
    except (ValueError, FileNotFoundError, CheckpointError, DataFormatError) as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0
