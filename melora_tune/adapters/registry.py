"""The method registry: every adapter method declares everything about itself in one place.

A method is one module under ``melora_tune/adapters/`` that defines a ``Method``
subclass (``adapters.method``) and calls ``register_method`` on it (as PEFT's
``register_peft_method`` does). Everything else derives from the registry: the budget
enumerator (``adapters.budget``), the conditional Optuna space (``search.space``), the
YAML and CLI validation and their "did you mean", the MLflow params, progress lines,
report columns, plots and the PEFT export. Nothing outside a method's module names a
method.

A method's hyperparameters are names of the vocabulary (``adapters.hyperparams``): it
lists the ones it uses in ``hyperparams``, in the order a conditional space asks for
them (parents first), and declares the ones that are its own (a ``HyperParam``: meaning,
bounds, default, default choices given the layer shapes) in ``declares``. Registering it
adds those to the vocabulary; unregistering removes the ones no other method uses.

This module sits below the adapter config (which looks methods up here), so it holds
methods without importing their class: anything with the ``Method`` interface registers.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from melora_tune.adapters.hyperparams import HYPERPARAMS, add_hyperparams, drop_hyperparams
from melora_tune.errors import Registry

_REGISTRY: Registry = Registry("adapter method", choose="choose one of")  # name -> Method instance


def register_method(method: Any) -> Any:
    """Add a method (a ``Method`` instance or subclass); usable as a class decorator. Re-registering a name replaces it."""
    instance = method() if isinstance(method, type) else method
    others = {k for m in _REGISTRY.values() if m.name != instance.name for k in m.hyperparams}
    try:
        add_hyperparams(instance.hyperparams, getattr(instance, "declares", ()), taken=others)
    except ValueError as err:
        raise ValueError(f"method {instance.name}: {err}") from None
    old = _REGISTRY.get(instance.name)
    _REGISTRY[instance.name] = instance
    if old is not None:
        _drop_unused(old.hyperparams)
    return method


def unregister_method(name: str) -> None:
    """Remove a method, and the hyperparameters only it used."""
    gone = _REGISTRY.pop(name, None)
    if gone is not None:
        _drop_unused(gone.hyperparams)


def _drop_unused(names) -> None:
    used = {k for m in _REGISTRY.values() for k in m.hyperparams}
    drop_hyperparams(k for k in names if k not in used)


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> Any:
    """The registered ``Method`` (UsageError with the closest name otherwise)."""
    return _REGISTRY.lookup(name)


def all_methods() -> list[Any]:
    return list(_REGISTRY.values())


def owners(hyperparam: str) -> tuple[str, ...]:
    """The methods that use a hyperparameter."""
    return tuple(m.name for m in _REGISTRY.values() if hyperparam in m.hyperparams)


def column_groups() -> list[tuple[str, ...]]:
    """The vocabulary as summary-table columns: tied hyperparameters left out (the run name shows them when
    they differ), consecutive ones that the same methods use sharing a column (PRoLoRA's u/m)."""
    groups: list[tuple[str, ...]] = []
    for name, hp in HYPERPARAMS.items():
        if hp.tied_to:
            continue
        if groups and set(owners(groups[-1][-1])) == set(owners(name)) and len(owners(name)) < len(_REGISTRY):
            groups[-1] = (*groups[-1], name)
        else:
            groups.append((name,))
    return groups


def table_hyperparams() -> tuple[str, ...]:
    """The hyperparameters the report tables show (untied ones: n, r, u, m)."""
    return tuple(k for k, hp in HYPERPARAMS.items() if not hp.tied_to)


def optional_hyperparams() -> tuple[str, ...]:
    """The hyperparameters some registered method does not use (a table drops their column when no row has them)."""
    return tuple(k for k in HYPERPARAMS if len(owners(k)) < len(_REGISTRY))


def describe(hp: Mapping[str, Any]) -> str:
    """'melora n=4 r=2 lr=1.2e-3': what a trial is, in a few words (run names, tables, progress)."""
    method = _REGISTRY.get(hp.get("method"))
    text = method.describe(hp) if method else str(hp.get("method", "?"))
    if hp.get("lr") is not None:
        text += f" lr={format_lr(hp['lr'])}"
    return text


def format_lr(lr: float) -> str:
    if lr is None or not math.isfinite(lr):
        return "?"  # a trial that never started has no lr
    mantissa, exp = f"{lr:.1e}".split("e")
    return f"{mantissa}e{int(exp)}"
