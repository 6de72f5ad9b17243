"""``python -m epi_mini``: the demo, or one method over several seeds; tables, records and plots.

Without ``--method`` it runs the demo: full SFT, CPI-FT and EPI fine-tune the base on the same seeds and schedule
(the `cpu` preset's shifting schedule, seed 0), each into its own folder, ``runs/demo-<schedule>/<method>/`` (a run
folder like any other); it prints one line per finished run, the three side by side (each task's final score,
forgetting, plasticity, earlier tasks' final score, the base's held-out LM loss at the start, after SFT and its rise),
writes ``compare.png``, ``summary.json`` and ``options.json`` into ``runs/demo-<schedule>/``, and ends with what its
seeds can and cannot show.

With ``--method NAME`` it trains that method alone (3 seeds by default), prints one line per finished seed, the
final score of every task and the forgetting figures with their spread, and writes to ``runs/<method>-<schedule>/``:
``options.json`` (what ``--resume`` reads back), ``seed<N>.json`` (one record per seed), ``seed<N>.pt`` (final
weights), ``summary.json``, ``accuracy_matrix.png`` and ``curves.png``; it ends by listing the folder, one line per
file, and what to try next. Every file is written atomically, so a run that is cut off leaves no half-written output.
In every table a final score at its task's floor (what one answer to every prompt scores) is marked ``*``.

Runs train side by side on the CPU, one process per core (``--workers``), each with one torch thread
(``--threads``): the records are those of the same runs one after another.

``--resume DIR`` needs no other option: the options saved in ``DIR/options.json`` are used, an unfinished
seed continues from its checkpoint, and an option repeated with another value is refused, naming it. A new run
into a folder that holds another run is refused (``--overwrite`` replaces it), and so is ``--resume`` of a
folder that holds no run. Ctrl-C prints one line -- where each run stood, the last checkpoint, the command that
continues -- and exits with status 130.
"""
import argparse
import os
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path

from .checkpoint import CHECKPOINT_NAME, CheckpointError, OutputError, save_json
from .config import PRESETS, OptionParser, TrainConfig, make_config
from .data import SCHEDULE_NAMES
from .epi import IMPORTANCE_SCORES, NORMALIZERS
from .evaluate import eval_floors
from .methods import METHODS, is_plugin, method_label, method_slug
from .metrics import mean_and_spread, over_seeds, record_metric, summarize_seeds
from .runner import (LOCK_NAME, OPTIONS_NAME, SINGLE_PROCESS, WorkerLost, check_run_options, holds_run,
                     launcher_command, load_run_options, resume_options, run_folders, run_options, run_seeds,
                     workers_for)
from .tasks import BUILTIN_TASKS, DataFormatError
from .train import CPU_THREADS, pick_device, use_threads

