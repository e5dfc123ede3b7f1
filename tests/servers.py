"""Servers the tests start as a team would run them: free ports, process groups stopped whole, `mlflow server`."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 (bound at once, so no two are the same)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session), SIGKILL it after `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # what the leader left in its group (uvicorn workers, Chromium helpers)
    proc.wait()


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[tuple[str, int]]:
    """`mlflow server` on a free port: SQLite in `folder`, artifacts served from `folder`/artifacts; its URI and the
    pid of the process group it leads. Only the server opens the database: one uvicorn worker and no job runner (by
    default the server also starts huey consumers, for GenAI evaluation jobs, that open the backend store and leave
    their queues in /dev/shm)."""
    folder.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                             "--artifacts-destination", str(folder / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # it creates and migrates the database first: slow on a busy machine
        while True:
            assert proc.poll() is None, (folder / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, (folder / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        yield uri, proc.pid
    finally:
        stop(proc)
        log.close()


def run_app(argv: list[str], env: dict[str, str], timeout: float = 900) -> tuple[int, str]:
    """`videopoet ARGV` in its own process (and its own embedded Ray, whose workers get `env`: the session's Ray
    started before a test set its variables), as a user runs it; its exit code and output."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, **env, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
                            start_new_session=True)
    try:
        output = proc.communicate(timeout=timeout)[0].decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # Ray's processes left in the session
    return proc.returncode, output
