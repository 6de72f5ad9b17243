"""Your own method in one file: EPI with hysteresis on release (README, "Your own method").

    python -m epi_mini --method examples/my_epi.py:StickyEPI
    python -m epi_mini.experiments main --method examples/my_epi.py:StickyEPI

EPI chooses its isolated set anew at every refresh: a weight that slips just below the top-rho line is released,
and may well be isolated again K steps later. StickyEPI gives the weights it already isolates a head start: at a
refresh their score counts (1 + margin) times, so one is released only when a newcomer beats it by more than the
margin. Only ``select()`` changes; the importance, rho, K, warm-up and the masked step are EPI's, built from the
run's config as ``--method epi`` builds them.
"""
from epi_mini.epi import normalize, top_fraction
from epi_mini.methods import EPIUpdate


class StickyEPI(EPIUpdate):
    label = "sticky EPI"  # the name tables and comparisons use (default: the class name)
    margin = 0.5          # a newcomer must score 50% more than an isolated weight to take its place

    def select(self):
        scores = {n: normalize(s, self.normalizer) for n, s in self.scores.items()}  # per tensor, flat
        for n, idx in self.isolated_indices().items():  # the set held now (none before the first refresh)
            scores[n][idx.long()] *= 1 + self.margin
        return top_fraction(scores, self.isolation_ratio, normalizer=None)  # the global top-rho, as EPI's
