"""The base model: its corpus, its pretraining, and how runs start from it.

    python -m pytest tests/test_pretrain.py -q

Pretraining reads the installed Python's standard library, which every machine has; the committed held-out
windows (``data/base/heldout.bin``) make the held-out loss the same measurement everywhere.
"""
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from epi_mini import pretrain
from epi_mini.config import make_config
from epi_mini.metrics import base_gain_kept, lm_loss_rise, record_metric
from epi_mini.model import GPT, GPTConfig
from epi_mini.train import Run, fit

ROOT = Path(__file__).resolve().parent.parent
TINY = GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=258)


def test_the_corpus_is_the_library_in_sorted_order_with_a_held_out_split():
    corpus = pretrain.installed_corpus()
    again = pretrain.Corpus()
    assert again.sha256 == corpus.sha256 and torch.equal(again.train, corpus.train)
    assert corpus.num_files > 100 and corpus.heldout.numel() > 100_000 and corpus.train.numel() > 10 * 100_000
    assert corpus.python == sys.version.split()[0]
    # the split is a fixed rule on the file's path, so a held-out file is never trained on, on any Python
    paths = sorted(p.relative_to(pretrain.stdlib_root()).as_posix() for p in pretrain.stdlib_root().rglob("*.py"))
    assert 0 < sum(map(pretrain.is_heldout, paths)) < len(paths) / 5


def test_the_committed_windows_are_whole_and_what_the_corpus_gives():
    heldout, sample = pretrain.read_windows(pretrain.HELDOUT_FILE), pretrain.read_windows(pretrain.LM_SAMPLE_FILE)
    assert heldout.shape == (pretrain.HELDOUT_WINDOWS, pretrain.WINDOW)
    assert sample.shape == (pretrain.LM_SAMPLE_WINDOWS, pretrain.WINDOW)
    assert int(heldout.max()) < 256 and int(sample.max()) < 256  # bytes: the byte tokenizer's first 256 tokens
    provenance = json.loads((pretrain.BASE_DIR / "cpu.json").read_text())
    if provenance["corpus_sha256"] == pretrain.installed_corpus().sha256:  # the committing machine's library
        corpus = pretrain.installed_corpus()
        assert torch.equal(heldout, corpus.windows(len(heldout), torch.Generator().manual_seed(1), "heldout"))


def test_lm_loss_is_the_mean_next_byte_cross_entropy():
    torch.manual_seed(0)
    model = GPT(TINY)
    windows = torch.randint(0, 256, (5, pretrain.WINDOW))
    x, y = windows[:, :-1], windows[:, 1:]
    by_hand = F.cross_entropy(model(x, y)[0].reshape(-1, 258), y.reshape(-1)).item()
    assert pretrain.lm_loss(model, windows, batch_size=2) == pytest.approx(by_hand, rel=1e-6)
    assert abs(by_hand - math.log(258)) < 0.1  # small random weights: about a uniform guess


def test_the_base_lm_figures_by_hand():
    u = math.log(258)
    curve = {"uniform": u, "step": [0, 100, 200], "loss": [1.5, 2.0, 3.5]}
    record = {"lm_loss": curve, "base": {"heldout_loss": 1.5}}
    assert lm_loss_rise(record) == pytest.approx(2.0)
    assert base_gain_kept(record) == pytest.approx((u - 3.5) / (u - 1.5))
    assert base_gain_kept({**record, "lm_loss": {**curve, "loss": [1.5, 9.0]}}) < 0   # worse than guessing
    # A method that changes the weights before its first step (CPI-FT's fusion) is measured from the base's own
    # loss, not from where its set-up left it: the merge's damage counts.
    fused = {"lm_loss": {**curve, "loss": [12.3, 10.0]}, "base": {"heldout_loss": 1.5}}
    assert lm_loss_rise(fused) == pytest.approx(8.5) and record_metric(fused, "lm_loss_setup") == 12.3
    # From random weights there is no base: the start is a uniform guess, and there is no gain to keep.
    scratch = {"lm_loss": {**curve, "loss": [u - 0.01, 4.0]}, "base": None}
    assert lm_loss_rise(scratch) == pytest.approx(4.0 - u) and math.isnan(base_gain_kept(scratch))
    assert record_metric(record, "lm_loss_rise") == pytest.approx(2.0)
    assert math.isnan(record_metric({}, "lm_loss_rise"))


class _Interrupted(Exception):
    pass


class _StopAfter:
    """A corpus that stops the run (as a Ctrl-C would) after ``n`` batches."""

    def __init__(self, corpus, n):
        self.corpus, self.n, self.sha256 = corpus, n, corpus.sha256

    def windows(self, *args, **kwargs):
        if self.n == 0:
            raise _Interrupted
        self.n -= 1
        return self.corpus.windows(*args, **kwargs)

    def provenance(self):
        return self.corpus.provenance()


