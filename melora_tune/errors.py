"""Errors a user can fix: the CLI prints them as one line and exits with status 2."""


class UsageError(ValueError):
    """Bad input (arguments, config, targets): the message names the problem and the fix."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an error's text (its type name when it has none): library errors
    can span pages, a user gets one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def closest(key: str, known: list[str], cutoff: float = 0.6) -> str | None:
    """The known key a typo most likely meant: a prefix or substring match first, then difflib's closest."""
    import difflib

    low = key.lower()
    for pool in ([k for k in known if k.lower().startswith(low) or low.startswith(k.lower())],
                 [k for k in known if low in k.lower()]):
        if pool and len(low) >= 2:
            return min(pool, key=lambda k: abs(len(k) - len(low)))
    close = difflib.get_close_matches(key, known, n=1, cutoff=cutoff)
    return close[0] if close else None


def did_you_mean(key: str, known: list[str], cutoff: float = 0.5) -> str:
    """' (did you mean 'x'?)' for the closest known name, or '' when none is close."""
    close = closest(key, known, cutoff=cutoff)
    return f" (did you mean {close!r}?)" if close else ""
