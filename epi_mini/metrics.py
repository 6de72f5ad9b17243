"""Continual-learning metrics over an accuracy matrix, defined once and used everywhere.

``R[i][j]`` is the score (in [0, 1]) on task ``j`` after stage ``i`` (rows: stages in training order;
columns: tasks). ``first_stage[j]`` is the stage that introduces task ``j``: in a classic continual-learning
stream it is ``j`` itself, here a stage can introduce several tasks at once (or, for multi-task SFT, all).

* average score         -- mean of the last row.
* forgetting            -- per task, the best score it had at the end of any stage before the last, minus
  its final score; averaged over the tasks introduced before the last stage. This is the definition of
  Chaudhry et al. (2018) used by Mammoth; Avalanche instead subtracts from the score right after the task's
  own stage. Positive = forgotten.
* backward transfer BWT -- mean over the same tasks of ``R[-1][j] - R[first_stage[j]][j]`` (Lopez-Paz &
  Ranzato, 2017); negative = forgetting.
* plasticity            -- mean, over stages, of the mean score of the tasks a stage introduces, measured
  at the end of that stage: how well new things are still learned.
* retention             -- mean, over the tasks introduced before the last stage, of the final score as a
  share of the best score the task had before the last stage (1 = nothing lost).
* base LM-loss rise      -- the model's held-out language-modelling loss on the base's pretraining corpus (nats
  per byte) at the end, minus at the start: how much of what pretraining taught SFT overwrote (0 = nothing).
* base gain kept         -- ``(ln V - final loss) / (ln V - starting loss)``: the share of the base's advantage
  over a uniform guess (``ln V`` for a vocabulary of V tokens) that is left at the end; 1 = all, 0 = SFT left a
  model no better than guessing, negative = worse than guessing.
* average normalised score -- mean over tasks of ``final / reference``, where the reference is the score of
  a reference run (here: full multi-task SFT with the same budget), the EPI paper's summary number.

Statistics over seeds live here too (:func:`over_seeds`, :func:`summarize_seeds`): every figure the project
reports is a mean with its spread over seeds, never a single run.
"""
import math

import numpy as np


def accuracy_matrix(stage_scores, tasks) -> np.ndarray:
    """Stack a list of per-stage ``{task: score}`` dicts into ``R`` (stages x tasks), in ``tasks`` order."""
    return np.array([[float(s[t]) for t in tasks] for s in stage_scores], dtype=float)


def _earlier_tasks(R, first_stage):
    """Columns of the tasks introduced before the last stage (the only ones that can be forgotten)."""
    return [j for j, s in enumerate(first_stage) if s < len(R) - 1]


def average_score(R) -> float:
    return float(np.mean(np.asarray(R, dtype=float)[-1]))


def forgetting_per_task(R, first_stage) -> dict:
    """Column -> ``max(R[first:-1, j]) - R[-1, j]`` for tasks introduced before the last stage."""
    R = np.asarray(R, dtype=float)
    return {j: float(R[first_stage[j]:-1, j].max() - R[-1, j]) for j in _earlier_tasks(R, first_stage)}


def forgetting(R, first_stage) -> float:
    """Mean forgetting over tasks introduced before the last stage; 0.0 when there are none."""
    per_task = forgetting_per_task(R, first_stage)
    return float(np.mean(list(per_task.values()))) if per_task else 0.0


def backward_transfer(R, first_stage) -> float:
    R = np.asarray(R, dtype=float)
    cols = _earlier_tasks(R, first_stage)
    return float(np.mean([R[-1, j] - R[first_stage[j], j] for j in cols])) if cols else 0.0


def plasticity(R, first_stage) -> float:
    R = np.asarray(R, dtype=float)
    per_stage = [np.mean([R[i, j] for j, s in enumerate(first_stage) if s == i])
                 for i in range(len(R)) if i in first_stage]
    return float(np.mean(per_stage))


def retention(R, first_stage) -> float:
    """Mean of ``R[-1, j] / max(R[first:-1, j])`` over earlier tasks that had a positive best score."""
    R = np.asarray(R, dtype=float)
    ratios = [R[-1, j] / R[first_stage[j]:-1, j].max() for j in _earlier_tasks(R, first_stage)
              if R[first_stage[j]:-1, j].max() > 0]
    return float(np.mean(ratios)) if ratios else 1.0


