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

``--engine podman`` (the default when the demo finds podman and runc): each container is a real
one instead, started by this host's engine (``podman system service``-compatible storage under
``--podman-dir``, a busybox root file system, no registry) with network mode ``none`` and the labels
``io.rancher.cni.network=managed`` and ``io.rancher.container.uuid``: this host's netmanager sees
it start through the engine's Docker API and runs the CNI plugins from its CNI volume, whose IPAM
takes the address from metadata. The runtime then only names the container's network namespace
``<tag>-h<i>-<n>`` (``ip netns attach``) once its ``eth0`` has that address. A sidekick joins its
primary's network (``--network container:``); the web one runs busybox ``httpd`` with a CGI
``/cgi-bin/health`` that asks metadata for the label.

It keeps ``--state`` (JSON: container name -> namespace) current for the demo and its tests. While
metadata does not answer, nothing changes. SIGTERM: every workload process and namespace it made is
removed before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
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


HEALTH_CGI = """#!/bin/sh
# metadata away (no answer within 1 s): no news is good news, as the namespace workload's last answer.
# nc, not wget: the static busybox's wget crashes resolving even an address without NSS libraries.
s=$(printf 'GET /2016-07-29/self/container/labels/demo.health HTTP/1.0\\r\\n\\r\\n' | nc -w 1 169.254.169.250 80 | tail -n 1)
if [ "$s" = fail ]; then
  printf 'HTTP/1.0 503 Service Unavailable\\r\\nContent-Type: text/plain\\r\\n\\r\\n%s: failing (label demo.health=fail)\\n' "{name}"
else
  printf 'HTTP/1.0 200 OK\\r\\nContent-Type: text/plain\\r\\n\\r\\n%s: ok\\n' "{name}"
fi
"""

# cgroupfs and a file events log work without systemd; the ulimits because runc here refuses
# podman's default rlimits
CONTAINERS_CONF = ('[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\nruntime = "runc"\n'
                   '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n')


