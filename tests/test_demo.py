"""The demo, ``python -m epi_mini`` without --method: full SFT, CPI-FT and EPI on the same seeds, each into its own
folder, printed side by side with one figure; runs side by side in worker processes, the same records as one after
another; Ctrl-C and --resume of a parallel run; the mark of a score at its task's floor.
Run: python -m pytest tests/test_demo.py -q

Every run here uses the tiny preset, shortened further where only the machinery is under test.
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from epi_mini.cli import floors_of, main, print_side_by_side, print_summary
from epi_mini.metrics import record_metric, summarize_seeds

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"
TINY = ["--preset", "tiny", "--no-progress"]
SHORT = [*TINY, "--steps-per-stage", "12", "--eval-interval", "12", "--eval-size", "8", "--probe-steps", "3"]
METHODS = {"full": "full SFT", "static": "CPI-FT", "epi": "EPI"}


def _records(out, method, seeds=(0,)):
    return [json.loads((out / method / f"seed{s}.json").read_text()) for s in seeds]


def _same_runs(a, b, seeds=(0,), methods=tuple(METHODS)):
    """Two folders hold the same records (but their timing) and the same final weights, bit for bit: a demo's
    (a folder per method) or, with ``methods=("",)``, one method's."""
    for method in methods:
        for s in seeds:
            ra, rb = (json.loads((f / method / f"seed{s}.json").read_text()) for f in (a, b))
            assert {k: v for k, v in ra.items() if k != "timing"} == {k: v for k, v in rb.items() if k != "timing"}
            wa, wb = (torch.load(f / method / f"seed{s}.pt", weights_only=True) for f in (a, b))
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (method, s)


