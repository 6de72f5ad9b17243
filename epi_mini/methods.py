"""The methods, by name: each turns a :class:`~epi_mini.train.Run` into an update strategy for the loop.

| method        | strategy                                                                           |
|---------------|------------------------------------------------------------------------------------|
| `full`        | :class:`~epi_mini.strategy.PlainUpdate` on the schedule as given                    |
| `multistage`  | :class:`~epi_mini.strategy.PlainUpdate` on the stages without replay                 |
| `static`      | :class:`~epi_mini.baselines.CoreRegionPipeline`: CPI-FT's cores, frozen stage by stage |
| `static-epi`  | :class:`EPIUpdate` with ``mask_interval="once"``: EPI's score, never refreshed        |
| `random-mask` | :class:`RandomMaskUpdate`: a random set of the same size, refreshed every K steps     |
| `epi`         | :class:`EPIUpdate`: Evolving Parameter Isolation                                      |

The EPI-family methods (``static-epi``, ``random-mask``, ``epi``) also take ``isolation_schedule`` (one rho
per stage, e.g. ``(0, 0.1, 0.1)``: nothing isolated before the first stage boundary, or another method's
frozen fraction stage by stage) and, for ``epi``, ``replay_importance`` (:class:`ReplayAwareEPIUpdate`).

To add a method, write its strategy (an :class:`~epi_mini.strategy.UpdateStrategy`) and add a
:class:`Method` to :data:`METHODS` (with a ``label``, the name in words that titles and printouts use);
the command line, the config checks and the runner pick it up.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from .adaptive import AdaptiveIsolation
from .baselines import CoreRegionPipeline
from .epi import EvolvingIsolation, normalize, top_fraction
from .strategy import PlainUpdate, UpdateStrategy


class EPIUpdate(EvolvingIsolation, UpdateStrategy):
    """:class:`~epi_mini.epi.EvolvingIsolation` as the loop's strategy: a summary for the run record, and,
    with ``stage_ratios``, rho set anew as each stage begins (the set is refreshed right away)."""

    def __init__(self, params, stage_ratios=(), **options):
        super().__init__(params, **options)
        self.stage_ratios = tuple(stage_ratios)

    def begin_stage(self, stage):
        if self.stage_ratios:
            self.set_isolation_ratio(self.stage_ratios[stage])

    def summary(self):
        return {"refreshes": len(self.history), "history": self.history,
                "skipped_steps": self.skipped_steps,
                "state_bytes": self.state_bytes()}


class AdaptiveEPIUpdate(AdaptiveIsolation, EPIUpdate):
    """EPI with ``mask_interval="auto"`` (:class:`~epi_mini.adaptive.AdaptiveIsolation`) as the loop's strategy."""


class RandomMaskUpdate(EPIUpdate):
    """The control "is isolation just a regulariser?": every K steps, a uniformly random set of the same size
    as EPI's (drawn from a generator seeded by ``seed`` and the refresh's number) instead of the top-rho."""

    def __init__(self, params, seed=0, **options):
        super().__init__(params, **options)
        self.seed = seed

    def select(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + len(self.history))
        noise = {n: torch.rand(s.shape, generator=gen).to(s.device) for n, s in self.scores.items()}
        return top_fraction(noise, self.isolation_ratio, normalizer=None)


