"""The seed loop: one training run per config (one config per seed), written to an output folder.

``python -m epi_mini`` and its multi-process twin ``torchrun ... -m epi_mini.distributed`` both train through
:func:`run_seeds`, so both check the same things: a folder to resume exists, a finished seed was trained
with the same options, a checkpoint belongs to this config (all before any work starts). The folder holds:

* ``options.json`` -- the options the run was started with (preset, seeds, config fields given on the
  command line, checkpoint interval), written when the first seed starts training: ``--resume DIR`` reads
  them back, so a resumed run needs no other option (:func:`resume_options`);
* ``seed<N>.pt`` (final weights; an FSDP2 run writes the sharded folder ``seed<N>.dcp/`` instead) and then
  ``seed<N>.json`` (the record): the record is written last, so its presence marks the seed as finished;
* ``checkpoint-seed<N>/checkpoint.pt`` when checkpoints are on: an unfinished seed always continues from
  it on resume, whether or not ``--checkpoint-every`` is repeated.

Every file is written atomically. One line per finished seed (time, final average score, forgetting) goes
to ``log``.
"""
import json
import time
from pathlib import Path

from .checkpoint import CheckpointError, load_checkpoint, save_json
from .config import make_config
from .methods import method_label
from .metrics import forgetting_per_task
from .train import Run, fit

OPTIONS_NAME = "options.json"
# Options a resumed run may change: where it runs, how it reports and how often it checkpoints -- never what
# it trains. Any other option repeated with another value is refused (see resume_options).
RESUME_MAY_CHANGE = ("device", "no_progress", "checkpoint_every")


def check_run_options(checkpoint_every=0, resume=None):
    """Raise ``ValueError`` naming the option for a negative interval or a missing folder to resume."""
    if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"invalid --checkpoint-every={checkpoint_every}: must be an integer >= 0")
    if resume and not Path(resume).is_dir():
        raise ValueError(f"invalid --resume={str(resume)!r}: no such output folder")


def run_options(preset, seeds, overrides, checkpoint_every=0) -> dict:
    """What ``options.json`` holds: enough to rebuild every config of the run (JSON-ready)."""
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    return {"preset": preset, "seeds": list(seeds), "config": config, "checkpoint_every": checkpoint_every}


def load_run_options(folder):
    """The options saved in ``folder`` (see :func:`run_options`), or None for a folder without them (a run
    from before options were saved). Raises :class:`CheckpointError` for an unreadable file."""
    path = Path(folder) / OPTIONS_NAME
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        if not all(k in saved for k in ("preset", "seeds", "config", "checkpoint_every")):
            raise ValueError("missing entries")
    except ValueError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    saved["config"] = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()}
    return saved


def _option_name(name):
    return "--" + name.replace("_", "-")


def _shown(value):
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) or "(none)"
    return str(value)


def resume_options(saved, preset=None, seeds=None, overrides=None, checkpoint_every=None) -> dict:
    """The options of a resumed run: ``saved`` (from ``options.json``), with what the command line repeats.

    ``preset``, ``seeds``, ``checkpoint_every`` are None when not given; ``overrides`` holds only the config
    fields given. A given option whose value differs from the run's (its saved value, or the preset's value
    for a field that was not given at the start) raises ``ValueError`` naming the option and both values,
    except the options of :data:`RESUME_MAY_CHANGE`. ``checkpoint_every`` left out keeps the saved interval.
    """
    overrides = overrides or {}
    options = {**saved, "config": dict(saved["config"])}
    started = make_config(saved["preset"], **saved["config"]).to_dict()
    given = {"preset": (preset, saved["preset"]), "seeds": (seeds, saved["seeds"])}
    given.update({k: (v, started[k]) for k, v in overrides.items()})
    for name, (value, before) in given.items():
        if value is None or name in RESUME_MAY_CHANGE:
            continue
        now = list(value) if isinstance(value, (list, tuple)) else value
        before = list(before) if isinstance(before, (list, tuple)) else before
        if now != before:
            raise ValueError(
                f"{_option_name(name)} {_shown(now)} differs from the value the run in this folder was started "
                f"with ({_shown(before)}); --resume continues with the saved options ({OPTIONS_NAME}): leave "
                f"{_option_name(name)} out, or start a new run with another --out")
    for name in RESUME_MAY_CHANGE:
        if name in overrides:
            options["config"][name] = overrides[name]
    if checkpoint_every is not None:
        options["checkpoint_every"] = checkpoint_every
    return options


