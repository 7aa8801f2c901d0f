"""The replay simulator against schedules computed by hand on tiny synthetic tables."""

from __future__ import annotations

import pandas as pd
import pytest
from optuna.trial import TrialState

from melora_tune.search.replay import load_table, replay

LR = 1e-3

# four LoRA configurations A..D (r = 1, 2, 4, 8), one seed: val per epoch, final test, cost per epoch
CURVES = {
    "A": dict(r=1, val=(0.50, 0.60, 0.65), test=0.70, cost=(10, 10, 10)),
    "B": dict(r=2, val=(0.60, 0.70, 0.75), test=0.72, cost=(15, 15, 15)),
    "C": dict(r=4, val=(0.40, 0.50, 0.55), test=0.50, cost=(5, 5, 5)),
    "D": dict(r=8, val=(0.70, 0.62, 0.66), test=0.80, cost=(1, 2, 3)),
}
ORDER = [{"method": "lora", "r": CURVES[k]["r"], "lr": LR} for k in "ABCD"]  # trial ids 00000..00003


def rows(curves: dict, seed: int = 0, lr: float = LR, budget: int = 1000) -> list[dict]:
    out = []
    for c in curves.values():
        spent = 0.0
        for e, (val, cost) in enumerate(zip(c["val"], c["cost"]), start=1):
            spent += cost
            out.append(dict(budget=budget, method="lora", n=1, r=c["r"], u=0, m=1, m_b=1, lr=lr, alpha=16.0,
                            dropout=0.0, seed=seed, epoch=e, step=10 * e, val_score=val,
                            test_score=c["test"] if e == 3 else val, train_time_s=spent * 0.8,
                            eval_time_s=spent * 0.2, adapter_params=100 * c["r"], equivalent_rank=c["r"]))
    return out


@pytest.fixture(scope="module")
def level():
    return load_table(pd.DataFrame(rows(CURVES)))[1000]


def schedule(run):
    return [(e.time, e.compute, e.trial_id, e.epoch, e.decision, e.ended) for e in run.events]


def test_asha_rf2_concurrency2_by_hand(level):
    # rf 2, grace 1, max_t 3: rungs at epochs 1 and 2; cutoff = median of the rung; A, B start at t=0.
    run = replay(level, "random+asha", 0, concurrency=2, reduction_factor=2, num_samples=4, points=ORDER,
                 max_fraction=10)
    assert schedule(run) == [
        (10, 20, "00000", 1, "CONTINUE", None),       # rung 1 empty
        (15, 30, "00001", 1, "CONTINUE", None),       # 0.6 >= cutoff 0.5
        (20, 40, "00000", 2, "CONTINUE", None),       # rung 2 empty
        (30, 60, "00000", 3, "CONTINUE", "completed"),  # ties at t=30 go to the earlier trial; C starts
        (30, 60, "00001", 2, "CONTINUE", None),       # 0.7 >= 0.6
        (35, 70, "00002", 1, "STOP", "stopped_early"),  # 0.4 < median(0.5, 0.6); D starts
        (36, 72, "00003", 1, "CONTINUE", None),       # 0.7 >= median(0.5, 0.6, 0.4)
        (38, 76, "00003", 2, "STOP", "stopped_early"),  # 0.62 < median(0.6, 0.7); one worker idle from here
        (45, 83, "00001", 3, "CONTINUE", "completed"),
    ]
    assert [run.trials[t][0][2] for t in sorted(run.trials)] == [1, 2, 4, 8]


def test_asha_rf3_concurrency1_by_hand(level):
    # rf 3: rungs at epochs 1 and 3, cutoff = the 66.7th percentile (numpy's linear interpolation).
    run = replay(level, "random+asha", 0, concurrency=1, reduction_factor=3, num_samples=4, points=ORDER,
                 max_fraction=10)
    assert schedule(run) == [
        (10, 10, "00000", 1, "CONTINUE", None),
        (20, 20, "00000", 2, "CONTINUE", None),       # no rung at 2
        (30, 30, "00000", 3, "CONTINUE", "completed"),
        (45, 45, "00001", 1, "CONTINUE", None),       # 0.6 >= 0.5
        (60, 60, "00001", 2, "CONTINUE", None),
        (75, 75, "00001", 3, "CONTINUE", "completed"),  # 0.75 >= 0.65
        (80, 80, "00002", 1, "STOP", "stopped_early"),  # 0.4 < 0.5667
        (81, 81, "00003", 1, "CONTINUE", None),       # 0.7 >= 0.5333
        (83, 83, "00003", 2, "CONTINUE", None),
        (86, 86, "00003", 3, "STOP", "completed"),    # 0.66 < 0.7167, but it already reached max_t
    ]


