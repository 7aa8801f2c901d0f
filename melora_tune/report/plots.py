"""The report's figures as PNG files (matplotlib, Agg backend: no display needed).

Every function takes the trials DataFrame of ``read.trials_frame`` (the learning curves: the evaluations
of ``read.curves_frame``) and returns the path it wrote, or None when the data has nothing to draw (the
report then says why). ``baselines`` ({name: validation score}, names of ``records.BASELINES``) draws each
baseline as a labelled horizontal line: the trials' scores are validation scores, so are these.
"""

from __future__ import annotations

import math
from pathlib import Path

from melora_tune.adapters.registry import all_methods, get_method
from melora_tune.records import BASELINE_LABELS
from melora_tune.records.read import SCORED

DPI = 110
BASELINE_STYLES = {"majority": ":", "probe": "-."}  # line style per baseline; all grey, apart from the methods' colours


def _style(method: str) -> tuple[str | None, str]:
    """(colour, marker) of a method's series, as the method declares them (unknown names: defaults)."""
    spec = next((m for m in all_methods() if m.name == method), None)
    return (spec.color, spec.marker) if spec else (None, "o")


def _plt():
    import matplotlib  # heavy: matplotlib, loaded where plots are drawn

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # heavy: matplotlib, loaded where plots are drawn

    return plt


def _scored(df):
    import numpy as np  # heavy: numpy, loaded where arrays are used

    return df[df["status"].isin(SCORED) & np.isfinite(df["score"].astype(float))]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    _plt().close(fig)
    return path


def _series(ax, data, x: str, method: str) -> None:
    """Completed trials filled, trials ASHA stopped early hollow."""
    color, marker = _style(method)
    full = data[data["status"] == "completed"]
    early = data[data["status"] != "completed"]
    ax.scatter(full[x].astype(float), full["score"], marker=marker, color=color, label=f"{method}", zorder=3)
    if not early.empty:
        ax.scatter(early[x].astype(float), early["score"], marker=marker, facecolors="none", edgecolors=color,
                   label=f"{method} (stopped early)", zorder=3)


def _baseline_lines(ax, baselines: dict[str, float] | None) -> None:
    """One labelled horizontal line per baseline score."""
    for name, score in (baselines or {}).items():
        ax.axhline(float(score), color="#555555", ls=BASELINE_STYLES.get(name, "--"), lw=1.2, zorder=2,
                   label=f"{BASELINE_LABELS.get(name, name)} {float(score):.3f}")


def frontier(df, path: str | Path, budget: float | list[int] | None = None,
             baselines: dict[str, float] | None = None) -> Path | None:
    """Score vs trainable adapter parameters, one series per method, with each method's best-so-far frontier;
    ``budget``: the search's budget, or its levels (a dashed line each)."""
    data = _scored(df).dropna(subset=["adapter_params"])
    if data.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, group in data.groupby("method", sort=True):
        _series(ax, group, "adapter_params", method)
        best = group.groupby("adapter_params")["score"].max().sort_index()
        ax.step(best.index.astype(float), best.cummax().values, where="post", color=_style(method)[0], alpha=0.5, lw=1.2)
    levels = budget if isinstance(budget, (list, tuple)) else [budget] if budget else []
    for i, level in enumerate(levels):  # several levels (cells): one line each, one legend entry
        ax.axvline(float(level), color="grey", ls="--", lw=1,
                   label=(f"budget {int(level):,}" if len(levels) == 1 else "budget levels") if i == 0 else None)
    _baseline_lines(ax, baselines)
    ax.set_xlabel("trainable adapter parameters")
    ax.set_ylabel("score")
    ax.set_title("Budget frontier: score vs adapter parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def heatmap_n_r(df, path: str | Path, method: str | None = None) -> Path | None:
    """Best score over n x r of a method searched over both (MELoRA), one cell per (n, r) tried; untried blank."""
    import numpy as np  # heavy: numpy, loaded where arrays are used

    if method is None:  # the first searched method with both an n and an r
        method = next((m.name for m in all_methods() if {"n", "r"} <= set(m.hyperparams)
                       and (df["method"] == m.name).any()), None) if not df.empty else None
        if method is None:
            return None

    data = _scored(df)
    data = data[(data["method"] == method)].dropna(subset=["n", "r"])
    if data.empty:
        return None
    table = data.groupby(["n", "r"])["score"].max().unstack("r")
    ns = sorted(int(v) for v in table.index)
    rs = sorted(int(v) for v in table.columns)
    table.index = [int(v) for v in table.index]
    table.columns = [int(v) for v in table.columns]
    grid = table.reindex(index=ns, columns=rs).to_numpy(dtype=float, na_value=np.nan)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.3 * len(rs) + 3.0, 0.9 * len(ns) + 2.2))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    finite = grid[np.isfinite(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.01, hi + 0.01
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=lo, vmax=hi, aspect="auto", origin="lower")
    for i in range(len(ns)):
        for j in range(len(rs)):
            if np.isfinite(grid[i, j]):
                frac = (grid[i, j] - lo) / (hi - lo)
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=9, color="black" if frac > 0.6 else "white")
    ax.set_xticks(range(len(rs)), [str(r) for r in rs])
    ax.set_yticks(range(len(ns)), [str(n) for n in ns])
    ax.set_xlabel("r (rank of each mini-LoRA)")
    ax.set_ylabel("n (number of mini-LoRAs)")

    ax.set_title(f"{get_method(method).label}: best score over n x r")
    fig.colorbar(im, ax=ax, label="best score")
    return _save(fig, Path(path))


