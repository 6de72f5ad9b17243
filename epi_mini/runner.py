"""The seed loop: one training run per config (one config per seed), written to an output folder.

``python -m epi_mini`` and its multi-process twin ``torchrun ... -m epi_mini.distributed`` both train through
:func:`run_seeds`, so both check the same things: a folder to resume exists, a finished seed was trained
with the same options, a checkpoint belongs to this config (all before any work starts). The folder holds:

* ``options.json`` -- the options the run was started with (preset, seeds, config fields given on the
  command line, checkpoint interval), written when the first seed starts training: ``--resume DIR`` reads
  them back, so a resumed run needs no other option (:func:`resume_options`);
* ``seed<N>.pt`` (final weights; an FSDP2 run writes the sharded folder ``seed<N>.dcp/`` instead) and then
  ``seed<N>.json`` (the record): the record is written last, so its presence marks the seed as finished;
* ``checkpoint-seed<N>/checkpoint.pt`` when checkpoints are on: an unfinished seed always continues from
  it on resume, whether or not ``--checkpoint-every`` is repeated.

Every file is written atomically. One line per finished seed (time, final average score, forgetting) goes
to ``log``.

What the folder is protected from:

* **Another run.** A new run into a folder that holds a run's files is refused, naming them (``--resume``
  continues that run, ``--overwrite`` replaces it); ``--resume`` of a folder that holds no epi-mini run is
  refused and writes nothing there. While a run writes, it holds the lock ``.lock`` (:class:`OutputLock`):
  a second run into the same folder is refused, naming the process that holds it.
* **Another launcher.** ``options.json`` records the number of processes and whether the run was sharded
  (``--fsdp``): a resume that differs is refused by name (another number of processes only with
  ``--allow-world-size-change``: the run then continues, but not bit for bit).
* **Ctrl-C.** The run stops with :class:`RunInterrupted`, whose message says where it stood: the seed, the
  step, the last checkpoint (or that there is none).
"""
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from .checkpoint import CheckpointError, load_checkpoint, new_file_mode, output_error, save_json
from .config import make_config
from .methods import method_label, plugin_record
from .metrics import forgetting_per_task
from .train import Run, TrainingInterrupted, check_same_plugin, fit

OPTIONS_NAME = "options.json"
LOCK_NAME = ".lock"
# Options a resumed run may change: where it runs, how it reports and how often it checkpoints -- never what
# it trains. Any other option repeated with another value is refused (see resume_options).
RESUME_MAY_CHANGE = ("device", "no_progress", "checkpoint_every")
# How a run was launched, as options.json records it: python -m epi_mini is one process, without sharding.
SINGLE_PROCESS = {"world_size": 1, "fsdp": False, "check_sync": False}
# Every name a run writes into its folder (and the leftovers of interrupted writes), as regular expressions.
RUN_FILES = re.compile(r"options\.json|summary\.json|accuracy_matrix\.png|curves\.png|seed\d+\.(json|pt|dcp)"
                       r"|checkpoint-seed\d+")
LEFTOVERS = re.compile(r"seed\d+\.dcp\.(tmp|old)|\..*\.tmp|.*\.tmp\.png")


def run_files(folder) -> list:
    """The names of the files and folders of an epi-mini run in ``folder`` (empty if it holds none)."""
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if RUN_FILES.fullmatch(p.name)) if folder.is_dir() else []


def holds_run(folder) -> bool:
    """Does ``folder`` hold a run that ``--resume`` can continue: its options, a seed's record or a checkpoint?"""
    return any(n == OPTIONS_NAME or n.endswith(".json") and n.startswith("seed") or n.startswith("checkpoint-seed")
               for n in run_files(folder))


def clear_run(folder):
    """Remove the files of the run in ``folder`` (``--overwrite``), and nothing else."""
    for p in Path(folder).iterdir():
        if RUN_FILES.fullmatch(p.name) or LEFTOVERS.fullmatch(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def check_run_options(checkpoint_every=0, resume=None):
    """Raise ``ValueError`` naming the option for a negative interval, or for a folder to resume that does not
    exist or holds no epi-mini run."""
    if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"invalid --checkpoint-every={checkpoint_every}: must be an integer >= 0")
    if resume and not Path(resume).is_dir():
        raise ValueError(f"invalid --resume={str(resume)!r}: no such output folder")
    if resume and not holds_run(resume):
        raise ValueError(f"invalid --resume={str(resume)!r}: that folder holds no epi-mini run (no {OPTIONS_NAME}, "
                         "seed<N>.json or checkpoint-seed<N>/); name the folder a run wrote (its --out)")