HELP = {
    "n_layer": "transformer blocks", "n_head": "attention heads", "n_embd": "embedding width",
    "block_size": "longest sequence (tokens)", "dropout": "dropout probability, in [0, 1)",
    "schedule": f"task schedule: {', '.join(SCHEDULE_NAMES)}", "steps_per_stage": "training steps per stage",
    "replay": "share of each batch replaying earlier stages' tasks, in [0, 1) (shifting schedule)",
    "tasks": "task names to train",
    "task_files": "extra JSONL task files, one {\"task\",\"prompt\",\"response\"} object per line",
    "batch_size": "sequences per batch", "learning_rate": "AdamW learning rate",
    "weight_decay": "AdamW decoupled weight decay (matrices and embeddings only)",
    "grad_clip": "gradient-norm clipping (0 = off)", "lr_warmup_steps": "linear learning-rate warm-up steps",
    "eval_interval": "evaluate every N steps (and at every stage end)",
    "eval_size": "held-out examples per task (0 = all)",
    "method": "; ".join(f"{name}: {m.help}" for name, m in METHODS.items()) + "; or FILE.py:CLASS, your own "
              "(README: Your own method)",
    "isolation_ratio": "rho: fraction of parameters isolated (EPI) or per-task core size (static), in [0, 1)",
    "mask_interval": "K: steps between EPI mask refreshes (integer >= 1), 'once' (refresh once after warm-up, "
                     "never again) or 'auto' (refresh when the isolated set has drifted)",
    "ema_beta": "beta of the importance EMA, in [0, 1)",
    "warmup_steps": "steps of importance statistics before EPI isolates anything",
    "normalizer": f"layer-wise normaliser: {', '.join(NORMALIZERS)}",
    "importance": f"importance score: {', '.join(IMPORTANCE_SCORES)}",
    "probe_steps": "static (CPI-FT): steps of each task's probe fine-tune",
    "core_ratio": "static (CPI-FT): each task's core region, as a fraction of the parameters (the paper: 0.01)",
    "cpift_stages": "static (CPI-FT): 'grouping' (its task groups become the stages) or 'schedule' (keep the "
                    "schedule's stages)",
    "cpift_tau": "static (CPI-FT): core overlap (Jaccard) that puts two tasks in one group",
    "cpift_fusion": "static (CPI-FT): transplant cores and SLERP-merge the probes before training (true/false)",
    "ema_storage": "EPI's importance EMA: fp32 (4 bytes a parameter), bf16 (2) or int8 (1.016)",
    "mask_storage": "EPI's isolated set: index (int32 indices: 4 rho bytes a parameter, fastest), gaps (about rho "
                    "bytes) or bits (1/8 byte)",
    "isolation_schedule": "EPI-family: one rho per stage, e.g. 0 0.1 0.1",
    "replay_importance": "EPI variant: rank entries also by the replayed rows' own gradient EMA (true/false)",
    "base_importance": "EPI variant: rank entries also by the base's Fisher on its pretraining text, so what the "
                       "base knew is protected too (true/false)",
    "init": "where the weights start: base (the preset's pretrained base model), scratch (random weights, a "
            "control) or PATH (a compatible state dict)",
    "tokenizer": "bytes (offline) or gpt2 (needs --gpt2-vocab or tiktoken's cache)",
    "gpt2_vocab": "folder holding GPT-2's vocab.bpe and encoder.json",
    "device": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps",
    "max_bad_steps": "consecutive non-finite steps tolerated before the run stops",
}
# What an empty default means, said in words instead of printing () or ''.
EMPTY_DEFAULT = {
    "tasks": f"default: all five families, {' '.join(BUILTIN_TASKS)}",
    "task_files": "default: none",
    "isolation_schedule": "default: --isolation-ratio throughout",
    "gpt2_vocab": "default: none, tiktoken's own cache is used",
}
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_PRESET = "cpu"
# The demo, `python -m epi_mini` without --method: these three methods fine-tune the base on the same seeds and
# schedule, each into its own subfolder, and are printed side by side. CPI-FT keeps the schedule's stages, as in
# results/main (by default it regroups the tasks into stages of its own), so all three see the same data in the
# same order.
DEMO_METHODS = ("full", "static", "epi")
DEMO_METHOD_OPTIONS = {"static": {"cpift_stages": "schedule"}}
# One seed, because the demo must end within 5 minutes on 2 cores: one run of the cpu preset takes 100-140 s on one
# thread and CPI-FT's probes add a third, so two seeds (6 runs, over 600 core-seconds) take over 5 minutes even side
# by side. One seed's three runs take 2 workers about 4.5 minutes: measured on 2 cores shared with other jobs, the
# worker that trained full SFT and then EPI used 279 s of CPU, the one that trained CPI-FT 179 s (wall time then:
# 660 s). The settings are the committed results' own (results/main), so the demo's figures can be read against
# them; the demo changes none of them (evaluating less often would save about 6 s a run).
DEMO_SEEDS = (0,)
DEMO_SEEDS_WHY = ("one seed, so that the demo ends within 5 minutes on 2 cores (two seeds of three methods take over "
                  "5); --seeds 0 1 2 3 4 trains five paired seeds")
# A final score this close to its task's constant-answer floor (or below it) is marked in every table.
FLOOR_MARGIN = 0.02


def _default_text(f):
    """The help's default: the cpu preset's value, or what an empty default means."""
    if f.name == "method":  # left out, python -m epi_mini runs the demo
        return f"default: the demo, {', '.join(DEMO_METHODS)} side by side; under torchrun: {f.default}"
    value = PRESETS[DEFAULT_PRESET].get(f.name, f.default)
    if value in ((), "", None):
        return EMPTY_DEFAULT.get(f.name, "default: none")
    return f"cpu preset: {value!r}"


def _mask_interval(text):
    return text if text in ("once", "auto") else int(text)


class MethodNames(tuple):
    """The built-in method names, as ``--method``'s choices (listed by --help, and the closest one suggested for
    a typo), which also admit a method of your own, ``FILE.py:CLASS`` (checked when the config is built)."""

    def __contains__(self, value):
        return is_plugin(value) or tuple.__contains__(self, value)


def _boolean(text):
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def build_parser():
    p = OptionParser(
        prog="python -m epi_mini",
        description="Train a tiny GPT with SFT on a multi-task schedule and report forgetting. Without --method: "
                    "the demo, full SFT, CPI-FT and EPI side by side. Options left out take the preset's value.")
    # preset, seeds and checkpoint interval default to None so that --resume can tell what was repeated.
    p.add_argument("--preset", default=None, choices=tuple(PRESETS),
                   help="model and schedule size: tiny (tests), cpu (default), gpu")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="one run per seed (default: 0 1 2)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<method>-<schedule>)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="save a resumable checkpoint every N steps (default: 0 = never)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in output folder DIR with the options it was started with (no other "
                        "option needed): finished seeds are kept, others continue from their last checkpoint. "
                        "--device, --no-progress and --checkpoint-every may change; another option repeated "
                        "with a different value is refused")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the output folder (without it, a new run into a folder that "
                        "holds one is refused)")
    p.add_argument("--allow-world-size-change", action="store_true",
                   help="with --resume: continue a run with another number of processes than it was started with "
                        "(the result is then close to the uninterrupted run's, not bit for bit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="runs trained side by side, each in a process of its own with --threads threads (default: "
                        "one per core, at most one per run); the records are the same as one after another")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help=f"torch threads for CPU training (default: {CPU_THREADS}; more threads are faster only on an "
                        "idle machine and much slower when other jobs share the cores: benchmarks/threads.py)")
    for f in fields(TrainConfig):
        if f.name in ("seed", "preset"):
            continue
        kind = {"tasks": str, "task_files": str, "mask_interval": _mask_interval,
                "isolation_schedule": float}.get(f.name, f.type)
        kind = {"int": int, "float": float, "str": str, "bool": _boolean}.get(kind, kind) if isinstance(kind, str) else kind
        extra = {"nargs": "+"} if f.name in ("tasks", "task_files", "isolation_schedule") else {}
        if f.name == "method":
            extra["metavar"] = "{" + ",".join([*METHODS, "FILE.py:CLASS"]) + "}"
        choices = {"method": MethodNames(METHODS), "schedule": SCHEDULE_NAMES, "normalizer": NORMALIZERS,
                   "importance": tuple(IMPORTANCE_SCORES), "tokenizer": ("bytes", "gpt2"),
                   "cpift_stages": ("grouping", "schedule"), "ema_storage": ("fp32", "bf16", "int8"),
                   "mask_storage": ("index", "gaps", "bits")}.get(f.name)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None, choices=choices,
                       help=HELP.get(f.name, f.name) + f" ({_default_text(f)})",
                       **extra)
    return p


