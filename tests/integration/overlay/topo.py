"""Three simulated hosts for the overlay: namespaces joined by an underlay bridge, fed by real metadata.

Layout (every name carries a random tag; nothing is created in the root namespace):

* ``ul``: bridge ``br0`` (192.0.2.254/24) with one veth per host; ``corral metadata`` listens
  here on 192.0.2.254:8080 and answers each host by its underlay address (legacy answers: one
  tree per client IP, each with its own ``self``);
* ``hN``: ``eth0`` 192.0.2.N/24 into ``br0``; bridge ``docker0`` 10.42.0.1/16; the router
  (``corral overlay`` in host-netns mode); workload netns ``cN`` (10.42.N.10/16, MTU 1402,
  default route via 10.42.0.1) on ``docker0``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers.netns import sh
from tests.helpers.procs import ROOT, Proc, corral_argv
from tests.helpers.wait import until
from tests.unit.overlay.trees import host, router, tree, workload

META = "192.0.2.254:8080"


def nsx(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *cmd, check=check)


class Topo:
    # tests probe and read the kernel back often, so repairs show up fast; the benchmark runs the defaults
    router_flags: tuple[str, ...] = ("--probe-interval", "0.5", "--verify-interval", "1")

    def __init__(self, tmp: Path, n: int = 3) -> None:
        self.tag = f"ov{os.getpid() % 10000}{secrets.token_hex(2)}"
        self.tmp = tmp
        self.n = n
        self.ul = f"corral-{self.tag}-ul"
        self.namespaces: list[str] = []
        self.routers: dict[int, Proc] = {}
        self.meta: Proc | None = None
        self.version = 0
        self.agent = {i: f"192.0.2.{i}" for i in range(1, n + 1)}
        self.members = set(range(1, n + 1))
        self.extra: list[dict[str, Any]] = []

    def h(self, i: int) -> str:
        return f"corral-{self.tag}-h{i}"

    def c(self, i: int) -> str:
        return f"corral-{self.tag}-c{i}"

    def _ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        nsx(name, "ip", "link", "set", "lo", "up")

    # ---------------------------------------------------------------- build
    def build(self) -> None:
        self._ns(self.ul)
        nsx(self.ul, "ip", "link", "add", "br0", "type", "bridge")
        nsx(self.ul, "ip", "addr", "add", "192.0.2.254/24", "dev", "br0")
        nsx(self.ul, "ip", "link", "set", "br0", "up")
        # Bridged frames go through the underlay's iptables FORWARD (partition tests drop there).
        nsx(self.ul, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1", check=False)
        for i in range(1, self.n + 1):
            h, c = self.h(i), self.c(i)
            self._ns(h)
            self._ns(c)
            sh("ip", "link", "add", f"{self.tag}u{i}", "netns", self.ul, "type", "veth", "peer", "eth0", "netns", h)
            nsx(self.ul, "ip", "link", "set", f"{self.tag}u{i}", "master", "br0", "up")
            nsx(h, "ip", "addr", "add", f"192.0.2.{i}/24", "dev", "eth0")
            nsx(h, "ip", "link", "set", "eth0", "up")
            nsx(h, "ip", "link", "add", "docker0", "type", "bridge")
            nsx(h, "ip", "addr", "add", "10.42.0.1/16", "dev", "docker0")
            nsx(h, "ip", "link", "set", "docker0", "up")
            nsx(h, "ip", "link", "add", "veth-c", "type", "veth", "peer", "eth0", "netns", c)
            nsx(h, "ip", "link", "set", "veth-c", "master", "docker0", "up")
            nsx(c, "ip", "addr", "add", f"10.42.{i}.10/16", "dev", "eth0")
            nsx(c, "ip", "link", "set", "eth0", "mtu", "1402", "up")
            nsx(c, "ip", "route", "add", "default", "via", "10.42.0.1")
        self.publish()
        self.meta = self._proc(self.ul, "metadata", "metadata", "--answers", str(self.tmp / "answers.json"),
                               "--listen", META, "--listenReload", "127.0.0.1:0", "--metrics-listen",
                               "127.0.0.1:0", "--file-poll", "0.1")
        for i in range(1, self.n + 1):
            self.start_router(i)

    def _proc(self, ns: str, name: str, *argv: str) -> Proc:
        env = {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        return Proc(["ip", "netns", "exec", ns, *corral_argv(*argv)], env=env, cwd=str(ROOT), name=name)

    def start_router(self, i: int) -> Proc:
        p = self._proc(self.h(i), f"overlay-h{i}", "overlay", "--metadata-url", f"http://{META}/2015-12-19",
                       "--listen", "127.0.0.1:8111", "--bridge", "docker0", *self.router_flags,
                       "--metadata-state-file", str(self.tmp / f"h{i}-metadata.json"))
        self.routers[i] = p
        return p

    # ---------------------------------------------------------------- metadata
    def containers(self) -> list[dict[str, Any]]:
        cs = []
        for i in sorted(self.members):
            cs += [router(i), workload(i)]
        return cs + self.extra

    def publish(self) -> None:
        """Write the answers file: one tree per host, keyed by the host's underlay address."""
        self.version += 1
        hosts = [host(i, self.agent[i]) for i in sorted(self.members)]
        cs = self.containers()
        trees: dict[str, Any] = {}
        for i in range(1, self.n + 1):
            t = tree(i, hosts, cs, version=str(self.version))
            for addr in {self.agent[i], f"192.0.2.{i}"}:
                trees[addr] = t
        trees["default"] = tree(1, hosts, cs, version=str(self.version))
        f = self.tmp / "answers.json"
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps({"2015-12-19": trees}))
        tmp.replace(f)

    # ---------------------------------------------------------------- probes
    def router_ns(self, i: int) -> str:
        """Where host i's router runs (and answers on 127.0.0.1:8111)."""
        return self.h(i)

    def http(self, i: int, path: str, method: str = "GET") -> tuple[int, str]:
        r = nsx(self.router_ns(i), "curl", "-s", "-m", "20", "-X", method, "-o", "/dev/stdout", "-w", "\n%{http_code}",
                f"http://127.0.0.1:8111{path}", check=False)
        body, _, code = r.stdout.rpartition("\n")
        return int(code or 0), body

    def connectivity(self, i: int) -> dict[str, Any]:
        code, body = self.http(i, "/connectivity")
        assert code == 200, body
        return json.loads(body)  # type: ignore[no-any-return]

    def ping(self, ns: str, dst: str, *extra: str) -> bool:
        return nsx(ns, "ping", "-c", "1", "-W", "1", *extra, dst, check=False).returncode == 0

    def wait_ping(self, ns: str, dst: str, *extra: str) -> None:
        until(lambda: self.ping(ns, dst, *extra), what=f"ping {dst} from {ns}", interval=0.05)

    def fdb(self, i: int) -> list[str]:
        return [ln for ln in nsx(self.h(i), "bridge", "fdb", "show", "dev", "vtep1042", check=False).stdout.splitlines()
                if "dst" in ln]

    def neigh(self, i: int) -> list[str]:
        return nsx(self.h(i), "ip", "neigh", "show", "dev", "vtep1042", "nud", "permanent", check=False).stdout.splitlines()

    def routes(self, i: int) -> list[str]:
        return [ln.strip() for ln in nsx(self.h(i), "ip", "route", "show", "dev", "vtep1042",
                                          check=False).stdout.splitlines()]

    def writes(self, i: int) -> int:
        return int(self.connectivity(i)["writes"])

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()[-3000:]}" for p in [*self.routers.values(), self.meta] if p)

    # ---------------------------------------------------------------- teardown
    def close(self) -> None:
        for p in [*self.routers.values(), self.meta]:
            if p is not None:
                with contextlib.suppress(Exception):
                    p.stop()
        for ns in reversed(self.namespaces):
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            sh("ip", "netns", "del", ns, check=False)
        print(self.logs(), file=sys.stderr)


