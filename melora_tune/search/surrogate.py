"""A continuous learning rate for the replay: a surrogate per configuration shape and epoch over log10(lr).

The model
---------
A table records each shape (method, n, r, u, m, m_b, alpha, dropout) at a few learning rates l_1 < ... < l_K
(trec.csv: 4), each with the same seeds s = 1..S, per epoch e. With x = log10(lr) and y_{k,s,e} a recorded
score (validation or test):

* the seed-mean curve mu_e(x) is the monotone piecewise-cubic Hermite interpolant (PCHIP, Fritsch-Carlson;
  ``scipy.interpolate.PchipInterpolator``) through (x_k, mean_s y_{k,s,e}). It passes through every recorded
  seed mean, and between two recorded lrs it stays within their values (no overshoot), so the surrogate never
  invents an optimum between recorded points that a search could then exploit. With 4 points there is nothing
  to spare for a smoothing spline or a GP's noise level; averaging the seeds is the smoothing.
* seed s's residual r_{s,e}(x) is linear in x between the recorded residuals y_{k,s,e} - mu_e(x_k).
* a replayed trial at lr draws a recorded seed s (as the discrete replay does) and sees
  y_{s,e}(x) = mu_e(x) + r_{s,e}(x): at a recorded lr exactly the recorded row; in between, the seed-mean
  curve plus that seed's noise, interpolated. The seed mean of y_{s,e}(x) is mu_e(x) (linear interpolation
  keeps the residuals' zero sum), which is what the replay scores an incumbent by.
* the cost of an epoch, linear in x per seed between the recorded costs.

Outside [l_1, l_K] nothing is recorded: the replay's space.lr is exactly that range.

Validation: leave one lr out
----------------------------
For each shape, epoch and k, refit mu_e on the other K - 1 lrs and predict the left-out seed mean:
error = 100 * |mu_e^{-k}(x_k) - mean_s y_{k,s,e}| (score points). At an end lr (k = 1 or K) this is an
extrapolation, which the surrogate never does in a replay: it is reported, with the nearest recorded value
held constant as the prediction, and kept apart from the interior points, which are what the replay's
interpolation actually rests on. The seed spread 100 * |y_{k,1,e} - y_{k,2,e}| / 2 (half the seed range)
sits beside it as the scale of the noise the table already has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.interpolate import PchipInterpolator

# the columns of a shape key (KEY_COLUMNS of the replay, less lr): replay.KEY_COLUMNS is
# (method, *HYPERPARAMS, lr, alpha, dropout); lr sits third from the end
LR_POSITION = -3


def shape_of(key: tuple) -> tuple:
    """A table configuration key without its learning rate."""
    return key[:LR_POSITION] + key[LR_POSITION + 1:]


def with_lr(shape: tuple, lr: float) -> tuple:
    return shape[:len(shape) + LR_POSITION + 1] + (float(lr),) + shape[len(shape) + LR_POSITION + 1:]


def pchip(x: np.ndarray, y: np.ndarray):
    """PCHIP through (x, y) (a line through two points); ``y`` may have trailing dimensions."""
    return PchipInterpolator(x, y, axis=0, extrapolate=False)


def interp_linear(x: np.ndarray, ys: np.ndarray, at: float) -> np.ndarray:
    """ys[k, ...] linear in x, at one x (clamped to [x_1, x_K])."""
    at = min(max(at, x[0]), x[-1])
    j = int(np.searchsorted(x, at, side="right")) - 1
    j = min(max(j, 0), len(x) - 2)
    w = (at - x[j]) / (x[j + 1] - x[j])
    return (1 - w) * ys[j] + w * ys[j + 1]


@dataclass
class ShapeCurves:
    """One shape's recorded curves: arrays [lr, seed, epoch] over increasing lrs."""

    shape: tuple
    lrs: np.ndarray
    seeds: list[int]
    val: np.ndarray
    test: np.ndarray
    cost: np.ndarray
    step: np.ndarray  # [seed, epoch] of the first lr (the optimizer step does not depend on lr)

    @property
    def x(self) -> np.ndarray:
        return np.log10(self.lrs)

    def mean_curve(self, which: str):
        """mu_e(x) for every epoch at once: a PCHIP of the seed means [lr, epoch]."""
        return pchip(self.x, getattr(self, which).mean(axis=1))

    def at(self, lr: float) -> dict[str, np.ndarray]:
        """The [seed, epoch] arrays a trial at ``lr`` sees: val, test (mu + the seed's residual), cost, step."""
        x = math.log10(lr)
        if not self.x[0] - 1e-9 <= x <= self.x[-1] + 1e-9:
            raise ValueError(f"lr={lr:g} is outside the recorded range [{self.lrs[0]:g}, {self.lrs[-1]:g}]")
        x = min(max(x, self.x[0]), self.x[-1])
        out = {}
        for which in ("val", "test"):
            rec = getattr(self, which)
            means = rec.mean(axis=1)  # [lr, epoch]
            mu = self.mean_curve(which)(x)  # [epoch]
            resid = interp_linear(self.x, rec - means[:, None, :], x)  # [seed, epoch]
            out[which] = mu[None, :] + resid
        out["cost"] = interp_linear(self.x, self.cost, x)
        out["step"] = self.step
        return out


