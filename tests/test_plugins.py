"""Your own method from a file (``--method FILE.py:CLASS``): the README's commands, the protocols, every error.
Run: python -m pytest tests/test_plugins.py -q"""
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from epi_mini import cli, course, experiments
from epi_mini.config import make_config
from epi_mini.distributed.ddp import check_distributed_options
from epi_mini.methods import build_strategy, load_plugin, method_label
from epi_mini.train import Run

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "my_epi.py"
SPEC = "examples/my_epi.py:StickyEPI"            # as the README writes it: relative to the repository
SMALL = dict(steps_per_stage=20, eval_interval=20, eval_size=16, probe_steps=5, warmup_steps=5)


def readme_block(language):
    """The first ``language`` code block of the README's "Your own method" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own method"):readme.index("## Runs you can trust")]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def write(folder, text, name="variant.py"):
    path = folder / name
    path.write_text(text)
    return path


def churn(record):
    """Mean overlap (Jaccard) of each refreshed set with the one before: 1 = the mask never moves."""
    overlaps = [h["jaccard_previous"] for h in record["strategy"]["history"] if h["jaccard_previous"] is not None]
    return sum(overlaps) / len(overlaps)


def test_the_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the commands name the example relative to the repository
    assert EXAMPLE.read_text().endswith(readme_block("python"))  # the README shows the file's code
    train, protocols = [line.split() for line in readme_block("bash").splitlines() if line.strip()]
    assert train[:3] == ["python", "-m", "epi_mini"] and protocols[:3] == ["python", "-m", "epi_mini.experiments"]
    assert cli.main(train[3:] + ["--preset", "tiny", "--seeds", "0", "--out", str(tmp_path / "cli"),
                                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("sticky EPI on the shifting schedule, tiny preset")
    record = json.loads((tmp_path / "cli" / "seed0.json").read_text())
    assert record["config"]["method"] == SPEC
    assert record["plugin"] == {"spec": SPEC, "file": "examples/my_epi.py", "resolved": str(EXAMPLE),
                                "class": "StickyEPI", "label": "sticky EPI",
                                "sha256": hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()}
    assert record["strategy"]["refreshes"] > 1  # EPI's machinery ran, from the config's options
    # The protocols' command: what it would train and where, without training (test below trains it).
    calls = []
    monkeypatch.setattr(experiments, "run_protocols", lambda *a, **kw: calls.append((a, kw)))
    assert experiments.main(protocols[3:]) == 0
    (names, preset, seeds, workers, out), options = calls[0]
    assert names == ["main"] and preset == "cpu" and seeds is None
    assert out == Path("runs/experiments-StickyEPI") and options == {"method": SPEC, "reuse": Path("results")}


def test_the_example_joins_the_main_and_drift_protocols_in_worker_processes(tmp_path):
    logs = []
    spec = f"{EXAMPLE}:StickyEPI"
    summaries = experiments.run_protocols(["main", "drift"], preset="tiny", seeds=(0, 1), workers=2, out=tmp_path,
                                          overrides=SMALL, method=spec, log=logs.append)
    main = summaries["main"]
    assert set(main["methods"]) == {c.label for c in experiments.main_cells()} | {"sticky EPI"}
    diff = main["comparisons"]["sticky EPI vs EPI"]["forgetting"]
    assert diff["n"] == 2 and diff["low"] <= diff["mean"] <= diff["high"]
    assert main["plugin"]["sha256"] == hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()
    assert main["plugin"]["compared_with"] == "EPI"
    assert "| sticky EPI vs EPI |" in (tmp_path / "main" / "summary.md").read_text()
    assert len(main["primary"]["tests"]) == len(experiments.PRIMARY_COMPARISONS) * len(experiments.PRIMARY_ENDPOINTS)
    # The same overrides as EPI's cell, the method replaced; the records were trained in spawned workers, from the
    # file: the example's hysteresis keeps the mask steadier than EPI's, seed by seed.
    for sticky, epi in zip(main["runs"]["sticky EPI"], main["runs"]["EPI"]):
        assert sticky.startswith("StickyEPI-shifting-seed")
        a, b = (json.loads((tmp_path / "runs" / f"{key}.json").read_text()) for key in (sticky, epi))
        assert {**a["config"], "method": "epi"} == b["config"] and a["plugin"]["class"] == "StickyEPI"
        assert churn(a) > churn(b)
    drift = summaries["drift"]
    assert "sticky EPI" in drift["methods"] and "sticky EPI vs EPI, shifting schedule" in drift["comparisons"]
    assert drift["runs"]["sticky EPI"] == main["runs"]["sticky EPI"]  # the same run serves both protocols
    assert "sticky EPI vs EPI, shifting schedule" in (tmp_path / "drift" / "summary.md").read_text()
    # Run again: nothing to train.
    experiments.run_protocols(["main"], preset="tiny", seeds=(0, 1), workers=2, out=tmp_path, overrides=SMALL,
                              method=spec, log=logs.append)
    assert logs[-1].startswith("0 runs to train now")


def test_every_protocol_gets_one_cell_like_its_epi_cell():
    for proto in experiments.PROTOCOLS.values():
        cells = experiments.cells_with(proto, SPEC)
        epi, added = next(c for c in cells if c.label == proto.epi_cell), cells[-1]
        assert [c.label for c in cells[:-1]] == [c.label for c in proto.cells()]
        assert added.label == "sticky EPI" and added.overrides == {**epi.overrides, "method": SPEC}, proto.name


def test_course_run_grid_takes_a_method_of_your_own(tmp_path, monkeypatch):
    monkeypatch.setattr(course, "lesson_cache", lambda threads: tmp_path)
    variant = write(tmp_path, "from epi_mini.methods import EPIUpdate\n\n\nclass AbsGradEPI(EPIUpdate):\n"
                    "    def __init__(self, params, **options):\n"
                    "        super().__init__(params, **{**options, 'importance': lambda p, g: g.abs()})\n")
    cells = {"EPI": dict(SMALL, method="epi"), "EPI on |g|": dict(SMALL, method=f"{variant}:AbsGradEPI")}
    runs = course.run_grid(cells, seeds=(0,), preset="tiny", workers=1)
    (mine,), (epi,) = runs["EPI on |g|"], runs["EPI"]
    assert mine["plugin"]["label"] == "AbsGradEPI" == method_label(f"{variant}:AbsGradEPI")  # no label: its name
    assert mine["strategy"]["history"][0]["step"] == epi["strategy"]["history"][0]["step"]
    assert mine["metrics"] != epi["metrics"] or mine["strategy"]["history"] != epi["strategy"]["history"]


def test_editing_the_file_changes_the_run_key_and_refuses_a_resume(tmp_path, capsys):
    copy = tmp_path / "my_epi.py"
    shutil.copy(EXAMPLE, copy)
    spec = f"{copy}:StickyEPI"
    cfg = make_config("tiny", method=spec, **SMALL)
    before = experiments.run_key(cfg)
    copy.write_text(copy.read_text().replace("margin = 0.5", "margin = 0.25"))
    after = experiments.run_key(cfg)
    assert before != after and before.startswith("StickyEPI-shifting-seed0-")
    assert load_plugin(spec).cls.margin == 0.25  # the edited file is what runs now
    argv = ["--method", spec, "--preset", "tiny", "--seeds", "0", "--out", str(tmp_path / "run"), "--no-progress",
            "--steps-per-stage", "10", "--warmup-steps", "5"]
    assert cli.main(argv) == 0
    copy.write_text(copy.read_text().replace("margin = 0.25", "margin = 0.75"))
    capsys.readouterr()
    assert cli.main(["--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "another version of" in err and str(copy) in err and err.count("\n") == 1


GOOD = "from epi_mini.methods import EPIUpdate\n\n\nclass Fine(EPIUpdate):\n    pass\n"


@pytest.mark.parametrize("file, text, cls, says", [
    ("missing.py", None, "StickyEPI", "no such file"),
    ("variant.txt", GOOD, "Fine", "is not a .py file"),
    ("variant.py", "def broken(:\n", "Fine", "importing"),
    ("variant.py", GOOD, "Missing", "defines no class Missing (classes defined there: Fine)"),
    ("variant.py", "class NotAStrategy:\n    pass\n", "NotAStrategy", "is not an UpdateStrategy"),
])
def test_a_bad_plugin_is_one_line_naming_the_file_and_the_class(tmp_path, capsys, file, text, cls, says):
    if text is not None:
        write(tmp_path, text, file)
    spec = f"{tmp_path / file}:{cls}"
    with pytest.raises(ValueError) as e:
        make_config("tiny", method=spec)
    message = str(e.value)
    assert says in message and file in message and cls in message and "\n" not in message, message
    assert cli.main(["--method", spec, "--preset", "tiny", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n" and not (tmp_path / "out").exists()


def test_a_class_that_cannot_be_built_fails_before_the_run_writes_anything(tmp_path, capsys):
    write(tmp_path, "from epi_mini.methods import EPIUpdate\nfrom epi_mini.strategy import UpdateStrategy\n\n\n"
          "class Broken(EPIUpdate):\n    def __init__(self, params, **options):\n"
          "        raise RuntimeError('boom')\n\n\n"
          "class Odd(UpdateStrategy):\n    @classmethod\n    def from_run(cls, run):\n        return 42\n")
    for cls, says in (("Broken", "failed (RuntimeError: boom)"), ("Odd", "gave a int, not an UpdateStrategy")):
        spec = f"{tmp_path / 'variant.py'}:{cls}"
        with pytest.raises(ValueError, match=re.escape(says)) as e:
            build_strategy(Run(make_config("tiny", method=spec)))
        assert f"building class {cls} from {tmp_path / 'variant.py'}" in str(e.value)
        assert cli.main(["--method", spec, "--preset", "tiny", "--out", str(tmp_path / cls)]) == 2
        assert capsys.readouterr().err == f"error: {e.value}\n" and not (tmp_path / cls).exists()


def test_the_command_lines_refuse_what_a_plugin_cannot_do(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:  # a typo of a built-in name: still answered with the closest one
        cli.main(["--method", "epl", "--preset", "tiny"])
    assert exit.value.code == 2 and "did you mean 'epi'?" in capsys.readouterr().err
    assert experiments.main(["main", "--method", "epi", "--out", str(tmp_path)]) == 2
    assert "the protocols take a method of your own" in capsys.readouterr().err
    write(tmp_path, GOOD.replace("    pass", "    label = 'EPI'"))
    assert experiments.main(["main", "--method", f"{tmp_path / 'variant.py'}:Fine", "--out", str(tmp_path)]) == 2
    assert "the label 'EPI'" in capsys.readouterr().err and not (tmp_path / "main").exists()
    cfg = make_config("tiny", method=SPEC.replace("examples", str(ROOT / "examples")))
    for flags in (dict(fsdp=True), dict(check_sync=True)):
        with pytest.raises(ValueError, match="runs under torchrun with DDP only"):
            check_distributed_options(cfg, **flags)