METRIC_TEXT = {
    "average_score": ("average score", "mean final score over the tasks"),
    "forgetting": ("forgetting", "earlier tasks: best score before the last stage minus final (lower is better)"),
    "backward_transfer": ("backward transfer", "earlier tasks: final score minus score at the end of their stage"),
    "plasticity": ("plasticity", "new tasks: score at the end of the stage that introduces them"),
}


def _seeds_text(seeds):
    return ", ".join(str(s) for s in seeds[:-1]) + f" and {seeds[-1]}" if len(seeds) > 1 else str(seeds[0])


def print_summary(summary, records, file=None):
    """The run's table: header, each task's final score, the metrics, and which earlier tasks lost score.
    One seed: single values (one seed has no spread); several: mean ± sample std over seeds."""
    file = file or sys.stdout
    n = len(records)
    fmt = (lambda ms: f"{ms[0]:.3f}") if n == 1 else (lambda ms: f"{ms[0]:.3f} ± {ms[1]:.3f}")  # noqa: E731
    cfg = records[0]["config"]
    head = f"\n{method_label(cfg['method'])} on the {cfg['schedule']} schedule ({cfg['preset']} preset)"
    if n == 1:
        print(f"{head}, seed {summary['seeds'][0]}\none seed has no spread, so these are single values "
              "(--seeds 0 1 2 gives a mean and a standard deviation)", file=file)
    else:
        print(f"{head}, seeds {_seeds_text(summary['seeds'])}: mean ± std over {n} seeds", file=file)
    width = 12 if n == 1 else 16
    print(f"{'task':<12} {'final score':>{width}}", file=file)
    floors = floors_of(records[0])
    marked = {t: floors[t] for t, ms in summary["final_scores"].items() if at_floor(ms[0], floors.get(t))}
    for t, ms in summary["final_scores"].items():
        print(f"{t:<12} {fmt(ms):>{width}}{' *' if t in marked else ''}", file=file)
    if marked:
        print(floor_footnote(marked), file=file)
    never = [t for t in records[0]["tasks"] if all(v == 0 for r in records for v in r["eval_curve"]["scores"][t])]
    if never:
        every = " of every seed" if n > 1 else ""
        print(f"not learned in this run (0 at every evaluation{every}): {', '.join(never)}", file=file)
        exact = [t for t in never if getattr(BUILTIN_TASKS.get(t), "exact", True)]
        if exact:
            one = len(exact) == 1
            print(f"  {', '.join(exact)} {'is' if one else 'are'} scored by exact match, which gives no credit for a "
                  f"nearly right answer; longer stages (--steps-per-stage) give {'it' if one else 'them'} more time",
                  file=file)
    print("", file=file)
    for k, ms in summary["metrics"].items():
        name, meaning = METRIC_TEXT.get(k, (k, ""))
        print(f"{name:<18} {fmt(ms):>{width}}   {meaning}", file=file)
    if not summary["forgetting"]:
        print("\nno task was trained before the last stage: nothing could be forgotten", file=file)
        return
    lost, kept, unlearned = [], [], []
    for t, f in summary["forgetting"].items():
        best, final = f["best_before_last_stage"][0], f["final"][0]
        if round(best, 3) == 0:
            unlearned.append(t)
        elif round(best, 3) > round(final, 3):
            lost.append((t, f))
        else:
            kept.append(f"{t} ({best:.3f} -> {final:.3f})")
    if lost:
        print("\nforgetting, tasks that lost score (best score before the last stage -> final score):", file=file)
        for t, f in lost:
            drop = f["best_before_last_stage"][0] - f["final"][0]
            halved = sum(f["fell_by_half"])
            how = (f"fell by at least half in {halved}/{n} seeds" if n > 1 else
                   "fell by at least half" if halved else "kept more than half")
            print(f"  {t:<12} {fmt(f['best_before_last_stage'])} -> {fmt(f['final'])}   lost {drop:.3f}; {how}",
                  file=file)
    else:
        print("\nforgetting: no earlier task lost score", file=file)
    if kept:
        print(f"kept or improved: {', '.join(kept)}", file=file)
    if unlearned:
        print(f"not learned before the last stage (nothing to forget): {', '.join(unlearned)}", file=file)


