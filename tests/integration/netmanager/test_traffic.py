"""Real traffic through the host ports ``corral netmanager`` programs (spec §12.2 UDP, §12.3, §12.9).

Namespaces: the fixture's ``host`` (docker0 10.42.0.1/16; 192.0.2.1 and 192.0.2.3 on the link to
``out``), containers ``c1`` (10.42.200.5, metadata's web-1) and ``c2`` (10.42.200.6, dns-1) on
docker0, and ``out`` (192.0.2.2). Each container runs an HTTP server on 80 and a UDP echo server
on 53 that answers with its own name; conntrack entries come from those packets, not from
``conntrack -I``.
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.netns import netns, run_in_netns
from tests.integration.netmanager.conftest import Host

pytestmark = [pytest.mark.root]

C1, C2 = "10.42.200.5", "10.42.200.6"
SERVER = """
import http.server, socket, sys, threading
name, ip = sys.argv[1], sys.argv[2]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((ip, 53))
def echo():
    while True:
        data, peer = u.recvfrom(2048)
        u.sendto(name.encode() + b" " + data, peer)
threading.Thread(target=echo, daemon=True).start()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (name + "\\n").encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer((ip, 80), H).serve_forever()
"""
CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("192.0.2.2", int(sys.argv[3])))
s.settimeout(2)
s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
try:
    print(s.recvfrom(2048)[0].decode())
except OSError:
    print("")
"""


class Lab:
    def __init__(self, host: Host, c1: str, c2: str, out: str) -> None:
        self.host, self.c1, self.c2, self.out = host, c1, c2, out

    def get(self, url: str) -> str:
        return run_in_netns(self.out, "curl", "-s", "-m", "3", url, check=False).stdout.strip()

    def udp(self, dst: str, port: int, sport: int) -> str:
        """One datagram from out:<sport> to dst:port; the echo's answer ("c1 ping") or ""."""
        return run_in_netns(self.out, sys.executable, "-c", CLIENT, dst, str(port), str(sport)).stdout.strip()

    def flows(self, dport: int) -> list[str]:
        text = self.host.sh("conntrack", "-L", "-p", "udp", "--orig-port-dst", str(dport), check=False)
        return [ln for ln in text.splitlines() if "src=192.0.2.2 " in ln]


@pytest.fixture(scope="module")
def lab(host: Host) -> Iterator[Lab]:
    procs: list[subprocess.Popen[bytes]] = []
    with netns("c1") as c1, netns("c2") as c2, netns("out") as out:
        tag = out[-6:]
        host.sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
        for ns, ip, n in ((c1, C1, "1"), (c2, C2, "2")):
            veth = f"vethr{tag}{n}"
            host.sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            host.sh("ip", "link", "set", veth, "master", "docker0", "up")
            run_in_netns(ns, "ip", "addr", "add", f"{ip}/16", "dev", "eth0")
            run_in_netns(ns, "ip", "link", "set", "eth0", "up")
            run_in_netns(ns, "ip", "route", "add", "default", "via", "10.42.0.1")
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, f"c{n}", ip],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        host.sh("ip", "link", "add", f"nmt{tag}", "type", "veth", "peer", "name", "eth0", "netns", out)
        host.sh("ip", "addr", "add", "192.0.2.1/24", "dev", f"nmt{tag}")
        host.sh("ip", "addr", "add", "192.0.2.3/24", "dev", f"nmt{tag}")
        host.sh("ip", "link", "set", f"nmt{tag}", "up")
        run_in_netns(out, "ip", "addr", "add", "192.0.2.2/24", "dev", "eth0")
        run_in_netns(out, "ip", "link", "set", "eth0", "up")
        try:
            lab = Lab(host, c1, c2, out)
            for ns, ip, name in ((c1, C1, "c1"), (c2, C2, "c2")):
                host.wait(lambda ns=ns, ip=ip, name=name: run_in_netns(  # type: ignore[misc]
                    ns, "curl", "-s", "-m", "2", f"http://{ip}/", check=False).stdout == f"{name}\n", f"{name} serving")
            yield lab
        finally:
            for p in procs:
                p.kill()
                p.wait()
            host.sh("ip", "link", "del", f"nmt{tag}", check=False)
            host.sh("conntrack", "-F", check=False)


@contextlib.contextmanager
def ports(host: Host, web: list[str], dns: list[str]) -> Iterator[list[dict[str, Any]]]:
    """Metadata with web-1 (c1) and dns-1 (c2) publishing ``web`` / ``dns``; the fixture's afterwards."""
    saved = copy.deepcopy(host.objs)
    objs = copy.deepcopy(host.objs)
    set_ports(objs, web, dns)
    host.bump(objs)
    host.wait(host.in_sync, "ports programmed")
    try:
        yield objs
    finally:
        host.bump(saved)
        host.wait(host.in_sync, "back to the fixture")


