"""The CPU thread policy: one torch thread per training process unless told otherwise, printed, recorded.

    python -m pytest tests/test_threads.py -q

Why one: ``benchmarks/threads.py`` measured two threads a third faster on an idle 2-core machine and up to
eighteen times slower when other jobs share the cores; runs side by side, one thread each, are never caught so.
"""
import pytest
import torch

from epi_mini import cli
from epi_mini.config import make_config
from epi_mini.train import CPU_THREADS, train, use_threads


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_use_threads_sets_the_default_and_refuses_nonsense(keep_threads):
    assert CPU_THREADS == 1
    assert use_threads() == 1 and torch.get_num_threads() == 1
    assert use_threads(2) == 2 and torch.get_num_threads() == 2
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="invalid threads="):
            use_threads(bad)


def test_a_record_says_how_many_threads_it_ran_with(keep_threads):
    use_threads(1)
    record = train(make_config("tiny", steps_per_stage=5, eval_interval=5), progress=False)
    assert record["timing"]["threads"] == 1


def test_the_command_line_prints_its_threads_and_refuses_zero(tmp_path, capsys, keep_threads):
    assert cli.main(["--preset", "tiny", "--method", "full", "--seeds", "0", "--steps-per-stage", "5", "--no-progress",
                     "--out", str(tmp_path / "run")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("| cpu, 1 torch thread (--threads)"), first
    assert cli.main(["--preset", "tiny", "--threads", "0", "--out", str(tmp_path / "other")]) == 2
    assert "invalid threads=0" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