def floors_of(record):
    """task -> the constant-answer floor of the held-out set ``record``'s run was scored on (see
    :func:`epi_mini.evaluate.eval_floors`); {} where that set cannot be read back (a task file moved since)."""
    cfg = record["config"]
    try:
        return eval_floors(tuple(record["tasks"]), cfg.get("eval_size", 0), tuple(cfg.get("task_files", ())))
    except (OSError, ValueError, KeyError, DataFormatError):
        return {}


def at_floor(score, floor):
    """Is a final score at its task's floor (within FLOOR_MARGIN of it, or below)? No floor known: no."""
    return floor is not None and score <= floor + FLOOR_MARGIN


def floor_footnote(marked):
    """The footnote of the scores marked ``*`` (``marked``: task -> its floor)."""
    return (f"* at or below the task's floor (+{FLOOR_MARGIN}): giving every prompt the same answer scores "
            + ", ".join(f"{t} {f:.3f}" for t, f in marked.items()))


def config_overrides(args):
    """The config fields given on the command line (those left out take the preset's value)."""
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                 if f.name not in ("seed", "preset") and getattr(args, f.name) is not None}
    for name in ("tasks", "task_files", "isolation_schedule"):
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    return overrides


def resolve_options(args, warn=None, launcher=None, demo=False):
    """``(options, out)`` for parsed arguments: the options of a new run, or, with ``--resume DIR``, those
    saved in ``DIR/options.json`` with what the command line may change (see
    :func:`epi_mini.runner.resume_options`). Raises ``ValueError`` naming the option that is refused.
    ``launcher``: how this run is launched (default: one process, :data:`epi_mini.runner.SINGLE_PROCESS`); a
    resume launched otherwise than its run was is refused. ``warn(line)`` is told when a folder to resume has
    no saved options (a run from an older epi-mini). ``demo``: a new run without --method is the demo (its
    options name the methods, ``"methods"``: see DEMO_METHODS); a demo's folder resumes only as one."""
    overrides, launcher = config_overrides(args), launcher or SINGLE_PROCESS
    check_run_options(args.checkpoint_every or 0, args.resume)
    if args.resume:
        if args.overwrite:
            raise ValueError(f"--overwrite and --resume {args.resume} exclude each other: --resume continues the "
                             "run in that folder, --overwrite replaces it")
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise ValueError(f"--out {args.out} differs from --resume {args.resume}: a resumed run writes to the "
                             "folder it continues; leave --out out")
        saved = load_run_options(args.resume)
        if saved is not None and saved.get("methods"):
            methods = ", ".join(saved["methods"])
            if not demo:
                raise ValueError(f"{args.resume} holds the demo of {methods}: continue it with python -m epi_mini "
                                 f"--resume {args.resume}, or one of its methods' runs, in {args.resume}/<method>")
            if args.method is not None:
                raise ValueError(f"--method {args.method}: {args.resume} holds the demo, which trains {methods}; "
                                 f"--resume {args.resume} continues them all (leave --method out), --resume "
                                 f"{Path(args.resume) / args.method} that one alone")
        if saved is not None:
            return resume_options(saved, args.preset, args.seeds, overrides, args.checkpoint_every, launcher,
                                  args.resume, args.allow_world_size_change), Path(args.resume)
        if warn is not None:
            warn(f"note: {args.resume} has no {OPTIONS_NAME} (a run from an older epi-mini): resuming with the "
                 "options on this command line, which must be the ones it was started with")
    if demo and args.method is None and not args.resume:
        options = {**run_options(args.preset or DEFAULT_PRESET, args.seeds or list(DEMO_SEEDS), overrides,
                                 args.checkpoint_every or 0, launcher), "methods": list(DEMO_METHODS)}
        configs = [c for m in DEMO_METHODS for c in configs_of(method_options(options, m))]  # each checked now
        return options, Path(args.out or f"runs/demo-{configs[0].schedule}")
    options = run_options(args.preset or DEFAULT_PRESET, args.seeds or list(DEFAULT_SEEDS), overrides,
                          args.checkpoint_every or 0, launcher)
    first = configs_of(options)[0]
    return options, Path(args.resume or args.out or f"runs/{method_slug(first.method)}-{first.schedule}")


def configs_of(options):
    """One validated config per seed of ``options`` (see :func:`epi_mini.runner.run_options`)."""
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in options["config"].items()}
    return [make_config(options["preset"], seed=s, **config) for s in options["seeds"]]


def describe(name, records):
    """One line saying what a file of the output folder holds."""
    stem = name.split("/")[0]
    if name == OPTIONS_NAME:
        return "the options this run was started with: --resume reads them back"
    if name == "summary.json":
        return "the figures above" + (", mean and std over seeds" if len(records) > 1 else "")
    if name == "accuracy_matrix.png":
        return "score on each task after each stage (heatmap)"
    if name == "curves.png":
        return "held-out score per task during training, stages marked"
    if stem.startswith("seed") and name.endswith(".json"):
        return f"seed {stem[4:-5]}'s record: config, loss and score curves, accuracy matrix, metrics, timing"
    if stem.startswith("seed") and name.endswith(".pt"):
        return f"seed {stem[4:-3]}'s final weights (torch.load(path, weights_only=True) gives the state_dict)"
    if stem.startswith("checkpoint-seed") and name.endswith("/" + CHECKPOINT_NAME):
        return f"seed {stem[15:]}'s last checkpoint, what --resume continues from (not needed once it finished)"
    if stem.startswith("checkpoint-seed") and "/shards-step" in name:
        return f"a shard file of seed {stem[15:]}'s last checkpoint (torch.distributed.checkpoint)"
    if stem.startswith("seed") and stem.endswith(".dcp"):
        return f"seed {stem[4:-4]}'s final weights, sharded (torch.distributed.checkpoint)"
    if name == LOCK_NAME:
        return "the lock of the run that writes this folder (removed when it ends)"
    if name.endswith(".tmp"):
        return "a temporary file left by an interrupted write (safe to delete)"
    return "not written by epi-mini"


