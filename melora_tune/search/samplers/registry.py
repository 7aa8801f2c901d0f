"""The sampler registry: every Optuna sampler a search can use declares itself in one module.

A sampler is one module under ``melora_tune/search/samplers/`` (or anywhere: a plug-in, a test) that
defines a ``Sampler`` subclass and calls ``register_sampler`` on it, as ``adapters.registry`` does for
adapter methods. Everything else derives from the registry: the ``sampler:`` key of a space and its
"did you mean", the dry run's "N trials by ..." line, ``search --help``, the search's ``BudgetOptunaSearch``
and the replay benchmark (``search/replay.py``).

A ``Sampler`` is a light description (no Optuna import); ``make`` builds the Optuna sampler when a search
or a replay starts.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, ClassVar

from melora_tune.errors import Registry

if TYPE_CHECKING:  # pragma: no cover
    import optuna

# The sampler of a space that names none. Random: on issue 24's tables (benchmarks/tables/v2/, protocol.py; 50 replay
# seeds, continuous learning rate, per cell and as one study, at 1 and 4 trials at once) no model-based sampler (TPE,
# GP, BOHB-style, Syne Tune's BOHB) got within half a point sooner than random + ASHA, on the table the choice was
# made on nor on the held-out one; the protocol's rule then takes the cheapest that is as good.
DEFAULT = "random"

# ``space`` below is a ``melora_tune.search.space.FeasibleSpace`` (not imported: the space module depends on
# the schema, which depends on this registry)


class Sampler:
    """What a sampler is. Subclass, set the class attributes, implement ``make``, ``register_sampler``."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""  # one line for search --help and the docs
    # Proposes every point of the finite space once (a grid): needs space.lr_choices, may take space.seeds and
    # record_test, and num_samples defaults to the grid's size.
    enumerates: ClassVar[bool] = False

    def make(self, space: Any, *, seed: int, n_startup_trials: int) -> "optuna.samplers.BaseSampler":
        """The Optuna sampler for one search over ``space`` (the feasible-only conditional space; its
        ``grid_size()``, ``lr_choices``, ... describe it). ``n_startup_trials``: random trials first, for
        samplers that model results."""
        raise NotImplementedError(f"sampler {self.name} does not implement make")

    def phrase(self, space: Any) -> str:
        """How the dry run says who proposes the trials: 'N trials by <phrase>'."""
        return f"the {self.name} sampler"

    def check(self) -> None:
        """Raise UsageError (what is missing and how to install it) when the sampler cannot run here: called
        when a space names it, so a missing optional package is refused before anything starts."""


_REGISTRY: Registry = Registry("sampler")  # name -> Sampler instance


def register_sampler(sampler: Sampler | type[Sampler]) -> Sampler | type[Sampler]:
    """Add a sampler (an instance or a class); usable as a class decorator. Re-registering a name replaces it."""
    _REGISTRY.add(sampler)
    return sampler


def unregister_sampler(name: str) -> None:
    _REGISTRY.pop(name, None)


def sampler_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def all_samplers() -> list[Sampler]:
    return list(_REGISTRY.values())


def get_sampler(name: str) -> Sampler:
    """The registered sampler (UsageError naming the known ones, with the closest, otherwise)."""
    return _REGISTRY.lookup(name)


def make_sampler(seed: int, n_startup_trials: int, kind: str = "tpe",
                 space: Any = None) -> "optuna.samplers.BaseSampler":
    """The Optuna sampler ``kind`` (quiet: Optuna's info logs and experimental warnings off)."""
    import optuna  # heavy: a space is parsed and listed without Optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return get_sampler(kind).make(space, seed=seed, n_startup_trials=n_startup_trials)
