"""Trustworthy runs: kill and resume, bad inputs with clear errors, code-free checkpoints.
Run: python -m pytest tests/test_robustness.py -q"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from epi_mini.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from epi_mini.cli import main
from epi_mini.config import make_config

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--preset", "tiny", "--seeds", "0", "--steps-per-stage", "100", "--method", "epi", "--no-progress"]


def cli(*args):
    return subprocess.Popen([sys.executable, "-m", "epi_mini", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


def finished(folder):
    record = json.loads((folder / "seed0.json").read_text())
    return {k: v for k, v in record.items() if k != "timing"}, torch.load(folder / "seed0.pt", weights_only=True)


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_result(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert cli(*RUN, "--out", str(whole)).wait() == 0
    proc = cli(*RUN, "--out", str(broken), "--checkpoint-every", "7")
    ckpt = broken / "checkpoint-seed0" / CHECKPOINT_NAME
    while not ckpt.exists():
        assert proc.poll() is None, "run ended before its first checkpoint"
        time.sleep(0.01)
    time.sleep(random.Random().uniform(0.0, 0.5))   # a random moment after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (broken / "seed0.json").exists(), "the run finished before it was killed; lengthen it"
    # The kill may land inside a save: then a temporary file stays behind, but the checkpoint itself is
    # always the last complete one.
    assert load_checkpoint(broken / "checkpoint-seed0")["step"] % 7 == 0
    resumed = cli(*RUN, "--out", str(broken), "--checkpoint-every", "7", "--resume", str(broken))
    assert resumed.wait() == 0, resumed.stderr.read().decode()
    assert not list(broken.rglob("*.tmp")), "a stale temporary file survived the next save"
    (rec_a, w_a), (rec_b, w_b) = finished(whole), finished(broken)
    assert json.loads(json.dumps(rec_a)) == rec_b
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def _jsonl(tmp_path, text):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task": "mine", "prompt": "a=", "response": "b"}\n' * 3 + text + "\n")
    return str(path)


BAD_INPUTS = [
    # (extra CLI args, text the error must contain)
    (["--isolation-ratio", "5"], "isolation_ratio=5.0"),
    (["--isolation-ratio", "-0.5"], "isolation_ratio=-0.5"),
    (["--mask-interval", "0"], "mask_interval=0"),
    (["--ema-beta", "1.5"], "ema_beta=1.5"),
    (["--learning-rate", "-1"], "learning_rate=-1.0"),
    (["--learning-rate", "inf"], "learning_rate=inf"),
    (["--steps-per-stage", "0"], "steps_per_stage=0"),
    (["--batch-size", "-4"], "batch_size=-4"),
    (["--replay", "1.2"], "replay=1.2"),
    (["--warmup-steps", "-3"], "warmup_steps=-3"),
    (["--tasks", "math", "poetry"], "'poetry'"),
    (["--checkpoint-every", "-1"], "--checkpoint-every=-1"),
    (["--resume", "/no/such/folder"], "--resume='/no/such/folder'"),
    (["--tokenizer", "gpt2", "--gpt2-vocab", "/no/such/vocab"], "vocab.bpe"),
    (["--task-files", "JSONL:{broken"], "bad.jsonl:4: not valid JSON"),
    (["--task-files", 'JSONL:{"task": "mine", "prompt": "a="}'], "bad.jsonl:4: missing field"),
    (["--task-files", 'JSONL:{"task": "mine", "prompt": "a=", "response": 7}'], "bad.jsonl:4: field 'response'"),
    (["--task-files", 'JSONL:"just a string"'], "bad.jsonl:4: expected a JSON object"),
    (["--task-files", "/no/such/file.jsonl"], "data file not found: /no/such/file.jsonl"),
]


@pytest.mark.parametrize("args, culprit", BAD_INPUTS, ids=[" ".join(a)[:40] for a, _ in BAD_INPUTS])
def test_bad_input_gives_one_clear_line_and_writes_nothing(tmp_path, capsys, args, culprit):
    args = [_jsonl(tmp_path, a[6:]) if a.startswith("JSONL:") else a for a in args]
    out = tmp_path / "out"
    assert main(["--preset", "tiny", "--seeds", "0", "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and culprit in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("args, culprit", [(["--method", "magic"], "magic"), (["--preset", "huge"], "huge"),
                                           (["--schedule", "zigzag"], "zigzag"), (["--normalizer", "x"], "'x'")])
def test_unknown_choices_are_refused_by_the_parser(capsys, args, culprit):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and culprit in capsys.readouterr().err


def _checkpoint(tmp_path, **overrides):
    out = tmp_path / "run"
    assert main([*RUN[:-1], "--out", str(out), "--checkpoint-every", "50", "--no-progress",
                 *sum(([f"--{k}", str(v)] for k, v in overrides.items()), [])]) == 0
    return out


def test_truncated_and_mismatched_checkpoints_are_refused(tmp_path, capsys):
    out = _checkpoint(tmp_path)
    (out / "seed0.json").unlink()                                  # pretend the run did not finish
    ckpt = out / "checkpoint-seed0" / CHECKPOINT_NAME
    good = ckpt.read_bytes()
    # another model size, another method: refused before any work, naming the option and both values
    for option, saved in ((["--n-embd", "64"], "32"), (["--method", "static"], "epi")):
        assert main([*RUN, "--out", str(out), "--resume", str(out), *option]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {' '.join(option)} differs") and f"started with ({saved})" in err
    # a folder from before options.json was saved: the checkpoint itself refuses another config
    (out / "options.json").unlink()
    for option, field in ((["--n-embd", "64"], "n_embd"), (["--method", "static"], "method")):
        assert main([*RUN, "--out", str(out), "--resume", str(out), *option]) == 2
        err = capsys.readouterr().err
        assert "incompatible config" in err and field in err
    ckpt.write_bytes(good[: len(good) // 2])                       # truncated
    assert main([*RUN, "--out", str(out), "--resume", str(out)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + str(Path(os.environ["EVIL_MARK"])),))


def test_a_checkpoint_from_elsewhere_never_runs_code(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"config": {}, "step": 1, "payload": _Evil()}, folder / CHECKPOINT_NAME, pickle_protocol=2)
    assert not mark.exists()
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(folder, make_config("tiny"))
    assert not mark.exists()


def test_nan_gradient_leaves_weights_moments_and_importance_untouched():
    from epi_mini.train import Run, fit
    run = Run(make_config("tiny", method="epi", steps_per_stage=10, warmup_steps=2))
    state = {}

    def on_step(step, run, strategy):
        if step == 11:   # snapshot just before step 12, whose gradient we poison
            state["w"] = {n: p.detach().clone() for n, p in run.model.named_parameters()}
            state["m"] = {k: {n: v.clone() for n, v in s.items()} for k, s in run.optimizer.state.items()}
            state["s"] = {n: s.clone() for n, s in strategy.scores.items()}
        if step == 12:
            state["after"] = ({n: p.detach().clone() for n, p in run.model.named_parameters()},
                              {k: {n: v.clone() for n, v in s.items()} for k, s in run.optimizer.state.items()},
                              {n: s.clone() for n, s in strategy.scores.items()})

    target = run.model.transformer.h[0].mlp.c_fc.weight
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 13 else grad
    target.register_hook(poison)
    record = fit(run, progress=False, on_step=on_step)
    assert record["bad_steps"] == 1
    w, m, s = state["after"]
    assert all(torch.equal(state["w"][n], w[n]) for n in w)
    assert all(torch.equal(state["m"][k][n], m[k][n]) for k in m for n in m[k])
    assert all(torch.equal(state["s"][n], s[n]) and torch.isfinite(s[n]).all() for n in s)
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
