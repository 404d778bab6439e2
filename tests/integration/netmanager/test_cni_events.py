"""Docker events -> CNI ADD/DEL against a real Docker API (``podman system service``), with a
recording stub plugin; netmanager itself runs in a throw-away namespace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.netns import netns, requires_root
from tests.helpers.podman import PodmanApi
from tests.helpers.procs import ROOT, Proc, corral_argv
from tests.helpers.wait import until

pytestmark = [requires_root, pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed"),
              pytest.mark.skipif(shutil.which("runc") is None, reason="runc not installed")]

STUB = """#!/bin/sh
in=$(cat)
printf '%s|%s|%s|%s|%s\\n' "$CNI_COMMAND" "$CNI_CONTAINERID" "$CNI_NETNS" "$CNI_IFNAME" "$CNI_ARGS" >> {log}
if [ "$CNI_COMMAND" = ADD ]; then
  nsenter --net="$CNI_NETNS" ip link add eth0 type veth peer name veth-peer
  echo '{{"cniVersion":"0.2.0","ip4":{{"ip":"10.42.5.5/16"}}}}'
fi
if [ "$CNI_COMMAND" = DEL ] && [ -n "$CNI_NETNS" ] && nsenter --net="$CNI_NETNS" ip link show eth0 >/dev/null; then
  echo "$CNI_CONTAINERID" >> {log}.netns-ok
