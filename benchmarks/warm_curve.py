"""Warm start with and without the earlier search's learning-rate curve, replayed both ways between two tables.

    python benchmarks/warm_curve.py --tables benchmarks/tables/v2/trec.csv benchmarks/tables/v2/rotten_tomatoes.csv \
        --seeds 50 --out benchmarks/tables/v2/warm_curve.json > benchmarks/tables/v2/warm_curve.txt

stdout is the committed text (every replay is seeded), ``--out`` the per-seed numbers behind it (a test replays some
seeds of a row and compares), the wall time goes to stderr. The replays, their settings and
"compute to within 0.5 point" are the protocol's (``benchmarks/protocol.py``): a continuous learning rate on each
table's surrogate, ASHA grace 1 reduction 2, 4 random trials first, compute as a fraction of the level's grid, the
median over replay seeds, each replay stopped at half the grid's compute.

At each level that both tables hold (a table's other levels are left out: the transfer measured is between two
datasets at one budget), three starts of the same search on the target table, from the source table
(``search/warm_start.py``):
* ``cold``: nothing from the source;
* ``best``: each cell's 2 best source configurations of its method (nearest level, recorded lr) enqueued first;
* ``curve``: ``best``, and once the first of them has been trained on the target, every source configuration of
  the cell's method that the target level holds is added to the study (``study.add_trials``), its source score
  shifted by (the best's target score - its source score): what ``warm_start`` does in a search.
``cells`` is the product's fair comparison (one study per method, every cell within 0.5 point of its own best, at 4
workers, about one trial per cell at once); ``level`` one study over every method, 4 at once. Random sampling
ignores the added results (its ``curve`` row equals ``best``: a check that the curve changes nothing else). Each row
ends with the paired view: on how many replay seeds ``curve`` got within 0.5 point sooner or later than ``best``
(same seed, same first trials), and the mean difference (a seed that did not get there counted at 50 %).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from melora_tune.search.surrogate import shape_of

sys.path.insert(0, str(Path(__file__).parent))
import protocol as P  # the protocol's replays, settings and warm points: one definition of each

# random: the control (it ignores added results). GP + ASHA is left out: in a 4-seed run of all three it gave TPE's
# medians in every row, at several times TPE's cost per proposal.
STRATEGIES = ("random+asha", "tpe+asha")
STARTS = ("cold", "best", "curve")
CONC = 4


def curve_points(source: str, target: str, budget: int) -> dict[str, list[dict]]:
    """Per method: the source's configurations at the nearest level that the target level holds, each with its
    seed-mean final validation score there (``value``)."""
    src = P.levels_of(source)
    _, src_cells = src[min(src, key=lambda b: (abs(math.log(b / budget)), b))]
    shapes = {shape_of(k) for k in P.levels_of(target)[budget][0].discrete.configs}
    return {m: [{"method": m, **dict(c.candidate.values), "lr": c.key[-3], "value": c.final_val}
                for c in cell.discrete.configs.values() if shape_of(c.key) in shapes]
            for m, cell in src_cells.items()}


def shared(target: str, source: str) -> dict:
    """The target's levels that the source also holds."""
    return {b: v for b, v in P.levels_of(target).items() if b in P.levels_of(source)}


def tasks(source: str, target: str, seeds: int) -> list[tuple]:
    out = []
    for budget, (_, cells) in shared(target, source).items():
        best = P.warm_points(source, target, budget)
        curve = curve_points(source, target, budget)
        for strategy in STRATEGIES:
            for start in STARTS:
                for m in [None, *cells]:
                    mode = "level" if m is None else "cells"
                    conc = CONC if m is None else P.effective(target, budget, "cells", CONC)
                    points = prior = None
                    if start != "cold":
                        points = best.get(m) if m else [p for pts in best.values() for p in pts]
                    if start == "curve":
                        prior = curve.get(m) if m else [p for pts in curve.values() for p in pts]
                    out.append(((target, budget, mode, m, strategy, conc, points or None, seeds, start), prior))
    return out


def run(job: tuple) -> dict:
    task, prior = job
    return P.run_task(task, prior)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", nargs=2, default=["benchmarks/tables/v2/trec.csv",
                                                  "benchmarks/tables/v2/rotten_tomatoes.csv"])
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2, help="processes (the output does not depend on it)")
    ap.add_argument("--out", default="benchmarks/tables/v2/warm_curve.json", help="the per-seed numbers")
    args = ap.parse_args()
    P._quiet()
    t0 = time.perf_counter()
    a, b = args.tables
    directions = [(a, b), (b, a)]
    jobs = [j for src, tgt in directions for j in tasks(src, tgt, args.seeds)]
    with ProcessPoolExecutor(args.workers) as pool:
        results = {r["task"][:5] + (r["warm"],): r for r in pool.map(run, jobs, chunksize=1)}
    print(f"warm start with and without the source's learning-rate curve: {args.seeds} replay seeds, median compute "
          f"to within 0.5 point / 1 point (fraction of the level's grid; >{P.HORIZON:.0%}: not reached), "
          f"{CONC} workers")
    for src, tgt in directions:
        print(f"\n=== {Path(src).stem} -> {Path(tgt).stem}")
        for budget, (_, cells) in shared(tgt, src).items():
            print(f"budget {budget:,}")
            for mode in ("cells", "level"):
                for strategy in STRATEGIES:
                    row, got = [], {}
                    for start in STARTS:
                        if mode == "level":
                            rows = results[(tgt, budget, "level", None, strategy, start)]["rows"]
                            to, to1 = ([r[f] for r in rows] for f in ("to", "to1"))
                        else:
                            to, to1 = ([sum(results[(tgt, budget, "cells", m, strategy, start)]["rows"][s][f]
                                            * results[(tgt, budget, "cells", m, strategy, start)]["grid"]
                                            for m in cells) / P.levels_of(tgt)[budget][0].grid_compute
                                        for s in range(args.seeds)] for f in ("to", "to1"))
                        got[start] = np.minimum(np.asarray(to, dtype=float), P.HORIZON)
                        row.append(f"{start} {P.fmt(P.median(to)):>5} / {P.fmt(P.median(to1)):>5}")
                    diff = got["curve"] - got["best"]
                    print(f"  {mode:<6} {strategy:<12} " + "   ".join(row) + f"   curve vs best (0.5 pt, per seed): "
                          f"{int((diff < -1e-12).sum())} sooner, {int((diff > 1e-12).sum())} later, mean "
                          f"{diff.mean():+.1%}")
    Path(args.out).write_text(json.dumps({
        "command": " ".join(sys.argv), "tables": args.tables, "seeds": args.seeds,
        "results": [{"table": k[0], "budget": k[1], "mode": k[2], "cell": k[3], "strategy": k[4], "start": k[5],
                     "concurrency": v["task"][5],
                     "compute_to_0.5pt": [r["to"] if math.isfinite(r["to"]) else None for r in v["rows"]]}
                    for k, v in results.items()]}, indent=1))
    print(f"wall time {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