def set_ports(objs: list[dict[str, Any]], web: list[str], dns: list[str]) -> None:
    for o in objs:
        if o.get("uuid") == "ctr-web-1":
            o["ports"] = web
        if o.get("uuid") == "ctr-dns-1":
            o["ports"] = dns


def test_udp_echo_through_the_dnat(lab: Lab) -> None:
    """§12.2: a datagram to host:5300/udp reaches c1's echo server on 53 and the answer comes back."""
    with ports(lab.host, ["0.0.0.0:8080:80/tcp", "0.0.0.0:5300:53/udp"], []):
        assert lab.udp("192.0.2.1", 5300, 4000) == "c1 ping"
        assert lab.udp("192.0.2.3", 5300, 4000) == "c1 ping"  # any local address for 0.0.0.0
        assert lab.get("http://192.0.2.1:8080/") == "c1"


def test_specific_ip_is_not_shadowed_by_a_wildcard_binding(lab: Lab) -> None:
    """§12.3: ``192.0.2.1:8081:80`` (c1) answers on 192.0.2.1 only; c2's ``0.0.0.0:8081`` gets the
    host's other address, and does not take 192.0.2.1 from c1. Both directions of each pair."""
    with ports(lab.host, ["192.0.2.1:8081:80/tcp", "192.0.2.1:5301:53/udp"],
               ["0.0.0.0:8081:80/tcp", "0.0.0.0:5301:53/udp"]):
        assert lab.get("http://192.0.2.1:8081/") == "c1"
        assert lab.get("http://192.0.2.3:8081/") == "c2"
        assert lab.udp("192.0.2.1", 5301, 4001) == "c1 ping"
        assert lab.udp("192.0.2.3", 5301, 4001) == "c2 ping"
    with ports(lab.host, ["192.0.2.1:8081:80/tcp"], []):  # c1 alone: the other address is not forwarded
        assert lab.get("http://192.0.2.1:8081/") == "c1"
        assert lab.get("http://192.0.2.3:8081/") == ""


def test_retarget_with_live_udp_flows(lab: Lab) -> None:
    """§12.9 with flows made by real packets: out:4002 -> host:5302 is DNATed to c1; the port moves
    to c2 -> that flow is deleted right after the apply and the next datagram from the same source
    port reaches c2 (a kept flow would still carry it to c1). Then the periodic sweep: with the
    daemon down, the port moves back to c1 in metadata, a datagram makes a flow to c2 through the
    rules still in place; the daemon starts, its boot apply has no "before" to compare with, and
    the sweep deletes that flow; the next datagram reaches c1. A flow of another port stays.
    (The persisted snapshot is removed before that start: from it the boot would see the move.)"""
    host = lab.host
    with ports(host, ["0.0.0.0:5302:53/udp"], ["0.0.0.0:5303:53/udp"]) as objs:
        assert lab.udp("192.0.2.1", 5302, 4002) == "c1 ping"
        assert lab.udp("192.0.2.1", 5303, 4003) == "c2 ping"
        assert len(lab.flows(5302)) == 1 and f"src={C1} " in lab.flows(5302)[0]
        def other_kept() -> bool:
            return any(f"src={C2} " in ln and "sport=4003 " in ln for ln in lab.flows(5303))

        assert other_kept()
        deleted = host.metric("corral_netmanager_conntrack_deleted_total")

        set_ports(objs, [], ["0.0.0.0:5302:53/udp", "0.0.0.0:5303:53/udp"])
        host.bump(objs)
        host.wait(lambda: not any(f"src={C1} " in ln for ln in lab.flows(5302)), "c1's flow deleted")
        assert host.metric("corral_netmanager_conntrack_deleted_total") >= deleted + 1
        assert lab.udp("192.0.2.1", 5302, 4002) == "c2 ping"
        assert other_kept()

        host.stop_nm()
        set_ports(objs, ["0.0.0.0:5302:53/udp"], ["0.0.0.0:5303:53/udp"])
        host.bump(objs)
        assert lab.udp("192.0.2.1", 5302, 4004) == "c2 ping"  # the old rules, kept while the daemon is down
        assert any(f"src={C2} " in ln and "dport=4004" in ln for ln in lab.flows(5302))
        (host.state / "metadata.json").unlink(missing_ok=True)  # boot straight from metadata: no "before"
        host.start_nm()
        host.wait(lambda: not any(f"src={C2} " in ln for ln in lab.flows(5302)), "stale flow swept")
        assert host.metric("corral_netmanager_conntrack_swept_total") >= 1
        assert host.metric("corral_netmanager_conntrack_deleted_total") == 0  # not the retarget clean-up
        assert lab.udp("192.0.2.1", 5302, 4004) == "c1 ping"
        assert other_kept()