def seed_line(record, k, n, seconds, resumed_at=0, earlier=False):
    """One line for a finished seed: seed (k/n), wall time, final average score, forgetting."""
    seed = record["config"]["seed"]
    R, first = record["accuracy_matrix"], record["first_stage"]
    lost = forgetting_per_task(R, first)
    forgot = (f"forgetting {record['metrics']['forgetting']:.3f} over {len(lost)} earlier task"
              f"{'s' * (len(lost) != 1)}" if lost else "forgetting: none possible (no task before the last stage)")
    score = f"average score {record['metrics']['average_score']:.3f}, {forgot}"
    if earlier:
        return f"seed {seed} ({k}/{n}) had already finished (seed{seed}.json kept): {score}"
    how = f", resumed from its checkpoint at step {resumed_at}" if resumed_at else ""
    return f"seed {seed} ({k}/{n}) done in {seconds:.1f} s{how}: {score}"


def run_seeds(configs, out, make_run=Run, resume=False, checkpoint_every=0, progress=True, annotate=None,
              options=None, log=None):
    """Train each config into folder ``out`` and return the records, in order.

    ``make_run(cfg)`` builds the :class:`~epi_mini.train.Run` (a distributed one under torchrun; only a run
    with ``is_main`` writes files and logs). With ``resume``, finished seeds are read back and unfinished
    ones continue from their checkpoint when there is one (checkpoints are written only with
    ``checkpoint_every``). ``options`` (see :func:`run_options`) is written to ``options.json`` once the first
    seed's run is built, so a run refused for bad input leaves no folder behind. ``annotate(record, run)``
    may add fields to a record before it is written; ``log(line)`` receives one line per seed.
    """
    out = Path(out)
    n = len(configs)
    say = log or (lambda line: None)
    # Every check before any work: a finished seed's config, every unfinished seed's checkpoint.
    finished, starts = {}, {}
    for cfg in configs:
        path, ckpt = out / f"seed{cfg.seed}.json", out / f"checkpoint-seed{cfg.seed}"
        if resume and path.exists():
            record = json.loads(path.read_text())
            diffs = [k for k, v in cfg.to_dict().items() if k != "device" and record["config"].get(k) != v]
            if diffs:
                raise CheckpointError(f"{path} was written with a different config (fields {diffs}); "
                                      "resume with the same options or use another --out")
            finished[cfg.seed] = record
        elif resume:
            state = load_checkpoint(ckpt, cfg)  # refuses a mismatched or broken checkpoint
            starts[cfg.seed] = state["step"] if state is not None else 0
    records, options_written = [], False
    for k, cfg in enumerate(configs, 1):
        path, ckpt = out / f"seed{cfg.seed}.json", out / f"checkpoint-seed{cfg.seed}"
        if cfg.seed in finished:
            records.append(finished[cfg.seed])
            say(seed_line(finished[cfg.seed], k, n, 0.0, earlier=True))
            continue
        t0 = time.perf_counter()
        run = make_run(cfg)
        if options is not None and run.is_main and not options_written:
            save_json(out / OPTIONS_NAME, options)
            options_written = True
        if resume and not starts.get(cfg.seed) and run.is_main:
            say(f"seed {cfg.seed} ({k}/{n}): no checkpoint in {ckpt}, training from step 0")
        label = f"{method_label(cfg.method)} | seed {cfg.seed} ({k}/{n})"
        record = fit(run, progress=progress, checkpoint_dir=ckpt if checkpoint_every or resume else None,
                     checkpoint_every=checkpoint_every, resume=bool(resume), progress_label=label)
        if annotate is not None:
            annotate(record, run)
        run.write_weights(out / f"seed{cfg.seed}")  # seed<N>.pt (a sharded run: its own format, see Run)
        if run.is_main:
            save_json(path, record)  # written last: its presence marks the seed as finished
            say(seed_line(record, k, n, time.perf_counter() - t0, record["timing"]["resumed_at_step"]))
        records.append(record)
    return records
