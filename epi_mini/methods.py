"""The methods, by name: each turns a :class:`~epi_mini.train.Run` into an update strategy for the loop.

| method       | strategy                                                                          |
|--------------|-----------------------------------------------------------------------------------|
| `full`       | :class:`~epi_mini.strategy.PlainUpdate` on the schedule as given                   |
| `multistage` | :class:`~epi_mini.strategy.PlainUpdate` on the stages without replay                |
| `static`     | :class:`~epi_mini.baselines.CoreRegionPipeline`: CPI-FT's cores, frozen stage by stage |
| `static-epi` | :class:`EPIUpdate` with ``mask_interval="once"``: EPI's score, never refreshed       |
| `epi`        | :class:`EPIUpdate`: Evolving Parameter Isolation                                     |

To add a method, write its strategy (an :class:`~epi_mini.strategy.UpdateStrategy`) and add a
:class:`Method` to :data:`METHODS` (with a ``label``, the name in words that titles and printouts use);
the command line, the config checks and the runner pick it up.
"""
from dataclasses import dataclass
from typing import Callable

from .adaptive import AdaptiveIsolation
from .baselines import CoreRegionPipeline
from .epi import EvolvingIsolation
from .strategy import PlainUpdate, UpdateStrategy


class EPIUpdate(EvolvingIsolation, UpdateStrategy):
    """:class:`~epi_mini.epi.EvolvingIsolation` as the loop's strategy, with a summary for the run record."""

    def summary(self):
        return {"refreshes": len(self.history), "history": self.history, "skipped_steps": self.skipped_steps,
                "state_bytes": self.state_bytes()}


class AdaptiveEPIUpdate(AdaptiveIsolation, EPIUpdate):
    """EPI with ``mask_interval="auto"`` (:class:`~epi_mini.adaptive.AdaptiveIsolation`) as the loop's strategy."""


def epi_options(cfg):
    """The :class:`~epi_mini.epi.EvolvingIsolation` arguments of a config."""
    return dict(isolation_ratio=cfg.isolation_ratio, ema_beta=cfg.ema_beta,
                mask_interval="once" if cfg.method == "static-epi" else cfg.mask_interval,
                warmup_steps=cfg.warmup_steps, normalizer=cfg.normalizer, importance=cfg.importance)


def build_epi(run):
    """EPI for a run: refreshed every K steps, once (``static-epi``), or when it has drifted (``"auto"``)."""
    options = epi_options(run.cfg)
    if options["mask_interval"] == "auto":
        return AdaptiveEPIUpdate(run.model, seed=run.cfg.seed, **options)
    return EPIUpdate(run.model, **options)


@dataclass(frozen=True)
class Method:
    label: str                     # the method in words, for titles and printouts ("full SFT", "EPI")
    help: str                      # one line, shown by --help
    build: Callable                # run -> UpdateStrategy
    replay: bool = True            # False: the schedule's replay is switched off (a strict pipeline)


METHODS = {
    "full": Method("full SFT", "plain SFT: every parameter trained, on the schedule as given",
                   lambda run: PlainUpdate()),
    "multistage": Method("multi-stage SFT",
                         "plain SFT on the same stages run as a strict pipeline (replay switched off)",
                         lambda run: PlainUpdate(), replay=False),
    "static": Method("CPI-FT (static isolation)",
                     "CPI-FT: freeze the core regions (top-rho by probe update magnitude) of earlier stages' tasks",
                     lambda run: CoreRegionPipeline(run, run.cfg.isolation_ratio, run.cfg.probe_steps)),
    "static-epi": Method("static EPI score (control)",
                         "EPI's own score, taken once after warm-up and never refreshed (the control)",
                         build_epi),
    "epi": Method("EPI", "Evolving Parameter Isolation: EMA-of-g^2 importance, top-rho isolated, refreshed "
                  "every K steps", build_epi),
}


def method_label(name):
    """The method in words (``"full"`` -> ``"full SFT"``); an unknown name is returned as it is."""
    return METHODS[name].label if name in METHODS else name


def build_strategy(run):
    """The update strategy for ``run.cfg.method``."""
    return METHODS[run.cfg.method].build(run)
