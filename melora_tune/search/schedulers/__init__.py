"""Schedulers: what stops a search's trials early (Ray Tune trial schedulers).

One module per scheduler, each registering itself (``schedulers.registry``); importing this package
registers the built-in ones (asha, fifo, hyperband) and stays light (no Ray until ``make``). A new scheduler is
one module: subclass ``Scheduler``, implement ``make``, call ``register_scheduler``; the ``scheduler:``
key of a space, the dry run, ``search --help``, the search and the replay benchmark then know it.
"""

from melora_tune.search.schedulers.registry import (
    DEFAULT,
    NO_EARLY_STOPPING,
    Scheduler,
    all_schedulers,
    effective_name,
    get_scheduler,
    make_scheduler,
    register_scheduler,
    scheduler_names,
    unregister_scheduler,
)

# The built-in schedulers register themselves on import (order: how --help and errors list them).
import melora_tune.search.schedulers._asha  # noqa: E402,F401
import melora_tune.search.schedulers._fifo  # noqa: E402,F401
import melora_tune.search.schedulers._hyperband  # noqa: E402,F401

__all__ = ["DEFAULT", "NO_EARLY_STOPPING", "Scheduler", "all_schedulers", "effective_name", "get_scheduler",
           "make_scheduler", "register_scheduler", "scheduler_names", "unregister_scheduler"]
