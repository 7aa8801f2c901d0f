"""The Ray Tune trainable of a search: one sampled configuration -> one ``tune_trial``."""

from __future__ import annotations

from typing import Any

from melora_tune.trial import tune_trial
from melora_tune.trial.config import TRIAL_KEY, TrialConfig


def trial_config(config: dict[str, Any]):
    """The TrialConfig of a sampled configuration: the base config + the searched values (``TrialConfig.from_sampled``)."""
    return TrialConfig.from_sampled(config[TRIAL_KEY], config)


def search_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable. ``config``: the base TrialConfig dict under "trial" plus what the space sampled
    (method, n, r, ..., lr, and informational keys such as adapter_params and optuna_trial)."""
    tune_trial(trial_config(config))


def trial_dirname(trial) -> str:
    """Short, filesystem-safe trial folder names (the sampled parameter names contain '|', '=' and ',')."""
    return f"trial_{trial.trial_id}"