def test_the_demo_trains_three_methods_into_their_folders_and_prints_them_side_by_side(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main([*TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].startswith("The demo: full SFT, CPI-FT (static isolation) and EPI on the shifting schedule from "
                               "the tiny preset's pretrained base, seed 0 for each")
    assert lines[1].startswith("one seed, so that the demo ends within 5 minutes on 2 cores")
    # Each method's folder is a run folder like any other, with the options --resume reads back.
    for method in METHODS:
        options = json.loads((out / method / "options.json").read_text())
        assert options["config"]["method"] == method and options["seeds"] == [0]
        assert {"seed0.json", "seed0.pt", "summary.json", "accuracy_matrix.png", "curves.png"} <= {
            p.name for p in (out / method).iterdir()}
    assert json.loads((out / "static" / "options.json").read_text())["config"]["cpift_stages"] == "schedule"
    assert json.loads((out / "options.json").read_text())["methods"] == list(METHODS)
    assert (out / "compare.png").stat().st_size > 0
    runs = {m: _records(out, m) for m in METHODS}
    assert {r[0]["config"]["seed"] for r in runs.values()} == {0}
    # One line per finished run, in whichever order they finished.
    done = [line for line in lines if " done in " in line]
    assert sorted(re.sub(r"done in \d+\.\d s", "done", line) for line in done) == sorted(
        f"{label}, seed 0 ({k}/3) done: average score {runs[m][0]['metrics']['average_score']:.3f}, forgetting "
        f"{runs[m][0]['metrics']['forgetting']:.3f} over 4 earlier tasks"
        for k, (m, label) in enumerate({"full": "full SFT", "static": "CPI-FT (static isolation)",
                                        "epi": "EPI"}.items(), 1))
    # The table: a column per method, the records' own figures in it.
    table = printed.split("full SFT, CPI-FT and EPI on the shifting schedule (tiny preset), seed 0, single values "
                          "(one seed has no spread)\n")[1]
    rows = table.splitlines()
    assert rows[0].split() == ["full", "SFT", "CPI-FT", "EPI"]
    for j, task in enumerate(runs["full"][0]["tasks"]):
        row = next(r for r in rows if r.startswith(f"  {task} (stage "))
        assert re.findall(r"\d\.\d{3}", row) == [f"{runs[m][0]['accuracy_matrix'][-1][j]:.3f}" for m in METHODS]
    for name, label in (("forgetting", "forgetting"), ("plasticity", "plasticity"),
                        ("earlier_final", "earlier tasks' final score"),
                        ("lm_loss_start", "base's LM loss at the start"), ("lm_loss_final", "base's LM loss after SFT"),
                        ("lm_loss_rise", "its rise")):
        row = next(r for r in rows if r.startswith(label))
        assert re.findall(r"-?\d\.\d{3}", row) == [f"{record_metric(runs[m][0], name):.3f}" for m in METHODS], name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["epi"]["plasticity"]["values"] == [record_metric(runs["epi"][0], "plasticity")]
    # CPI-FT's fusion moves the base before its first step: every method starts from the base's own loss, and
    # CPI-FT's rise, which counts the fusion's damage, is marked and explained
    start, setup = (record_metric(runs["static"][0], n) for n in ("lm_loss_start", "lm_loss_setup"))
    assert start == runs["static"][0]["base"]["heldout_loss"] == record_metric(runs["full"][0], "lm_loss_start")
    assert re.search(r"\nits rise \(lower is better\) +-?\d\.\d{3} +-?\d+\.\d{3} † +-?\d\.\d{3}\n", printed), printed
    assert (f"† CPI-FT changed the base's weights before its first step (its probes merged in, --cpift-fusion): that "
            f"alone took the base's loss to {setup:.3f}; its rise counts it\n") in printed
    assert "  full/" in printed and f"--resume {out}/full continues that one alone" in printed
    assert lines[-1].startswith("One seed shows how each method did here, not which is better: a direction needs "
                                "several paired seeds and a 95% interval that excludes 0")
    assert "results/" in lines[-1] and "python -m epi_mini.report" in lines[-1]
    assert "Next: python -m epi_mini --preset tiny --seeds 0 1 2 3 4" in lines[-1]
    # --resume of the demo's folder, as typed: every run had finished, so the same table again.
    assert main(["--resume", str(out), "--no-progress"]) == 0
    again = capsys.readouterr().out
    assert again.count("had already finished") == 3 and table.split("\n\nwrote")[0] in again
    assert main(["--resume", str(out), "--method", "epi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume {out / 'epi'} that one alone" in err
    assert main([*TINY, "--out", str(out)]) == 2      # a new demo into the folder of one is refused
    assert f"error: {out} holds another run's files" in capsys.readouterr().err


def test_seeds_side_by_side_give_the_records_of_seeds_one_after_another(tmp_path, capsys):
    # One method's seeds: side by side too (the demo's runs are compared in the Ctrl-C test below).
    apart, together = tmp_path / "one-after-another", tmp_path / "side-by-side"
    run = [*SHORT, "--method", "epi", "--seeds", "0", "1", "2"]
    assert main([*run, "--out", str(apart), "--workers", "1"]) == 0
    assert "| cpu, 1 torch thread (--threads)" in capsys.readouterr().out
    assert main([*run, "--out", str(together), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| cpu, 2 runs side by side (--workers), 1 torch thread each (--threads)" in printed
    assert sorted(re.findall(r"seed (\d) \(\d/3\) done in", printed)) == ["0", "1", "2"]
    _same_runs(apart, together, seeds=(0, 1, 2), methods=("",))
    assert main([*SHORT, "--workers", "0", "--out", str(tmp_path / "x")]) == 2
    assert "invalid --workers=0" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_failure_in_a_worker_is_one_line(tmp_path, capsys):
    # Two rhos for three stages: EPI's strategy refuses it when its run starts, in its worker process.
    assert main([*SHORT, "--isolation-schedule", "0.1", "0.1", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: invalid isolation_schedule=(0.1, 0.1): needs one ratio per "
                                                   "stage"), err
    assert not list((tmp_path / "demo").rglob(".lock"))


def _cli(*args, **kwargs):
    # SIGINT at its default in the child even under a background job's shell, which ignores it (then Python never
    # raises KeyboardInterrupt): the tests send Ctrl-C on purpose
    kwargs.setdefault("preexec_fn", lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.Popen([sys.executable, "-m", "epi_mini", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


CUT = [*TINY, "--steps-per-stage", "60", "--eval-interval", "30", "--eval-size", "8", "--probe-steps", "3"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The demo of CUT trained without a break, one run after another."""
    out = tmp_path_factory.mktemp("whole") / "demo"
    assert main([*CUT, "--out", str(out), "--workers", "1"]) == 0
    return out


def _workers(pid):
    """The worker processes of the run whose process is ``pid`` (its spawned children; not the resource tracker)."""
    found = subprocess.run(["pgrep", "-P", str(pid), "-f", "spawn_main"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


@pytest.mark.parametrize("stop", ["Ctrl-C to the parent", "Ctrl-C to the terminal's process group", "a worker killed"])
def test_a_parallel_run_cut_off_is_one_line_and_resume_completes_it(tmp_path, whole, stop):
    # The terminal sends Ctrl-C to every process of its group, workers included; `kill -INT` to the parent alone;
    # a worker can also die (out of memory, say): each way, one line says how to continue, and --resume does.
    if stop == "a worker killed" and not shutil.which("pgrep"):
        pytest.skip("needs pgrep to find the worker processes")
    cut = tmp_path / "cut"
    proc = _cli(*CUT, "--out", str(cut), "--checkpoint-every", "7", start_new_session=True)
    while not list(cut.glob("*/checkpoint-seed0/checkpoint.pt")):
        assert proc.poll() is None, "the demo ended before its first checkpoint"
        time.sleep(0.01)
    time.sleep(0.2)
    if stop == "Ctrl-C to the parent":
        proc.send_signal(signal.SIGINT)
    elif stop == "a worker killed":
        os.kill(_workers(proc.pid)[0], signal.SIGKILL)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert not list(cut.rglob(".lock"))                  # the locks go with the run
    if stop == "a worker killed":
        assert proc.returncode == 1
        line = re.fullmatch(r"error: the worker process training .+, seed 0 \(\d/3\) was killed by SIGKILL; "
                            r"continue with: (.+)\n", stderr)
        assert line, stderr
        command = shlex.split(line[1])
    else:
        assert proc.returncode == 130, stderr
        line = re.fullmatch(r"interrupted: (.+); continue with: (.+)\n", stderr)
        assert line and re.search(r"seed 0 \(\d/3\) (at step \d+ of 180, last checkpoint at step \d+|was being "
                                  r"set up)", line[1]), stderr
        command = shlex.split(line[2])
    assert command == ["python", "-m", "epi_mini", "--resume", str(cut)]
    resumed = _cli(*command[3:])                          # the command exactly as printed
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "resumed from its checkpoint at step" in stdout or "had already finished" in stdout
    _same_runs(whole, cut)


def _with_final(record, task, score):
    changed = json.loads(json.dumps(record))
    changed["accuracy_matrix"][-1][record["tasks"].index(task)] = score
    return changed


def test_a_final_score_at_its_tasks_floor_is_marked_in_every_table(capsys):
    record = json.loads((SNAPSHOTS / "tiny_records.json").read_text())[0]
    floors = floors_of(record)                         # tiny preset: the first 32 examples of each set
    assert floors["logic"] == pytest.approx(0.34375)
    record = _with_final(_with_final(record, "math", 0.9), "logic", floors["logic"] + 0.01)
    runs = {"full": [record], "epi": [_with_final(record, "logic", 0.9)]}
    print_side_by_side(runs)
    print_summary(summarize_seeds([record]), [record])
    printed = capsys.readouterr().out
    side, single = printed.split("task          final score")
    assert re.search(r"  logic \(stage 2\) +0\.354 \* +0\.900\s*\n", side), side
    assert re.search(r"  math \(stage 1\) +0\.900 +0\.900\s*\n", side), side
    assert re.search(r"\nlogic +0\.354 \*\n", single) and re.search(r"\nmath +0\.900\n", single)
    for text in (side, single):
        footnote = next(line for line in text.splitlines() if line.startswith("* "))
        assert footnote.startswith("* at or below the task's floor (+0.02): giving every prompt the same answer scores")
        assert "logic 0.344" in footnote and "math" not in footnote
