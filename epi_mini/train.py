"""The training loop: SFT on a schedule, with a pluggable update strategy.

``train(config)`` builds everything from a :class:`~epi_mini.config.TrainConfig`, trains, evaluates every
task at a fixed interval and at the end of each stage, and returns a *record*: a JSON-ready dict with the
loss curve, the per-task score curves, the accuracy matrix and its metrics.

The loop never calls ``optimizer.step()`` itself. Each step goes through :func:`epi_mini.strategy.sft_step`,
which calls ``strategy.step(optimizer)``: plain SFT just steps; the isolation methods step and put the
isolated entries back. The other hooks of :class:`~epi_mini.strategy.UpdateStrategy` (``begin_stage``,
``end_stage``, ``summary``, ``state_dict``) are called at stage boundaries, at the end and at checkpoints.

Robustness: a step whose loss or gradient is not finite is skipped (weights, optimizer and importance state
untouched) and counted; more than ``max_bad_steps`` in a row stops the run with :class:`TrainingDiverged`.
With a ``checkpoint_dir``, the full state is saved atomically every ``checkpoint_every`` steps, and
``resume=True`` continues from it to the same final record (batches are a pure function of seed and step).
Ctrl-C raises :class:`TrainingInterrupted`, which says how far training got and where its last checkpoint is.
"""
import io
import math
import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError, atomic_write_bytes, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import MixtureStream, make_schedule
from .evaluate import evaluate, load_eval_sets
from .methods import build_strategy, find_method, method_label, plugin_record
from .metrics import accuracy_matrix, summarize
from .model import GPT, GPTConfig
from .pretrain import HELDOUT_FILE, LM_SAMPLE_FILE, lm_loss, load_base, preset_base, read_windows
from .strategy import sft_step
from .tasks import BUILTIN_TASKS, tasks_from_jsonl
from .tokenizer import get_tokenizer


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`fit`, with where training stood: ``step`` steps done of ``total``, and the step of
    the last checkpoint written or resumed from (``checkpoint_step``; None when there is none)."""

    def __init__(self, step, total, checkpoint_step=None):
        super().__init__(step, total, checkpoint_step)
        self.step, self.total, self.checkpoint_step = step, total, checkpoint_step


def pick_device(requested="auto") -> torch.device:
    """``auto``: cuda if available, then mps (Apple silicon), then cpu."""
    if requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={requested!r} requested but CUDA is not available; use --device auto or cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device={requested!r} requested but MPS is not available; use --device auto or cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# One torch thread per training process on the CPU. Measured by benchmarks/threads.py on 2 cores, cpu preset,
# median ms per step at 1 / 2 threads: idle 69.9 / 47.7; one other busy process 65.9 / 150.3; both cores busy
# 89.7 / 1636.7. Two threads win by a third on an idle machine and lose up to eighteen-fold on a shared one
# (torch's threads meet at a barrier after every operation, and wait for the one that is not scheduled).
# Several runs side by side, one thread each, use the cores without that risk: the experiment runner, the
# notebooks' run_grid and the command line's seeds all run that way.
CPU_THREADS = 1


def use_threads(threads=None) -> int:
    """Set torch's intra-op threads for CPU training (``None``: :data:`CPU_THREADS`) and return the count.
    The count changes float rounding, so it is part of what makes a CPU run reproducible: records store it."""
    threads = CPU_THREADS if threads is None else threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"invalid threads={threads!r}: must be an integer >= 1")
    torch.set_num_threads(threads)
    return threads


class Run:
    """Everything a training run is built from, for the loop, the notebooks and the experiments."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.device = pick_device(cfg.device)
        self.tokenizer = get_tokenizer(cfg.tokenizer, cfg.gpt2_vocab or None)
        self.tasks = dict(BUILTIN_TASKS)
        for path in cfg.task_files:
            self.tasks.update(tasks_from_jsonl(path))
        task_names = list(cfg.tasks) or None
        if task_names:
            unknown = [t for t in task_names if t not in self.tasks]
            if unknown:
                raise ValueError(f"invalid tasks: unknown task(s) {unknown}; known: {sorted(self.tasks)}")
        self.schedule = make_schedule(cfg.schedule, cfg.steps_per_stage, task_names, cfg.replay)
        if not find_method(cfg.method).replay:
            self.schedule = self.schedule.without_replay()
        self.task_names = self.schedule.tasks
        self.eval_sets = load_eval_sets({t: self.tasks[t] for t in self.task_names}, cfg.eval_size)
        self.set_schedule(self.schedule)
        torch.manual_seed(cfg.seed)
        self.model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=self.tokenizer.vocab_size,
                                   n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                   dropout=cfg.dropout)).to(self.device)
        # Fine-tuning starts from a pretrained base (epi_mini.pretrain): every seed from the same weights, so
        # seeds differ only in the order of the data. The random weights above are drawn either way, so that
        # torch's random stream is the same for "base" and "scratch".
        self.base = None
        if cfg.init != "scratch":
            self.base = load_base(self.model, preset_base(cfg.preset, self.device) if cfg.init == "base" else cfg.init)
        # What the base knew, measured at every evaluation: its held-out language-modelling loss (nats per byte).
        # (Byte windows: a model with another tokenizer has nothing to be measured on here.)
        self.lm_heldout = read_windows(HELDOUT_FILE) if cfg.tokenizer == "bytes" else None
        # Fused AdamW on a GPU: faster, and it can skip a non-finite step on the device (see StepLog).
        self.optimizer = self.model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                                         fused=self.device.type == "cuda")
        # Distributed training (epi_mini.distributed) sets these: this process's slice of every global
        # batch, the module that runs forward/backward (a DDP wrapper), and whether it writes outputs.
        self.rank, self.world_size, self.forward_model, self.is_main = 0, 1, self.model, True

    def evaluate(self):
        return evaluate(self.model, self.tokenizer, self.eval_sets, self.tasks)

    def lm_loss(self):
        """The model's held-out language-modelling loss on the base's corpus (nats per byte; None for a model
        whose tokens are not bytes)."""
        return None if self.lm_heldout is None else lm_loss(self.model, self.lm_heldout)

    def lm_sample(self):
        """Windows of the base's training text (``data/base/lm_sample.bin``), for methods that protect the base."""
        return read_windows(LM_SAMPLE_FILE)

    def batch(self, step):
        return self.stream.batch(step, self.rank, self.world_size)

    def loss_on(self, batch):
        _, loss = self.forward_model(batch.x.to(self.device), batch.y.to(self.device), batch.loss_mask.to(self.device))
        return loss

    def set_schedule(self, schedule):
        """Train on ``schedule`` (same tasks; CPI-FT replaces the stages by its own task groups). Batches stay a
        pure function of (seed, step), and the held-out prompts are still never trained on."""
        self.schedule = schedule
        heldout = {e.prompt for exs in self.eval_sets.values() for e in exs}
        self.stream = MixtureStream(schedule, self.tasks, self.tokenizer, self.cfg.batch_size, self.cfg.block_size,
                                    seed=self.cfg.seed, exclude=heldout)

    def make_strategy(self):
        """The update strategy of ``cfg.method`` (see :mod:`epi_mini.methods`)."""
        return build_strategy(self)

    def on_main(self, action):
        """``action()`` in the main process only (the one that writes files), and its result there. A distributed
        run (epi_mini.distributed) also makes every other process raise when it fails, so that none of them
        waits in a collective for a process that has stopped."""
        return action() if self.is_main else None

    # Where the state goes. A sharded run (epi_mini.distributed, --fsdp) overrides these three: each of its
    # processes holds a different shard, so every process writes and reads its own part.
    def write_checkpoint(self, folder, strategy, state):
        """Save the loop's ``state`` (step, record, ...) with the model's, optimizer's and ``strategy``'s state
        dicts and the number of processes, atomically; only the main process writes."""
        self.on_main(lambda: save_checkpoint(folder, {
            **state, "world_size": self.world_size, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "strategy": strategy.state_dict()}))

    def read_checkpoint(self, folder, strategy):
        """Restore the model, the optimizer and ``strategy`` from the checkpoint in ``folder``; return the
        checkpoint (the loop reads its own entries from it), or None when there is none yet."""
        state = load_checkpoint(folder, self.cfg)
        if state is not None and ("shards" in state or "model" not in state):
            raise CheckpointError(f"{folder} holds a sharded checkpoint, written by an FSDP2 run: resume it with "
                                  "torchrun --standalone --nproc_per_node=N -m epi_mini.distributed --fsdp --resume "
                                  "DIR, with the N it was started with")
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            strategy.load_state_dict(state["strategy"])
        return state

    def write_weights(self, stem):
        """Save the final weights as ``<stem>.pt`` (atomically; main process only) and return that path."""
        path = Path(f"{stem}.pt")

        def write():
            buffer = io.BytesIO()
            torch.save(self.model.state_dict(), buffer)
            atomic_write_bytes(path, buffer.getvalue())
        self.on_main(write)
        return path