def average_normalized_score(final_scores, reference_scores) -> float:
    """Mean of ``final[t] / reference[t]`` over tasks (dicts keyed by task). A reference of 0 is an error:
    normalising by it would be meaningless."""
    ratios = []
    for t, ref in reference_scores.items():
        if ref <= 0:
            raise ValueError(f"reference score of task {t!r} is {ref}; cannot normalise by it")
        ratios.append(final_scores[t] / ref)
    return float(np.mean(ratios))


def earlier_final(R, first_stage) -> float:
    """Mean final score of the tasks introduced before the last stage (what forgetting eats into)."""
    R = np.asarray(R, dtype=float)
    cols = _earlier_tasks(R, first_stage)
    return float(np.mean(R[-1, cols])) if cols else float("nan")


def _lm_losses(record):
    lm = record.get("lm_loss") or {}
    return lm, [x for x in lm.get("loss", []) if x is not None]


def lm_loss_start(record) -> float:
    """The held-out LM loss of the weights a run was given, before its method touched them: the base's own (its
    provenance's figure, measured on the same committed windows), or, from random weights, a uniform guess's
    ``ln V``. Not the curve's first point, which is measured once the method is set up: CPI-FT merges its probes
    into the base before its first step, and measured from there its rise would hide what the merge overwrote."""
    lm, losses = _lm_losses(record)
    if not losses:
        return float("nan")
    base = record.get("base")
    if base:
        return float(base["heldout_loss"]) if base.get("heldout_loss") is not None else float(losses[0])
    return float(lm["uniform"])


def lm_loss_rise(record) -> float:
    """Final held-out LM loss minus :func:`lm_loss_start` (NaN where none was measured)."""
    _, losses = _lm_losses(record)
    return float(losses[-1] - lm_loss_start(record)) if losses else float("nan")


def base_gain_kept(record) -> float:
    """Share of the starting weights' gain over a uniform guess left at the end (NaN for a start with no gain
    worth the name, under 0.05 nats/byte: random weights)."""
    lm, losses = _lm_losses(record)
    start = lm_loss_start(record)
    if not losses or lm["uniform"] - start < 0.05:
        return float("nan")
    return float((lm["uniform"] - losses[-1]) / (lm["uniform"] - start))


LM_FIGURES = {"lm_loss_rise": lm_loss_rise, "base_gain_kept": base_gain_kept, "lm_loss_start": lm_loss_start,
              "lm_loss_final": lambda r: float(_lm_losses(r)[1][-1]) if _lm_losses(r)[1] else float("nan"),
              # the loss once the method is set up, before the first step (differs from the start for CPI-FT)
              "lm_loss_setup": lambda r: float(_lm_losses(r)[1][0]) if _lm_losses(r)[1] else float("nan")}


def plasticity_by_stage(R, first_stage) -> list:
    """Per stage that introduces a task (in order): the mean score of its new tasks at the end of that stage.
    :func:`plasticity` is their mean; this shows which stage carries a difference."""
    R = np.asarray(R, dtype=float)
    return [float(np.mean([R[i, j] for j, s in enumerate(first_stage) if s == i]))
            for i in range(len(R)) if i in first_stage]


def record_metric(record, name) -> float:
    """One figure of a run record by name: ``average_score``, ``forgetting``, ``backward_transfer``,
    ``plasticity``, ``retention`` or ``earlier_final`` (from its accuracy matrix), ``frozen_fraction`` (the
    mean isolated share of the weights over all training steps), or, from its held-out LM-loss curve,
    ``lm_loss_rise``, ``base_gain_kept``, ``lm_loss_start``, ``lm_loss_setup`` and ``lm_loss_final``; ``plasticity_stage<k>`` is
    the plasticity of stage k alone (1-based; a stage that introduces no task has none)."""
    if name in LM_FIGURES:
        return LM_FIGURES[name](record)
    if name.startswith("plasticity_stage"):
        stages = sorted(set(record["first_stage"]))
        k = int(name[len("plasticity_stage"):]) - 1
        if k not in stages:
            raise ValueError(f"{name}: stage {k + 1} introduces no task (stages that do: {[s + 1 for s in stages]})")
        return plasticity_by_stage(record["accuracy_matrix"], record["first_stage"])[stages.index(k)]
    if name == "frozen_fraction":
        steps = [s["steps"] for s in record["schedule"]["stages"]]
        # math.fsum, not np.dot: a BLAS dot product rounds differently on different CPUs (AVX2 vs AVX-512
        # kernels disagree in the last digit), and a figure recomputed from the records must not depend on that.
        return math.fsum(f * n for f, n in zip(record["frozen_fraction"], steps)) / sum(steps)
    fns = {"average_score": lambda R, f: average_score(R), "forgetting": forgetting,
           "backward_transfer": backward_transfer, "plasticity": plasticity, "retention": retention,
           "earlier_final": earlier_final}
    if name not in fns:
        raise ValueError(f"unknown figure {name!r}; one of {sorted([*fns, *LM_FIGURES, 'frozen_fraction'])}")
    return fns[name](record["accuracy_matrix"], record["first_stage"])


