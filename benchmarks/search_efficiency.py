"""How much compute each search strategy needs to find a good configuration, replayed on a recorded table.

    python benchmarks/search_efficiency.py --table benchmarks/tables/trec.csv --seeds 20 --concurrency 4 \
        --out benchmarks/tables/ > benchmarks/tables/search_efficiency.txt
    python benchmarks/search_efficiency.py --table benchmarks/tables/trec.csv --seeds 20 --concurrency 1 \
        --out benchmarks/tables/concurrency1/ > benchmarks/tables/search_efficiency_c1.txt

stdout is the result text (deterministic: the committed files above regenerate byte for byte, checked by
tests/test_reproducible.py); the plot's path and the wall time go to stderr. Byte for byte needs the locked
versions (.ci/requirements.lock) and numpy's AVX-512 (X86_V4) float64 log/exp: TPE meets exact ties between
candidates, and numpy's AVX2 kernels differ from those in the last bit, so there TPE breaks some ties otherwise.

Per budget level and strategy: the normalised regret at 10/25/50/100 % of the grid's compute (mean +- standard
error over replay seeds) and the compute needed to come within 0.5 point of y* (median over all replay
seeds, a seed that never gets there counting as infinite; and how many got there); a regret-vs-compute plot (one panel per level) goes to ``--out``. The method
and its conventions are in ``melora_tune/search/replay.py``. ``--synthetic PATH`` writes a made-up table of
the real size (6 configurations x 4 lrs x 2 seeds x 3 epochs per level) to develop and time against.
``--continuous-lr`` replays the search a user runs over a continuous lr range on the table's surrogate
(``melora_tune/search/surrogate.py``); ``--surrogate-loo`` prints that surrogate's leave-one-lr-out errors.
Both leave the default output unchanged.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

FRACTIONS = (0.10, 0.25, 0.50, 1.00)
NEAR = 0.005  # half a point of accuracy, in score units


def synthetic_table(seed: int = 0):
    """A plausible made-up table: per-config quality + lr optimum + seed noise, costs that grow with rank."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    shapes = [("lora", dict(r=1)), ("melora", dict(n=2, r=1)), ("melora", dict(n=8, r=1)),
              ("melora", dict(n=32, r=1)), ("prolora", dict(r=2, u=0, m=2)), ("prolora", dict(r=4, u=0, m=4))]
    for budget, scale in ((9216, 1), (36864, 4)):
        for method, hp in shapes:
            hp = {**hp, "r": hp["r"] * scale}
            full = {"n": 1, "r": 8, "u": 0, "m": 1, **hp}
            full["m_b"] = full["m"]
            quality = rng.uniform(0.80, 0.92)
            best_lr = rng.choice([1.5e-3, 5e-3])
            speed = rng.uniform(20, 40) * (1 + 0.1 * scale)
            for lr in (5e-4, 1.5e-3, 5e-3, 1.5e-2):
                miss = abs(math.log10(lr / best_lr))
                for seed_ in (0, 1):
                    train = eval_ = 0.0
                    for epoch in (1, 2, 3):
                        progress = 1 - 0.5 ** (epoch * (1.5 - miss))
                        val = quality * progress - 0.08 * miss ** 2 + rng.normal(0, 0.01)
                        test = val + rng.normal(0, 0.012)
                        train += speed * rng.uniform(0.95, 1.05)
                        eval_ += 3 * rng.uniform(0.9, 1.1)
                        rows.append(dict(
                            budget=budget, method=method, config=f"{method} lr={lr:g}", **full, lr=lr, alpha=16.0,
                            dropout=0.0, seed=seed_, epoch=epoch, step=38 * epoch, val_score=val, test_score=test,
                            val_loss=1 - val, train_loss=1 - val, train_time_s=train, eval_time_s=eval_,
                            adapter_params=budget, equivalent_rank=full["r"] * full["n"], search="synthetic",
                            run_id=f"r{len(rows)}"))
    return pd.DataFrame(rows)


def mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", default="benchmarks/tables/trec.csv")
    ap.add_argument("--seeds", type=int, default=20, help="replay seeds per strategy and level")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--reduction-factor", type=float, default=3)
    ap.add_argument("--n-startup-trials", type=int, default=6)
    ap.add_argument("--strategies", default=None,
                    help="comma-separated strategies (default: the six rows of replay.STRATEGIES); any registered "
                         "SAMPLER[+SCHEDULER][-stock] also works, e.g. random+fifo")
    ap.add_argument("--out", default="benchmarks/tables/")
    ap.add_argument("--synthetic", metavar="PATH", help="write a synthetic table of the real size there and exit")
    ap.add_argument("--continuous-lr", action="store_true",
                    help="replay a continuous lr (space.lr = the recorded range) on the surrogate of "
                         "melora_tune/search/surrogate.py; the default strategies less grid")
    ap.add_argument("--surrogate-loo", action="store_true",
                    help="print the surrogate's leave-one-lr-out errors (score points) per level and exit")
    args = ap.parse_args()
    if args.synthetic:
        synthetic_table().to_csv(args.synthetic, index=False)
        print(f"wrote {args.synthetic}")
        return

    logging.getLogger("melora_tune.search").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    from melora_tune.search.replay import STRATEGIES, ContinuousLevel, load_table, replay

    strategies = args.strategies.split(",") if args.strategies else list(STRATEGIES)
    t0 = time.perf_counter()
    levels = load_table(args.table)
    if args.surrogate_loo:
        print_loo(levels)
        return
    if args.continuous_lr:
        levels = {budget: ContinuousLevel(level) for budget, level in levels.items()}
        strategies = [s for s in strategies if s != "grid"] if not args.strategies else strategies
        print("continuous lr: space.lr log-uniform over the recorded range; each trial's curves from the surrogate "
              "(melora_tune/search/surrogate.py); compute in units of the recorded grid's")
    curves: dict[int, dict[str, list]] = {}
    for budget, level in levels.items():
        best = level.best
        print(f"\nbudget {budget:,}: {len(level.configs)} configurations, {level.epochs} epochs; grid compute "
              f"{level.grid_compute:,.0f} s; y* = {level.y_star:.4f} ({best.candidate.method} "
              f"{dict(best.candidate.values)} lr={best.key[-3]:g}), y_worst = {level.y_worst:.4f}")
        print(f"  (one point of test score = regret {0.01 / (level.y_star - level.y_worst):.4f})")
        print(f"  {'strategy':<16}" + "".join(f"{f'regret@{f:.0%}':>17}" for f in FRACTIONS)
              + f"  {'compute to 0.5pt':>18}")
        curves[budget] = {}
        for name in strategies:
            runs = [replay(level, name, seed, concurrency=args.concurrency, reduction_factor=args.reduction_factor,
                           n_startup_trials=args.n_startup_trials) for seed in range(args.seeds)]
            curves[budget][name] = runs
            cells = []
            for f in FRACTIONS:
                m, se = mean_se([r.regret_at(f) for r in runs])
                cells.append(f"{m:>9.3f} ± {se:.3f}")
            reached = [r.compute_to(NEAR) for r in runs]
            got = [x for x in reached if math.isfinite(x)]
            median = float(np.median(reached))  # over every replay seed: one that never got there counts as inf
            to = (f"{median:.0%}" if math.isfinite(median) else "never") + f" ({len(got)}/{len(runs)})"
            print(f"  {name:<16}" + "".join(f"{c:>17}" for c in cells) + f"  {to:>18}")
    print("\nregret: (y* - y_inc) / (y* - y_worst) on seed-mean final test scores; negative: the incumbent's test "
          "beats y*. compute to 0.5pt: median over all replay seeds (a seed that never got within 0.005 of y* counts as "
          "infinite), and how many seeds got there.")
    plot(curves, Path(args.out))
    # stderr: stdout is the committed text (benchmarks/tables/*.txt, compared byte for byte by
    # tests/test_reproducible.py), so it holds nothing that changes from run to run or with --out
    print(f"wall time {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def print_loo(levels) -> None:
    """The surrogate's leave-one-lr-out error (melora_tune/search/surrogate.py), validation and test, per level."""
    import pandas as pd

    from melora_tune.search.surrogate import leave_one_lr_out, loo_summary

    pd.set_option("display.width", 160)
    for budget, level in levels.items():
        for which in ("val", "test"):
            print(f"\nbudget {budget:,}, {which} score: leave-one-lr-out error in points (end: an end lr, "
                  "extrapolated; the replay never extrapolates)")
            print(loo_summary(level, which).round(2).to_string(index=False))
        df = leave_one_lr_out(level, "val")
        worst = df[~df.end].sort_values("error", ascending=False).head(5)
        print(f"  worst interior points (val): " + "; ".join(
            f"{r.method} {r.key[1:-2]} lr={r.lr:g} epoch {r.epoch}: {r.error:.1f} pt (actual {r.actual:.1f}, "
            f"predicted {r.predicted:.1f})" for r in worst.itertuples()))


def plot(curves: dict[int, dict[str, list]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0, 1, 201)
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), squeeze=False)
    for ax, (budget, by_strategy) in zip(axes[0], curves.items()):
        lowest = 0.0
        for name, runs in by_strategy.items():
            ys = np.array([[r.regret_at(x) for x in grid] for r in runs])
            mean = ys.mean(axis=0)
            se = ys.std(axis=0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else np.zeros_like(mean)
            lowest = min(lowest, float((mean - se).min()))
            ax.step(grid, mean, where="post", label=name)
            ax.fill_between(grid, mean - se, mean + se, step="post", alpha=0.2)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_yscale("symlog", linthresh=0.01)  # the interesting part is regret near 0: linear below 0.01
        ax.set_ylim(bottom=min(lowest, 0.0) - 0.001, top=1.05)
        ax.set_title(f"budget {budget:,} params")
        ax.set_xlabel("compute / grid compute")
        ax.set_ylabel("normalised regret (seed-mean test)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "search_efficiency.png"
    fig.savefig(path, dpi=120)
    print(f"plot: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
