"""Run a real ``corral metadata`` (answers file) and ``corral healthcheck`` for end-to-end tests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from healthcheck.haproxy import StatRow, StatsSocket
from tests.helpers.procs import Proc, free_port, start_corral, wait_http


class Metadata:
    """``corral metadata`` serving a legacy answers file we rewrite to change the world."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "answers.json"
        self.port = free_port()
        self.version = 0
        self.proc: Proc | None = None

    def write(self, tree: dict[str, Any] | Any) -> None:
        self.version += 1
        if isinstance(tree, dict) and "version" in tree:
            tree = {**tree, "version": str(self.version)}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"2015-12-19": {"default": tree}}))
        os.replace(tmp, self.path)

    def start(self) -> Metadata:
        self.proc = start_corral("metadata", "--answers", str(self.path), "--listen", f"127.0.0.1:{self.port}",
                                 "--listenReload", f"127.0.0.1:{free_port()}",
                                 "--metrics-listen", "127.0.0.1:0", "--file-poll", "0.05", name="metadata")
        wait_http(f"http://127.0.0.1:{self.port}/2015-12-19/version", timeout=15)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Daemon:
    def __init__(self, workdir: Path, metadata_url: str, env: dict[str, str], *extra: str,
                 name: str = "healthcheck") -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = str(self.dir / "admin.sock")
        self.admin_port = free_port()
        self.argv = ["healthcheck", "--metadata-address", metadata_url, "--state-dir", str(self.dir),
                     "--stats-socket", self.socket, "--metrics-listen", f"127.0.0.1:{self.admin_port}",
                     "--poll-interval", "500ms", "--metadata-wait", "1", "--report-retry-max", "1s",
                     "--state-interval", "0.5s", *extra]
        self.env = env
        self.name = name
        self.proc: Proc | None = None

    def start(self) -> Daemon:
        self.proc = start_corral(*self.argv, env=self.env, name=self.name)
        wait_http(f"http://127.0.0.1:{self.admin_port}/healthz", timeout=15)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def log(self) -> str:
        return self.proc.log() if self.proc else ""

    def haproxy_pid(self) -> int:
        return int((self.dir / "haproxy.pid").read_text())

    async def rows(self) -> dict[str, StatRow]:
        return {r.name: r for r in await StatsSocket(self.socket).show_stat() if r.name.startswith("cattle-")}

    def config(self) -> str:
        return (self.dir / "haproxy.cfg").read_text()
