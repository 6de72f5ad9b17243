"""``mask_interval="auto"``: refresh EPI's isolated set when it has drifted, not every K steps.

The EPI paper names the choice of K as a limitation and adapting it from training dynamics as future work.
:class:`AdaptiveIsolation` is this project's simple answer: every ``auto_check_every`` steps it estimates how
far the set a refresh would pick *now* has drifted from the isolated one (1 - Jaccard, on a fixed random
sample of ``drift_sample`` entries, so the check costs O(sample), not O(N)), and refreshes when the drift
exceeds ``drift_threshold``. Everything else is :class:`~epi_mini.epi.EvolvingIsolation`.
"""
import torch

from .epi import EvolvingIsolation, _affine_stats
from .isolation import indices_to_masks


class AdaptiveIsolation(EvolvingIsolation):
    auto_check_every = 10

    def __init__(self, params, drift_threshold=0.2, drift_sample=4096, seed=0, **options):
        options.setdefault("mask_interval", "auto")
        if options["mask_interval"] != "auto":
            raise ValueError(f"invalid mask_interval={options['mask_interval']!r} for AdaptiveIsolation: must be 'auto'")
        if not (isinstance(drift_threshold, (int, float)) and 0 < drift_threshold <= 1):
            raise ValueError(f"invalid drift_threshold={drift_threshold!r}: must be in (0, 1]")
        super().__init__(params, **options)  # checks the options (and refuses normalizer='rank' with 'auto')
        self.drift_threshold = drift_threshold
        # A fixed random sample of entries: per tensor, a number of positions proportional to its size.
        gen, total = torch.Generator().manual_seed(seed), sum(p.numel() for p in self.params.values())
        self._sample = {n: torch.randint(p.numel(), (max(1, drift_sample * p.numel() // total),), generator=gen)
                        .to(p.device) for n, p in self.params.items()}
        self._sample_member = None  # which sampled entries the current isolated set holds

    def _due(self, t):  # a refresh is considered: the first, a pending one (set_isolation_ratio), or every check
        return t >= 1 and (self._refresh_next or not self.history or t % self.auto_check_every == 0)

    def _wants_refresh(self):  # and taken if it is the first or a pending one, or if the set has drifted
        return self._refresh_next or not self.history or self.estimated_drift() > self.drift_threshold

    @torch.no_grad()
    def refresh(self):
        super().refresh()
        member = indices_to_masks(self.isolated_indices(), self.params)
        self._sample_member = torch.cat([member[n].view(-1)[i] for n, i in self._sample.items()])

    @torch.no_grad()
    def estimated_drift(self):
        """1 - Jaccard between the current isolated set and the one a refresh would pick now, on the sample."""
        values, scores = [], self.scores
        for n, idx in self._sample.items():
            shift, scale = _affine_stats(self.normalizer, scores[n].float())
            values.append((scores[n].reshape(-1)[idx].float() - shift) / scale)
        values = torch.cat(values)
        k = max(1, round(self.isolation_ratio * values.numel()))
        would = values >= torch.kthvalue(values, values.numel() - k + 1).values
        inter, union = int((would & self._sample_member).sum()), int((would | self._sample_member).sum())
        return 1 - inter / union if union else 0.0

    def state_dict(self):
        member = self._sample_member
        return {**super().state_dict(), "sample_member": None if member is None else member.clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        member = state["sample_member"]
        self._sample_member = None if member is None else member.to(next(iter(self.params.values())).device)
