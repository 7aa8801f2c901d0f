"""Seed statistics of the confirmed results: a mean with its Student-t interval, paired differences, a verdict.

A configuration retrained on seeds s = 1..n gives scores x_1..x_n. With

    mean  x̄ = (1/n) Σ x_s
    std   s = sqrt( Σ (x_s - x̄)² / (n - 1) )          (ddof = 1: the unbiased variance)

the level-L confidence interval of the expected score is

    x̄ ± t_{(1+L)/2, n-1} · s / sqrt(n)

with t_{q, k} the q-quantile of Student's t with k degrees of freedom (n = 3, L = 0.95:
t_{0.975, 2} = 4.3027). It assumes the seeds' scores are independent draws of one normal
distribution; with a handful of seeds it is wide, which is the honest answer. One seed has no
spread to estimate, so its std and interval are NaN (undefined), never 0.

Two methods retrained on the same seeds are compared pairwise: d_s = a_s - b_s over the seeds both
have, and the interval above over the d_s (the paired t-test's interval, ``scipy.stats.ttest_rel``).
Pairing removes what the seed does to both (data order, initialisation), so it is narrower than
comparing the two means. The interval excluding zero is the two-sided paired t-test rejecting
"no difference" at 1 - L.

Pure numpy/scipy: nothing here knows MLflow or the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping

import numpy as np

# Metrics bounded in [0, 1]: a difference reads best as points (100 x). Others (correlations in [-1, 1],
# minus a loss) are shown as raw differences.
UNIT_METRICS = ("accuracy", "f1", "f1_macro")
METRIC_LABELS = {"f1": "F1", "f1_macro": "macro F1", "matthews_correlation": "MCC", "pearson": "Pearson r",
                 "spearmanr": "Spearman rho"}


@dataclass(frozen=True)
class Interval:
    """A sample's mean with its Student-t confidence interval (``mean_ci``)."""

    n: int
    mean: float
    std: float  # ddof = 1; NaN when n < 2
    lo: float  # NaN when n < 2
    hi: float
    level: float = 0.95

    @property
    def defined(self) -> bool:
        """Whether there is an interval at all (at least two values)."""
        return self.n >= 2 and math.isfinite(self.lo) and math.isfinite(self.hi)

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2 if self.defined else math.nan

    @property
    def excludes_zero(self) -> bool:
        return self.defined and (self.lo > 0 or self.hi < 0)


def mean_ci(values: Iterable[float], level: float = 0.95) -> Interval:
    """Mean, std (ddof=1) and the Student-t interval x̄ ± t_{(1+level)/2, n-1}·s/√n of the finite values.

    NaNs (a seed that has no score) are dropped; n counts what is left. n = 0: everything NaN;
    n = 1: the mean, with std and interval NaN (one value says nothing about the spread).
    """
    from scipy import stats  # heavy: SciPy

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = np.asarray([float(v) for v in values], dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan, level)
    mean = float(x.mean())
    if n == 1:
        return Interval(1, mean, math.nan, math.nan, math.nan, level)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half, level)


@dataclass(frozen=True)
class PairedDifference:
    """a - b seed by seed (``paired_difference``): the seeds both have, the differences, their interval."""

    seeds: tuple
    differences: tuple[float, ...]
    ci: Interval

    @property
    def n(self) -> int:
        return self.ci.n

    @property
    def mean(self) -> float:
        return self.ci.mean

    @property
    def lo(self) -> float:
        return self.ci.lo

    @property
    def hi(self) -> float:
        return self.ci.hi

    @property
    def level(self) -> float:
        return self.ci.level

    @property
    def excludes_zero(self) -> bool:
        """The interval lies entirely on one side of zero: the paired t-test tells a and b apart."""
        return self.ci.excludes_zero


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float], level: float = 0.95) -> PairedDifference:
    """d_s = a_s - b_s over the seeds s both have (with a finite score each), and ``mean_ci`` of the d_s.

    Seeds only one side has are left out: an unpaired seed would bring back the seed-to-seed variation
    pairing is there to remove.
    """
    def ok(v) -> bool:
        return v is not None and math.isfinite(float(v))

    seeds = tuple(sorted((s for s in a if s in b and ok(a[s]) and ok(b[s])), key=_seed_order))
    diffs = tuple(float(a[s]) - float(b[s]) for s in seeds)
    return PairedDifference(seeds, diffs, mean_ci(diffs, level))


def _seed_order(seed):
    # Seeds are ints in practice; anything else sorts after them, by its text, so the order is stable.
    return (0, seed, "") if isinstance(seed, (int, np.integer)) else (1, 0, str(seed))


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def in_points(metric: str) -> bool:
    """Whether differences of this metric are shown as points (100 x): the metric lies in [0, 1]."""
    return metric in UNIT_METRICS


def format_difference(value: float, metric: str) -> str:
    """'2.1' (points, for metrics in [0, 1]) or '0.0213' (the raw difference)."""
    if not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.1f}" if in_points(metric) else f"{value:.3g}"


def verdict(name_a: str, name_b: str, diff: PairedDifference, metric: str, split: str = "test") -> str:
    """One sentence on a paired comparison of a vs b (``diff`` = a - b), e.g.

    "MELoRA beats LoRA on test accuracy by 2.1 points (95% CI 0.4 to 3.8 over 3 paired seeds): the interval
    excludes zero."

    The winner is named first, so a negative difference reads "b beats a by ..." with the interval turned
    around. An interval that includes zero reads "cannot be told apart"; one seed gives no interval.
    """
    what = f"{split} {metric_label(metric)}"
    unit = " points" if in_points(metric) else ""
    pct = f"{100 * diff.level:g}%"
    if diff.n == 0:
        return f"{name_a} and {name_b} share no seed with a {what} score: no paired comparison."
    if diff.n == 1:
        return (f"{name_a} vs {name_b} on {what}: one seed only: no interval "
                f"({name_a} minus {name_b} = {format_difference(diff.mean, metric)}{unit} on seed {diff.seeds[0]}).")
    seeds = f"over {diff.n} paired seeds"
    if diff.excludes_zero:
        win, lose, mean, lo, hi = ((name_a, name_b, diff.mean, diff.lo, diff.hi) if diff.mean > 0
                                   else (name_b, name_a, -diff.mean, -diff.hi, -diff.lo))
        return (f"{win} beats {lose} on {what} by {format_difference(mean, metric)}{unit} "
                f"({pct} CI {format_difference(lo, metric)} to {format_difference(hi, metric)} {seeds}): "
                "the interval excludes zero.")
    return (f"{name_a} and {name_b} cannot be told apart on {what}: the {pct} CI of {name_a} minus {name_b} "
            f"({format_difference(diff.lo, metric)} to {format_difference(diff.hi, metric)}{unit} {seeds}) includes zero.")
