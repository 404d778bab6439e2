"""Where `corral healthcheck` keeps its HAProxy, and what it says while HAProxy cannot start.

The daemon runs as a real process from a throw-away working directory, with a relative
``--state-dir`` or none at all (and no XDG_RUNTIME_DIR): HAProxy must get absolute paths, run in
its state dir, and check. A HAProxy that cannot start turns ``/healthz`` to 503 until it can.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.procs import Proc, free_port, start_corral
from tests.integration.healthcheck.common import container, hc, tree, until
from tests.integration.healthcheck.conftest import StandInReports
from tests.integration.healthcheck.daemon import Metadata


@pytest.fixture
def cwd() -> Iterator[Path]:
    # Short and outside pytest's tree: the socket path must stay under the 107 bytes of a unix address.
    d = Path(tempfile.mkdtemp(prefix="corral-hc-cwd-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _haproxy_cwd(state_dir: Path) -> str:
    pid = int((state_dir / "haproxy.pid").read_text())
    return os.readlink(f"/proc/{pid}/cwd")


@pytest.mark.parametrize("state_dir", ["rel/hc", None], ids=["relative", "default"])
async def test_relative_or_default_state_dir_checks_from_any_cwd(
        cwd: Path, metadata: Metadata, server: StandInReports, flaky_factory: Any, state_dir: str | None) -> None:
    ok = await flaky_factory("ok")
    metadata.write(tree([container("a", hc(ok.port))]))
    port = free_port()
    argv = ["healthcheck", "--metadata-address", metadata.url, "--metrics-listen", f"127.0.0.1:{port}",
            "--poll-interval", "500ms", "--metadata-wait", "1"]
    if state_dir is not None:
        argv += ["--state-dir", state_dir]
    proc = start_corral(*argv, env={**server.env(), "XDG_RUNTIME_DIR": ""}, cwd=str(cwd), name="healthcheck")
    try:
        first = await until(lambda: server.first_after("_a_", "UP", 0), timeout=20, what="a reported UP")
        assert first is not None, proc.log()[-3000:]
        sd = (cwd / (state_dir or "run/healthcheck")).resolve()
        cfg = (sd / "haproxy.cfg").read_text()
        assert f"stats socket {sd}/haproxy.sock " in cfg, cfg
        assert f"server-state-file {sd}/server-state" in cfg, cfg
        assert _haproxy_cwd(sd) == str(sd), "HAProxy runs in its state dir, not in the caller's cwd"
        assert (await asyncio.to_thread(_status, f"http://127.0.0.1:{port}/healthz"))[0] == 200
    finally:
        proc.stop()
    assert "Traceback" not in proc.log(), proc.log()[-3000:]


async def test_healthz_fails_while_haproxy_cannot_start(
        cwd: Path, metadata: Metadata, server: StandInReports, flaky_factory: Any) -> None:
    """HAProxy's admin socket sits in a directory that does not exist yet: HAProxy refuses to start."""
    ok = await flaky_factory("ok")
    metadata.write(tree([container("a", hc(ok.port))]))
    port = free_port()
    sock_dir = cwd / "later"
    proc: Proc = start_corral(
        "healthcheck", "--metadata-address", metadata.url, "--metrics-listen", f"127.0.0.1:{port}",
        "--state-dir", "hc", "--stats-socket", str(sock_dir / "h.sock"), "--poll-interval", "500ms",
        "--metadata-wait", "1", "--retry-invalid", "1s", env=server.env(), cwd=str(cwd), name="healthcheck")
    healthz = f"http://127.0.0.1:{port}/healthz"
    try:
        async def unhealthy() -> bool:
            return (await asyncio.to_thread(_status, healthz))[0] == 503

        await until(unhealthy, timeout=20, what="/healthz 503 while HAProxy cannot start")
        code, body = await asyncio.to_thread(_status, f"http://127.0.0.1:{port}/ready")
        assert code == 503 and "HAProxy cannot be started" in body and "cannot bind" in body, body

        async def said_once() -> bool:
            return proc.log().count("haproxy cannot be started") == 1

        await until(said_once, what="one log line naming the failure")
        line = next(ln for ln in proc.log().splitlines() if "haproxy cannot be started" in ln)
        assert "cannot bind UNIX socket" in line, line
        assert await server.states_async("_a_") == []
        sock_dir.mkdir()  # the retry now starts HAProxy: healthy again, and checking

        async def healthy() -> bool:
            return (await asyncio.to_thread(_status, healthz))[0] == 200

        await until(healthy, timeout=20, what="/healthz ok once HAProxy runs")
        await until(lambda: server.first_after("_a_", "UP", 0), timeout=20, what="a reported UP")
        assert proc.log().count("haproxy cannot be started") == 1, "said once, not at every retry"
    finally:
        proc.stop()
    assert "Traceback" not in proc.log(), proc.log()[-3000:]