def test_regret_bookkeeping_by_hand(level):
    # y* = B's test (best final val 0.75) = 0.72, y_worst = C's 0.50; grid compute = 30+45+15+6 = 96
    assert (level.y_star, level.y_worst, level.grid_compute) == (0.72, 0.50, 96)
    run = replay(level, "random+asha", 0, concurrency=2, reduction_factor=2, num_samples=4, points=ORDER,
                 max_fraction=10)
    a = (0.72 - 0.70) / 0.22  # A is the incumbent from t=30 (compute 60) until B completes (compute 83)
    expected = [(60, a), (60, a), (70, a), (72, a), (76, a), (83, 0.0), (83, 0.0)]  # the last: where it ended
    assert [(at * 96, r) for at, r in run.trace] == [(pytest.approx(c), pytest.approx(r)) for c, r in expected]
    assert run.regret_at(0.5) == 1.0  # nothing has ended yet
    assert run.regret_at(0.65) == pytest.approx(a)
    assert run.regret_at(1.0) == 0.0
    assert run.compute_to(0.005) == pytest.approx(83 / 96)
    assert level.regret(0.80) == pytest.approx(-0.08 / 0.22)  # better test than y*: negative, sign kept


def test_budget_cut_and_seed_means():
    # two seeds: X's seed 0 validates best, but Y has the better seed MEAN, so Y is the best configuration
    x = {"X": dict(r=1, val=(0.5, 0.6, 0.90), test=0.60, cost=(1, 1, 1))}
    x1 = {"X": dict(r=1, val=(0.5, 0.6, 0.50), test=0.70, cost=(3, 3, 3))}
    y = {"Y": dict(r=2, val=(0.5, 0.6, 0.72), test=0.75, cost=(2, 2, 2))}
    level = load_table(pd.DataFrame(rows(x) + rows(x1, seed=1) + rows(y) + rows(y, seed=1)))[1000]
    assert level.best.candidate.r == 2
    assert (level.y_star, level.y_worst) == pytest.approx((0.75, 0.65))  # X's test is its seed mean
    assert level.grid_compute == pytest.approx((3 + 9) / 2 + 6)
    # half the grid's compute (6 worker-seconds): with one worker the first trial's last epoch is cut off
    run = replay(level, "random", 0, concurrency=1, max_fraction=0.5)
    assert all(e.time < 6 for e in run.events)
    assert sum(1 for e in run.events if e.ended) <= 1
    if run.trace:
        assert run.trace[-1][0] == pytest.approx(0.5)


def test_grid_visits_every_configuration_once():
    curves = dict(CURVES)
    level = load_table(pd.DataFrame(rows(curves) + rows(curves, lr=3e-3)))[1000]
    run = replay(level, "grid", 3, concurrency=2, max_fraction=10)
    keys = [k for k, _ in run.trials.values()]
    assert sorted(keys) == sorted(level.configs) and len(keys) == 8
    assert sum(1 for e in run.events if e.ended == "completed") == 8


def test_stock_and_fidelity_tell_a_stopped_trial_differently(level):
    kwargs = dict(concurrency=2, reduction_factor=2, num_samples=4, points=ORDER, max_fraction=10)
    stock = replay(level, "tpe+asha-stock", 0, **kwargs).searcher._ot_study.get_trials()
    ours = replay(level, "tpe+asha", 0, **kwargs).searcher._ot_study.get_trials()
    # C stopped at epoch 1 (0.4), D at epoch 2 (0.62); A and B completed
    assert [(t.state, t.value) for t in stock] == [(TrialState.COMPLETE, 0.65), (TrialState.COMPLETE, 0.75),
                                                   (TrialState.COMPLETE, 0.4), (TrialState.COMPLETE, 0.62)]
    assert [t.state for t in ours] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert [t.value for t in ours[:2]] == [0.65, 0.75]
    # stock reports at training_iteration, ours at the optimizer step, including the stopping result
    assert stock[3].intermediate_values == {1: 0.7}  # Tune skips on_trial_result on the STOP result
    assert ours[3].intermediate_values == {10: 0.7, 20: 0.62}
    assert ours[2].intermediate_values == {10: 0.4}