def summarize(R, first_stage) -> dict:
    """All matrix metrics at once, as plain floats (what a run record stores)."""
    return {
        "average_score": average_score(R),
        "forgetting": forgetting(R, first_stage),
        "backward_transfer": backward_transfer(R, first_stage),
        "plasticity": plasticity(R, first_stage),
    }


def figures_match(recomputed, committed, rel_tol=1e-9, abs_tol=1e-12, where="") -> list:
    """Where two JSON-like structures differ, as a list of ``"path: a != b"`` lines (empty: they match).

    Numbers match within ``rel_tol`` (relative) or ``abs_tol`` (absolute), NaN matches NaN; everything else
    (keys, lengths, strings, booleans, None) must be equal. This is how a figure recomputed from the run records
    is compared with the committed one: summation order -- and so the last digit of a mean -- depends on the
    CPU and the BLAS or SIMD kernel it picks, while a real change of the records moves a figure by far more
    than 1e-9 of itself.
    """
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    if number(recomputed) and number(committed):
        a, b = float(recomputed), float(committed)
        same = (a != a and b != b) or math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)
        return [] if same else [f"{where or '.'}: {a!r} != {b!r}"]
    if isinstance(recomputed, dict) and isinstance(committed, dict):
        if set(recomputed) != set(committed):
            return [f"{where or '.'}: keys differ: {sorted(set(recomputed) ^ set(committed), key=str)[:5]}"]
        return [line for k in recomputed for line in figures_match(recomputed[k], committed[k], rel_tol, abs_tol,
                                                                   f"{where}/{k}")]
    if isinstance(recomputed, (list, tuple)) and isinstance(committed, (list, tuple)):
        if len(recomputed) != len(committed):
            return [f"{where or '.'}: lengths differ: {len(recomputed)} != {len(committed)}"]
        return [line for i, (a, b) in enumerate(zip(recomputed, committed))
                for line in figures_match(a, b, rel_tol, abs_tol, f"{where}[{i}]")]
    return [] if recomputed == committed else [f"{where or '.'}: {recomputed!r} != {committed!r}"]


# --- statistics over seeds ------------------------------------------------------------------------------
def mean_and_spread(values) -> tuple:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of a list of numbers."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def over_seeds(values) -> dict:
    """``{"mean", "std", "values"}`` of one figure over seeds (JSON-ready; std is the sample std)."""
    m, s = mean_and_spread(values)
    return {"mean": m, "std": s, "values": [float(v) for v in values]}


# Two-sided 95% quantiles of Student's t with df = 1..30 degrees of freedom (beyond 30: the normal's 1.96
# is within 4% of t and we use it); from any statistics table.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_975(df) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom (table above; 1.96 beyond 30)."""
    return T_975[df - 1] if df <= len(T_975) else 1.96


