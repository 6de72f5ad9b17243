"""Trustworthy runs: kill and resume (exactly, for every option that carries state), bad inputs with clear
errors, code-free and verified checkpoints, one run per output folder, a full disk or a read-only folder.
Run: python -m pytest tests/test_robustness.py -q"""
import errno
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from epi_mini.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint, save_json
from epi_mini.cli import main
from epi_mini.config import make_config
from epi_mini.runner import OutputLock, RunLocked, run_options
from epi_mini.train import Run, fit

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


# --- exact resume, for every option that carries state ----------------------------------------------------
RESUME_CASES = {
    "EPI": {},
    "int8 importance, bit mask": dict(ema_storage="int8", mask_storage="bits"),
    "bf16 importance, gap mask": dict(ema_storage="bf16", mask_storage="gaps"),
    "isolation schedule": dict(isolation_schedule=(0.05, 0.2)),
    "replay-aware importance": dict(schedule="two_task", replay_importance=True),
    "mask interval auto": dict(mask_interval="auto", warmup_steps=5),   # its drift check comes at step 15
    "random mask": dict(method="random-mask"),
    "static EPI score": dict(method="static-epi"),
    "CPI-FT": dict(method="static", probe_steps=3),
    "dropout": dict(dropout=0.1),
}


def resume_config(**overrides):
    """2 stages of 10 steps, EPI refreshed every 2 steps after 3 of warm-up: a checkpoint every 7 steps leaves
    the one of step 14 to resume from, in the second stage, with 3 refreshes still to come."""
    options = dict(method="epi", schedule="sequential", tasks=("math", "code"), steps_per_stage=10, warmup_steps=3,
                   mask_interval=2, eval_interval=1000, eval_size=4, device="cpu")
    return make_config("tiny", **{**options, **overrides})


