"""etc-host-updater restarted while metadata is down writes the hosts file from its persisted
metadata state, and its ``/ready`` turns 503 once that data is older than its threshold (real
processes: ``corral metadata`` on an answers file, ``corral etc-host-updater``)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.metadata import Metadata
from tests.helpers.procs import free_port, start_corral, wait_http
from tests.helpers.wait import until
from tests.integration.agents.test_start_from_state import ready as _ready


def _write(md: Metadata, version: str, hosts: dict[str, str]) -> None:
    tree = {"version": version, "self": {"host": {"uuid": "h-0", "name": "node-0"}},
            "hosts": [{"uuid": f"h-{n}", "name": n, "hostname": n, "agent_ip": ip} for n, ip in hosts.items()],
            "containers": [], "services": [], "stacks": [], "networks": []}
    tmp = md.file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"latest": {"default": tree}}))
    tmp.replace(md.file)


def _text(f: Path) -> str:
    return f.read_text() if f.exists() else ""


def test_etc_host_updater_writes_from_its_persisted_snapshot_with_metadata_down(tmp_path: Path) -> None:
    state, hosts = tmp_path / "etchosts-metadata.json", tmp_path / "hosts"
    md = Metadata(tmp_path)
    _write(md, "1", {"node-a": "10.9.0.1", "node-b": "10.9.0.2"})
    md.start()
    admin = free_port()
    argv = ("etc-host-updater", "--metadata-url", f"{md.url}/latest", "--hosts-file", str(hosts),
            "--hostname", "localhost", "--update-interval", "1", "--metrics-listen", f"127.0.0.1:{admin}",
            "--metadata-state-file", str(state), "--metadata-stale-after", "2s")
    p = start_corral(*argv, name="etc-host-updater")
    try:
        until(lambda: "10.9.0.2    node-b\n" in _text(hosts), what="hosts file written from metadata")
        until(lambda: _ready(admin)[0] == 200, what="ready with fresh metadata")
        assert json.loads(state.read_text())["version"] == "1", "the tree is persisted"
    finally:
        p.stop()
        md.stop()

    hosts.unlink()  # what is written next can only come from the state file: metadata is down
    p = start_corral(*argv, name="etc-host-updater")
    try:
        wait_http(f"http://127.0.0.1:{admin}/metrics")
        text = until(lambda: (t := _text(hosts)) and "10.9.0.2    node-b\n" in t and t,
                     what="hosts file written from the persisted state")
        assert "10.9.0.1    node-a\n" in text
        _, body = until(lambda: (r := _ready(admin))[0] == 503 and r, what="/ready 503 once the data is old")
        assert body["conditions"]["metadata"]["ok"] is False and "old" in body["conditions"]["metadata"]["detail"]
        assert body["conditions"]["hosts-file"]["ok"] is True, "stale data is still served"
        assert p.alive()
        _write(md, "2", {"node-a": "10.9.0.1", "node-c": "10.9.0.3"})
        md.start()
        until(lambda: "10.9.0.3    node-c\n" in _text(hosts) and "node-b" not in _text(hosts),
              what="metadata back: the new hosts written")
        until(lambda: _ready(admin)[0] == 200, what="ready again")
    finally:
        p.stop()
        md.stop()
    assert "Traceback" not in p.log(), p.log()[-3000:]
