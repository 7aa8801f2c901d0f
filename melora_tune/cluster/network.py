"""Loopback addresses and ports: checking the ones given, picking free ones, waiting for a listener."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import time
from pathlib import Path

from melora_tune.cluster.processes import last_error_line
from melora_tune.errors import UsageError


def check_loopback(address: str, flag: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise UsageError(f"{flag} {address!r} is not an IP address (use a loopback one, e.g. 127.0.0.2)") from None
    if ip.version != 4 or not ip.is_loopback:
        raise UsageError(f"{flag} {address} is not an IPv4 loopback address: the local cluster binds loopback only")
    if address == "127.0.0.1":
        raise UsageError(f"{flag} 127.0.0.1: Ray rewrites it to the host's external address; use 127.0.0.2 or another")
    try:
        with socket.socket() as s:
            s.bind((address, 0))
    except OSError as err:
        raise UsageError(f"{flag} {address} cannot be bound here: {err.strerror}") from None
    return address


def port_free(port: int, host: str = "") -> bool:
    """Free on `host`; with host '' (all interfaces) this fails if any address holds the port."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class PortPool:
    """Distinct ports, free on every interface (Ray's gRPC servers bind all of them).

    The probing sockets stay open until `release()` so two picks never collide."""

    def __init__(self):
        self._held: list[socket.socket] = []
        self.ports: set[int] = set()

    def take(self, port: int | None = None, what: str = "port") -> int:
        s = socket.socket()
        try:
            s.bind(("", port or 0))
        except OSError:
            s.close()
            raise UsageError(f"{what} {port} is in use") from None
        self._held.append(s)
        chosen = s.getsockname()[1]
        self.ports.add(chosen)
        return chosen

    def release(self):
        for s in self._held:
            s.close()
        self._held.clear()


def wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    """Returns once `host:port` accepts connections; raises RuntimeError if `proc` fails first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return
        if proc.poll() not in (None, 0):
            raise RuntimeError(f"{what} failed to start (exit {proc.returncode}): {last_error_line(log)} (log: {log})")
        time.sleep(0.3)
    raise RuntimeError(f"{what}: nothing listens on {host}:{port} after {timeout:.0f} s (log: {log})")
