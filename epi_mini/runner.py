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
to ``log``. :func:`run_folders` trains several folders' runs at once (the demo: one folder per method), and, with
``workers`` > 1, side by side in worker processes (:func:`train_side_by_side`), each run the same, bit for bit, as
when it trains alone with as many threads.

What the folder is protected from:

* **Another run.** A new run into a folder that holds a run's files is refused, naming them (``--resume``
  continues that run, ``--overwrite`` replaces it); ``--resume`` of a folder that holds no epi-mini run is
  refused and writes nothing there. While a run writes, it holds the lock ``.lock`` (:class:`OutputLock`):
  a second run into the same folder is refused, naming the process that holds it.
* **Another launcher.** ``options.json`` records the number of processes and whether the run was sharded
  (``--fsdp``): a resume that differs is refused by name (another number of processes only with
  ``--allow-world-size-change``: the run then continues, but not bit for bit).
* **Ctrl-C.** The run stops with :class:`RunInterrupted`, whose message says where it stood: the seed, the
  step, the last checkpoint (or that there is none) -- of every run that was training, when they train side by side.
"""
import json
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from queue import Empty

from .checkpoint import CheckpointError, load_checkpoint, new_file_mode, output_error, save_json
from .config import make_config
from .methods import method_label, plugin_record
from .metrics import forgetting_per_task
from .train import CPU_THREADS, Run, TrainingInterrupted, check_same_plugin, fit, use_threads

OPTIONS_NAME = "options.json"
LOCK_NAME = ".lock"
# Options a resumed run may change: where it runs, how it reports and how often it checkpoints -- never what
# it trains. Any other option repeated with another value is refused (see resume_options).
RESUME_MAY_CHANGE = ("device", "no_progress", "checkpoint_every")
# How a run was launched, as options.json records it: python -m epi_mini is one process, without sharding.
SINGLE_PROCESS = {"world_size": 1, "fsdp": False, "check_sync": False}
# Every name a run writes into its folder (and the leftovers of interrupted writes), as regular expressions.
RUN_FILES = re.compile(r"options\.json|summary\.json|accuracy_matrix\.png|curves\.png|compare\.png"
                       r"|seed\d+\.(json|pt|dcp)|checkpoint-seed\d+")
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


@dataclass(frozen=True, eq=False)  # eq=False: a job is itself (runs are told apart by identity, not by value)
class Job:
    """One run of :func:`run_folders`: a config (one seed of one folder), the folder it writes to, and its place
    among the runs (the k-th of n). ``named``: its lines name the method (several methods are training)."""
    cfg: object
    out: Path
    k: int
    n: int
    named: bool = False

    @property
    def name(self):
        seed = f"seed {self.cfg.seed} ({self.k}/{self.n})"
        return f"{method_label(self.cfg.method)}, {seed}" if self.named else seed

    @property
    def short_name(self):
        """For the progress bar: ``EPI seed 0`` (``seed 0`` when the method goes without saying)."""
        return f"{method_label(self.cfg.method).split(' (')[0]} " * self.named + f"seed {self.cfg.seed}"

    @property
    def record_path(self):
        return self.out / f"seed{self.cfg.seed}.json"

    @property
    def checkpoint_dir(self):
        return self.out / f"checkpoint-seed{self.cfg.seed}"


def no_checkpoint_text(seed, checkpoint_every):
    """Why a run that was cut off starts again from step 0."""
    if checkpoint_every:
        return (f"no checkpoint yet (the first is written at step {checkpoint_every}), so seed {seed} will train "
                "again from step 0")
    return f"no checkpoints in this run (--checkpoint-every N writes them), so seed {seed} will train again from step 0"


def interruption(error, job, done, checkpoint_every):
    """The message of a :class:`RunInterrupted` from runs trained one after another: where the run stood when
    Ctrl-C came. ``job``: the run being trained (None: none was), ``done``: how many runs had finished,
    ``error``: the fit's :class:`~epi_mini.train.TrainingInterrupted`, or another interruption."""
    kept = f" ({done} finished seed{'s' * (done != 1)} kept)" if done else ""
    if job is None:
        return f"interrupted {'between seeds' if done else 'before training started'}{kept}"
    if not isinstance(error, TrainingInterrupted):
        return f"interrupted while {job.name} was being set up or saved{kept}"
    where = f"interrupted: {job.name} at step {error.step} of {error.total}{kept}"
    if error.checkpoint_step is not None:
        return f"{where}; last checkpoint at step {error.checkpoint_step} ({job.checkpoint_dir})"
    return f"{where}; {no_checkpoint_text(job.cfg.seed, checkpoint_every)}"


