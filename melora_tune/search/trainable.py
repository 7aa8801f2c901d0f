"""The Ray Tune trainable of a search: one sampled configuration -> one ``tune_trial``."""

from __future__ import annotations

from typing import Any

from melora_tune.adapters import HYPERPARAMS, AdapterConfig, get_method

BASE_KEY = "trial"  # the param_space key holding the base TrialConfig dict
ADAPTER_KEYS = ("method", *HYPERPARAMS, "alpha", "dropout")


def trial_config(config: dict[str, Any]) -> dict[str, Any]:
    """The full TrialConfig dict of a sampled configuration (base config + the searched values).

    Hyperparameters the sampled method does not use go back to their defaults, so that two
    trials of one configuration have equal configs whatever else the space holds.
    """
    base = config[BASE_KEY]
    adapter = dict(base["adapter"])
    for key in ADAPTER_KEYS:
        if key in config:
            adapter[key] = config[key]
    uses = get_method(adapter["method"]).hyperparams
    for key in HYPERPARAMS:
        if key not in uses:
            adapter[key] = AdapterConfig.model_fields[key].default
    training = {**base["training"], "lr": float(config["lr"])}
    return {**base, "adapter": adapter, "training": training}


def search_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable. ``config``: the base trial dict under "trial" plus what the space sampled
    (method, n, r, ..., lr, and informational keys such as adapter_params and optuna_trial)."""
    from melora_tune.trial import tune_trial

    tune_trial({"trial": trial_config(config)})


def trial_dirname(trial) -> str:
    """Short, filesystem-safe trial folder names (the sampled parameter names contain '|', '=' and ',')."""
    return f"trial_{trial.trial_id}"
