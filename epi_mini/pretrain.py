"""The base model: a GPT pretrained as a causal language model, which every SFT run starts from.

Supervised fine-tuning starts from a model that already knows something; what it forgets of that is the
forgetting a practitioner fears most. So epi-mini pretrains its tiny GPT on real text that every machine
already has without a download -- the installed Python's standard-library sources, read as bytes (the byte
tokenizer's tokens 0-255) -- and fine-tunes that.

    python -m epi_mini pretrain                  # the cpu preset's base: data/base/cpu.pt (+ cpu.json)
    python -m epi_mini pretrain --preset tiny --out /tmp/base

* **Corpus** (:class:`Corpus`): the ``.py`` files of the standard library in sorted order, without tests,
  demos, GUI code and the encoding tables (see :data:`EXCLUDED_PARTS`). A file whose path hashes to 0 modulo
  :data:`HELDOUT_EVERY` is held out: pretraining never sees it. The corpus's SHA-256 and the Python version go
  into the base's provenance, so a base built from another Python's library says so when it is loaded.
* **Held-out loss** (:func:`lm_loss`): mean cross-entropy in nats per byte on fixed windows of the held-out
  files, committed as ``data/base/heldout.bin`` so every machine measures the same bytes. A uniform guess over
  the vocabulary scores ``ln(vocab_size)`` (5.55 for 258 tokens). SFT runs measure it at every evaluation
  (``train.py``): the rise of this loss is what SFT made the base forget.
* **Training** (:func:`pretrain`): AdamW, linear warm-up then cosine decay to a tenth of the rate; batches are
  random windows drawn from a generator seeded by (seed, step), a pure function of the step, so a run cut off
  and resumed from its checkpoint ends exactly where an uninterrupted one does. Deterministic on the CPU for a
  seed and a thread count.
* **Output**: ``<name>.pt`` (the state dict, read with ``torch.load(..., weights_only=True)``) and ``<name>.json``
  (provenance: corpus hash, Python version, steps, held-out loss curve, the file's SHA-256, and samples of
  generated text), both written atomically.
"""
import hashlib
import io
import json
import math
import os
import platform
import sys
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch.nn import functional as F

from .checkpoint import atomic_write_bytes, save_json
from .model import GPT, GPTConfig
from .tokenizer import byte_tokenizer

BASE_DIR = Path(__file__).resolve().parent.parent / "data" / "base"
HELDOUT_FILE = "heldout.bin"        # held-out windows: what every run's base LM loss is measured on
LM_SAMPLE_FILE = "lm_sample.bin"    # training-split windows: what "protect the base" variants score the base on
WINDOW = 41                         # bytes per stored window: a block of 40 inputs and their 40 next bytes
HELDOUT_WINDOWS, LM_SAMPLE_WINDOWS = 512, 1024
HELDOUT_EVERY = 10
# Path parts left out of the corpus: test suites (huge, repetitive), demos, GUI code, the vendored installer,
# and the encodings package (mostly hex tables, not prose or code).
EXCLUDED_PARTS = ("test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "tkinter", "encodings",
                  "site-packages", "pydoc_data", "__pycache__")
PROMPTS = ("def ", "import ", "class ", "    return ", "# ")  # what the samples in the provenance start from


@dataclass(frozen=True)
class PretrainConfig:
    steps: int
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1     # cosine decay ends at this share of the rate
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 250
    seed: int = 0


# How long each preset's base trains (the model is the preset's own: n_layer, n_head, n_embd, block_size).
PRETRAIN = {"tiny": PretrainConfig(steps=300, batch_size=32, eval_interval=100),
            "cpu": PretrainConfig(steps=6000),
            "gpu": PretrainConfig(steps=20000, batch_size=256, learning_rate=1e-3, warmup_steps=500, eval_interval=1000)}


class BaseModelError(ValueError):
    """A base model that cannot be used: missing, damaged, or of another shape than the run's model."""


# --- the corpus ---------------------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str) -> bool:
    return zlib.crc32(relpath.encode()) % HELDOUT_EVERY == 0


