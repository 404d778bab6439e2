"""``corral demo --hosts``: bad values and a missing privilege are clear errors that create nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from standin import demo
from standin.demo_hosts import env_doc, service_of
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


def test_environment_places_a_router_web_and_client_on_every_host() -> None:
    doc = env_doc(3)
    assert [h["agent_ip"] for h in doc["hosts"]] == ["192.168.77.1", "192.168.77.2", "192.168.77.3"]
    stacks = {s["name"]: s for s in doc["stacks"]}
    router = stacks["network-services"]["services"][0]
    assert router["scale"] == 3 and router["labels"] == {"io.rancher.container.agent_service.vxlan": "true"}
    web = {s["name"]: s["hosts"] for s in stacks["demo"]["services"]}
    assert web == {"web1": ["node-1"], "web2": ["node-2"], "web3": ["node-3"],
                   "client": ["node-1", "node-2", "node-3"]}
    assert service_of({"labels": {"io.rancher.stack_service.name": "demo/web2"}}) == ("demo", "web2")
    assert service_of({}) == ("", "")
