"""Figures for records: one message per figure, titled, labelled, readable at a glance."""
import os

import matplotlib.pyplot as plt
import numpy as np

from .checkpoint import output_error


# One line style and marker per task, so that tasks whose curves lie on top of each other (two tasks at 0,
# say) can still be told apart.
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def accuracy_heatmap(R, tasks, stage_names, title="Score on each task after each stage", ax=None, spread=None,
                     colorbar=True):
    """The accuracy matrix as a heatmap (rows: after stage i; columns: tasks), values printed in the cells,
    with a colour bar for the score scale (0 to 1)."""
    R = np.asarray(R, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.3 * len(tasks) + 3, 0.7 * len(R) + 1.8))
    image = ax.imshow(R, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            text = f"{R[i, j]:.2f}" + (f"\n±{spread[i][j]:.2f}" if spread is not None else "")
            ax.text(j, i, text, ha="center", va="center", color="white" if R[i, j] < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(R)), [f"after {s}" for s in stage_names])
    ax.set_xlabel("task evaluated")
    ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="held-out score", fraction=0.05, pad=0.03)
    return ax


def task_curves(records, title="Held-out score per task during training", ax=None):
    """Per-task score curves (mean over records, shaded min-max), one line style and marker per task; the
    stage boundaries are grey vertical lines and each stage is named above the plot."""
    if isinstance(records, dict):
        records = [records]
    first = records[0]
    if ax is None:
        _, ax = plt.subplots(figsize=(8.5, 3.8))
    steps = first["eval_curve"]["step"]
    every = max(1, len(steps) // 12)   # about a dozen markers per line, however often it was evaluated
    n = len(first["tasks"])
    for i, task in enumerate(first["tasks"]):
        ys = np.array([r["eval_curve"]["scores"][task] for r in records])
        # Later lines are drawn thinner, with smaller hollow markers: where curves coincide, each shows.
        line, = ax.plot(steps, ys.mean(0), label=task, ls=LINE_STYLES[i % len(LINE_STYLES)], lw=1.0 + 0.3 * (n - 1 - i),
                        marker=MARKERS[i % len(MARKERS)], markersize=3.5 + 1.2 * (n - 1 - i), markevery=every,
                        markerfacecolor="none", markeredgewidth=1.2)
        if len(records) > 1:
            ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
    bounds = first["stage_boundaries"]
    for b in bounds[:-1]:
        ax.axvline(b, color="grey", lw=0.8, alpha=0.7)
    stages = [s["name"] for s in first["schedule"]["stages"]] if "schedule" in first else []
    if len(stages) == len(bounds):
        starts = [0] + bounds[:-1]
        top = ax.secondary_xaxis("top")
        top.set_xticks([(a + b) / 2 for a, b in zip(starts, bounds)],
                       [f"stage {i + 1}: {name}" for i, name in enumerate(stages)], fontsize=8)
        top.tick_params(length=0)
    ax.set_xlim(0, bounds[-1])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training step (grey lines: stage boundaries)")
    ax.set_ylabel("held-out score")
    seeds = f" ({len(records)} seeds: mean, shaded min-max)" if len(records) > 1 else ""
    ax.set_title(title + seeds)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return ax


def save(fig_or_ax, path):
    """Save a figure atomically (temporary file, then rename); a failed write raises
    :class:`~epi_mini.checkpoint.OutputError` naming the file."""
    fig = getattr(fig_or_ax, "figure", fig_or_ax)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise output_error(path, e) from None
    finally:
        plt.close(fig)


def retention_plasticity(points, records=None, title="Retention vs plasticity", ax=None):
    """Methods on the retention-plasticity plane (label -> {"retention": {mean, std}, "plasticity": {...}}),
    with error bars of ± std; with ``records`` (label -> list of run records), each seed as a small dot of the
    same colour. Up and to the right is better: keeps more of the old tasks and still learns the new ones."""
    from .metrics import record_metric
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.8))
    for label, m in points.items():
        bar = ax.errorbar(m["plasticity"]["mean"], m["retention"]["mean"], xerr=m["plasticity"]["std"],
                          yerr=m["retention"]["std"], fmt="o", capsize=3, label=label)
        if records and label in records:
            ax.scatter([record_metric(r, "plasticity") for r in records[label]],
                       [record_metric(r, "retention") for r in records[label]], s=10, alpha=0.5,
                       color=bar.lines[0].get_color())
    ax.set_xlabel("plasticity: new tasks' score at the end of their stage")
    ax.set_ylabel("retention: earlier tasks' final / best score")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return ax