class Corpus:
    """The installed Python's standard-library sources as bytes: ``train`` and ``heldout`` (uint8 tensors, the
    files of each split joined by a blank line), with the corpus's ``sha256`` over every (path, content) pair."""

    def __init__(self, root=None):
        root = Path(root) if root is not None else stdlib_root()
        files = sorted((p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & set(EXCLUDED_PARTS)),
                       key=lambda p: p.relative_to(root).as_posix())
        if not files:
            raise FileNotFoundError(f"no Python sources under {root}: the corpus is the standard library's .py files")
        digest, parts = hashlib.sha256(), {True: [], False: []}
        for p in files:
            rel, data = p.relative_to(root).as_posix(), p.read_bytes()
            digest.update(rel.encode() + b"\0" + data + b"\0")
            parts[is_heldout(rel)].append(data)
        self.root, self.sha256, self.num_files = str(root), digest.hexdigest(), len(files)
        self.python = platform.python_version()
        self.train = torch.frombuffer(bytearray(b"\n\n".join(parts[False])), dtype=torch.uint8)
        self.heldout = torch.frombuffer(bytearray(b"\n\n".join(parts[True])), dtype=torch.uint8)

    def windows(self, count, generator, split="train"):
        """``count`` random windows of :data:`WINDOW` bytes from a split: a (count, WINDOW) long tensor."""
        data = self.train if split == "train" else self.heldout
        starts = torch.randint(0, data.numel() - WINDOW, (count,), generator=generator)
        return data[starts.unsqueeze(1) + torch.arange(WINDOW)].long()

    def provenance(self):
        return {"corpus": "the Python standard library's .py sources, as bytes", "python": self.python,
                "corpus_sha256": self.sha256, "files": self.num_files, "train_bytes": int(self.train.numel()),
                "heldout_bytes": int(self.heldout.numel()), "excluded_parts": list(EXCLUDED_PARTS)}


@lru_cache(maxsize=1)
def installed_corpus() -> Corpus:
    return Corpus()


def write_lm_data(folder=BASE_DIR, corpus=None):
    """Write the held-out windows and the training-split sample (fixed seeds) that every run reads."""
    corpus = corpus or installed_corpus()
    for name, count, split, seed in ((HELDOUT_FILE, HELDOUT_WINDOWS, "heldout", 1), (LM_SAMPLE_FILE,
                                                                                    LM_SAMPLE_WINDOWS, "train", 2)):
        w = corpus.windows(count, torch.Generator().manual_seed(seed), split)
        atomic_write_bytes(Path(folder) / name, bytes(w.to(torch.uint8).reshape(-1).tolist()))


def read_windows(name, folder=BASE_DIR) -> torch.Tensor:
    """A committed window file as a (count, WINDOW) long tensor."""
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: it is part of the repository (regenerate it with "
                                "`python -m epi_mini pretrain --write-data`)")
    raw = path.read_bytes()
    if len(raw) % WINDOW:
        raise BaseModelError(f"{path} holds {len(raw)} bytes, not a whole number of {WINDOW}-byte windows")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, WINDOW).long()


# --- the loss on text -----------------------------------------------------------------------------------------
def window_batches(windows, block_size, batch_size=256):
    """(x, y) pairs of a window tensor: inputs and next bytes, cut to the model's block size."""
    T = min(block_size, WINDOW - 1)
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        yield w[:, :T], w[:, 1:T + 1]


@torch.no_grad()
def lm_loss(model, windows, batch_size=256) -> float:
    """Mean next-byte cross-entropy (nats per byte) of ``model`` on ``windows``; the model's mode is kept."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for x, y in window_batches(windows, model.config.block_size, batch_size):
        logits, _ = model(x.to(device), y.to(device))
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.to(device).reshape(-1), reduction="sum"))
        count += y.numel()
    model.train(was_training)
    return total / count


def pretrain_lr(cfg: PretrainConfig, step):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the rate at the last step."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def samples(model, tokenizer, prompts=PROMPTS, tokens=32, seed=0):
    """Short continuations of ``prompts`` (temperature 0.8, top-k 20): what the base writes."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = {}
    for prompt in prompts:
        idx = torch.tensor([tokenizer.encode(prompt)], device=device)
        row = model.generate(idx, tokens, temperature=0.8, top_k=20)[0].tolist()
        out[prompt] = tokenizer.decode(row)
    return out


