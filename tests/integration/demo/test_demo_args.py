"""``corral demo --hosts``: bad values and a missing privilege are clear errors that create nothing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from standin import demo
from standin.ctl import build_parser
from standin.demo_hosts import env_doc, service_of, workload_commands
from standin.demo_runtime import wanted
from tests.helpers.procs import ROOT, corral_argv


def _corral(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(corral_argv(*argv), capture_output=True, text=True, cwd=str(ROOT), timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize(("argv", "says"), [
    (["--hosts", "0"], "--hosts"),
    (["--hosts", "many"], "--hosts"),
    (["--hosts", "3", "--backend", "gre"], "--backend"),
])
def test_bad_values_are_refused_before_anything_starts(argv: list[str], says: str) -> None:
    r = _corral("demo", *argv)
    assert r.returncode == 2, r
    assert says in r.stderr and "Traceback" not in r.stderr


def test_without_root_it_says_so_and_creates_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demo.os, "geteuid", lambda: 1000)
    assert demo.main(["--hosts", "2", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs root" in err and "--hosts 1" in err
    # In process: the namespaces it would have made carry this process's id.
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"corral-demo-{os.getpid()}-" not in listed
    assert list(tmp_path.iterdir()) == []


def test_environment_is_hosts_and_routers_and_the_workloads_come_through_ctl() -> None:
    doc = env_doc(3)
    assert [h["agent_ip"] for h in doc["hosts"]] == ["192.168.77.1", "192.168.77.2", "192.168.77.3"]
    stacks = {s["name"]: s for s in doc["stacks"]}
    assert set(stacks) == {"network-services"}
    router = stacks["network-services"]["services"][0]
    assert router["scale"] == 3 and router["labels"] == {"io.rancher.container.agent_service.vxlan": "true"}
    cmds = workload_commands(3)
    assert cmds[0] == ["stack", "create", "--name", "demo"]
    made = {c[c.index("--name") + 1]: c for c in cmds[1:]}
    assert set(made) == {"web1", "web2", "web3", "client"}
    for i in (1, 2, 3):  # each web: kept to its host, a host port, an HTTP check, a sidekick
        web = made[f"web{i}"]
        assert f"hosts=[node-{i}]" in web and "8080:80/tcp" in web and "helper" in web
        assert json.loads(web[web.index("--health-check") + 1])["request_line"] == "GET /cgi-bin/health HTTP/1.0"
    assert made["client"][made["client"].index("--scale") + 1] == "3" and "--set" not in made["client"]
    # every command is one `corral ctl` accepts
    for c in cmds:
        build_parser().parse_args(c)
    assert service_of({"labels": {"io.rancher.stack_service.name": "demo/web2"}}) == ("demo", "web2")
    assert service_of({}) == ("", "")


def test_runtime_runs_this_hosts_workloads_and_leaves_the_router_to_the_host() -> None:
    containers = [
        {"uuid": "r", "name": "network-services-vxlan-1", "host_uuid": "h1", "primary_ip": "10.42.0.2",
         "labels": {"io.rancher.container.agent_service.vxlan": "true"}},
        {"uuid": "w", "name": "demo-web1-1", "host_uuid": "h1", "primary_ip": "10.42.0.5", "state": "running"},
        {"uuid": "o", "name": "demo-web2-1", "host_uuid": "h2", "primary_ip": "10.42.0.6"},
        {"uuid": "s", "name": "demo-web1-1-stopped", "host_uuid": "h1", "primary_ip": "10.42.0.7", "state": "stopped"},
        {"uuid": "n", "name": "no-address-yet", "host_uuid": "h1", "primary_ip": None},
        "junk",
    ]
    assert sorted(wanted(containers, "h1")) == ["w"]


def test_the_web_containers_health_script_fails_only_on_the_label(tmp_path: Path) -> None:
    """The podman web workload's CGI, run by sh with a fake nc answering as metadata would."""
    from standin.demo_runtime import HEALTH_CGI

    script = tmp_path / "health"
    script.write_text(HEALTH_CGI.format(name="demo-web2-1"))
    script.chmod(0o755)
    for body, status in (("fail", "503 Service Unavailable"), ("ok", "200 OK"), ("Not found", "200 OK"), ("", "200 OK")):
        nc = tmp_path / "nc"
        nc.write_text(f"#!/bin/sh\ncat >/dev/null\nprintf 'HTTP/1.1 200 OK\\r\\n\\r\\n{body}'\n")
        nc.chmod(0o755)
        out = subprocess.run([str(script)], capture_output=True, text=True, check=True,
                             env={"PATH": f"{tmp_path}:/usr/bin:/bin"}).stdout
        assert out.splitlines()[0] == f"HTTP/1.0 {status}", (body, out)


@pytest.mark.root
def test_the_podman_probe_says_why_it_cannot_run_a_container(tmp_path: Path) -> None:
    """A root file system without busybox: the probe returns podman's error (the demo then falls back
    to namespaces, or refuses with --workloads podman) and leaves no run root or mount behind."""
    from standin.demo_hosts import HostsDemo
    from tests.helpers.netns import requires_root  # noqa: F401 - the mark below needs root
    from tests.helpers.tools import require_tool

    if os.geteuid() != 0:
        pytest.skip("needs root (podman's storage)")
    require_tool("podman")
    (tmp_path / "rootfs").mkdir()
    topo = HostsDemo(2, tmp_path, lambda *a: None, engine="podman")
    why = topo.probe_podman()
    assert why, "podman ran a container without a busybox in its root file system"
    assert topo.close() == []
    assert not Path("/run", topo.tag).exists()
    assert str(tmp_path) not in Path("/proc/self/mounts").read_text()
