"""A real ``corral metadata`` serving an answers file, for the tests of metadata's clients."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.procs import Proc, free_port, start_corral, wait_http

__all__ = ["Metadata", "answers"]


def answers(version: str, containers: list[str]) -> dict[str, object]:
    tree = {
        "version": version,
        "hosts": [{"uuid": "host-a", "name": "node-a", "agent_ip": "127.0.0.11", "labels": {"zone": "a"},
                   "memory": 8192, "milli_cpu": 4000}],
        "stacks": [{"uuid": "st-1", "name": "shop", "system": False}],
        "services": [{"uuid": "svc-1", "name": "web", "stack_name": "shop", "scale": len(containers),
                      "health_check": {"port": 80, "interval": 2000}, "containers": []}],
        "containers": [{"uuid": f"c-{n}", "name": n, "primary_ip": f"10.42.0.{i + 2}", "start_count": 1,
                        "host_uuid": "host-a", "service_name": "web", "stack_name": "shop",
                        "health_check_hosts": ["host-a"]} for i, n in enumerate(containers)],
        "networks": [],
        "self": {"host": {"uuid": "host-a", "name": "node-a"}},
    }
    return {"latest": {"default": tree}, "2016-07-29": {"default": tree}}


class Metadata:
    def __init__(self, tmp: Path) -> None:
        self.file = tmp / "answers.json"
        self.port = free_port()
        self.reload_port = free_port()
        self.admin_port = free_port()
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write(self, version: str, containers: list[str]) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(answers(version, containers)))
        tmp.replace(self.file)

    def start(self) -> None:
        argv = ["metadata", "--answers", str(self.file), "--listen", f"127.0.0.1:{self.port}",
                "--listenReload", f"127.0.0.1:{self.reload_port}",
                "--metrics-listen", f"127.0.0.1:{self.admin_port}", "--file-poll", "0.1"]
        if self.proc is None:
            self.proc = start_corral(*argv, name="metadata")
        else:
            self.proc.start()
        wait_http(f"{self.url}/latest/version", timeout=15)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