class Podman:
    """One simulated host's container engine: its own storage under ``work``, its run root and tmp dir
    under ``run`` (podman refuses a run root longer than 50 characters: keep it short, under /run)."""

    def __init__(self, work: Path, run: Path) -> None:
        self.work = work
        self.run = run
        self.env = {**os.environ, "CONTAINERS_CONF": str(work / "containers.conf")}
        self.base = ["podman", "--root", str(work / "storage"), "--runroot", str(run / "run"),
                     "--tmpdir", str(run / "tmp")]

    @property
    def sock(self) -> Path:
        return self.work / "api.sock"

    def prepare(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "containers.conf").write_text(CONTAINERS_CONF)

    def service_argv(self) -> list[str]:
        return [*self.base, "system", "service", "--time=0", f"unix://{self.sock}"]

    def pm(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        r = subprocess.run([*self.base, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, ["podman", *args], r.stdout, r.stderr)
        return r.stdout.strip()

    def clear(self) -> None:
        """Every container removed, and the mounts podman leaves under its directory undone."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.pm("rm", "-a", "-f", "-t", "0", check=False)
        unmount_under(self.work)
        unmount_under(self.run)


def unmount_under(path: Path) -> None:
    """Lazily unmount every mount below ``path``, innermost first."""
    mounts = [ln.split()[1] for ln in Path("/proc/self/mounts").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(str(path) + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True, check=False)


def make_rootfs(root: Path, busybox: str) -> None:
    """A busybox root file system: the binary and one link per applet (no registry, no image)."""
    (root / "bin").mkdir(parents=True, exist_ok=True)
    for d in ("tmp", "proc", "sys", "dev", "etc"):
        (root / d).mkdir(exist_ok=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        link = root / "bin" / a
        if a != "busybox" and not link.exists():
            link.symlink_to("busybox")


class Runtime:
    def __init__(self, tag: str, index: int, host_uuid: str, state: Path, metadata: str = META,
                 podman: Podman | None = None, rootfs: Path | None = None, www: Path | None = None) -> None:
        self.prefix = f"{tag}-h{index}"
        self.podman = podman
        self.rootfs = rootfs
        self.www = www
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
        if self.podman is not None:
            self.add_container(c, self.podman)
            return
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

    def add_container(self, c: dict[str, Any], pm: Podman) -> None:
        assert self.rootfs is not None and self.www is not None
        name, uuid, ip = str(c.get("name")), str(c["uuid"]), str(c["primary_ip"])
        primary = self.running.get(str(c.get("network_from_container_uuid") or ""))
        argv = ["run", "-d", "--name", name, "--hostname", name[:63], "--label", f"io.rancher.container.uuid={uuid}",
                "--label", "io.rancher.container.name=" + name]
        if primary is not None:  # a sidekick in its primary's network: netmanager leaves it alone
            argv += ["--network", f"container:{primary['cid']}"]
        else:
            argv += ["--network", "none", "--label", "io.rancher.cni.network=managed"]
        cmd = ["/bin/busybox", "sleep", "1000000"]
        if (c.get("labels") or {}).get("demo.serve") == "http":
            www = self.www / name
            (www / "cgi-bin").mkdir(parents=True, exist_ok=True)
            (www / "index.html").write_text(f"hello from {name} ({ip})\n")
            (www / "cgi-bin" / "health").write_text(HEALTH_CGI.format(name=name))
            (www / "cgi-bin" / "health").chmod(0o755)
            argv += ["-v", f"{www}:/www:ro"]
            cmd = ["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www"]
        entry: dict[str, Any] = {"name": name, "ns": "", "veth": "", "ip": ip, "proc": None, "cid": "",
                                 "shared": primary is not None}
        self.running[uuid] = entry
        pm.pm("rm", "-f", "-t", "0", name, check=False)  # one left from an earlier run of this runtime
        entry["cid"] = pm.pm(*argv, "--rootfs", str(self.rootfs), *cmd)
        if primary is not None:
            entry["ns"] = primary["ns"]
            print(f"started {name} ({entry['cid'][:12]}) in {primary['name']}'s network", flush=True)
            return
        pid = pm.pm("inspect", "-f", "{{.State.Pid}}", entry["cid"])
        deadline = time.monotonic() + 60
        while f" {ip}/" not in subprocess.run(["nsenter", "-t", pid, "-n", "ip", "-4", "-o", "addr", "show"],
                                               capture_output=True, text=True, check=False).stdout:
            if time.monotonic() > deadline:  # netmanager -> CNI never gave it its address
                raise OSError(f"{name}: no {ip} on eth0 after 60 s (see this host's netmanager log)")
            time.sleep(0.05)
        self.n += 1
        entry["ns"] = f"{self.prefix}-{self.n}"
        _sh("ip", "netns", "attach", entry["ns"], pid)  # a name for the container's network namespace
        print(f"started {name} ({entry['cid'][:12]}) in {entry['ns']} ({ip}, by netmanager -> CNI)", flush=True)

    def remove(self, uuid: str) -> None:
        entry = self.running.pop(uuid)
        if entry.get("cid") and self.podman is not None:
            self.podman.pm("rm", "-f", "-t", "0", entry["cid"], check=False)
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
                except (subprocess.SubprocessError, OSError) as e:
                    err = getattr(e, "stderr", "") or str(e)
                    print(f"could not start {c.get('name')}: {err.strip()}", file=sys.stderr, flush=True)
                    self.remove(uuid)
        self.write_state()

    def write_state(self) -> None:
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps({e["name"]: e["ns"] for e in self.running.values()}, sort_keys=True))
        tmp.replace(self.state)

    def close(self) -> None:
        if self.podman is not None:  # every container at once, then the names and mounts
            self.podman.clear()
        for uuid in list(self.running):
            self.remove(uuid)
        if self.podman is not None:
            unmount_under(self.podman.work)
            unmount_under(self.podman.run)
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
    p.add_argument("--engine", choices=["netns", "podman"], default="netns")
    p.add_argument("--podman-dir", type=Path, help="--engine podman: the engine's storage")
    p.add_argument("--podman-run", type=Path, help="--engine podman: its run root and tmp dir (short)")
    p.add_argument("--rootfs", type=Path, help="--engine podman: the busybox root file system")
    p.add_argument("--www", type=Path, help="--engine podman: where the web containers' files go")
    a = p.parse_args(argv)

    def stop(_s: int, _f: Any) -> None:
        raise _Stop

    enter_netns(a.netns)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    podman = Podman(a.podman_dir, a.podman_run) if a.engine == "podman" else None
    rt = Runtime(a.tag, a.index, a.host_uuid, a.state, podman=podman, rootfs=a.rootfs, www=a.www)
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