def paired_differences(comparisons, names, title="Paired differences", ax=None):
    """Each comparison ("a vs b" -> figure -> paired difference) as its mean with the 95% interval, one panel
    per figure name: an interval that does not cross 0 is a separated difference."""
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 0.45 * len(comparisons) + 1.6), sharey=True)
    labels = list(comparisons)
    for ax, name in zip(np.atleast_1d(axes), names):
        for i, pair in enumerate(labels):
            d = comparisons[pair][name]
            ax.errorbar(d["mean"], i, xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o", capsize=3,
                        color="C0" if d["separated"] else "grey")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel(f"{name}: a - b (blue: interval excludes 0)")
    np.atleast_1d(axes)[0].invert_yaxis()  # the first comparison on top (the y axis is shared)
    fig.suptitle(title, fontsize=10)
    return fig


def earlier_task_curves(runs, title="Earlier tasks during training", ax=None):
    """Mean held-out score of the tasks introduced before the last stage, over training, for each label
    (label -> records; mean over seeds), with the stage boundaries dashed and named."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.8))
    first = next(iter(runs.values()))[0]
    earlier = [t for t, s in zip(first["tasks"], first["first_stage"]) if s < len(first["stage_boundaries"]) - 1]
    steps = first["eval_curve"]["step"]
    for label, recs in runs.items():
        ys = np.array([[np.mean([r["eval_curve"]["scores"][t][i] for t in earlier]) for i in range(len(steps))]
                       for r in recs])
        ax.plot(steps, ys.mean(0), label=label)
    for b, stage in zip(first["stage_boundaries"][:-1], first["schedule"]["stages"][1:]):
        ax.axvline(b, color="grey", ls="--", lw=0.8)
        ax.text(b, 1.0, f" {stage['name']} starts", fontsize=7, va="top", color="grey")
    ax.set(xlabel="training step", ylabel=f"mean score of {', '.join(earlier)}", ylim=(-0.02, 1.02))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return ax


def pareto(points, title="The frozen budget"):
    """Per-seed points (label -> [{"frozen_fraction", "retention", "plasticity", ...}]) of two families of cells,
    against the frozen fraction: retention, plasticity, and the retention-plasticity plane."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    families = {"CPI-FT": "s", "EPI": "o", "full SFT": "*"}
    for k, (label, pts) in enumerate(points.items()):
        marker = next((m for f, m in families.items() if label.startswith(f)), "x")
        color = f"C{k}"
        frozen = [p["frozen_fraction"] for p in pts]
        for ax, (x, y) in zip(axes, ((frozen, [p["retention"] for p in pts]), (frozen, [p["plasticity"] for p in pts]),
                                     ([p["plasticity"] for p in pts], [p["retention"] for p in pts]))):
            ax.scatter(x, y, marker=marker, color=color, s=22, alpha=0.7, label=label if ax is axes[0] else None)
            ax.scatter([np.mean(x)], [np.mean(y)], marker=marker, color=color, s=90, edgecolor="black")
        axes[2].annotate(f"{np.mean(frozen):.3f}", (np.mean([p["plasticity"] for p in pts]),
                                                     np.mean([p["retention"] for p in pts])), fontsize=7,
                         xytext=(4, 4), textcoords="offset points")
    axes[0].set(xlabel="frozen fraction (mean over training)", ylabel="retention")
    axes[1].set(xlabel="frozen fraction (mean over training)", ylabel="plasticity")
    axes[2].set(xlabel="plasticity", ylabel="retention")
    axes[2].set_title("big markers: mean of seeds, labelled with their frozen fraction", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def per_task_bars(methods, tasks, title="Final score per task"):
    """Grouped bars: each method's mean final score per task, with ± std."""
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 3, 3.8))
    width = 0.8 / len(methods)
    for k, (label, m) in enumerate(methods.items()):
        x = np.arange(len(tasks)) + (k - (len(methods) - 1) / 2) * width
        ax.bar(x, [m["final_scores"][t]["mean"] for t in tasks], width, yerr=[m["final_scores"][t]["std"] for t in tasks],
               capsize=2, label=label)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set(ylabel="final held-out score", ylim=(0, 1))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def overlap_curves(methods, title="Overlap vs lag"):
    """The drift protocol's overlap-vs-lag curves (label -> {"curves": name -> {lag_steps, overlap}, "chance"})."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for k, (label, m) in enumerate(methods.items()):
        for style, (name, c) in zip(("-", "--"), m["curves"].items()):
            ax.errorbar(c["lag_steps"], [v["mean"] for v in c["overlap"]], yerr=[v["std"] for v in c["overlap"]],
                        fmt=style, marker="o", ms=3, capsize=2, color=f"C{k}", label=f"{label}: {name}")
        ax.axhline(m["chance"]["mean"], color=f"C{k}", ls=":", lw=1)
    ax.text(0.99, 0.02, "dotted: two random sets of the same size", transform=ax.transAxes, ha="right", fontsize=7)
    ax.set(xlabel="lag between snapshots (steps)", ylabel="Jaccard overlap of top-rho sets", ylim=(0, 1))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return fig


def accuracy_grid(summary, records, title="Score after each stage", cols=4):
    """Every cell's mean accuracy matrix, one heatmap per cell, in a grid (a protocol's overview)."""
    labels = list(summary["methods"])
    rows = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, label in zip(axes.flat, labels):
        R = np.array([r["accuracy_matrix"] for r in records[label]])
        stages = [st["name"] for st in records[label][0]["schedule"]["stages"]]
        accuracy_heatmap(R.mean(0), records[label][0]["tasks"], stages, title=label, ax=ax, colorbar=False)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle(title)
    return fig


def lm_loss_curves(runs, title="The base's held-out LM loss during SFT", ax=None):
    """The held-out language-modelling loss on the base's corpus over training (label -> records; mean over
    seeds, shaded min-max), with a uniform guess's loss dotted: what SFT makes the base forget."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.8))
    first = next(iter(runs.values()))[0]
    for label, recs in runs.items():
        steps = recs[0]["lm_loss"]["step"]
        ys = np.array([r["lm_loss"]["loss"] for r in recs], dtype=float)
        line, = ax.plot(steps, ys.mean(0), label=label)
        if len(recs) > 1:
            ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
    for b in first["stage_boundaries"][:-1]:
        ax.axvline(b, color="grey", ls="--", lw=0.8)
    ax.axhline(first["lm_loss"]["uniform"], color="black", ls=":", lw=1)
    ax.text(0, first["lm_loss"]["uniform"], " a uniform guess", fontsize=7, va="bottom")
    ax.set(xlabel="training step (dashed: stage boundaries)", ylabel="held-out LM loss (nats per byte)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return ax


def boundary_curves(methods, title="The mask at a stage boundary", ax=None):
    """For each method (label -> its ``boundary_overlap`` summary): the overlap of refreshed sets with the set held
    at a stage boundary (solid) and with a set chosen a quarter of the way into a stage (dashed), against that set's age.
    Where the solid curve falls below the dashed one, the mask moved further because the data changed."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    for k, (label, b) in enumerate(methods.items()):
        for style, kind, name in (("-", "boundary", "since the boundary"), ("--", "within", "within a stage")):
            c = b["curves"][kind]
            ax.errorbar(c["age"], [v["mean"] for v in c["overlap"]], yerr=[v["std"] for v in c["overlap"]], fmt=style,
                        marker="o", ms=3, capsize=2, color=f"C{k}", label=f"{label}: {name}")
    ax.set(xlabel="age of the earlier set (steps)", ylabel="Jaccard overlap with the earlier set", ylim=(0, 1))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return ax


def method_comparison(runs, title="Methods side by side"):
    """Methods side by side (label -> records, the same seeds), in one figure of three panels: earlier tasks' mean
    score during training (what forgetting eats into), the base's held-out LM loss during training (what SFT
    overwrites of the base), and the retention-plasticity plane (each seed a small dot; up and right is better).
    Each method keeps its colour in every panel."""
    from .metrics import over_seeds, record_metric
    fig, axes = plt.subplots(1, 3, figsize=(19, 4.8))
    earlier_task_curves(runs, title="Earlier tasks' mean held-out score during training", ax=axes[0])
    lm_loss_curves(runs, title="The base's held-out LM loss during SFT", ax=axes[1])
    points = {label: {name: over_seeds([record_metric(r, name) for r in recs]) for name in ("retention", "plasticity")}
              for label, recs in runs.items()}
    retention_plasticity(points, runs, title="Retention vs plasticity" + (" (small dots: seeds)" if any(
        len(recs) > 1 for recs in runs.values()) else ""), ax=axes[2])
    fig.suptitle(title)
    return fig
