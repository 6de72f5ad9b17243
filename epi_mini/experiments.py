"""The experiment runner: named protocols x methods x seeds, resumable, in parallel processes.

    python -m epi_mini.experiments all                    # every protocol, cpu preset, its own seeds
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

Your own method (``--method path/to/file.py:ClassName``, see :mod:`epi_mini.methods`) joins every protocol
named as one more cell: the protocol's EPI cell (:attr:`Protocol.epi_cell`) with its method replaced, and the
summary gains the paired comparison "<label> vs <that cell>" (exploratory). Such a run writes to
``runs/experiments-<ClassName>/`` unless ``--out`` says otherwise, and reads the records that ``results/``
already holds instead of training them again; the run key of a plugin run carries the sha256 of its file.

    python -m epi_mini.experiments main --method examples/my_epi.py:StickyEPI
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

from .checkpoint import atomic_write_bytes, save_json
from .config import OptionParser, TrainConfig, make_config
from .drift import DriftRecorder
from .methods import EPIUpdate, is_plugin, load_plugin, method_label, method_slug
from .metrics import (average_normalized_score, describe_difference, holm, over_seeds, paired_difference, record_metric,
                      seeds_for_half_width)
from .pretrain import init_sha256
from .train import CPU_THREADS, Run, fit, use_threads

RESULTS = Path("results")
# The primary family's protocol: as many paired seeds as this machine could give it (see PRIMARY and the README's
# half-width line: most of its half-widths would need more).
MAIN_SEEDS = (0, 1, 2, 3, 4, 5, 6, 7)
# Every exploratory protocol: three seeds, because on two cores the whole grid must fit an afternoon (a run is
# 2-5 minutes). Three paired seeds give a wide t-interval (t = 4.30): few exploratory comparisons separate, and
# those that do not are written "not separated" with their interval. Run more with --seeds.
SEEDS = (0, 1, 2)
FIGURES = ("average_score", "forgetting", "plasticity", "retention", "earlier_final", "frozen_fraction",
           "lm_loss_rise", "base_gain_kept")
CPIFT = dict(method="static", cpift_stages="schedule")       # CPI-FT on a stream whose stages are given
CORE_RATIOS = (0.01, 0.05, 0.1)                               # CPI-FT's front (0.01: the paper's)
EPI_RATIOS = (0.05, 0.1, 0.2, 0.5)                            # EPI's front
# CPI-FT's probes fine-tune the base on each task alone before its run: probe_steps (100) x 5 tasks = 500 extra
# steps at the same batch size, a third more than the 1500 every other method gets. The compute-matched arms give
# full SFT and EPI those steps too: 167 more per stage (501 in all).
COMPUTE_MATCHED = dict(steps_per_stage=667)
SCRATCH = dict(init="scratch", learning_rate=3e-3)            # training from random weights, at its own rate

# The primary family: declared once, here. Every other comparison in results/ is exploratory and labelled so.
# Endpoints: what the earlier tasks keep (their final score, and forgetting: peak before the last stage minus
# final), how well new tasks are learned (plasticity), and what the base forgets (its held-out LM-loss rise).
PRIMARY_ENDPOINTS = ("earlier_final", "forgetting", "plasticity", "lm_loss_rise")
PRIMARY_COMPARISONS = (("EPI", "full SFT"), ("EPI", "CPI-FT"), ("EPI", "static EPI score"), ("EPI", "random mask"))
HALF_WIDTH_TARGET = 0.03                # the 95% half-width each primary difference should reach
ALPHA = 0.05                            # Holm's correction across the 16 primary tests keeps the family's error at 5%


@dataclass(frozen=True)
class Cell:
    """One row of a protocol: a label, the config overrides of its runs, and, optionally, the label of a
    cell whose per-stage frozen fraction (seed by seed) it copies into its own ``isolation_schedule``."""
    label: str
    overrides: dict
    matched_to: str = None


def main_cells():
    """The primary family's five cells: EPI and the four methods it is compared with."""
    return [Cell("full SFT", dict(method="full")),
            Cell("CPI-FT", CPIFT),
            Cell("static EPI score", dict(method="static-epi")),
            Cell("random mask", dict(method="random-mask")),
            Cell("EPI", dict(method="epi"))]


def baselines_cells():
    return [Cell("full SFT (one-stage mixture)", dict(method="full", schedule="multitask")),
            Cell("full SFT", dict(method="full")),
            Cell("multi-stage SFT", dict(method="multistage")),
            Cell("CPI-FT", CPIFT),
            Cell("CPI-FT, no fusion", dict(CPIFT, cpift_fusion=False)),
            Cell("EPI", dict(method="epi")),
            Cell("full SFT, compute-matched", dict(method="full", **COMPUTE_MATCHED)),
            Cell("EPI, compute-matched", dict(method="epi", **COMPUTE_MATCHED))]


