"""What the notebooks share, so that a notebook cell reads as the idea it teaches.

* :func:`lesson` -- the settings of the short two-task stream that notebooks 04 to 08 train on (A = ``chat``,
  then B = ``code`` with 20% replay of A), for a preset, with a notebook's own changes on top: the data and
  training settings (:func:`lesson_data`, what every method uses) plus the isolation settings
  (:data:`LESSON_ISOLATION`, what only the isolation methods read);
* :func:`run_grid` -- "these methods x these seeds" -> records by label, trained two at a time; a run that an
  earlier notebook already trained with the same config and the same code is read back, not trained again;
* :func:`over_seeds_table` -- label -> figure -> mean, spread and per-seed values, from those records.
"""
import hashlib
import inspect
import json
import tempfile
from pathlib import Path

import torch

from .checkpoint import save_json
from .config import make_config
from .evaluate import EVAL_DIR
from . import experiments
from .experiments import run_key, run_many
from .train import CPU_THREADS
from .metrics import over_seeds, record_metric

# The two-task stream of notebooks 04-08 on the `cpu` preset, and what the `gpu` preset trains instead: the
# data and training settings every method uses ...
LESSON_DATA = {
    "cpu": dict(schedule="two_task", tasks=("chat", "code"), batch_size=32, steps_per_stage=250, eval_interval=50),
    "gpu": dict(schedule="shifting"),
}
# ... and the isolation settings, read only by the isolation methods (static = CPI-FT, static-epi, epi):
# rho, EPI's warm-up, CPI-FT's probe length and core size. Plain SFT (full, multistage) ignores them. In the
# lessons CPI-FT freezes a core as large as EPI's set (0.3) on the stream's own stages, without the probe
# fusion, so that the one difference between the two is *which* weights are frozen, and when.
_CPIFT_LESSON = dict(core_ratio=0.3, cpift_stages="schedule", cpift_fusion=False)
LESSON_ISOLATION = {
    "cpu": dict(warmup_steps=50, probe_steps=50, isolation_ratio=0.3, **_CPIFT_LESSON),
    "gpu": dict(isolation_ratio=0.3, **_CPIFT_LESSON),
}
# Five seeds: a comparison is stated as a direction only when the paired 95% interval over >= 5 seeds
# excludes 0 (epi_mini.metrics.paired_difference); fewer seeds can only say "not separated".
SEEDS = (0, 1, 2, 3, 4)


def lesson_data(preset="cpu", **changes):
    """The lesson's data and training settings for ``preset`` (what every method uses), ``changes`` on top."""
    return {**LESSON_DATA[preset], **changes}


def lesson(preset="cpu", **changes):
    """The lesson's config overrides for ``preset``, data and isolation settings, with ``changes`` on top (a
    dict for :func:`run_grid`). For plain SFT, :func:`lesson_data` alone says what the run uses."""
    return {**LESSON_DATA[preset], **LESSON_ISOLATION[preset], **changes}


# The modules a training run executes (run_many -> experiments._train -> Run, fit and the methods): a record
# depends on their source and on nothing else of the package (not on the report, the plots or the command line).
# Of experiments.py only the functions that train count (its protocols and summaries do not touch a record).
TRAINING_MODULES = ("model", "tokenizer", "tasks", "data", "evaluate", "metrics", "compact", "inputs", "isolation",
                    "epi", "adaptive", "drift", "strategy", "baselines", "methods", "config", "checkpoint",
                    "pretrain", "train")
TRAINING_FUNCTIONS = ("run_key", "_pool", "_train", "run_many")   # of epi_mini.experiments

# The lesson records are committed (notebooks/lesson_runs/<hash>/, about 1 MB), so that the test command reads
# back the runs the notebooks train instead of training its 75 runs again (half an hour on 2 cores). The folder
# is named by a hash of everything a record depends on; tests/test_lessons.py fails when the committed folder is
# not the current hash (change the training code, re-run notebooks 04-08 and 11: they write the new folder).
LESSON_RUNS = Path(__file__).resolve().parent.parent / "notebooks" / "lesson_runs"


def lesson_hash(threads):
    """A hash of everything a lesson record depends on: the training modules' source (:data:`TRAINING_MODULES`,
    :data:`TRAINING_FUNCTIONS`), the evaluation sets, the base models and their held-out text, torch's version and
    the threads per run."""
    h = hashlib.sha256(f"{torch.__version__} threads={threads}".encode())
    package = Path(__file__).resolve().parent
    data = [*Path(EVAL_DIR).glob("*.jsonl"), *(Path(EVAL_DIR).parent / "base").glob("*")]
    for f in [*(package / f"{m}.py" for m in TRAINING_MODULES), *sorted(data)]:
        h.update(f.name.encode() + f.read_bytes().replace(b"\r\n", b"\n"))
    for name in TRAINING_FUNCTIONS:
        h.update(name.encode() + inspect.getsource(getattr(experiments, name)).encode())
    return h.hexdigest()[:16]


def lesson_cache(threads):
    """Where run_grid keeps its records: ``notebooks/lesson_runs/<hash>/`` (:func:`lesson_hash`), so that a change to
    anything a record depends on starts an empty folder and nothing stale is ever read back; a temp folder where
    the package does not sit in a checkout with its notebooks."""
    root = LESSON_RUNS if LESSON_RUNS.parent.is_dir() else Path(tempfile.gettempdir()) / "epi-mini-lessons"
    return root / lesson_hash(threads)


def run_grid(cells, seeds=SEEDS, preset="cpu", workers=None):
    """Train every cell (label -> config overrides) for every seed; returns label -> records in seed order.
    Runs with the same seed share the initial weights and the data order, so the seeds pair up across cells.

    Notebooks 05 and 06 both train full SFT and CPI-FT on the lesson stream: the second reads them back from
    :func:`lesson_cache` (same config, same code, same threads: the same record, bit for bit)."""
    configs = [make_config(preset, **{**overrides, "seed": s}) for overrides in cells.values() for s in seeds]
    threads = CPU_THREADS
    cache = lesson_cache(threads)
    paths = [cache / f"{run_key(c)}.json" for c in configs]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    trained = run_many([configs[i] for i in missing], workers=workers, threads=threads) if missing else []
    for i, record in zip(missing, trained):
        save_json(paths[i], record)  # atomic: a notebook stopped half-way leaves no half-written record
    records = [json.loads(p.read_text()) for p in paths]
    n = len(seeds)
    return {label: records[i * n:(i + 1) * n] for i, label in enumerate(cells)}


def over_seeds_table(runs, names=("retention", "plasticity", "forgetting", "average_score")):
    """label -> figure name -> ``{"mean", "std", "values"}`` over the label's records (see
    :func:`epi_mini.metrics.record_metric` for the names)."""
    return {label: {name: over_seeds([record_metric(r, name) for r in recs]) for name in names}
            for label, recs in runs.items()}
