"""Tests of the continual-learning metrics on hand-computed matrices. Run: python -m pytest tests/test_metrics.py -q"""
import pytest

from epi_mini import metrics

# Three stages, three tasks, task j introduced in stage j (the classic stream).
R = [[0.9, 0.1, 0.0],
     [0.5, 0.8, 0.1],
     [0.3, 0.6, 0.7]]
FIRST = [0, 1, 2]


def test_average_score():
    assert metrics.average_score(R) == pytest.approx((0.3 + 0.6 + 0.7) / 3)


def test_forgetting_uses_the_best_earlier_score():
    # task 0: max(0.9, 0.5) - 0.3 = 0.6 ; task 1: max(0.8) - 0.6 = 0.2 ; task 2 is the last stage's
    assert metrics.forgetting_per_task(R, FIRST) == pytest.approx({0: 0.6, 1: 0.2})
    assert metrics.forgetting(R, FIRST) == pytest.approx(0.4)
    # A peak after the task's own stage counts (Mammoth / Chaudhry), not just the first value.
    # task 0: max(0.2, 0.6) - 0.1 = 0.5 ; task 1 improved: 0.5 - 0.9 = -0.4 (negative forgetting)
    assert metrics.forgetting([[0.2, 0.0], [0.6, 0.5], [0.1, 0.9]], [0, 1]) == pytest.approx((0.5 - 0.4) / 2)


def test_backward_transfer():
    # (0.3 - 0.9 + 0.6 - 0.8) / 2
    assert metrics.backward_transfer(R, FIRST) == pytest.approx(-0.4)


def test_plasticity_is_new_task_score_at_end_of_its_stage():
    assert metrics.plasticity(R, FIRST) == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    # Two tasks introduced together in stage 0 are averaged first.
    assert metrics.plasticity([[0.4, 0.6, 0.0], [0.1, 0.2, 0.9]], [0, 0, 1]) == pytest.approx((0.5 + 0.9) / 2)


def test_single_stage_has_no_forgetting():
    assert metrics.forgetting([[0.5, 0.7]], [0, 0]) == 0.0
    assert metrics.backward_transfer([[0.5, 0.7]], [0, 0]) == 0.0


def test_retention_is_final_over_best():
    # task 0: 0.3 / 0.9 ; task 1: 0.6 / 0.8
    assert metrics.retention(R, FIRST) == pytest.approx((0.3 / 0.9 + 0.6 / 0.8) / 2)
    assert metrics.retention([[0.0, 0.5], [0.0, 0.5]], [0, 1]) == 1.0  # nothing ever learned: nothing lost


def test_average_normalized_score():
    assert metrics.average_normalized_score({"a": 0.4, "b": 0.9}, {"a": 0.8, "b": 0.9}) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="reference score"):
        metrics.average_normalized_score({"a": 0.4}, {"a": 0.0})


def test_accuracy_matrix_and_summary():
    rows = [{"x": 0.5, "y": 0.1}, {"x": 0.2, "y": 0.9}]
    assert metrics.accuracy_matrix(rows, ["y", "x"]).tolist() == [[0.1, 0.5], [0.9, 0.2]]
    s = metrics.summarize(R, FIRST)
    assert set(s) == {"average_score", "forgetting", "backward_transfer", "plasticity"}
    assert metrics.mean_and_spread([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))


def test_figures_match_tolerates_the_last_digit_but_not_a_real_change():
    committed = {"frozen_fraction": 0.09333333333333413, "values": [0.25, float("nan")], "label": "EPI", "n": 5}
    kernel_noise = {"frozen_fraction": 0.09333333333333411, "values": [0.25 + 1e-12, float("nan")], "label": "EPI",
                    "n": 5}
    assert metrics.figures_match(kernel_noise, committed) == []
    real = {**kernel_noise, "frozen_fraction": 0.09333333333333413 + 1e-4}
    assert metrics.figures_match(real, committed) == [f"/frozen_fraction: {0.09333333333333413 + 1e-4!r} != "
                                                      f"{0.09333333333333413!r}"]
    assert metrics.figures_match({**kernel_noise, "label": "CPI-FT"}, committed)      # strings: exact
    assert metrics.figures_match({**kernel_noise, "values": [0.25]}, committed)       # lengths: exact
    assert metrics.figures_match({**kernel_noise, "extra": 1}, committed)             # keys: exact


def test_the_frozen_fraction_does_not_depend_on_a_blas_kernel():
    record = {"frozen_fraction": [0.08, 0.1, 0.1], "schedule": {"stages": [{"steps": 500}] * 3}}
    assert metrics.record_metric(record, "frozen_fraction") == pytest.approx(0.28 / 3, abs=1e-15)
