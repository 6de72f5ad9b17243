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
frozen fraction stage by stage) and, for ``epi``, ``replay_importance`` (:class:`ReplayAwareEPIUpdate`) or
``base_importance`` (:class:`BaseAwareEPIUpdate`: what the base knew is protected too).

To add a method, write its strategy (an :class:`~epi_mini.strategy.UpdateStrategy`) and add a
:class:`Method` to :data:`METHODS` (with a ``label``, the name in words that titles and printouts use);
the command line, the config checks and the runner pick it up.

Or, without editing the package, name it by its file: ``method="path/to/file.py:ClassName"`` (a *plugin*,
:func:`load_plugin`; ``python -m epi_mini --method ...``, ``python -m epi_mini.experiments main --method ...``).
The class is an :class:`~epi_mini.strategy.UpdateStrategy`, built from the run by :func:`build_plugin`:
``ClassName.from_run(run)`` if the class defines it, else, for a subclass of :class:`EPIUpdate`, exactly as
``epi`` is built with the class in place of :class:`EPIUpdate` (:func:`build_epi`: every EPI option of the
config), else ``ClassName()``. Its label is its ``label`` class attribute, or the class name.
"""
import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .adaptive import AdaptiveIsolation
from .baselines import CoreRegionPipeline
from .epi import EvolvingIsolation, normalize, top_fraction
from .isolation import overlap_counts
from .strategy import PlainUpdate, UpdateStrategy


class EPIUpdate(EvolvingIsolation, UpdateStrategy):
    """:class:`~epi_mini.epi.EvolvingIsolation` as the loop's strategy: a summary for the run record, and,
    with ``stage_ratios``, rho set anew as each stage begins (the set is refreshed right away)."""

    def __init__(self, params, stage_ratios=(), stage_steps=(), **options):
        super().__init__(params, **options)
        self.stage_ratios, self.stage_steps = tuple(stage_ratios), tuple(stage_steps)
        # Anchors: the set held when a stage ended ("boundary") and a set refreshed a quarter of the way into a
        # stage ("within"), each with the step its set was chosen at. Every later refresh logs its overlap with the
        # latest of each, against the anchor's age: the boundary curve says how far the mask moves once the data
        # has changed, the within curve how far it moves over as many steps when the data has not.
        self._anchors, self._stage, self._stage_start = {}, 0, 0

    def begin_stage(self, stage):
        self._stage, self._stage_start = stage, self.num_steps
        self._anchors.pop("within", None)
        if self.stage_ratios:
            self.set_isolation_ratio(self.stage_ratios[stage])

    def end_stage(self, stage):
        if self.history:
            self._anchors["boundary"] = {"step": self.history[-1]["step"], "set": self.isolated_indices()}

    def refresh(self):
        super().refresh()
        entry, current = self.history[-1], self.isolated_indices()
        for kind, anchor in self._anchors.items():
            inter, union = self._reduce_counts(*overlap_counts(anchor["set"], current))  # all ranks' shards
            entry[f"jaccard_{kind}"] = [entry["step"] - anchor["step"], inter / union if union else 1.0]
        if ("within" not in self._anchors and self.stage_steps
                and self.num_steps - self._stage_start >= self.stage_steps[self._stage] // 4):
            self._anchors["within"] = {"step": entry["step"], "set": current}

    def summary(self):
        return {"refreshes": len(self.history), "history": self.history,
                "skipped_steps": self.skipped_steps,
                "state_bytes": self.state_bytes()}

    def state_dict(self):
        anchors = {k: {"step": a["step"], "set": {n: i.clone() for n, i in a["set"].items()}}
                   for k, a in self._anchors.items()}
        return {**super().state_dict(), "anchors": anchors, "stage": self._stage, "stage_start": self._stage_start}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._anchors = {k: {"step": a["step"], "set": dict(self._by_our_names(a["set"]))}
                         for k, a in state.get("anchors", {}).items()}
        self._stage, self._stage_start = state.get("stage", 0), state.get("stage_start", 0)

    def combined_selection(self, *others):
        """The top-rho of each entry's largest layer-normalised score among EPI's own and ``others`` (each
        name -> score tensor): an entry among the most important by *any* of them is isolated."""
        combined = {n: s for n, s in ((n, normalize(s, self.normalizer)) for n, s in self.scores.items())}
        for other in others:
            combined = {n: torch.maximum(s, normalize(other[n], self.normalizer)) for n, s in combined.items()}
        return top_fraction(combined, self.isolation_ratio, normalizer=None)


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
        return self.combined_selection(self.replay_scores)

    def state_dict(self):
        # The current stage's tasks too: a run resumed mid-stage does not begin that stage again.
        return {**super().state_dict(), "replay_scores": {n: s.clone() for n, s in self.replay_scores.items()},
                "own_tasks": sorted(self.own_tasks)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for n, s in self._by_our_names(state["replay_scores"]).items():
            self.replay_scores[n].copy_(s)
        self.own_tasks = set(state.get("own_tasks", self.own_tasks))


def base_fisher(model, windows, params, batch_size=64):
    """The base's diagonal Fisher on its own text: the mean, over batches of ``windows`` (pretraining bytes), of
    the squared gradient of the batch's LM loss -- the same kind of score as EPI's EMA, taken once, before SFT
    changes anything. ``params``: name -> parameter (the entries to score). The model's gradients are cleared."""
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    device = next(model.parameters()).device
    T = model.config.block_size
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    with torch.enable_grad():
        for w in batches:
            model.zero_grad(set_to_none=True)
            model(w[:, :T].to(device), w[:, 1:T + 1].to(device))[1].backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n].add_(p.grad * p.grad, alpha=1 / len(batches))
    model.zero_grad(set_to_none=True)
    return fisher


