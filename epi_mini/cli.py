"""``python -m epi_mini``: train one method over several seeds, print the table, save record and plots.

The default demo trains full SFT on the shifting-mixture schedule (the `cpu` preset, 3 seeds), prints one
line per finished seed, the final score of every task and the forgetting figures with their spread, and
writes to ``runs/<method>-<schedule>/``: ``options.json`` (what ``--resume`` reads back), ``seed<N>.json``
(one record per seed), ``seed<N>.pt`` (final weights), ``summary.json``, ``accuracy_matrix.png`` and
``curves.png``; it ends by listing the folder, one line per file, and what to try next. Every file is
written atomically, so a run that is cut off leaves no half-written output.

``--resume DIR`` needs no other option: the options saved in ``DIR/options.json`` are used, an unfinished
seed continues from its checkpoint, and an option repeated with another value is refused, naming it. A new run
into a folder that holds another run is refused (``--overwrite`` replaces it), and so is ``--resume`` of a
folder that holds no run. Ctrl-C prints one line -- the step reached, the last checkpoint, the command that
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
from .methods import METHODS, is_plugin, method_label, method_slug
from .metrics import summarize_seeds
from .runner import (LOCK_NAME, OPTIONS_NAME, SINGLE_PROCESS, check_run_options, holds_run, launcher_command,
                     load_run_options, resume_options, run_options, run_seeds)
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


def _default_text(f):
    """The help's default: the cpu preset's value, or what an empty default means."""
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
        description="Train a tiny GPT with SFT on a multi-task schedule and report forgetting. "
                    "Options left out take the preset's value.")
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
    for t, ms in summary["final_scores"].items():
        print(f"{t:<12} {fmt(ms):>{width}}", file=file)
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


def config_overrides(args):
    """The config fields given on the command line (those left out take the preset's value)."""
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                 if f.name not in ("seed", "preset") and getattr(args, f.name) is not None}
    for name in ("tasks", "task_files", "isolation_schedule"):
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    return overrides


def resolve_options(args, warn=None, launcher=None):
    """``(options, out)`` for parsed arguments: the options of a new run, or, with ``--resume DIR``, those
    saved in ``DIR/options.json`` with what the command line may change (see
    :func:`epi_mini.runner.resume_options`). Raises ``ValueError`` naming the option that is refused.
    ``launcher``: how this run is launched (default: one process, :data:`epi_mini.runner.SINGLE_PROCESS`); a
    resume launched otherwise than its run was is refused. ``warn(line)`` is told when a folder to resume has
    no saved options (a run from an older epi-mini)."""
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
        if saved is not None:
            return resume_options(saved, args.preset, args.seeds, overrides, args.checkpoint_every, launcher,
                                  args.resume, args.allow_world_size_change), Path(args.resume)
        if warn is not None:
            warn(f"note: {args.resume} has no {OPTIONS_NAME} (a run from an older epi-mini): resuming with the "
                 "options on this command line, which must be the ones it was started with")
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


def next_steps(options, file=None, command="python -m epi_mini"):
    """Print the next thing to try: the same run with another method (by ``command``), then the course."""
    file = file or sys.stdout
    method = options["config"].get("method", "full")
    other = "static" if method == "epi" else "epi"
    args = ([] if options["preset"] == DEFAULT_PRESET else ["--preset", options["preset"]])
    args += [] if list(options["seeds"]) == list(DEFAULT_SEEDS) else ["--seeds", *map(str, options["seeds"])]
    for k, v in options["config"].items():
        if k not in ("method", "device"):
            args += ["--" + k.replace("_", "-"), *(map(str, v) if isinstance(v, (list, tuple)) else [str(v)])]
    schedule = configs_of(options)[0].schedule
    print(f"\nnext: {command} {shlex.join(args + ['--method', other])}", file=file)
    print(f"      trains {method_label(other)} on the same schedule into runs/{other}-{schedule}/, to compare "
          f"with this {method_label(method)} run", file=file)
    print("      or start the course: jupyter lab notebooks/00_quickstart.ipynb", file=file)


def finish(out, records, options, since=None, file=None, command="python -m epi_mini"):
    """Write summary.json and the two figures, print the table, the folder's files and the next step."""
    import numpy as np

    from . import plots
    summary = summarize_seeds(records)
    save_json(out / "summary.json", summary)
    print_summary(summary, records, file=file)
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
    list_outputs(out, records, since, file=file)
    next_steps(options, file=file, command=command)


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
        options, out = resolve_options(args, warn=lambda line: print(line, file=sys.stderr))
        configs = configs_of(options)
        threads = use_threads(args.threads)
        first = configs[0]
        print(f"{method_label(first.method)} on the {first.schedule} schedule, {first.preset} preset, seeds "
              f"{' '.join(str(c.seed) for c in configs)} -> {out}/ | {pick_device(first.device)}, {threads} torch "
              f"thread{'s' * (threads > 1)} (--threads)", flush=True)
        records = run_seeds(configs, out, resume=bool(args.resume), checkpoint_every=options["checkpoint_every"],
                            progress=not args.no_progress, options=options, log=lambda line: print(line, flush=True),
                            overwrite=args.overwrite, allow_world_size_change=args.allow_world_size_change)
        finish(out, records, options, since)
    except KeyboardInterrupt as e:  # Ctrl-C: one line, no traceback; 130 is the shell's status for SIGINT
        print(interrupted_line(e, out), file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
