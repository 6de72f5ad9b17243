"""The experiment runner end to end on a tiny config, so that it cannot silently rot.
Run: python -m pytest tests/test_experiments.py -q"""
import json

import pytest

from epi_mini import experiments


@pytest.fixture
def small_grid(monkeypatch):
    monkeypatch.setattr(experiments, "SWEEP_RATIOS", (0.1, 0.3))
    monkeypatch.setattr(experiments, "SWEEP_INTERVALS", (5, "auto"))
    monkeypatch.setattr(experiments, "DRIFT_RATIOS", (0.1, 0.3))


def test_every_protocol_runs_end_to_end_and_resumes(tmp_path, small_grid):
    tiny = dict(steps_per_stage=20, eval_interval=20, eval_size=16, probe_steps=5, warmup_steps=5)
    logs = []
    summaries = experiments.run_protocols(list(experiments.PROTOCOLS), preset="tiny", seeds=(0, 1), workers=2,
                                          out=tmp_path, overrides=tiny, log=logs.append)
    runs = list((tmp_path / "runs").glob("*.json"))
    # main 6 + forgetting 4 + drift 2 + sweep 4 (of which rho=0.1/K=5... none shared) cells, x 2 seeds,
    # minus the drift/sweep/main cells that are the same config (trained once).
    assert len(runs) == len({p.name for p in runs}) and len(runs) >= 2 * 13
    for p in experiments.PROTOCOLS:
        s = json.loads((tmp_path / p / "summary.json").read_text())
        assert s["seeds"] == [0, 1] and (tmp_path / p / "summary.md").read_text().startswith("# ")
        assert list((tmp_path / p).glob("*.png"))
    main = summaries["main"]["methods"]
    assert set(main) == {"full SFT (multi-task)", "full SFT (shifting)", "multi-stage SFT", "static (CPI-FT)",
                         "static EPI score", "EPI"}
    ref = main["full SFT (multi-task)"]["average_normalized_score"]["mean"]
    assert ref == pytest.approx(1.0) or (ref != ref and not summaries["main"]["reference_scores"])  # NaN: nothing learned
    assert len(main["EPI"]["forgetting"]["values"]) == 2
    drift = summaries["drift"]["methods"]["EPI rho=0.1"]
    assert 0.0 <= drift["overlap_first_last"]["mean"] <= 1.0 and len(drift["overlap_by_lag"]) >= 2
    assert set(summaries["sweep"]["cells"]) == {"rho=0.1 K=5", "rho=0.1 K=auto", "rho=0.3 K=5", "rho=0.3 K=auto"}
    assert set(summaries["forgetting"]["methods"]["EPI"]) >= {"delta_A", "delta_B"}
    # A second call finds every run done and trains nothing.
    logs.clear()
    experiments.run_protocols(["main"], preset="tiny", seeds=(0, 1), workers=1, out=tmp_path, overrides=tiny,
                              log=logs.append)
    assert logs[0].startswith("0 runs to train")


def test_unknown_protocol_is_refused(capsys):
    assert experiments.main(["everything"]) == 2
    assert "unknown protocol 'everything'" in capsys.readouterr().err
