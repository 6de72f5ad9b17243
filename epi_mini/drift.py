"""Measuring importance drift during training: the paper's central observation, as numbers.

:class:`DriftRecorder` is an ``on_step`` callback for :func:`epi_mini.train.fit`. Every ``every`` steps
after the strategy's warm-up it takes the top-``ratio`` set of the current importance scores (what a
refresh at that moment would isolate) and, on a fixed sample of entries, the scores themselves. From the
snapshots, :meth:`DriftRecorder.summary` computes the Jaccard overlap of every pair of sets, averaged by
time lag (the *overlap-vs-lag curve*), rank correlations of scores, and each layer's share of the set.
"""
import re

import torch

from .epi import jaccard, rank_correlation, top_fraction


def layer_group(name):
    """Parameter name -> a coarse layer label: "embeddings", "block 0", ..., "final norm"."""
    m = re.search(r"\.h\.(\d+)\.", name)
    if m:
        return f"block {m.group(1)}"
    return "embeddings" if ("wte" in name or "wpe" in name) else "final norm" if "ln_f" in name else name


class DriftRecorder:
    def __init__(self, every=50, ratio=None, sample=20000, seed=0):
        self.every, self.ratio, self.sample, self.seed = every, ratio, sample, seed
        self.steps, self.sets, self.scores = [], [], []

    def __call__(self, step, run, strategy):
        done = step + 1
        if done % self.every or done <= getattr(strategy, "warmup_steps", 0):
            return
        ratio = self.ratio if self.ratio is not None else strategy.isolation_ratio
        picked = top_fraction(strategy.scores, ratio, strategy.normalizer)
        sets = {}
        for n, p in strategy.params.items():
            mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
            mask[picked[n].long()] = True
            sets[n] = mask.cpu()
        self.steps.append(done)
        self.sets.append(sets)
        self.scores.append({n: s.detach().float().cpu().clone() for n, s in strategy.scores.items()})

    def overlap_matrix(self):
        k = len(self.sets)
        J = [[1.0] * k for _ in range(k)]
        for i in range(k):
            for j in range(i + 1, k):
                J[i][j] = J[j][i] = jaccard(self.sets[i], self.sets[j])
        return J

    def summary(self):
        """JSON-ready drift figures (empty when fewer than two snapshots were taken)."""
        if len(self.sets) < 2:
            return {}
        J = self.overlap_matrix()
        k = len(J)
        lags = {lag: [J[i][i + lag] for i in range(k - lag)] for lag in range(1, k)}
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
        }
