"""The experiment runner: named protocols x methods x seeds, resumable, in parallel processes.

    python -m epi_mini.experiments all                    # every protocol, cpu preset, seeds 0 1 2
    python -m epi_mini.experiments main forgetting --seeds 0 1 2 3 --workers 2

Each run is one :func:`epi_mini.train.fit` call. Its record is written to ``results/runs/<key>.json``, where
the key is a hash of the run's full config, so a run shared by two protocols is trained once and a finished
run is never redone (delete the file to redo it). Each protocol then writes ``results/<protocol>/summary.json``
and ``summary.md`` (mean ± sample std over seeds) and its figures.

A protocol is data (:class:`Protocol`, all of them in :data:`PROTOCOLS`): its cells (label -> config
overrides), the summary it computes from the cells' records, the table it writes and its figures.

| protocol     | echoes                             | what it measures                                      |
|--------------|------------------------------------|-------------------------------------------------------|
| `main`       | EPI main table, CPI-FT Table 1     | per-task final scores and average normalised score     |
| `forgetting` | CPI-FT Table 2 (A -> B)            | Delta A (change of A after B) and Delta B per method   |
| `drift`      | EPI's drift analysis               | overlap of top-rho importance sets vs time lag         |
| `sweep`      | EPI's sensitivity to rho and K     | retention and plasticity for each (rho, K) cell        |
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checkpoint import atomic_write_bytes, save_json
from .config import make_config
from .drift import DriftRecorder
from .metrics import average_normalized_score, over_seeds, retention
from .train import Run, fit

RESULTS = Path("results")
FORGETTING_TASKS = ("math", "code")            # A: multi-step arithmetic (GSM8K-like), B: code
SWEEP_RATIOS = (0.05, 0.1, 0.3)
SWEEP_INTERVALS = (5, 20, 100, "auto")
DRIFT_RATIOS = (0.05, 0.1, 0.3)


def main_cells():
    return [("full SFT (multi-task)", dict(method="full", schedule="multitask")),
            ("full SFT (shifting)", dict(method="full")),
            ("multi-stage SFT", dict(method="multistage")),
            ("static (CPI-FT)", dict(method="static")),
            ("static EPI score", dict(method="static-epi")),
            ("EPI", dict(method="epi"))]


def forgetting_cells():
    two = dict(schedule="two_task", tasks=FORGETTING_TASKS)
    return [("full SFT", dict(method="full", **two)), ("multi-stage SFT", dict(method="multistage", **two)),
            ("static (CPI-FT)", dict(method="static", **two)), ("EPI", dict(method="epi", **two))]


def drift_cells():
    return [(f"EPI rho={r}", dict(method="epi", isolation_ratio=r)) for r in DRIFT_RATIOS]


def sweep_cells():
    return [(f"rho={r} K={k}", dict(method="epi", isolation_ratio=r, mask_interval=k))
            for r in SWEEP_RATIOS for k in SWEEP_INTERVALS]


def run_key(cfg):
    d = cfg.to_dict()
    d.pop("device")
    digest = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.method}-{cfg.schedule}-seed{cfg.seed}-{digest}"


def _pool(workers):
    """Worker processes for training: fresh interpreters ("spawn"), so no thread pool or lock of the parent
    process is inherited half-initialised. Used by both :func:`run_many` and :func:`run_protocols`."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _run_one(cfg, path, threads):
    """Worker: train one config, attach drift figures for EPI runs, write the record atomically."""
    record = _train(cfg, threads, drift=True)
    save_json(path, record)
    return str(path), record["timing"]["seconds"]