class ReplayAwareEPIUpdate(EPIUpdate):
    """EPI whose importance keeps the earlier tasks in view (a mechanism variant, not the paper's EPI).

    The squared gradient of the *batch* is dominated by the current stage's tasks: the replayed earlier tasks
    are a small share of the batch, at low loss. So this variant keeps a second EMA fed by the gradient of the
    replayed rows alone (one extra forward and backward on them, about a fifth of the batch), and a refresh
    ranks every entry by the larger of its two layer-normalised scores: an entry among the most important for
    the current data *or* for the replayed tasks is protected.
    """

    def __init__(self, params, schedule, **options):
        super().__init__(params, **options)
        self.schedule, self.own_tasks = schedule, set()
        self.replay_scores = {n: torch.zeros_like(s) for n, s in self.scores.items()}

    def begin_stage(self, stage):
        super().begin_stage(stage)
        self.own_tasks = {t for t, w in self.schedule.stages[stage].mixture.items() if w > 0}

    def observe(self, batch, loss_fn):
        rows = [i for i, t in enumerate(batch.tasks) if t not in self.own_tasks]
        if not rows:
            return
        names = [n for n in self.params if self._grad(n) is not None]
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(batch.select(rows)), [self.params[n] for n in names], allow_unused=True)
        with torch.no_grad():
            for n, g in zip(names, grads):
                if g is not None and torch.isfinite(g).all():
                    self.replay_scores[n].lerp_((g * g).to(self.replay_scores[n].dtype), 1 - self.ema_beta)

    def select(self):
        combined = {n: torch.maximum(normalize(s, self.normalizer), normalize(self.replay_scores[n], self.normalizer))
                    for n, s in self.scores.items()}
        return top_fraction(combined, self.isolation_ratio, normalizer=None)

    def state_dict(self):
        return {**super().state_dict(), "replay_scores": {n: s.clone() for n, s in self.replay_scores.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for n, s in self._by_our_names(state["replay_scores"]).items():
            self.replay_scores[n].copy_(s)


def epi_options(cfg):
    """The :class:`~epi_mini.epi.EvolvingIsolation` arguments of a config."""
    return dict(isolation_ratio=cfg.isolation_ratio, ema_beta=cfg.ema_beta,
                mask_interval="once" if cfg.method == "static-epi" else cfg.mask_interval,
                warmup_steps=cfg.warmup_steps, normalizer=cfg.normalizer, importance=cfg.importance,
                ema_storage=cfg.ema_storage, mask_storage=cfg.mask_storage)


def build_epi(run):
    """An EPI-family strategy for a run: EPI refreshed every K steps, once (``static-epi``), when it has drifted
    (``"auto"``), a random set (``random-mask``), or with replay-aware importance."""
    cfg, options = run.cfg, epi_options(run.cfg)
    if cfg.isolation_schedule and len(cfg.isolation_schedule) != len(run.schedule.stages):
        raise ValueError(f"invalid isolation_schedule={cfg.isolation_schedule!r}: needs one ratio per stage "
                         f"({len(run.schedule.stages)} stages in schedule {cfg.schedule!r})")
    options["stage_ratios"] = cfg.isolation_schedule
    if cfg.method == "random-mask":
        return RandomMaskUpdate(run.model, seed=cfg.seed, **options)
    if cfg.replay_importance:
        return ReplayAwareEPIUpdate(run.model, run.schedule, **options)
    if options["mask_interval"] == "auto":
        return AdaptiveEPIUpdate(run.model, seed=cfg.seed, **options)
    return EPIUpdate(run.model, **options)


def build_cpift(run):
    cfg = run.cfg
    return CoreRegionPipeline(run, cfg.core_ratio, cfg.probe_steps, cfg.cpift_tau, cfg.cpift_stages, cfg.cpift_fusion)


@dataclass(frozen=True)
class Method:
    label: str                     # the method in words, for titles and printouts ("full SFT", "EPI")
    help: str                      # one line, shown by --help
    build: Callable                # run -> UpdateStrategy
    replay: bool = True            # False: the schedule's replay is switched off (a strict pipeline)


METHODS = {
    "full": Method("full SFT", "plain SFT: every parameter trained, on the schedule as given", lambda run: PlainUpdate()),
    "multistage": Method("multi-stage SFT", "plain SFT on the same stages run as a strict pipeline (replay switched "
                         "off)", lambda run: PlainUpdate(), replay=False),
    "static": Method("CPI-FT (static isolation)", "CPI-FT: probe each task, freeze the core regions (top core_ratio "
                     "by probe update magnitude) of earlier stages' tasks", build_cpift),
    "static-epi": Method("static EPI score (control)", "EPI's own score, taken once after warm-up and never "
                         "refreshed", build_epi),
    "random-mask": Method("random mask (control)", "a random set of the same size as EPI's, refreshed every K steps",
                          build_epi),
    "epi": Method("EPI", "Evolving Parameter Isolation: EMA-of-g^2 importance, top-rho isolated, refreshed every K "
                  "steps", build_epi),
}


def method_label(name):
    """The method in words (``"full"`` -> ``"full SFT"``); an unknown name is returned as it is."""
    return METHODS[name].label if name in METHODS else name


def build_strategy(run):
    """The update strategy for ``run.cfg.method``."""
    return METHODS[run.cfg.method].build(run)
