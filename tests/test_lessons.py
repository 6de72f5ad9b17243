"""The committed lesson records (notebooks/lesson_runs/) are the ones the current code trains.

    python -m pytest tests/test_lessons.py -q

Notebooks 04-08 and 11 read their runs back from ``notebooks/lesson_runs/<hash>/`` (epi_mini.course), where the
hash covers everything a record depends on. A change to the training code changes the hash: the notebooks would
then train every run again (half an hour on 2 cores) -- this test fails first, saying what to re-run.
"""
import json

import numpy as np

from epi_mini import course
from epi_mini.config import TrainConfig
from epi_mini.experiments import run_key
from epi_mini.metrics import figures_match, summarize
from epi_mini.train import CPU_THREADS

RERUN = ("re-run notebooks 04-08 and 11 (python -m pytest --nbval-lax --nbval-current-env -q notebooks), which "
         "write the new folder, and commit it in place of the old one")


def test_the_committed_lesson_records_are_the_current_codes():
    current = course.lesson_cache(CPU_THREADS)
    folders = sorted(p.name for p in course.LESSON_RUNS.iterdir() if p.is_dir())
    assert folders == [current.name], (f"notebooks/lesson_runs holds {folders}, the training code's hash is "
                                       f"{current.name}: {RERUN}")
    assert list(current.glob("*.json")), "no lesson records: " + RERUN


def test_each_lesson_record_is_the_run_its_name_says(monkeypatch):
    monkeypatch.chdir(course.LESSON_RUNS.parent)   # notebook 11's method of its own is named relative to notebooks/
    for path in sorted(course.lesson_cache(CPU_THREADS).glob("*.json")):
        record = json.loads(path.read_text())
        cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["config"].items()})
        assert run_key(cfg) == path.stem, path.name
        recomputed = summarize(np.array(record["accuracy_matrix"]), record["first_stage"])
        assert figures_match(recomputed, {k: record["metrics"][k] for k in recomputed}) == [], path.name