def seed_line(record, k, n, seconds, resumed_at=0, earlier=False, named=False):
    """One line for a finished seed: seed (k/n), wall time, final average score, forgetting. ``named``: the line
    begins with the method (when several methods are training)."""
    seed = record["config"]["seed"]
    R, first = record["accuracy_matrix"], record["first_stage"]
    lost = forgetting_per_task(R, first)
    forgot = (f"forgetting {record['metrics']['forgetting']:.3f} over {len(lost)} earlier task"
              f"{'s' * (len(lost) != 1)}" if lost else "forgetting: none possible (no task before the last stage)")
    score = f"average score {record['metrics']['average_score']:.3f}, {forgot}"
    name = f"{method_label(record['config']['method'])}, " * named + f"seed {seed} ({k}/{n})"
    if earlier:
        return f"{name} had already finished (seed{seed}.json kept): {score}"
    how = f", resumed from its checkpoint at step {resumed_at}" if resumed_at else ""
    return f"{name} done in {seconds:.1f} s{how}: {score}"


def workers_for(runs, workers=None):
    """How many runs train side by side: ``workers`` (default: one per core), never more than ``runs``."""
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ValueError(f"invalid --workers={workers!r}: must be an integer >= 1")
    return max(1, min(workers or os.cpu_count() or 1, runs))


def check_folder(out, configs, resume, overwrite, world_size=1, allow_world_size_change=False):
    """The checks of one output folder before any work: ``(finished, starts)``, seed -> the record of a
    finished seed and seed -> the step an unfinished one resumes from. Refuses (``ValueError``) a new run into a
    folder that holds another run's files unless ``overwrite``, and (:class:`CheckpointError`) a finished seed
    trained with another config, or a checkpoint that is broken, of another config or, unless
    ``allow_world_size_change``, of another number of processes."""
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
    return finished, starts


def fit_and_save(run, job, resume, checkpoint_every, progress=True, annotate=None, on_step=None, strategy=None):
    """Train ``job``'s run (with ``strategy``, default: the config's) and write its weights and then its record
    (the record last: its presence marks the seed as finished); returns the record. The same in this process
    and in a worker process."""
    cfg = run.cfg
    record = fit(run, strategy, progress=progress, checkpoint_dir=job.checkpoint_dir if checkpoint_every or resume else None,
                 checkpoint_every=checkpoint_every, resume=bool(resume), on_step=on_step,
                 progress_label=f"{method_label(cfg.method)} | seed {cfg.seed} ({job.k}/{job.n})")
    if annotate is not None:
        annotate(record, run)
    run.write_weights(job.out / f"seed{cfg.seed}")  # seed<N>.pt (a sharded run: its own format, see Run)
    run.on_main(lambda: save_json(job.record_path, record))
    return record


def run_seeds(configs, out, make_run=Run, resume=False, checkpoint_every=0, progress=True, annotate=None,
              options=None, log=None, overwrite=False, world_size=1, allow_world_size_change=False, workers=1,
              threads=CPU_THREADS):
    """Train each config into folder ``out`` and return the records, in order.

    ``make_run(cfg)`` builds the :class:`~epi_mini.train.Run` (a distributed one under torchrun, with
    ``world_size`` processes; only a run with ``is_main`` writes files and logs). With ``resume``, finished
    seeds are read back and unfinished ones continue from their checkpoint when there is one (checkpoints are
    written only with ``checkpoint_every``); a checkpoint written by another number of processes is refused
    unless ``allow_world_size_change``. Without ``resume``, a folder that holds another run's files is refused,
    or, with ``overwrite``, those files are removed before the first seed trains. Once the first seed's run is
    built, the main process takes the folder's lock (:class:`OutputLock`, released at the end) and writes
    ``options`` (see :func:`run_options`) to ``options.json``, so a run refused for bad input leaves no folder
    behind. ``annotate(record, run)`` may add fields to a record before it is written; ``log(line)``
    receives one line per seed. ``workers`` > 1: seeds train side by side in worker processes of ``threads``
    torch threads each (see :func:`run_folders`). Ctrl-C raises :class:`RunInterrupted`.
    """
    return run_folders([(Path(out), list(configs), options)], make_run, resume, checkpoint_every, progress, annotate,
                       log, overwrite, world_size, allow_world_size_change, workers, threads)[0]