def list_outputs(out, records, since=None, file=None):
    """Print every file in ``out`` with one line on what it holds; files older than ``since`` (a time
    stamp) are marked as written before this run."""
    file = file or sys.stdout
    names = sorted((str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file()),
                   key=lambda n: (n.startswith("checkpoint-"), n.endswith(".png"), n == "summary.json",
                                  n != OPTIONS_NAME, n))
    width = max(len(n) for n in names) if names else 0
    print(f"\nwrote {out}/ (every file now in it):", file=file)
    for name in names:
        # 2 s of slack: some file systems store modification times to the second
        earlier = since is not None and os.path.getmtime(Path(out) / name) < since - 2
        print(f"  {name:<{width}}  {describe(name, records)}{' (written before this run)' if earlier else ''}",
              file=file)


def command_options(options, default_seeds=DEFAULT_SEEDS):
    """The command-line options that start a run like ``options`` again (all but --method and --device; the
    preset and the seeds only where they are not the defaults)."""
    args = [] if options["preset"] == DEFAULT_PRESET else ["--preset", options["preset"]]
    args += [] if list(options["seeds"]) == list(default_seeds) else ["--seeds", *map(str, options["seeds"])]
    for k, v in options["config"].items():
        if k not in ("method", "device"):
            args += ["--" + k.replace("_", "-"), *(map(str, v) if isinstance(v, (list, tuple)) else [str(v)])]
    return args


def next_steps(options, file=None, command="python -m epi_mini"):
    """Print the next thing to try: the same run with another method (by ``command``), then the course."""
    file = file or sys.stdout
    method = options["config"].get("method", "full")
    other = "static" if method == "epi" else "epi"
    args = command_options(options)
    schedule = configs_of(options)[0].schedule
    print(f"\nnext: {command} {shlex.join(args + ['--method', other])}", file=file)
    print(f"      trains {method_label(other)} on the same schedule into runs/{other}-{schedule}/, to compare "
          f"with this {method_label(method)} run", file=file)
    print("      or start the course: jupyter lab notebooks/00_quickstart.ipynb", file=file)


def save_summary(out, records):
    """Write ``summary.json`` (:func:`~epi_mini.metrics.summarize_seeds`) into ``out``, and return it."""
    summary = summarize_seeds(records)
    save_json(out / "summary.json", summary)
    return summary


def save_run_figures(out, records):
    """Write a run's two figures into ``out``: ``accuracy_matrix.png`` and ``curves.png``."""
    import numpy as np

    from . import plots
    cfg = records[0]["config"]
    label = method_label(cfg["method"])
    R = np.array([r["accuracy_matrix"] for r in records])
    stage_names = [s["name"] for s in records[0]["schedule"]["stages"]]
    several = len(records) > 1
    title = f"{label}: score on each task after each stage" + (f"\n(mean ± std over {len(records)} seeds)"
                                                                 if several else f" (seed {cfg['seed']})")
    plots.save(plots.accuracy_heatmap(R.mean(0), records[0]["tasks"], stage_names, title=title,
                                      spread=R.std(0, ddof=1) if several else None),
               out / "accuracy_matrix.png")
    plots.save(plots.task_curves(records, title=f"{label} on the {cfg['schedule']} schedule: held-out score"),
               out / "curves.png")


def finish(out, records, options, since=None, file=None, command="python -m epi_mini"):
    """Write summary.json and the two figures, print the table, the folder's files and the next step."""
    print_summary(save_summary(out, records), records, file=file)
    save_run_figures(out, records)
    list_outputs(out, records, since, file=file)
    next_steps(options, file=file, command=command)


# --- the demo: several methods side by side -------------------------------------------------------------------------
# The figures of the side-by-side table, after each task's final score: (name for metrics.record_metric, row).
SIDE_BY_SIDE = (("forgetting", "forgetting (lower is better)"), ("plasticity", "plasticity"),
                ("earlier_final", "earlier tasks' final score"), ("lm_loss_start", "base's LM loss at the start"),
                ("lm_loss_final", "base's LM loss after SFT"), ("lm_loss_rise", "its rise (lower is better)"))
SIDE_BY_SIDE_LEGEND = (
    "forgetting: each earlier task's best score before the last stage minus its final score, averaged; plasticity: "
    "new tasks' score at the end of the stage that introduces them",
    "earlier tasks: those trained before the last stage; base's LM loss: the held-out language-modelling loss on the "
    "base's pretraining text (nats per byte), whose rise is what SFT overwrote of what the base knew")


