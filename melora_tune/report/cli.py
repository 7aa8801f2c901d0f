"""``melora-tune report --dataset NAME``: a search's report as Markdown, a self-contained HTML page and PNG plots.

Reads the MLflow tracking store a search wrote (default sqlite:///mlflow.db
here): when the search was confirmed (melora-tune confirm), each method's
confirmed configuration with its test score over seeds (mean, std, 95% CI),
the baselines and which method wins; then the best configuration per method,
the top-k trials, score vs adapter parameters, a MELoRA n x r heatmap,
learning-rate sensitivity, learning curves and Optuna's parameter importance. The report goes to reports/<dataset>/ and is also logged
on the search's parent run (artifacts under report/).

Several datasets: repeat --dataset (or --dataset all for every experiment
holding a search). Each gets its folder under --out (default reports/), plus
index.md and index.html with a table of the best configuration per dataset
and method. A single dataset's report also carries that table when the store
holds searches of other datasets.
"""

from __future__ import annotations

import argparse
import sys

from melora_tune.report.build import build_reports
from melora_tune.report.render import mean_std


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report",
        help="write a search's report (Markdown, HTML, PNG plots) from MLflow",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", action="append", required=True, metavar="NAME",
                   help="dataset = MLflow experiment (the task name, e.g. rotten_tomatoes); repeat it, or 'all'")
    p.add_argument("--search", default=None, metavar="PARENT_RUN_ID",
                   help="the search's parent run id or search name (default: the newest search of the dataset)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db here)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: reports/<dataset>/, or reports/ for several datasets)")
    p.add_argument("--top-k", type=int, default=10, metavar="K", help="rows of the top trials table (default 10)")
    p.add_argument("--no-log", action="store_true", help="do not log the report as artifacts of the parent run")
    p.set_defaults(func=report_command)
    return p


def _confirmed_lines(confirmed) -> list[str]:
    """'confirmed melora: melora n=4 r=2 lr=1.0e-3 test 0.7900 ± 0.0100 (3 seeds)' per method, then the verdicts."""
    if confirmed is None:
        return ["not confirmed yet: melora-tune confirm SPACE.yaml retrains the best configurations on several seeds"]

    levels = {w["budget"] for _, w in confirmed.winners.iterrows()} if "budget" in confirmed.winners else set()

    def name(w) -> str:  # one level: the method, as before cells; several: the cell
        return w["cell"] if len(levels) > 1 and w.get("cell") else w["method"]

    out = [f"confirmed {name(w)}: {w['configuration']} test {mean_std(w['test_mean'], w['test_std'], w['test_n']) or 'n/a'} "
           f"({w['seeds']} seed{'s' if w['seeds'] != 1 else ''})" for _, w in confirmed.winners.iterrows()]
    return out + [c.sentence for c in confirmed.comparisons]


def report_command(args) -> int:
    results, index = build_reports(
        args.dataset, search=args.search, tracking_uri=args.tracking_uri, out_dir=args.out, top_k=args.top_k,
        log_artifacts=not args.no_log,
    )
    for res in results:
        best = res.data.best
        print(f"{res.dataset}: search {res.data.search_name} ({len(res.data.trials)} trials) -> {res.out_dir}/report.html")
        levels = best["budget"].nunique() if "budget" in best else 1
        for _, row in best.iterrows():
            who = row["cell"] if levels > 1 and "cell" in best else row["method"]  # several levels: name the cell
            print(f"  best {who}: {row['run_name']} score {row['score']:.4f} ({row['status'].replace('_', ' ')})")
        if best.empty:
            print("  no scored trial yet")
        for line in _confirmed_lines(res.data.confirmed):
            print(f"  {line}")
        if res.logged:
            print(f"  logged on MLflow run {res.parent_run_id} under report/")
        for warning in res.warnings:
            print(f"melora-tune report: warning: {warning}", file=sys.stderr)
    for path in index:
        print(f"cross-dataset table: {path}")
    return 0
