"""Schedules, mixtures and batches: what the model sees at every training step.

A :class:`Schedule` is a list of :class:`Stage` s. Each stage is a weighted mixture of tasks trained for a
number of steps, plus an optional *replay* fraction: that share of every batch is drawn (uniformly over
tasks) from the tasks that earlier stages introduced. Four presets cover the settings this project
compares (one reference, two streams that forget, and the paper's regime):

* ``multitask``  -- one stage, all tasks mixed evenly: the interference reference.
* ``multistage`` -- task groups one stage after another, no replay: the forgetting reference.
* ``sequential`` -- one task per stage, no replay: the pure sequential stream. Nothing in a stage's loss
  asks the model to keep earlier tasks; full SFT loses them all there (measured in the README).
* ``shifting``   -- the same groups, but earlier tasks keep flowing: 20% of every batch replays them, so
  the mixture's composition shifts from group to group without ever dropping a task. This is the
  multi-task SFT regime of the paper, where the gradient stream EPI scores still carries every task.

The batch of a step is a pure function of ``(seed, step)`` (:meth:`MixtureStream.batch`): no iterator
state, so a resumed run sees exactly the batches an uninterrupted one would, and distributed ranks can
each take their own slice of the same global batch.
"""
import random
from dataclasses import dataclass, field

import torch

from .tasks import BUILTIN_TASKS, Example

# Task groups of the pipeline presets, in training order.
GROUPS = (("math", "code"), ("logic", "instruction"), ("chat",))


@dataclass
class Stage:
    name: str
    mixture: dict          # task name -> weight (any positive numbers; normalised when sampling)
    steps: int
    replay: float = 0.0    # share of each batch drawn, uniformly over tasks, from earlier stages' tasks

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"stage {self.name!r}: steps must be a positive integer, got {self.steps!r}")
        if not 0.0 <= self.replay < 1.0:
            raise ValueError(f"stage {self.name!r}: replay must be in [0, 1), got {self.replay!r}")
        if not self.mixture or any(w < 0 for w in self.mixture.values()) or sum(self.mixture.values()) <= 0:
            raise ValueError(f"stage {self.name!r}: mixture needs non-negative weights with a positive sum, "
                             f"got {self.mixture!r}")


@dataclass
class Schedule:
    name: str
    stages: list = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def boundaries(self) -> list:
        """The global step at which each stage ends (exclusive), e.g. [400, 800, 1200]."""
        out, t = [], 0
        for s in self.stages:
            t += s.steps
            out.append(t)
        return out

    @property
    def tasks(self) -> list:
        """Every task trained at some point, in order of first appearance."""
        seen = []
        for s in self.stages:
            seen += [t for t, w in s.mixture.items() if w > 0 and t not in seen]
        return seen

    def new_tasks(self, i: int) -> list:
        """Tasks that stage ``i`` trains for the first time (what plasticity is measured on)."""
        earlier = {t for s in self.stages[:i] for t, w in s.mixture.items() if w > 0}
        return [t for t, w in self.stages[i].mixture.items() if w > 0 and t not in earlier]

    def first_stage(self) -> dict:
        """Task -> index of the stage that introduces it."""
        return {t: i for i in range(len(self.stages)) for t in self.new_tasks(i)}

    def stage_index(self, step: int) -> int:
        for i, end in enumerate(self.boundaries):
            if step < end:
                return i
        raise IndexError(f"step {step} is past the end of schedule {self.name!r} ({self.total_steps} steps)")

    def sampling_weights(self, i: int) -> dict:
        """The probability of each task in a batch of stage ``i``, replay included."""
        stage = self.stages[i]
        total = sum(stage.mixture.values())
        probs = {t: w / total for t, w in stage.mixture.items() if w > 0}
        first = self.first_stage()
        earlier = [t for t in self.tasks if first[t] < i]
        if stage.replay > 0 and earlier:
            probs = {t: p * (1 - stage.replay) for t, p in probs.items()}
            for t in earlier:
                probs[t] = probs.get(t, 0.0) + stage.replay / len(earlier)
        return probs

    def without_replay(self) -> "Schedule":
        """The same stages with replay switched off: the strict pipeline of multi-stage SFT."""
        return Schedule(self.name + "-no-replay", [Stage(s.name, dict(s.mixture), s.steps) for s in self.stages])

    def to_dict(self) -> dict:
        return {"name": self.name, "stages": [vars(s).copy() for s in self.stages]}

    @classmethod
    def from_dict(cls, d) -> "Schedule":
        return cls(d["name"], [Stage(**s) for s in d["stages"]])