def short_label(method):
    """A method's name for a column: its label without the words in brackets ("CPI-FT (static isolation)" ->
    "CPI-FT")."""
    return method_label(method).split(" (")[0]


def _listed(names):
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]


def moved_before_training(record):
    """How far a method moved the base's held-out LM loss before its first SFT step (CPI-FT's fusion merges its
    probes into the base): the loss once it was set up minus the base's own; 0 when it starts from the base as it
    is, None when the record does not say (no base, or no LM loss)."""
    base, setup = record_metric(record, "lm_loss_start"), record_metric(record, "lm_loss_setup")
    return None if not record.get("base") or setup != setup else setup - base  # setup != setup: NaN


def print_side_by_side(runs, file=None):
    """The demo's table: ``runs`` (method -> records, the same seeds) in columns; rows: each task's final score
    (marked ``*`` at the task's floor), forgetting, plasticity, earlier tasks' final score and the base's held-out
    LM loss at the start, after SFT and its rise (marked ``†`` for a method that moved it before its first step:
    the rise counts that move too, from the base's own loss).
    One seed: single values; several: mean ± sample std."""
    import math
    file = file or sys.stdout
    first = next(iter(runs.values()))
    n, record = len(first), first[0]
    seeds = [r["config"]["seed"] for r in first]

    def cell(values):
        mean, std = mean_and_spread(values)
        return "—" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"
    floors, marked = floors_of(record), {}
    rows = [("final score of each task", None)]
    for j, task in enumerate(record["tasks"]):
        cells = []
        for recs in runs.values():
            finals = [r["accuracy_matrix"][-1][j] for r in recs]
            at = at_floor(mean_and_spread(finals)[0], floors.get(task))
            if at:
                marked[task] = floors[task]
            cells.append((cell(finals), "*" * at))
        rows.append((f"  {task} (stage {record['first_stage'][j] + 1})", cells))
    moved = {m: [moved_before_training(r) for r in recs] for m, recs in runs.items()}
    moved = {m: v for m, v in moved.items() if any(x is not None and abs(x) > 0.01 for x in v)}
    for name, label in SIDE_BY_SIDE:
        dagger = name == "lm_loss_rise"
        rows.append((label, [(cell([record_metric(r, name) for r in recs]), "†" * (dagger and m in moved))
                             for m, recs in runs.items()]))
    labels = [short_label(m) for m in runs]
    label_width = max(len(label) for label, cells in rows if cells is not None)
    width = max(len(text) for text in labels + [c for _, cells in rows if cells for c, _ in cells]) + 3
    cfg = record["config"]
    how = (f"seeds {_seeds_text(seeds)}, mean ± std over {n} seeds" if n > 1 else
           f"seed {seeds[0]}, single values (one seed has no spread)")
    print(f"\n{_listed(labels)} on the {cfg['schedule']} schedule ({cfg['preset']} preset), {how}", file=file)
    print(" " * label_width + "".join(f"{label:>{width}}  " for label in labels).rstrip(), file=file)
    for label, cells in rows:
        line = label if cells is None else f"{label:<{label_width}}" + "".join(
            f"{text:>{width}} {mark or ' '}" for text, mark in cells)
        print(line.rstrip(), file=file)
    if marked:
        print(floor_footnote(marked), file=file)
    for m, recs in runs.items():
        if m in moved:  # the rise is from the base's own loss: the change before the first step counts
            setup = cell([record_metric(r, "lm_loss_setup") for r in recs])
            print(f"† {short_label(m)} changed the base's weights before its first step"
                  + (" (its probes merged in, --cpift-fusion)" if m == "static" else "")
                  + f": that alone took the base's loss to {setup}; its rise counts it", file=file)
    for line in SIDE_BY_SIDE_LEGEND:
        print(line, file=file)


def demo_summary(runs):
    """What the demo's ``summary.json`` holds: per method, each task's final score and the table's figures over
    seeds (:func:`~epi_mini.metrics.over_seeds`), and the floors the table marks."""
    first = next(iter(runs.values()))
    return {"seeds": [r["config"]["seed"] for r in first], "floors": floors_of(first[0]), "floor_margin": FLOOR_MARGIN,
            "methods": {m: {"label": method_label(m),
                            "final_scores": {t: over_seeds([r["accuracy_matrix"][-1][j] for r in recs])
                                             for j, t in enumerate(recs[0]["tasks"])},
                            **{name: over_seeds([record_metric(r, name) for r in recs]) for name, _ in SIDE_BY_SIDE},
                            "retention": over_seeds([record_metric(r, "retention") for r in recs]),
                            "base_heldout_loss": over_seeds([(r.get("base") or {}).get("heldout_loss", float("nan"))
                                                             for r in recs])}
                        for m, recs in runs.items()}}


def method_options(options, method):
    """The options of one method's run in the demo (``options``: the demo's): the demo's config with the method,
    and DEMO_METHOD_OPTIONS where the command line did not say otherwise."""
    sub = {k: v for k, v in options.items() if k != "methods"}
    sub["config"] = {**DEMO_METHOD_OPTIONS.get(method, {}), **options["config"], "method": method}
    return sub