def run_folders(folders, make_run=Run, resume=False, checkpoint_every=0, progress=True, annotate=None, log=None,
                overwrite=False, world_size=1, allow_world_size_change=False, workers=1, threads=CPU_THREADS):
    """:func:`run_seeds` for several output folders at once: ``folders`` is a list of ``(out, configs,
    options)`` (a folder with no configs holds only its ``options``, e.g. the demo's folder above its methods'
    ones); returns each folder's records, in order.

    Every folder is checked before any work (:func:`check_folder`), and the first write takes the lock of every
    folder and writes its options. Runs go lowest seed first, so that a run cut off holds whole seeds. With
    ``workers`` > 1 (and runs built by :class:`~epi_mini.train.Run`), independent runs train side by side, one
    worker process each, with ``threads`` torch threads (:func:`train_side_by_side`); a run's record is the
    same, bit for bit, as when the runs train one after another with as many threads.
    """
    folders = [(Path(out), list(configs), options) for out, configs, options in folders]
    say = log or (lambda line: None)
    checked = [check_folder(out, configs, resume, overwrite, world_size, allow_world_size_change)
               for out, configs, _ in folders]
    named = sum(bool(configs) for _, configs, _ in folders) > 1
    order = sorted(((cfg.seed, i, cfg) for i, (_, configs, _) in enumerate(folders) for cfg in configs),
                   key=lambda item: item[:2])
    jobs = [Job(cfg, folders[i][0], k, len(order), named) for k, (_, i, cfg) in enumerate(order, 1)]
    of_folder = {out: check for (out, _, _), check in zip(folders, checked)}
    finished = {job: of_folder[job.out][0].get(job.cfg.seed) for job in jobs}
    starts = {job: of_folder[job.out][1].get(job.cfg.seed, 0) for job in jobs}
    locks = [OutputLock(out) for out, _, _ in folders]

    def begin():  # the first write into the folders: under their locks, then their options
        for lock, (out, _, options) in zip(locks, folders):
            lock.acquire()
            if not resume and run_files(out):  # written since the check above, by a run that has ended since
                if not overwrite:
                    raise ValueError(f"{out} now holds another run's files ({', '.join(run_files(out)[:5])}): "
                                     "choose another --out")
                clear_run(out)
            if options is not None:
                save_json(out / OPTIONS_NAME, options)

    records = {}
    try:
        for job in jobs:
            if finished[job] is not None:
                records[job] = finished[job]
                say(seed_line(finished[job], job.k, job.n, 0.0, earlier=True, named=named))
        todo = [job for job in jobs if job not in records]
        workers = workers_for(len(todo), workers) if todo else 1
        if workers > 1 and make_run is Run and annotate is None:
            records.update(train_side_by_side(todo, begin, workers, threads, resume, checkpoint_every, progress,
                                              say, starts, done=len(records)))
        else:
            records.update(_one_after_another(todo, make_run, begin, resume, checkpoint_every, progress, annotate,
                                              say, starts, done=len(records)))
    finally:
        for lock in locks:
            lock.release()
    return [[records[job] for job in jobs if job.out == out] for out, _, _ in folders]


def _one_after_another(jobs, make_run, begin, resume, checkpoint_every, progress, annotate, say, starts, done):
    """Train ``jobs`` in this process, one after another (each with its own progress bar)."""
    records, job, begun = {}, None, False
    try:
        for job in jobs:
            t0 = time.perf_counter()
            run = make_run(job.cfg)
            strategy = run.make_strategy()  # before the first write: a method that cannot be built leaves no folder
            if not begun:
                run.on_main(begin)
                begun = True
            if resume and not starts[job] and run.is_main:
                say(f"{job.name}: no checkpoint in {job.checkpoint_dir}, training from step 0")
            record = fit_and_save(run, job, resume, checkpoint_every, progress, annotate, strategy=strategy)
            if run.is_main:
                say(seed_line(record, job.k, job.n, time.perf_counter() - t0, record["timing"]["resumed_at_step"],
                              named=job.named))
            records[job] = record
            job = None  # between seeds: nothing half done
    except KeyboardInterrupt as e:
        raise RunInterrupted(interruption(e, job if begun else None, done + len(records), checkpoint_every)) from None
    return records


# --- several runs side by side -------------------------------------------------------------------------------------
# `workers` worker processes, started fresh ("spawn": no thread pool or lock of this process is inherited
# half-initialised), each with `threads` torch threads, take the runs from one queue, lowest seed first, and train
# them one after another. They report through another queue: ("start", key, pid) as a run begins, ("step", key, done,
# stage, stages, total) every REPORT_EVERY steps, ("done", key, seconds) once its record is written; and, when a worker
# stops, ("interrupted", key, step, total, checkpoint_step) or ("failed", key, error, traceback), where key is None
# if it was between runs.
REPORT_EVERY = 10
STOP_WAIT_S = 30  # how long a Ctrl-C waits for the workers to say where they stood before it ends them


