"""``corral demo --hosts 3`` end to end on VXLAN and on IPsec (kernel-libipsec): Corral dns, the
overlay, hosts files, clean Ctrl-C.

One demo per backend (it is the slow part); the last test stops it with SIGINT and checks that
nothing it made is left: namespaces, links, processes (charon included), the temporary directory,
/etc/netns entries.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from standin.demo_hosts import META_IP, UNDERLAY
from tests.helpers.netns import requires_root, sh
from tests.helpers.procs import ROOT, corral_argv
from tests.helpers.tools import require_tool
from tests.helpers.wait import until

pytestmark = [pytest.mark.root, requires_root]

OUR_LINKS = {"br0", "docker0", "vtep1042", "u1", "u2", "u3", "v1", "v2"}


@dataclass
class Demo:
    backend: str
    proc: subprocess.Popen[bytes]
    out: Path
    tmp: Path
    tag: str
    links_before: set[str]
    pids: set[int] = field(default_factory=set)

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def h(self, i: int) -> str:
        return f"{self.tag}-h{i}"

    def namespaces(self) -> list[str]:
        return [ns for ns in sh("ip", "netns", "list").stdout.split() if ns.startswith(self.tag + "-")]


def _links() -> set[str]:
    return {m.group(1) for m in re.finditer(r"^\d+: ([^:@]+)", sh("ip", "-o", "link").stdout, re.M)}


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie holds nothing; reaping it is init's job)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _tx_packets(ns: str, dev: str) -> int:
    return int(nsx(ns, "cat", f"/sys/class/net/{dev}/statistics/tx_packets").stdout or 0)


def nsx(ns: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *cmd, check=False)


@pytest.fixture(scope="module", params=["vxlan", "ipsec"])
def demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    backend = str(request.param)
    for tool in ("ping", "dig", "curl", "bridge", "iptables"):
        require_tool(tool)
    if backend == "ipsec":
        require_tool("/usr/lib/ipsec/charon")
    base = tmp_path_factory.mktemp("demo-hosts")
    tmp = base / "tmp"
    tmp.mkdir()
    out = base / "demo.out"
    before = _links()
    with open(out, "wb") as f:
        proc = subprocess.Popen(corral_argv("demo", "--hosts", "3", "--backend", backend), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=str(ROOT), start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
                                     "TMPDIR": str(tmp)})
    d = Demo(backend, proc, out, tmp, f"corral-demo-{proc.pid}", before)
    try:
        until(lambda: "all workloads reachable" in d.text() or proc.poll() is not None, what="demo up")
        assert proc.poll() is None, d.text()
        yield d
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for ns in d.namespaces():  # only after a failure: the SIGINT test asserts there are none
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)
        print(d.text())


def _workload(d: Demo, host: int, prefix: str) -> str:
    """The namespace of a workload on ``host`` whose container name starts with ``prefix``."""
    for ns in d.namespaces():
        if ns.startswith(d.h(host) + "-"):
            name = nsx(ns, "curl", "-s", "-m", "5", f"http://{META_IP}/latest/self/container/name").stdout
            if name.startswith(prefix):
                return ns
    raise AssertionError(f"no {prefix}* workload on host {host}: {d.namespaces()}")


def test_service_on_host3_resolves_and_answers_from_host1_over_vxlan(demo: Demo) -> None:
    client = _workload(demo, 1, "demo-client")
    web3 = _workload(demo, 3, "demo-web3")
    web3_ip = nsx(web3, "curl", "-s", "-m", "5", f"http://{META_IP}/latest/self/container/primary_ip").stdout
    assert re.fullmatch(r"10\.42\.\d+\.\d+", web3_ip), web3_ip
    # Host 1's Corral dns (metadata + dns in host 1's namespace) answers the service name of host 3's web.
    for name in ("web3.demo.rancher.internal", "web3.demo", "web3"):
        got = nsx(client, "dig", "+short", "+tries=1", "+time=2", f"@{META_IP}", name).stdout.split()
        assert got == [web3_ip], (name, got)
    # That address is reached through host 1's VTEP, not some other path.
    assert "dev vtep1042" in nsx(demo.h(1), "ip", "route", "get", web3_ip).stdout
    tunnel = _tx_packets(demo.h(1), "ipsec0") if demo.backend == "ipsec" else 0
    until(lambda: nsx(client, "ping", "-c", "1", "-W", "1", web3_ip).returncode == 0, what="ping web3 from h1")
    body = nsx(client, "curl", "-s", "-m", "5", f"http://{web3_ip}/").stdout
    assert "Directory listing" in body  # web3's HTTP server, over TCP through the overlay
    if demo.backend == "ipsec":  # the VTEP's packets to host 3 went into the IPsec tunnel device
        router3 = nsx(demo.h(1), "bridge", "fdb", "show", "dev", "vtep1042").stdout
        assert "dst 10.42." in router3, router3  # FDB toward the peer router IPs, routed into ipsec0
        assert _tx_packets(demo.h(1), "ipsec0") > tunnel
    # And host 1's own web is not routed through the overlay.
    web1_ip = nsx(_workload(demo, 1, "demo-web1"), "curl", "-s", "-m", "5",
                  f"http://{META_IP}/latest/self/container/primary_ip").stdout
    assert "vtep1042" not in nsx(demo.h(1), "ip", "route", "get", web1_ip).stdout


def test_every_hosts_file_lists_the_other_hosts(demo: Demo) -> None:
    for i in (1, 2, 3):
        path = Path("/etc/netns") / demo.h(i) / "hosts"

        def listed(path: Path = path) -> bool:
            text = path.read_text()
            return all(re.search(rf"^{re.escape(UNDERLAY)}\.{j}\s+node-{j}$", text, re.M) for j in (1, 2, 3))

        until(listed, what=f"host {i}'s hosts file lists node-1..3")
        # What the host's processes see as /etc/hosts, and a name in it resolves and answers.
        assert "node-2" in nsx(demo.h(i), "cat", "/etc/hosts").stdout
    assert nsx(demo.h(1), "ping", "-c", "1", "-W", "2", "node-3").returncode == 0


def test_sigint_leaves_nothing_behind(demo: Demo) -> None:
    namespaces = demo.namespaces()
    assert len(namespaces) == 1 + 3 + 6  # underlay, hosts, two workloads per host
    pids = {int(p) for ns in namespaces for p in sh("ip", "netns", "pids", ns).stdout.split()}
    assert len(pids) >= 1 + 4 * 3 + 3  # server, 4 daemons per host, 3 web servers
    assert [p.name for p in demo.tmp.iterdir()], "the demo's temporary directory exists while it runs"
    demo.proc.send_signal(signal.SIGINT)
    assert demo.proc.wait(60) == 0, demo.text()
    assert "demo stopped" in demo.text()
    assert demo.namespaces() == []
    assert not any(Path("/etc/netns", ns).exists() for ns in namespaces)
    alive = [p for p in pids if _running(p)]
    assert alive == [], [Path(f"/proc/{p}/cmdline").read_text(errors="replace") for p in alive]
    assert list(demo.tmp.iterdir()) == []
    new = (_links() - demo.links_before) & OUR_LINKS
    assert new == set()
    assert "vtep1042" not in sh("iptables-save").stdout