# --- pretraining ------------------------------------------------------------------------------------------------
def pretrain(gpt_config: GPTConfig, cfg: PretrainConfig, corpus=None, checkpoint=None, progress=True,
             device="cpu", log=None):
    """Pretrain a GPT of ``gpt_config`` on ``corpus`` (default: the installed standard library) and return
    ``(model, provenance)``. ``checkpoint``: a file to save the state to every ``eval_interval`` steps and to
    resume from when it exists (a run cut off continues exactly)."""
    corpus = corpus or installed_corpus()
    heldout = read_windows(HELDOUT_FILE)
    torch.manual_seed(cfg.seed)
    model = GPT(gpt_config).to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate)
    start, curve = 0, {"step": [0], "heldout_loss": [lm_loss(model, heldout)]}
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state.get("pretrain") != asdict(cfg) or state.get("corpus_sha256") != corpus.sha256:
            raise BaseModelError(f"{checkpoint} belongs to another pretraining run (other settings or corpus); "
                                 "delete it or choose another --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, curve = state["step"], state["curve"]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, leave=False, desc="pretraining")
    t0 = time.perf_counter()
    model.train()
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = pretrain_lr(cfg, step)
        w = corpus.windows(cfg.batch_size, torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)).to(device)
        x, y = w[:, :gpt_config.block_size], w[:, 1:gpt_config.block_size + 1]
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % cfg.eval_interval == 0 or done == cfg.steps:
            curve["step"].append(done)
            curve["heldout_loss"].append(lm_loss(model, heldout))
            if bar is not None:
                bar.set_postfix(heldout=f"{curve['heldout_loss'][-1]:.3f}", refresh=False)
            if checkpoint is not None and done < cfg.steps:
                buffer = io.BytesIO()
                torch.save({"pretrain": asdict(cfg), "corpus_sha256": corpus.sha256, "step": done, "curve": curve,
                            "model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
                atomic_write_bytes(checkpoint, buffer.getvalue())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    provenance = {**corpus.provenance(), "model": asdict(gpt_config), "pretrain": asdict(cfg),
                  "heldout_loss": curve["heldout_loss"][-1], "uniform_loss": math.log(gpt_config.vocab_size),
                  "curve": curve, "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "seconds": time.perf_counter() - t0, "resumed_at_step": start,
                  "samples": samples(model, byte_tokenizer())}
    if log is not None:
        log(f"held-out loss {provenance['heldout_loss']:.3f} nats/byte (a uniform guess: "
            f"{provenance['uniform_loss']:.3f}) after {cfg.steps} steps")
    return model, provenance


def save_base(model, provenance, stem):
    """Write ``<stem>.pt`` (state dict) and ``<stem>.json`` (provenance, with the .pt file's SHA-256)."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    data = buffer.getvalue()
    stem = Path(stem)
    atomic_write_bytes(stem.with_suffix(".pt"), data)
    save_json(stem.with_suffix(".json"), {**provenance, "sha256": hashlib.sha256(data).hexdigest()})
    return stem.with_suffix(".pt")


# --- using a base ------------------------------------------------------------------------------------------------
REPOSITORY = BASE_DIR.parent.parent
_noted = set()


def cache_dir() -> Path:
    """Where bases built on first use are kept: ``$EPI_MINI_CACHE``, else ``~/.cache/epi-mini``."""
    return Path(os.environ.get("EPI_MINI_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "epi-mini")


def shown(path) -> str:
    """A path as a reader would type it: relative to the repository when it lies inside it."""
    path = Path(path).resolve()
    return path.relative_to(REPOSITORY).as_posix() if path.is_relative_to(REPOSITORY) else str(path)


def preset_base(preset, device="cpu", log=None) -> Path:
    """The file of ``preset``'s base: ``data/base/<preset>.pt`` where the repository has it (``tiny`` and
    ``cpu``), else pretrained on first use (``log`` is told) and cached under :func:`cache_dir`, keyed by the
    pretraining settings and the corpus."""
    committed = BASE_DIR / f"{preset}.pt"
    if committed.exists():
        return committed
    from .config import make_config
    cfg, run_cfg, corpus = PRETRAIN[preset], make_config(preset), installed_corpus()
    key = hashlib.sha256(json.dumps([asdict(cfg), run_cfg.n_layer, run_cfg.n_head, run_cfg.n_embd,
                                     run_cfg.block_size, corpus.sha256]).encode()).hexdigest()[:12]
    stem = cache_dir() / f"base-{preset}-{key}"
    if not stem.with_suffix(".pt").exists():
        (log or print)(f"no {preset} base yet: pretraining one ({cfg.steps} steps), cached as {stem}.pt")
        gpt = GPTConfig(block_size=run_cfg.block_size, vocab_size=byte_tokenizer().vocab_size,
                        n_layer=run_cfg.n_layer, n_head=run_cfg.n_head, n_embd=run_cfg.n_embd)
        model, provenance = pretrain(gpt, cfg, corpus, checkpoint=Path(f"{stem}.ckpt"),
                                     device=device)
        save_base(model, provenance, stem)
        Path(f"{stem}.ckpt").unlink(missing_ok=True)
    return stem.with_suffix(".pt")


def init_sha256(init, preset) -> str:
    """The SHA-256 of the weights a run with ``init`` starts from ("" for ``"scratch"``): part of what makes two
    runs the same run (the experiment runner's keys), since a rebuilt base changes every result."""
    if init == "scratch":
        return ""
    path = preset_base(preset) if init == "base" else Path(init)
    sidecar = path.with_suffix(".json")
    recorded = json.loads(sidecar.read_text()).get("sha256") if sidecar.is_file() else None
    return recorded or (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "")


def load_base(model, path) -> dict:
    """Load the base model at ``path`` into ``model`` and return what a run record keeps of it (path, SHA-256,
    its provenance's held-out loss and corpus). Raises :class:`BaseModelError` naming the problem: no such file,
    not a state dict, a file damaged since it was written (its SHA-256 differs from the one in ``<stem>.json``),
    or another shape of model (each differing tensor named). A base pretrained on another Python's library is
    used as it is, with one line on stderr saying so."""
    path = Path(path)
    if not path.is_file():
        raise BaseModelError(f"invalid init={str(path)!r}: no such file (use 'base', 'scratch' or a state dict's path)")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    sidecar = path.with_suffix(".json")
    provenance = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    if provenance.get("sha256") not in (None, digest):
        raise BaseModelError(f"{path} is damaged: its SHA-256 is {digest[:16]}..., {sidecar.name} recorded "
                             f"{provenance['sha256'][:16]}...; rebuild it with python -m epi_mini pretrain")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or a pickle that would run code
        raise BaseModelError(f"cannot read {path} as a state dict: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BaseModelError(f"{path} is not a state dict (a dict of tensors)")
    expected = model.state_dict()
    problems = [f"{k} missing" for k in expected if k not in state]
    problems += [f"{k} is not in the model" for k in state if k not in expected]
    problems += [f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    if problems:
        c = model.config
        raise BaseModelError(f"{path} does not fit this model (n_layer={c.n_layer}, n_head={c.n_head}, "
                             f"n_embd={c.n_embd}, block_size={c.block_size}, vocab_size={c.vocab_size}): "
                             + "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
                             + ". A model of another size needs its own base; --init scratch starts from random weights")
    with torch.no_grad():
        model.load_state_dict(state)
    if provenance and digest not in _noted:
        _noted.add(digest)
        here = installed_corpus()
        if (provenance.get("python"), provenance.get("corpus_sha256")) != (here.python, here.sha256):
            print(f"note: the base {shown(path)} was pretrained on Python {provenance.get('python')}'s standard library "
                  f"(corpus {str(provenance.get('corpus_sha256'))[:12]}), this machine has Python {here.python}'s "
                  f"({here.sha256[:12]}); it is used as it is", file=sys.stderr)
    return {"path": shown(path), "sha256": digest, "heldout_loss": provenance.get("heldout_loss"),
            "python": provenance.get("python"), "corpus_sha256": provenance.get("corpus_sha256")}
