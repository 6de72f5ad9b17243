"""The experiment runner end to end on a tiny config, so that it cannot silently rot.
Run: python -m pytest tests/test_experiments.py -q"""
import json

import pytest

from epi_mini import experiments
from epi_mini.metrics import paired_difference


@pytest.fixture
def small_grid(monkeypatch):
    monkeypatch.setattr(experiments, "CORE_RATIOS", (0.01, 0.1))
    monkeypatch.setattr(experiments, "EPI_RATIOS", (0.1, 0.3))


def test_every_protocol_runs_end_to_end_and_resumes(tmp_path, small_grid):
    tiny = dict(steps_per_stage=20, eval_interval=20, eval_size=16, probe_steps=5, warmup_steps=5)
    logs = []
    summaries = experiments.run_protocols(list(experiments.PROTOCOLS), preset="tiny", seeds=(0, 1), workers=2,
                                          out=tmp_path, overrides=tiny, log=logs.append)
    runs = {p.stem for p in (tmp_path / "runs").glob("*.json")}
    used = [key for s in summaries.values() for keys in s["runs"].values() for key in keys]
    assert set(used) == runs and len(used) > len(runs)  # each run trained once, though protocols share runs
    for p in experiments.PROTOCOLS:
        s = json.loads((tmp_path / p / "summary.json").read_text())
        assert s["seeds"] == [0, 1] and (tmp_path / p / "summary.md").read_text().startswith("# ")
        assert list((tmp_path / p).glob("*.png")), p
    main = summaries["main"]["methods"]
    assert set(main) == {c.label for c in experiments.main_cells()}
    assert all(len(m["frozen_by_stage"]) == 3 for m in main.values())
    primary = summaries["main"]["primary"]
    assert len(primary["tests"]) == len(experiments.PRIMARY_COMPARISONS) * len(experiments.PRIMARY_ENDPOINTS)
    assert all(t["p_holm"] >= t["p"] and t["decision"] in ("higher", "lower", "not separated") for t in primary["tests"])
    baselines = summaries["baselines"]["methods"]
    if summaries["baselines"]["reference_scores"]:  # the reference normalises to 1 on average
        assert baselines["full SFT (one-stage mixture)"]["average_normalized_score"]["mean"] == pytest.approx(1.0)
    else:  # 60 tiny steps may learn nothing: then there is no normalised score at all, not a division by 0
        assert all("average_normalized_score" not in m for m in baselines.values())
    # Every record carries the base's LM-loss curve; the scratch control starts from random weights.
    assert main["EPI"]["lm_loss_start"]["mean"] < 4.0 < summaries["scratch"]["methods"]["EPI, from scratch"][
        "lm_loss_start"]["mean"]
    # The matched cell copies CPI-FT's frozen fraction, seed by seed, into its own isolation schedule.
    controls = summaries["controls"]
    for seed, (cpift, matched) in enumerate(zip(controls["runs"]["CPI-FT"],
                                                controls["runs"]["EPI at CPI-FT's frozen fraction"])):
        a = json.loads((tmp_path / "runs" / f"{cpift}.json").read_text())
        b = json.loads((tmp_path / "runs" / f"{matched}.json").read_text())
        assert b["config"]["isolation_schedule"] == [round(f, 6) for f in a["frozen_fraction"]]
        assert b["frozen_fraction"][1:] == pytest.approx(a["frozen_fraction"][1:], abs=2e-3)  # warm-up aside
    diff = summaries["main"]["comparisons"]["EPI vs random mask"]["forgetting"]
    assert diff["n"] == 2 and diff["low"] <= diff["mean"] <= diff["high"]
    assert "plasticity_stage3" in summaries["main"]["comparisons"]["EPI vs full SFT"]
    boundary = main["EPI"]["boundary_overlap"]
    assert boundary["age"]["mean"] >= 5 and 0 <= boundary["at_interval"]["mean"] <= 1
    assert set(summaries["pareto"]["points"]) == {"full SFT", "CPI-FT core 0.01", "CPI-FT core 0.1", "EPI rho 0.1",
                                                  "EPI rho 0.3"}
    assert set(summaries["multitask"]["per_task"]) == {label for label in summaries["multitask"]["methods"]
                                                       if label != "full SFT"}
    assert all(g for g in summaries["multitask"]["methods"]["CPI-FT (its own grouping)"]["groups"])
    drift = summaries["drift"]["methods"]
    assert "across a boundary" in drift["EPI, shifting schedule"]["curves"]
    assert set(drift["EPI, one-stage mixture"]["curves"]) == {"within a stage"}
    # A second call finds every run done and trains nothing.
    logs.clear()
    experiments.run_protocols(["controls"], preset="tiny", seeds=(0, 1), workers=1, out=tmp_path, overrides=tiny,
                              log=logs.append)
    assert logs[0].startswith("0 runs to train")


def test_paired_intervals_state_a_direction_only_when_they_exclude_zero():
    same_sign = paired_difference([0.30, 0.35, 0.32, 0.40, 0.31], [0.25, 0.30, 0.30, 0.33, 0.30])
    assert same_sign["separated"] and same_sign["above"] == 5
    # mean 0.04, sample std 0.024495, t(0.975, df=4) = 2.776: the interval's half-width by hand
    assert same_sign["low"] == pytest.approx(0.04 - 2.776 * 0.024495 / 5 ** 0.5, abs=1e-5)
    mixed = paired_difference([0.30, 0.35, 0.32, 0.40, 0.31], [0.32, 0.30, 0.33, 0.33, 0.30])
    assert not mixed["separated"] and mixed["low"] < 0 < mixed["high"]
    with pytest.raises(ValueError, match="at least 2 seeds"):
        paired_difference([0.1], [0.2])


def test_unknown_protocol_is_refused(capsys):
    assert experiments.main(["everything"]) == 2
    assert "unknown protocol 'everything'" in capsys.readouterr().err


def test_run_grid_reads_back_a_run_an_earlier_notebook_trained(tmp_path, monkeypatch):
    from epi_mini import course
    monkeypatch.setattr(course, "LESSON_RUNS", tmp_path / "lesson_runs")  # not the committed folder
    cells = {"full": dict(method="full", steps_per_stage=5, eval_interval=5)}
    first = course.run_grid(cells, seeds=(0, 1), preset="tiny")
    assert len(list(tmp_path.rglob("*.json"))) == 2

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")
    monkeypatch.setattr(course, "run_many", no_training)
    assert course.run_grid(cells, seeds=(0, 1), preset="tiny") == first
    assert course.lesson_cache(1) != course.lesson_cache(2)  # the thread count changes the numbers: its own folder
    assert course.lesson_cache(1).parent == tmp_path / "lesson_runs"


def test_stage_plasticity_is_named_only_for_stages_every_seed_has():
    # CPI-FT's own grouping can give each seed its own stages (4 groups in one seed, 3 in another): a stage some
    # seed lacks has no paired value, so it is left out rather than failing the whole summary
    from epi_mini.experiments import stage_plasticity_names
    four, three = {"first_stage": [0, 1, 2, 3, 3]}, {"first_stage": [0, 0, 1, 2, 2]}
    assert stage_plasticity_names(four) == [f"plasticity_stage{k}" for k in (1, 2, 3, 4)]
    assert stage_plasticity_names(four, three) == [f"plasticity_stage{k}" for k in (1, 2, 3)]