def controls_cells():
    return [Cell("full SFT", dict(method="full")),
            Cell("EPI", dict(method="epi")),
            Cell("CPI-FT", CPIFT),
            Cell("EPI at CPI-FT's frozen fraction", dict(method="epi"), matched_to="CPI-FT"),
            Cell("EPI, nothing isolated in stage 1", dict(method="epi", isolation_schedule=(0.0, 0.1, 0.1))),
            Cell("EPI, replay-aware importance", dict(method="epi", replay_importance=True)),
            Cell("EPI, base-aware importance", dict(method="epi", base_importance=True)),
            Cell("EPI, beta = 0.999", dict(method="epi", ema_beta=0.999)),
            Cell("EPI, 8-bit importance", dict(method="epi", ema_storage="int8", mask_storage="gaps"))]


def pareto_cells():
    return ([Cell("full SFT", dict(method="full"))]
            + [Cell(f"CPI-FT core {r:g}", dict(CPIFT, core_ratio=r)) for r in CORE_RATIOS]
            + [Cell(f"EPI rho {r:g}", dict(method="epi", isolation_ratio=r)) for r in EPI_RATIOS])


# On the base, the 1% cores of the five tasks overlap 0.08-0.36 (Jaccard; seeds 0 and 1): at the paper's tau = 0.1
# every pair is joined and CPI-FT's own grouping makes one stage of all five tasks, isolating nothing. At tau = 0.3
# the tasks fall into three or four groups (code and instruction, which share reversing and upper-casing, stay
# together), the paper's picture of several groups; at 0.4 and above every task is its own group.
SEVERAL_GROUPS_TAU = 0.3


def multitask_cells():
    one = dict(schedule="multitask")
    return [Cell("full SFT", dict(one, method="full")),
            Cell("EPI", dict(one, method="epi")),
            Cell("CPI-FT (its own grouping)", dict(one, method="static", cpift_stages="grouping")),
            Cell(f"CPI-FT (grouping at tau = {SEVERAL_GROUPS_TAU:g})",
                 dict(one, method="static", cpift_stages="grouping", cpift_tau=SEVERAL_GROUPS_TAU))]


def drift_cells():
    return [Cell("EPI, one-stage mixture", dict(method="epi", schedule="multitask")),
            Cell("EPI, shifting schedule", dict(method="epi"))]


def scratch_cells():
    """The control: the same methods trained from random weights (at 3e-3, the rate training from nothing
    needs), as every run of epi-mini was before it fine-tuned a base."""
    return [Cell("full SFT, from scratch", dict(method="full", **SCRATCH)),
            Cell("CPI-FT, from scratch", dict(CPIFT, **SCRATCH)),
            Cell("EPI, from scratch", dict(method="epi", **SCRATCH))]


# --- running ---------------------------------------------------------------------------------------------------
def run_key(cfg):
    """``<method>-<schedule>-seed<N>-<hash>``: the hash covers the whole config (but the device) and the weights
    the run starts from, so a rebuilt base never reuses a record trained from the old one; for a method of your
    own (``<method>`` is then its class name), the sha256 of its file too, so an edited file is a new run."""
    d = cfg.to_dict()
    d.pop("device")
    if cfg.init != "scratch":
        d["init_sha256"] = init_sha256(cfg.init, cfg.preset)
    if is_plugin(cfg.method):
        d["plugin_sha256"] = load_plugin(cfg.method).sha256
    digest = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
    return f"{method_slug(cfg.method)}-{cfg.schedule}-seed{cfg.seed}-{digest}"


