"""The integer hyperparameter vocabulary: what each name means, its bounds, its default choices.

A method declares the hyperparameters that are its own in its module (``Method.declares``,
e.g. MELoRA's ``n``); ``r``, the rank every method has, is declared here. Registering the
method (``adapters.registry.register_method``) adds them to ``HYPERPARAMS``, the one ordered
vocabulary that everything else reads: the adapter config's keys and their checks
(``adapters.config``), the search space's ``space.<name>`` choices (``search.schema``), the
budget walk and the conditional Optuna space, ``melora-tune budget`` flags, MLflow params,
run names, progress lines, the records reader's columns and the report tables.

A schema whose keys include the vocabulary subclasses ``HyperparamSchema``: the
hyperparameters are pydantic *extra* keys, validated here against the live vocabulary, so a
method registered later (a plug-in, a test) needs no edit of any schema. Unknown keys are
refused exactly as ``extra="forbid"`` refuses them (``extra_forbidden`` at the key's location),
so the one error formatter (``errors.describe_validation_error``) words them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

from pydantic import ConfigDict, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from melora_tune.errors import Schema

# Default choices of a hyperparameter: (the targeted layers' shapes, the values already chosen) -> values.
Choices = Callable[[Sequence[Any], Mapping[str, int]], Iterable[int]]


@dataclass(frozen=True)
class HyperParam:
    """One integer hyperparameter: a key of the adapter config and a ``space.<name>`` list of choices."""

    name: str
    help: str  # what it means, for CLI help and YAML docs ("MELoRA: number of mini-LoRAs")
    minimum: int = 1
    # Trainable params never decrease as it grows (all else fixed): the enumerator stops at the first value
    # whose whole subtree is over budget.
    grows_params: bool = False
    # When the user declares no choices for it, it equals this other hyperparameter and is not searched;
    # its default is then None ("same as"), and tables leave it out (the run name shows it when it differs).
    tied_to: str | None = None
    at_most: str | None = None  # its value never exceeds this other hyperparameter's (PRoLoRA's u <= r)
    default: int | None = 1  # its value in a config that does not set it (and in the configs of other methods)
    title: str | None = None  # how an error message names it ("MELoRA n (number of minis)"); None: the name
    choices: Choices | None = None  # the values searched when the user declares none (None: the method says)
    column: str | None = None  # its meaning as a column of a tabulated benchmark; None: ``help``

    @property
    def label(self) -> str:
        return self.title or self.name


RANK = HyperParam("r", "rank (per mini for MELoRA)", 1, grows_params=True, default=8, title="adapter rank r",
                  column="rank (per mini for MELoRA)")

# Keys of the schemas a hyperparameter shares a namespace with (adapter config, space section, trial params).
RESERVED = frozenset({"method", "alpha", "dropout", "target_modules", "modules_to_save", "lr", "lr_choices", "seeds",
                      "seed", "budget", "config", "epoch", "step", "adapter_params", "equivalent_rank"})

# The vocabulary, in the order of records, tables and CLI flags. One dict, updated in place, so that every
# module holding it sees methods registered later.
HYPERPARAMS: dict[str, HyperParam] = {RANK.name: RANK}


def add_hyperparams(order: Sequence[str], new: Sequence[HyperParam], taken: Iterable[str] = ()) -> None:
    """Add a method's own hyperparameters to the vocabulary (``order``: the method's names, in its search order).

    A new name goes just before the next of the method's names already known (MELoRA's n before r), else
    last, so the built-in methods give the order n, r, u, m, m_b and a new method's names come after them.
    ``taken``: the names other registered methods use (a name one of them declared cannot change meaning).
    """
    taken = set(taken) | {RANK.name}
    declared = {hp.name: hp for hp in new}
    for hp in new:
        if hp.name not in order:
            raise ValueError(f"hyperparameter {hp.name!r} is declared but not in the method's hyperparams {tuple(order)}")
        if not hp.name.isidentifier() or hp.name.startswith("_") or hp.name in RESERVED:
            raise ValueError(f"hyperparameter name {hp.name!r} is not allowed (reserved or not an identifier)")
        known = HYPERPARAMS.get(hp.name)
        if known is not None and known != hp and hp.name in taken:
            raise ValueError(f"hyperparameter {hp.name!r} is already declared, with other settings, by another method")
        for other in (hp.tied_to, hp.at_most):
            if other is not None and other not in order:
                raise ValueError(f"hyperparameter {hp.name!r} refers to {other!r}, which the method does not use")
    unknown = [k for k in order if k not in HYPERPARAMS and k not in declared]
    if unknown:
        raise ValueError(f"unknown hyperparameter {unknown[0]!r}; known: {', '.join(HYPERPARAMS)}; "
                         "declare a new one in the method's `declares`")
    items = list(HYPERPARAMS.items())
    for i, name in enumerate(order):
        if name not in declared:
            continue
        names = [k for k, _ in items]
        if name in names:
            items[names.index(name)] = (name, declared[name])  # a re-registered method's new definition
            continue
        after = next((k for k in order[i + 1:] if k in names), None)
        items.insert(names.index(after) if after else len(items), (name, declared[name]))
    HYPERPARAMS.clear()
    HYPERPARAMS.update(items)


def drop_hyperparams(names: Iterable[str]) -> None:
    """Remove names no registered method uses any more (``r`` stays)."""
    for name in names:
        if name != RANK.name:
            HYPERPARAMS.pop(name, None)


def vocabulary_after(fields: Iterable[str], after: str) -> list[str]:
    """A schema's keys with the vocabulary (less the declared fields) inserted after the field ``after``."""
    fields = list(fields)
    extra = [k for k in HYPERPARAMS if k not in fields]
    at = fields.index(after) + 1 if after in fields else len(fields)
    return [*fields[:at], *extra, *fields[at:]]