def lr_sensitivity(df, path: str | Path, baselines: dict[str, float] | None = None) -> Path | None:
    """Score vs learning rate (log scale), one series per method."""
    data = _scored(df).dropna(subset=["lr"])
    data = data[data["lr"] > 0]
    if data.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, group in data.groupby("method", sort=True):
        _series(ax, group.sort_values("lr"), "lr", method)
    _baseline_lines(ax, baselines)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("score")
    ax.set_title("Learning-rate sensitivity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def learning_curves(curves, path: str | Path, baselines: dict[str, float] | None = None, *,
                    ylabel: str = "score (validation)", title: str = "Learning curves: score at every evaluation",
                    log_y: bool = False) -> Path | None:
    """Score (or ``curves``' other metric) at every evaluation vs epoch, one line per trial, one colour per method.

    Trials that trained every epoch are solid; trials ASHA stopped early are dashed and end in a hollow marker
    where they stopped (their lines are shorter); failed, diverged and interrupted trials are dotted and faint.
    """
    from matplotlib.lines import Line2D  # heavy: matplotlib, loaded where plots are drawn

    if curves is None or curves.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    handles, styles_used = [], set()
    for method, runs in curves.groupby("method", sort=True):
        color, marker = _style(method)
        for _, points in runs.groupby("run_id", sort=False):
            points = points.sort_values("step")
            status = points["status"].iloc[0]
            kind = "completed" if status == "completed" else "stopped_early" if status == "stopped_early" else "other"
            styles_used.add(kind)
            ls, alpha = {"completed": ("-", 0.8), "stopped_early": ("--", 0.8), "other": (":", 0.4)}[kind]
            line, = ax.plot(points["epoch"], points["score"], ls=ls, color=color, alpha=alpha, lw=1.2, marker=marker,
                            markersize=3, zorder=3)
            color = line.get_color()  # a method without a declared colour keeps the one matplotlib gave its first line
            if kind == "stopped_early":
                ax.scatter(points["epoch"].iloc[-1:], points["score"].iloc[-1:], marker=marker, s=45, facecolors="none",
                           edgecolors=color, zorder=4)
        handles.append(Line2D([], [], color=color, marker=marker, lw=1.2, label=method))
    if "stopped_early" in styles_used:
        handles.append(Line2D([], [], color="black", ls="--", marker="o", markerfacecolor="none", lw=1,
                              label="stopped early (ASHA)"))
    if "other" in styles_used:
        handles.append(Line2D([], [], color="black", ls=":", alpha=0.4, lw=1, label="failed / diverged / interrupted"))
    _baseline_lines(ax, baselines)
    handles += [h for h in ax.get_legend_handles_labels()[0] if h not in handles]
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8)
    return _save(fig, Path(path))


def importance_bars(scopes: dict[str, dict[str, float]], path: str | Path) -> Path | None:
    """Horizontal bars of parameter importance, one panel per scope."""
    scopes = {k: v for k, v in scopes.items() if v}
    if not scopes:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(scopes), figsize=(3.6 * len(scopes) + 0.6, 0.45 * max(len(v) for v in scopes.values()) + 1.8),
                             squeeze=False)
    for ax, (scope, values) in zip(axes[0], scopes.items()):
        items = sorted(values.items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in items], [v for _, v in items], color=_style(scope)[0] or "#7f7f7f")
        ax.set_xlim(0, 1)
        ax.set_title(scope, fontsize=10)
        ax.set_xlabel("importance (fANOVA)")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("Parameter importance")
    return _save(fig, Path(path))