def _pool(workers):
    """Worker processes for training: fresh interpreters ("spawn"), so no thread pool or lock of the parent
    process is inherited half-initialised. Used by both :func:`run_many` and :func:`run_protocols`."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _train(cfg, threads, drift=True):
    """Train one config; EPI-family runs (a method of your own that subclasses EPIUpdate too) also record how
    their importance drifts. In a worker process, a plugin method is loaded from its file here."""
    use_threads(threads)
    run = Run(cfg)
    strategy = run.make_strategy()
    epi_family = isinstance(strategy, EPIUpdate)
    recorder = DriftRecorder(every=max(10, cfg.steps_per_stage // 10)) if drift and epi_family else None
    record = fit(run, strategy, progress=False, on_step=recorder)
    if recorder is not None:
        record["drift"] = recorder.summary(run.schedule.boundaries)
    return record


def _run_one(cfg, path, threads):
    record = _train(cfg, threads)
    save_json(path, record)
    return str(path), record["timing"]["seconds"]


def default_workers():
    """Runs side by side: one per core (each with :data:`~epi_mini.train.CPU_THREADS` thread)."""
    return max(1, os.cpu_count() or 1)


def run_many(configs, workers=None, drift=False, threads=CPU_THREADS):
    """Train several configs in parallel processes and return their records, in order (nothing is written).
    The notebooks use this to run a comparison over seeds in about half the time of a loop. ``workers``: runs
    side by side (default: one per core); ``threads``: torch threads per run (the count changes float rounding)."""
    workers = max(1, min(workers or default_workers(), len(configs)))
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


def default_out(method=None):
    """Where the protocols write: ``results/``, or, with a method of your own, ``runs/experiments-<ClassName>/``,
    so that a plugin run never writes into the committed results unless told to (``out="results"``)."""
    return RESULTS if method is None else Path("runs") / f"experiments-{method_slug(method)}"


def cells_with(proto, method=None):
    """The protocol's cells, and, for ``method`` (``FILE.py:CLASS``), one more: the protocol's EPI cell with its
    method replaced, labelled by the method's label."""
    cells = proto.cells()
    if method is None:
        return cells
    label, labels = method_label(method), {c.label for c in cells}
    if proto.epi_cell not in labels:
        raise ValueError(f"protocol {proto.name} has no cell {proto.epi_cell!r} for {method} to stand in for")
    if label in labels:
        raise ValueError(f"the label {label!r} of {method} is already a cell of protocol {proto.name}: give the "
                         "class another `label` attribute")
    epi = next(c for c in cells if c.label == proto.epi_cell)
    return [*cells, Cell(label, {**epi.overrides, "method": method}, epi.matched_to)]


def run_protocols(protocols, preset="cpu", seeds=None, workers=None, out=None, overrides=None, log=print,
                  method=None, reuse=None):
    """Train every missing run of ``protocols``, then write each protocol's summary. Returns the summaries.
    ``seeds``: for every protocol (default: each protocol's own, :attr:`Protocol.seeds`). Runs are trained
    lowest seed first, so that a grid cut off holds whole seeds; a matched cell is trained as soon as its source
    run (same seed) has finished.

    ``method``: a method of your own, ``FILE.py:CLASS``, added to each protocol as one cell (:func:`cells_with`)
    and compared, paired, with the protocol's EPI cell. ``out``: default :func:`default_out`. ``reuse``: another
    results folder (e.g. ``results``) whose ``runs/`` records are read, never written, instead of training a run
    again."""
    if method is not None and not is_plugin(method):
        raise ValueError(f"invalid method={method!r}: the protocols take a method of your own, FILE.py:CLASS (the "
                         "built-in methods are cells already)")
    plugin = load_plugin(method) if method is not None else None
    out, overrides = Path(out) if out is not None else default_out(method), overrides or {}
    shared = Path(reuse) / "runs" if reuse is not None and Path(reuse).resolve() != out.resolve() else None

    def record_path(cfg):
        path = out / "runs" / f"{run_key(cfg)}.json"
        return shared / path.name if shared and not path.exists() and (shared / path.name).exists() else path
    cells = {p: cells_with(protocol(p), method) for p in protocols}
    seeds_of = {p: tuple(seeds or protocol(p).seeds) for p in protocols}
    plan = lambda: {p: _configs(cells[p], preset, seeds_of[p], overrides, record_path) for p in protocols}  # noqa: E731
    workers, threads = workers or default_workers(), CPU_THREADS
    t0, done, running = time.perf_counter(), 0, {}

    def todo():
        pending = {}
        for by_label in plan().values():
            for cfgs in by_label.values():
                for cfg in cfgs:
                    if cfg is not None and not record_path(cfg).exists():
                        pending[record_path(cfg)] = cfg
        return dict(sorted(pending.items(), key=lambda item: item[1].seed))
    pending = todo()
    if plugin is not None:
        log(f"your method: {plugin.label} ({plugin.spec}, sha256 {plugin.sha256[:12]}), one more cell in each "
            f"protocol, compared with its EPI cell; writing to {out}/"
            + (f", reading finished runs from {shared}/" if shared else ""))
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
        summaries[p] = {**proto.summarize(records), "preset": preset, "seeds": list(seeds_of[p]),
                        "runs": {label: [run_key(c) for c in cfgs] for label, cfgs in configs[p].items()}}
        if plugin is not None:  # your method against the protocol's EPI, paired by seed (exploratory)
            summaries[p]["comparisons"] = {**summaries[p].get("comparisons", {}),
                                           **compare(records, [(plugin.label, proto.epi_cell)])}
            summaries[p]["plugin"] = {**plugin.to_dict(), "compared_with": proto.epi_cell}
        save_json(out / p / "summary.json", summaries[p])
        atomic_write_bytes(out / p / "summary.md", proto.markdown(summaries[p]).encode())
        proto.figures(summaries[p], records, out / p)
    return summaries


