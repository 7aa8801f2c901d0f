"""Errors a user can fix, and the one-line messages made from them (the CLI prints one line and exits with 2; with 1
for a ``MachineError``, where the machine rather than the input stopped the command).

Also the base of every config schema (``Schema``) and the one formatter of pydantic's validation
errors, shared by the trial config, the adapter config and the search space.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class UsageError(ValueError):
    """Bad input (arguments, config, targets): the message names the problem and the fix."""


class MachineError(RuntimeError):
    """Not the input but this machine stopped the command (a local Ray that did not start in time): one line naming
    the cause and the fix, exit status 1."""


class Schema(BaseModel):
    """A config section: unknown keys are refused, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def schema_keys(cls) -> list[str]:
        """The keys this section accepts, in order (a schema with keys beyond its fields says so here)."""
        return list(cls.model_fields)


class StandaloneSchema(Schema):
    """A schema also built directly in code (``AdapterConfig(r=2)``): a bad value is a one-line ``UsageError``.

    Pydantic calls a custom ``__init__`` for nested models too, so a section nested in a larger
    schema must restore ``__init__ = BaseModel.__init__``: its errors then stay ``ValidationError``
    lines that the larger schema describes with their full location (``adapter.r``).
    """

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise UsageError(describe_validation_error(err, type(self), what=type(self).__name__)) from None


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    model = root
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        candidates = [ann, *getattr(ann, "__args__", ())]
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            return None
        model = nested
    return model


def schema_keys(model: type[BaseModel]) -> list[str]:
    """The keys a schema accepts: ``Schema.schema_keys``, else its fields."""
    keys = getattr(model, "schema_keys", None)
    return keys() if keys is not None else list(model.model_fields)


def _sections(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    return {name: nested for name in root.model_fields if (nested := _model_at(root, (name,))) is not None}


def describe_validation_error(err: ValidationError, root: type[BaseModel], what: str = "config") -> str:
    """One line for the first problem of a schema's validation error (and a count of the others).

    An unknown key gets the closest known key of its section, or the section that has it
    ("epochs" at the top -> "training.epochs"), and the list of keys known there.
    """
    errors = err.errors()
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    where = ".".join(str(p) for p in loc) or what
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        parent, key = loc[:-1], str(loc[-1])
        model = _model_at(root, parent)
        known = schema_keys(model) if model else []
        close = closest(key, known)
        prefix = ".".join(map(str, parent))
        if close:
            hint = f" (did you mean {'.'.join(filter(None, [prefix, close]))!r}?)"
        else:
            sections = _sections(root)
            elsewhere = [f"{s}.{key}" for s, m in sections.items() if key in schema_keys(m) and (s,) != parent]
            if not parent and not elsewhere:
                # a typo of a key that lives in a section: "epoch" -> "training.epochs"
                by_name = {f: f"{s}.{f}" for s, m in sections.items() for f in schema_keys(m)}
                near = difflib.get_close_matches(key, list(by_name), n=1, cutoff=0.75)
                elsewhere = [by_name[near[0]]] if near else []
            if not elsewhere:
                near = difflib.get_close_matches(key, known, n=1, cutoff=0.4)
                elsewhere = [".".join(filter(None, [prefix, near[0]]))] if near else []
            hint = f" (did you mean {elsewhere[0]!r}?)" if elsewhere else ""
        msg = f"unknown key {where!r}{hint}; known keys here: {', '.join(known)}"
    elif kind == "missing":
        msg = f"{where} is required"
    else:
        text = str(first.get("msg", "invalid value")).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        got = first.get("input")
        shown = "" if isinstance(got, dict) or kind.startswith(("value_error", "assertion_error")) else f" (got {got!r})"
        msg = f"{where}: {text}{shown}" if loc else f"{text}{shown}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return msg


def first_line(err: BaseException) -> str:
    """The first non-empty line of an error's text (its type name when it has none): library errors
    can span pages, a user gets one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def innermost_error_line(err: BaseException | str, default: str = "the trial raised") -> str:
    """The innermost ``SomeError: message`` line of an error or a traceback's text (Ray wraps a worker's error in
    pages of traceback), else its last line, else ``default`` (an error's type name); at most 500 characters."""
    if isinstance(err, BaseException):
        err, default = str(err).strip(), type(err).__name__
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":")[0]
        if "Error" in head or "Exception" in head:
            return ln[:500]
    return (lines[-1] if lines else default)[:500]


def closest(key: str, known: list[str], cutoff: float = 0.6, prefix: bool = True) -> str | None:
    """The known key a typo most likely meant: a prefix or substring match first (unless ``prefix=False``,
    for dotted keys where a shared prefix says little), then difflib's closest."""
    low = key.lower()
    pools = ([k for k in known if k.lower().startswith(low) or low.startswith(k.lower())],
             [k for k in known if low in k.lower()]) if prefix else ()
    for pool in pools:
        if pool and len(low) >= 2:
            return min(pool, key=lambda k: abs(len(k) - len(low)))
    close = difflib.get_close_matches(key, known, n=1, cutoff=cutoff)
    return close[0] if close else None


def did_you_mean(key: str, known: list[str], cutoff: float = 0.5, prefix: bool = True) -> str:
    """' (did you mean 'x'?)' for the closest known name, or '' when none is close."""
    close = closest(key, known, cutoff=cutoff, prefix=prefix)
    return f" (did you mean {close!r}?)" if close else ""


class Registry(dict):
    """Named things a user picks by name (adapter methods, samplers, schedulers): a dict from name to instance whose
    ``lookup`` turns a miss into the one line every registry gives, the closest name first, then the known ones."""

    def __init__(self, kind: str, choose: str = "choose from") -> None:
        super().__init__()
        self.kind, self.choose = kind, choose

    def add(self, item: Any) -> Any:
        """Register an instance, or a class (instantiated without arguments); returns the instance."""
        instance = item() if isinstance(item, type) else item
        self[instance.name] = instance
        return instance

    def lookup(self, name: Any) -> Any:
        try:
            return self[name]
        except (KeyError, TypeError):  # TypeError: an unhashable value from YAML, e.g. a list
            raise UsageError(f"unknown {self.kind} {name!r}{did_you_mean(str(name), list(self))}: "
                             f"{self.choose} {', '.join(self)}") from None