def run_many(configs, workers=2, drift=False):
    """Train several configs in parallel processes and return their records, in order (nothing is written).
    The notebooks use this to run a comparison over seeds in about half the time of a loop."""
    workers = max(1, min(workers, os.cpu_count() or 1, len(configs)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    if workers == 1:
        return [_train(cfg, threads, drift) for cfg in configs]
    with _pool(workers) as pool:
        return list(pool.map(_train, configs, [threads] * len(configs), [drift] * len(configs)))


def _train(cfg, threads, drift):
    torch.set_num_threads(threads)
    run = Run(cfg)
    recorder = DriftRecorder(every=max(10, cfg.steps_per_stage // 10)) if drift and cfg.method == "epi" else None
    record = fit(run, progress=False, on_step=recorder)
    if recorder is not None:
        record["drift"] = recorder.summary()
    return record


def run_protocols(protocols, preset="cpu", seeds=(0, 1, 2), workers=None, out=RESULTS, overrides=None, log=print):
    """Train every missing run of ``protocols``, then write each protocol's summary. Returns the summaries."""
    out = Path(out)
    overrides = overrides or {}
    cells = {p: [(label, [make_config(preset, seed=s, **{**kw, **overrides}) for s in seeds])
                 for label, kw in protocol(p).cells()] for p in protocols}
    todo = {}
    for p in protocols:
        for _, cfgs in cells[p]:
            for cfg in cfgs:
                path = out / "runs" / f"{run_key(cfg)}.json"
                if not path.exists():
                    todo[path] = cfg
    workers = workers or max(1, min(2, os.cpu_count() or 1, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    cells_total = sum(len(c) for p in protocols for _, c in cells[p])
    log(f"{len(todo)} runs to train ({cells_total} cells, some shared between protocols or already done), "
        f"{workers} worker(s) x {threads} thread(s)")
    t0 = time.perf_counter()
    if todo:
        with _pool(workers) as pool:
            futures = [pool.submit(_run_one, cfg, path, threads) for path, cfg in todo.items()]
            for i, f in enumerate(as_completed(futures), 1):
                path, seconds = f.result()
                log(f"[{i}/{len(todo)}] {Path(path).name} ({seconds:.0f}s, {time.perf_counter() - t0:.0f}s elapsed)")
    summaries = {}
    for p in protocols:
        records = {label: [json.loads((out / "runs" / f"{run_key(c)}.json").read_text()) for c in cfgs]
                   for label, cfgs in cells[p]}
        proto = protocol(p)
        summaries[p] = proto.summarize(records)
        summaries[p]["preset"], summaries[p]["seeds"] = preset, list(seeds)
        summaries[p]["runs"] = {label: [run_key(c) for c in cfgs] for label, cfgs in cells[p]}
        save_json(out / p / "summary.json", summaries[p])
        title, intro, headers, rows = proto.table(summaries[p])
        atomic_write_bytes(out / p / "summary.md", f"# {title}\n\n{intro}\n\n{markdown_table(headers, rows)}".encode())
        proto.figures(summaries[p], records, out / p)
    return summaries


def markdown_table(headers, rows):
    """The one table writer: a header row, a separator, one line per row (cells are strings)."""
    lines = [headers, ["---"] * len(headers), *rows]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)




def _fmt(d, digits=3):
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


# --- summarisers -------------------------------------------------------------------------------------------
def summarize_main(records):
    tasks = next(iter(records.values()))[0]["tasks"]
    ref_label = "full SFT (multi-task)"
    reference = {t: float(np.mean([r["accuracy_matrix"][-1][j] for r in records[ref_label]]))
                 for j, t in enumerate(tasks)}
    # Normalise over the tasks the reference learned at all (all of them at the cpu preset).
    reference = {t: v for t, v in reference.items() if v > 0}
    methods = {}
    for label, recs in records.items():
        finals = [dict(zip(r["tasks"], r["accuracy_matrix"][-1])) for r in recs]
        methods[label] = {
            "final_scores": {t: over_seeds([f[t] for f in finals]) for t in tasks},
            "average_score": over_seeds([r["metrics"]["average_score"] for r in recs]),
            "average_normalized_score": over_seeds([average_normalized_score(f, reference) if reference else float("nan")
                                             for f in finals]),
            "forgetting": over_seeds([r["metrics"]["forgetting"] for r in recs]),
            "plasticity": over_seeds([r["metrics"]["plasticity"] for r in recs]),
            "retention": over_seeds([retention(r["accuracy_matrix"], r["first_stage"]) for r in recs]),
            "seconds": over_seeds([r["timing"]["seconds"] for r in recs]),
        }
    return {"tasks": tasks, "reference": ref_label, "reference_scores": reference, "methods": methods}


def summarize_forgetting(records):
    a, b = FORGETTING_TASKS
    out = {}
    for label, recs in records.items():
        # R rows: after stage A, after stage B; columns: A, B.
        out[label] = {"score_A_after_A": over_seeds([r["accuracy_matrix"][0][0] for r in recs]),
                      "delta_A": over_seeds([r["accuracy_matrix"][1][0] - r["accuracy_matrix"][0][0] for r in recs]),
                      "delta_B": over_seeds([r["accuracy_matrix"][1][1] - r["accuracy_matrix"][0][1] for r in recs]),
                      "score_B_after_B": over_seeds([r["accuracy_matrix"][1][1] for r in recs])}
    return {"task_A": a, "task_B": b, "methods": out}


def summarize_drift(records):
    out = {}
    for label, recs in records.items():
        d = [r["drift"] for r in recs]
        out[label] = {"lag_steps": d[0]["lag_steps"],
                      "overlap_by_lag": [over_seeds(v) for v in zip(*[x["overlap_by_lag"] for x in d])],
                      "overlap_consecutive": over_seeds([x["overlap_consecutive"] for x in d]),
                      "overlap_first_last": over_seeds([x["overlap_first_last"] for x in d]),
                      "rank_correlation_first_last": over_seeds([x["rank_correlation_first_last"] for x in d]),
                      "layer_share_first": {g: over_seeds([x["layer_share"][g][0] for x in d]) for g in d[0]["layer_share"]},
                      "layer_share_last": {g: over_seeds([x["layer_share"][g][-1] for x in d]) for g in d[0]["layer_share"]}}
    return {"methods": out}


def summarize_sweep(records):
    cells = {}
    for label, recs in records.items():
        cells[label] = {"retention": over_seeds([retention(r["accuracy_matrix"], r["first_stage"]) for r in recs]),
                        "plasticity": over_seeds([r["metrics"]["plasticity"] for r in recs]),
                        "forgetting": over_seeds([r["metrics"]["forgetting"] for r in recs]),
                        "average_score": over_seeds([r["metrics"]["average_score"] for r in recs]),
                        "refreshes": over_seeds([r["strategy"]["refreshes"] for r in recs])}
    return {"ratios": list(SWEEP_RATIOS), "intervals": [str(k) for k in SWEEP_INTERVALS], "cells": cells}


# --- tables: (title, intro, headers, rows) -----------------------------------------------------------------
def table_main(s):
    tasks = s["tasks"]
    rows = [[label, *(_fmt(m["final_scores"][t], 2) for t in tasks), _fmt(m["average_score"]),
             _fmt(m["average_normalized_score"]), _fmt(m["forgetting"]), _fmt(m["plasticity"])]
            for label, m in s["methods"].items()]
    return (f"main protocol ({s['preset']} preset, seeds {s['seeds']}; mean ± std over seeds)",
            f"Final held-out score per task. Average normalised score: final / {s['reference']}'s mean final "
            "score, per task, averaged.",
            ["method", *tasks, "average", "avg normalised", "forgetting", "plasticity"], rows)


def table_forgetting(s):
    rows = [[label, _fmt(m["score_A_after_A"]), _fmt(m["delta_A"]), _fmt(m["delta_B"])] for label, m in s["methods"].items()]
    return (f"forgetting protocol: {s['task_A']} (A) then {s['task_B']} (B), {s['preset']} preset, seeds {s['seeds']}",
            "Delta A = score on A after B minus after A (negative = forgotten); Delta B = gain on B during stage B.",
            ["method", "A after A", "Delta A", "Delta B"], rows)


def table_drift(s):
    rows = [[label, _fmt(m["overlap_consecutive"]), _fmt(m["overlap_first_last"]), _fmt(m["rank_correlation_first_last"])]
            for label, m in s["methods"].items()]
    return (f"drift protocol ({s['preset']} preset, seeds {s['seeds']})",
            "Jaccard overlap of the top-rho importance sets: between consecutive snapshots, and between the first "
            "(after warm-up) and the last; Spearman correlation of the scores, first vs last.",
            ["run", "overlap, consecutive", "overlap, first vs last", "rank corr., first vs last"], rows)


def table_sweep(s):
    rows = [[label, _fmt(m["retention"]), _fmt(m["plasticity"]), _fmt(m["average_score"]), f"{m['refreshes']['mean']:.0f}"]
            for label, m in s["cells"].items()]
    return (f"sweep protocol: EPI over rho x K ({s['preset']} preset, seeds {s['seeds']})",
            "Retention: final score of earlier tasks as a share of their best; plasticity: new tasks' score at the "
            "end of their stage.", ["cell", "retention", "plasticity", "average score", "refreshes"], rows)


# --- figures -----------------------------------------------------------------------------------------------
def fig_main(s, records, folder):
    from . import plots
    import matplotlib.pyplot as plt
    labels = list(s["methods"])
    fig, axes = plt.subplots(2, 3, figsize=(16, 7.5))
    for ax, label in zip(axes.flat, labels):
        R = np.array([r["accuracy_matrix"] for r in records[label]])
        stages = [st["name"] for st in records[label][0]["schedule"]["stages"]]
        plots.accuracy_heatmap(R.mean(0), records[label][0]["tasks"], stages, title=label, ax=ax)
    fig.suptitle(f"Score after each stage, mean of {len(s['seeds'])} seeds")
    plots.save(fig, folder / "accuracy_matrices.png")
    plots.save(plots.retention_plasticity(
        {k: v for k, v in s["methods"].items() if k != s["reference"]},
        title="Retention vs plasticity on the shifting schedule (mean ± std over seeds)"),
        folder / "retention_vs_plasticity.png")


def fig_forgetting(s, records, folder):
    from . import plots
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = list(s["methods"])
    x = np.arange(len(labels))
    for off, key, name in ((-0.2, "delta_A", f"Delta A ({s['task_A']})"), (0.2, "delta_B", f"Delta B ({s['task_B']})")):
        ax.bar(x + off, [s["methods"][m][key]["mean"] for m in labels], 0.4,
               yerr=[s["methods"][m][key]["std"] for m in labels], capsize=3, label=name)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, labels)
    ax.set_ylabel("score change during stage B")
    ax.set_title(f"A -> B: what A loses, what B gains ({len(s['seeds'])} seeds, ± std)")
    ax.legend()
    plots.save(fig, folder / "deltas.png")


def fig_drift(s, records, folder):
    from . import plots
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for label, m in s["methods"].items():
        mean = [v["mean"] for v in m["overlap_by_lag"]]
        std = [v["std"] for v in m["overlap_by_lag"]]
        ax.errorbar(m["lag_steps"], mean, yerr=std, marker="o", ms=3, capsize=2, label=label)
    ax.set_xlabel("time lag between snapshots (steps)")
    ax.set_ylabel("Jaccard overlap of top-rho sets")
    ax.set_ylim(0, 1)
    ax.set_title(f"Importance drifts: overlap falls with lag ({len(s['seeds'])} seeds, ± std)")
    ax.legend()
    plots.save(fig, folder / "overlap_vs_lag.png")


def fig_sweep(s, records, folder):
    from . import plots
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, key in zip(axes, ("retention", "plasticity")):
        grid = np.array([[s["cells"][f"rho={r} K={k}"][key]["mean"] for k in s["intervals"]] for r in s["ratios"]])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                        color="white" if grid[i, j] < 0.6 else "black")
        ax.set_xticks(range(len(s["intervals"])), s["intervals"])
        ax.set_yticks(range(len(s["ratios"])), s["ratios"])
        ax.set_xlabel("mask interval K")
        ax.set_ylabel("isolation ratio rho")
        ax.set_title(f"EPI {key} (mean of {len(s['seeds'])} seeds)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    plots.save(fig, folder / "sweep_heatmap.png")
    plots.save(plots.retention_plasticity(s["cells"], title="EPI sweep: retention vs plasticity (± std)"),
               folder / "sweep_scatter.png")


@dataclass(frozen=True)
class Protocol:
    """One experiment: which runs (``cells()`` -> [(label, config overrides)], trained for every seed), the
    summary computed from their records (label -> list of records), its markdown table and its figures."""
    name: str
    echoes: str
    cells: Callable
    summarize: Callable
    table: Callable
    figures: Callable


PROTOCOLS = {p.name: p for p in (
    Protocol("main", "EPI main table, CPI-FT Table 1", main_cells, summarize_main, table_main, fig_main),
    Protocol("forgetting", "CPI-FT Table 2 (A -> B)", forgetting_cells, summarize_forgetting, table_forgetting,
             fig_forgetting),
    Protocol("drift", "EPI's drift analysis", drift_cells, summarize_drift, table_drift, fig_drift),
    Protocol("sweep", "EPI's sensitivity to rho and K", sweep_cells, summarize_sweep, table_sweep, fig_sweep),
)}


def protocol(name):
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose from {tuple(PROTOCOLS)} or 'all'")
    return PROTOCOLS[name]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m epi_mini.experiments", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("protocols", nargs="+", help=f"{', '.join(PROTOCOLS)} or all")
    ap.add_argument("--preset", default="cpu", help="tiny, cpu (default) or gpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=None, help="parallel processes (default: up to 2)")
    ap.add_argument("--out", default=str(RESULTS), help="results folder (default: results)")
    args = ap.parse_args(argv)
    protocols = list(PROTOCOLS) if args.protocols == ["all"] else args.protocols
    try:
        for p in protocols:
            protocol(p)
        if len(args.seeds) < 3:
            print("note: fewer than 3 seeds; the project reports comparisons over >= 3", file=sys.stderr)
        t0 = time.perf_counter()
        run_protocols(protocols, args.preset, tuple(args.seeds), args.workers, Path(args.out))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - t0:.0f}s; summaries under {args.out}/<protocol>/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
