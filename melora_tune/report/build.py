"""Build a search's report: read MLflow (and the Optuna study), draw, render, write, log on the parent run.

Files of one dataset's report (``reports/<dataset>/`` by default)::

    report.md           Markdown, images linked next to it
    report.html         one self-contained page (images embedded)
    frontier.png        score vs adapter parameters, one series per method (search trials, validation)
    frontier_confirmed.png  confirmed test score (mean, 95% CI) vs each cell winner's adapter parameters (log x),
                        one line per method across budget levels, baselines as horizontal lines
    lr_curves.png       score vs learning rate over each cell's trials, one panel per method
    frontier.csv        one row per cell (method, budget level): winner's parameters, seeds, test mean and CI,
    frontier.json       validation mean, trials, epochs, compute seconds; the JSON adds the sentences and warnings
    heatmap_n_r.png     MELoRA: best score over n x r (when MELoRA was searched)
    lr_sensitivity.png  score vs learning rate (log x)
    learning_curves.png score at every evaluation vs epoch, one line per trial
    importance.png      Optuna parameter importance (when the study has enough completed trials)
    trials.csv          every trial (one row per MLflow child run that is not a confirmation)
    confirmations.csv   every confirmation run (when the search was confirmed)

When the search was confirmed (``melora-tune confirm``), the report leads with the confirmed results: each
method's configuration with the best mean validation score over its seeds, its test score with a Student-t
interval, the baselines, and which method wins (``report.confirmed``, ``report.stats``). The frontier section
(``report.frontier``) follows: the method x budget table, the comparisons within and across budget levels, the effort
each cell got, and warnings that say what to change when the comparison is not settled.

The same files are logged on the search's parent run under ``report/``.
Several datasets (``--dataset a --dataset b`` or ``--dataset all``) give one
folder each under the output folder plus ``index.md``/``index.html`` with the
cross-dataset table.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from melora_tune import drill
from melora_tune.adapters.registry import table_hyperparams
from melora_tune.errors import UsageError
from melora_tune.records import read
from melora_tune.report import confirmed, plots
from melora_tune.report import frontier as frontier_mod
from melora_tune.report import importance as imp
from melora_tune.report.render import (
    Figure,
    ReportData,
    render_html,
    render_index_html,
    render_index_markdown,
    render_markdown,
)

log = logging.getLogger("melora_tune.report")

FIGURE_FILES = ("frontier.png", "heatmap_n_r.png", "lr_sensitivity.png", "learning_curves.png", "importance.png",
                "frontier_confirmed.png", "lr_curves.png")
IMBALANCED_SHARE = 0.7  # a validation split this dominated by one class makes accuracy mostly a majority-class count
SETTINGS = [  # (parent run param, label)
    ("model", "model"), ("methods", "methods"), ("budget", "budget (adapter params)"), ("min_fraction", "min fraction of budget"),
    ("num_samples", "trials requested"), ("epochs", "epochs (max fidelity)"), ("asha", "ASHA early stopping"),
]


@dataclass
class ReportResult:
    dataset: str
    out_dir: Path
    files: list[Path]
    parent_run_id: str
    logged: bool
    data: ReportData
    warnings: list[str] = field(default_factory=list)


def safe_folder_name(name: str) -> str:
    """A dataset (experiment) name as one folder name: never a path, never '.' or '..'."""
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("._") or "dataset"
    return slug


def _settings(search: read.SearchInfo) -> dict[str, str]:
    p = search.params
    out = {label: p[key] for key, label in SETTINGS if p.get(key) not in (None, "")}
    if p.get("lr_low") and p.get("lr_high"):
        out["lr range"] = f"{p['lr_low']} .. {p['lr_high']}" + (" (log)" if p.get("lr_log") == "True" else "")
    levels = read.levels_of(search)
    if len(levels) > 1:
        out["budget levels (adapter params)"] = ", ".join(f"{b:,}" for b in levels)
    if p.get("trials_per_cell"):
        out["trials per cell"] = p["trials_per_cell"]
    budget = p.get("budget")
    if budget and len(levels) <= 1:
        try:
            out["budget (adapter params)"] = f"{int(float(budget)):,}"
        except ValueError:
            pass
    return out


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def imbalance_note(baselines: read.Baselines) -> str | None:
    """A warning when the score is accuracy on a split where one class holds >= IMBALANCED_SHARE of the examples."""
    share = baselines.majority_share
    if share is None or share < IMBALANCED_SHARE or baselines.score_metric != "accuracy":
        return None
    majority = baselines.split("val").get("majority")
    scored = f" (the majority-class baseline scores {majority:.3f} on validation)" if majority is not None else ""
    return (f"The validation split's most common class is {share:.0%} of it: accuracy mostly measures the majority class "
            f"here{scored}. For a score that rewards the other classes too, set `task.metric: f1` "
            "(or `matthews_correlation`) in the space file and search again.")


def cross_dataset_rows(mlf, current: dict[str, tuple[read.SearchInfo, object]] | None = None, only: list[str] | None = None):
    """Best trial per method of the newest search of every dataset with a search (or of ``only``);
    ``current`` gives the search and trials to use for some datasets."""
    import pandas as pd  # heavy: pandas, loaded where tables are built

    current = current or {}
    datasets = set(only) if only is not None else set(read.searched_datasets(mlf)) | set(current)
    rows = []
    for dataset in sorted(datasets):
        if dataset in current:
            search, trials = current[dataset]
        else:
            search = read.resolve_search(mlf, dataset)
            trials = read.trials_frame(mlf, search)
        for _, row in read.best_per_method(trials).iterrows():
            rows.append({
                "dataset": dataset, "search": search.name, "method": row["method"], "score": row["score"],
                **{k: row[k] for k in table_hyperparams()}, "lr": row["lr"], "adapter_params": row["adapter_params"],
                "equivalent_rank": row["equivalent_rank"], "trials": len(trials),
            })
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return read.normalize_frame(frame).sort_values(["method", "dataset"], kind="mergesort").reset_index(drop=True)


def build_report(
    dataset: str,
    *,
    search: str | None = None,
    tracking_uri: str | None = None,
    out_dir: str | Path | None = None,
    top_k: int = 10,
    log_artifacts: bool = True,
    cross: bool = True,
    mlf=None,
) -> ReportResult:
    """Write one dataset's report (see the module docstring) and log it on the search's parent run."""
    if top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {top_k}")
    uri = read.tracking_uri(tracking_uri)
    mlf = mlf or read.client(uri)
    info = read.resolve_search(mlf, dataset, search)
    trials = read.trials_frame(mlf, info)
    confirmations = read.confirmations_frame(mlf, info)
    baselines = read.baselines_of(info)
    confirmed_results = confirmed.confirmed_results(confirmations, baselines)
    out = Path(out_dir) if out_dir is not None else Path("reports") / safe_folder_name(dataset)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for name in (*FIGURE_FILES, "confirmations.csv"):  # a file not written this time must not linger from an earlier report
        (out / name).unlink(missing_ok=True)

    ranked = read.rank_trials(trials)
    best = read.best_per_cell(trials)  # one level: the best per method
    notes = []
    if info.status == "running":
        notes.append("This search is still running (or was killed without closing its run): the report shows the trials so far.")
    elif info.status in ("interrupted", "failed"):
        notes.append(f"This search ended {info.status}: the report shows the trials it finished.")
    if trials.empty:
        notes.append("The search has no trial runs in MLflow yet.")
    imbalance = imbalance_note(baselines)
    if imbalance:
        notes.append(imbalance)

    budget = None
    try:
        budget = float(info.params.get("budget")) if info.params.get("budget") else None
    except ValueError:
        budget = None
    lines = baselines.split("val")  # the trials' scores are validation scores: so are the baselines drawn with them
    on_plot = " Grey horizontal lines: the baselines' validation scores." if lines else ""
    figures = [
        Figure("frontier", "Score vs adapter parameters (budget frontier)",
               plots.frontier(trials, out / "frontier.png", read.levels_of(info) or budget, baselines=lines),
               "One series per method; hollow markers: trials ASHA stopped early (their score is from fewer epochs). "
               "The line is each method's best score at or below that many parameters." + on_plot),
    ]
    heat = plots.heatmap_n_r(trials, out / "heatmap_n_r.png")
    figures.append(Figure("heatmap", "MELoRA: best score over n x r", heat,
                          "" if heat else "No scored MELoRA trial in this search, so there is no n x r heatmap."))
    lr_fig = plots.lr_sensitivity(trials, out / "lr_sensitivity.png", baselines=lines)
    figures.append(Figure("lr", "Learning-rate sensitivity", lr_fig, on_plot.strip() if lr_fig else "No scored trial to plot."))
    curves_fig = plots.learning_curves(read.curves_frame(mlf, trials), out / "learning_curves.png", baselines=lines)
    figures.append(Figure("curves", "Learning curves", curves_fig,
                          "Validation score at every evaluation of every search trial, one colour per method. Dashed lines "
                          "ending in a hollow marker: trials ASHA stopped early; dotted: failed, diverged or interrupted."
                          + on_plot if curves_fig else "No trial logged a score with its epoch."))
    perplexity = read.curves_frame(mlf, trials, metric="eval_perplexity")
    if not perplexity.empty:  # a causal LM: how well each trial predicts the response tokens
        ppl_fig = plots.learning_curves(perplexity, out / "perplexity.png", ylabel="perplexity of the response (validation)",
                                        title="Validation perplexity at every evaluation",
                                        log_y=perplexity["score"].max() > 10 * perplexity["score"].min())
        figures.append(Figure("perplexity", "Response perplexity", ppl_fig,
                              "exp(mean cross-entropy) over the validation responses' tokens (prompt tokens masked), "
                              "at every evaluation of every search trial; lower is better. Line styles as above."))
    location = read.study_location(info, trials)
    importance = imp.search_importance(location)
    imp_fig = plots.importance_bars(importance.scopes, out / "importance.png")
    where = f" Optuna study {location['study_name']} in {location['optuna_storage']}." if location else ""
    figures.append(Figure("importance", "Parameter importance (Optuna, fANOVA)", imp_fig,
                          "How much of the score's variance each searched parameter explains, over the trials that "
                          "trained every epoch." + where))

    cross_rows = None
    if cross:
        try:
            cross_rows = cross_dataset_rows(mlf, {dataset: (info, trials)})
            if cross_rows.empty or cross_rows["dataset"].nunique() < 2:
                cross_rows = None  # one dataset: nothing to compare
        except Exception as exc:  # noqa: BLE001  (another experiment's trouble must not cost this report)
            log.warning("cross-dataset table skipped: %s", exc)
            cross_rows = None

    winner_runs = frontier_mod.winner_seed_runs(confirmations, confirmed_results)
    curves = read.score_histories(mlf, [run for runs in winner_runs.values() for run in runs])
    front = frontier_mod.build_frontier(info, trials, confirmations, confirmed_results, baselines, curves)
    lr_low, lr_high = (_float(info.params.get(k)) for k in ("lr_low", "lr_high"))
    frontier_figures = [
        Figure("frontier_confirmed", "Parameter-efficiency frontier (confirmed, test)",
               plots.confirmed_frontier(front.cells, out / "frontier_confirmed.png", baselines.split("test")),
               "Each cell's confirmed winner: test score, mean and 95% CI over the shared seeds, at the winner's actual "
               "adapter parameter count (log scale); one line per method across budget levels; grey: the baselines' "
               "test scores."),
        Figure("lr_curves", "Learning-rate curves per method",
               plots.lr_curves(trials, out / "lr_curves.png", lr_low, lr_high),
               "Validation score against learning rate over each cell's search trials, one line per budget level: where "
               "each method's good range lies. Dashed verticals: the searched range."),
    ]
    files_extra = frontier_mod.write_files(front, out)

    data = ReportData(
        dataset=dataset, search_name=info.name, parent_run_id=info.run_id, experiment_id=info.experiment_id,
        tracking_uri=uri, search_status=info.status, generated=time.strftime("%Y-%m-%d %H:%M:%S"), trials=trials,
        best=best, top=ranked.head(top_k), top_k=top_k, figures=figures, importance=importance,
        settings=_settings(info), cross=cross_rows, notes=notes, confirmed=confirmed_results,
        baselines=baselines if baselines.logged else None, frontier=front, frontier_figures=frontier_figures,
    )
    files = []
    (out / "report.md").write_text(render_markdown(data))
    (out / "report.html").write_text(render_html(data))
    trials.to_csv(out / "trials.csv", index=False)
    files += [out / "report.md", out / "report.html", out / "trials.csv"]
    if not confirmations.empty:
        confirmations.to_csv(out / "confirmations.csv", index=False)
        files.append(out / "confirmations.csv")
    files += [f.path for f in [*figures, *frontier_figures] if f.path is not None] + files_extra

    warnings = []
    logged = False
    if log_artifacts:
        try:
            for path in files:
                mlf.log_artifact(info.run_id, str(path), artifact_path="report")
                drill.point("report.log_artifact")
            logged = True
        except Exception as exc:  # noqa: BLE001
            warnings.append(f"could not log the report on run {info.run_id}: {exc}")
    return ReportResult(dataset, out, files, info.run_id, logged, data, warnings)


def build_reports(
    datasets: list[str],
    *,
    search: str | None = None,
    tracking_uri: str | None = None,
    out_dir: str | Path | None = None,
    top_k: int = 10,
    log_artifacts: bool = True,
) -> tuple[list[ReportResult], list[Path]]:
    """Reports of one or several datasets ('all': every experiment with a search); returns (reports, index files)."""
    uri = read.tracking_uri(tracking_uri)
    mlf = read.client(uri)
    names: list[str] = []
    for d in datasets:
        if d == "all":
            found = read.searched_datasets(mlf)
            if not found:
                raise UsageError("--dataset all: this tracking store holds no search yet")
            names += found
        else:
            names.append(d)
    names = list(dict.fromkeys(names))
    if len(names) == 1:
        return [build_report(names[0], search=search, tracking_uri=uri, out_dir=out_dir, top_k=top_k,
                             log_artifacts=log_artifacts, mlf=mlf)], []
    if search is not None:
        raise UsageError("--search names one search, which belongs to one dataset: give a single --dataset with it")
    root = Path(out_dir) if out_dir is not None else Path("reports")
    folders = [safe_folder_name(n) for n in names]
    if len(set(folders)) != len(folders):
        raise UsageError(f"datasets {', '.join(names)} map to the same folder name: report them one at a time with --out")
    results = [
        build_report(name, tracking_uri=uri, out_dir=root / folder, top_k=top_k, log_artifacts=log_artifacts, mlf=mlf)
        for name, folder in zip(names, folders)
    ]
    cross = cross_dataset_rows(mlf, {r.dataset: (read.SearchInfo(**_info_kwargs(r)), r.data.trials) for r in results}, only=names)
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    links = list(zip(names, folders))
    (root / "index.md").write_text(render_index_markdown(cross, links, generated))
    (root / "index.html").write_text(render_index_html(cross, links, generated))
    return results, [root / "index.md", root / "index.html"]


def _info_kwargs(result: ReportResult) -> dict:
    d = result.data
    return dict(run_id=d.parent_run_id, name=d.search_name, experiment_id=d.experiment_id, experiment_name=d.dataset,
                status=d.search_status, mlflow_status="", start_time=None, end_time=None)