def run_options(preset, seeds, overrides, checkpoint_every=0, launcher=None) -> dict:
    """What ``options.json`` holds: enough to rebuild every config of the run (JSON-ready), and how it was
    launched (``launcher``: see :data:`SINGLE_PROCESS`)."""
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    return {"preset": preset, "seeds": list(seeds), "config": config, "checkpoint_every": checkpoint_every,
            "launcher": dict(launcher or SINGLE_PROCESS)}


def launcher_command(launcher, folder=None):
    """The command that launches a run like ``launcher`` (with ``--resume folder``)."""
    if launcher["world_size"] == 1 and not launcher["fsdp"]:
        command = "python -m epi_mini"
    else:
        command = (f"torchrun --standalone --nproc_per_node={launcher['world_size'] or 'N'} -m epi_mini.distributed"
                   + " --fsdp" * launcher["fsdp"])
    return command + (f" --resume {folder}" if folder is not None else "")


def check_launcher(saved, now, folder, allow_world_size_change=False):
    """Raise ``ValueError`` when the run in ``folder``, launched as ``saved``, is resumed as ``now``: with or
    without ``--fsdp`` (the checkpoints differ in kind), or with another number of processes unless allowed.
    ``now["world_size"]`` None: not known yet (no torchrun); ``saved`` None: a folder from before launchers were
    recorded (nothing to compare)."""
    if saved is None:
        return
    again = f"resume it as it was started: {launcher_command(saved, folder)}"
    if saved["fsdp"] != now["fsdp"]:
        started = "with --fsdp (sharded checkpoints)" if saved["fsdp"] else "without --fsdp (whole state dicts)"
        raise ValueError(f"the run in {folder} was started {started}, this one is "
                         f"{'sharded' if now['fsdp'] else 'not'}: {again}")
    if now["world_size"] is not None and saved["world_size"] != now["world_size"] and not allow_world_size_change:
        raise ValueError(f"the run in {folder} was started with {saved['world_size']} process(es), this one has "
                         f"{now['world_size']}: {again}, or pass --allow-world-size-change to continue with "
                         f"{now['world_size']} (the result is then close to, not bit for bit, the uninterrupted run's)")


def load_run_options(folder):
    """The options saved in ``folder`` (see :func:`run_options`), or None for a folder without them (a run
    from before options were saved). Raises :class:`CheckpointError` for an unreadable file."""
    path = Path(folder) / OPTIONS_NAME
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        if not all(k in saved for k in ("preset", "seeds", "config", "checkpoint_every")):
            raise ValueError("missing entries")
    except ValueError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    saved["config"] = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()}
    saved.setdefault("launcher", None)  # options.json from before launchers were recorded
    return saved


def _option_name(name):
    return "--" + name.replace("_", "-")


def _shown(value):
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) or "(none)"
    return str(value)


def resume_options(saved, preset=None, seeds=None, overrides=None, checkpoint_every=None, launcher=None,
                   folder=None, allow_world_size_change=False) -> dict:
    """The options of a resumed run: ``saved`` (from ``options.json``), with what the command line repeats.

    ``preset``, ``seeds``, ``checkpoint_every`` are None when not given; ``overrides`` holds only the config
    fields given. A given option whose value differs from the run's (its saved value, or the preset's value
    for a field that was not given at the start) raises ``ValueError`` naming the option and both values,
    except the options of :data:`RESUME_MAY_CHANGE`. ``checkpoint_every`` left out keeps the saved interval.
    ``launcher`` (default: one process) is checked against the saved one by :func:`check_launcher`.
    """
    overrides, launcher = overrides or {}, launcher or SINGLE_PROCESS
    check_launcher(saved.get("launcher"), launcher, folder, allow_world_size_change)
    options = {**saved, "config": dict(saved["config"])}
    started = make_config(saved["preset"], **saved["config"]).to_dict()
    given = {"preset": (preset, saved["preset"]), "seeds": (seeds, saved["seeds"])}
    given.update({k: (v, started[k]) for k, v in overrides.items()})
    for name, (value, before) in given.items():
        if value is None or name in RESUME_MAY_CHANGE:
            continue
        now = list(value) if isinstance(value, (list, tuple)) else value
        before = list(before) if isinstance(before, (list, tuple)) else before
        if now != before:
            raise ValueError(
                f"{_option_name(name)} {_shown(now)} differs from the value the run in this folder was started "
                f"with ({_shown(before)}); --resume continues with the saved options ({OPTIONS_NAME}): leave "
                f"{_option_name(name)} out, or start a new run with another --out")
    for name in RESUME_MAY_CHANGE:
        if name in overrides:
            options["config"][name] = overrides[name]
    if checkpoint_every is not None:
        options["checkpoint_every"] = checkpoint_every
    if launcher["world_size"] is not None:
        options["launcher"] = dict(launcher)
    return options


class RunLocked(ValueError):
    """The output folder is being written by another run (see :class:`OutputLock`)."""


