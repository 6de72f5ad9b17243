"""The static isolation baseline: CPI-FT's core regions, chosen once and frozen stage by stage.

CPI-FT ("Not All Parameters Are Created Equal", Wang, Liang, Peng, EMNLP 2025) picks the parameters to
protect **once**: a short *probe* fine-tune of the base model on each task alone; the task's *core region*
is the top fraction of parameters by update magnitude ``|theta_probe - theta_0|`` (:func:`core_region`).
Tasks whose cores overlap (Jaccard >= tau) form a group (:func:`group_by_overlap`). While a later stage
trains, the cores of earlier stages' tasks are frozen with a fixed mask (:class:`StaticIsolation`) -- the
opposite of EPI, whose mask evolves.
"""
import copy

import torch

from .drift import jaccard
from .epi import top_fraction
from .isolation import MaskedUpdate, indices_to_masks
from .strategy import PlainUpdate, UpdateStrategy, sft_step


class StaticIsolation(MaskedUpdate):
    """A fixed isolated set. ``freeze(mask)`` adds entries, e.g. the cores of the task group that just
    finished its pipeline stage; nothing is ever released.

    Warning (as for PackNet): the optimizer's momentum of a frozen entry keeps evolving; the entry does not
    move only because every step is masked. Stepping the optimizer outside :meth:`~epi_mini.isolation.MaskedUpdate.step`
    (without :meth:`~epi_mini.isolation.MaskedUpdate.attach`) would move it.
    """

    def __init__(self, params, isolated=None, mask_storage="index"):
        super().__init__(params, mask_storage)
        if isolated:
            self.freeze(isolated)

    def freeze(self, mask):
        """Add the True entries of ``mask`` (name -> bool tensor) to the isolated set."""
        current = self.isolated
        merged = {n: (current[n] | mask[n].to(current[n].device)) if n in mask else current[n] for n in current}
        self._set_isolated({n: m.view(-1).nonzero().squeeze(1).to(torch.int32) for n, m in merged.items()})


def core_region(before, after, ratio):
    """CPI-FT's core region of a probe fine-tune: the global top-``ratio`` entries by update magnitude
    ``|after - before|`` (name -> tensor dicts), as name -> bool tensor."""
    picked = top_fraction({n: (after[n] - before[n]).abs() for n in before}, ratio, normalizer=None)
    return indices_to_masks(picked, before)


def group_by_overlap(cores, tau=0.1):
    """CPI-FT task grouping: tasks whose core regions overlap with Jaccard >= ``tau`` (directly or through a
    chain of tasks) share a group. ``cores``: task -> (name -> bool tensor). Returns a list of task lists."""
    groups = []
    for task in cores:
        joined = [g for g in groups if any(jaccard(cores[task], cores[t]) >= tau for t in g)]
        groups = [g for g in groups if g not in joined] + [sum(joined, []) + [task]]
    return groups


class CoreRegionPipeline(StaticIsolation, UpdateStrategy):
    """CPI-FT on a multi-stage schedule, as an update strategy for the training loop.

    At the start of training, each task introduced before the last stage gets a *probe*: a copy of the
    model fine-tuned on that task alone for ``probe_steps`` steps, through the same :func:`sft_step` as the
    main loop; its core region is the top ``isolation_ratio`` of parameters by update magnitude. While stage
    ``i`` trains, the cores of every task introduced in stages ``0..i-1`` are frozen, so the frozen fraction
    grows stage by stage. (CPI-FT also groups tasks whose cores overlap, Jaccard >= 0.1, to decide the
    pipeline order; here the schedule fixes the order, and the grouping is reported, not used.)
    """

    def __init__(self, run, isolation_ratio, probe_steps, tau=0.1):
        super().__init__(run.model)
        self.run, self.ratio, self.probe_steps, self.tau = run, isolation_ratio, probe_steps, tau
        self.first_stage = run.schedule.first_stage()
        self.cores = None

    def probe(self):
        run, model = self.run, self.run.model
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        last = len(run.schedule.stages) - 1
        self.cores = {}
        for task in (t for t, s in self.first_stage.items() if s < last):
            probe = copy.deepcopy(model)
            opt = probe.configure_optimizers(run.cfg.weight_decay, run.cfg.learning_rate)

            def loss_fn(batch, probe=probe):
                return probe(batch.x.to(run.device), batch.y.to(run.device), batch.loss_mask.to(run.device))[1]
            for i in range(self.probe_steps):  # steps 10_000_000 + i: batches no training run uses
                sft_step(loss_fn, run.stream.batch(10_000_000 + i, only_task=task), probe.parameters(), opt,
                         PlainUpdate(), run.cfg.grad_clip)
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
