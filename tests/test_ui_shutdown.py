"""`melora-tune ui` stops every process it started on Ctrl-C (SIGINT), SIGTERM and SIGHUP, and frees its port.

Slow: each case starts a real `mlflow server` (about 6-15 s on 2 cores) through the installed entry point.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def port_is_free(port: int) -> bool:
    with socket.socket() as s:  # nothing listens ...
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:  # ... and a new server can bind it (as servers do, SO_REUSEADDR)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory):
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("ui") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()  # creates the schema
    return db


@pytest.mark.parametrize("sig,when", [
    (signal.SIGTERM, "serving"),
    (signal.SIGHUP, "serving"),
    (signal.SIGINT, "serving"),  # Ctrl-C
    (signal.SIGTERM, "starting"),  # the server is still coming up
], ids=["SIGTERM", "SIGHUP", "SIGINT", "SIGTERM-while-starting"])
def test_ui_signal_stops_every_child_and_frees_the_port(tracking_db, tmp_path, sig, when):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "ui.log", "w+")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "melora_tune.cli", "ui", "--port", str(port), "--tracking-uri", f"sqlite:///{tracking_db}"]
    ui = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    me = psutil.Process(ui.pid)
    children: list[psutil.Process] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and ui.poll() is None:
            children = me.children(recursive=True)
            if when == "starting" and children and "MLflow UI" in (tmp_path / "ui.log").read_text():
                break
            if when == "serving" and answers(f"{url}/health"):
                children = me.children(recursive=True)
                break
            time.sleep(0.2)
        assert ui.poll() is None and children, (tmp_path / "ui.log").read_text()
        if when == "serving":
            assert not port_is_free(port)
        ui.send_signal(sig)
        code = ui.wait(60)
    finally:
        if ui.poll() is None:
            ui.kill()
        for p in alive(children):  # never leave a server behind, whatever the test found
            p.kill()
        log.close()
    text = (tmp_path / "ui.log").read_text()
    assert code == 0, text
    assert "Traceback" not in text, text
    assert not alive(children), [p.cmdline() for p in alive(children)]
    assert port_is_free(port)
    if when == "serving":
        assert "stopped" in text