def shape_curves(level) -> dict[tuple, ShapeCurves]:
    """Every shape of a replay ``Level`` with its curves over the recorded lrs (ValueError if seeds, epochs or
    steps differ between a shape's lrs, or a shape has fewer than two lrs)."""
    by_shape: dict[tuple, list] = {}
    for key, cfg in level.configs.items():
        by_shape.setdefault(shape_of(key), []).append((key[LR_POSITION], cfg))
    out = {}
    for shape, items in sorted(by_shape.items()):
        items.sort(key=lambda kv: kv[0])
        if len(items) < 2:
            raise ValueError(f"{shape}: a continuous lr needs at least two recorded lrs, the table has one")
        cfgs = [c for _, c in items]
        if any(c.seeds != cfgs[0].seeds for c in cfgs) or any(not np.array_equal(c.step, cfgs[0].step) for c in cfgs):
            raise ValueError(f"{shape}: its lrs were recorded with different seeds or steps")
        out[shape] = ShapeCurves(shape, np.array([lr for lr, _ in items]), cfgs[0].seeds,
                                 np.stack([c.val for c in cfgs]), np.stack([c.test for c in cfgs]),
                                 np.stack([c.cost for c in cfgs]), cfgs[0].step)
    return out


def leave_one_lr_out(level, which: str = "val") -> pd.DataFrame:
    """One row per (shape, epoch, left-out lr): the error in points of mu_e refitted without that lr, whether
    it was an end (extrapolated: nearest value held), and the seed spread there (module doc)."""
    rows = []
    for shape, sc in shape_curves(level).items():
        rec = getattr(sc, which)
        means = rec.mean(axis=1)  # [lr, epoch]
        K = len(sc.lrs)
        for k in range(K):
            keep = [j for j in range(K) if j != k]
            end = k in (0, K - 1)
            if end:
                pred = means[keep[0] if k == 0 else keep[-1]]
            elif len(keep) >= 2:
                pred = pchip(sc.x[keep], means[keep])(sc.x[k])
            for e in range(rec.shape[2]):
                rows.append(dict(method=shape[0], key=shape, epoch=e + 1, lr=float(sc.lrs[k]), end=end,
                                 actual=100 * means[k, e], predicted=100 * float(pred[e]),
                                 error=100 * abs(float(pred[e]) - means[k, e]),
                                 seed_spread=100 * float(np.ptp(rec[k, :, e])) / 2))
    return pd.DataFrame(rows)


def loo_summary(level, which: str = "val") -> pd.DataFrame:
    """Mean and max leave-one-lr-out error in points per epoch, interior lrs and end lrs apart."""
    df = leave_one_lr_out(level, which)
    return (df.groupby(["end", "epoch"])
            .agg(points=("error", "size"), mean_error=("error", "mean"), max_error=("error", "max"),
                 mean_seed_spread=("seed_spread", "mean"))
            .reset_index())