# --- summaries ----------------------------------------------------------------------------------------------------
COMPARED = ("forgetting", "plasticity", "retention", "earlier_final", "average_score", "lm_loss_rise", "base_gain_kept")


def stage_plasticity_names(*records):
    """``plasticity_stage<k>`` for every stage k (1-based) that introduces a task in every one of ``records``:
    which stage carries a difference in plasticity. (CPI-FT's own grouping can give each seed its own stages;
    a stage some seed does not have is left out.)"""
    stages = set.intersection(*(set(r["first_stage"]) for r in records))
    return [f"plasticity_stage{k + 1}" for k in sorted(stages)]


def method_figures(records):
    """figure name -> over seeds, for one cell's records (see :func:`epi_mini.metrics.record_metric`)."""
    names = [*FIGURES, *stage_plasticity_names(*records)]
    return {name: over_seeds([record_metric(r, name) for r in records]) for name in names}


def per_stage_frozen(records):
    return [over_seeds(list(v)) for v in zip(*[r["frozen_fraction"] for r in records])]


def boundary_overlap(record):
    """What EPI's mask does when the data changes, from its refresh log (``EPIUpdate`` anchors).

    ``boundary``: for each refresh of the stage after a boundary, its overlap (Jaccard) with the set held when
    the boundary came, by that set's age in steps. ``within``: the same against a set chosen a quarter of the
    way into a stage, when the data did not change. ``at_interval``: the overlap at the first refresh at least K
    steps past the boundary (a refresh right after the boundary has seen a single batch of the new data), and
    ``within_at_same_age`` the within-stage overlap at the same age, the like-for-like reference. Means over the
    boundaries and stages."""
    history = record.get("strategy", {}).get("history", [])
    K, ends = record["config"]["mask_interval"], record["stage_boundaries"]
    if not isinstance(K, int) or len(ends) < 2 or not any("jaccard_boundary" in h for h in history):
        return None
    curves, firsts = {"boundary": {}, "within": {}}, []
    for start, end in zip([0, *ends[:-1]], ends):
        inside = [h for h in history if start < h["step"] <= end]
        for kind in ("boundary", "within"):
            for h in inside:
                if f"jaccard_{kind}" in h and (kind == "within" or start > 0):
                    age, overlap = h[f"jaccard_{kind}"]
                    curves[kind].setdefault(age, []).append(overlap)
        if start > 0:
            first = next((h for h in inside if h["step"] - start >= K and "jaccard_boundary" in h), None)
            if first is not None:
                firsts.append(first["jaccard_boundary"])
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    curves = {kind: {"age": sorted(c), "overlap": [mean(c[a]) for a in sorted(c)]} for kind, c in curves.items()}
    ages = [age for age, _ in firsts]
    within = dict(zip(curves["within"]["age"], curves["within"]["overlap"]))
    if not firsts or not all(a in within for a in ages):
        return None
    return {"curves": curves, "age": mean(ages), "at_interval": mean([o for _, o in firsts]),
            "within_at_same_age": mean([within[a] for a in ages])}


def boundary_summary(records):
    """:func:`boundary_overlap` over seeds, with the paired difference boundary - within at the same age."""
    seen = [boundary_overlap(r) for r in records]
    if any(o is None for o in seen):
        return None
    ages = sorted(set.intersection(*[set(o["curves"]["boundary"]["age"]) for o in seen]))
    within_ages = sorted(set.intersection(*[set(o["curves"]["within"]["age"]) for o in seen]))
    curve = lambda kind, a: [over_seeds([dict(zip(o["curves"][kind]["age"], o["curves"][kind]["overlap"]))[x]  # noqa: E731
                                         for o in seen]) for x in a]
    return {"age": over_seeds([o["age"] for o in seen]), "at_interval": over_seeds([o["at_interval"] for o in seen]),
            "within_at_same_age": over_seeds([o["within_at_same_age"] for o in seen]),
            "boundary_vs_within": paired_difference([o["at_interval"] for o in seen], [o["within_at_same_age"] for o in seen]),
            "curves": {"boundary": {"age": ages, "overlap": curve("boundary", ages)},
                       "within": {"age": within_ages, "overlap": curve("within", within_ages)}}}