def lr_at(cfg, step):
    """Linear warm-up, then constant: every stage trains at the same rate, so plasticity stays comparable."""
    return cfg.learning_rate * min(1.0, (step + 1) / max(1, cfg.lr_warmup_steps))


def new_record(run: Run) -> dict:
    plugin = plugin_record(run.cfg.method)  # a method of your own: its file, class and the file's sha256
    return {
        "config": run.cfg.to_dict(), "schedule": run.schedule.to_dict(), "tasks": run.task_names,
        "first_stage": [run.schedule.first_stage()[t] for t in run.task_names],
        "stage_boundaries": run.schedule.boundaries, "num_params": run.model.num_params(),
        "loss_curve": {"step": [], "loss": []},
        "eval_curve": {"step": [], "scores": {t: [] for t in run.task_names}},
        "stage_scores": [], "isolated_fraction": [], "bad_steps": 0,
        # The base: where the weights came from (None: random weights), and what SFT made it forget.
        "base": run.base, "lm_loss": {"uniform": math.log(run.tokenizer.vocab_size), "step": [], "loss": []},
        "stage_lm_loss": [],
        # Isolated share of the weights, summed over each stage's steps (the record keeps the mean per stage).
        "frozen_step_sum": [0.0] * len(run.schedule.stages),
        **({"plugin": plugin} if plugin else {}),
    }


