"""A real Docker API for tests: ``podman system service`` on a unix socket, with its own storage
under a throw-away directory and a busybox root file system for containers.

    api = PodmanApi(work)                 # serving once its socket exists
    env = {"DOCKER_HOST": f"unix://{api.sock}"}
    cid = api.create({"io.rancher.container.ip": "10.42.0.5/16"})   # created, not started
    cid = api.run({...})                  # started (busybox sleep); skips where podman cannot start one
    api.close()                           # containers removed, service stopped, its mounts undone
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from standin.demo_runtime import CONTAINERS_CONF, unmount_under
from tests.helpers.procs import Proc
from tests.helpers.wait import until

__all__ = ["BUSYBOX", "PodmanApi", "stub_network"]

BUSYBOX = shutil.which("busybox") or "/bin/busybox"

_CONF = CONTAINERS_CONF  # the settings the demo's engines use (standin/demo_runtime.py says why)


class PodmanApi:
    def __init__(self, work: Path) -> None:
        self.work = work
        (work / "containers.conf").write_text(_CONF)
        (work / "rootfs" / "bin").mkdir(parents=True)
        shutil.copy(BUSYBOX, work / "rootfs" / "bin" / "busybox")
        self.env = {**os.environ, "CONTAINERS_CONF": str(work / "containers.conf")}
        self.base = ["podman", "--root", str(work / "storage"), "--runroot", str(work / "run")]
        self.sock = work / "api.sock"
        self.proc = Proc([*self.base, "system", "service", "--time=0", f"unix://{self.sock}"], env=self.env,
                         name="podman-api")

        def serving() -> bool:
            assert self.proc.alive(), self.proc.log()
            return self.sock.exists()

        until(serving, what="podman's API socket")

    def pm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.base, *args], env=self.env, capture_output=True, text=True, check=check)

    def _labels(self, labels: dict[str, str]) -> list[str]:
        return [a for k, v in labels.items() for a in ("--label", f"{k}={v}")]

    def create(self, labels: dict[str, str]) -> str:
        p = self.pm("create", "--network", "none", *self._labels(labels), "--rootfs", str(self.work / "rootfs"),
                    "/bin/busybox", "sleep", "1")
        return p.stdout.strip()

    def run(self, labels: dict[str, str], *extra: str) -> str:
        p = self.pm("run", "-d", "--network", "none", *self._labels(labels), *extra, "--rootfs",
                    str(self.work / "rootfs"), "/bin/busybox", "sleep", "600", check=False)
        if p.returncode != 0:
            pytest.skip(f"podman cannot start containers here: {p.stderr.strip()[-300:]}")
        return p.stdout.strip()

    def inspect(self, cid: str) -> Any:
        return json.loads(self.pm("inspect", cid).stdout)[0]

    def close(self) -> None:
        self.pm("rm", "-a", "-f", "-t", "0", check=False)
        self.proc.stop()
        unmount_under(self.work)  # podman leaves its overlay mount (storage/overlay) and the run dir's


def stub_network(work: Path, script: str, name: str = "mynet") -> tuple[Path, Path]:
    """A CNI network ``<work>/cni/<name>.d`` whose one config runs ``<work>/bin/stub``, the shell
    ``script`` with ``{log}`` replaced by the calls log's path. Returns (plugin dir, calls log)."""
    bindir = work / "bin"
    bindir.mkdir(exist_ok=True)
    log = work / "calls.log"
    (bindir / "stub").write_text(script.format(log=log))
    (bindir / "stub").chmod(0o755)
    conf = work / "cni" / f"{name}.d"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "10-stub.conf").write_text(json.dumps({"cniVersion": "0.2.0", "name": name, "type": "stub"}))
    return bindir, log
