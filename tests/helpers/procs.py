"""Start real Corral processes (and peers) for integration tests, and wait for them properly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tests.helpers.wait import until

ROOT = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free for both TCP and UDP right now (small race, fine for tests)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s2:
                s2.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def wait_port(host: str, port: int, timeout: float | None = None) -> None:
    def listening() -> bool:
        with socket.create_connection((host, port), timeout=0.5):
            return True

    try:
        until(listening, what=f"something listening on {host}:{port}", timeout=timeout)
    except AssertionError as e:  # callers tell a daemon that never came up by TimeoutError
        raise TimeoutError(str(e)) from None


def wait_http(url: str, timeout: float | None = None, status: int | None = 200) -> None:
    """Wait until ``url`` answers (with ``status`` when given)."""
    def answered() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                got = r.status
        except urllib.error.HTTPError as e:
            got = e.code
        if status is None or got == status:
            return True
        raise ValueError(f"status {got}")  # kept as the last answer in the message

    try:
        until(answered, what=f"{url} answering {status}", timeout=timeout, interval=0.03)
    except AssertionError as e:
        raise TimeoutError(str(e)) from None


class Proc:
    """A subprocess with its output in a log file; stopped (SIGTERM, then SIGKILL) by ``stop``."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None,
                 name: str = "proc") -> None:
        self.argv = list(argv)
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.name = name
        fd, self.log_path = tempfile.mkstemp(prefix=f"corral-{name}-", suffix=".log")
        os.close(fd)
        self.p: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.p = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    @property
    def pid(self) -> int:
        assert self.p is not None
        return self.p.pid

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.p is not None
            self.p.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, no clean-up by the process (kill -9)."""
        if self.p is not None and self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.p is None:
            return None
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        return self.p.returncode

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def corral_argv(*argv: str) -> list[str]:
    return [sys.executable, "-m", "agents.cli", *argv]


def start_corral(*argv: str, env: dict[str, str] | None = None, name: str | None = None,
                 cwd: str | None = None) -> Proc:
    """Start ``corral <argv...>`` as a real process from this checkout."""
    e = {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    return Proc(corral_argv(*argv), env=e, cwd=cwd or str(ROOT), name=name or (argv[0] if argv else "corral"))
