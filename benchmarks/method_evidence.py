"""MELoRA vs LoRA vs PRoLoRA at equal parameter budgets, read off a recorded table (no training).

    python benchmarks/method_evidence.py --table benchmarks/tables/trec.csv

Per budget level and method: the configuration (learning rate included) with the best seed-mean final
validation score, i.e. what an equal-effort full grid would pick, and its seed-mean final TEST score
with the spread over seeds (std, min-max); then every configuration's learning-rate curve, so that a
method that only wins at one lucky learning rate shows as such. Test scores are never used to choose.
"""

from __future__ import annotations

import argparse

import pandas as pd


def finals(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (configuration, seed): the last evaluation's scores."""
    last = table[table["epoch"] == table.groupby("budget")["epoch"].transform("max")]
    return last.assign(shape=last["config"].str.replace(r" lr=\S+$", "", regex=True))


def per_config(final: pd.DataFrame) -> pd.DataFrame:
    """Seed means and spreads per (budget, configuration)."""
    g = final.groupby(["budget", "method", "shape", "lr", "adapter_params", "equivalent_rank"], as_index=False)
    return g.agg(seeds=("seed", "nunique"), val=("val_score", "mean"), test=("test_score", "mean"),
                 test_std=("test_score", "std"), test_min=("test_score", "min"), test_max=("test_score", "max"))


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


if __name__ == "__main__":
    main()