def confirmed_frontier(cells: list[dict], path: str | Path, baselines: dict[str, float] | None = None,
                       level: float = 0.95) -> Path | None:
    """Confirmed test score (mean, ``level`` CI as error bars) against each cell winner's actual adapter parameter
    count (log x), one line per method across its levels; ``baselines``: their *test* scores as horizontal lines.
    ``cells``: ``report.frontier.Frontier.cells``."""
    done = [c for c in cells if c.get("status") == "confirmed" and c.get("adapter_params") and c.get("test_mean") is not None
            and math.isfinite(c["test_mean"])]
    if not done:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(c["method"] for c in done):
        mine = sorted((c for c in done if c["method"] == method), key=lambda c: c["adapter_params"])
        color, marker = _style(method)
        x = [float(c["adapter_params"]) for c in mine]
        y = [c["test_mean"] for c in mine]
        err = [[c["test_mean"] - c["test_lo"] if c["test_lo"] is not None and math.isfinite(c["test_lo"]) else 0 for c in mine],
               [c["test_hi"] - c["test_mean"] if c["test_hi"] is not None and math.isfinite(c["test_hi"]) else 0 for c in mine]]
        label = get_method(method).label if any(m.name == method for m in all_methods()) else method
        ax.errorbar(x, y, yerr=err, color=color, marker=marker, capsize=4, lw=1.4, label=label, zorder=3)
    for name, score in (baselines or {}).items():
        ax.axhline(float(score), color="#555555", ls=BASELINE_STYLES.get(name, "--"), lw=1.2, zorder=2,
                   label=f"{BASELINE_LABELS.get(name, name)} {float(score):.3f} (test)")
    ax.set_xscale("log")
    # the winners' own counts as ticks: log scale's default decades say little across two or three levels
    counts = sorted({float(c["adapter_params"]) for c in done})
    ax.set_xticks(counts, [f"{v:,.0f}" for v in counts])
    ax.minorticks_off()
    if len(counts) > 1:
        ax.set_xlim(counts[0] / 1.25, counts[-1] * 1.25)
    ax.set_xlabel("trainable adapter parameters of the cell's winner (log scale)")
    ax.set_ylabel(f"test score (mean, {100 * level:g}% CI over seeds)")
    ax.set_title("Parameter-efficiency frontier (confirmed)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def lr_curves(df, path: str | Path, lr_low: float | None = None, lr_high: float | None = None) -> Path | None:
    """Score against learning rate over each cell's trials: one panel per method, one line per budget level (trials
    in lr order; hollow: stopped early); dashed verticals: the searched range."""
    data = _scored(df).dropna(subset=["lr"])
    data = data[data["lr"] > 0]
    if data.empty:
        return None
    methods = list(dict.fromkeys(data["method"]))
    plt = _plt()
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods) + 0.6, 3.8), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    levels = sorted({float(b) for b in data["budget"].dropna()}) if "budget" in data else []
    for ax, method in zip(axes[0], methods):
        mine = data[data["method"] == method]
        groups = mine.groupby("budget", sort=True, dropna=False) if "budget" in mine else [(None, mine)]
        for budget, group in groups:
            group = group.sort_values("lr")
            idx = levels.index(float(budget)) if levels and budget == budget and budget is not None else 0
            color = cmap(idx / max(1, len(levels) - 1) * 0.85)
            label = f"{int(budget):,} params" if budget is not None and budget == budget else "trials"
            full = group[group["status"] == "completed"]
            early = group[group["status"] != "completed"]
            ax.plot(full["lr"], full["score"], color=color, lw=1, alpha=0.6)  # a line only joins full-fidelity scores
            ax.scatter(full["lr"], full["score"], color=color, label=label, zorder=3)
            ax.scatter(early["lr"], early["score"], facecolors="none", edgecolors=color, zorder=3)
        for bound in (lr_low, lr_high):
            if bound:
                ax.axvline(float(bound), color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (log scale)")
        ax.set_title(get_method(method).label if any(m.name == method for m in all_methods()) else method, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("score (validation)")
    fig.suptitle("Learning-rate curves per method (hollow: stopped early; dashed: searched range)")
    return _save(fig, Path(path))