def flat(tree, path=""):
    """Every leaf of a nested state (dicts, lists) by its path; tensors as they are."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{path}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in flat(sub, f"{path}/{i}").items()}
    return {path: tree}


def assert_same_state(a, b, what):
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys(), what
    differ = [k for k in a if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k])]
    assert not differ, f"{what} differ after resume: {differ[:5]}"


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_is_exact_for_every_option_that_carries_state(tmp_path, case):
    """A fresh run resumed from the step-14 checkpoint ends exactly where the run that went on without stopping
    does: the record, the weights, the optimizer's and the method's whole state."""
    cfg = resume_config(**RESUME_CASES[case])
    ends = []
    for resume in (False, True):
        run = Run(cfg)
        strategy = run.make_strategy()
        record = fit(run, strategy, progress=False, checkpoint_dir=tmp_path, checkpoint_every=7, resume=resume)
        ends.append((record, run, strategy))
    (straight, a, sa), (resumed, b, sb) = ends
    assert resumed["timing"]["resumed_at_step"] == 14
    assert {k: v for k, v in straight.items() if k != "timing"} == {k: v for k, v in resumed.items() if k != "timing"}
    assert_same_state(a.model.state_dict(), b.model.state_dict(), "weights")
    assert_same_state(a.optimizer.state_dict(), b.optimizer.state_dict(), "optimizer states")
    assert_same_state(sa.state_dict(), sb.state_dict(), "the method's states")
    if case == "isolation schedule":                 # honoured: the rho of each stage
        assert straight["isolated_fraction"] == pytest.approx([0.05, 0.2], abs=1e-3)


# --- integrity: a damaged checkpoint is named, not loaded -----------------------------------------------------
SHORT = ["--preset", "tiny", "--seeds", "0", "--schedule", "sequential", "--tasks", "math", "code",
         "--steps-per-stage", "10", "--eval-size", "4", "--method", "epi", "--no-progress"]


def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*SHORT, "--out", str(out), "--checkpoint-every", "5"]) == 0
    (out / "seed0.json").unlink()                     # pretend the run did not finish
    ckpt = out / "checkpoint-seed0" / CHECKPOINT_NAME
    data = bytearray(ckpt.read_bytes())
    middle = len(data) // 2                           # inside the state: weights, moments, importance
    data[middle:middle + 400] = bytes(b ^ 0xA5 for b in data[middle:middle + 400])
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{ckpt} is damaged: its sha256 is"):
        load_checkpoint(ckpt.parent)
    capsys.readouterr()
    assert main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{ckpt} is damaged" in err and not (out / "seed0.json").exists()


# --- one run per output folder ---------------------------------------------------------------------------------
def test_a_second_run_into_a_folder_being_written_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    first = cli(*RUN, "--out", str(out))
    while not (out / ".lock").exists():
        assert first.poll() is None, "the first run ended before it took the lock"
        time.sleep(0.01)
    assert main([*RUN, "--out", str(out), "--overwrite"]) == 2  # --overwrite: past the check of an occupied folder
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out} is being written by another run (process {first.pid} on " in err
    assert first.wait() == 0, first.stderr.read().decode()
    record = json.loads((out / "seed0.json").read_text())
    assert record["config"]["steps_per_stage"] == 100 and not (out / ".lock").exists()


def test_a_stale_lock_is_taken_over_and_a_live_or_unknown_one_is_not(tmp_path):
    host, lock = socket.gethostname(), OutputLock(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.path.write_text(f"{gone.pid} {host}\n")      # a run that was killed: its process is gone
    lock.acquire()
    assert lock.holder() == (os.getpid(), host)
    lock.release()
    assert not lock.path.exists()
    for holder, says in ((f"{os.getppid()} {host}", f"process {os.getppid()} on {host}"),  # alive
                         ("4242 elsewhere.example", "process 4242 on elsewhere.example")):  # cannot be checked
        lock.path.write_text(holder + "\n")
        with pytest.raises(RunLocked, match=f"{says}.*if no such run is going on, delete {lock.path}"):
            OutputLock(tmp_path).acquire()
        assert lock.path.read_text() == holder + "\n"  # left as it was


# --- a full disk, a read-only folder, file modes --------------------------------------------------------------
def test_a_full_disk_is_one_line_and_the_last_checkpoint_survives(tmp_path, capsys, monkeypatch):
    out, real, calls = tmp_path / "run", os.fsync, []

    def fsync(fd):                                    # writes: options.json, then checkpoints at steps 5, 10, ...
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    assert main([*SHORT, "--out", str(out), "--checkpoint-every", "5"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot write {out / 'checkpoint-seed0' / CHECKPOINT_NAME}: the disk is full (ENOSPC); "
                   "what was there is unchanged\n")
    assert load_checkpoint(out / "checkpoint-seed0")["step"] == 5  # the previous checkpoint, intact
    assert not list(out.rglob("*.tmp")) and not (out / ".lock").exists()


def test_a_read_only_folder_is_one_line_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):                   # (chmod does not stop root, who may run the tests)
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    out = tmp_path / "run"
    assert main([*SHORT, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot write {out / '.lock'}: the file system is read-only (EROFS); what was there is "
                   "unchanged\n")
    assert not any(out.iterdir())


def test_written_files_have_the_users_umask_not_0600(tmp_path):
    mask = os.umask(0o027)
    try:
        save_json(tmp_path / "a.json", {})
        save_checkpoint(tmp_path, {"config": {}, "step": 0})
        OutputLock(tmp_path).acquire()
    finally:
        os.umask(mask)
    for name in ("a.json", CHECKPOINT_NAME, ".lock"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640


# --- a run resumed by another launcher ---------------------------------------------------------------------
@pytest.mark.parametrize("launcher, says", [
    ({"world_size": 2, "fsdp": True, "check_sync": False}, "was started with --fsdp (sharded checkpoints), this one "
     "is not: resume it as it was started: torchrun --standalone --nproc_per_node=2 -m epi_mini.distributed --fsdp "
     "--resume"),
    ({"world_size": 2, "fsdp": False, "check_sync": False}, "was started with 2 process(es), this one has 1: resume it "
     "as it was started: torchrun --standalone --nproc_per_node=2 -m epi_mini.distributed --resume")],
    ids=["FSDP2", "DDP"])
def test_a_distributed_run_resumed_by_one_process_is_refused_by_name(tmp_path, capsys, launcher, says):
    folder = tmp_path / "run"
    save_json(folder / "options.json", run_options("tiny", [0], {"method": "epi"}, 0, launcher))
    assert main(["--resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err
    assert ("--allow-world-size-change" in err) != launcher["fsdp"]  # no flag turns shards into a state dict
    assert sorted(p.name for p in folder.iterdir()) == ["options.json"]
