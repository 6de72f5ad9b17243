"""Figures for records: one message per figure, titled, labelled, readable at a glance."""
import os

import matplotlib.pyplot as plt
import numpy as np


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
    """Save a figure atomically (temporary file, then rename)."""
    fig = getattr(fig_or_ax, "figure", fig_or_ax)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def retention_plasticity(points, title="Retention vs plasticity", ax=None):
    """Scatter of methods (label -> {"retention": {mean, std}, "plasticity": {mean, std}}) with error bars.
    Up and to the right is better: keeps more of the old tasks and still learns the new ones."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, m in points.items():
        ax.errorbar(m["plasticity"]["mean"], m["retention"]["mean"], xerr=m["plasticity"]["std"],
                    yerr=m["retention"]["std"], fmt="o", capsize=3, label=label)
    ax.set_xlabel("plasticity: new tasks' score at the end of their stage")
    ax.set_ylabel("retention: earlier tasks' final / best score")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return ax
