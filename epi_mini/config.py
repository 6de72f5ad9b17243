"""Run configuration: one dataclass, three presets, every value checked before anything trains.

``TrainConfig.validate()`` raises ``ValueError`` naming the option, the value and what is allowed, so a
typo on the command line fails in the first second with a readable message instead of a traceback from
deep inside torch twenty minutes later. Every command line of the package parses with :class:`OptionParser`,
for the same reason.
"""
import argparse
import difflib
from dataclasses import asdict, dataclass, fields

from .data import SCHEDULE_NAMES
from .epi import check_options
from .methods import find_method
from .model import GPTConfig


@dataclass
class TrainConfig:
    # model: model.GPTConfig's defaults (one set of model defaults in the project)
    n_layer: int = GPTConfig.n_layer
    n_head: int = GPTConfig.n_head
    n_embd: int = GPTConfig.n_embd
    block_size: int = GPTConfig.block_size
    dropout: float = GPTConfig.dropout
    # where the weights start: "base" (the preset's pretrained base model, epi_mini.pretrain), "scratch" (random
    # weights: training from nothing, kept as a control), or the path of a compatible state dict
    init: str = "base"
    # data: a preset schedule over the task families (see data.make_schedule)
    schedule: str = "shifting"
    steps_per_stage: int = 500
    replay: float = 0.2
    tasks: tuple = ()                # task names; () = the five built-in families
    task_files: tuple = ()           # extra JSONL files, {"task","prompt","response"} per line
    batch_size: int = 64
    # optimisation: AdamW, constant learning rate after a short linear warm-up (stages stay comparable)
    # The rate fine-tunes the base (pretrained at 3e-3), chosen by measurement: benchmarks/sft_learning_rate.py,
    # full SFT on the main schedule from the base, seeds 0-2. Average task score / base's held-out loss after SFT
    # (it starts at 1.26 nats/byte; a uniform guess is 5.55): 1e-4 0.577 / 4.01, 2e-4 0.642 / 4.85, 3e-4
    # 0.673 / 5.77, 5e-4 0.721 / 6.72, 1e-3 0.727 / 7.66. The rule: the lowest rate whose average task score is at
    # least 90% of the best measured (0.727): 3e-4 -- ten times below pretraining's, a common ratio for SFT.
    # Even there SFT overwrites what the base knew (its loss ends near a uniform guess's): what the lab measures.
    learning_rate: float = 3e-4
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    lr_warmup_steps: int = 50
    # evaluation
    eval_interval: int = 125         # also evaluated at the end of every stage
    eval_size: int = 0               # examples per task from the held-out sets; 0 = all of them
    # method (see methods.py) and its knobs
    method: str = "full"             # a name in methods.METHODS, or your own: "path/to/file.py:ClassName"
    isolation_ratio: float = 0.1
    mask_interval: object = 20       # int >= 1, "once" or "auto"
    ema_beta: float = 0.99
    warmup_steps: int = 100
    normalizer: str = "mean"
    importance: str = "squared_gradient"
    ema_storage: str = "fp32"        # EPI's importance EMA: "fp32", "bf16" or "int8" (8 bits + a scale per block)
    mask_storage: str = "index"      # EPI's isolated set: "index" (int32), "gaps" (~1 byte each) or "bits" (1 bit/param)
    isolation_schedule: tuple = ()   # EPI-family: one rho per stage (() = isolation_ratio throughout)
    replay_importance: bool = False  # EPI variant: a second EMA fed by the replayed rows' own gradient
    base_importance: bool = False    # EPI variant: also rank by the base's Fisher on its pretraining text (EWC-like)
    # CPI-FT (method "static")
    core_ratio: float = 0.01         # each task's core region: top fraction by probe update magnitude
    probe_steps: int = 100           # steps of each task's probe fine-tune
    cpift_stages: str = "grouping"   # "grouping": CPI-FT's task groups are the stages; "schedule": keep the run's
    cpift_tau: float = 0.1           # Jaccard overlap of two cores that puts their tasks in one group
    cpift_fusion: bool = True        # transplant the cores and SLERP-merge the probes before training
    tokenizer: str = "bytes"         # "bytes" (offline, default) or "gpt2" (needs its vocabulary files)
    gpt2_vocab: str = ""             # folder with GPT-2's vocab.bpe and encoder.json (for tokenizer="gpt2")
    # run
    seed: int = 0
    device: str = "auto"             # auto = cuda, then mps, then cpu
    max_bad_steps: int = 10          # consecutive non-finite steps tolerated before stopping
    preset: str = "cpu"

    def validate(self):
        def check(name, ok, allowed):
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: must be {allowed}")

        def pos_int(name, lo=1):
            v = getattr(self, name)
            check(name, isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"an integer >= {lo}")

        def in_range(name, lo, hi, hi_open=True):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v and (v < hi if hi_open else v <= hi)
            check(name, ok, f"a number in [{lo}, {hi}{')' if hi_open else ']'}")

        for name in ("n_layer", "n_head", "n_embd", "block_size", "steps_per_stage", "batch_size",
                     "eval_interval"):
            pos_int(name)
        for name in ("lr_warmup_steps", "eval_size", "probe_steps", "seed", "max_bad_steps"):
            pos_int(name, 0)
        check("n_embd", self.n_embd % self.n_head == 0, f"divisible by n_head={self.n_head}")
        in_range("dropout", 0, 1)
        in_range("replay", 0, 1)
        in_range("learning_rate", 1e-8, 1.0, hi_open=False)
        in_range("weight_decay", 0, 10, hi_open=False)
        in_range("core_ratio", 0, 1)
        in_range("cpift_tau", 0, 1, hi_open=False)
        check("cpift_stages", self.cpift_stages in ("grouping", "schedule"), "'grouping' or 'schedule'")
        check("ema_storage", self.ema_storage in ("fp32", "bf16", "int8"), "'fp32', 'bf16' or 'int8'")
        check("mask_storage", self.mask_storage in ("index", "gaps", "bits"), "'index', 'gaps' or 'bits'")
        for name in ("replay_importance", "base_importance", "cpift_fusion"):
            check(name, isinstance(getattr(self, name), bool), "True or False")
        check("isolation_schedule", isinstance(self.isolation_schedule, (tuple, list)) and all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r < 1 for r in self.isolation_schedule),
            "a list of numbers in [0, 1), one per stage")
        in_range("grad_clip", 0, float("inf"))
        check("schedule", self.schedule in SCHEDULE_NAMES, f"one of {SCHEDULE_NAMES}")
        find_method(self.method)  # a built-in name, or FILE.py:CLASS: loads the file (each error names it)
        check("device", self.device in ("auto", "cpu", "cuda", "mps") or str(self.device).startswith("cuda:"),
              "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        check("importance", isinstance(self.importance, str), "the name of an importance score")
        check("init", isinstance(self.init, str) and self.init != "", "'base', 'scratch' or the path of a state dict")
        check("base_importance", not self.base_importance or self.init != "scratch",
              "False with init='scratch' (random weights have nothing to protect)")
        check("base_importance", not (self.base_importance and self.replay_importance),
              "False with replay_importance=True (one importance variant at a time)")
        check("init", self.init in ("base", "scratch") or self.tokenizer == "bytes",
              "'scratch' with tokenizer='gpt2' (the base models are byte-level)")
        # EPI's own checks (EvolvingIsolation runs them too, for people who use it without a config).
        check_options(self.isolation_ratio, self.mask_interval, self.ema_beta, self.warmup_steps, self.normalizer,
                      self.importance)
        check("tokenizer", self.tokenizer in ("bytes", "gpt2"), "'bytes' or 'gpt2'")
        check("preset", self.preset in PRESETS, f"one of {tuple(PRESETS)}")
        return self

    def to_dict(self):
        d = asdict(self)
        d["tasks"], d["task_files"] = list(self.tasks), [str(f) for f in self.task_files]
        d["isolation_schedule"] = list(self.isolation_schedule)
        return d


# Presets. `cpu` is the default (one method's full schedule in about a minute on 2 cores), `tiny` is for
# tests (seconds), `gpu` is a bigger model and longer schedule for one GPU.
PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, steps_per_stage=40, batch_size=16, eval_interval=20,
                 eval_size=32, warmup_steps=10, lr_warmup_steps=5, probe_steps=10, mask_interval=5),
    "cpu": dict(),
    "gpu": dict(n_layer=6, n_head=8, n_embd=256, steps_per_stage=3000, batch_size=256, eval_interval=250,
                # SFT a tenth of the gpu base's pretraining rate (1e-3): the cpu preset's measured ratio; not
                # measured on a GPU (none was available when it was set)
                learning_rate=1e-4, warmup_steps=300, probe_steps=300, mask_interval=50),
}