def demo_folders(options, out):
    """The demo's runs for :func:`~epi_mini.runner.run_folders`: ``out`` itself holds the demo's options, and each
    method's run goes to ``out/<method>/``, a run folder like any other (``--resume out/<method>`` continues it)."""
    folders = [(Path(out), [], options)]
    for method in options["methods"]:
        sub = method_options(options, method)
        folders.append((Path(out) / method, configs_of(sub), sub))
    return folders


def list_demo_outputs(out, runs, file=None):
    """Print the demo's folder: its own files, then one line per method's folder with the files in it."""
    file = file or sys.stdout
    print(f"\nwrote {out}/:", file=file)
    what = {OPTIONS_NAME: f"the demo's options: python -m epi_mini --resume {out} reads them back",
            "summary.json": "the figures of the table for each method (mean, std, values over seeds), and the floors",
            "compare.png": f"{_listed([short_label(m) for m in runs])} side by side: earlier tasks' mean score and the "
                           "base's LM loss during training, retention vs plasticity"}
    names = [n for n in what if (Path(out) / n).exists()] + [f"{m}/" for m in runs]
    width = max(len(n) for n in names)
    for name in names:
        if name.endswith("/"):
            folder = Path(out) / name
            inside = sorted((p.name + "/" * p.is_dir() for p in folder.iterdir() if not p.name.startswith(".")),
                            key=lambda n: (n.startswith("checkpoint-"), n.endswith(".png"), n == "summary.json",
                                           n != OPTIONS_NAME, n))
            print(f"  {name:<{width}}  {method_label(name[:-1])}'s run: {' '.join(inside)}", file=file)
        else:
            print(f"  {name:<{width}}  {what[name]}", file=file)
    print(f"  (each method's folder is a run of its own: python -m epi_mini --resume {out}/{next(iter(runs))} "
          "continues that one alone)", file=file)


def what_seeds_show(options, file=None):
    """The demo's last line: what its seeds can and cannot show, and what to try next."""
    n = len(options["seeds"])
    if n < 5:
        five = shlex.join(["python", "-m", "epi_mini", *command_options({**options, "seeds": [0, 1, 2, 3, 4]},
                                                                       DEMO_SEEDS)])
        line = (f"{'One seed shows' if n == 1 else f'{n} seeds show'} how each method did here, not which is better: "
                "a direction needs several paired seeds and a 95% interval that excludes 0 (the committed "
                "evidence: results/, printed by python -m epi_mini.report). Next: "
                f"{five} (five paired seeds, about {5 / n:g} times as long)")
    else:
        line = (f"{n} paired seeds: a difference is a direction only where its paired 95% interval excludes 0 "
                "(epi_mini.metrics.paired_difference, notebook 08 does it); the committed evidence: results/, printed "
                "by python -m epi_mini.report. Next: the course, jupyter lab notebooks/00_quickstart.ipynb")
    print(f"\n{line}", file=file)


def finish_demo(out, runs, options, file=None):
    """Each method's summary and figures in its folder; the table side by side; summary.json and compare.png in
    ``out``; the folder's files; what the seeds can and cannot show."""
    from . import plots
    for method, records in runs.items():
        save_summary(out / method, records)
    save_json(out / "summary.json", demo_summary(runs))
    print_side_by_side(runs, file=file)
    first = next(iter(runs.values()))
    cfg, n = first[0]["config"], len(first)
    plots.save(plots.method_comparison({short_label(m): recs for m, recs in runs.items()},
                                       title=f"{_listed([short_label(m) for m in runs])} on the {cfg['schedule']} "
                                             f"schedule ({cfg['preset']} preset, "
                                             + (f"{n} seeds: mean" if n > 1 else f"seed {cfg['seed']}") + ")"),
               out / "compare.png")
    for method, records in runs.items():
        save_run_figures(out / method, records)
    list_demo_outputs(out, runs, file=file)
    what_seeds_show(options, file=file)


def how_it_runs(device, threads, workers):
    """The end of the first line: where the runs train, how many side by side, with how many threads."""
    thread = f"{threads} torch thread{'s' * (threads > 1)}"
    if workers == 1:
        return f"{device}, {thread} (--threads)"
    return f"{device}, {workers} runs side by side (--workers), {thread} each (--threads)"


def starts_from(cfg):
    """Where a run's weights start, in words."""
    if cfg.init == "base":
        return f"from the {cfg.preset} preset's pretrained base"
    return "from random weights" if cfg.init == "scratch" else f"from the weights in {cfg.init}"


def run_demo(args, options, out, threads):
    """``python -m epi_mini`` without --method: the demo (see DEMO_METHODS), new or resumed."""
    folders = demo_folders(options, out)
    first = folders[1][1][0]
    device = pick_device(first.device)
    runs = sum(len(configs) for _, configs, _ in folders)
    workers = workers_for(runs, args.workers if args.workers is not None or device.type == "cpu" else 1)
    seeds = options["seeds"]
    print(f"The demo: {_listed([method_label(m) for m in options['methods']])} on the {first.schedule} schedule "
          f"{starts_from(first)}, seed{'s' * (len(seeds) > 1)} {' '.join(map(str, seeds))} for each (same initial "
          f"weights, same data order) -> {out}/ | {how_it_runs(device, threads, workers)}", flush=True)
    if list(seeds) == list(DEMO_SEEDS):
        print(DEMO_SEEDS_WHY, flush=True)
    results = run_folders(folders, resume=bool(args.resume), checkpoint_every=options["checkpoint_every"],
                          progress=not args.no_progress, log=lambda line: print(line, flush=True),
                          overwrite=args.overwrite, workers=workers, threads=threads)
    finish_demo(out, dict(zip(options["methods"], results[1:])), options)