def compare(records, pairs, names=None):
    """Paired differences (a - b), seed by seed, for each (a, b) of ``pairs``: "a vs b" -> figure -> diff. The
    figures: :data:`COMPARED` and the plasticity of every stage that introduces a task."""
    out = {}
    for a, b in pairs:
        if a in records and b in records:
            figures = names or [*COMPARED, *stage_plasticity_names(*records[a], *records[b])]
            out[f"{a} vs {b}"] = {n: paired_difference([record_metric(r, n) for r in records[a]],
                                                       [record_metric(r, n) for r in records[b]]) for n in figures}
    return out


def summarize_cells(records, pairs=()):
    tasks = next(iter(records.values()))[0]["tasks"]
    methods = {}
    for label, recs in records.items():
        finals = [dict(zip(r["tasks"], r["accuracy_matrix"][-1])) for r in recs]
        methods[label] = {**method_figures(recs), "final_scores": {t: over_seeds([f[t] for f in finals]) for t in tasks},
                          "frozen_by_stage": per_stage_frozen(recs),
                          "lm_loss_start": over_seeds([record_metric(r, "lm_loss_start") for r in recs]),
                          "lm_loss_final": over_seeds([record_metric(r, "lm_loss_final") for r in recs]),
                          "seconds": over_seeds([r["timing"]["seconds"] for r in recs])}
        boundary = boundary_summary(recs)
        if boundary is not None:
            methods[label]["boundary_overlap"] = boundary
        groups = [r.get("strategy", {}).get("groups") for r in recs]
        if all(g is not None for g in groups):  # CPI-FT: its task groups, seed by seed
            methods[label]["groups"] = groups
    return {"tasks": tasks, "methods": methods, "comparisons": compare(records, pairs)}


def primary_family(records):
    """The primary family (:data:`PRIMARY_COMPARISONS` x :data:`PRIMARY_ENDPOINTS`): each paired difference with
    its 95% t-interval, its p-value and Holm's adjusted p across the family; a direction ("lower"/"higher") only
    where the adjusted p is below :data:`ALPHA`, else "not separated". ``seeds_needed``: how many paired seeds
    the observed spread needs for a half-width of :data:`HALF_WIDTH_TARGET`."""
    tests = []
    for a, b in PRIMARY_COMPARISONS:
        for endpoint in PRIMARY_ENDPOINTS:
            d = paired_difference([record_metric(r, endpoint) for r in records[a]],
                                  [record_metric(r, endpoint) for r in records[b]])
            tests.append({"comparison": f"{a} vs {b}", "endpoint": endpoint, **d,
                          "seeds_needed": seeds_for_half_width(d["sd"], HALF_WIDTH_TARGET)})
    for t, adjusted in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = adjusted
        t["decision"] = ("not separated" if adjusted >= ALPHA or t["mean"] == 0 else
                         "higher" if t["mean"] > 0 else "lower")
    return {"endpoints": list(PRIMARY_ENDPOINTS), "comparisons": [f"{a} vs {b}" for a, b in PRIMARY_COMPARISONS],
            "alpha": ALPHA, "correction": "Holm", "target_half_width": HALF_WIDTH_TARGET, "tests": tests,
            "widest": max(t["half_width"] for t in tests)}


MAIN_PAIRS = [("EPI", "full SFT"), ("EPI", "CPI-FT"), ("EPI", "static EPI score"), ("EPI", "random mask"),
              ("CPI-FT", "full SFT")]
BASELINE_PAIRS = [("CPI-FT", "full SFT"), ("CPI-FT", "CPI-FT, no fusion"), ("multi-stage SFT", "full SFT"),
                  ("full SFT, compute-matched", "full SFT"), ("full SFT, compute-matched", "CPI-FT"),
                  ("EPI, compute-matched", "CPI-FT"), ("EPI, compute-matched", "full SFT, compute-matched")]
CONTROL_PAIRS = [("EPI at CPI-FT's frozen fraction", "CPI-FT"), ("EPI, nothing isolated in stage 1", "EPI"),
                 ("EPI, replay-aware importance", "EPI"), ("EPI, base-aware importance", "EPI"),
                 ("EPI, base-aware importance", "full SFT"), ("EPI, beta = 0.999", "EPI"),
                 ("EPI, beta = 0.999", "full SFT"), ("EPI, 8-bit importance", "EPI")]
