"""The scheduler registry: every Ray Tune trial scheduler a search can use declares itself in one module.

A scheduler is one module under ``melora_tune/search/schedulers/`` (or anywhere: a plug-in, a test) that
defines a ``Scheduler`` subclass and calls ``register_scheduler`` on it. Everything else derives from the
registry: the ``scheduler:`` key of a space and its "did you mean", the dry run's line, ``search --help``,
the search's ``TuneConfig`` and the replay benchmark (``search/replay.py``).

A ``Scheduler`` is a light description (no Ray import); ``make`` builds the Ray Tune ``TrialScheduler``
when a search or a replay starts. Its settings are the space's ``asha`` section (``time_attr``,
``grace_period``, ``reduction_factor``, ``brackets``): the fidelity settings every scheduler reads what it
needs from. ``asha.enabled: false`` keeps its old meaning, no early stopping: ``effective_name`` resolves
it to ``fifo`` in this one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from melora_tune.errors import Registry

if TYPE_CHECKING:  # pragma: no cover
    from ray.tune.schedulers import TrialScheduler

DEFAULT = "asha"
NO_EARLY_STOPPING = "fifo"


class Scheduler:
    """What a scheduler is. Subclass, set the class attributes, implement ``make``, ``register_scheduler``."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""  # one line for search --help and the docs
    # Whether it may stop a trial before max_t (a recorded table, record_test, needs one that never does).
    stops_early: ClassVar[bool] = True

    def make(self, settings: Any, max_t: int) -> "TrialScheduler":
        """The Ray Tune scheduler of one search. ``settings``: the space's ``asha`` section (``time_attr``,
        ``grace_period``, ``reduction_factor``, ``brackets``); ``max_t``: the max fidelity (epochs). The
        metric and mode come later, from ``TuneConfig`` (``set_search_properties``)."""
        raise NotImplementedError(f"scheduler {self.name} does not implement make")

    def phrase(self, settings: Any, max_t: int) -> str:
        """How the dry run says what stops trials early."""
        return f"scheduler {self.name} on {settings.time_attr} (max {max_t})"


_REGISTRY: Registry = Registry("scheduler")  # name -> Scheduler instance


def register_scheduler(scheduler: Scheduler | type[Scheduler]) -> Scheduler | type[Scheduler]:
    """Add a scheduler (an instance or a class); usable as a class decorator. Re-registering a name replaces it."""
    _REGISTRY.add(scheduler)
    return scheduler


def unregister_scheduler(name: str) -> None:
    _REGISTRY.pop(name, None)


def scheduler_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def all_schedulers() -> list[Scheduler]:
    return list(_REGISTRY.values())


def get_scheduler(name: str) -> Scheduler:
    """The registered scheduler (UsageError naming the known ones, with the closest, otherwise)."""
    return _REGISTRY.lookup(name)


def effective_name(scheduler: str, asha_enabled: bool) -> str:
    """The scheduler a space runs: ``asha.enabled: false`` with the default ``asha`` means no early stopping."""
    return NO_EARLY_STOPPING if scheduler == DEFAULT and not asha_enabled else scheduler


def make_scheduler(space) -> "TrialScheduler":
    """A search space's trial scheduler (its effective one, from its asha section, up to its max fidelity)."""
    return get_scheduler(space.scheduler_name).make(space.asha, space.max_t)
