"""Budget-constrained hyperparameter search: YAML spaces, a feasible-only Optuna space, ASHA, Ray Tune, MLflow.

``import melora_tune.search`` stays light: Ray, Optuna and MLflow load inside the functions that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from melora_tune.search.schema import SearchSpace, load_space, parse_space

if TYPE_CHECKING:  # pragma: no cover
    from melora_tune.search.runner import SearchResult


def run_search(space, *, num_samples=None, address=None, tracking_uri=None, storage_path=None, resume=False, **kwargs: Any) -> "SearchResult":
    """Run or resume a search (see ``melora_tune.search.runner.run_search``)."""
    from melora_tune.search.runner import run_search as _run  # heavy: Ray Tune, MLflow on first use

    return _run(space, num_samples=num_samples, address=address, tracking_uri=tracking_uri, storage_path=storage_path,
                resume=resume, **kwargs)


def __getattr__(name: str):
    if name == "SearchResult":
        from melora_tune.search.runner import SearchResult  # heavy: Ray Tune, MLflow on first use

        return SearchResult
    if name in ("FeasibleSpace", "build_space"):
        from melora_tune.search import space as _space  # heavy: torch (the adapters) on first use

        return getattr(_space, name)
    raise AttributeError(name)


__all__ = ["SearchSpace", "SearchResult", "FeasibleSpace", "build_space", "load_space", "parse_space", "run_search"]
