"""An export's folder: the checks of what the user asked for (a method name, an output folder), paths that never
leave the folder, and the final rename that means an interrupted export leaves no half result."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from melora_tune.adapters import method_names
from melora_tune.errors import UsageError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_method(method: str | None) -> str | None:
    """A method name, or a one-line refusal (a name with '/', '..' or the like would reach outside DIR)."""
    if method is None:
        return None

    METHODS = method_names()
    if not NAME_RE.fullmatch(method):
        raise UsageError(f"--method {method!r} is not a method name (letters, digits, '_' or '-' only; nothing that "
                         f"could reach outside the output folder): choose one of {', '.join(METHODS)}")
    key = method.lower()
    if key not in METHODS:
        raise UsageError(f"unknown --method {method!r}: choose one of {', '.join(METHODS)}")
    return key


def check_budget(budget: int | None, levels: list[int], search: str) -> None:
    """A ``--budget`` that names one of the search's levels, or a one-line refusal naming them."""
    if budget is None or budget in levels:
        return
    have = ", ".join(f"{b}" for b in levels) if levels else "none recorded"
    raise UsageError(f"--budget {budget}: search {search} has no such budget level (its levels: {have})")


def check_out_dir(out: str | Path, force: bool) -> Path:
    """DIR as a Path; refuses a file, a non-empty folder without --force, and folders --force must never replace."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UsageError(f"--out {out} exists and is not empty: pass --force to replace it, or choose another folder")
        resolved = out.resolve()
        cwd = Path.cwd().resolve()
        if resolved == Path(resolved.anchor) or resolved == Path.home().resolve() or cwd == resolved or resolved in cwd.parents:
            raise UsageError(f"--out {out} is the root, your home or the working folder (or holds it): --force will not "
                             "replace it; choose a dedicated folder")
    return out


def safe_path(root: Path, *parts: str) -> Path:
    """root/parts..., refusing anything that resolves outside root."""
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\\" in part or "\x00" in part:
            raise UsageError(f"refusing the name {part!r}: it would reach outside the output folder")
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise UsageError(f"refusing {path}: it resolves outside the output folder {root}")
    return path


def check_tree(root: Path) -> None:
    """Every file a download wrote stays inside root (no links, no escaping names)."""
    base = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.resolve().is_relative_to(base):
                raise UsageError(f"refusing downloaded artifact {path.relative_to(root)}: a link or a path outside the export folder")


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished tmp folder to out; an existing out (empty, or --force) is moved aside first."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{int(time.time())}"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
