"""Kill-drill hook: ``point(name)`` SIGKILLs at a named moment, and does nothing unless asked to.

``MELORA_DRILL_KILL_AT=<point>:<count>`` makes the ``count``-th call of ``point(<point>)`` in one process
SIGKILL its own process group (a driver started in its own session: the driver and the Ray it started), or only
its own process for points named ``worker.*`` (a Tune trial process). ``MELORA_DRILL_ONCE=<file>`` makes it fire
once across processes (a restarted trial does not die again). Used by ``benchmarks/kill_drill.py`` and
``tests/test_kill_drill.py``; the points are listed there. Unset (the default), ``point`` returns at once.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("MELORA_DRILL_KILL_AT")
    if not spec or not spec.startswith(name + ":"):
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(spec.rpartition(":")[2] or 1):
        return
    once = os.environ.get("MELORA_DRILL_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
    if name.startswith("worker."):
        os.kill(os.getpid(), signal.SIGKILL)
    os.killpg(os.getpgid(0), signal.SIGKILL)