fi
"""


@pytest.fixture
def env() -> Iterator[dict]:
    work = Path(tempfile.mkdtemp(prefix="corral-nm-pm-"))
    pm = PodmanApi(work)
    bindir = work / "bin"
    bindir.mkdir()
    log = work / "calls.log"
    (bindir / "stub").write_text(STUB.format(log=log))
    (bindir / "stub").chmod(0o755)
    conf = work / "cni" / "mynet.d"
    conf.mkdir(parents=True)
    (conf / "10-stub.conf").write_text(json.dumps({"cniVersion": "0.2.0", "name": "mynet", "type": "stub"}))
    try:
        with netns("nmpm") as ns:
            yield {"pm": pm, "work": work, "log": log, "ns": ns, "bindir": bindir}
    finally:
        pm.close()
        for h in (work / "handles").glob("*") if (work / "handles").exists() else ():
            subprocess.run(["umount", str(h)], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


def start_nm(e: dict, metadata: str = "http://127.0.0.1:1/2016-07-29", *extra: str) -> Proc:
    w = e["work"]
    return Proc(["ip", "netns", "exec", e["ns"], *corral_argv(
        "netmanager", "--metadata-url", metadata, "--metadata-state-file", "", *extra,
        "--cni-dir", str(w / "cni"), "--metrics-listen", "127.0.0.1:9115", "--docker-host",
        f"unix://{e['pm'].sock}", "--cni-state-dir", str(w / "state"), "--netns-handle-dir", str(w / "handles"),
        "--cni-path", str(e["bindir"]), "--cni-retries", "2", "--cni-retry-delay", "0.2s")],
        cwd=str(ROOT), name="netmanager")


def calls(e: dict, cmd: str, cid: str) -> list[list[str]]:
    if not e["log"].exists():
        return []
    rows = [ln.split("|") for ln in e["log"].read_text().splitlines()]
    return [r for r in rows if r[0] == cmd and r[1] == cid]


def wait(pred: Callable[[], object], what: str, nm: Proc, timeout: float | None = None) -> None:
    try:
        until(pred, what=what, timeout=timeout, interval=0.05)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{nm.log()[-4000:]}") from None


def test_events_drive_add_and_del(env: dict) -> None:
    pm: PodmanApi = env["pm"]
    nm = start_nm(env)
    try:
        wait(lambda: "docker events connected" in nm.log(), "docker connected", nm)
        cid = pm.run({"io.rancher.cni.network": "mynet", "io.rancher.container.uuid": "u-1",
                      "io.rancher.container.ip": "10.42.5.5/16"})
        plain = pm.run({"app": "x"})
        wait(lambda: calls(env, "ADD", cid), "ADD", nm)
        add = calls(env, "ADD", cid)
        assert len(add) == 1
        _, _, netns_path, ifname, args = add[0]
        assert netns_path == str(env["work"] / "handles" / cid) and ifname == "eth0"
        assert args == "IgnoreUnknown=1;DOCKER=true;RancherContainerUUID=u-1;IPAddress=10.42.5.5/16"
        started = pm.inspect(cid)["State"]["StartedAt"]
        state = env["work"] / "state" / cid
        wait(lambda: state.is_dir() and any(state.iterdir()), "state file", nm)
        body = json.loads(next(state.iterdir()).read_text())
        assert body["ip4"]["ip"] == "10.42.5.5/16", (body, started)
        hosts = pm.inspect(cid).get("HostsPath")
        if hosts and os.path.exists(hosts):
            assert "10.42.5.5\t" in Path(hosts).read_text()

        # a restarted manager does not ADD a container that is already networked
        nm.stop()
        nm = start_nm(env)
        wait(lambda: "docker events connected" in nm.log(), "replay done", nm)
        assert len(calls(env, "ADD", cid)) == 1
        assert not calls(env, "ADD", plain)

        # stop -> DEL with the namespace still reachable through the handle; state cleared
        pm.pm("stop", "-t", "0", cid)
        wait(lambda: not state.exists(), "DEL done (state dir removed)", nm)
        assert calls(env, "DEL", cid)[0][2] == str(env["work"] / "handles" / cid)
        ok = Path(str(env["log"]) + ".netns-ok")  # the plugin saw the interface inside the namespace
        assert ok.exists() and cid in ok.read_text(), env["log"].read_text() + nm.log()[-5000:]
        wait(lambda: not (env["work"] / "handles" / cid).exists(), "handle released", nm)

        # start again -> a new ADD for the new start
        pm.pm("start", cid)
        wait(lambda: len(calls(env, "ADD", cid)) == 2, "second ADD", nm)
        assert not calls(env, "ADD", plain) and not calls(env, "DEL", plain)
    finally:
        nm.stop()


def test_shim_runs_the_driver_containers_binary(env: dict) -> None:
    """Spec §12.12: /opt/cni/bin/<name> re-executes itself inside the driver container (a real
    podman container holding the real plugin at the same path), relays stdout and exit status, and
    follows the container's new PID after a restart."""
    from tests.unit.netmanager.conftest import objects

    pm: PodmanApi = env["pm"]
    shim = env["work"] / "cni" / "bin" / "rancher-bridge"
    real = pm.work / "rootfs" / str(shim).lstrip("/")
    real.parent.mkdir(parents=True)
    real.write_text('#!/bin/busybox sh\necho "real $1 $(/bin/busybox hostname)"\nexit 3\n')
    real.chmod(0o755)
    cid = pm.run({"role": "driver"}, "--hostname", "driver")
    objs = objects()
    objs.insert(-1, {"metadata_kind": "container", "name": "cni-driver-1", "uuid": "ctr-driver-a",
                     "primary_ip": "10.42.0.4", "ips": [], "ports": [], "host_uuid": "host-a", "external_id": cid,
                     "network_uuid": "net-ipsec", "state": "running", "system": True,
                     "labels": {"io.rancher.network.cni.binary": "rancher-bridge"}, "environment_uuid": "env-1"})
    objs.insert(-1, {"metadata_kind": "serviceContainerLink", "service_uuid": "svc-driver",
                     "service_name": "cni-driver", "container_uuid": "ctr-driver-a"})
    answers = env["work"] / "answers.json"
    answers.write_text("\n".join(json.dumps(o) for o in objs) + "\n")
    md = Proc(["ip", "netns", "exec", env["ns"], *corral_argv(
        "metadata", "--listen", "127.0.0.1:8780", "--listenReload", "127.0.0.1:8112", "--metrics-listen",
        "127.0.0.1:9112", "--answers", str(answers))], cwd=str(ROOT), name="nm-metadata")
    nm = start_nm(env, "http://127.0.0.1:8780/2016-07-29")
    try:
        pid = pm.inspect(cid)["State"]["Pid"]
        wait(lambda: shim.exists() and f"-t {pid} " in shim.read_text(), "shim written", nm)
        assert shim.stat().st_mode & 0o777 == 0o700
        r = subprocess.run(["sh", str(shim), "ADD"], capture_output=True, text=True)
        assert (r.stdout, r.returncode) == ("real ADD driver\n", 3), r.stderr
        pm.pm("restart", "-t", "0", cid)
        new = pm.inspect(cid)["State"]["Pid"]
        assert new != pid
        wait(lambda: f"-t {new} " in shim.read_text(), "shim follows the new PID", nm)
    finally:
        nm.stop()
        md.stop()


