"""Markdown and a self-contained HTML page (CSS inline, PNGs embedded as base64: one file to mail or archive)."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melora_tune.adapters.registry import optional_hyperparams, table_hyperparams
from melora_tune.records import BASELINE_LABELS, finite
from melora_tune.report.confirmed import method_label
from melora_tune.report.frontier import cell_text


# (column, header) of the best-per-method table; method-specific columns are dropped when no row has them.
# The hyperparameter columns are the registered untied ones (adapters.registry.table_hyperparams: n, r, u, m).
def best_columns() -> list[tuple[str, str]]:
    return [
        ("method", "method"), ("cell", "cell"), ("score", "score"), ("best_score", "best ckpt score"), ("status", "status"),
        *((k, k) for k in table_hyperparams()), ("lr", "lr"), ("alpha", "alpha"), ("adapter_params", "adapter params"),
        ("equivalent_rank", "equivalent rank"), ("trial_id", "trial id"), ("optuna_trial", "optuna trial"),
        ("run_id", "MLflow run"),
    ]


TOP_COLUMNS = [
    ("rank", "#"), ("run_name", "configuration"), ("score", "score"), ("best_score", "best ckpt score"), ("status", "status"),
    ("epoch", "epochs"), ("adapter_params", "adapter params"), ("equivalent_rank", "equivalent rank"), ("trial_id", "trial id"),
]


def cross_columns() -> list[tuple[str, str]]:
    return [
        ("dataset", "dataset"), ("search", "search"), ("method", "method"), ("score", "score"),
        *((k, k) for k in table_hyperparams()), ("lr", "lr"), ("adapter_params", "adapter params"),
        ("equivalent_rank", "equivalent rank"), ("trials", "trials"),
    ]


def optional_columns() -> tuple[str, ...]:
    """Columns dropped when no row fills them: the hyperparameters some method does not use, and these."""
    return (*optional_hyperparams(), "best_score", "optuna_trial")


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: '' for missing, compact floats, learning rates in scientific notation."""
    if value is None:
        return ""
    try:
        import pandas as pd  # heavy: pandas; keeps `melora-tune --help` from loading it

        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e9:
            return str(int(value))
        return f"{value:.{digits}g}"
    return str(value)


