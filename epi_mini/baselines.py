"""The static isolation baseline: CPI-FT, which chooses the parameters to protect once, before training.

CPI-FT ("Not All Parameters Are Created Equal", Wang, Liang, Peng, EMNLP 2025) in five steps, as built here:

1. **Core regions.** A short *probe* fine-tune of the base model on each task alone; the task's core region
   is the top ``core_ratio`` (1% in the paper) of parameters by update magnitude ``|theta_task - theta_0|``
   (:func:`core_region`).
2. **Grouping.** Tasks whose cores overlap with Jaccard >= ``tau`` (0.1), directly or through a chain of
   tasks, form a group (:func:`group_by_overlap`); the groups are the pipeline's stages.
3. **Transplant** each task's core parameters from its own probe into one backbone, and
4. **fuse** the rest of the probes by SLERP (:func:`fuse_probes`; an option, on by default).
5. **Pipelined SFT**: the groups are trained one stage after another on their tasks' data, with the cores
   of earlier stages' tasks frozen by a fixed mask (:class:`StaticIsolation`) -- the opposite of EPI,
   whose mask evolves.

``stages="schedule"`` imposes the run's own stages instead of the groups (a stream whose data arrive in a
fixed order cannot be re-ordered); every table that uses it says so. The probes are extra compute that the
other methods do not get: ``probe_steps`` steps per task.
"""
import copy
import math

import torch

from .data import Schedule, Stage
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


def slerp(a, b, t):
    """Spherical interpolation from flat vector ``a`` (t = 0) to ``b`` (t = 1): along the great circle, so two
    orthogonal vectors of equal norm merge without the norm shrinking as a plain average does. Linear when
    either is zero or they are (anti)parallel."""
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return torch.lerp(a, b, t)
    omega = torch.arccos((a @ b / (na * nb)).clamp(-1.0, 1.0))
    if omega < 1e-4 or math.pi - omega < 1e-4:
        return torch.lerp(a, b, t)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def fuse_probes(initial, probes, cores):
    """CPI-FT's steps 3-4: one backbone from the probes. For every tensor, the probes' task vectors
    ``theta_task - theta_0`` are merged by SLERP, one task after another with weight 1/k (so every task
    counts equally); then each core entry is transplanted from the probe of its task (an entry in several
    cores: from the task that moved it most). ``initial``, ``probes[task]``: name -> tensor."""
    tasks = list(probes)
    fused = {}
    for n, w0 in initial.items():
        vectors = torch.stack([(probes[t][n] - w0).reshape(-1) for t in tasks])        # (tasks, numel)
        merged = vectors[0]
        for k in range(1, len(tasks)):
            merged = slerp(merged, vectors[k], 1.0 / (k + 1))
        in_core = torch.stack([cores[t][n].reshape(-1) for t in tasks])               # (tasks, numel)
        owner = torch.where(in_core, vectors.abs(), -1.0).argmax(0)                    # the task that moved it most
        moved = vectors.gather(0, owner.unsqueeze(0)).squeeze(0)
        fused[n] = (w0.reshape(-1) + torch.where(in_core.any(0), moved, merged)).view_as(w0)
    return fused


def group_schedule(groups, schedule, replay):
    """The pipeline of CPI-FT's groups: one stage per group, on its tasks' data (and ``replay`` of earlier
    groups' tasks), the schedule's total steps split evenly."""
    total, n = schedule.total_steps, len(groups)
    return Schedule(f"{schedule.name}-cpift-groups", [
        Stage("+".join(g), {t: 1.0 for t in g}, total // n + (k < total % n), replay if k > 0 else 0.0)
        for k, g in enumerate(groups)])


class CoreRegionPipeline(StaticIsolation, UpdateStrategy):
    """CPI-FT as an update strategy: probes, grouping and (optionally) fusion happen when it is built; then
    the cores of every task introduced in an earlier stage are frozen while a stage trains.

    ``stages``: ``"grouping"`` (CPI-FT's own: the groups become the run's stages) or ``"schedule"`` (the
    run's stages are kept). The probes train through the same :func:`sft_step` as the main loop.
    """

    def __init__(self, run, core_ratio=0.01, probe_steps=100, tau=0.1, stages="grouping", fusion=True):
        if stages not in ("grouping", "schedule"):
            raise ValueError(f"invalid cpift_stages={stages!r}: must be 'grouping' or 'schedule'")
        super().__init__(run.model)
        self.run, self.core_ratio, self.probe_steps, self.tau = run, core_ratio, probe_steps, tau
        self.stages, self.fusion = stages, fusion
        initial = {n: p.detach().clone() for n, p in run.model.named_parameters()}
        probes = {t: self.probe(t) for t in run.task_names}
        self.cores = {t: core_region(initial, w, core_ratio) for t, w in probes.items()}
        self.groups = group_by_overlap(self.cores, tau)
        if fusion:
            with torch.no_grad():
                for n, w in fuse_probes(initial, probes, self.cores).items():
                    dict(run.model.named_parameters())[n].copy_(w)
        if stages == "grouping":
            run.set_schedule(group_schedule(self.groups, run.schedule, run.cfg.replay))

    def probe(self, task):
        """A copy of the model fine-tuned on ``task`` alone for ``probe_steps`` steps: name -> final weights."""
        run = self.run
        probe = copy.deepcopy(run.model)
        opt = probe.configure_optimizers(run.cfg.weight_decay, run.cfg.learning_rate)

        def loss_fn(batch):
            return probe(batch.x.to(run.device), batch.y.to(run.device), batch.loss_mask.to(run.device))[1]
        for i in range(self.probe_steps):  # steps 10_000_000 + i: batches no training run uses
            sft_step(loss_fn, run.stream.batch(10_000_000 + i, only_task=task), probe.parameters(), opt,
                     PlainUpdate(), run.cfg.grad_clip)
        return {n: p.detach() for n, p in probe.named_parameters()}

    def begin_stage(self, i):
        first = self.run.schedule.first_stage()
        self._set_isolated({})
        for task, core in self.cores.items():
            if first[task] < i:
                self.freeze(core)

    def summary(self):
        names = list(self.cores)
        return {"core_ratio": self.core_ratio, "stages": self.stages, "fusion": self.fusion, "groups": self.groups,
                "core_jaccard": {"tasks": names, "matrix": [[jaccard(self.cores[a], self.cores[b]) for b in names]
                                                             for a in names]}}

    def state_dict(self):
        return {**super().state_dict(), "cores": self.cores}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.cores = state["cores"]