class OutputLock:
    """``<folder>/.lock``: one run at a time writes an output folder.

    The file holds ``<pid> <hostname>`` of the process that writes the folder. It is created by ``os.link``
    of a complete temporary file, which fails when the lock exists: of two runs, exactly one gets it, and the
    lock is never seen half-written. A lock whose process is gone (same host, and ``os.kill(pid, 0)`` finds no
    such process: it was killed, or the machine restarted) is stale and taken over. A lock from another host
    cannot be checked, so it counts as held; the message says which file to delete if that run is gone.
    (Two runs that find the same stale lock in the same instant could both take it over: a narrow window this
    check does not close.)
    """

    def __init__(self, folder):
        self.path, self.held = Path(folder) / LOCK_NAME, False
        self.me = f"{os.getpid()} {socket.gethostname()}"

    def holder(self):
        """``(pid, host)`` written in the lock file, or None when there is none (or it is not a lock)."""
        try:
            pid, host = self.path.read_text().split()
            return int(pid), host
        except (OSError, ValueError):
            return None

    @staticmethod
    def alive(pid, host):
        if host != socket.gethostname():
            return True  # another machine's process: we cannot tell, so it counts as running
        try:
            os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists is checked
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # it exists, and belongs to another user
        return True

    def acquire(self):
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".lock.", suffix=".tmp")
            os.fchmod(fd, new_file_mode())  # mkstemp's file is private (0600); this one is an ordinary file
            with os.fdopen(fd, "w") as f:
                f.write(self.me + "\n")
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    holder = self.holder()
                    if holder is not None and self.alive(*holder):
                        raise RunLocked(
                            f"{self.path.parent} is being written by another run (process {holder[0]} on "
                            f"{holder[1]}, which holds {self.path}): wait for it to end, or choose another --out; "
                            f"if no such run is going on, delete {self.path}") from None
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
            raise RunLocked(f"could not take the lock {self.path}: other runs keep taking it")
        except OSError as e:
            raise output_error(self.path, e) from None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def release(self):
        if self.held and self.holder() == (os.getpid(), socket.gethostname()):
            self.path.unlink(missing_ok=True)
        self.held = False


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_seeds`; its message says where the run stood (seed, step, last checkpoint)."""


def interruption(error, cfg, k, n, done, checkpoint_dir, checkpoint_every):
    """The message of a :class:`RunInterrupted`: where the run stood when Ctrl-C came. ``cfg``: the config of
    the seed being trained (the k-th of n; None: none was), ``done``: how many seeds had finished, ``error``:
    the fit's :class:`~epi_mini.train.TrainingInterrupted`, or another interruption."""
    kept = f" ({done} finished seed{'s' * (done != 1)} kept)" if done else ""
    if cfg is None:
        return f"interrupted {'between seeds' if done else 'before training started'}{kept}"
    if not isinstance(error, TrainingInterrupted):
        return f"interrupted while seed {cfg.seed} ({k}/{n}) was being set up or saved{kept}"
    where = f"interrupted: seed {cfg.seed} ({k}/{n}) at step {error.step} of {error.total}{kept}"
    if error.checkpoint_step is not None:
        return f"{where}; last checkpoint at step {error.checkpoint_step} ({checkpoint_dir})"
    if checkpoint_every:
        return (f"{where}; no checkpoint yet (the first is written at step {checkpoint_every}), so seed {cfg.seed} "
                "will train again from step 0")
    return (f"{where}; no checkpoints in this run (--checkpoint-every N writes them), so seed {cfg.seed} will "
            "train again from step 0")


def seed_line(record, k, n, seconds, resumed_at=0, earlier=False):
    """One line for a finished seed: seed (k/n), wall time, final average score, forgetting."""
    seed = record["config"]["seed"]
    R, first = record["accuracy_matrix"], record["first_stage"]
    lost = forgetting_per_task(R, first)
    forgot = (f"forgetting {record['metrics']['forgetting']:.3f} over {len(lost)} earlier task"
              f"{'s' * (len(lost) != 1)}" if lost else "forgetting: none possible (no task before the last stage)")
    score = f"average score {record['metrics']['average_score']:.3f}, {forgot}"
    if earlier:
        return f"seed {seed} ({k}/{n}) had already finished (seed{seed}.json kept): {score}"
    how = f", resumed from its checkpoint at step {resumed_at}" if resumed_at else ""
    return f"seed {seed} ({k}/{n}) done in {seconds:.1f} s{how}: {score}"


def run_seeds(configs, out, make_run=Run, resume=False, checkpoint_every=0, progress=True, annotate=None,
              options=None, log=None, overwrite=False, world_size=1, allow_world_size_change=False):
    """Train each config into folder ``out`` and return the records, in order.

    ``make_run(cfg)`` builds the :class:`~epi_mini.train.Run` (a distributed one under torchrun, with
    ``world_size`` processes; only a run with ``is_main`` writes files and logs). With ``resume``, finished
    seeds are read back and unfinished ones continue from their checkpoint when there is one (checkpoints are
    written only with ``checkpoint_every``); a checkpoint written by another number of processes is refused
    unless ``allow_world_size_change``. Without ``resume``, a folder that holds another run's files is refused,
    or, with ``overwrite``, those files are removed before the first seed trains. Once the first seed's run is
    built, the main process takes the folder's lock (:class:`OutputLock`, released at the end) and writes
    ``options`` (see :func:`run_options`) to ``options.json``, so a run refused for bad input (a method that
    cannot be built too: the strategy is built first) leaves no folder behind. ``annotate(record, run)`` may add
    fields to a record before it is written; ``log(line)`` receives one line per seed. Ctrl-C raises
    :class:`RunInterrupted`.
    """
    out = Path(out)
    n = len(configs)
    say = log or (lambda line: None)
    # Every check before any work: the folder, a finished seed's config, every unfinished seed's checkpoint.
    if not resume and run_files(out) and not overwrite:
        raise ValueError(f"{out} holds another run's files ({', '.join(run_files(out)[:5])}): --resume {out} "
                         f"continues that run, --overwrite replaces it, or choose another --out")
    finished, starts = {}, {}
    for cfg in configs:
        path, ckpt = out / f"seed{cfg.seed}.json", out / f"checkpoint-seed{cfg.seed}"
        if resume and path.exists():
            record = json.loads(path.read_text())
            diffs = [k for k, v in cfg.to_dict().items() if k != "device" and record["config"].get(k) != v]
            if diffs:
                raise CheckpointError(f"{path} was written with a different config (fields {diffs}); "
                                      "resume with the same options or use another --out")
            check_same_plugin(record, {"plugin": plugin_record(cfg.method)}, path)
            finished[cfg.seed] = record
        elif resume:
            state = load_checkpoint(ckpt, cfg)  # refuses a mismatched, broken or damaged checkpoint
            saved_size = state.get("world_size", 1) if state is not None else world_size
            if saved_size != world_size and not allow_world_size_change:
                raise CheckpointError(f"{ckpt} was written by a run of {saved_size} process(es), this one has "
                                      f"{world_size}: resume with {saved_size}, or pass --allow-world-size-change "
                                      "(the result is then close to, not bit for bit, the uninterrupted run's)")
            starts[cfg.seed] = state["step"] if state is not None else 0
    lock = OutputLock(out)

    def begin():  # the first write into the folder: under its lock, then the options
        lock.acquire()
        if not resume and run_files(out):  # written since the check above, by a run that has ended since
            if not overwrite:
                raise ValueError(f"{out} now holds another run's files ({', '.join(run_files(out)[:5])}): "
                                 "choose another --out")
            clear_run(out)
        if options is not None:
            save_json(out / OPTIONS_NAME, options)

    records, begun, cfg, k = [], False, None, 0
    try:
        for k, cfg in enumerate(configs, 1):
            path, ckpt = out / f"seed{cfg.seed}.json", out / f"checkpoint-seed{cfg.seed}"
            if cfg.seed in finished:
                records.append(finished[cfg.seed])
                say(seed_line(finished[cfg.seed], k, n, 0.0, earlier=True))
                continue
            t0 = time.perf_counter()
            run = make_run(cfg)
            strategy = run.make_strategy()  # before the first write: a method that cannot be built leaves no folder
            if not begun:
                run.on_main(begin)
                begun = True
            if resume and not starts.get(cfg.seed) and run.is_main:
                say(f"seed {cfg.seed} ({k}/{n}): no checkpoint in {ckpt}, training from step 0")
            label = f"{method_label(cfg.method)} | seed {cfg.seed} ({k}/{n})"
            record = fit(run, strategy, progress=progress, checkpoint_dir=ckpt if checkpoint_every or resume else None,
                         checkpoint_every=checkpoint_every, resume=bool(resume), progress_label=label)
            if annotate is not None:
                annotate(record, run)
            run.write_weights(out / f"seed{cfg.seed}")  # seed<N>.pt (a sharded run: its own format, see Run)
            run.on_main(lambda: save_json(path, record))  # written last: its presence marks the seed as finished
            if run.is_main:
                say(seed_line(record, k, n, time.perf_counter() - t0, record["timing"]["resumed_at_step"]))
            records.append(record)
            cfg = None  # between seeds: nothing half done
    except KeyboardInterrupt as e:
        ckpt = out / f"checkpoint-seed{cfg.seed}" if cfg is not None else None
        raise RunInterrupted(interruption(e, cfg if begun else None, k, n, len(records), ckpt,
                                          checkpoint_every)) from None
    finally:
        lock.release()
    return records
