"""What a user of ``python -m epi_mini`` sees: the table, one line per seed, the folder's files, the next step,
``--help`` and the parser's errors, ``--resume DIR`` as typed (no other option), the folders a run refuses to
write into, and Ctrl-C. Run: python -m pytest tests/test_cli.py -q

The table snapshots are taken from stored records of a tiny run (``tests/snapshots/tiny_records.json``), so
they do not depend on this machine's floating-point results; the end-to-end tests train for real and check
the output against the records the run wrote. To rewrite a snapshot after an intended change of the table:
``EPI_MINI_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_cli.py -q``, then read the diff before committing.
"""
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import epi_mini.train
from epi_mini import experiments, report
from epi_mini.checkpoint import CHECKPOINT_NAME, atomic_write_bytes, load_checkpoint
from epi_mini.cli import build_parser, main, print_summary
from epi_mini.config import OptionParser
from epi_mini.distributed import build_parser as torchrun_parser
from epi_mini.metrics import summarize_seeds
from epi_mini.runner import OPTIONS_NAME, resume_options, run_options

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"
TINY = ["--preset", "tiny", "--no-progress"]


def table(records):
    buffer = io.StringIO()
    print_summary(summarize_seeds(records), records, file=buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("seeds, name", [((0,), "table_one_seed.txt"), ((0, 1), "table_two_seeds.txt")])
def test_printed_table_matches_its_snapshot(seeds, name):
    records = [r for r in json.loads((SNAPSHOTS / "tiny_records.json").read_text()) if r["config"]["seed"] in seeds]
    printed = table(records)
    if os.environ.get("EPI_MINI_UPDATE_SNAPSHOTS"):
        atomic_write_bytes(SNAPSHOTS / name, printed.encode())
    assert printed == (SNAPSHOTS / name).read_text(), f"the table differs from tests/snapshots/{name}"


def _record(rows, first_stage, tasks=("a", "b", "c"), seed=0):
    curve = {t: [row[j] for row in rows] for j, t in enumerate(tasks)}
    from epi_mini.metrics import summarize
    return {"config": {"method": "full", "schedule": "shifting", "preset": "tiny", "seed": seed},
            "tasks": list(tasks), "first_stage": first_stage, "accuracy_matrix": rows,
            "metrics": summarize(rows, first_stage), "eval_curve": {"step": [1, 2, 3], "scores": curve}}


def test_one_seed_prints_single_values_and_only_tasks_that_lost_score_as_forgotten():
    # a: learned then lost; b: improved after its stage (0.733 -> 0.742); c: introduced last
    printed = table([_record([[0.8, 0.733, 0.0], [0.8, 0.733, 0.0], [0.3, 0.742, 0.9]], [0, 0, 2])])
    assert "±" not in printed and "one seed has no spread" in printed
    lost = printed.split("tasks that lost score")[1].split("kept or improved")[0]
    assert "a " in lost and "b " not in lost
    assert "kept or improved: b (0.733 -> 0.742)" in printed
    two = table([_record([[0.8, 0.7, 0.0], [0.8, 0.7, 0.0], [0.3, 0.7, 0.9]], [0, 0, 2], seed=s) for s in (0, 1)])
    assert "mean ± std over 2 seeds" in two and "0.300 ± 0.000" in two


def _normalised(text, out):
    return re.sub(r"done in \d+\.\d s", "done in <t> s", text.replace(str(out), "<out>"))


@pytest.mark.parametrize("seeds", [["0"], ["0", "1"]], ids=["one seed", "two seeds"])
def test_cli_prints_seed_lines_the_table_of_its_records_every_file_and_a_next_step(tmp_path, capsys, seeds):
    out = tmp_path / "run"
    assert main([*TINY, "--method", "full", "--seeds", *seeds, "--out", str(out), "--checkpoint-every", "50"]) == 0
    printed = _normalised(capsys.readouterr().out, out)
    records = [json.loads((out / f"seed{s}.json").read_text()) for s in seeds]
    lines = printed.splitlines()
    assert lines[0].endswith("| cpu, 1 torch thread (--threads)" if len(seeds) == 1 else
                             "| cpu, 2 runs side by side (--workers), 1 torch thread each (--threads)"), lines[0]
    # one line per finished seed, before the table; seeds side by side finish in either order
    assert sorted(lines[1:1 + len(seeds)]) == [
        f"seed {r['config']['seed']} ({k}/{len(seeds)}) done in <t> s: average score "
        f"{r['metrics']['average_score']:.3f}, forgetting {r['metrics']['forgetting']:.3f} over 4 earlier tasks"
        for k, r in enumerate(records, 1)]
    assert table(records) in printed
    assert ("±" in printed) == (len(seeds) > 1)
    listing = printed.split("(every file now in it):\n")[1].split("\n\n")[0].splitlines()
    listed = {line.split()[0] for line in listing}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert listed == on_disk and {"options.json", "summary.json", "curves.png", "accuracy_matrix.png",
                                  "checkpoint-seed0/checkpoint.pt", *(f"seed{s}.pt" for s in seeds)} <= on_disk
    assert not any("not written by epi-mini" in line or "before this run" in line for line in listing)
    assert f"next: python -m epi_mini --preset tiny --seeds {' '.join(seeds)} --method epi\n" in printed


def test_help_says_what_empty_defaults_mean():
    text = " ".join(build_parser().format_help().split())   # argparse wraps lines; join them back
    assert "()" not in text and "''" not in text
    assert "--tasks" in text and "default: all five families, math code logic instruction chat" in text
    assert "one rho per stage, e.g. 0 0.1 0.1 (default: --isolation-ratio throughout)" in text
    for action in build_parser()._actions:           # one default per option, never two
        assert (action.help or "").count("(default") + (action.help or "").count("(cpu preset") <= 1, action.help


# --- the parser: no abbreviations, one line per error ------------------------------------------------------
@pytest.mark.parametrize("args, says", [
    (["--lr", "0.01"], "unrecognized arguments: --lr 0.01"),     # not --lr-warmup-steps with "0.01"
    (["--lr", "10"], "unrecognized arguments: --lr 10"),         # not --lr-warmup-steps 10, silently
    (["--method", "epl"], "argument --method: invalid choice 'epl' (did you mean 'epi'? choose from full,"),
    (["--learning-rat", "0.1"], "unrecognized arguments: --learning-rat 0.1 (did you mean --learning-rate?)"),
    (["--checkpoint", "5"], "unrecognized arguments: --checkpoint 5"),   # not --checkpoint-every
])
def test_parser_errors_are_one_line_and_never_guess_an_abbreviation(capsys, args, says):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and says in err and "usage:" not in err


def test_every_command_line_of_the_project_refuses_abbreviations(capsys):
    for parser in (build_parser(), torchrun_parser()):
        assert isinstance(parser, OptionParser) and parser.allow_abbrev is False
    for entry, args in ((experiments.main, ["main", "--pres", "tiny"]), (report.main, ["--writ"])):
        with pytest.raises(SystemExit) as e:
            entry(args)
        assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    # Every parser in the package and the benchmarks is an OptionParser (defined once, in config.py).
    sources = [*(ROOT / "epi_mini").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    plain = [str(f.relative_to(ROOT)) for f in sources if "ArgumentParser(" in f.read_text() and f.name != "config.py"]
    assert not plain, f"parsers built without OptionParser: {plain}"


# --- --resume DIR as typed ---------------------------------------------------------------------------------
KILLED = [*TINY, "--seeds", "0", "--steps-per-stage", "100", "--method", "epi"]


def _cli(*args):
    # Ctrl-C is the default action in the child even when pytest runs as a background job (whose shell ignores
    # SIGINT, and Python then never installs its KeyboardInterrupt handler): the tests send it on purpose
    return subprocess.Popen([sys.executable, "-m", "epi_mini", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _finished(folder):
    record = json.loads((folder / "seed0.json").read_text())
    return record, torch.load(folder / "seed0.pt", weights_only=True)


def test_resume_with_no_other_option_continues_from_the_checkpoint(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = _cli(*KILLED, "--out", str(whole))
    assert done.wait() == 0, done.stderr.read()
    proc = _cli(*KILLED, "--out", str(broken), "--checkpoint-every", "7")
    ckpt = broken / "checkpoint-seed0" / CHECKPOINT_NAME
    while not ckpt.exists():
        assert proc.poll() is None, "run ended before its first checkpoint"
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (broken / "seed0.json").exists(), "the run finished before it was killed; lengthen it"
    assert json.loads((broken / OPTIONS_NAME).read_text())["checkpoint_every"] == 7
    resumed = _cli("--resume", str(broken))          # as a user types it: nothing else
    stdout, stderr = resumed.communicate()
    assert resumed.returncode == 0, stderr
    (rec_a, w_a), (rec_b, w_b) = _finished(whole), _finished(broken)
    start = rec_b["timing"]["resumed_at_step"]
    assert start > 0 and start % 7 == 0
    assert f"resumed from its checkpoint at step {start}" in stdout
    assert {k: v for k, v in rec_a.items() if k != "timing"} == {k: v for k, v in rec_b.items() if k != "timing"}
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    if start + 7 < 300:   # checkpoints went on at the saved interval although --checkpoint-every was left out
        assert load_checkpoint(broken / "checkpoint-seed0")["step"] > start


def test_resume_refuses_an_option_repeated_with_another_value_naming_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--seeds", "0", "--steps-per-stage", "10", "--method", "epi", "--out", str(out)]) == 0
    (out / "seed0.json").unlink()                     # pretend it did not finish
    capsys.readouterr()
    for option, saved in ((["--method", "full"], "epi"), (["--steps-per-stage", "20"], "10"),
                          (["--seeds", "0", "1"], "0"), (["--preset", "cpu"], "tiny"), (["--n-layer", "3"], "2")):
        assert main(["--resume", str(out), *option]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {' '.join(option)} differs from the value")
        assert f"started with ({saved})" in err and f"leave {option[0]} out" in err
    assert not (out / "seed0.json").exists()          # refused before any work
    assert main(["--resume", str(out), "--out", str(tmp_path / "elsewhere")]) == 2
    assert "--out" in capsys.readouterr().err


def test_resume_options_keep_the_saved_ones_and_allow_only_where_and_how_often():
    saved = run_options("tiny", [0, 1], {"method": "epi", "tasks": ("math", "code")}, checkpoint_every=7)
    same = resume_options(saved, "tiny", [0, 1], {"method": "epi", "tasks": ("math", "code"), "n_layer": 2})
    assert same == saved                              # repeating the same values changes nothing
    moved = resume_options(saved, overrides={"device": "cpu"}, checkpoint_every=3)
    assert moved["config"]["device"] == "cpu" and moved["checkpoint_every"] == 3
    assert resume_options(saved)["checkpoint_every"] == 7
    with pytest.raises(ValueError, match=r"--tasks math differs .* started with \(math code\)"):
        resume_options(saved, overrides={"tasks": ("math",)})


def test_nbconvert_outputs_are_neither_collected_nor_committed(tmp_path):
    (tmp_path / "conftest.py").write_text((ROOT / "conftest.py").read_text())
    notebook = {"cells": [{"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {}, "outputs": [],
                           "source": ["1 + 1"]}], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    for name in ("lesson.ipynb", "lesson.nbconvert.ipynb"):
        (tmp_path / "notebooks").mkdir(exist_ok=True)
        (tmp_path / "notebooks" / name).write_text(json.dumps(notebook))
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "--nbval-lax", "-p",
                           "no:cacheprovider", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lesson.ipynb" in done.stdout and "nbconvert" not in done.stdout
    ignored = subprocess.run(["git", "check-ignore", "-q", "notebooks/00_quickstart.nbconvert.ipynb"], cwd=ROOT)
    assert ignored.returncode == 0, ".gitignore does not ignore *.nbconvert.ipynb"


# --- folders a run will not write into, and Ctrl-C ------------------------------------------------------------
SHORT = [*TINY, "--seeds", "0", "--schedule", "sequential", "--tasks", "math", "code", "--steps-per-stage", "10",
         "--eval-size", "4", "--method", "epi"]


def _contents(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_run_into_a_folder_that_holds_a_run_is_refused_or_with_overwrite_replaced(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*SHORT, "--seeds", "0", "1", "--out", str(out)]) == 0
    (out / "notes.txt").write_text("not epi-mini's")
    before = _contents(out)
    capsys.readouterr()
    assert main([*SHORT, "--out", str(out), "--checkpoint-every", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {out} holds another run's files (accuracy_matrix.png, ")
    assert f"--resume {out} continues that run, --overwrite replaces it" in err
    assert _contents(out) == before                   # refused before anything was written
    assert main([*SHORT, "--out", str(out), "--checkpoint-every", "5", "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "seed1.json" not in names and "seed1.pt" not in names   # the other run's records are gone ...
    assert {"seed0.json", "checkpoint-seed0", "notes.txt"} <= names  # ... files that are not epi-mini's stay
    assert json.loads((out / OPTIONS_NAME).read_text())["checkpoint_every"] == 5


def test_resume_of_a_folder_without_a_run_is_refused_and_writes_nothing(tmp_path, capsys):
    folder = tmp_path / "results"                      # like results/main: a summary, no run
    folder.mkdir()
    (folder / "summary.json").write_text("{}")
    (folder / "summary.md").write_text("# results")
    before = _contents(folder)
    assert main(["--resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"invalid --resume='{folder}': that folder holds no epi-mini run" in err
    assert _contents(folder) == before


def test_ctrl_c_prints_one_line_with_the_step_the_checkpoint_and_the_command_that_continues(tmp_path):
    out = tmp_path / "run"
    proc = _cli(*KILLED, "--out", str(out), "--checkpoint-every", "7")
    ckpt = out / "checkpoint-seed0" / CHECKPOINT_NAME
    while not ckpt.exists():
        assert proc.poll() is None, "run ended before its first checkpoint"
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr, stderr
    line = re.fullmatch(r"interrupted: seed 0 \(1/1\) at step (\d+) of 300; last checkpoint at step (\d+) \((.+)\); "
                        r"continue with: (.+)\n", stderr)
    assert line, stderr
    step, saved = int(line[1]), int(line[2])
    assert 7 <= saved <= step < 300 and saved % 7 == 0 and line[3] == str(out / "checkpoint-seed0")
    assert load_checkpoint(out / "checkpoint-seed0")["step"] == saved
    command = shlex.split(line[4])
    assert command == ["python", "-m", "epi_mini", "--resume", str(out)]
    resumed = _cli(*command[3:])                       # the command exactly as printed
    stdout, stderr = resumed.communicate()
    assert resumed.returncode == 0, stderr
    assert f"resumed from its checkpoint at step {saved}" in stdout


@pytest.mark.parametrize("every, says", [
    ("0", "no checkpoints in this run (--checkpoint-every N writes them)"),
    ("100", "no checkpoint yet (the first is written at step 100)")], ids=["checkpoints off", "before the first"])
def test_ctrl_c_before_any_checkpoint_says_there_is_none(tmp_path, capsys, monkeypatch, every, says):
    out, steps, real = tmp_path / "run", [], epi_mini.train.sft_step

    def interrupted_at_step_3(*args, **kwargs):       # Ctrl-C as the fourth step begins
        steps.append(1)
        if len(steps) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(epi_mini.train, "sft_step", interrupted_at_step_3)
    assert main([*SHORT, "--out", str(out), "--checkpoint-every", every]) == 130
    assert capsys.readouterr().err == (f"interrupted: seed 0 (1/1) at step 3 of 20; {says}, so seed 0 will train "
                                       f"again from step 0; continue with: python -m epi_mini --resume {out}\n")
    assert not (out / ".lock").exists()               # the lock goes with the run
