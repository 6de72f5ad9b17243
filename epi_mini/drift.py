"""Measuring importance drift: how much two isolated sets, or two score snapshots, agree.

The paper's central observation is that *which* parameters matter changes during training. The tools here
turn that into numbers: :func:`jaccard` (overlap of two sets), :func:`rank_correlation` (agreement of two
score snapshots), :func:`layer_share` (where a set lives). :class:`DriftRecorder` is an ``on_step`` callback
for :func:`epi_mini.train.fit`: every ``every`` steps after the strategy's warm-up it takes the top-``ratio``
set of the current importance scores (what a refresh at that moment would isolate) and, on a fixed sample of
entries, the scores themselves; :meth:`DriftRecorder.summary` turns the snapshots into the overlap-vs-lag
curve, rank correlations, and each layer's share of the set.
"""
import re

import torch

from .epi import EPS, top_fraction
from .isolation import indices_to_masks, overlap_counts


def jaccard(a, b):
    """|A and B| / |A or B| of two sets given as name -> bool tensor (1.0 when both are empty)."""
    inter, union = overlap_counts({n: m.view(-1).nonzero().squeeze(1) for n, m in a.items()},
                                  {n: m.view(-1).nonzero().squeeze(1) for n, m in b.items()})
    return inter / union if union else 1.0


def rank_correlation(a, b, sample=None, seed=0):
    """Spearman rank correlation of two score snapshots (name -> tensor), over all entries or a fixed random
    ``sample`` of them (same positions in both)."""
    x = torch.cat([a[n].reshape(-1).float() for n in a])
    y = torch.cat([b[n].reshape(-1).float() for n in a])
    if sample is not None and sample < x.numel():
        pick = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))[:sample]
        x, y = x[pick.to(x.device)], y[pick.to(y.device)]
    rx, ry = (torch.argsort(torch.argsort(v)).float() for v in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / ((rx.norm() * ry.norm()) + EPS))


def layer_share(isolated):
    """Fraction of each tensor that is isolated: name -> float."""
    return {n: float(m.float().mean()) for n, m in isolated.items()}


def layer_group(name):
    """Parameter name -> a coarse layer label: "embeddings", "block 0", ..., "final norm"."""
    m = re.search(r"\.h\.(\d+)\.", name)
    if m:
        return f"block {m.group(1)}"
    return "embeddings" if ("wte" in name or "wpe" in name) else "final norm" if "ln_f" in name else name


class DriftRecorder:
    """``fit(run, on_step=DriftRecorder(every=50))`` on an EPI run: snapshots of its importance over time."""

    def __init__(self, every=50, ratio=None, sample=20000, seed=0):
        self.every, self.ratio, self.sample, self.seed = every, ratio, sample, seed
        self.steps, self.sets, self.scores = [], [], []

    def __call__(self, step, run, strategy):
        done = step + 1
        if done % self.every or done <= strategy.warmup_steps:
            return
        ratio = self.ratio if self.ratio is not None else strategy.isolation_ratio
        picked = top_fraction(strategy.scores, ratio, strategy.normalizer)
        self.steps.append(done)
        self.sets.append({n: m.cpu() for n, m in indices_to_masks(picked, strategy.params).items()})
        self.scores.append({n: s.detach().float().cpu().clone() for n, s in strategy.scores.items()})

    def overlap_matrix(self):
        k = len(self.sets)
        J = [[1.0] * k for _ in range(k)]
        for i in range(k):
            for j in range(i + 1, k):
                J[i][j] = J[j][i] = jaccard(self.sets[i], self.sets[j])
        return J

    def summary(self, boundaries=()):
        """JSON-ready drift figures (empty when fewer than two snapshots were taken).

        With the schedule's stage ``boundaries`` (the step each stage ends at), the overlap-vs-lag curve is
        also split into pairs of snapshots taken within one stage (the data mixture did not change between
        them) and pairs that straddle a boundary, so that drift can be told apart from a change of data.
        ``chance`` is the overlap of two random sets of the same size, rho / (2 - rho)."""
        if len(self.sets) < 2:
            return {}
        J = self.overlap_matrix()
        k = len(J)
        lags = {lag: [J[i][i + lag] for i in range(k - lag)] for lag in range(1, k)}
        stage = [sum(step > b for b in boundaries) for step in self.steps]  # a snapshot at a boundary ends its stage
        split = {}
        for name, same in (("within_stage", True), ("across_boundary", False)):
            pairs = {lag: [J[i][i + lag] for i in range(k - lag) if (stage[i] == stage[i + lag]) == same]
                     for lag in range(1, k)}
            split[name] = {"lag_steps": [lag * self.every for lag, v in pairs.items() if v],
                           "overlap": [sum(v) / len(v) for v in pairs.values() if v]}
        fraction = sum(int(m.sum()) for m in self.sets[0].values()) / sum(m.numel() for m in self.sets[0].values())
        groups = sorted({layer_group(n) for n in self.sets[0]}, key=lambda g: (not g.startswith("emb"), g))
        share = {g: [] for g in groups}
        for sets in self.sets:
            total = sum(int(m.sum()) for m in sets.values()) or 1
            for g in groups:
                share[g].append(sum(int(m.sum()) for n, m in sets.items() if layer_group(n) == g) / total)
        rc = lambda a, b: rank_correlation(a, b, sample=self.sample, seed=self.seed)  # noqa: E731
        return {
            "steps": self.steps,
            "lag_steps": [lag * self.every for lag in lags],
            "overlap_by_lag": [sum(v) / len(v) for v in lags.values()],
            "overlap_consecutive": sum(lags[1]) / len(lags[1]),
            "overlap_first_last": J[0][-1],
            "rank_correlation_consecutive": [rc(self.scores[i], self.scores[i + 1]) for i in range(k - 1)],
            "rank_correlation_first_last": rc(self.scores[0], self.scores[-1]),
            "layer_share": share,
            "chance": fraction / (2 - fraction),
            **split,
        }
