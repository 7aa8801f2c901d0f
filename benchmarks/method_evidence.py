"""MELoRA vs LoRA vs PRoLoRA at equal parameter budgets, read off a recorded table (no training).

    python benchmarks/method_evidence.py --table benchmarks/tables/trec.csv

Per budget level and method: the configuration (learning rate included) with the best seed-mean final
validation score, i.e. what an equal-effort full grid would pick, and its seed-mean final TEST score
with the spread over seeds (std, min-max); then every configuration's learning-rate curve, so that a
method that only wins at one lucky learning rate shows as such. Test scores are never used to choose.

Then the verdicts, each method's pick against LoRA's: at the same level (equal parameters) and against LoRA at
the next level up (twice the parameters: does the method match LoRA with fewer?). The difference of seed-mean
test scores is paired by training seed (the same seeds, data order and split for every configuration), with a
95 % t interval over the seeds: "better" / "worse" when the interval excludes 0, "cannot be told apart"
otherwise (with 3 seeds the interval is wide: t = 4.30).
"""

from __future__ import annotations

import argparse
import math

import pandas as pd
from scipy import stats


def finals(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (configuration, seed): the last evaluation's scores."""
    last = table[table["epoch"] == table.groupby("budget")["epoch"].transform("max")]
    return last.assign(shape=last["config"].str.replace(r" lr=\S+$", "", regex=True))


def per_config(final: pd.DataFrame) -> pd.DataFrame:
    """Seed means and spreads per (budget, configuration)."""
    g = final.groupby(["budget", "method", "shape", "lr", "adapter_params", "equivalent_rank"], as_index=False)
    return g.agg(seeds=("seed", "nunique"), val=("val_score", "mean"), test=("test_score", "mean"),
                 test_std=("test_score", "std"), test_min=("test_score", "min"), test_max=("test_score", "max"))


def picks(final: pd.DataFrame, configs: pd.DataFrame) -> dict[tuple[int, str], pd.Series]:
    """(budget, method) -> the per-seed final test scores of the method's configuration with the best seed-mean
    validation score at that level (index: seed)."""
    out = {}
    for (budget, method), rows in configs.groupby(["budget", "method"]):
        best = rows.loc[rows["val"].idxmax()]
        sel = final[(final["budget"] == budget) & (final["shape"] == best["shape"]) & (final["lr"] == best["lr"])]
        out[(int(budget), method)] = sel.set_index("seed")["test_score"].sort_index()
    return out


def verdict(a: pd.Series, b: pd.Series) -> str:
    """a - b, paired by seed: mean and 95 % t interval in points, and what it says."""
    d = (a - b).dropna()
    n = len(d)
    mean = 100 * d.mean()
    if n < 2:
        return f"{mean:+.2f} pt (one seed: no interval)"
    half = 100 * stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
    word = "better" if mean - half > 0 else "worse" if mean + half < 0 else "cannot be told apart"
    return f"{mean:+.2f} pt [{mean - half:+.2f}, {mean + half:+.2f}] ({n} seeds): {word}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", default="benchmarks/tables/trec.csv")
    args = ap.parse_args()
    table = pd.read_csv(args.table)
    configs = per_config(finals(table))
    for budget, level in configs.groupby("budget"):
        print(f"\nbudget {budget:,} adapter params: best configuration per method (by seed-mean validation)")
        print(f"  {'method':<8} {'configuration':<24} {'lr':>7} {'eq.rank':>7} {'val':>7} {'test mean ± std':>17} "
              f"{'test min-max':>14}")
        for method, rows in level.groupby("method"):
            best = rows.loc[rows["val"].idxmax()]
            print(f"  {method:<8} {best['shape']:<24} {best['lr']:>7.1e} {int(best['equivalent_rank']):>7} "
                  f"{best['val']:>7.4f} {best['test']:>9.4f} ± {best['test_std']:.4f} "
                  f"{best['test_min']:>6.4f}-{best['test_max']:.4f}")
        print(f"  seed-mean test per configuration and learning rate ({int(level['seeds'].max())} seeds each):")
        pivot = level.pivot_table(index=["method", "shape"], columns="lr", values="test")
        print("    " + pivot.to_string(float_format=lambda v: f"{v:.4f}").replace("\n", "\n    "))
    pick = picks(finals(table), configs)
    levels = sorted({b for b, _ in pick})
    print("\nverdicts (each method's pick minus LoRA's pick, seed-mean test, paired by seed, 95 % t interval):")
    for i, budget in enumerate(levels):
        lora = pick.get((budget, "lora"))
        up = levels[i + 1] if i + 1 < len(levels) else None
        for (b, method), scores in pick.items():
            if b != budget or method == "lora":
                continue
            if lora is not None:
                print(f"  {budget:,}: {method} vs LoRA at equal parameters: {verdict(scores, lora)}")
            if up is not None and (up, "lora") in pick:
                print(f"  {budget:,}: {method} vs LoRA at {up:,} ({up / budget:g}x the parameters): "
                      f"{verdict(scores, pick[(up, 'lora')])}")


if __name__ == "__main__":
    main()
