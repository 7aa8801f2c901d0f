"""What a user takes away from a search: reports (Markdown, HTML, PNG plots) read back from MLflow.

``import melora_tune.report`` stays light: MLflow, pandas, matplotlib and Optuna load inside the
functions that need them.

* ``melora_tune.records.read`` (below this layer) reads the searches, trials and confirmations an MLflow store
  holds as pandas DataFrames, the best trial per method and the baselines on the parent run.
* ``stats``: mean and Student-t interval over seeds, paired differences, a verdict in words.
* ``confirmed``: the confirmed configurations, each method's winner (chosen on validation), their comparisons.
* ``importance``: Optuna's parameter importance on the search's study.
* ``plots``: the PNG figures (budget frontier, n x r heatmap, learning-rate sensitivity, learning curves, importance).
* ``render``: Markdown and a self-contained HTML page (PNGs embedded as base64).
* ``build``: all of the above for one search, written to a folder and logged on the search's parent run.
* ``cli``: ``melora-tune report``.
"""

from __future__ import annotations

__all__ = ["build_report", "build_reports"]


def build_report(*args, **kwargs):
    """See ``melora_tune.report.build.build_report``."""
    from melora_tune.report.build import build_report as _build  # heavy: MLflow, pandas, matplotlib on first use

    return _build(*args, **kwargs)


def build_reports(*args, **kwargs):
    """See ``melora_tune.report.build.build_reports``."""
    from melora_tune.report.build import build_reports as _build  # heavy: MLflow, pandas, matplotlib on first use

    return _build(*args, **kwargs)
