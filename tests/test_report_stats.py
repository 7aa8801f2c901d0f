"""The seed statistics of the confirmed results (melora_tune.report.stats), against hand-computed values and scipy."""

from __future__ import annotations

import math

import pytest


def test_mean_ci_of_three_seeds_matches_hand_computed_and_scipy():
    from scipy import stats as st

    from melora_tune.report.stats import mean_ci

    ci = mean_ci([0.70, 0.72, 0.74])
    # mean 0.72; deviations -0.02, 0, 0.02: variance (0.0004 + 0.0004) / 2 = 0.0004, std 0.02;
    # half-width t_{0.975,2} * 0.02 / sqrt(3) = 4.302653 * 0.011547 = 0.049682
    assert ci.n == 3 and ci.mean == pytest.approx(0.72, abs=1e-12) and ci.std == pytest.approx(0.02, abs=1e-12)
    assert ci.half_width == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    assert ci.half_width == pytest.approx(0.0496828, abs=1e-6)
    lo, hi = st.t.interval(0.95, 2, loc=0.72, scale=0.02 / math.sqrt(3))
    assert (ci.lo, ci.hi) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    assert ci.defined and ci.excludes_zero

    wide = mean_ci([0.70, 0.72, 0.74], level=0.99)
    assert wide.half_width == pytest.approx(st.t.ppf(0.995, 2) * 0.02 / math.sqrt(3), rel=1e-9)


def test_mean_ci_one_seed_is_undefined_not_zero_and_nans_are_dropped():
    from melora_tune.report.stats import mean_ci

    one = mean_ci([0.8])
    assert one.n == 1 and one.mean == 0.8
    assert math.isnan(one.std) and math.isnan(one.lo) and math.isnan(one.hi) and not one.defined
    assert not one.excludes_zero and math.isnan(one.half_width)
    assert mean_ci([float("nan"), 0.8]).n == 1
    none = mean_ci([])
    assert none.n == 0 and math.isnan(none.mean)
    same = mean_ci([0.5, 0.5, 0.5])  # no spread: a defined, zero-width interval
    assert same.std == 0 and same.lo == same.hi == 0.5
    with pytest.raises(ValueError):
        mean_ci([1, 2], level=1.0)


def test_paired_difference_is_scipy_ttest_rel_over_the_shared_seeds():
    from scipy import stats as st

    from melora_tune.report.stats import paired_difference

    a = {0: 0.81, 1: 0.84, 2: 0.80, 7: 0.99}  # seed 7: only a has it, left out
    b = {0: 0.78, 1: 0.80, 2: 0.79, 3: 0.50}
    diff = paired_difference(a, b)
    assert diff.seeds == (0, 1, 2) and diff.differences == pytest.approx((0.03, 0.04, 0.01))
    ref = st.ttest_rel([0.81, 0.84, 0.80], [0.78, 0.80, 0.79]).confidence_interval(0.95)
    assert diff.mean == pytest.approx(0.08 / 3) and (diff.lo, diff.hi) == (pytest.approx(ref.low), pytest.approx(ref.high))
    # by hand: d = 0.03, 0.04, 0.01, mean 0.026667; std = sqrt((0.003333^2 + 0.013333^2 + 0.016667^2) / 2) = 0.015275;
    # half-width 4.302653 * 0.015275 / sqrt(3) = 0.037946: the interval -0.011 .. 0.065 includes zero
    assert diff.ci.std == pytest.approx(0.0152753, abs=1e-6)
    assert diff.ci.half_width == pytest.approx(0.037946, abs=1e-6) and not diff.excludes_zero


def test_verdict_sentences():
    from melora_tune.report.stats import paired_difference, verdict

    # excludes zero: d = 0.02, 0.021, 0.022 -> mean 2.1 points, tight interval
    win = paired_difference({0: 0.82, 1: 0.821, 2: 0.822}, {0: 0.80, 1: 0.80, 2: 0.80})
    assert win.excludes_zero
    text = verdict("MELoRA", "LoRA", win, "accuracy")
    assert text.startswith("MELoRA beats LoRA on test accuracy by 2.1 points (95% CI ")
    assert text.endswith("over 3 paired seeds): the interval excludes zero.")
    lo, hi = 100 * win.lo, 100 * win.hi
    assert f"95% CI {lo:.1f} to {hi:.1f} over" in text

    # the same difference the other way round names the winner first
    flipped = verdict("LoRA", "MELoRA", paired_difference({0: 0.80, 1: 0.80, 2: 0.80}, {0: 0.82, 1: 0.821, 2: 0.822}), "accuracy")
    assert flipped.startswith("MELoRA beats LoRA on test accuracy by 2.1 points (95% CI ") and f"{lo:.1f} to {hi:.1f}" in flipped

    # includes zero: d = 0.03, -0.02, 0.01
    tie = paired_difference({0: 0.83, 1: 0.78, 2: 0.81}, {0: 0.80, 1: 0.80, 2: 0.80})
    assert not tie.excludes_zero and tie.lo < 0 < tie.hi
    text = verdict("MELoRA", "LoRA", tie, "accuracy")
    assert text == (f"MELoRA and LoRA cannot be told apart on test accuracy: the 95% CI of MELoRA minus LoRA "
                    f"({100 * tie.lo:.1f} to {100 * tie.hi:.1f} points over 3 paired seeds) includes zero.")

    one = verdict("MELoRA", "LoRA", paired_difference({4: 0.9}, {4: 0.85, 5: 0.8}), "accuracy")
    assert "one seed only: no interval" in one and "5.0 points on seed 4" in one
    assert "share no seed" in verdict("A", "B", paired_difference({1: 0.9}, {2: 0.8}), "accuracy")

    # a correlation is not in [0, 1]: raw differences, no points
    mcc = verdict("A", "B", paired_difference({0: 0.52, 1: 0.53, 2: 0.54}, {0: 0.40, 1: 0.40, 2: 0.40}), "matthews_correlation")
    assert mcc.startswith("A beats B on test MCC by 0.13 (95% CI ") and "points" not in mcc
