"""The strategy protocol (issue 24): choose the default search strategy on one table, report it on a held-out one.

    python benchmarks/protocol.py --tune benchmarks/tables/trec.csv \
        --heldout benchmarks/tables/rotten_tomatoes.csv --seeds 50 --out benchmarks/tables/protocol/ \
        > benchmarks/tables/protocol.txt

stdout is the committed text (deterministic for the locked versions: every replay is seeded); the plots and the
per-seed numbers (``protocol.json``) go to ``--out``, the wall time to stderr.

What is replayed (``melora_tune/search/replay.py`` has the simulator and its conventions)
-----------------------------------------------------------------------------------------
* **The search a user runs**: a continuous learning rate (log-uniform over the recorded range) on the table's
  surrogate (``ContinuousLevel``, ``melora_tune/search/surrogate.py``), every other hyperparameter as recorded;
  ASHA and Hyperband with the product's defaults (grace period 1 epoch, reduction factor 2); 4 random trials
  before a model (``n_startup_trials``); nothing re-run in a finite space.
* **Two ways to search a budget level**:
  ``level``: one study over every method (what a search without cells does: it answers "which configuration is
  best"); regret and "within 0.5 point" against the level's best.
  ``cells``: the product's fair comparison, one study and one scheduler per method (``search/cell_search.py``);
  each cell is replayed on its own (its trials see only its own results), and the search is "within 0.5 point"
  once EVERY cell is within 0.5 point of its own best: the compute that takes is the sum over cells of each
  cell's compute to get there (cells share no results, so their compute adds up, whatever the interleaving).
  Trials are dealt round-robin, so with ``c`` workers and ``k`` cells a cell runs about ``c / k`` trials at
  once: replayed with ``max(1, round(c / k))``.
* **Compute** is a fraction of the level's grid compute: one training of every recorded configuration (shape
  x recorded lr), the seed-mean cost. "Within 0.5 point": the incumbent's seed-mean final test score is within
  0.005 of y*, the seed-mean final test score of the configuration (shape, lr on a dense grid) with the best
  seed-mean final validation score. Each replay stops at half the grid's compute; median over replay seeds, a
  seed that did not get there by then counting as infinite (">50%").
* **Choosing the default** on the tune table: the strategy with the lowest mean over its levels of the median
  compute in ``cells`` mode at 4 workers (the product's mode), then of the same to within 1 point (``cells1``:
  every cell within 1 point of its own best; on a 300-example test split 0.5 point is less than two questions,
  finer than the seeds' spread); a strategy within 0.01 of it that comes earlier in the list (cheaper to run:
  random before models) wins the tie. It is then reported on the held-out table
  against random + ASHA.
* **Levels** (``--levels``): by default the tune table's levels that the held-out table also holds, so the default
  is chosen at the budgets where it is then reported (every level with ``--heldout none``); ``all`` replays every
  level of both tables, or give budgets (``--levels 9216,36864``).
* **Warm start** (``search/warm_start.py``): each cell of the held-out table begins with the tune table's best
  configurations of the same method and level (the 2 best by seed-mean final validation score, recorded lr
  kept: what ``warm_start`` enqueues for a cell of 6 trials), against the same search cold.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from melora_tune.search.replay import ContinuousLevel, load_table, replay
from melora_tune.search.surrogate import shape_of

STRATEGIES = ("random+asha", "tpe+asha", "gp+asha", "random+hyperband", "tpe+hyperband", "bohb+hyperband",
              "syne-bohb+asha", "syne-bohb+hyperband", "grid")
# grid: every recorded configuration once, in Optuna's BruteForceSampler order, on the recorded lrs (the only
# strategy not on the continuous lr: a user's grid is a list of learning rates)
BASELINE = "random+asha"
CONCURRENCY = (1, 4)
NEAR = 0.005
NEAR_1PT = 0.01  # the secondary view: per cell, 0.5 point is finer than the test split's noise (1 question = 0.33 pt)
FRACTIONS = (0.05, 0.10, 0.25, 0.50)
HORIZON = 0.5  # each replay stops at half the grid's compute: the goals are at 10 %, and GP's cost grows with trials
CURVE = np.linspace(0, HORIZON, 101)
WARM_K = 2
SETTINGS = dict(reduction_factor=2, grace_period=1, n_startup_trials=4)

_levels: dict[str, dict] = {}


def _quiet() -> None:
    logging.getLogger("melora_tune.search").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


def levels_of(table: str) -> dict:
    """Budget -> (the continuous level, its cells as continuous levels), cached per process."""
    if table not in _levels:
        _levels[table] = {b: (ContinuousLevel(lv), {m: ContinuousLevel(c) for m, c in lv.cells().items()})
                          for b, lv in load_table(table).items()}
    return _levels[table]


def chosen_levels(spec: str, tune: str, heldout: str | None) -> set[int]:
    """The budgets ``--levels`` keeps (see the module docstring); ValueError for a spec that is none of them."""
    every = set(levels_of(tune)) | (set(levels_of(heldout)) if heldout else set())
    if spec == "all" or (spec == "shared" and heldout is None):
        return every
    if spec == "shared":
        return set(levels_of(tune)) & set(levels_of(heldout))
    try:
        return {int(b.replace("_", "")) for b in spec.split(",")}
    except ValueError:
        raise ValueError(f"--levels {spec!r}: give shared, all, or budgets such as 9216,36864") from None


def warm_points(source: str, target: str, budget: int) -> dict[str, list[dict]]:
    """Per method: the source table's best configurations at the nearest level (shape + recorded lr) that the
    target level also holds; what ``warm_start`` enqueues, read from the table instead of a study."""
    src_levels = levels_of(source)
    _, src_cells = src_levels[min(src_levels, key=lambda b: (abs(math.log(b / budget)), b))]
    target_shapes = {shape_of(k) for k in levels_of(target)[budget][0].discrete.configs}
    out: dict[str, list[dict]] = {}
    for method, cell in src_cells.items():
        ranked = sorted(cell.discrete.configs.values(), key=lambda c: (-c.final_val, c.key))
        fits = [c for c in ranked if shape_of(c.key) in target_shapes][:WARM_K]
        out[method] = [{"method": method, **dict(c.candidate.values), "lr": c.key[-3]} for c in fits]
    return out


def run_task(task: tuple, prior: list[dict] | None = None) -> dict:
    """One (table, budget, mode, cell, strategy, concurrency, warm) over ``seeds`` replay seeds (``prior``: another
    table's results added once the first point is trained, ``replay.make_searcher``; benchmarks/warm_curve.py)."""
    table, budget, mode, method, strategy, conc, points, seeds, warm = task
    _quiet()
    level, cells = levels_of(table)[budget]
    target = level if method is None else cells[method]
    rows = []
    for seed in range(seeds):
        if strategy == "grid":
            run = replay(target.discrete, strategy, seed, concurrency=conc, max_fraction=HORIZON, points=points,
                         **SETTINGS)
            # scored like every other row: against the continuous level's y* and y_worst (the dense lr grid's)
            d = target.discrete
            run.trace = [(at, target.regret(d.y_star - r * (d.y_star - d.y_worst))) for at, r in run.trace]
            run.level = target
        else:
            run = replay(target, strategy, seed, concurrency=conc, max_fraction=HORIZON, points=points, prior=prior,
                         **SETTINGS)
        rows.append({"to": run.compute_to(NEAR), "to1": run.compute_to(NEAR_1PT), "at": [run.regret_at(f) for f in FRACTIONS],
                     "curve": [run.regret_at(x) for x in CURVE], "trials": len(run.trials)})
    return {"task": task[:6], "warm": warm, "grid": target.grid_compute, "rows": rows}


def fmt(x: float) -> str:
    return f"{x:.0%}" if math.isfinite(x) else f">{HORIZON:.0%}"


def median(values) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


def effective(table: str, budget: int, mode: str, conc: int) -> int:
    """Trials at once within what is replayed: all of them for a level; about ``conc / cells`` for one cell."""
    return conc if mode == "level" else max(1, round(conc / len(levels_of(table)[budget][1])))


def keys(table: str, budget: int, strategy: str, conc: int, warm: bool) -> list[tuple]:
    """The result keys one (table, level, strategy, workers, warm) needs: its level replay and its cells'."""
    cells = levels_of(table)[budget][1]
    return [(table, budget, "level", None, strategy, conc, warm)] + [
        (table, budget, "cells", m, strategy, effective(table, budget, "cells", conc), warm) for m in cells]


def cells_to(results: dict, table: str, budget: int, strategy: str, conc: int, warm: bool, seeds: int,
             field: str = "to") -> list[float]:
    """Per replay seed: compute (fraction of the level's grid) until every cell is within 0.5 point of its best
    (``field="to1"``: within 1 point)."""
    level, cells = levels_of(table)[budget]
    total = level.grid_compute
    out = []
    for s in range(seeds):
        spent = 0.0
        for m in cells:
            r = results[(table, budget, "cells", m, strategy, effective(table, budget, "cells", conc), warm)]
            spent += r["rows"][s][field] * r["grid"]
        out.append(spent / total)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tune", default="benchmarks/tables/trec.csv", help="the table the default is chosen on")
    ap.add_argument("--heldout", default="benchmarks/tables/rotten_tomatoes.csv",
                    help="the table it is reported on; 'none': only the tune table's half (choose the default)")
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--workers", type=int, default=2, help="processes (the output does not depend on it)")
    ap.add_argument("--out", default="benchmarks/tables/protocol/")
    ap.add_argument("--levels", default="shared",
                    help="shared (default): the tune table's levels the held-out table also holds (all of them with "
                         "--heldout none); all: every level of both tables; or budgets, comma-separated")
    args = ap.parse_args()
    _quiet()
    t0 = time.perf_counter()
    strategies = args.strategies.split(",")
    if BASELINE not in strategies:
        strategies.insert(0, BASELINE)
    held = args.heldout.lower() != "none"
    tables = {"tune": args.tune, **({"held-out": args.heldout} if held else {})}
    try:
        keep = chosen_levels(args.levels, args.tune, args.heldout if held else None)
    except ValueError as err:
        ap.error(str(err))  # exit 2

    def levels(table: str) -> dict:
        return {b: v for b, v in levels_of(table).items() if b in keep}

    for table in tables.values():
        if not levels(table):
            ap.error(f"--levels {args.levels} leaves no level of {table} (it holds "
                     f"{', '.join(str(b) for b in levels_of(table))}): give one of those, or all")
        if len(levels(table)) < len(levels_of(table)):  # stderr: the committed text stays what the replays print
            print(f"levels of {table} left out (--levels {args.levels}): "
                  + ", ".join(f"{b:,}" for b in levels_of(table) if b not in keep), file=sys.stderr)
    warm = {b: warm_points(args.tune, args.heldout, b) for b in levels(args.heldout)} if held else {}
    results: dict[tuple, dict] = {}

    def run_all(pool, wanted: list[tuple]) -> None:
        tasks = []
        for key in dict.fromkeys(wanted):  # in order, once each (a cell's replay serves c=1 and c=4 alike)
            if key in results:
                continue
            table, budget, mode, m, strategy, conc, is_warm = key
            points = None
            if is_warm:
                points = warm[budget].get(m) if m else [p for pts in warm[budget].values() for p in pts]
            tasks.append((table, budget, mode, m, strategy, conc, points or None, args.seeds, is_warm))
        for r in pool.map(run_task, tasks, chunksize=1):
            results[(*r["task"], r["warm"])] = r

    with ProcessPoolExecutor(args.workers) as pool:
        run_all(pool, [k for table in tables.values() for b in levels(table) for s in strategies
                       for c in CONCURRENCY for k in keys(table, b, s, c, False)])
        # median cells-mode compute to 0.5 point, then to 1 point (when no strategy gets every cell within 0.5
        # point in time, the finer measure ties at ">50%" for all), mean over the tune table's levels
        score = {s: tuple(float(np.mean([median(cells_to(results, args.tune, b, s, 4, False, args.seeds, f))
                                         for b in levels(args.tune)])) for f in ("to", "to1")) for s in strategies}
        top = min(score.values())
        chosen = next(s for s in strategies if score[s][0] <= top[0] + 0.01 and (
            math.isfinite(top[0]) or score[s][1] <= top[1] + 0.01))
        # warm start: the default and the baseline, on the held-out table, from the tune table
        if held:
            run_all(pool, [k for b in levels(args.heldout) for s in dict.fromkeys((chosen, BASELINE))
                           for c in CONCURRENCY for k in keys(args.heldout, b, s, c, True)])
    warm_strategies = list(dict.fromkeys((chosen, BASELINE)))

    def summary(table: str, budget: int, strategy: str, conc: int, mode: str, warm: bool = False) -> list[float]:
        if mode == "level":
            return [row["to"] for row in results[(table, budget, "level", None, strategy, conc, warm)]["rows"]]
        return cells_to(results, table, budget, strategy, conc, warm, args.seeds, "to1" if mode == "cells1" else "to")

    print(f"strategy protocol: {args.seeds} replay seeds per strategy, continuous lr on each table's surrogate, "
          f"ASHA/Hyperband grace 1 reduction 2, {SETTINGS['n_startup_trials']} random trials first")
    for role, table in tables.items():
        print(f"\n=== {role} table: {table}")
        for budget, (level, cells) in levels(table).items():
            print(f"\nbudget {budget:,}: {len(level.discrete.configs)} recorded configurations ({len(cells)} cells: "
                  + ", ".join(f"{m} {len(c.discrete.configs)}" for m, c in cells.items())
                  + f"); y* = {level.y_star:.4f} ({level.best.candidate.method} {dict(level.best.candidate.values)} "
                  f"lr={level.best.key[-3]:.2e})")
            print("  each cell's y*: " + "; ".join(
                f"{m} {c.y_star:.4f} (lr={c.best.key[-3]:.2e})" for m, c in cells.items()))
            head = "".join(f"{f'regret@{f:.0%}':>16}" for f in FRACTIONS)
            print(f"  {'strategy':<20}{'c':>2}{head}{'level: to 0.5pt':>19}{'cells: to 0.5pt':>19}{'cells: to 1pt':>19}")
            for strategy in strategies:
                for conc in CONCURRENCY:
                    rows = results[(table, budget, "level", None, strategy, conc, False)]["rows"]
                    cells_ = ""
                    for i, f in enumerate(FRACTIONS):
                        a = np.array([r["at"][i] for r in rows])
                        cells_ += f"{a.mean():>9.3f} ± {a.std(ddof=1) / math.sqrt(len(a)):.3f}"
                    lv = summary(table, budget, strategy, conc, "level")
                    ce = summary(table, budget, strategy, conc, "cells")
                    got_l = sum(math.isfinite(x) for x in lv)
                    got_c = sum(math.isfinite(x) for x in ce)
                    ce1 = summary(table, budget, strategy, conc, "cells1")
                    got_c1 = sum(math.isfinite(x) for x in ce1)
                    print(f"  {strategy:<20}{conc:>2}{cells_}{fmt(median(lv)) + f' ({got_l}/{len(lv)})':>19}"
                          f"{fmt(median(ce)) + f' ({got_c}/{len(ce)})':>19}"
                          f"{fmt(median(ce1)) + f' ({got_c1}/{len(ce1)})':>19}")
            print("  per cell, median compute to 0.5 pt of the cell's own best (fraction of the CELL's grid), c=4:")
            for m in cells:
                print(f"    {m:<9}" + "  ".join(
                    f"{s} {fmt(median([r['to'] for r in results[(table, budget, 'cells', m, s, effective(table, budget, 'cells', 4), False)]['rows']]))}"
                    for s in strategies))
        if role == "tune":
            print("\nchoice on the tune table (mean over levels of the median cells-mode compute at 4 workers, to 0.5 pt "
                  "/ to 1 pt; ties within 0.01 go to the earlier, cheaper strategy): "
                  + ", ".join(f"{s} {fmt(v[0])}/{fmt(v[1])}" for s, v in score.items()) + f" -> default: {chosen}")
    goal_table = args.heldout if held else args.tune
    print(f"\n=== held-out goals for the default ({chosen}) against {BASELINE}: <= 10 % of grid compute, >= 1.5x less"
          + ("" if held else "\n  NO HELD-OUT TABLE (--heldout none): shown on the tune table itself, where the default "
             "was chosen (in-sample, optimistic)"))
    for budget in levels(goal_table):
        for mode in ("cells", "cells1", "level"):
            for conc in CONCURRENCY:
                d = median(summary(goal_table, budget, chosen, conc, mode))
                b = median(summary(goal_table, budget, BASELINE, conc, mode))
                ratio = b / d if math.isfinite(b) and math.isfinite(d) and d > 0 else float("nan")
                shown = f"{ratio:.2f}x" if math.isfinite(ratio) else "n/a"
                print(f"  budget {budget:,} {mode:<6} c={conc}: default {fmt(d)}, {BASELINE} {fmt(b)}, ratio "
                      f"{shown}; <= 10 %: {'met' if d <= 0.10 else 'not met'}; >= 1.5x: "
                      f"{'met' if ratio >= 1.5 else 'not met'}")
    if held:
        print(f"\n=== warm start on the held-out table from the tune table ({WARM_K} best per cell enqueued first)")
    for budget in levels(args.heldout) if held else ():
        print(f"  budget {budget:,}: " + "; ".join(f"{m}: " + ", ".join(
            " ".join(f"{k}={v}" for k, v in p.items() if k not in ("method", "lr")) + f" lr={p['lr']:.1e}"
            for p in pts)
            for m, pts in warm[budget].items()))
        for strategy in warm_strategies:
            for mode in ("cells", "cells1", "level"):
                for conc in CONCURRENCY:
                    cold = median(summary(args.heldout, budget, strategy, conc, mode))
                    hot = median(summary(args.heldout, budget, strategy, conc, mode, warm=True))
                    print(f"    {strategy:<20} {mode:<6} c={conc}: cold {fmt(cold):>6}, warm {fmt(hot):>6}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(json.dumps({
        "command": " ".join(sys.argv), "tune": args.tune, "heldout": args.heldout, "strategies": strategies,
        "chosen": chosen, "seeds": args.seeds,
        "results": [{"table": k[0], "budget": k[1], "mode": k[2], "cell": k[3], "strategy": k[4], "concurrency": k[5],
                     "warm": k[6], "compute_to_0.5pt": [r["to"] if math.isfinite(r["to"]) else None for r in v["rows"]],
                     "compute_to_1pt": [r["to1"] if math.isfinite(r["to1"]) else None for r in v["rows"]]}
                    for k, v in results.items()]}, indent=1))
    plot(results, {role: (t, list(levels(t))) for role, t in tables.items()}, strategies, out)
    print(f"wall time {time.perf_counter() - t0:.0f} s; plots and per-seed numbers in {out}", file=sys.stderr)


def plot(results: dict, tables: dict, strategies: list[str], out: Path) -> None:
    """``tables``: role -> (table, its replayed budgets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(role, table, b, c) for role, (table, budgets) in tables.items() for b in budgets for c in CONCURRENCY]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (role, table, budget, conc) in zip(axes[0], panels):
        for strategy in strategies:
            ys = np.array([r["curve"] for r in results[(table, budget, "level", None, strategy, conc, False)]["rows"]])
            mean, se = ys.mean(0), ys.std(0, ddof=1) / math.sqrt(len(ys))
            ax.step(CURVE, mean, where="post", label=strategy, lw=1)
            ax.fill_between(CURVE, mean - se, mean + se, step="post", alpha=0.15)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_xlim(0, 0.5)
        ax.set_title(f"{Path(table).stem} {budget:,}, {conc} at once ({role})", fontsize=9)
        ax.set_xlabel("compute / grid compute")
        ax.set_ylabel("normalised regret (mean ± s.e.)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "protocol_regret.png", dpi=110)


if __name__ == "__main__":
    main()