def test_pretraining_is_deterministic_and_resumes_exactly(tmp_path):
    cfg = pretrain.PretrainConfig(steps=12, batch_size=8, warmup_steps=3, eval_interval=4)
    corpus = pretrain.installed_corpus()
    a, prov_a = pretrain.pretrain(TINY, cfg, corpus, progress=False)
    b, prov_b = pretrain.pretrain(TINY, cfg, corpus, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert prov_a["curve"] == prov_b["curve"] and prov_a["curve"]["heldout_loss"][-1] < prov_a["curve"]["heldout_loss"][0]
    ckpt = tmp_path / "base.ckpt"
    with pytest.raises(_Interrupted):
        pretrain.pretrain(TINY, cfg, _StopAfter(corpus, 6), checkpoint=ckpt, progress=False)  # stopped at step 6
    assert ckpt.exists()
    c, prov_c = pretrain.pretrain(TINY, cfg, corpus, checkpoint=ckpt, progress=False)
    assert prov_c["resumed_at_step"] == 4
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    other = pretrain.PretrainConfig(steps=13, batch_size=8, warmup_steps=3, eval_interval=4)
    with pytest.raises(pretrain.BaseModelError, match="another pretraining run"):
        pretrain.pretrain(TINY, other, corpus, checkpoint=ckpt, progress=False)


def test_the_command_regenerates_the_committed_tiny_base(tmp_path):
    committed = json.loads((pretrain.BASE_DIR / "tiny.json").read_text())
    out = tmp_path / "tiny"
    done = subprocess.run([sys.executable, "-m", "epi_mini", "pretrain", "--preset", "tiny", "--out", str(out),
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "held-out loss" in done.stdout and f"wrote {out}.pt" in done.stdout
    rebuilt = json.loads(out.with_suffix(".json").read_text())
    if rebuilt["corpus_sha256"] == committed["corpus_sha256"]:  # same library: the same base, up to float rounding
        assert rebuilt["heldout_loss"] == pytest.approx(committed["heldout_loss"], rel=1e-3)
        assert rebuilt["curve"]["step"] == committed["curve"]["step"]
    else:  # another Python's library: another base, and loading the committed one says so
        assert rebuilt["python"] != committed["python"] or rebuilt["corpus_sha256"] != committed["corpus_sha256"]
    assert not out.with_suffix(".ckpt").exists()


def test_a_run_from_the_base_starts_from_exactly_its_weights():
    run = Run(make_config("tiny"))
    base = torch.load(pretrain.BASE_DIR / "tiny.pt", weights_only=True)
    assert all(torch.equal(run.model.state_dict()[k], v) for k, v in base.items())
    assert run.base["path"] == "data/base/tiny.pt" and run.base["sha256"] == json.loads(
        (pretrain.BASE_DIR / "tiny.json").read_text())["sha256"]
    scratch = Run(make_config("tiny", init="scratch"))
    assert scratch.base is None
    assert not torch.equal(scratch.model.transformer.wte.weight, run.model.transformer.wte.weight)


def test_a_record_carries_the_base_and_its_lm_loss_curve():
    record = fit(Run(make_config("tiny", steps_per_stage=10, eval_interval=10)), progress=False)
    lm = record["lm_loss"]
    assert lm["step"][0] == 0 and lm["step"][1:] == record["eval_curve"]["step"]
    provenance = json.loads((pretrain.BASE_DIR / "tiny.json").read_text())
    assert lm["loss"][0] == pytest.approx(provenance["heldout_loss"], rel=1e-5)   # the base's own, at step 0
    assert len(record["stage_lm_loss"]) == len(record["stage_scores"])
    assert record["base"]["sha256"] == provenance["sha256"]


def test_init_refuses_what_it_cannot_use(tmp_path):
    other = tmp_path / "other.pt"
    torch.save(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=48, vocab_size=258)).state_dict(), other)
    with pytest.raises(pretrain.BaseModelError, match=r"does not fit this model \(n_layer=2, n_head=2, n_embd=32.*"
                                                      r"transformer.wte.weight: file \(258, 48\), model \(258, 32\)"):
        Run(make_config("tiny", init=str(other)))
    with pytest.raises(pretrain.BaseModelError, match="no such file"):
        Run(make_config("tiny", init=str(tmp_path / "missing.pt")))
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (Path.touch, (marker,))
    evil.write_bytes(pickle.dumps({"w": RunsCode()}, protocol=2))
    with pytest.raises(pretrain.BaseModelError, match="cannot read"):
        Run(make_config("tiny", init=str(evil)))
    assert not marker.exists()
    damaged = tmp_path / "damaged.pt"
    good = bytearray((pretrain.BASE_DIR / "tiny.pt").read_bytes())
    good[len(good) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    damaged.write_bytes(bytes(good))
    damaged.with_suffix(".json").write_text((pretrain.BASE_DIR / "tiny.json").read_text())
    with pytest.raises(pretrain.BaseModelError, match="damaged"):
        Run(make_config("tiny", init=str(damaged)))
    with pytest.raises(ValueError, match="invalid init"):
        make_config("tiny", init="", tokenizer="bytes")
