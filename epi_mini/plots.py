"""Figures for records: one message per figure, titled, labelled, readable at a glance."""
import os

import matplotlib.pyplot as plt
import numpy as np


def accuracy_heatmap(R, tasks, stage_names, title="Score on each task after each stage", ax=None, spread=None):
    """The accuracy matrix as a heatmap (rows: after stage i; columns: tasks), values printed in the cells."""
    R = np.asarray(R, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.3 * len(tasks) + 2, 0.7 * len(R) + 1.6))
    ax.imshow(R, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            text = f"{R[i, j]:.2f}" + (f"\n±{spread[i][j]:.2f}" if spread is not None else "")
            ax.text(j, i, text, ha="center", va="center", color="white" if R[i, j] < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(R)), [f"after {s}" for s in stage_names])
    ax.set_xlabel("task evaluated")
    ax.set_title(title)
    return ax


def task_curves(records, title="Held-out score per task during training", ax=None):
    """Per-task score curves (mean over records, shaded min-max), with the stage boundaries dashed."""
    if isinstance(records, dict):
        records = [records]
    first = records[0]
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.6))
    steps = first["eval_curve"]["step"]
    for task in first["tasks"]:
        ys = np.array([r["eval_curve"]["scores"][task] for r in records])
        line, = ax.plot(steps, ys.mean(0), label=task)
        if len(records) > 1:
            ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
    for b in first["stage_boundaries"][:-1]:
        ax.axvline(b, color="grey", ls="--", lw=0.8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training step (dashed: stage boundaries)")
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