def make_schedule(name: str, steps_per_stage: int, tasks=None, replay: float = 0.2) -> Schedule:
    """A preset schedule (``multitask``, ``multistage``, ``sequential``, ``shifting``, ``two_task``).

    ``tasks`` overrides the task list (default: the five built-in families). Pipeline presets split it into
    the groups of :data:`GROUPS` when it is the default list, else into pairs. ``multitask`` trains as many
    steps as the pipelines in total, so that methods compare at equal compute.
    """
    tasks = list(tasks or BUILTIN_TASKS)
    groups = [list(g) for g in GROUPS] if tasks == list(BUILTIN_TASKS) else \
        [tasks[i:i + 2] for i in range(0, len(tasks), 2)]
    if name == "multitask":
        return Schedule(name, [Stage("all tasks", {t: 1.0 for t in tasks}, steps_per_stage * len(groups))])
    if name == "multistage":
        return Schedule(name, [Stage("+".join(g), {t: 1.0 for t in g}, steps_per_stage) for g in groups])
    if name == "sequential":
        return Schedule(name, [Stage(t, {t: 1.0}, steps_per_stage) for t in tasks])
    if name == "two_task":  # A -> B, the forgetting protocol (CPI-FT Table 2); B's stage replays A
        a, b = tasks[:2]
        return Schedule(name, [Stage(a, {a: 1.0}, steps_per_stage), Stage(b, {b: 1.0}, steps_per_stage, replay)])
    if name == "shifting":
        return Schedule(name, [Stage("+".join(g), {t: 1.0 for t in g}, steps_per_stage,
                                     replay=replay if i > 0 else 0.0) for i, g in enumerate(groups)])
    raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULE_NAMES}")


SCHEDULE_NAMES = ("multitask", "multistage", "sequential", "shifting", "two_task")


@dataclass
class Batch:
    x: torch.Tensor         # (B, T) input token ids
    y: torch.Tensor         # (B, T) next-token targets
    loss_mask: torch.Tensor  # (B, T) 1.0 where y is a response token or the end token
    tasks: list             # the task of each row

    def select(self, rows) -> "Batch":
        """The batch made of the given rows (a list of row indices)."""
        index = torch.tensor(rows, dtype=torch.long)
        return Batch(self.x[index], self.y[index], self.loss_mask[index], [self.tasks[i] for i in rows])


def encode_example(tokenizer, ex: Example):
    """Token ids of prompt + response + <|endoftext|>, and the number of prompt tokens."""
    prompt = tokenizer.encode(ex.prompt)
    return prompt + tokenizer.encode(ex.response) + [tokenizer.eot_id], len(prompt)


def collate(encoded, tokenizer, block_size: int, tasks=None) -> Batch:
    """Right-pad a list of ``(ids, n_prompt)`` into a :class:`Batch` with a response-only loss mask."""
    T = max(len(ids) for ids, _ in encoded) - 1
    if T > block_size:
        longest = max(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        who = f" (task {tasks[longest]!r})" if tasks else ""
        raise ValueError(f"an example{who} is {T + 1} tokens long, longer than block_size + 1 = "
                         f"{block_size + 1}; raise block_size or shorten the example")
    x = torch.full((len(encoded), T), tokenizer.pad_id, dtype=torch.long)
    y = torch.full((len(encoded), T), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), T))
    for row, (ids, n_prompt) in enumerate(encoded):
        n = len(ids) - 1
        x[row, :n] = torch.tensor(ids[:-1])
        y[row, :n] = torch.tensor(ids[1:])
        mask[row, n_prompt - 1:n] = 1.0  # y[n_prompt-1] is the first response token
    return Batch(x, y, mask, list(tasks or []))


class MixtureStream:
    """Training batches for a schedule: ``batch(step)`` is deterministic in ``(seed, step)``.

    Prompts of the held-out evaluation sets (``exclude``) are never trained on: a sample that hits one is
    drawn again.
    """

    def __init__(self, schedule: Schedule, tasks: dict, tokenizer, batch_size: int, block_size: int,
                 seed: int = 0, exclude=()):
        unknown = [t for t in schedule.tasks if t not in tasks]
        if unknown:
            raise ValueError(f"schedule {schedule.name!r} uses unknown task(s) {unknown}; "
                             f"known tasks: {sorted(tasks)}")
        self.schedule, self.tasks, self.tokenizer = schedule, tasks, tokenizer
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.exclude = set(exclude)
        self._weights = [schedule.sampling_weights(i) for i in range(len(schedule.stages))]

    def examples(self, step: int, n: int = None, only_task: str = None) -> list:
        rng = random.Random(self.seed * 1_000_003 + step)
        if only_task is not None:
            names = [only_task] * (n or self.batch_size)
        else:
            w = self._weights[self.schedule.stage_index(step)]
            names = rng.choices(list(w), weights=list(w.values()), k=n or self.batch_size)
        out = []
        for name in names:
            ex = self.tasks[name].sample(rng)
            for _ in range(100):  # redraw held-out prompts; 100 misses in a row means the task is all held out
                if ex.prompt not in self.exclude:
                    break
                ex = self.tasks[name].sample(rng)
            else:
                raise ValueError(f"task {name!r}: every sampled prompt is in the held-out evaluation set")
            out.append(ex)
        return out

    def batch(self, step: int, rank: int = 0, world_size: int = 1, only_task: str = None) -> Batch:
        """The batch of a global step; with ``world_size > 1``, rank ``rank``'s slice of it."""
        exs = self.examples(step, only_task=only_task)[rank::world_size]
        return collate([encode_example(self.tokenizer, e) for e in exs], self.tokenizer, self.block_size,
                       [e.task for e in exs])
