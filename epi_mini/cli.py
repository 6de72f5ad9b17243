"""``python -m epi_mini``: train one method over several seeds, print the table, save record and plots.

The default demo trains full SFT on the shifting-mixture schedule (the `cpu` preset, 3 seeds), prints the
final score of every task and the forgetting figures with their spread, and writes to ``runs/<name>/``:
``seed<N>.json`` (one record per seed), ``seed<N>.pt`` (final weights), ``summary.json``, ``accuracy_matrix.png`` and ``curves.png``.
Every file is written atomically, so a run that is cut off leaves no half-written output.
"""
import argparse
import sys
from dataclasses import fields
from pathlib import Path

from .checkpoint import CheckpointError, save_json
from .config import PRESETS, TrainConfig, make_config
from .data import SCHEDULE_NAMES
from .epi import IMPORTANCE_SCORES, NORMALIZERS
from .methods import METHODS
from .metrics import summarize_seeds
from .runner import check_run_options, run_seeds
from .tasks import DataFormatError

HELP = {
    "n_layer": "transformer blocks", "n_head": "attention heads", "n_embd": "embedding width",
    "block_size": "longest sequence (tokens)", "dropout": "dropout probability, in [0, 1)",
    "schedule": f"task schedule: {', '.join(SCHEDULE_NAMES)}", "steps_per_stage": "training steps per stage",
    "replay": "share of each batch replaying earlier stages' tasks, in [0, 1) (shifting schedule)",
    "tasks": "task names to train (default: math code logic instruction chat)",
    "task_files": "extra JSONL task files, one {\"task\",\"prompt\",\"response\"} object per line",
    "batch_size": "sequences per batch", "learning_rate": "AdamW learning rate",
    "weight_decay": "AdamW decoupled weight decay (matrices and embeddings only)",
    "grad_clip": "gradient-norm clipping (0 = off)", "lr_warmup_steps": "linear learning-rate warm-up steps",
    "eval_interval": "evaluate every N steps (and at every stage end)",
    "eval_size": "held-out examples per task (0 = all)",
    "method": "; ".join(f"{name}: {m.help}" for name, m in METHODS.items()),
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
    "mask_storage": "EPI's isolated set: index (int32 indices, fastest) or bits (1/8 byte a parameter)",
    "isolation_schedule": "EPI-family: one rho per stage, e.g. 0 0.1 0.1 (default: --isolation-ratio throughout)",
    "replay_importance": "EPI variant: rank entries also by the replayed rows' own gradient EMA (true/false)",
    "tokenizer": "bytes (default, offline) or gpt2 (needs --gpt2-vocab or tiktoken's cache)",
    "gpt2_vocab": "folder holding GPT-2's vocab.bpe and encoder.json",
    "device": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps",
    "max_bad_steps": "consecutive non-finite steps tolerated before the run stops",
}


def _mask_interval(text):
    return text if text in ("once", "auto") else int(text)


def _boolean(text):
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m epi_mini",
        description="Train a tiny GPT with SFT on a multi-task schedule and report forgetting. "
                    "Options left out take the preset's value.")
    p.add_argument("--preset", default="cpu", choices=tuple(PRESETS),
                   help="model and schedule size: tiny (tests), cpu (default), gpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed (default: 0 1 2)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<method>-<schedule>)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save a resumable checkpoint every N steps (0 = never)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the runs in output folder DIR: finished seeds are kept, others resume "
                        "from their last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in fields(TrainConfig):
        if f.name in ("seed", "preset"):
            continue
        kind = {"tasks": str, "task_files": str, "mask_interval": _mask_interval,
                "isolation_schedule": float}.get(f.name, f.type)
        kind = {"int": int, "float": float, "str": str, "bool": _boolean}.get(kind, kind) if isinstance(kind, str) else kind
        extra = {"nargs": "+"} if f.name in ("tasks", "task_files", "isolation_schedule") else {}
        choices = {"method": tuple(METHODS), "schedule": SCHEDULE_NAMES, "normalizer": NORMALIZERS,
                   "importance": tuple(IMPORTANCE_SCORES), "tokenizer": ("bytes", "gpt2"),
                   "cpift_stages": ("grouping", "schedule"), "ema_storage": ("fp32", "bf16", "int8"),
                   "mask_storage": ("index", "bits")}.get(f.name)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None, choices=choices,
                       help=HELP.get(f.name, f.name) + f" (cpu preset: {PRESETS['cpu'].get(f.name, f.default)!r})",
                       **extra)
    return p


def print_summary(summary, records, file=None):
    file = file or sys.stdout
    fmt = lambda ms: f"{ms[0]:.3f} ± {ms[1]:.3f}"  # noqa: E731
    cfg = records[0]["config"]
    n = len(records)
    print(f"\n{cfg['method']} on the {cfg['schedule']} schedule, preset {cfg['preset']}, "
          f"{n} seed{'s' * (n > 1)} {summary['seeds']} (mean ± std over seeds)", file=file)
    print(f"{'task':<12} {'final score':>16}", file=file)
    for t, ms in summary["final_scores"].items():
        print(f"{t:<12} {fmt(ms):>16}", file=file)
    print("", file=file)
    for k, ms in summary["metrics"].items():
        print(f"{k:<18} {fmt(ms)}", file=file)
    if summary["forgetting"]:
        print("\nforgetting per task (best score before the last stage -> final score):", file=file)
        for t, f in summary["forgetting"].items():
            halved = sum(f["fell_by_half"])
            print(f"  {t:<12} {fmt(f['best_before_last_stage'])} -> {fmt(f['final'])}   "
                  f"fell by at least half in {halved}/{n} seeds", file=file)


def config_overrides(args):
    """The config fields given on the command line (those left out take the preset's value)."""
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                 if f.name not in ("seed", "preset") and getattr(args, f.name) is not None}
    for name in ("tasks", "task_files", "isolation_schedule"):
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    return overrides


def main(argv=None):
    args = build_parser().parse_args(argv)
    overrides = config_overrides(args)
    try:
        check_run_options(args.checkpoint_every, args.resume)
        configs = [make_config(args.preset, seed=s, **overrides) for s in args.seeds]
        out = Path(args.resume or args.out or f"runs/{configs[0].method}-{configs[0].schedule}")
        records = run_seeds(configs, out, resume=bool(args.resume), checkpoint_every=args.checkpoint_every,
                            progress=not args.no_progress)
    except (ValueError, FileNotFoundError, CheckpointError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarize_seeds(records)
    save_json(out / "summary.json", summary)
    print_summary(summary, records)
    from . import plots
    import numpy as np
    R = np.array([r["accuracy_matrix"] for r in records])
    stage_names = [s["name"] for s in records[0]["schedule"]["stages"]]
    plots.save(plots.accuracy_heatmap(R.mean(0), records[0]["tasks"], stage_names, spread=R.std(0, ddof=1)
                                      if len(records) > 1 else None,
                                      title=f"{records[0]['config']['method']}: score after each stage"),
               out / "accuracy_matrix.png")
    plots.save(plots.task_curves(records), out / "curves.png")
    print(f"\nwrote {out}/: {', '.join(f'seed{c.seed}.json/.pt' for c in configs)}, summary.json, "
          "accuracy_matrix.png, curves.png")
    return 0