SCRATCH_PAIRS = [("EPI, from scratch", "full SFT, from scratch"), ("EPI, from scratch", "CPI-FT, from scratch"),
                 ("CPI-FT, from scratch", "full SFT, from scratch")]


def summarize_main(records):
    return {**summarize_cells(records, MAIN_PAIRS), "primary": primary_family(records)}


def summarize_baselines(records):
    s = summarize_cells(records, BASELINE_PAIRS)
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


def summarize_scratch(records):
    return summarize_cells(records, SCRATCH_PAIRS)


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
    s["lm_loss_rise_vs_full"] = {label: paired_difference([record_metric(r, "lm_loss_rise") for r in recs],
                                                          [record_metric(r, "lm_loss_rise") for r in full])
                                 for label, recs in records.items() if label != "full SFT"}
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
        if not all("drift" in r for r in recs):  # a method of your own that keeps no EPI importance: no drift
            continue
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


TABLE_FIGURES = (("forgetting", "forgetting"), ("plasticity", "plasticity"), ("earlier_final", "earlier tasks' final"),
                 ("average_score", "average"), ("lm_loss_rise", "base LM-loss rise"),
                 ("base_gain_kept", "base gain kept"))


def _comparisons_md(s, title="Paired differences, exploratory (a - b, same seeds; mean [95% t-interval], "
                               "no correction for multiple comparisons)"):
    comparisons = s.get("comparisons", {})  # the drift protocol has none, unless a method of your own joins it
    names = [n for n in next(iter(comparisons.values()), {}) if n not in ("retention", "average_score")]
    rows = [[pair, *(describe_difference(d[n]) for n in names)] for pair, d in comparisons.items()]
    return f"\n## {title}\n\n" + markdown_table(["a vs b", *names], rows) if rows else ""


def _methods_md(s):
    stages = [n for n in next(iter(s["methods"].values())) if n.startswith("plasticity_stage")]
    rows = [[label, *(_ms(m[key]) for key, _ in TABLE_FIGURES), *(_ms(m[n]) for n in stages), _frozen(m)]
            for label, m in s["methods"].items()]
    return markdown_table(["method", *(name for _, name in TABLE_FIGURES),
                           *(f"plasticity, stage {n[16:]}" for n in stages), "frozen fraction by stage"], rows)


def _header(name, s, what):
    return (f"# {name} protocol ({s['preset']} preset, seeds {s['seeds']}; mean ± std over seeds)\n\n{what}\n\n"
            "Frozen fraction: the isolated share of the weights, averaged over each stage's steps (warm-up counts "
            "as 0), whatever a method's nominal ratio is. Base LM-loss rise: the held-out loss (nats per byte) on "
            "the base's pretraining corpus at the end minus at the start; base gain kept: the share of the base's "
            "advantage over a uniform guess left at the end.\n\n")


def primary_md(primary):
    rows = [[t["comparison"], t["endpoint"], describe_difference(t), f"{t['p']:.4f}", f"{t['p_holm']:.4f}",
             t["decision"], f"{t['half_width']:.3f}", str(t["seeds_needed"])] for t in primary["tests"]]
    return ("\n## The primary family (declared in epi_mini/experiments.py)\n\n"
            f"{len(primary['tests'])} paired comparisons, Holm-corrected at alpha = {primary['alpha']}: a direction is "
            "stated only where the adjusted p is below alpha. Half-width: of the 95% t-interval (target "
            f"{primary['target_half_width']}); seeds needed: for that target at the observed spread.\n\n"
            + markdown_table(["comparison", "endpoint", "a - b, mean [95% t-interval]", "p", "p (Holm)", "decision",
                              "half-width", "seeds needed"], rows))


def markdown_main(s):
    tasks = s["tasks"]
    rows = [[label, *(_ms(m["final_scores"][t], 2) for t in tasks)] for label, m in s["methods"].items()]
    return (_header("main", s, "The primary comparisons on the shifting schedule (math + code, then logic + "
                    "instruction, then chat, 500 steps each, 20% of every later batch replaying earlier tasks), "
                    "fine-tuning the base. CPI-FT runs on the schedule's stages, 1% cores per task, from its fused "
                    "probes.") + _methods_md(s) + primary_md(s["primary"])
            + "\n## Final score per task\n\n" + markdown_table(["method", *tasks], rows) + _comparisons_md(s))