def _regularized_beta(a, b, x) -> float:
    """I_x(a, b), by the continued fraction of Numerical Recipes (section 6.4); enough for p-values."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below the mean: use the symmetry
        return 1.0 - _regularized_beta(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)) / a
    c, d, f = 1.0, 1.0 - (a + b) * x / (a + 1), 0.0
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    f = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
            c = 1.0 + numerator / c
            c = c if abs(c) > 1e-300 else 1e-300
            f *= c * d
        if abs(c * d - 1.0) < 1e-12:
            break
    return front * f


def t_test_p(mean, sd, n) -> float:
    """Two-sided p-value of a one-sample t-test of ``mean == 0`` (``n`` paired differences with sample std
    ``sd``): ``I_{df/(df+t^2)}(df/2, 1/2)``."""
    if sd == 0 or not math.isfinite(sd):
        return 1.0 if mean == 0 or not math.isfinite(mean) else 0.0
    t, df = mean / (sd / math.sqrt(n)), n - 1
    return _regularized_beta(df / 2, 0.5, df / (df + t * t))


def holm(pvalues) -> list:
    """Holm's step-down adjustment of a family of p-values (same order as given): the i-th smallest is multiplied
    by (m - i + 1), and adjusted values never decrease along that order. Reject where the adjusted p < alpha: this
    controls the chance of any false direction in the family at alpha, as Bonferroni does, with more power."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def seeds_for_half_width(sd, target, most=1000) -> int:
    """The fewest paired seeds whose 95% t-interval half-width ``t_975(n-1) * sd / sqrt(n)`` is at most
    ``target``, for a spread of differences ``sd`` (a pilot's estimate); ``most`` caps the answer."""
    n = 2
    while n < most and t_975(n - 1) * sd / math.sqrt(n) > target:
        n += 1
    return n


def paired_difference(a, b) -> dict:
    """Compare two methods run with the same seeds (same initial weights, same data order), seed by seed.

    ``a``, ``b``: one value per seed, in the same seed order. Returns the mean of ``a - b`` with a two-sided
    95% Student-t interval on it (``low``, ``high``, ``half_width``), the spread of the differences ``sd``, the
    t-test's two-sided ``p``, ``n``, and in how many seeds ``a`` was above / below ``b``. ``separated`` is True
    when the interval excludes 0: only then may a direction be stated (for a comparison that belongs to a
    family, after the family's correction: :func:`holm`); otherwise the two are "not separated" by these seeds.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size < 2:
        raise ValueError(f"a paired interval needs at least 2 seeds, got {d.size}")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = t_975(d.size - 1) * sd / math.sqrt(d.size)
    return {"mean": mean, "low": float(mean - half), "high": float(mean + half), "half_width": float(half),
            "sd": sd, "p": t_test_p(mean, sd, d.size), "n": int(d.size),
            "above": int((d > 0).sum()), "below": int((d < 0).sum()), "separated": bool(mean - half > 0 or mean + half < 0),
            "values": [float(x) for x in d]}


def describe_difference(diff, digits=3) -> str:
    """A paired difference in words: ``+0.031 [+0.012, +0.050] (higher in 5/5 seeds)`` or ``... not separated``."""
    f = f"{{:+.{digits}f}}"
    interval = f"{f.format(diff['mean'])} [{f.format(diff['low'])}, {f.format(diff['high'])}]"
    if not diff["separated"]:
        return f"{interval}, not separated ({diff['n']} seeds)"
    word, count = ("higher", diff["above"]) if diff["mean"] > 0 else ("lower", diff["below"])
    return f"{interval}, {word} in {count}/{diff['n']} seeds"


def summarize_seeds(records) -> dict:
    """Mean and spread over seeds (one record each) of the matrix metrics, each task's final score, and, for
    every task introduced before the last stage, its best score before the last stage and its final score."""
    tasks = records[0]["tasks"]
    out = {"seeds": [r["config"]["seed"] for r in records], "metrics": {}, "final_scores": {}, "forgetting": {}}
    for k in records[0]["metrics"]:
        out["metrics"][k] = mean_and_spread([r["metrics"][k] for r in records])
    for j, t in enumerate(tasks):
        out["final_scores"][t] = mean_and_spread([r["accuracy_matrix"][-1][j] for r in records])
        first = records[0]["first_stage"][j]
        if first < len(records[0]["accuracy_matrix"]) - 1:
            best = [max(row[j] for row in r["accuracy_matrix"][first:-1]) for r in records]
            final = [r["accuracy_matrix"][-1][j] for r in records]
            out["forgetting"][t] = {"best_before_last_stage": mean_and_spread(best),
                                    "final": mean_and_spread(final),
                                    "fell_by_half": [b > 0 and f <= 0.5 * b for b, f in zip(best, final)]}
    return out