def check_same_plugin(saved, record, where):
    """Raise :class:`CheckpointError` when a method of your own (a plugin) has changed since ``saved`` (a record
    from ``where``) was written: the file's sha256 differs from ``record``'s, the one this run would train with."""
    before, now = saved.get("plugin"), record.get("plugin")
    if before and now and before["sha256"] != now["sha256"]:
        raise CheckpointError(f"{where} was trained with another version of {now['file']} (sha256 "
                              f"{before['sha256'][:12]}..., now {now['sha256'][:12]}...): restore that file, or "
                              "start a new run with another --out")


def train(cfg: TrainConfig, **kwargs) -> dict:
    """Build a :class:`Run` from ``cfg``, train it (see :func:`fit`) and return its record."""
    return fit(Run(cfg), **kwargs)


def stage_description(prefix, schedule, stage):
    """The progress bar's text: ``prefix``, then the stage as ``stage i/n name``."""
    return f"{prefix} | stage {stage + 1}/{len(schedule.stages)} {schedule.stages[stage].name}"


class StepLog:
    """The loop's running loss and its count of skipped (non-finite) steps.

    On the CPU every step's loss is read as a Python number, as it always was. On an accelerator
    (``sync=False``) each step leaves two device tensors -- its loss, and whether it was skipped -- and they
    are read back together only when the loop logs or checkpoints: a read at every step would make the host
    wait for the device at every step. A run of more than ``max_bad`` skipped steps in a row is then noticed
    up to ``log_interval`` steps late, which changes nothing: a skipped step moves nothing.
    """

    def __init__(self, running, bad_in_a_row, max_bad, sync=True):
        self.running, self.bad_in_a_row, self.max_bad, self.sync = list(running), bad_in_a_row, max_bad, sync
        self.pending, self.new_bad = [], 0

    def add(self, outcome, step, learning_rate):
        if not self.sync:
            self.pending.append(outcome)
            return
        if outcome is not None:
            self.bad_in_a_row = 0
            self.running.append(outcome)
            return
        self.new_bad += 1
        self.bad_in_a_row += 1
        if self.bad_in_a_row > self.max_bad:
            raise TrainingDiverged(
                f"{self.bad_in_a_row} consecutive steps with a non-finite loss or gradient (last at step {step}, "
                f"learning_rate={learning_rate}); the weights were left at their last finite values. "
                "Lower --learning-rate or raise --max-bad-steps.")

    def settle(self, step, learning_rate):
        """Read the device's pending outcomes back (one transfer) and count them as the CPU path does."""
        if self.pending:
            rows = torch.stack([torch.stack(o) for o in self.pending]).tolist()  # [[loss, skipped], ...]
            self.pending, self.sync = [], True
            try:
                for loss, skipped in rows:
                    self.add(None if skipped else loss, step, learning_rate)
            finally:
                self.sync = False

    def take_mean(self):
        """The mean loss of the finite steps since the last call (None if there were none)."""
        mean = sum(self.running) / len(self.running) if self.running else None
        self.running = []
        return mean


