"""One simulated host's container runtime for ``corral demo --hosts N``.

Runs in the host's network namespace (``--netns``: it enters it itself, and keeps the mount
namespace it was started in, so the namespaces it adds are visible to everyone; ``ip netns exec``
would give it a private one) and does what Docker and the Rancher agent do there: every container
the server placed on this host (as this host's metadata lists it; the overlay router lives in the
host itself and is left out) becomes a network namespace ``<tag>-h<i>-<n>`` with a veth into
``docker0`` and the address metadata gives it; a sidekick with ``network_mode: container`` shares
its primary's. A container labelled ``demo.serve=http`` also runs the web workload
(standin/demo_web.py) on port 80. A container that leaves metadata (removed, or moved away) loses
its process and namespace.

It keeps ``--state`` (JSON: container name -> namespace) current for the demo and its tests. While
metadata does not answer, nothing changes. SIGTERM: every workload process and namespace it made is
removed before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agents.children import die_with_parent
from netmanager.main import enter_netns

__all__ = ["Runtime", "main", "wanted"]

META = "http://169.254.169.250"
ROUTER_LABEL = "io.rancher.container.agent_service."


def wanted(containers: list[Any], host_uuid: str) -> dict[str, dict[str, Any]]:
    """The containers this host runs as workloads, by uuid (pure: metadata's list in, the set out)."""
    out: dict[str, dict[str, Any]] = {}
    for c in containers:
        if not isinstance(c, dict) or c.get("host_uuid") != host_uuid or not c.get("primary_ip"):
            continue
        if c.get("system") or str(c.get("state") or "running") not in ("running", "starting"):
            continue
        if any(str(k).startswith(ROUTER_LABEL) for k in (c.get("labels") or {})):
            continue
        out[str(c["uuid"])] = c
    return out


def _sh(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True, text=True, timeout=30)


class Runtime:
    def __init__(self, tag: str, index: int, host_uuid: str, state: Path, metadata: str = META) -> None:
        self.prefix = f"{tag}-h{index}"
        self.host_uuid = host_uuid
        self.state = state
        self.metadata = metadata.rstrip("/")
        self.running: dict[str, dict[str, Any]] = {}  # uuid -> {name, ns, veth, ip, proc}
        self.n = 0

    def fetch(self) -> list[Any] | None:
        req = urllib.request.Request(f"{self.metadata}/2016-07-29/containers", headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                doc = json.loads(r.read())
        except (OSError, ValueError, urllib.error.URLError):
            return None
        return doc if isinstance(doc, list) else None

    def add(self, c: dict[str, Any]) -> None:
        shared = self.running.get(str(c.get("network_from_container_uuid") or ""))
        if shared is not None:  # a sidekick in its primary's network namespace
            self.running[str(c["uuid"])] = {"name": str(c.get("name")), "ns": shared["ns"], "veth": "",
                                            "ip": str(c["primary_ip"]), "proc": None, "shared": True}
            print(f"started {c.get('name')} in {shared['ns']} (its primary's network)", flush=True)
            return
        self.n += 1
        ns, veth, ip = f"{self.prefix}-{self.n}", f"v{self.n}", str(c["primary_ip"])
        entry: dict[str, Any] = {"name": str(c.get("name")), "ns": ns, "veth": veth, "ip": ip, "proc": None}
        self.running[str(c["uuid"])] = entry  # recorded first: a half-made one is still removed
        _sh("ip", "netns", "add", ns)
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _sh("ip", "link", "set", veth, "master", "docker0", "up")
        _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/16", "dev", "eth0")
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "mtu", "1400", "up")  # VXLAN takes 50 of 1500
        _sh("ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", "10.42.0.1")
        if (c.get("labels") or {}).get("demo.serve") == "http":
            entry["proc"] = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "standin.demo_web", "--listen", ip],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=die_with_parent)
        print(f"started {entry['name']} in {ns} ({ip})", flush=True)

    def remove(self, uuid: str) -> None:
        entry = self.running.pop(uuid)
        proc = entry["proc"]
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not entry.get("shared"):
            subprocess.run(["ip", "netns", "del", entry["ns"]], capture_output=True, check=False)  # its veth too
        print(f"removed {entry['name']} ({entry['ns']})", flush=True)

    def sync(self, containers: list[Any]) -> None:
        want = wanted(containers, self.host_uuid)
        for uuid in [u for u in self.running if u not in want or want[u]["primary_ip"] != self.running[u]["ip"]]:
            self.remove(uuid)
        for uuid in [u for u, e in self.running.items() if e.get("shared") and e["ns"] not in
                     {o["ns"] for o in self.running.values() if not o.get("shared")}]:
            self.remove(uuid)  # its primary went
        # primaries first: a sidekick sharing one's network needs it made
        for uuid, c in sorted(want.items(), key=lambda kv: bool(kv[1].get("network_from_container_uuid"))):
            if uuid not in self.running:
                try:
                    self.add(c)
                except (subprocess.CalledProcessError, OSError) as e:
                    err = getattr(e, "stderr", "") or str(e)
                    print(f"could not start {c.get('name')}: {err.strip()}", file=sys.stderr, flush=True)
                    self.remove(uuid)
        self.write_state()

    def write_state(self) -> None:
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps({e["name"]: e["ns"] for e in self.running.values()}, sort_keys=True))
        tmp.replace(self.state)

    def close(self) -> None:
        for uuid in list(self.running):
            self.remove(uuid)
        with contextlib.suppress(OSError):
            self.state.unlink()


class _Stop(BaseException):
    pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m standin.demo_runtime")
    p.add_argument("--netns", required=True, help="the host's network namespace")
    p.add_argument("--tag", required=True, help="namespace name prefix of the demo")
    p.add_argument("--index", type=int, required=True, help="this host's number")
    p.add_argument("--host-uuid", required=True)
    p.add_argument("--state", required=True, type=Path)
    p.add_argument("--interval", type=float, default=0.3)
    a = p.parse_args(argv)

    def stop(_s: int, _f: Any) -> None:
        raise _Stop

    enter_netns(a.netns)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    rt = Runtime(a.tag, a.index, a.host_uuid, a.state)
    try:
        while True:
            containers = rt.fetch()
            if containers is not None:
                rt.sync(containers)
            time.sleep(a.interval)
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        rt.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