class HyperparamSchema(Schema):
    """A schema whose keys include every registered hyperparameter (as extra keys, validated here).

    Subclasses say how one value is checked (``hyperparam_value``: return it converted, or raise
    ValueError with the message) and what a key left out means (``hyperparam_default``).
    """

    model_config = ConfigDict(extra="allow")
    hyperparams_after: ClassVar[str] = ""  # the declared field the vocabulary follows in ``schema_keys``

    @classmethod
    def schema_keys(cls) -> list[str]:
        return vocabulary_after(cls.model_fields, cls.hyperparams_after)

    @classmethod
    def hyperparam_value(cls, hp: HyperParam, value: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def hyperparam_default(cls, hp: HyperParam) -> Any:
        return hp.default

    @model_validator(mode="wrap")
    @classmethod
    def _hyperparams(cls, data: Any, handler) -> Any:
        if not isinstance(data, dict):
            return handler(data)
        errors: list[InitErrorDetails] = []
        out = {}
        for key, value in data.items():
            if key in cls.model_fields:
                out[key] = value
            elif key not in HYPERPARAMS:
                errors.append(InitErrorDetails(type="extra_forbidden", loc=(key,), input=value))
        for name, hp in HYPERPARAMS.items():
            if name not in data:
                if name not in cls.model_fields:
                    out[name] = cls.hyperparam_default(hp)
                continue
            try:
                out[name] = cls.hyperparam_value(hp, data[name])
            except ValueError as err:
                errors.append(InitErrorDetails(type=PydanticCustomError("value_error", "Value error, {error}", {"error": str(err)}),
                                               loc=(name,), input=data[name]))
        if not errors:
            return handler(out)
        try:
            handler({k: v for k, v in out.items() if k in cls.model_fields})
        except ValidationError as err:  # the other problems, counted in the one-line message
            errors += [InitErrorDetails(type=e["type"], loc=tuple(e["loc"]), input=e.get("input"), ctx=e.get("ctx", {}))
                       for e in err.errors(include_url=False)]
        keys = cls.schema_keys()
        errors.sort(key=lambda e: keys.index(e["loc"][0]) if e["loc"] and e["loc"][0] in keys else len(keys))
        raise ValidationError.from_exception_data(cls.__name__, errors)