def fit(run: Run, strategy=None, progress=True, checkpoint_dir=None, checkpoint_every=0, resume=False,
        on_step=None, log_interval=10, progress_label=None, sync=None) -> dict:
    """Train ``run`` through its whole schedule and return the record; ``run.model`` holds the result.

    ``strategy``: an :class:`~epi_mini.strategy.UpdateStrategy` (default: ``run.make_strategy()``, the one
    ``run.cfg.method`` names). ``on_step(step, run, strategy)`` is called after every optimizer step (e.g. to
    snapshot importance scores in a notebook). The progress bar (``progress``) names the method in words and
    the current stage; ``progress_label`` replaces the method's part (the runner adds the seed, k of n).
    With ``resume`` and a checkpoint in ``checkpoint_dir``, training continues from it; checkpoints are
    written only when ``checkpoint_every`` is set. ``sync`` (default: on the CPU only) reads every step's loss
    back at once; without it, a fused optimizer skips non-finite steps on the device (:class:`StepLog`).
    """
    cfg = run.cfg
    strategy = run.make_strategy() if strategy is None else strategy
    run.strategy = strategy
    record, start, bad_in_a_row, running = new_record(run), 0, 0, []
    if resume and checkpoint_dir is not None:
        state = run.read_checkpoint(checkpoint_dir, strategy)
        if state is not None:
            check_same_plugin(state["record"], record, checkpoint_dir)
            record, start, bad_in_a_row = state["record"], state["step"], state["bad_in_a_row"]
            running = state["running_losses"]
            torch.set_rng_state(state["torch_rng"])
    total, boundaries = run.schedule.total_steps, run.schedule.boundaries
    run.model.train()
    bar = None
    if progress and run.is_main:
        from tqdm.auto import tqdm
        label = progress_label or f"{method_label(cfg.method)} on {cfg.schedule}"
        bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False,
                   desc=stage_description(label, run.schedule, run.schedule.stage_index(min(start, total - 1))))
    if start == 0:  # the starting point: the base's own held-out loss
        record["lm_loss"]["step"].append(0)
        record["lm_loss"]["loss"].append(run.lm_loss())
    t0 = time.perf_counter()
    log = StepLog(running, bad_in_a_row, cfg.max_bad_steps, run.device.type == "cpu" if sync is None else sync)
    step, saved = start, (start if start else None)  # saved: the step of the last checkpoint, written or read
    try:
        for step in range(start, total):
            stage = run.schedule.stage_index(step)
            if step == 0 or step in boundaries:
                strategy.begin_stage(stage)
            for group in run.optimizer.param_groups:
                group["lr"] = lr_at(cfg, step)
            # A skipped (non-finite) step leaves weights, optimizer moments and importance scores as they were.
            log.add(sft_step(run.loss_on, run.batch(step), run.model.parameters(), run.optimizer, strategy,
                             cfg.grad_clip, sync=log.sync), step, cfg.learning_rate)
            record["frozen_step_sum"][stage] += strategy.isolated_fraction()
            if on_step is not None:
                on_step(step, run, strategy)
            done = step + 1
            if done % log_interval == 0 or done == total:
                log.settle(step, cfg.learning_rate)
                mean = log.take_mean()
                if mean is not None:
                    record["loss_curve"]["step"].append(done)
                    record["loss_curve"]["loss"].append(mean)
            stage_end = done in boundaries
            if done % cfg.eval_interval == 0 or stage_end:
                scores, lm = run.evaluate(), run.lm_loss()
                record["eval_curve"]["step"].append(done)
                for t in run.task_names:
                    record["eval_curve"]["scores"][t].append(scores[t])
                record["lm_loss"]["step"].append(done)
                record["lm_loss"]["loss"].append(lm)
                if stage_end:
                    record["stage_scores"].append(scores)
                    record["stage_lm_loss"].append(lm)
                    record["isolated_fraction"].append(strategy.isolated_fraction())
                    strategy.end_stage(stage)
            if bar is not None:
                if stage_end and done < total:
                    bar.set_description(stage_description(label, run.schedule, stage + 1), refresh=False)
                if done % log_interval == 0 and record["loss_curve"]["loss"]:
                    bar.set_postfix(loss=f"{record['loss_curve']['loss'][-1]:.3f}", refresh=False)
                bar.update(1)
            record["bad_steps"] += log.new_bad
            log.new_bad = 0
            if checkpoint_dir is not None and checkpoint_every and done % checkpoint_every == 0 and done < total:
                log.settle(step, cfg.learning_rate)
                record["bad_steps"] += log.new_bad
                log.new_bad = 0
                run.write_checkpoint(checkpoint_dir, strategy, {
                    "config": cfg.to_dict(), "step": done, "record": record, "bad_in_a_row": log.bad_in_a_row,
                    "running_losses": log.running, "torch_rng": torch.get_rng_state()})
                saved = done
    except KeyboardInterrupt:  # Ctrl-C: say where training stood, for the one line the command line prints
        raise TrainingInterrupted(max(step, saved or 0), total, saved) from None
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    R = accuracy_matrix(record["stage_scores"], run.task_names)
    record["accuracy_matrix"] = R.tolist()
    record["metrics"] = summarize(R, record["first_stage"])
    # The budget a method really spent: the mean isolated (frozen) fraction of the weights over each stage's
    # steps, warm-up included -- what tables compare, whatever a method's nominal rho or core ratio says.
    record["frozen_fraction"] = [s / stage.steps for s, stage in zip(record.pop("frozen_step_sum"),
                                                                      run.schedule.stages)]
    summary = strategy.summary()
    if summary:  # plain SFT has nothing to add
        record["strategy"] = summary
    record["timing"] = {"device": str(run.device), "threads": torch.get_num_threads(), "seconds": elapsed,
                        "steps_per_second": (total - start) / elapsed if elapsed > 0 else None,
                        "resumed_at_step": start}
    return record
