"""Live progress (one line per change) and the final summary table of a search."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from ray.tune import Callback

from melora_tune.adapters import describe, format_lr, get_method
from melora_tune.adapters.hyperparams import HYPERPARAMS
from melora_tune.adapters.registry import column_groups
from melora_tune.search.searcher import ENDED_STATUSES, outcome


from melora_tune.records import SCORED, rank_key
from melora_tune.records import finite as _finite


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ProgressCallback(Callback):
    """Prints ``[elapsed] event | running R, done D (stopped S, failed F), pending P | best ... | ETA ...``."""

    def __init__(self, num_samples: int, max_concurrent: int, max_t: float, time_attr: str = "epoch",
                 write: Callable[[str], None] | None = None) -> None:
        self.num_samples = num_samples
        self.max_concurrent = max(1, max_concurrent)
        self.max_t = max_t
        self.time_attr = time_attr
        self.write = write
        self.t0 = time.time()
        self._started: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["write"] = None
        return state

    def setup(self, **info):
        self.t0 = time.time()

    def _print(self, line: str) -> None:
        (self.write or (lambda s: print(s, file=sys.stdout, flush=True)))(line)

    # ---- events -------------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self._started.setdefault(trial.trial_id, time.time())
        params = trial.config.get("adapter_params")
        self._emit(trials, f"start {describe(trial.config)} ({params:,} params)" if params else f"start {describe(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        score = result.get("score")
        if result.get("status") == "diverged":
            text = f"diverged: {result.get('reason')}"
        else:
            text = f"{self.time_attr} {_num(result.get(self.time_attr))}/{self.max_t} score {_num(score)}"
        self._emit(trials, f"{describe(trial.config)}: {text}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        kind = outcome(trial.last_result, False, self.max_t, self.time_attr)
        score = (trial.last_result or {}).get("score")
        text = f"{kind.replace('_', ' ')} {describe(trial.config)}" + (f" score {_num(score)}" if _finite(score) else "")
        self._emit(trials, text, ending=(trial.trial_id, kind))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._emit(trials, f"failed {describe(trial.config)}", ending=(trial.trial_id, "failed"))

    # ---- the status line ---------------------------------------------------------------------
    def _emit(self, trials, event: str, ending: tuple[str, str] | None = None) -> None:
        """``ending``: (trial id, outcome) of a trial Tune is ending right now (its status is not updated yet)."""
        counts = {"running": 0, "completed": 0, "stopped_early": 0, "diverged": 0, "failed": 0, "interrupted": 0}
        best: tuple[bool, float, str] | None = None
        durations: list[float] = []
        progress_left = 0.0
        for t in trials:
            st = str(t.status)
            res = t.last_result or {}
            if ending and t.trial_id == ending[0]:
                st = "ERROR" if ending[1] == "failed" else ("INTERRUPTED" if ending[1] == "interrupted" else "TERMINATED")
            if st == "INTERRUPTED":
                continue
            if st == "RUNNING":
                counts["running"] += 1
                done_t = res.get(self.time_attr) if _finite(res.get(self.time_attr)) else 0.0
                progress_left += max(0.0, 1.0 - done_t / self.max_t) if self.max_t else 1.0
                continue
            if st not in ENDED_STATUSES:
                continue
            kind = "failed" if st == "ERROR" else outcome(res, False, self.max_t, self.time_attr)
            counts[kind] += 1
            if _finite(res.get("time_total_s")):
                durations.append(float(res["time_total_s"]))
            score = res.get("score")
            if kind in SCORED and _finite(score):
                cand = (*rank_key(kind, score)[:2], describe(t.config))
                if best is None or cand[:2] > best[:2]:
                    best = cand
        done = sum(v for k, v in counts.items() if k not in ("running", "interrupted"))
        pending = max(0, self.num_samples - done - counts["running"])
        parts = [
            f"[{_duration(time.time() - self.t0)}] {event}",
            f"running {counts['running']}, done {done}/{self.num_samples} (stopped {counts['stopped_early']}, "
            f"diverged {counts['diverged']}, failed {counts['failed']}), pending {pending}",
        ]
        if best:
            parts.append(f"best {best[1]:.4f} {best[2]}" + ("" if best[0] else " (partial)"))
        if durations and (pending or counts["running"]):
            mean = sum(durations) / len(durations)
            eta = mean * (pending + progress_left) / self.max_concurrent
            parts.append(f"ETA ~{_duration(eta)}")
        self._print(" | ".join(parts))


def _num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4f}" if math.isfinite(x) and not x.is_integer() else f"{x:g}"
    return str(x)


# ---- the summary -------------------------------------------------------------------------

@dataclass
class TrialRow:
    trial_id: str
    method: str
    hyperparams: dict[str, Any]  # the registered hyperparameters' values in the trial's config (row.r reads one)
    lr: float
    adapter_params: int
    equivalent_rank: int
    score: float | None
    status: str
    epochs: float | None
    optuna_trial: int | None = None
    checkpoint: str | None = None
    best: bool = False
    budget: int | None = None  # the trial's budget level (its cell is method@budget)
    cell: str | None = None

    def __getattr__(self, name: str) -> Any:
        if name in HYPERPARAMS:
            return self.__dict__.get("hyperparams", {}).get(name)
        raise AttributeError(name)

    @property
    def label(self) -> str:
        return describe(self.to_hp())

    def to_hp(self) -> dict[str, Any]:
        return {"method": self.method, **self.hyperparams, "lr": self.lr}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in self.__dataclass_fields__:
            if k == "hyperparams":
                out.update(self.hyperparams)
            else:
                out[k] = getattr(self, k)
        return out


def summary_table(rows: list[TrialRow]) -> str:
    """One line per trial; the best trial of each method is marked with '*'."""
    groups = column_groups()  # n, r, u/m: hyperparameters the same methods use share a column
    levels = len({r.budget for r in rows}) > 1  # several budget levels: a budget column, rows by level
    header = ["", "trial", *(["budget"] if levels else []), "method", *("/".join(g) for g in groups), "lr", "params",
              "eq.rank", "epochs", "score", "status"]
    cells = []
    for row in sorted(rows, key=lambda r: (r.budget or 0, r.method, -(r.score if r.score is not None else -math.inf))):
        uses = set(get_method(row.method).hyperparams)
        cells.append([
            "*" if row.best else "",
            str(row.optuna_trial if row.optuna_trial is not None else row.trial_id),
            *([f"{row.budget:,}" if row.budget else ""] if levels else []),
            row.method,
            *("/".join(str(row.hyperparams.get(k)) for k in g) if set(g) <= uses else "" for g in groups),
            format_lr(row.lr),
            f"{row.adapter_params:,}",
            str(row.equivalent_rank),
            _num(row.epochs) if row.epochs is not None else "",
            f"{row.score:.4f}" if row.score is not None else "-",
            row.status.replace("_", " "),
        ])
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    left = (0, header.index("method"), len(header) - 1)
    line = lambda vals: "  ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths))).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths]), *(line(c) for c in cells)]
    out.append("* best of its cell: method" + (" x budget level" if levels else "") + " (full-fidelity trials first)")
    return "\n".join(out)