class BaseAwareEPIUpdate(EPIUpdate):
    """EPI that also protects what the base knew (a mechanism variant, not the paper's EPI).

    EWC protects an old task by the Fisher information of the old task's data; here the old task is
    pretraining. Before SFT moves anything, :func:`base_fisher` scores every entry by the squared gradient of the
    LM loss on a sample of the base's pretraining text (``data/base/lm_sample.bin``). That score stays fixed,
    and a refresh ranks every entry by the larger of its two layer-normalised scores, the running EMA of SFT's
    g² and the base's Fisher: an entry among the most important for the current tasks *or* for the base is
    isolated. Same rho, same K: what changes is what "important" means.
    """

    def __init__(self, params, base_scores, **options):
        super().__init__(params, **options)
        self.base_scores = base_scores

    def select(self):
        return self.combined_selection(self.base_scores)

    def state_dict(self):
        return {**super().state_dict(), "base_scores": {n: s.clone() for n, s in self.base_scores.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for n, s in self._by_our_names(state["base_scores"]).items():
            self.base_scores[n].copy_(s)


def epi_options(cfg):
    """The :class:`~epi_mini.epi.EvolvingIsolation` arguments of a config."""
    return dict(isolation_ratio=cfg.isolation_ratio, ema_beta=cfg.ema_beta,
                mask_interval="once" if cfg.method == "static-epi" else cfg.mask_interval,
                warmup_steps=cfg.warmup_steps, normalizer=cfg.normalizer, importance=cfg.importance,
                ema_storage=cfg.ema_storage, mask_storage=cfg.mask_storage)


def build_epi(run, mixin=None, **extra):
    """An EPI-family strategy for a run: EPI refreshed every K steps, once (``static-epi``), when it has drifted
    (``"auto"``), a random set (``random-mask``), or with replay-aware importance.

    ``mixin``: a class whose methods come first (e.g. epi_mini.distributed's check that every rank agrees, or
    EPI on FSDP2 shards), combined with the class the config names, so that every option is honoured with it;
    ``extra``: the mixin's own keyword arguments."""
    cfg, options = run.cfg, epi_options(run.cfg)
    if cfg.isolation_schedule and len(cfg.isolation_schedule) != len(run.schedule.stages):
        raise ValueError(f"invalid isolation_schedule={cfg.isolation_schedule!r}: needs one ratio per stage "
                         f"({len(run.schedule.stages)} stages in schedule {cfg.schedule!r})")
    options["stage_ratios"] = cfg.isolation_schedule
    options["stage_steps"] = [stage.steps for stage in run.schedule.stages]
    if cfg.method == "random-mask":
        cls, more = RandomMaskUpdate, {"seed": cfg.seed}
    elif cfg.replay_importance:
        cls, more = ReplayAwareEPIUpdate, {"schedule": run.schedule}
    elif cfg.base_importance:
        cls, more = BaseAwareEPIUpdate, {"base_scores": {}}
    elif options["mask_interval"] == "auto":
        cls, more = AdaptiveEPIUpdate, {"seed": cfg.seed}
    else:
        cls, more = EPIUpdate, {}
    if mixin is not None:
        cls = mixin if issubclass(mixin, cls) else type(mixin.__name__ + cls.__name__, (mixin, cls), {})
    update = cls(run.model, **more, **extra, **options)
    if cfg.base_importance:  # the base's Fisher, scored before SFT moves anything
        update.base_scores = base_fisher(run.model, run.lm_sample(), update.params)
    return update


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


# --- your own method, from a file: "path/to/file.py:ClassName" -------------------------------------------------
def is_plugin(name):
    """Does ``name`` name a method of your own, ``FILE.py:CLASS``, rather than a built-in one?"""
    return isinstance(name, str) and ":" in name


@dataclass(frozen=True)
class Plugin:
    """A method loaded from a file (see :func:`load_plugin`)."""
    spec: str                      # as given: "examples/my_epi.py:StickyEPI"
    file: str                      # the file as given
    resolved: str                  # its absolute path (a relative one is taken from the current directory)
    name: str                      # the class's name
    sha256: str                    # of the file's bytes: records and run keys carry it, so an edit is a new method
    cls: type

    @property
    def label(self):
        label = getattr(self.cls, "label", None)
        return label if isinstance(label, str) and label else self.name

    def to_dict(self):
        """What a run record keeps of the plugin (under ``"plugin"``)."""
        return {"spec": self.spec, "file": self.file, "resolved": self.resolved, "class": self.name,
                "label": self.label, "sha256": self.sha256}


_MODULES = {}  # (resolved path, sha256) -> the module: each version of a file is run once per process


def load_plugin(spec):
    """The :class:`Plugin` named by ``spec``, ``FILE.py:CLASS``, its file run with ``importlib`` under a unique
    module name. Raises ``ValueError``, one line naming the file and the class, when the file is missing or not
    a ``.py`` file, fails to import, defines no such class, or the class is not an UpdateStrategy."""
    file, _, name = spec.rpartition(":")
    bad = f"invalid method={spec!r}:"
    if not file or not name.isidentifier():
        raise ValueError(f"{bad} a method of your own is FILE.py:CLASS, e.g. examples/my_epi.py:StickyEPI")
    path = Path(file).expanduser().resolve()
    if path.suffix != ".py":
        raise ValueError(f"{bad} {file} is not a .py file (a method of your own is FILE.py:CLASS)")
    if not path.is_file():
        raise ValueError(f"{bad} no such file {file} (looked for {path}), for class {name}")
    source = path.read_bytes()
    sha = hashlib.sha256(source).hexdigest()
    if (str(path), sha) not in _MODULES:
        # Unique per path and content: two files, or two versions of one file, never share a module.
        unique = hashlib.sha256(f"{path}\n{sha}".encode()).hexdigest()[:12]
        module_name = f"epi_mini_plugin_{path.stem.replace('-', '_')}_{unique}"
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(module_name, path))
        sys.modules[module_name] = module  # what a dataclass or pickle in the file looks itself up by
        try:
            exec(compile(source, str(path), "exec"), module.__dict__)  # the very bytes that were hashed
        except Exception as e:
            del sys.modules[module_name]
            raise ValueError(f"{bad} importing {file} failed ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0]}), so class {name} could not be loaded") from e
        _MODULES[str(path), sha] = module
    module = _MODULES[str(path), sha]
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        defined = sorted(k for k, v in vars(module).items() if isinstance(v, type) and v.__module__ == module.__name__)
        raise ValueError(f"{bad} {file} defines no class {name} (classes defined there: "
                         f"{', '.join(defined) or 'none'})")
    if not issubclass(cls, UpdateStrategy):
        raise ValueError(f"{bad} class {name} in {file} is not an UpdateStrategy: subclass "
                         "epi_mini.methods.EPIUpdate (or epi_mini.strategy.UpdateStrategy)")
    return Plugin(spec, file, str(path), name, sha, cls)


def build_plugin(run, plugin):
    """The plugin's strategy for ``run``: ``cls.from_run(run)`` if the class defines it; else, for an
    :class:`EPIUpdate` subclass, what ``epi`` builds with the class in its place (:func:`build_epi`); else
    ``cls()``. A failure is one ``ValueError`` line naming the file and the class."""
    cls, where = plugin.cls, f"method {plugin.spec!r}: building class {plugin.name} from {plugin.file}"
    try:
        if hasattr(cls, "from_run"):
            update = cls.from_run(run)
        elif issubclass(cls, EPIUpdate):
            update = build_epi(run, mixin=cls)
        else:
            update = cls()
    except Exception as e:
        raise ValueError(f"{where} failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from e
    if not isinstance(update, UpdateStrategy):
        raise ValueError(f"{where} gave a {type(update).__name__}, not an UpdateStrategy")
    return update


def find_method(name):
    """The :class:`Method` that ``name`` names: a built-in one, or a plugin ``FILE.py:CLASS`` (loaded now)."""
    if is_plugin(name):
        plugin = load_plugin(name)
        return Method(plugin.label, f"your own method, class {plugin.name} of {plugin.file}",
                      lambda run: build_plugin(run, plugin))
    if name not in METHODS:
        raise ValueError(f"invalid method={name!r}: must be one of {tuple(METHODS)} or FILE.py:CLASS (your own)")
    return METHODS[name]


def method_label(name):
    """The method in words (``"full"`` -> ``"full SFT"``, a plugin: its label); an unknown name, or a plugin
    whose file can no longer be loaded, is returned as it is (a plugin: its class name)."""
    if is_plugin(name):
        try:
            return load_plugin(name).label
        except ValueError:
            return name.rpartition(":")[2]
    return METHODS[name].label if name in METHODS else name


def method_slug(name):
    """The method as a piece of a file name: a built-in name as it is, a plugin's class name."""
    return name.rpartition(":")[2] if is_plugin(name) else name


def plugin_record(name):
    """What a run record keeps of a plugin method (:meth:`Plugin.to_dict`); None for a built-in one."""
    return load_plugin(name).to_dict() if is_plugin(name) else None


def build_strategy(run):
    """The update strategy for ``run.cfg.method``."""
    return find_method(run.cfg.method).build(run)