def fmt_lr(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return ""
    return f"{v:.2e}" if math.isfinite(v) else ""


@dataclass
class Figure:
    key: str
    title: str
    path: Path | None  # None: nothing to draw
    note: str = ""  # shown under the title (or instead of the figure)


@dataclass
class ReportData:
    """Everything one dataset's report shows."""

    dataset: str
    search_name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    search_status: str
    generated: str
    trials: Any  # DataFrame (read.trials_frame)
    best: Any  # DataFrame (read.best_per_method)
    top: Any  # DataFrame (read.rank_trials().head(k))
    top_k: int
    figures: list[Figure] = field(default_factory=list)
    importance: Any = None  # importance.Importance
    settings: dict[str, str] = field(default_factory=dict)  # budget, epochs, ... from the parent run
    cross: Any = None  # DataFrame of cross_dataset_rows, or None
    notes: list[str] = field(default_factory=list)
    confirmed: Any = None  # confirmed.ConfirmedResults, or None: no confirmation ran
    baselines: Any = None  # read.Baselines, or None
    frontier: Any = None  # frontier.Frontier, or None
    frontier_figures: list[Figure] = field(default_factory=list)  # drawn inside the frontier sections


CONFIRM_COMMAND = "melora-tune confirm SPACE.yaml"
NO_CONFIRMATION = (f"No confirmation ran for this search: the tables below rank search trials by their validation score only. "
                   f"Run `{CONFIRM_COMMAND}` to retrain the best configurations on several seeds and score them on test.")


def cell(col: str, value: Any) -> str:
    if col == "lr":
        return fmt_lr(value)
    if col == "run_id" and isinstance(value, str):
        return value
    if col in ("adapter_params",) and value is not None:
        try:
            return f"{int(value):,}"
        except (TypeError, ValueError):
            return fmt(value)
    return fmt(value)


def columns_for(df, spec: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop columns the frame lacks and optional ones no row fills."""
    out = []
    for col, head in spec:
        if col not in df.columns:
            continue
        if col in optional_columns() and df[col].isna().all():
            continue
        if col == "cell" and df["cell"].nunique() <= df["method"].nunique():  # one level: the method says it all
            continue
        out.append((col, head))
    return out


def table_rows(df, spec: list[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    cols = columns_for(df, spec)
    heads = [h for _, h in cols]
    rows = [[cell(c, row[c]) for c, _ in cols] for _, row in df.iterrows()]
    return heads, rows


def md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(heads: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(md_escape(h) for h in heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(heads: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in heads)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def status_counts(df) -> str:
    counts = df["status"].value_counts()
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()) or "none"


def _summary_lines(data: ReportData) -> list[tuple[str, str]]:
    lines = [
        ("dataset", data.dataset),
        ("search", f"{data.search_name} ({data.search_status})"),
        ("MLflow parent run", f"{data.parent_run_id} (experiment {data.experiment_id})"),
        ("tracking URI", data.tracking_uri),
        ("trials", f"{len(data.trials)}: {status_counts(data.trials)}"),
    ]
    if data.confirmed is not None:
        table = data.confirmed.table
        lines.append(("confirmations", f"{int(table['runs'].sum())} runs of {len(table)} configurations, "
                                       f"{int(table['seeds'].sum())} completed"))
    if data.baselines is not None:
        lines.append(("score metric", data.baselines.score_metric))
        if data.baselines.majority_share is not None:
            lines.append(("majority class share (validation)", f"{data.baselines.majority_share:.1%}"))
    lines += list(data.settings.items())
    lines.append(("generated", data.generated))
    return lines


def _importance_sections(data: ReportData) -> list[tuple[str, str]]:
    """(scope, text) lines: the importances as text, or why there are none."""
    imp = data.importance
    if imp is None:
        return [("", "parameter importance was not computed")]
    if imp.error:
        return [("", f"parameter importance is not available: {imp.error}")]
    out = []
    for scope, values in imp.scopes.items():
        ranked = sorted(values.items(), key=lambda kv: -kv[1])
        out.append((scope, ", ".join(f"{k} {v:.2f}" for k, v in ranked)))
    for scope, note in imp.notes.items():
        out.append((scope, f"not available: {note}"))
    return out


# ---- confirmed results: cells shared by both renderers ---------------------------------------------------

CONFIRMED_HEADS = ["method", "configuration", "adapter params", "seeds", "validation (mean ± std)", "test (mean ± std)",
                   "test 95% CI"]
ALL_CONFIRMED_HEADS = ["method", "configuration", "adapter params", "seeds", "validation (mean ± std)", "validation 95% CI",
                       "test (mean ± std)", "test 95% CI", "confirmed winner", "search trial", "config key"]


def mean_std(mean: Any, std: Any, n: Any) -> str:
    """'0.8123 ± 0.0101'; one seed has no spread: '0.8123 (one seed)'; no seed: ''."""
    if not n or not _finite(mean):
        return ""
    return f"{mean:.4f} ± {std:.4f}" if _finite(std) else f"{mean:.4f} (one seed)"


def interval(lo: Any, hi: Any, n: Any) -> str:
    """'0.7953 to 0.8293'; fewer than two seeds: 'n/a'."""
    return f"{lo:.4f} to {hi:.4f}" if n and n >= 2 and _finite(lo) and _finite(hi) else "n/a"


def _finite(x: Any) -> bool:
    return finite(x)


def _seeds(row) -> str:
    return f"{row['seeds']}" if row["seeds"] == row["runs"] else f"{row['seeds']} of {row['runs']}"


def _method_cell(row) -> str:
    return method_label(row["method"])


def confirmed_rows(data: ReportData) -> tuple[list[str], list[list[str]]]:
    """The headline table: each method's confirmed winner, then the baselines."""
    rows = []
    for _, w in data.confirmed.winners.iterrows():
        rows.append([_method_cell(w), w["configuration"], cell("adapter_params", w["adapter_params"]), _seeds(w),
                     mean_std(w["val_mean"], w["val_std"], w["val_n"]), mean_std(w["test_mean"], w["test_std"], w["test_n"]),
                     interval(w["test_lo"], w["test_hi"], w["test_n"])])
    return CONFIRMED_HEADS, rows + baseline_rows(data, len(CONFIRMED_HEADS))


def baseline_rows(data: ReportData, width: int) -> list[list[str]]:
    """[label, '', ..., val, test, ''] per baseline, aligned with the headline table's columns."""
    if data.baselines is None:
        return []
    out = []
    for name, scores in data.baselines.scores.items():
        row = [BASELINE_LABELS.get(name, name), "baseline"] + [""] * (width - 2)
        row[4], row[5] = fmt_score(scores.get("val")), fmt_score(scores.get("test"))
        out.append(row)
    return out


def fmt_score(x: Any) -> str:
    return f"{x:.4f}" if _finite(x) else ""


def all_confirmed_rows(data: ReportData) -> tuple[list[str], list[list[str]]]:
    rows = []
    for _, c in data.confirmed.table.iterrows():
        rows.append([_method_cell(c), c["configuration"], cell("adapter_params", c["adapter_params"]), _seeds(c),
                     mean_std(c["val_mean"], c["val_std"], c["val_n"]), interval(c["val_lo"], c["val_hi"], c["val_n"]),
                     mean_std(c["test_mean"], c["test_std"], c["test_n"]), interval(c["test_lo"], c["test_hi"], c["test_n"]),
                     "yes" if c["winner"] else "", fmt(c["confirms_trial"]) or fmt(c["confirms"]), str(c["config"])])
    return ALL_CONFIRMED_HEADS, rows


def confirmed_note(data: ReportData) -> str:
    pct = f"{100 * data.confirmed.level:g}%"
    return (f"Each method's confirmed configuration is the one with the highest mean validation score over its seeds; "
            f"test never takes part in the choice. ± is the standard deviation over seeds; the {pct} CI is Student's t "
            "over seeds (n/a with one seed). Baselines are scored once on the same splits.")


def verdict_lines(data: ReportData) -> list[str]:
    """The sentences of 'Which method wins on this dataset'."""
    if data.confirmed is None:
        return []
    comparisons = data.confirmed.comparisons
    if not comparisons:
        winners = data.confirmed.winners
        if winners.empty:
            return ["No confirmed configuration completed a seed: nothing to compare yet."]
        return [f"Only {_method_cell(winners.iloc[0])} has a confirmed configuration with a completed seed: "
                "there is no other method to compare it with."]
    return [c.sentence for c in comparisons]


# ---- the frontier: cells shared by both renderers -----------------------------------------------------------

EFFORT_HEADS = ["cell", "trials", "completed", "stopped early", "epochs trained", "compute s", "best lr",
                "best trial (validation)", "status"]
WARNINGS_TITLE = "Warnings: what would change the comparison"
TABLE_TITLE = "Method x budget: confirmed test score"
COMPARE_TITLE = "Comparisons within and across budget levels"
EFFORT_TITLE = "Effort per cell"


def frontier_table(data: ReportData) -> tuple[list[str], list[list[str]]]:
    """Rows: methods; columns: budget levels; a cell: its winner's test mean [CI], parameters, seeds (or why not)."""
    f = data.frontier
    pct = f"{100 * f.level:g}%"
    heads = ["method"] + [f"{b:,} (test, {pct} CI)" for b in f.levels]
    rows = [[method_label(m)] + [cell_text(f.cell(m, b), f.level) for b in f.levels] for m in f.methods]
    return heads, rows


def effort_rows(data: ReportData) -> tuple[list[str], list[list[str]]]:
    rows = []
    for c in data.frontier.cells:
        rows.append([c["cell"], str(c["trials"]), str(c["completed"]), str(c["stopped_early"]), fmt(c["epochs"], 4),
                     f"{c['compute_s']:.0f}", fmt_lr(c["best_lr"]), fmt_score(c["best_search_score"]),
                     c["status"] + (f": {c['reason']}" if c.get("reason") else "")])
    return EFFORT_HEADS, rows


def comparison_lines(data: ReportData) -> list[tuple[str, list[str]]]:
    f = data.frontier
    out = []  # the comparisons within a level are the "Which method wins" section's: not repeated here
    if f.across:
        out.append(("Across budget levels (a smaller adapter against a larger one, paired by seed)", f.across))
    return out


EFFORT_NOTE = ("Effort is what the search spent on each cell: its trials, the epochs they trained (summed over trials; "
               "ASHA stops some early) and their wall time. A fair comparison gives every cell the same trials.")


# ---- Markdown --------------------------------------------------------------------------------------

def render_markdown(data: ReportData) -> str:
    out = [f"# Search report: {data.dataset}", ""]
    for key, value in _summary_lines(data):
        out.append(f"- **{key}**: {md_escape(value)}")
    out.append("")
    for note in data.notes:
        out += [f"> {md_escape(note)}", ""]
    if data.frontier is not None and data.frontier.warnings:
        out += [f"## {WARNINGS_TITLE}", ""] + [f"- {md_escape(w)}" for w in data.frontier.warnings] + [""]
    out += _confirmed_markdown(data)
    out += _frontier_markdown(data)
    out += ["## Best configuration per method", ""]
    if data.best.empty:
        out += ["No trial finished with a score (completed or stopped early).", ""]
    else:
        out += [md_table(*table_rows(data.best, best_columns())), ""]
        out += ["Ranking: trials that trained every epoch before trials ASHA stopped early, then the final score. "
                "*best ckpt score* is the best evaluation of the trial, the checkpoint whose adapter was saved.", ""]
    out += [f"## Top {data.top_k} trials", ""]
    out += [md_table(*table_rows(data.top, TOP_COLUMNS)) if not data.top.empty else "No scored trial.", ""]
    for fig in data.figures:
        out += [f"## {fig.title}", ""]
        if fig.note:
            out += [fig.note, ""]
        if fig.path is not None:
            out += [f"![{fig.title}]({fig.path.name})", ""]
        if fig.key == "importance":
            for scope, text in _importance_sections(data):
                out.append(f"- {scope + ': ' if scope else ''}{md_escape(text)}")
            out.append("")
    if data.cross is not None and not data.cross.empty:
        out += ["## Best configuration by dataset", "", md_table(*table_rows(data.cross, cross_columns())), ""]
    return "\n".join(out).rstrip() + "\n"


def _figure_markdown(fig: Figure) -> list[str]:
    out = [f"## {fig.title}", ""]
    if fig.note:
        out += [fig.note, ""]
    if fig.path is not None:
        out += [f"![{fig.title}]({fig.path.name})", ""]
    return out


def _frontier_markdown(data: ReportData) -> list[str]:
    if data.frontier is None or not data.frontier.cells:
        return []
    out = [f"## {TABLE_TITLE}", "", md_table(*frontier_table(data)), ""]
    lines = comparison_lines(data)
    if lines:
        out += [f"## {COMPARE_TITLE}", ""]
        for title, sentences in lines:
            out += [f"{title}:", ""] + [f"- {md_escape(t)}" for t in sentences] + [""]
    out += [f"## {EFFORT_TITLE}", "", md_table(*effort_rows(data)), "", EFFORT_NOTE, ""]
    for fig in data.frontier_figures:
        if fig.path is not None:
            out += _figure_markdown(fig)
    return out


def _confirmed_markdown(data: ReportData) -> list[str]:
    out = ["## Confirmed results (held-out test)", ""]
    if data.confirmed is None:
        out += [NO_CONFIRMATION, ""]
        baselines = baseline_rows(data, len(CONFIRMED_HEADS))
        if baselines:
            out += [md_table(["baseline", "", "validation", "test"], [[r[0], r[1], r[4], r[5]] for r in baselines]), ""]
        return out
    out += [md_table(*confirmed_rows(data)), "", confirmed_note(data), ""]
    out += ["## Which method wins on this dataset", ""]
    out += [f"- {md_escape(line)}" for line in verdict_lines(data)] + [""]
    out += ["## Every confirmed configuration", "", md_table(*all_confirmed_rows(data)), ""]
    return out


# ---- HTML ------------------------------------------------------------------------------------------

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;white-space:nowrap}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}
dt{font-weight:600}dd{margin:0}img{max-width:100%;border:1px solid #eee}.note{color:#555;font-style:italic}
code{background:#f3f3f3;padding:0 .2em}
"""


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_html(data: ReportData) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Search report: {e(data.dataset)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Search report: {e(data.dataset)}</h1><dl>",
    ]
    for key, value in _summary_lines(data):
        parts.append(f"<dt>{e(key)}</dt><dd>{e(str(value))}</dd>")
    parts.append("</dl>")
    for note in data.notes:
        parts.append(f'<p class="note">{e(note)}</p>')
    if data.frontier is not None and data.frontier.warnings:
        parts.append(f"<h2>{e(WARNINGS_TITLE)}</h2>")
        parts.append("<ul>" + "".join(f"<li>{e(w)}</li>" for w in data.frontier.warnings) + "</ul>")
    parts += _confirmed_html(data)
    parts += _frontier_html(data)
    parts.append("<h2>Best configuration per method</h2>")
    if data.best.empty:
        parts.append("<p>No trial finished with a score (completed or stopped early).</p>")
    else:
        parts.append(html_table(*table_rows(data.best, best_columns())))
        parts.append('<p class="note">Ranking: trials that trained every epoch before trials ASHA stopped early, then the '
                     "final score. <em>best ckpt score</em> is the best evaluation of the trial, the checkpoint whose "
                     "adapter was saved.</p>")
    parts.append(f"<h2>Top {data.top_k} trials</h2>")
    parts.append(html_table(*table_rows(data.top, TOP_COLUMNS)) if not data.top.empty else "<p>No scored trial.</p>")
    for fig in data.figures:
        parts.append(f"<h2>{e(fig.title)}</h2>")
        if fig.note:
            parts.append(f'<p class="note">{e(fig.note)}</p>')
        if fig.path is not None:
            parts.append(f'<img alt="{e(fig.title)}" src="{png_data_uri(fig.path)}">')
        if fig.key == "importance":
            items = "".join(f"<li>{e(scope + ': ' if scope else '')}{e(text)}</li>" for scope, text in _importance_sections(data))
            parts.append(f"<ul>{items}</ul>")
    if data.cross is not None and not data.cross.empty:
        parts.append("<h2>Best configuration by dataset</h2>")
        parts.append(html_table(*table_rows(data.cross, cross_columns())))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _frontier_html(data: ReportData) -> list[str]:
    e = html.escape
    if data.frontier is None or not data.frontier.cells:
        return []
    parts = [f"<h2>{e(TABLE_TITLE)}</h2>", html_table(*frontier_table(data))]
    lines = comparison_lines(data)
    if lines:
        parts.append(f"<h2>{e(COMPARE_TITLE)}</h2>")
        for title, sentences in lines:
            parts.append(f"<p>{e(title)}:</p><ul>" + "".join(f"<li>{e(t)}</li>" for t in sentences) + "</ul>")
    parts += [f"<h2>{e(EFFORT_TITLE)}</h2>", html_table(*effort_rows(data)), f'<p class="note">{e(EFFORT_NOTE)}</p>']
    for fig in data.frontier_figures:
        if fig.path is not None:
            parts.append(f"<h2>{e(fig.title)}</h2>")
            if fig.note:
                parts.append(f'<p class="note">{e(fig.note)}</p>')
            parts.append(f'<img alt="{e(fig.title)}" src="{png_data_uri(fig.path)}">')
    return parts


def _confirmed_html(data: ReportData) -> list[str]:
    e = html.escape
    parts = ["<h2>Confirmed results (held-out test)</h2>"]
    if data.confirmed is None:
        text = e(NO_CONFIRMATION).replace(f"`{e(CONFIRM_COMMAND)}`", f"<code>{e(CONFIRM_COMMAND)}</code>")
        parts.append(f"<p>{text}</p>")
        baselines = baseline_rows(data, len(CONFIRMED_HEADS))
        if baselines:
            parts.append(html_table(["baseline", "", "validation", "test"], [[r[0], r[1], r[4], r[5]] for r in baselines]))
        return parts
    parts += [html_table(*confirmed_rows(data)), f'<p class="note">{e(confirmed_note(data))}</p>']
    parts.append("<h2>Which method wins on this dataset</h2>")
    parts.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in verdict_lines(data)) + "</ul>")
    parts += ["<h2>Every confirmed configuration</h2>", html_table(*all_confirmed_rows(data))]
    return parts


def render_index_markdown(cross, reports: list[tuple[str, str]], generated: str) -> str:
    """The cross-dataset page: the best configuration per dataset and method, and links to each report."""
    out = ["# Search reports: best configuration by dataset", "", f"generated {generated}", ""]
    out += [md_table(*table_rows(cross, cross_columns())) if cross is not None and not cross.empty else "No scored trial.", ""]
    out += ["## Reports", ""]
    out += [f"- [{md_escape(name)}]({rel}/report.md)" for name, rel in reports]
    return "\n".join(out) + "\n"


def render_index_html(cross, reports: list[tuple[str, str]], generated: str) -> str:
    e = html.escape
    table = html_table(*table_rows(cross, cross_columns())) if cross is not None and not cross.empty else "<p>No scored trial.</p>"
    links = "".join(f'<li><a href="{e(rel)}/report.html">{e(name)}</a></li>' for name, rel in reports)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Search reports by dataset</title>'
        f"<style>{CSS}</style></head><body><h1>Search reports: best configuration by dataset</h1>"
        f'<p class="note">generated {e(generated)}</p>{table}<h2>Reports</h2><ul>{links}</ul></body></html>\n'
    )
