"""From a method name to an update strategy for the training loop.

| method       | strategy                                                                  |
|--------------|---------------------------------------------------------------------------|
| `full`       | :class:`~epi_mini.train.PlainUpdate` on the schedule as given               |
| `multistage` | :class:`~epi_mini.train.PlainUpdate` on the stages without replay (the Run |
|              | drops the replay when it builds the schedule)                             |
| `static`     | :class:`CoreRegionPipeline`: CPI-FT's core regions, frozen stage by stage    |
| `static-epi` | ``EvolvingIsolation(mask_interval="once")``: EPI's score, never refreshed    |
| `epi`        | :class:`~epi_mini.epi.EvolvingIsolation`                                    |
"""
import copy

import torch

from .epi import EvolvingIsolation, StaticIsolation, core_region, group_by_overlap, jaccard


class CoreRegionPipeline(StaticIsolation):
    """CPI-FT (Wang, Liang, Peng, 2025) on a multi-stage schedule.

    At the start of training, each task introduced before the last stage gets a *probe*: a copy of the
    model fine-tuned on that task alone for ``probe_steps`` steps; its core region is the top
    ``isolation_ratio`` of parameters by update magnitude ``|theta_probe - theta_0|``. While stage ``i``
    trains, the cores of every task introduced in stages ``0..i-1`` are frozen, so the frozen fraction grows
    stage by stage. (CPI-FT also groups tasks whose cores overlap, Jaccard >= 0.1, to decide the pipeline
    order; here the schedule fixes the order, and the grouping is reported, not used.)
    """

    def __init__(self, run, isolation_ratio, probe_steps, tau=0.1):
        super().__init__(run.model)
        self.run, self.ratio, self.probe_steps, self.tau = run, isolation_ratio, probe_steps, tau
        self.first_stage = run.schedule.first_stage()
        self.cores = None

    def probe(self):
        model = self.run.model
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        last = len(self.run.schedule.stages) - 1
        self.cores = {}
        for task in (t for t, s in self.first_stage.items() if s < last):
            probe = copy.deepcopy(model)
            opt = probe.configure_optimizers(self.run.cfg.weight_decay, self.run.cfg.learning_rate)
            for i in range(self.probe_steps):
                batch = self.run.stream.batch(10_000_000 + i, only_task=task)  # steps no training run uses
                _, loss = probe(batch.x.to(self.run.device), batch.y.to(self.run.device),
                                batch.loss_mask.to(self.run.device))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(probe.parameters(), self.run.cfg.grad_clip or float("inf"))
                opt.step()
                opt.zero_grad(set_to_none=True)
            self.cores[task] = core_region(initial, {n: p.detach() for n, p in probe.named_parameters()},
                                           self.ratio)

    def begin_stage(self, i):
        if self.cores is None:
            self.probe()
        self._set_isolated({})
        for task, core in self.cores.items():
            if self.first_stage[task] < i:
                self.freeze(core)

    def summary(self):
        names = list(self.cores or {})
        return {"core_jaccard": {"tasks": names, "matrix": [[jaccard(self.cores[a], self.cores[b]) for b in names]
                                                             for a in names]},
                "groups": group_by_overlap(self.cores, self.tau) if self.cores else []}

    def state_dict(self):
        return {**super().state_dict(), "cores": self.cores}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.cores = state["cores"]


def epi_summary(strategy: EvolvingIsolation):
    return {"refreshes": len(strategy.history), "history": strategy.history,
            "skipped_steps": strategy.skipped_steps, "state_bytes": strategy.state_bytes()}


class _EPI(EvolvingIsolation):
    summary = epi_summary


def build_strategy(run):
    """The update strategy for ``run.cfg.method``."""
    from .train import PlainUpdate
    cfg = run.cfg
    if cfg.method in ("full", "multistage"):
        return PlainUpdate()
    if cfg.method == "static":
        return CoreRegionPipeline(run, cfg.isolation_ratio, cfg.probe_steps)
    return _EPI(run.model, **epi_options(cfg))


def epi_options(cfg):
    """The EvolvingIsolation arguments of a config (shared with epi_mini.distributed)."""
    return dict(isolation_ratio=cfg.isolation_ratio, ema_beta=cfg.ema_beta,
                mask_interval="once" if cfg.method == "static-epi" else cfg.mask_interval,
                warmup_steps=cfg.warmup_steps, normalizer=cfg.normalizer, importance=cfg.importance,
                seed=cfg.seed)
