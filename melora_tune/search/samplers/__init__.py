"""Samplers: who proposes a search's configurations (Optuna samplers over the feasible-only space).

One module per sampler, each registering itself (``samplers.registry``); importing this package
registers the built-in ones (tpe, random, grid, gp, bohb, syne-bohb) and stays light (no Optuna until ``make``). A new
sampler is one module: subclass ``Sampler``, implement ``make``, call ``register_sampler``; the
``sampler:`` key of a space, the dry run, ``search --help``, the search and the replay benchmark
then know it.
"""

from melora_tune.search.samplers.registry import (
    DEFAULT,
    Sampler,
    all_samplers,
    get_sampler,
    make_sampler,
    register_sampler,
    sampler_names,
    unregister_sampler,
)

# The built-in samplers register themselves on import (order: how --help and errors list them).
import melora_tune.search.samplers._tpe  # noqa: E402,F401
import melora_tune.search.samplers._random  # noqa: E402,F401
import melora_tune.search.samplers._grid  # noqa: E402,F401
import melora_tune.search.samplers._gp  # noqa: E402,F401
import melora_tune.search.samplers._bohb  # noqa: E402,F401
import melora_tune.search.samplers._syne_bohb  # noqa: E402,F401

__all__ = ["DEFAULT", "Sampler", "all_samplers", "get_sampler", "make_sampler", "register_sampler", "sampler_names",
           "unregister_sampler"]