def _interrupt_once(signum, frame):
    """A worker's SIGINT handler: the first Ctrl-C stops its run; later ones (the terminal's and the one the
    parent passes on) change nothing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


class _SigintBlocked:
    """``with _SigintBlocked():`` holds SIGINT back until the block ends (where the platform can): a Ctrl-C then
    lands after a message is read whole, or after the worker processes are recorded as started. A process started
    in the block starts with SIGINT blocked too, until it is ready to report one (see _worker)."""

    def __enter__(self):
        self.old = None
        if hasattr(signal, "pthread_sigmask"):
            self.old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def __exit__(self, *exc):
        if self.old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.old)


def _sendable(error):
    """``error`` if it survives pickling (so the parent raises the same kind), else a RuntimeError saying it."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _key(job):
    return str(job.out), job.cfg.seed


def _worker(todo, queue, threads, resume, checkpoint_every):
    """A worker process: train the runs ``todo`` hands out until it hands out None; report to ``queue`` (see above)."""
    signal.signal(signal.SIGINT, _interrupt_once)
    key = None
    try:
        if hasattr(signal, "pthread_sigmask"):  # started with SIGINT blocked: a Ctrl-C that came meanwhile lands here
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        use_threads(threads)

        def report(step, run, strategy):
            done, total = step + 1, run.schedule.total_steps
            if done % REPORT_EVERY == 0 or done == total:
                queue.put(("step", key, done, run.schedule.stage_index(step), len(run.schedule.stages), total))
        for job in iter(todo.get, None):
            key, t0 = _key(job), time.perf_counter()
            queue.put(("start", key, os.getpid()))
            fit_and_save(Run(job.cfg), job, resume, checkpoint_every, progress=False, on_step=report)
            queue.put(("done", key, time.perf_counter() - t0))
            key = None
    except TrainingInterrupted as e:
        queue.put(("interrupted", key, e.step, e.total, e.checkpoint_step))
    except KeyboardInterrupt:
        queue.put(("interrupted", key, None, None, None))
    except BaseException as e:  # noqa: B902 -- whatever it is, the parent must hear of it
        queue.put(("failed", key, _sendable(e), traceback.format_exc()))


class WorkerLost(RuntimeError):
    """A worker process ended without a word (killed, or out of memory); what the runs wrote is kept."""


class WorkerTraceback(Exception):
    """The traceback of an error in a worker process (the ``__cause__`` of the error raised in the parent)."""

    def __str__(self):
        return "\n" + self.args[0]