def markdown_baselines(s):
    tasks = s["tasks"]
    rows = [[label, *(_ms(m["final_scores"][t], 2) for t in tasks), _ms(m.get("average_normalized_score"))]
            for label, m in s["methods"].items()]
    return (_header("baselines", s, "The reference points around the primary comparison (exploratory): the same data "
                    "mixed in one stage, the stages without replay (multi-stage SFT), CPI-FT without its fusion step, "
                    "and full SFT and EPI given the 500 steps CPI-FT's probes cost (compute-matched).")
            + _methods_md(s) + "\n## Final score per task\n\n"
            + markdown_table(["method", *tasks, f"avg normalised (by {s['reference']})"], rows) + _comparisons_md(s))


def markdown_controls(s):
    return (_header("controls", s, "Mechanism variants of EPI (exploratory): at CPI-FT's frozen fraction stage by "
                    "stage, nothing isolated in stage 1, importance that also keeps the replayed tasks or the base "
                    "in view, a longer memory, 8-bit importance.") + _methods_md(s) + _comparisons_md(s))


def markdown_scratch(s):
    return (_header("scratch", s, "The control: from random weights instead of the base, at 3e-3 (exploratory). "
                    "Every result of epi-mini was of this kind before it fine-tuned a base.")
            + _methods_md(s) + _comparisons_md(s))


def markdown_pareto(s):
    return (_header("pareto", s, "Retention against plasticity as the frozen budget grows: CPI-FT's core ratio and "
                    "EPI's rho (exploratory). At equal frozen fraction, whose front is higher?") + _methods_md(s)
            + _comparisons_md(s))


def markdown_multitask(s):
    tasks = s["tasks"]
    normalized, vs_full = s.get("average_normalized_score", {}), s.get("normalized_vs_full", {})
    rows = [[label, *(_ms(m["final_scores"][t], 2) for t in tasks), _ms(normalized.get(label)),
             _ms(m["lm_loss_rise"]), "; ".join(" | ".join("+".join(g) for g in gs) for gs in m.get("groups", [])[:1])]
            for label, m in s["methods"].items()]
    diffs = [[label, *(describe_difference(d[t]) for t in tasks),
              describe_difference(vs_full[label]) if label in vs_full else "—",
              describe_difference(s["lm_loss_rise_vs_full"][label])] for label, d in s["per_task"].items()]
    return (_header("multitask", s, "All five tasks mixed evenly in one stage of 1500 steps: the paper's main-table "
                    "setting, where the problem is interference, not forgetting (exploratory). Normalised score: "
                    "final / full SFT's mean final score, per task, averaged. CPI-FT's groups become its stages.")
            + markdown_table(["method", *tasks, "avg normalised", "base LM-loss rise", "CPI-FT's groups (seed 0)"], rows)
            + "\n## Against full SFT, seed by seed\n\n"
            + markdown_table(["method - full SFT", *tasks, "avg normalised", "base LM-loss rise"], diffs)
            + _comparisons_md(s))


def markdown_drift(s):
    rows = [[label, _ms(m["overlap_consecutive"]), _ms(m["overlap_first_last"]), _ms(m["rank_correlation_first_last"]),
             f"{m['chance']['mean']:.3f}"] for label, m in s["methods"].items()]
    return (f"# drift protocol ({s['preset']} preset, seeds {s['seeds']})\n\nJaccard overlap of EPI's top-rho "
            "importance sets (snapshots every 50 steps after warm-up), and the Spearman correlation of the scores, "
            "first vs last; chance = the overlap of two random sets of that size.\n\n"
            + markdown_table(["run", "overlap, 50 steps apart", "overlap, first vs last", "rank corr., first vs last",
                              "chance"], rows) + _comparisons_md(s))


# --- figures ------------------------------------------------------------------------------------------------------
def fig_main(s, records, folder):
    from . import plots
    plots.save(plots.accuracy_grid(s, records, title=f"Score after each stage, mean of {len(s['seeds'])} seeds"),
               folder / "accuracy_matrices.png")
    plots.save(plots.retention_plasticity(s["methods"], records, title="Shifting schedule, from the base: retention "
                                          "vs plasticity (each small dot a seed)"), folder / "retention_vs_plasticity.png")
    plots.save(plots.paired_differences(s["comparisons"], ("forgetting", "earlier_final", "plasticity", "lm_loss_rise"),
                                        title="Paired differences, a - b, seed by seed (mean and 95% t-interval, "
                                              "uncorrected)"), folder / "paired_differences.png")
    plots.save(plots.lm_loss_curves(records, title="The base's held-out LM loss during SFT (mean of seeds)"),
               folder / "base_lm_loss.png")
    plots.save(plots.boundary_curves({k: v["boundary_overlap"] for k, v in s["methods"].items()
                                      if "boundary_overlap" in v},
                                     title="The mask at a stage boundary: overlap with an earlier set, by its age"),
               folder / "boundary_overlap.png")


