"""The experiment runner: named protocols x methods x seeds, resumable, in parallel processes.

    python -m epi_mini.experiments all                    # every protocol, cpu preset, seeds 0-4
    python -m epi_mini.experiments controls --seeds 0 1 2 3 4 5 --workers 2

Each run is one :func:`epi_mini.train.fit` call. Its record is written to ``results/runs/<key>.json``, where
the key is a hash of the run's full config, so a run shared by two protocols is trained once and a finished
run is never redone (delete the file to redo it). Each protocol then writes ``results/<protocol>/summary.json``
and ``summary.md`` and its figures. Seeds pair up across cells: a seed fixes the initial weights and the order
of the data, so two methods with the same seed differ only by the method, and every comparison is reported
as a paired difference with a 95% interval (:func:`epi_mini.metrics.paired_difference`).

A protocol is data (:class:`Protocol`, all of them in :data:`PROTOCOLS`): its cells (label -> config
overrides), the comparisons it makes, and the summary, table and figures it writes.

| protocol    | question                                                                                |
|-------------|-----------------------------------------------------------------------------------------|
| `main`      | the shifting schedule: how much does each method forget, how well does it still learn? |
| `controls`  | does the *evolution* matter? EPI against its controls and mechanism variants            |
| `pareto`    | at equal frozen fraction, whose retention-plasticity front is higher, CPI-FT's or EPI's? |
| `multitask` | the paper's main-table setting: all tasks mixed in one stage (interference)            |
| `drift`     | does importance drift without a change of data? (no runs of its own: EPI's drift records) |
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checkpoint import atomic_write_bytes, save_json
from .config import OptionParser, make_config
from .drift import DriftRecorder
from .metrics import (average_normalized_score, describe_difference, over_seeds, paired_difference,
                      record_metric)
from .train import Run, fit

RESULTS = Path("results")
SEEDS = (0, 1, 2, 3, 4)
FIGURES = ("average_score", "forgetting", "plasticity", "retention", "earlier_final", "frozen_fraction")
CPIFT = dict(method="static", cpift_stages="schedule")       # CPI-FT on a stream whose stages are given
CORE_RATIOS = (0.01, 0.05, 0.1)                               # CPI-FT's front (0.01: the paper's)
EPI_RATIOS = (0.05, 0.1, 0.2, 0.5)                            # EPI's front


@dataclass(frozen=True)
class Cell:
    """One row of a protocol: a label, the config overrides of its runs, and, optionally, the label of a
    cell whose per-stage frozen fraction (seed by seed) it copies into its own ``isolation_schedule``."""
    label: str
    overrides: dict
    matched_to: str = None


def main_cells():
    return [Cell("full SFT (one-stage mixture)", dict(method="full", schedule="multitask")),
            Cell("full SFT", dict(method="full")),
            Cell("multi-stage SFT", dict(method="multistage")),
            Cell("CPI-FT (schedule's stages)", CPIFT),
            Cell("CPI-FT (schedule's stages, no fusion)", dict(CPIFT, cpift_fusion=False)),
            Cell("static EPI score", dict(method="static-epi")),
            Cell("EPI", dict(method="epi"))]


def controls_cells():
    return [Cell("full SFT", dict(method="full")),
            Cell("EPI", dict(method="epi")),
            Cell("static EPI score", dict(method="static-epi")),
            Cell("random mask", dict(method="random-mask")),
            Cell("CPI-FT (schedule's stages)", CPIFT),
            Cell("EPI at CPI-FT's frozen fraction", dict(method="epi"), matched_to="CPI-FT (schedule's stages)"),
            Cell("EPI, nothing isolated in stage 1", dict(method="epi", isolation_schedule=(0.0, 0.1, 0.1))),
            Cell("EPI, replay-aware importance", dict(method="epi", replay_importance=True)),
            Cell("EPI, beta = 0.999", dict(method="epi", ema_beta=0.999)),
            Cell("EPI, 8-bit importance", dict(method="epi", ema_storage="int8", mask_storage="gaps"))]


def pareto_cells():
    return ([Cell("full SFT", dict(method="full"))]
            + [Cell(f"CPI-FT core {r:g}", dict(CPIFT, core_ratio=r)) for r in CORE_RATIOS]
            + [Cell(f"EPI rho {r:g}", dict(method="epi", isolation_ratio=r)) for r in EPI_RATIOS])


def multitask_cells():
    one = dict(schedule="multitask")
    return [Cell("full SFT", dict(one, method="full")),
            Cell("EPI", dict(one, method="epi")),
            Cell("CPI-FT (its own grouping)", dict(one, method="static", cpift_stages="grouping"))]


def drift_cells():
    return [Cell("EPI, one-stage mixture", dict(method="epi", schedule="multitask")),
            Cell("EPI, shifting schedule", dict(method="epi"))]


# --- running ---------------------------------------------------------------------------------------------------
def run_key(cfg):
    d = cfg.to_dict()
    d.pop("device")
    digest = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.method}-{cfg.schedule}-seed{cfg.seed}-{digest}"


def _pool(workers):
    """Worker processes for training: fresh interpreters ("spawn"), so no thread pool or lock of the parent
    process is inherited half-initialised. Used by both :func:`run_many` and :func:`run_protocols`."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _train(cfg, threads, drift=True):
    """Train one config; EPI-family runs also record how their importance drifts."""
    torch.set_num_threads(threads)
    run = Run(cfg)
    epi_family = cfg.method in ("epi", "static-epi", "random-mask")
    recorder = DriftRecorder(every=max(10, cfg.steps_per_stage // 10)) if drift and epi_family else None
    record = fit(run, progress=False, on_step=recorder)
    if recorder is not None:
        record["drift"] = recorder.summary(run.schedule.boundaries)
    return record


def _run_one(cfg, path, threads):
    record = _train(cfg, threads)
    save_json(path, record)
    return str(path), record["timing"]["seconds"]


def run_many(configs, workers=2, drift=False, threads=None):
    """Train several configs in parallel processes and return their records, in order (nothing is written).
    The notebooks use this to run a comparison over seeds in about half the time of a loop. ``threads``: torch
    threads per run (default: the cores shared among the workers; the thread count changes float rounding)."""
    workers = max(1, min(workers, os.cpu_count() or 1, len(configs)))
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    if workers == 1:
        return [_train(cfg, threads, drift) for cfg in configs]
    with _pool(workers) as pool:
        return list(pool.map(_train, configs, [threads] * len(configs), [drift] * len(configs)))


def matched_schedule(record):
    """The ``isolation_schedule`` that reproduces a run's frozen fraction stage by stage (its mean over each
    stage's steps, rounded to 6 digits so that the run key is stable)."""
    return tuple(round(f, 6) for f in record["frozen_fraction"])


def _configs(cells, preset, seeds, overrides, records_path):
    """label -> one config per seed; a matched cell's configs need its source's records (None until then)."""
    out = {}
    for cell in cells:
        cfgs = []
        for s in seeds:
            kw = {**cell.overrides, **overrides}
            if cell.matched_to:
                source = out[cell.matched_to][len(cfgs)]
                path = records_path(source)
                if not path.exists():
                    cfgs.append(None)
                    continue
                kw["isolation_schedule"] = matched_schedule(json.loads(path.read_text()))
            cfgs.append(make_config(preset, seed=s, **kw))
        out[cell.label] = cfgs
    return out


def run_protocols(protocols, preset="cpu", seeds=SEEDS, workers=None, out=RESULTS, overrides=None, log=print):
    """Train every missing run of ``protocols``, then write each protocol's summary. Returns the summaries.
    A matched cell is trained as soon as its source run (same seed) has finished."""
    out, overrides = Path(out), overrides or {}
    record_path = lambda cfg: out / "runs" / f"{run_key(cfg)}.json"  # noqa: E731
    cells = {p: protocol(p).cells() for p in protocols}
    plan = lambda: {p: _configs(cells[p], preset, seeds, overrides, record_path) for p in protocols}  # noqa: E731
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    t0, done, running = time.perf_counter(), 0, {}

    def todo():
        pending = {}
        for by_label in plan().values():
            for cfgs in by_label.values():
                for cfg in cfgs:
                    if cfg is not None and not record_path(cfg).exists():
                        pending[record_path(cfg)] = cfg
        return pending
    pending = todo()
    log(f"{len(pending)} runs to train now (runs shared between protocols, or already done, are trained once), "
        f"{workers} worker(s) x {threads} thread(s)")
    with _pool(workers) as pool:
        while True:
            for path, cfg in todo().items():  # new work: runs whose source has just finished
                if path not in running:
                    running[path] = pool.submit(_run_one, cfg, path, threads)
            if not running:
                break
            finished, _ = wait(list(running.values()), return_when=FIRST_COMPLETED)
            for path in [p for p, f in running.items() if f in finished]:
                _, seconds = running.pop(path).result()
                done += 1
                log(f"[{done}] {path.name} ({seconds:.0f}s, {time.perf_counter() - t0:.0f}s elapsed)")
    summaries, configs = {}, plan()
    for p in protocols:
        proto = protocol(p)
        records = {label: [json.loads(record_path(c).read_text()) for c in cfgs] for label, cfgs in configs[p].items()}
        summaries[p] = {**proto.summarize(records), "preset": preset, "seeds": list(seeds),
                        "runs": {label: [run_key(c) for c in cfgs] for label, cfgs in configs[p].items()}}
        save_json(out / p / "summary.json", summaries[p])
        atomic_write_bytes(out / p / "summary.md", proto.markdown(summaries[p]).encode())
        proto.figures(summaries[p], records, out / p)
    return summaries


# --- summaries ----------------------------------------------------------------------------------------------------
def method_figures(records):
    """figure name -> over seeds, for one cell's records (see :func:`epi_mini.metrics.record_metric`)."""
    return {name: over_seeds([record_metric(r, name) for r in records]) for name in FIGURES}


def per_stage_frozen(records):
    return [over_seeds(list(v)) for v in zip(*[r["frozen_fraction"] for r in records])]


def boundary_overlap(record):
    """EPI's refresh log around stage boundaries: the overlap of the first refreshed set after each boundary
    with the set before it, and the median overlap of the refreshes within stages."""
    logged = [h for h in record.get("strategy", {}).get("history", []) if h["jaccard_previous"] is not None]
    firsts = [next((h for h in logged if h["step"] > b), None) for b in record["stage_boundaries"][:-1]]
    inside = [h["jaccard_previous"] for h in logged if not any(h is f for f in firsts)]
    return {"after_boundary": [f["jaccard_previous"] if f else None for f in firsts],
            "within_stages_median": float(np.median(inside)) if inside else None}


def compare(records, pairs, names=("forgetting", "plasticity", "retention", "earlier_final", "average_score")):
    """Paired differences (a - b), seed by seed, for each (a, b) of ``pairs``: "a vs b" -> figure -> diff."""
    return {f"{a} vs {b}": {n: paired_difference([record_metric(r, n) for r in records[a]],
                                                 [record_metric(r, n) for r in records[b]]) for n in names}
            for a, b in pairs if a in records and b in records}


def summarize_cells(records, pairs=()):
    tasks = next(iter(records.values()))[0]["tasks"]
    methods = {}
    for label, recs in records.items():
        finals = [dict(zip(r["tasks"], r["accuracy_matrix"][-1])) for r in recs]
        methods[label] = {**method_figures(recs), "final_scores": {t: over_seeds([f[t] for f in finals]) for t in tasks},
                          "frozen_by_stage": per_stage_frozen(recs),
                          "seconds": over_seeds([r["timing"]["seconds"] for r in recs])}
        overlaps = [boundary_overlap(r) for r in recs]
        if all(o["within_stages_median"] is not None and None not in o["after_boundary"] for o in overlaps):
            methods[label]["boundary_overlap"] = {
                "after_boundary": [over_seeds(list(v)) for v in zip(*[o["after_boundary"] for o in overlaps])],
                "within_stages_median": over_seeds([o["within_stages_median"] for o in overlaps])}
    return {"tasks": tasks, "methods": methods, "comparisons": compare(records, pairs)}


MAIN_PAIRS = [("EPI", "full SFT"), ("EPI", "CPI-FT (schedule's stages)"), ("EPI", "static EPI score"),
              ("CPI-FT (schedule's stages)", "full SFT"),
              ("CPI-FT (schedule's stages)", "CPI-FT (schedule's stages, no fusion)")]
CONTROL_PAIRS = [("EPI", "static EPI score"), ("EPI", "random mask"),
                 ("EPI at CPI-FT's frozen fraction", "CPI-FT (schedule's stages)"),
                 ("EPI, nothing isolated in stage 1", "EPI"),
                 ("EPI, replay-aware importance", "EPI"), ("EPI, replay-aware importance", "full SFT"),
                 ("EPI, beta = 0.999", "EPI"), ("EPI, beta = 0.999", "full SFT"),
                 ("EPI, 8-bit importance", "EPI")]


def summarize_main(records):
    s = summarize_cells(records, MAIN_PAIRS)
    ref_label = "full SFT (one-stage mixture)"
    reference = {t: float(np.mean([r["accuracy_matrix"][-1][j] for r in records[ref_label]]))
                 for j, t in enumerate(s["tasks"])}
    reference = {t: v for t, v in reference.items() if v > 0}
    for label, recs in records.items():
        if not reference:  # the reference learned nothing (a tiny test run): no normalised score
            continue
        s["methods"][label]["average_normalized_score"] = over_seeds(
            [average_normalized_score(dict(zip(r["tasks"], r["accuracy_matrix"][-1])), reference) for r in recs])
    return {**s, "reference": ref_label, "reference_scores": reference}


def summarize_controls(records):
    return summarize_cells(records, CONTROL_PAIRS)


def summarize_pareto(records):
    s = summarize_cells(records)
    s["points"] = {label: [{"seed": r["config"]["seed"], **{n: record_metric(r, n) for n in FIGURES}} for r in recs]
                   for label, recs in records.items()}
    return s


def summarize_multitask(records):
    s = summarize_cells(records)
    tasks, full = s["tasks"], records["full SFT"]
    s["per_task"] = {label: {t: paired_difference([r["accuracy_matrix"][-1][j] for r in recs],
                                                  [r["accuracy_matrix"][-1][j] for r in full])
                             for j, t in enumerate(tasks)} for label, recs in records.items() if label != "full SFT"}
    reference = {t: s["methods"]["full SFT"]["final_scores"][t]["mean"] for t in tasks}
    reference = {t: v for t, v in reference.items() if v > 0}  # a task full SFT never learned cannot normalise
    if not reference:
        return s
    normalized = {label: [average_normalized_score(dict(zip(r["tasks"], r["accuracy_matrix"][-1])), reference)
                          for r in recs] for label, recs in records.items()}
    s["average_normalized_score"] = {label: over_seeds(v) for label, v in normalized.items()}
    s["normalized_vs_full"] = {label: paired_difference(v, normalized["full SFT"]) for label, v in normalized.items()
                               if label != "full SFT"}
    return s


def summarize_drift(records):
    out = {}
    for label, recs in records.items():
        d = [r["drift"] for r in recs]
        entry = {"chance": over_seeds([x["chance"] for x in d]),
                 "overlap_consecutive": over_seeds([x["overlap_consecutive"] for x in d]),
                 "overlap_first_last": over_seeds([x["overlap_first_last"] for x in d]),
                 "rank_correlation_first_last": over_seeds([x["rank_correlation_first_last"] for x in d]),
                 "curves": {}}
        for name, key in (("within a stage", "within_stage"), ("across a boundary", "across_boundary")):
            if d[0][key]["lag_steps"]:  # one stage: no pair straddles a boundary
                entry["curves"][name] = {"lag_steps": d[0][key]["lag_steps"],
                                         "overlap": [over_seeds(list(v)) for v in zip(*[x[key]["overlap"] for x in d])]}
        out[label] = entry
    return {"methods": out}


# --- tables -------------------------------------------------------------------------------------------------------
def markdown_table(headers, rows):
    """The one table writer: a header row, a separator, one line per row (cells are strings)."""
    lines = [headers, ["---"] * len(headers), *rows]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


def _ms(d, digits=3):
    if d is None or d["mean"] != d["mean"]:  # absent, or NaN: nothing to measure (e.g. no earlier task)
        return "—"
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def _frozen(m):
    return " / ".join(f"{f['mean']:.3f}" for f in m["frozen_by_stage"])


def _comparisons_md(s, title="Paired differences (a - b, same seeds; mean [95% t-interval])"):
    names = ("forgetting", "plasticity", "retention", "earlier_final")
    rows = [[pair, *(describe_difference(d[n]) for n in names)] for pair, d in s["comparisons"].items()]
    return f"\n## {title}\n\n" + markdown_table(["a vs b", *names], rows)


def _methods_md(s):
    rows = [[label, _ms(m["forgetting"]), _ms(m["plasticity"]), _ms(m["retention"]), _ms(m["earlier_final"]),
             _ms(m["average_score"]), _frozen(m)] for label, m in s["methods"].items()]
    return markdown_table(["method", "forgetting", "plasticity", "retention", "earlier tasks' final score",
                           "average score", "frozen fraction by stage"], rows)


def _header(name, s, what):
    return (f"# {name} protocol ({s['preset']} preset, seeds {s['seeds']}; mean ± std over seeds)\n\n{what}\n\n"
            "Frozen fraction: the isolated share of the weights, averaged over each stage's steps (warm-up counts "
            "as 0), whatever a method's nominal ratio is.\n\n")


def markdown_main(s):
    tasks = s["tasks"]
    rows = [[label, *(_ms(m["final_scores"][t], 2) for t in tasks), _ms(m["average_score"]),
             _ms(m.get("average_normalized_score"))] for label, m in s["methods"].items()]
    return (_header("main", s, "The shifting schedule: math + code, then logic + instruction, then chat, each stage "
                    "replaying earlier tasks in 20% of its batches. CPI-FT runs on the schedule's stages (a stream "
                    "cannot be re-ordered), 1% cores per task.") + _methods_md(s) + "\n## Final score per task\n\n"
            + markdown_table(["method", *tasks, "average", f"avg normalised (by {s['reference']})"], rows)
            + _comparisons_md(s))


def markdown_controls(s):
    return (_header("controls", s, "Does the evolution matter? EPI against its never-refreshed score, a random set of "
                    "the same size, EPI at CPI-FT's frozen fraction stage by stage, and mechanism variants.")
            + _methods_md(s) + _comparisons_md(s))


def markdown_pareto(s):
    return (_header("pareto", s, "Retention against plasticity as the frozen budget grows: CPI-FT's core ratio and "
                    "EPI's rho. The question: at equal frozen fraction, whose front is higher?") + _methods_md(s))


def markdown_multitask(s):
    tasks = s["tasks"]
    normalized, vs_full = s.get("average_normalized_score", {}), s.get("normalized_vs_full", {})
    rows = [[label, *(_ms(m["final_scores"][t], 2) for t in tasks), _ms(normalized.get(label))]
            for label, m in s["methods"].items()]
    diffs = [[label, *(describe_difference(d[t]) for t in tasks),
              describe_difference(vs_full[label]) if label in vs_full else "—"] for label, d in s["per_task"].items()]
    return (_header("multitask", s, "All five tasks mixed evenly in one stage of 1500 steps: the paper's main-table "
                    "setting, where the problem is interference, not forgetting. Normalised score: final / full "
                    "SFT's mean final score, per task, averaged.")
            + markdown_table(["method", *tasks, "avg normalised"], rows)
            + "\n## Against full SFT, seed by seed\n\n" + markdown_table(["method - full SFT", *tasks, "avg normalised"],
                                                                         diffs))


def markdown_drift(s):
    rows = [[label, _ms(m["overlap_consecutive"]), _ms(m["overlap_first_last"]), _ms(m["rank_correlation_first_last"]),
             f"{m['chance']['mean']:.3f}"] for label, m in s["methods"].items()]
    return (f"# drift protocol ({s['preset']} preset, seeds {s['seeds']})\n\nJaccard overlap of EPI's top-rho "
            "importance sets (snapshots every 50 steps after warm-up), and the Spearman correlation of the scores, "
            "first vs last; chance = the overlap of two random sets of that size.\n\n"
            + markdown_table(["run", "overlap, 50 steps apart", "overlap, first vs last", "rank corr., first vs last",
                              "chance"], rows))


# --- figures ------------------------------------------------------------------------------------------------------
def fig_main(s, records, folder):
    from . import plots
    import matplotlib.pyplot as plt
    labels = list(s["methods"])
    cols = 4
    fig, axes = plt.subplots(-(-len(labels) // cols), cols, figsize=(20, 3.6 * -(-len(labels) // cols)))
    for ax, label in zip(axes.flat, labels):
        R = np.array([r["accuracy_matrix"] for r in records[label]])
        stages = [st["name"] for st in records[label][0]["schedule"]["stages"]]
        plots.accuracy_heatmap(R.mean(0), records[label][0]["tasks"], stages, title=label, ax=ax)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle(f"Score after each stage, mean of {len(s['seeds'])} seeds")
    plots.save(fig, folder / "accuracy_matrices.png")
    plots.save(plots.retention_plasticity(
        {k: v for k, v in s["methods"].items() if k != s["reference"]}, records,
        title="Shifting schedule: retention vs plasticity (each small dot a seed)"), folder / "retention_vs_plasticity.png")


def fig_controls(s, records, folder):
    from . import plots
    plots.save(plots.paired_differences(s["comparisons"], ("forgetting", "plasticity"),
                                        title="Paired differences, a - b, seed by seed (mean and 95% t-interval)"),
               folder / "paired_differences.png")
    curves = {k: records[k] for k in ("full SFT", "EPI", "EPI, replay-aware importance", "EPI, beta = 0.999")}
    plots.save(plots.earlier_task_curves(curves, title="Earlier tasks' mean score during training (mean of seeds)"),
               folder / "earlier_task_curves.png")


def fig_pareto(s, records, folder):
    from . import plots
    plots.save(plots.pareto(s["points"], title="The frozen budget: CPI-FT's core ratio vs EPI's rho (each dot a seed)"),
               folder / "pareto.png")


def fig_multitask(s, records, folder):
    from . import plots
    plots.save(plots.per_task_bars(s["methods"], s["tasks"], title="One-stage mixture: final score per task "
                                   "(mean ± std over seeds)"), folder / "per_task.png")


def fig_drift(s, records, folder):
    from . import plots
    plots.save(plots.overlap_curves(s["methods"], title="Overlap of EPI's important sets against time lag"),
               folder / "overlap_vs_lag.png")


@dataclass(frozen=True)
class Protocol:
    """One experiment: which runs (``cells()`` -> [Cell], each trained for every seed), the summary computed from
    their records (label -> list of records), its markdown and its figures."""
    name: str
    question: str
    cells: Callable
    summarize: Callable
    markdown: Callable
    figures: Callable = field(default=lambda s, records, folder: None)


PROTOCOLS = {p.name: p for p in (
    Protocol("main", "how much each method forgets on the shifting schedule, and how well it still learns",
             main_cells, summarize_main, markdown_main, fig_main),
    Protocol("controls", "whether the evolution of the mask matters", controls_cells, summarize_controls,
             markdown_controls, fig_controls),
    Protocol("pareto", "whose front is higher at equal frozen fraction", pareto_cells, summarize_pareto,
             markdown_pareto, fig_pareto),
    Protocol("multitask", "EPI against full SFT when all tasks are mixed in one stage", multitask_cells,
             summarize_multitask, markdown_multitask, fig_multitask),
    Protocol("drift", "whether importance drifts without a change of data", drift_cells, summarize_drift,
             markdown_drift, fig_drift),
)}


def protocol(name):
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose from {tuple(PROTOCOLS)} or 'all'")
    return PROTOCOLS[name]


def main(argv=None):
    ap = OptionParser(prog="python -m epi_mini.experiments", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("protocols", nargs="+", help=f"{', '.join(PROTOCOLS)} or all")
    ap.add_argument("--preset", default="cpu", help="tiny, cpu (default) or gpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="default: 0 1 2 3 4")
    ap.add_argument("--workers", type=int, default=None, help="parallel processes (default: up to 2)")
    ap.add_argument("--out", default=str(RESULTS), help="results folder (default: results)")
    args = ap.parse_args(argv)
    protocols = list(PROTOCOLS) if args.protocols == ["all"] else args.protocols
    try:
        for p in protocols:
            protocol(p)
        if len(args.seeds) < 5:
            print("note: fewer than 5 seeds; the project states a direction only over >= 5 paired seeds",
                  file=sys.stderr)
        t0 = time.perf_counter()
        run_protocols(protocols, args.preset, tuple(args.seeds), args.workers, Path(args.out))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - t0:.0f}s; summaries under {args.out}/<protocol>/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
