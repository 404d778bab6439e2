"""A real world for the scheduler: the stand-in server, Corral metadata fed by it, and the
scheduler under test, each its own process."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.procs import Proc, free_port, start_corral, wait_http
from tests.helpers.standin import StandIn
from tests.helpers.wait import until

GiB = 1024**3


class World:
    def __init__(self, tmp: Path, env: dict[str, Any], *sched_args: str) -> None:
        self.standin = StandIn(load=env)
        self.md_port = free_port()
        self.metadata = start_corral(
            "metadata", "--subscribe", "--listen", f"127.0.0.1:{self.md_port}", "--listenReload",
            f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}",
            "--answers", str(tmp / "answers.json"), "--reload-interval-limit", "50",
            env=self.standin.env(), name="metadata")
        wait_http(f"{self.metadata_url}/latest/version", timeout=20)
        self.admin_port = free_port()
        self.hc_port = free_port()
        self.sched_args = ["scheduler", "--metadata-address", self.metadata_url, "--metrics-listen",
                           f"127.0.0.1:{self.admin_port}", "--health-check-port", str(self.hc_port), "--seed", "1",
                           "--metadata-wait", "1", "--sync-min-interval", "0.05", *sched_args]
        self.scheduler: Proc | None = None

    @property
    def metadata_url(self) -> str:
        return f"http://127.0.0.1:{self.md_port}"

    def start_scheduler(self) -> Proc:
        self.scheduler = start_corral(*self.sched_args, env=self.standin.env(), name="scheduler")
        self.wait_healthy()
        return self.scheduler

    def healthz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/healthz", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError as e:
            return 0, str(e)

    def wait_healthy(self, timeout: float | None = None) -> None:
        def healthy() -> bool:
            assert self.scheduler is not None and self.scheduler.alive(), self.scheduler.log() if self.scheduler else ""
            return self.healthz()[0] == 200

        until(healthy, what="scheduler healthy", timeout=timeout, interval=0.05)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def used(self, host: str, resource: str) -> float:
        for line in self.metrics().splitlines():
            if line.startswith("corral_scheduler_pool_used{") and f'host="{host}"' in line \
                    and f'resource="{resource}"' in line:
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no pool_used for {host}/{resource}")

    def wait_synced(self, timeout: float | None = None) -> None:
        """Until the scheduler's pools come from the server's current revision."""
        rev = self.standin.ctl("revision")["revision"]

        def synced() -> bool:
            st, detail = self.healthz()
            v = detail.partition("version ")[2].split(",")[0].strip()
            return st == 200 and bool(v) and int(v.split("-")[0]) >= rev

        until(synced, what=f"scheduler synced to revision {rev}", timeout=timeout, interval=0.05)

    def reset(self, env: dict[str, Any]) -> None:
        """A fresh start on the same processes: no scheduler, no faults, the stand-in's state
        replaced by ``env``, metadata running and caught up with it."""
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None
        self.standin.ctl("fault", "clear")
        self.standin.admin("POST", "/_admin/load?replace=true", env)
        if not self.metadata.alive():
            self.metadata.start()
        wait_http(f"{self.metadata_url}/latest/version", timeout=20)
        rev = self.standin.ctl("revision")["revision"]

        def metadata_current() -> bool:  # it serves the reloaded state (a test may stop it right away)
            with urllib.request.urlopen(f"{self.metadata_url}/latest/version", timeout=5) as r:
                v = r.read().decode().strip().strip('"')
            return v.split("-")[0].isdigit() and int(v.split("-")[0]) >= rev

        until(metadata_current, what=f"metadata at revision {rev}", interval=0.05)

    def close(self) -> None:
        for p in (self.scheduler, self.metadata):
            if p is not None:
                p.stop()
        self.standin.close()


TWO_HOSTS = {"hosts": [
    {"name": "big", "uuid": "h-big", "agent_ip": "127.0.6.1", "agentId": "1", "milli_cpu": 4000, "memory": 8 * GiB},
    {"name": "small", "uuid": "h-small", "agent_ip": "127.0.6.2", "milli_cpu": 2000, "memory": 4 * GiB},
]}


@pytest.fixture(scope="module")
def shared_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One stand-in and one metadata for the module's tests (starting them is most of a test's time)."""
    w = World(tmp_path_factory.mktemp("scheduler"), TWO_HOSTS)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def world(shared_world: World) -> Iterator[World]:
    """The two-host world as new: the stand-in reloaded, and a scheduler of its own (fresh pools)."""
    shared_world.reset(TWO_HOSTS)
    try:
        shared_world.start_scheduler()
        shared_world.wait_synced()
        yield shared_world
    finally:
        if shared_world.scheduler is not None:
            shared_world.scheduler.stop()
            shared_world.scheduler = None