# What the command line reports as one "error: ..." line (exit status 2) instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError, DataFormatError, OutputError)


def interrupted_line(error, out, launcher=SINGLE_PROCESS):
    """The one line Ctrl-C prints: where the run stood (``error``'s message) and the exact command that
    continues it, when ``out`` holds a run to continue."""
    where = str(error) or "interrupted"
    if out is not None and holds_run(out):
        return f"{where}; continue with: {launcher_command(launcher, shlex.quote(str(out)))}"
    return f"{where}; nothing was written, so there is nothing to resume"


def pretrain_command(argv):
    """``python -m epi_mini pretrain``: pretrain the preset's GPT and write its base (see epi_mini.pretrain)."""
    from dataclasses import asdict

    from . import pretrain as base
    ap = OptionParser(prog="python -m epi_mini pretrain",
                      description="Pretrain the preset's GPT as a language model on this Python's "
                                  "standard-library sources: the base model that SFT starts from.")
    ap.add_argument("--preset", default=DEFAULT_PRESET, choices=tuple(PRESETS), help="model size and steps (default: cpu)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    ap.add_argument("--out", default=None, metavar="STEM",
                    help="writes STEM.pt and STEM.json (default: data/base/<preset>, the base runs start from)")
    ap.add_argument("--threads", type=int, default=None, metavar="N", help=f"torch threads on the CPU (default: {CPU_THREADS})")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--write-data", action="store_true",
                    help=f"rewrite data/base/{base.HELDOUT_FILE} and {base.LM_SAMPLE_FILE} from this machine's library, then stop")
    args = ap.parse_args(argv)
    if args.write_data:
        base.write_lm_data()
        print(f"wrote data/base/{base.HELDOUT_FILE} and data/base/{base.LM_SAMPLE_FILE}")
        return 0
    cfg = base.PRETRAIN[args.preset]
    try:
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"invalid --steps={args.steps}: must be an integer >= 1")
        cfg = base.PretrainConfig(**{**asdict(cfg), "steps": args.steps or cfg.steps})
        run_cfg = make_config(args.preset)
        device = pick_device(run_cfg.device)
        threads = use_threads(args.threads)
        stem = Path(args.out or base.BASE_DIR / args.preset)
        gpt = base.GPTConfig(block_size=run_cfg.block_size, vocab_size=base.byte_tokenizer().vocab_size,
                             n_layer=run_cfg.n_layer, n_head=run_cfg.n_head, n_embd=run_cfg.n_embd)
        print(f"pretraining the {args.preset} preset's GPT ({gpt.n_layer} layers, {gpt.n_embd} wide) for {cfg.steps} "
              f"steps on Python {base.platform.python_version()}'s standard library -> {stem}.pt | {device}, "
              f"{threads} torch thread{'s' * (threads > 1)}", flush=True)
        model, provenance = base.pretrain(gpt, cfg, checkpoint=Path(f"{stem}.ckpt"), progress=not args.no_progress,
                                          device=device, log=print)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = base.save_base(model, provenance, stem)
    Path(f"{stem}.ckpt").unlink(missing_ok=True)
    print(f"wrote {path} and {path.with_suffix('.json')}; samples of what it writes:")
    for text in provenance["samples"].values():
        print(f"  {text!r}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["pretrain"]:  # python -m epi_mini pretrain: build a base model (epi_mini.pretrain)
        return pretrain_command(argv[1:])
    args = build_parser().parse_args(argv)
    since, out = time.time(), None
    try:
        options, out = resolve_options(args, warn=lambda line: print(line, file=sys.stderr), demo=True)
        threads = use_threads(args.threads)
        if options.get("methods"):  # no --method: the demo
            run_demo(args, options, out, threads)
            return 0
        configs = configs_of(options)
        first = configs[0]
        device = pick_device(first.device)
        # Seeds side by side on the CPU, one process each; on an accelerator one at a time unless told otherwise.
        workers = workers_for(len(configs), args.workers if args.workers is not None or device.type == "cpu" else 1)
        print(f"{method_label(first.method)} on the {first.schedule} schedule, {first.preset} preset, seeds "
              f"{' '.join(str(c.seed) for c in configs)} -> {out}/ | {how_it_runs(device, threads, workers)}",
              flush=True)
        records = run_seeds(configs, out, resume=bool(args.resume), checkpoint_every=options["checkpoint_every"],
                            progress=not args.no_progress, options=options, log=lambda line: print(line, flush=True),
                            overwrite=args.overwrite, allow_world_size_change=args.allow_world_size_change,
                            workers=workers, threads=threads)
        finish(out, records, options, since)
    except KeyboardInterrupt as e:  # Ctrl-C: one line, no traceback; 130 is the shell's status for SIGINT
        print(interrupted_line(e, out), file=sys.stderr)
        return 130
    except WorkerLost as e:  # a worker was killed (out of memory, say): what the runs wrote is kept
        print(f"error: {interrupted_line(e, out)}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