def test_vethsync_deletes_only_dangling_host_ends(env: dict) -> None:
    """Spec §12.10 (veth part): on the local network's bridge, ``vethr0123456789`` (no container)
    goes, ``vethr<first 10 of a running container's ID>`` stays, a vethr* on another bridge stays."""
    from tests.helpers.netns import run_in_netns
    from tests.unit.netmanager.conftest import objects

    pm: PodmanApi = env["pm"]
    ns = env["ns"]
    cid = pm.run({"role": "app"})
    for cmd in (["ip", "link", "add", "docker0", "type", "bridge"], ["ip", "link", "add", "br-other", "type", "bridge"],
                ["ip", "link", "add", "vethr0123456789", "type", "veth", "peer", "name", "p1"],
                ["ip", "link", "add", f"vethr{cid[:10]}", "type", "veth", "peer", "name", "p2"],
                ["ip", "link", "add", "vethr9999999999", "type", "veth", "peer", "name", "p3"],
                ["ip", "link", "set", "vethr0123456789", "master", "docker0"],
                ["ip", "link", "set", f"vethr{cid[:10]}", "master", "docker0"],
                ["ip", "link", "set", "vethr9999999999", "master", "br-other"]):
        run_in_netns(ns, *cmd)
    answers = env["work"] / "answers.json"
    answers.write_text("\n".join(json.dumps(o) for o in objects()) + "\n")
    md = Proc(["ip", "netns", "exec", ns, *corral_argv(
        "metadata", "--listen", "127.0.0.1:8780", "--listenReload", "127.0.0.1:8112", "--metrics-listen",
        "127.0.0.1:9112", "--answers", str(answers))], cwd=str(ROOT), name="nm-metadata")
    nm = start_nm(env, "http://127.0.0.1:8780/2016-07-29", "--vethsync-interval", "1")

    def links() -> str:
        return run_in_netns(ns, "ip", "-o", "link").stdout

    try:
        wait(lambda: "vethr0123456789" not in links(), "dangling veth deleted", nm)
        assert f"vethr{cid[:10]}" in links() and "vethr9999999999" in links()
    finally:
        nm.stop()
        md.stop()


def test_reaper_stops_the_older_duplicate_metadata_container(env: dict) -> None:
    """Spec §11 (b): two running network-services/metadata containers -> the older one is stopped."""
    pm: PodmanApi = env["pm"]
    label = {"io.rancher.stack_service.name": "network-services/metadata"}
    old = pm.run(label)
    time.sleep(1.1)  # Docker's Created is in whole seconds: the two must differ for "older" to mean anything
    new = pm.run(label)
    nm = start_nm(env)
    try:
        wait(lambda: not pm.inspect(old)["State"]["Running"], "older duplicate stopped", nm)
        assert pm.inspect(new)["State"]["Running"]
    finally:
        nm.stop()
