"""The seed loop: one training run per config (one config per seed), written to an output folder.

``python -m epi_mini`` and its multi-process twin ``torchrun ... -m epi_mini.distributed`` both train through
:func:`run_seeds`, so both check the same things: a folder to resume exists, a finished seed was trained
with the same options, a checkpoint belongs to this config (all before any work starts). Per seed it writes
``seed<N>.pt`` (final weights; an FSDP2 run writes the sharded folder ``seed<N>.dcp/`` instead) and then
``seed<N>.json`` (the record): the record is written last, so its presence marks the seed as finished. Every
file is written atomically.
"""
import json
from pathlib import Path

from .checkpoint import CheckpointError, load_checkpoint, save_json
from .train import Run, fit


def check_run_options(checkpoint_every=0, resume=None):
    """Raise ``ValueError`` naming the option for a negative interval or a missing folder to resume."""
    if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"invalid --checkpoint-every={checkpoint_every}: must be an integer >= 0")
    if resume and not Path(resume).is_dir():
        raise ValueError(f"invalid --resume={str(resume)!r}: no such output folder")


def run_seeds(configs, out, make_run=Run, resume=False, checkpoint_every=0, progress=True, annotate=None):
    """Train each config into folder ``out`` and return the records, in order.

    ``make_run(cfg)`` builds the :class:`~epi_mini.train.Run` (a distributed one under torchrun; only a run
    with ``is_main`` writes files). With ``resume``, finished seeds are read back and unfinished ones continue
    from their checkpoint. ``annotate(record, run)`` may add fields to a record before it is written.
    """
    out = Path(out)
    records = []
    for cfg in configs:
        path, ckpt = out / f"seed{cfg.seed}.json", out / f"checkpoint-seed{cfg.seed}"
        if resume and path.exists():
            record = json.loads(path.read_text())
            diffs = [k for k, v in cfg.to_dict().items() if k != "device" and record["config"].get(k) != v]
            if diffs:
                raise CheckpointError(f"{path} was written with a different config (fields {diffs}); "
                                      "resume with the same options or use another --out")
            records.append(record)
            continue
        if resume:
            load_checkpoint(ckpt, cfg)  # refuses a mismatched or broken checkpoint before any work
        run = make_run(cfg)
        record = fit(run, progress=progress, checkpoint_dir=ckpt if checkpoint_every else None,
                     checkpoint_every=checkpoint_every, resume=bool(resume))
        if annotate is not None:
            annotate(record, run)
        run.write_weights(out / f"seed{cfg.seed}")  # seed<N>.pt (a sharded run: its own format, see Run)
        if run.is_main:
            save_json(path, record)  # written last: its presence marks the seed as finished
        records.append(record)
    return records