def make_config(preset="cpu", **overrides) -> TrainConfig:
    """A validated config: the preset's values, then ``overrides`` (unknown names are an error)."""
    if preset not in PRESETS:
        raise ValueError(f"invalid preset={preset!r}: must be one of {tuple(PRESETS)}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config option(s) {unknown}; known options: {sorted(known)}")
    values = {**PRESETS[preset], **overrides, "preset": preset}
    for name in ("tasks", "task_files", "isolation_schedule"):  # lists (from JSON, say) -> tuples
        if isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    return TrainConfig(**values).validate()


class OptionParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with two of its traps closed, for every command line of the package.

    * No abbreviations (``allow_abbrev=False``): argparse would take ``--lr 0.01`` for the only option that
      begins with ``--lr``, ``--lr-warmup-steps``, and fail on "0.01" -- or take ``--lr 10`` without a word.
    * An error is one line, with the closest valid name for a mistyped choice or option (``difflib``),
      instead of the whole usage text followed by the error.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def _check_value(self, action, value):  # argparse's own hook for ``choices``, reworded with a suggestion
        if action.choices is not None and value not in action.choices:
            names = [str(c) for c in action.choices]
            close = difflib.get_close_matches(str(value), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise argparse.ArgumentError(action, f"invalid choice {value!r} ({hint}choose from {', '.join(names)})")

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            unknown = [a.split("=")[0] for a in message.split(":", 1)[1].split() if a.startswith("--")]
            close = [m for a in unknown for m in difflib.get_close_matches(a, list(self._option_string_actions), n=1)]
            message += f" (did you mean {', '.join(close)}?)" if close else ""
        self.exit(2, f"error: {message}; {self.prog} --help lists every option\n")