def train_side_by_side(jobs, begin, workers, threads, resume=False, checkpoint_every=0, progress=True, say=None,
                       starts=None, done=0):
    """Train ``jobs`` (:class:`Job`, in the order given) in ``workers`` worker processes, each with ``threads`` torch
    threads; returns job -> record. ``begin()`` is called once, before the workers start, after the first run has
    been built here (so input that no run can be built from is refused before any folder is written).

    One progress bar counts the steps of all runs; ``say(line)`` gets one line per finished run. Ctrl-C (in this
    process, or in the terminal, which sends it to the workers too) stops every worker; each says where its run
    stood, and :class:`RunInterrupted` says it in one line. A failure in a worker stops the others and is raised
    here, with the worker's traceback as its cause.
    """
    say, starts = say or (lambda line: None), starts or {}
    first = Run(jobs[0].cfg)  # built here, with its method: input no run can be built from is refused before any write
    first.make_strategy()
    estimate = first.schedule.total_steps
    del first
    begin()
    by_key = {_key(job): job for job in jobs}
    state = {job: {"step": starts.get(job, 0), "total": estimate, "stage": None} for job in jobs}
    context = multiprocessing.get_context("spawn")
    todo, queue = context.Queue(), context.Queue()
    for job in [*jobs, *[None] * workers]:  # the runs in order, then one "no more" per worker
        todo.put(job)
    running, records, stopped, ended, dead = {}, {}, {}, [], set()  # ended: what workers said as they stopped
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(s["total"] for s in state.values()), initial=sum(s["step"] for s in state.values()),
                   unit="step", dynamic_ncols=True, leave=False, desc=f"{len(jobs)} runs, {workers} side by side")

    def write(line):  # a line above the progress bar
        if bar is None:
            return say(line)
        with bar.external_write_mode():
            say(line)

    def show():
        if bar is not None:
            bar.total = sum(s["total"] for s in state.values())
            bar.n = sum(s["step"] for s in state.values())
            bar.set_postfix_str("; ".join(
                f"{job.short_name}: " + (f"stage {state[job]['stage'] + 1}/{state[job]['stages']}"
                                         if state[job]["stage"] is not None else "starting") for job in running))

    def handle(message):
        kind, job = message[0], by_key.get(message[1])
        if kind == "start":
            running[job] = message[2]  # the worker's process id
            if resume and not starts.get(job):
                write(f"{job.name}: no checkpoint in {job.checkpoint_dir}, training from step 0")
        elif kind == "step":
            state[job].update(step=message[2], stage=message[3], stages=message[4], total=message[5])
        elif kind == "done":
            records[job] = json.loads(job.record_path.read_text())
            state[job]["step"] = state[job]["total"]
            del running[job]
            write(seed_line(records[job], job.k, job.n, message[2], records[job]["timing"]["resumed_at_step"],
                            named=job.named))
        elif kind == "interrupted":
            ended.append(message)
            if job is not None:
                stopped[job] = {"step": message[2], "total": message[3], "checkpoint": message[4]}
        else:
            ended.append(message)
            if job is not None:
                stopped[job] = {"error": message[2], "traceback": message[3]}

    def settle(timeout=0.2):
        """Read and act on what the workers said; SIGINT waits until that is done (a message is read whole)."""
        with _SigintBlocked():
            heard = False
            try:
                handle(queue.get(timeout=timeout))
                heard = True
                while True:
                    handle(queue.get_nowait())
            except Empty:
                pass
            for process in processes:  # a worker that died without a word (killed, out of memory)
                if process.exitcode not in (None, 0) and process.pid not in dead:
                    dead.add(process.pid)
                    lost = [job.name for job, pid in running.items() if pid == process.pid]
                    how = (f"was killed by {signal.Signals(-process.exitcode).name}" if process.exitcode < 0
                           else f"ended with exit status {process.exitcode}")
                    ended.append(("failed", None, WorkerLost(
                        f"the worker process training {lost[0] if lost else 'no run'} {how}"), ""))
            if heard:
                show()

    with _SigintBlocked():  # the workers start with SIGINT blocked (see _worker); a Ctrl-C lands once all have started
        processes = [context.Process(target=_worker, args=(todo, queue, threads, resume, checkpoint_every), daemon=True)
                     for _ in range(workers)]
        for process in processes:
            process.start()
    try:
        while len(records) < len(jobs):
            settle()
            if ended:
                raise KeyboardInterrupt  # a worker was interrupted or failed: stop the others too
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the stopping short
        try:
            for process in processes:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGINT)
            deadline = time.monotonic() + STOP_WAIT_S
            while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
                settle()
            settle(0)
            for process in processes:
                if process.is_alive():
                    process.terminate()
                process.join()
        finally:
            signal.signal(signal.SIGINT, previous)
        failures = [message for message in ended if message[0] == "failed"]
        if failures:
            _, _, error, remote = failures[0]
            raise error from (WorkerTraceback(remote) if remote else None)
        raise RunInterrupted(side_by_side_interruption(jobs, running, stopped, state, done + len(records),
                                                       len(jobs) - len(records) - len(running),
                                                       checkpoint_every)) from None
    finally:
        if bar is not None:
            bar.close()
        todo.cancel_join_thread()  # runs never handed out stay in the queue: nothing waits for them
        todo.close()
        queue.close()
    return records


def side_by_side_interruption(jobs, running, stopped, state, kept, not_started, checkpoint_every):
    """One line for Ctrl-C during :func:`train_side_by_side`: where each run that was training stood (``stopped``:
    what its worker said), how many finished runs are kept, how many had not started."""
    parts = []
    for job in (j for j in jobs if j in running):
        said = stopped.get(job)
        if said is None:
            parts.append(f"{job.name} did not answer and was stopped near step {state[job]['step']}")
        elif said["step"] is None:
            parts.append(f"{job.name} was being {'set up' if state[job]['stage'] is None else 'saved'}")
        elif said["checkpoint"] is not None:
            parts.append(f"{job.name} at step {said['step']} of {said['total']}, last checkpoint at step "
                         f"{said['checkpoint']} ({job.checkpoint_dir})")
        else:
            parts.append(f"{job.name} at step {said['step']} of {said['total']}, "
                         f"{no_checkpoint_text(job.cfg.seed, checkpoint_every)}")
    tail = [f"{kept} finished seed{'s' * (kept != 1)} kept"] * bool(kept)
    tail += [f"{not_started} not started"] * bool(not_started)
    return "interrupted: " + ("; ".join(parts) or "before training started") + (f" ({', '.join(tail)})" if tail else "")
