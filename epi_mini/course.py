"""What the notebooks share, so that a notebook cell reads as the idea it teaches.

* :func:`lesson` -- the settings of the short two-task stream that notebooks 03 to 07 train on (A = ``chat``,
  then B = ``code`` with 20% replay of A), for a preset, with a notebook's own changes on top: the data and
  training settings (:func:`lesson_data`, what every method uses) plus the isolation settings
  (:data:`LESSON_ISOLATION`, what only the isolation methods read);
* :func:`run_grid` -- "these methods x these seeds" -> records by label, trained two at a time;
* :func:`over_seeds_table` -- label -> figure -> mean, spread and per-seed values, from those records.
"""
from .config import make_config
from .experiments import run_many
from .metrics import over_seeds, record_metric

# The two-task stream of notebooks 03-07 on the `cpu` preset, and what the `gpu` preset trains instead: the
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


def run_grid(cells, seeds=SEEDS, preset="cpu", workers=2):
    """Train every cell (label -> config overrides) for every seed; returns label -> records in seed order.
    Runs with the same seed share the initial weights and the data order, so the seeds pair up across cells."""
    configs = [make_config(preset, **{**overrides, "seed": s}) for overrides in cells.values() for s in seeds]
    records = run_many(configs, workers=workers)
    n = len(seeds)
    return {label: records[i * n:(i + 1) * n] for i, label in enumerate(cells)}


def over_seeds_table(runs, names=("retention", "plasticity", "forgetting", "average_score")):
    """label -> figure name -> ``{"mean", "std", "values"}`` over the label's records (see
    :func:`epi_mini.metrics.record_metric` for the names)."""
    return {label: {name: over_seeds([record_metric(r, name) for r in recs]) for name in names}
            for label, recs in runs.items()}
