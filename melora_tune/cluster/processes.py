"""The cluster's processes, found and stopped by session id; starting a server in a session of its own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from melora_tune.cluster.state import ClusterState


def session_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # pid (comm) state ppid pgrp session ...; comm may contain spaces and parentheses.
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie holds no resources; its parent reaps it
        return None
    return int(fields[3])


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is `sid`."""
    if not sid:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and session_of(int(entry)) == sid:
            pids.append(int(entry))
    return sorted(pids)


def stop_sessions(sids: list[int], timeout: float = 10.0) -> dict[str, int]:
    """SIGTERM every process of these sessions, SIGKILL what is left after `timeout` seconds."""
    sids = [s for s in sids if s]
    pids = sorted({p for s in sids for p in session_pids(s)})
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(session_pids(s) for s in sids):
        time.sleep(0.2)
    killed = 0
    # Processes forked after the SIGTERM (a raylet restarting a worker) are caught here too.
    for _ in range(3):
        left = sorted({p for s in sids for p in session_pids(s)})
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.3)
    return {"terminated": len(pids), "killed": killed, "left": len({p for s in sids for p in session_pids(s)})}


def alive_pids(state: ClusterState) -> dict[str, list[int]]:
    return {name: session_pids(sid) for name, sid in state.session_ids().items()}


def console_command(name: str, module: str) -> list[str]:
    """The console script next to this interpreter, else `python -m module`: the servers run the caller's
    install even when its venv is not activated (not whatever `name` PATH finds first)."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", module]


def start_detached(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Starts `cmd` as the leader of a new session: its pid is the session id `down` stops it by."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )


def last_error_line(log: Path) -> str:
    try:
        lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if any(k in line for k in ("Error", "error", "ERROR", "failed", "Failed")):
            return line[-300:]
    return lines[-1][-300:] if lines else "no output"