def fig_baselines(s, records, folder):
    from . import plots
    plots.save(plots.accuracy_grid(s, records, title=f"Score after each stage, mean of {len(s['seeds'])} seeds"),
               folder / "accuracy_matrices.png")
    plots.save(plots.paired_differences(s["comparisons"], ("forgetting", "earlier_final", "plasticity", "lm_loss_rise"),
                                        title="Paired differences, a - b (exploratory)"), folder / "paired_differences.png")


def fig_controls(s, records, folder):
    from . import plots
    plots.save(plots.paired_differences(s["comparisons"], ("forgetting", "earlier_final", "plasticity", "lm_loss_rise"),
                                        title="Paired differences, a - b, seed by seed (exploratory)"),
               folder / "paired_differences.png")
    curves = {k: records[k] for k in ("full SFT", "EPI", "EPI, base-aware importance", "EPI, beta = 0.999")}
    plots.save(plots.earlier_task_curves(curves, title="Earlier tasks' mean score during training (mean of seeds)"),
               folder / "earlier_task_curves.png")
    plots.save(plots.lm_loss_curves(curves, title="The base's held-out LM loss during SFT (mean of seeds)"),
               folder / "base_lm_loss.png")


def fig_scratch(s, records, folder):
    from . import plots
    plots.save(plots.accuracy_grid(s, records, title="From random weights: score after each stage"),
               folder / "accuracy_matrices.png")


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
    seeds: tuple = SEEDS          # the seeds `python -m epi_mini.experiments` runs it with unless told otherwise
    epi_cell: str = "EPI"         # the cell a method of your own stands in for, and is compared with (--method)


PROTOCOLS = {p.name: p for p in (
    Protocol("main", "the primary family: EPI against full SFT, CPI-FT, its never-refreshed score and a random mask",
             main_cells, summarize_main, markdown_main, fig_main, MAIN_SEEDS),
    Protocol("baselines", "the reference points: the one-stage mixture, no replay, no fusion, compute-matched arms",
             baselines_cells, summarize_baselines, markdown_baselines, fig_baselines),
    Protocol("controls", "EPI's mechanism variants, among them protecting the base", controls_cells, summarize_controls,
             markdown_controls, fig_controls),
    Protocol("pareto", "whose front is higher at equal frozen fraction", pareto_cells, summarize_pareto,
             markdown_pareto, fig_pareto, epi_cell=f"EPI rho {TrainConfig.isolation_ratio:g}"),
    Protocol("multitask", "EPI against full SFT when all tasks are mixed in one stage", multitask_cells,
             summarize_multitask, markdown_multitask, fig_multitask),
    Protocol("drift", "whether importance drifts without a change of data", drift_cells, summarize_drift,
             markdown_drift, fig_drift, epi_cell="EPI, shifting schedule"),
    Protocol("scratch", "the control: the same methods from random weights", scratch_cells, summarize_scratch,
             markdown_scratch, fig_scratch, epi_cell="EPI, from scratch"),
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
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help=f"for every protocol named (default: each protocol's own: main {MAIN_SEEDS[0]}-{MAIN_SEEDS[-1]}, "
                         f"the others {SEEDS[0]}-{SEEDS[-1]})")
    ap.add_argument("--workers", type=int, default=None,
                    help="runs side by side, one torch thread each (default: one per core)")
    ap.add_argument("--out", default=None, help="results folder (default: results; with --method, "
                                                "runs/experiments-<ClassName>)")
    ap.add_argument("--method", default=None, metavar="FILE.py:CLASS",
                    help="your own method: one more cell in every protocol named, compared with its EPI cell "
                         "(README: Your own method)")
    args = ap.parse_args(argv)
    protocols = list(PROTOCOLS) if args.protocols == ["all"] else args.protocols
    try:
        for p in protocols:
            protocol(p)
        if args.seeds is not None and len(args.seeds) < 3:
            print("note: fewer than 3 seeds; a paired t-interval over 2 seeds (t = 12.7) almost never separates",
                  file=sys.stderr)
        t0 = time.perf_counter()
        out = Path(args.out) if args.out else default_out(args.method)
        run_protocols(protocols, args.preset, args.seeds and tuple(args.seeds), args.workers, out,
                      method=args.method, reuse=RESULTS if args.method else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - t0:.0f}s; summaries under {out}/<protocol>/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
