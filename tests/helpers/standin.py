"""The stand-in Rancher server as a real process, for integration tests.

    s = StandIn(host_uuid="host-a-uuid")        # started at once on free ports, temp SQLite db
    s.url, s.env()                               # CATTLE_URL / CATTLE_ACCESS_KEY / CATTLE_SECRET_KEY
    s.ctl("host", "add", "--name", "node-a")     # `corral ctl` (in-process, real HTTP), returns the JSON
    s.admin("GET", "/_admin/conns")              # the admin API directly
    s.wait(kind="reply", name="config.update")   # long-poll the journal; raises TimeoutError
    s.stop(); s.start()                          # restart: same ports, same db
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.procs import Proc, free_port, start_corral, wait_http

__all__ = ["StandIn"]


class StandIn:
    def __init__(self, *, host_uuid: str = "host-a-uuid", agent_id: str = "1", role: str = "agent",
                 extra_keys: list[dict[str, str]] | None = None, load: str | dict[str, Any] | None = None,
                 ping_interval_ms: int = 5000, max_pings: int = 8640, event_timeout_ms: int = 15000,
                 event_retries: int = 3, seed: int = 7, args: tuple[str, ...] = (), start: bool = True) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="corral-standin-"))
        self.state_path = self.dir / "state.db"
        self.journal_path = self.dir / "journal.jsonl"
        self.access_key = f"agent-{secrets.token_hex(4)}"
        self.secret_key = secrets.token_hex(16)
        self.admin_access_key = f"admin-{secrets.token_hex(4)}"
        self.admin_secret_key = secrets.token_hex(16)
        self.host_uuid = host_uuid
        self.agent_id = agent_id
        keys = [
            {"access": self.admin_access_key, "secret": self.admin_secret_key, "role": "admin"},
            {"access": self.access_key, "secret": self.secret_key, "role": role, "agentId": agent_id,
             "hostUuid": host_uuid},
            *(extra_keys or []),
        ]
        self.keys_path = self.dir / "keys.yaml"
        self.keys_path.write_text(yaml.safe_dump(keys))
        self.argv = [
            "server", "--listen", f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--keys", str(self.keys_path), "--state", str(self.state_path), "--journal", str(self.journal_path),
            "--seed", str(seed), "--ping-interval-ms", str(ping_interval_ms), "--max-pings", str(max_pings),
            "--event-timeout-ms", str(event_timeout_ms), "--event-retries", str(event_retries), *args,
        ]
        if isinstance(load, dict):  # an environment document: written next to the db
            env_file = self.dir / "env.yaml"
            env_file.write_text(yaml.safe_dump(load))
            load = str(env_file)
        if load:
            self.argv += ["--load", load]
        self.proc: Proc | None = None
        if start:
            self.start()

    # -- addresses and credentials ------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def env(self, access: str | None = None, secret: str | None = None) -> dict[str, str]:
        return {"CATTLE_URL": self.url, "CATTLE_ACCESS_KEY": access or self.access_key,
                "CATTLE_SECRET_KEY": secret or self.secret_key}

    def admin_env(self) -> dict[str, str]:
        return self.env(self.admin_access_key, self.admin_secret_key)

    # -- process ------------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            self.proc = start_corral(*self.argv, name="standin")
        else:
            self.proc.start()
        try:
            wait_http(f"{self.admin_url}/healthz", timeout=timeout)
            wait_http(f"http://127.0.0.1:{self.port}/ping", timeout=timeout)
        except TimeoutError:
            raise TimeoutError(f"stand-in server did not start; log:\n{self.log()}") from None

    def stop(self) -> int | None:
        return self.proc.stop() if self.proc is not None else None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def log(self) -> str:
        return self.proc.log() if self.proc is not None else ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- admin API ----------------------------------------------------------------------
    def admin(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        from standin.ctl import AdminClient

        return AdminClient(self.admin_url, timeout).request(method, path, body)

    def ctl(self, *args: str) -> Any:
        """Run ``corral ctl --admin <admin_url> <args>`` (in-process, real HTTP) and return its JSON.
        Raises ``standin.ctl.CtlError`` when the server refuses."""
        from standin import ctl

        parsed: argparse.Namespace = ctl.build_parser().parse_args(["--admin", self.admin_url, *args])
        out = ctl.run(parsed)
        return json.loads(json.dumps(out, default=str))

    def wait(self, *, kind: str | None = None, name: str | None = None, since: int = 0, id: str | None = None,
             status: str | None = None, conn: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """The first journal entry after ``since`` matching the filters (long-poll, no sleeps)."""
        from urllib.parse import urlencode

        q = {k: v for k, v in {"kind": kind, "name": name, "since": since, "id": id, "status": status,
                               "conn": conn, "timeout": timeout}.items() if v is not None}
        url = f"{self.admin_url}/_admin/wait?{urlencode(q)}"
        try:
            with urllib.request.urlopen(url, timeout=timeout + 10) as r:
                entry: dict[str, Any] = json.loads(r.read())
                return entry
        except urllib.error.HTTPError as e:
            if e.code == 408:
                raise TimeoutError(f"no journal entry {q} within {timeout}s") from None
            raise

    def seq(self) -> int:
        """The journal's current sequence number (use as ``since``)."""
        return int(self.admin("GET", "/_admin/status")["journal_seq"])

    def journal(self, **filters: Any) -> list[dict[str, Any]]:
        from urllib.parse import urlencode

        q = {k: v for k, v in filters.items() if v is not None}
        out: list[dict[str, Any]] = self.admin("GET", f"/_admin/journal?{urlencode(q)}")
        return out

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