class IpsecTopo(Topo):
    """The same hosts with ``corral overlay --backend ipsec`` (one charon per host, its VICI socket
    and log under ``tmp/hN-ipsec``); ``psk`` overrides a host's PSK."""

    psk: dict[int, str]

    def start_router(self, i: int) -> Proc:
        psk = getattr(self, "psk", {}).get(i, "mesh-psk")
        env = {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "RANCHER_IPSEC_PSK": psk,
               "CORRAL_IPSEC_DIR": str(self.tmp / f"h{i}-ipsec"),
               "CORRAL_IPSEC_CONFIG_DIR": str(self.tmp / f"h{i}-ipsec-conf")}
        argv = corral_argv("overlay", "--backend", "ipsec", "--metadata-url", f"http://{META}/2015-12-19",
                           "--listen", "127.0.0.1:8111", "--bridge", "docker0", *self.router_flags,
                           "--metadata-state-file", str(self.tmp / f"h{i}-metadata.json"))
        p = Proc(["ip", "netns", "exec", self.h(i), *argv], env=env, cwd=str(ROOT), name=f"ipsec-h{i}")
        self.routers[i] = p
        return p

    def sas(self, i: int) -> dict[str, Any]:
        import vici

        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(self.tmp / f"h{i}-ipsec" / "charon.vici"))
            out: dict[str, Any] = {}
            for entry in vici.Session(s).list_sas():
                out.update({k: v for k, v in entry.items()})
            return out
        finally:
            s.close()

    def up(self, i: int, j: int) -> dict[str, Any] | None:
        sa = self.sas(i).get(f"conn-192.0.2.{j}")
        if sa and sa["state"] == b"ESTABLISHED" and any(c["state"] == b"INSTALLED"
                                                         for c in sa.get("child-sas", {}).values()):
            return sa  # type: ignore[no-any-return]
        return None

    def children(self, i: int, j: int) -> list[bytes]:
        """States of every CHILD_SA h_i holds towards h_j, over all its IKE_SAs with h_j."""
        return [c["state"] for entry in self._list(i, j) for sa in entry.values()
                for c in sa.get("child-sas", {}).values()]

    def conns(self, i: int) -> set[str]:
        import vici

        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(self.tmp / f"h{i}-ipsec" / "charon.vici"))
            return {name for entry in vici.Session(s).list_conns() for name in entry}
        finally:
            s.close()

    def spis(self, i: int, j: int) -> list[bytes]:
        return sorted(c["spi-in"] for entry in self._list(i, j) for sa in entry.values()
                      for c in sa.get("child-sas", {}).values())

    def _list(self, i: int, j: int) -> list[Any]:
        import vici

        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(self.tmp / f"h{i}-ipsec" / "charon.vici"))
            return list(vici.Session(s).list_sas({"ike": f"conn-192.0.2.{j}"}))
        finally:
            s.close()

    def charon_log(self, i: int) -> str:
        return (self.tmp / f"h{i}-ipsec" / "charon.log").read_text(errors="replace")
