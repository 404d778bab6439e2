"""A throw-away "host" network namespace with a docker0 bridge, Corral's metadata service serving an
answers file inside it, and ``corral netmanager`` run inside it (``ip netns exec``) against real
iptables (the nft or the legacy backend), real netlink and a temporary CNI volume and state dir."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from netmanager.desired import HostFacts, Ruleset, desired_ruleset
from netmanager.rules import Tables, parse_save
from tests.helpers.netns import netns, requires_root, run_in_netns, sh
from tests.helpers.procs import ROOT, Proc, corral_argv
from tests.helpers.wait import until
from tests.unit.netmanager.conftest import objects, snapshot_of

pytestmark = [requires_root, pytest.mark.root]
MD_PORT = 8780
ADMIN_PORT = 9115


class Host:
    def __init__(self, ns: str, tmp: Path, backend: str) -> None:
        self.ns, self.tmp, self.backend = ns, tmp, backend
        self.answers = tmp / "answers.json"
        self.cni = tmp / "cni"
        self.state = tmp / "state"
        self.objs: list[dict[str, Any]] = objects()
        self.md: Proc | None = None
        self.nm: Proc | None = None
        self.version = 1
        self.write_answers(self.objs)

    # ------------------------------------------------------------ plumbing
    def sh(self, *cmd: str, check: bool = True) -> str:
        r = run_in_netns(self.ns, *cmd, check=False)
        if check and r.returncode != 0:
            raise AssertionError(f"{cmd}: {r.stderr}")
        return r.stdout

    def ipt(self, *args: str, check: bool = True) -> str:
        return self.sh(f"iptables-{self.backend}", "-w", *args, check=check)

    def save(self) -> str:
        return self.sh(f"iptables-{self.backend}-save")

    def tables(self) -> Tables:
        return parse_save(self.save())

    def write_answers(self, objs: list[dict[str, Any]]) -> None:
        self.objs = objs
        tmp = self.answers.with_suffix(".tmp")
        tmp.write_text("\n".join(json.dumps(o) for o in objs) + "\n")
        os.replace(tmp, self.answers)

    def bump(self, objs: list[dict[str, Any]]) -> None:
        """New answers with a new version (the metadata service reloads the file)."""
        self.version += 1
        for o in objs:
            if o["metadata_kind"] == "defaultData":
                o["version"] = str(self.version)
        self.write_answers(objs)

    def desired(self) -> Ruleset:
        return desired_ruleset(snapshot_of(self.objs), HostFacts())

    def _proc(self, name: str, *argv: str, env: dict[str, str] | None = None) -> Proc:
        return Proc(["ip", "netns", "exec", self.ns, *corral_argv(*argv)], env=env, cwd=str(ROOT), name=name)

    def start_md(self) -> None:
        self.md = self._proc("nm-metadata", "metadata", "--listen", f"127.0.0.1:{MD_PORT}",
                             "--listenReload", "127.0.0.1:8112", "--metrics-listen", "127.0.0.1:9112",
                             "--answers", str(self.answers), "--file-poll", "0.1")
        self.wait(lambda: self.http(MD_PORT, "/2016-07-29/version") is not None, "metadata up")

    def stop_md(self) -> None:
        if self.md is not None:
            self.md.stop()
            self.md = None

    def start_nm(self, *extra: str) -> None:
        self.nm = self._proc("netmanager", "netmanager", "--metadata-url",
                             f"http://127.0.0.1:{MD_PORT}/2016-07-29", "--metadata-state-file", str(self.state / "metadata.json"),
                             "--cni-dir", str(self.cni), "--metrics-listen", f"127.0.0.1:{ADMIN_PORT}",
                             "--iptables-backend", self.backend, "--verify-interval", "1s", "--docker-host", "", *extra,
                             env={"DOCKER_BRIDGE": "docker0", "METADATA_IP": "169.254.169.250"})
        self.wait(lambda: self.http(ADMIN_PORT, "/healthz") is not None, "netmanager up")

    def stop_nm(self) -> None:
        if self.nm is not None:
            self.nm.stop()
            self.nm = None

    def http(self, port: int, path: str) -> str | None:
        r = run_in_netns(self.ns, "curl", "-s", "-f", "-m", "5", f"http://127.0.0.1:{port}{path}", check=False)
        return r.stdout if r.returncode == 0 else None

    def metric(self, name: str, label: str = "") -> float:
        text = self.http(ADMIN_PORT, "/metrics") or ""
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name)] in " {" and label in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def wait(self, pred: Callable[[], object], what: str, timeout: float | None = None) -> None:
        try:
            until(pred, what=what, timeout=timeout, interval=0.05)
        except AssertionError as e:
            logs = "\n".join(p.log()[-4000:] for p in (self.nm, self.md) if p is not None)
            raise AssertionError(f"{e}\n{logs}") from None

    def verify_rounds(self) -> float:
        """Periodic verifications so far: read-backs, and legacy's digest checks that found the
        tables as last read (no read-back needed)."""
        return self.metric("corral_netmanager_verify_reads_total") + self.metric(
            "corral_netmanager_verify_digests_total", 'result="same"')

    def in_sync(self) -> bool:
        from netmanager.rules import diff

        return not diff(self.desired(), self.tables())


def _root_state() -> dict[str, list[str]]:
    """What of the root namespace netmanager could plausibly touch (other tests may add unrelated links)."""
    out: dict[str, list[str]] = {}
    for b in ("nft", "legacy"):
        if b == "legacy" and not Path("/proc/net/ip_tables_names").exists():
            continue  # reading would load the legacy modules: nothing there to compare
        text = sh(f"iptables-{b}-save", check=False).stdout
        out[b] = [ln for ln in text.splitlines() if re.search(r"CATTLE|RANCHER", ln)]
    out["routes"] = [ln for ln in sh("ip", "route", "show", "table", "all").stdout.splitlines()
                     if "169.254.169.250" in ln or "10.42." in ln]
    out["links"] = [ln.split(":")[1].strip() for ln in sh("ip", "-o", "link").stdout.splitlines()
                    if re.search(r": (docker0|vethr|nm-)", ln)]
    return out


@pytest.fixture(scope="module", params=["nft", "legacy"])
def host(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    backend = request.param
    root_before = _root_state()
    with netns("nm") as ns:
        h = Host(ns, tmp_path_factory.mktemp(f"nm-{backend}"), backend)
        h.sh("ip", "link", "add", "docker0", "type", "bridge")
        h.sh("ip", "addr", "add", "10.42.0.1/16", "dev", "docker0")
        h.sh("ip", "link", "set", "docker0", "up")
        # Docker-like rules that must stay byte for byte
        h.ipt("-t", "nat", "-N", "DOCKER")
        h.ipt("-t", "nat", "-A", "DOCKER", "-i", "docker0", "-j", "RETURN")
        h.ipt("-t", "nat", "-A", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "DOCKER")
        h.ipt("-A", "FORWARD", "-s", "198.51.100.0/24", "-j", "DROP")
        h.ipt("-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
        h.start_md()
        h.start_nm()
        assert h.nm is not None
        assert os.readlink(f"/proc/{h.nm.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        try:
            h.wait(h.in_sync, "first apply")
            yield h
        finally:
            h.stop_nm()
            h.stop_md()
    assert _root_state() == root_before, "the root namespace changed"
