"""Stand-in server, state: resources via `corral ctl`, SQLite persistence across restarts, load/save."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from standin.ctl import CtlError
from tests.helpers.procs import ROOT
from tests.helpers.standin import StandIn

SAMPLE = str(ROOT / "standin" / "sample_env.yaml")


def _build(s: StandIn) -> None:
    s.ctl("host", "add", "--name", "node-a", "--agent-ip", "127.0.0.11", "--label", "zone=a", "--uuid", "host-a-uuid")
    s.ctl("host", "add", "--name", "node-b", "--agent-ip", "127.0.0.12")
    s.ctl("stack", "create", "--name", "Shop")
    s.ctl("service", "create", "--stack", "Shop", "--name", "web", "--scale", "2", "--port", "8080:80/tcp",
          "--sidekick", "logger", "--health-check", '{"port": 80, "request_line": "GET / HTTP/1.0"}')


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_state_created_with_ctl_survives_restart(standin: StandIn, how: str) -> None:
    _build(standin)
    before = standin.ctl("save")
    names = sorted(c["name"] for c in before["containers"])
    assert names == ["Shop-web-1", "Shop-web-2", "Shop-web-logger-1", "Shop-web-logger-2"]
    if how == "stop":
        assert standin.stop() == 0
    else:
        standin.kill()
    standin.start()
    after = standin.ctl("save")
    assert after == before
    assert standin.ctl("revision")["revision"] == before["revision"]
    # ids keep counting from where they were
    h = standin.ctl("host", "add", "--name", "node-c")
    assert h["id"] == "1h3"


def test_ctl_through_the_real_cli_process(standin: StandIn) -> None:
    cmd = [sys.executable, "-m", "agents.cli", "ctl", "--admin", standin.admin_url, "host", "add", "--name", "n1",
           "--agent-ip", "127.0.0.21"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert '"agent_ip": "127.0.0.21"' in out.stdout
    bad = subprocess.run([*cmd[:-4], "host", "add", "--name", "n2", "--agent-ip", "not-an-ip"],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert bad.returncode == 1
    assert "not an IP address" in bad.stderr
    env_cmd = [sys.executable, "-m", "agents.cli", "ctl", "host", "ls"]
    ls = subprocess.run(env_cmd, capture_output=True, text=True, timeout=30, cwd=ROOT,
                        env={"CORRAL_ADMIN_URL": standin.admin_url, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert ls.returncode == 0, ls.stderr
    assert '"n1"' in ls.stdout and '"n2"' not in ls.stdout


def test_every_mutation_bumps_revision_and_bad_input_changes_nothing(standin: StandIn) -> None:
    r0 = standin.ctl("revision")["revision"]
    standin.ctl("host", "add", "--name", "h1")
    r1 = standin.ctl("revision")["revision"]
    assert r1 == r0 + 1
    standin.ctl("host", "label", "h1", "zone=z")
    standin.ctl("host", "update", "h1", "--set", "agent_ip=127.0.0.99")
    assert standin.ctl("revision")["revision"] == r1 + 2
    h = standin.ctl("host", "get", "h1")
    assert h["labels"] == {"zone": "z"} and h["agent_ip"] == "127.0.0.99"
    with pytest.raises(CtlError):
        standin.ctl("host", "add", "--name", "h1")  # duplicate
    with pytest.raises(CtlError):
        standin.ctl("service", "create", "--name", "x", "--stack", "S", "--set", "scale=-1")
    with pytest.raises(CtlError) as e:
        standin.ctl("host", "rm", "nope")
    assert e.value.status == 404
    assert standin.ctl("revision")["revision"] == r1 + 2
    assert [s["name"] for s in standin.ctl("stack", "ls")] == []  # the failed service left no stack behind


def test_scale_up_and_down_names_ips_and_sidekicks(standin: StandIn) -> None:
    _build(standin)
    cs = {c["name"]: c for c in standin.ctl("container", "ls")}
    web1, log1 = cs["Shop-web-1"], cs["Shop-web-logger-1"]
    assert web1["primary_ip"].startswith("10.42.")
    assert log1["network_from_container_uuid"] == web1["uuid"]
    assert log1["primary_ip"] == web1["primary_ip"] and log1["host_uuid"] == web1["host_uuid"]
    assert cs["Shop-web-1"]["host_uuid"] != cs["Shop-web-2"]["host_uuid"]  # round-robin
    assert len({c["primary_ip"] for c in cs.values()}) == 2
    standin.ctl("service", "scale", "Shop/web", "3")
    names = sorted(c["name"] for c in standin.ctl("container", "ls"))
    assert "Shop-web-3" in names and "Shop-web-logger-3" in names
    standin.ctl("service", "scale", "Shop/web", "1")
    names = sorted(c["name"] for c in standin.ctl("container", "ls"))
    assert names == ["Shop-web-1", "Shop-web-logger-1"]
    standin.ctl("service", "rm", "Shop/web")
    assert standin.ctl("container", "ls") == []
    alloc = standin.journal(kind="allocation")
    assert alloc and all(e["status"] == "fallback" for e in alloc)


def test_load_save_reset(standin: StandIn, tmp_path: Path) -> None:
    out = standin.ctl("load", SAMPLE)
    assert out["hosts"] == 2 and out["stacks"] == 2
    saved = tmp_path / "state.yaml"
    standin.ctl("save", str(saved))
    doc = yaml.safe_load(saved.read_text())
    assert doc["format"] == "corral-state/1"
    n_containers = len(doc["containers"])
    assert n_containers >= 5
    standin.ctl("reset")
    assert standin.ctl("container", "ls") == []
    assert [n["name"] for n in standin.ctl("network", "ls")] == ["managed", "host"]
    standin.ctl("load", str(saved))
    assert len(standin.ctl("container", "ls")) == n_containers
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts: [{name: x, agent_ip: nope}]\n")
    with pytest.raises(CtlError):
        standin.ctl("load", str(bad))
    assert len(standin.ctl("container", "ls")) == n_containers  # a failed load changes nothing


def test_container_restart_bumps_start_count_and_service_check_follows_updates(standin: StandIn) -> None:
    _build(standin)
    c = standin.ctl("container", "get", "Shop-web-1")
    assert c["start_count"] == 1 and c["health_state"] == "initializing"
    standin.ctl("container", "health", "Shop-web-1", "healthy")
    standin.ctl("container", "state", "Shop-web-1", "stopped")
    standin.ctl("container", "state", "Shop-web-1", "running")
    c = standin.ctl("container", "get", "Shop-web-1")
    assert c["start_count"] == 2 and c["health_state"] == "initializing"
    standin.ctl("service", "update", "Shop/web", "--health-check", '{"port": 81, "request_line": ""}')
    objs = standin.ctl("answers")["objects"]
    web1 = next(o for o in objs if o["metadata_kind"] == "container" and o["name"] == "Shop-web-1")
    svc = next(o for o in objs if o["metadata_kind"] == "service" and o["name"] == "web")
    assert web1["health_check"]["port"] == svc["health_check"]["port"] == 81


def test_server_refuses_to_start_without_credentials_or_with_a_bad_env(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "agents.cli", "server", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    out = subprocess.run(base, capture_output=True, text=True, timeout=30, env=env, cwd=ROOT)
    assert out.returncode == 2 and "no API keys" in out.stderr
    bad = tmp_path / "env.yaml"
    bad.write_text("hosts: [{name: a, agent_ip: 1.2.3}]\n")
    out = subprocess.run([*base, "--access-key", "a", "--secret-key", "s", "--load", str(bad)],
                         capture_output=True, text=True, timeout=30, env=env, cwd=ROOT)
    assert out.returncode == 2 and "not an IP address" in out.stderr
    keys = tmp_path / "keys.yaml"
    keys.write_text("- {access: a, role: agent}\n")
    out = subprocess.run([*base, "--keys", str(keys)], capture_output=True, text=True, timeout=30, env=env, cwd=ROOT)
    assert out.returncode == 2 and "access and secret" in out.stderr


def test_ctl_wait_returns_the_entry(standin: StandIn) -> None:
    since = standin.seq()
    standin.ctl("host", "add", "--name", "w1")
    e = standin.ctl("wait", "--kind", "mutation", "--name", "host.create", "--since", str(since))
    assert e["kind"] == "mutation" and e["seq"] > since
    with pytest.raises(CtlError) as err:
        standin.ctl("wait", "--kind", "reply", "--since", str(e["seq"]), "--wait-timeout", "0.2")
    assert err.value.status == 408


def test_corrupt_state_file_is_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    db.write_bytes(b"this is not a database" * 100)
    out = subprocess.run([sys.executable, "-m", "agents.cli", "server", "--listen", "127.0.0.1:0", "--admin-listen",
                          "127.0.0.1:0", "--access-key", "a", "--secret-key", "s", "--state", str(db)],
                         capture_output=True, text=True, timeout=30, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "state file" in out.stderr and "move it aside" in out.stderr
    assert db.read_bytes().startswith(b"this is not a database")  # nothing overwritten


def test_external_and_alias_services_have_no_containers(standin: StandIn) -> None:
    standin.ctl("host", "add", "--name", "h")
    standin.ctl("service", "create", "--stack", "S", "--name", "ext", "--kind", "externalService",
                "--set", "hostname=api.example", "--set", "external_ips=[127.0.0.77]")
    standin.ctl("service", "create", "--stack", "S", "--name", "alias", "--kind", "dnsService", "--link", "ext")
    assert standin.ctl("container", "ls") == []
    objs = standin.ctl("answers")["objects"]
    ext = next(o for o in objs if o["metadata_kind"] == "service" and o["name"] == "ext")
    assert ext["kind"] == "externalService" and ext["hostname"] == "api.example"
    assert ext["external_ips"] == ["127.0.0.77"]
    assert {"metadata_kind": "serviceLink", "service_uuid": next(
        o["uuid"] for o in objs if o["metadata_kind"] == "service" and o["name"] == "alias"),
        "key": "S/ext", "value": "ext"} in objs


def test_standin_loads_an_environment_dict(standin_factory: Callable[..., StandIn]) -> None:
    s = standin_factory(load={"hosts": [{"name": "only", "agent_ip": "127.0.4.1"}],
                              "stacks": [{"name": "S", "services": [{"name": "a", "scale": 2}]}]})
    assert [h["name"] for h in s.ctl("host", "ls")] == ["only"]
    assert sorted(c["name"] for c in s.ctl("container", "ls")) == ["S-a-1", "S-a-2"]
    s.stop()
    s.start()  # --load only applies to an empty state: a restart keeps what is there
    assert len(s.ctl("container", "ls")) == 2
