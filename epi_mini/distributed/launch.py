"""The command line of the multi-process run: ``torchrun --standalone --nproc_per_node=N -m epi_mini.distributed``.

Every ``python -m epi_mini`` option works (the parser is the same, plus ``--fsdp``, ``--check-sync`` and
``--backend``); the options are resolved as there (``--resume DIR`` reads ``DIR/options.json``), the seeds
are trained by the same :func:`~epi_mini.runner.run_seeds`, so the same checks apply, and the run ends as
there (table, figures, the folder's files, what to try next); rank 0 alone writes files and prints.

Before any process group exists, every option is either accepted or refused with a message
(:func:`~epi_mini.distributed.ddp.check_distributed_options`), and a resume is checked against the way its run
was launched (``options.json`` records the number of processes, ``--fsdp`` and ``--check-sync``). However the
run ends -- finished, refused, Ctrl-C -- the process group is shut down, so torchrun's exit status is the run's.
"""
import os
import sys
import time

import torch.distributed as dist

from ..cli import USER_ERRORS, configs_of, finish, interrupted_line, resolve_options
from ..cli import build_parser as single_process_parser
from ..runner import launcher_command, load_run_options, run_seeds
from .comm import on_rank0
from .ddp import DistributedRun, check_distributed_options, init_distributed


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


def launcher_options(args):
    """How this run is launched, as ``options.json`` records it: torchrun's number of processes (None when
    not started by torchrun), ``--fsdp`` and ``--check-sync``."""
    size = os.environ.get("WORLD_SIZE", "")
    return {"world_size": int(size) if size.isdigit() else None, "fsdp": args.fsdp, "check_sync": args.check_sync}


def check_resume_launch(args, launcher, cfg):
    """Refuse what no flag allows: 8-bit importance under FSDP2 is laid out along this number of ranks' shards."""
    saved = (load_run_options(args.resume) or {}).get("launcher") if args.resume else None
    if saved and args.fsdp and cfg.ema_storage == "int8" and saved["world_size"] != launcher["world_size"]:
        raise ValueError(f"the run in {args.resume} keeps its 8-bit importance (--ema-storage int8) in the layout of "
                         f"{saved['world_size']} ranks' shards, which cannot move to {launcher['world_size']}: "
                         f"resume it with {launcher_command(saved, args.resume)}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    since, launcher = time.time(), launcher_options(args)
    rank = int(os.environ["RANK"]) if os.environ.get("RANK", "").isdigit() else 0  # torchrun's, before any group
    try:
        if args.workers is not None:  # the parser is python -m epi_mini's; here torchrun starts the processes
            raise ValueError("--workers is for python -m epi_mini (runs side by side, one process each); under torchrun "
                             "the processes are --nproc_per_node's, and they train one run at a time")
        options, out = resolve_options(args, launcher=launcher)
        configs = configs_of(options)
        check_distributed_options(configs[0], args.fsdp, args.check_sync)
        check_resume_launch(args, launcher, configs[0])
        rank, world_size = init_distributed(args.backend, configs[0].device)
    except (*USER_ERRORS, RuntimeError) as e:
        if rank == 0:  # every rank ran the same checks: one line is enough
            print(f"error: {e}", file=sys.stderr)
        return 2
    launcher["world_size"] = world_size
    # What to try next (cli.next_steps): after EPI, CPI-FT, which FSDP2 refuses, so that command runs under DDP.
    command = launcher_command({**launcher, "fsdp": launcher["fsdp"] and configs[0].method != "epi"})

    def annotate(record, run):
        record["distributed"] = {"world_size": run.world_size, "backend": dist.get_backend(), "fsdp": args.fsdp}
        if len(set(run.world_sizes)) > 1:  # resumed with --allow-world-size-change
            record["distributed"]["world_sizes"] = run.world_sizes
    status, agreed = 0, True  # agreed: every rank stops here together, so they can leave together
    try:
        records = run_seeds(configs, out, lambda cfg: DistributedRun(cfg, fsdp=args.fsdp, check_sync=args.check_sync),
                            resume=bool(args.resume), checkpoint_every=options["checkpoint_every"],
                            progress=not args.no_progress, annotate=annotate, options=options,
                            log=(lambda line: print(line, flush=True)) if rank == 0 else None,
                            overwrite=args.overwrite, world_size=world_size,
                            allow_world_size_change=args.allow_world_size_change)
        on_rank0(lambda: finish(out, records, options, since, command=command))
    except KeyboardInterrupt as e:
        if rank == 0:
            print(interrupted_line(e, out, launcher), file=sys.stderr, flush=True)
        status, agreed = 130, False  # the other ranks may not have been interrupted
    except USER_ERRORS as e:  # raised on every rank alike: by the same checks, or by on_rank0 and DCP for all
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        status = 2
    except BaseException:
        agreed = False
        raise
    finally:
        shut_down(agreed)
    return status


def shut_down(together=True):
    """Destroy the process group; with ``together``, after a barrier: a gloo peer that leaves while another
    still talks to it can abort that one, and torchrun would report the whole run as failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized():
        try:
            if together:
                dist.barrier()
        finally:
            dist.destroy_process_group()
