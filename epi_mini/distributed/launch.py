"""The command line of the multi-process run: ``torchrun --standalone --nproc_per_node=N -m epi_mini.distributed``.

Every ``python -m epi_mini`` option works (the parser is the same, plus ``--fsdp``, ``--check-sync`` and
``--backend``); the seeds are trained by the same :func:`~epi_mini.runner.run_seeds`, so the same checks
apply; rank 0 alone writes files and prints.
"""
import sys
from pathlib import Path

import torch.distributed as dist

from ..checkpoint import CheckpointError, save_json
from ..cli import build_parser as single_process_parser
from ..cli import config_overrides, print_summary
from ..config import make_config
from ..metrics import summarize_seeds
from ..runner import check_run_options, run_seeds
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
    overrides = config_overrides(args)
    try:
        check_run_options(args.checkpoint_every, args.resume)
        configs = [make_config(args.preset, seed=s, **overrides) for s in args.seeds]
        if args.fsdp:
            check_fsdp_options(configs[0].method, configs[0].mask_interval, configs[0].normalizer, args.check_sync)
        rank, _ = init_distributed(args.backend, configs[0].device)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.resume or args.out or f"runs/{configs[0].method}-{configs[0].schedule}")

    def annotate(record, run):
        record["distributed"] = {"world_size": run.world_size, "backend": dist.get_backend(), "fsdp": args.fsdp}
    try:
        records = run_seeds(configs, out, lambda cfg: DistributedRun(cfg, fsdp=args.fsdp, check_sync=args.check_sync),
                            resume=bool(args.resume), checkpoint_every=args.checkpoint_every,
                            progress=not args.no_progress, annotate=annotate)
        if rank == 0:
            summary = summarize_seeds(records)
            save_json(out / "summary.json", summary)
            print_summary(summary, records)
            print(f"\nwrote {out}/: seed<N>.json/{'.dcp/' if args.fsdp else '.pt'}, summary.json")
        dist.barrier()  # leave together: a gloo peer that exits mid-message can abort the others
    except (ValueError, FileNotFoundError, CheckpointError, DataFormatError) as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0
