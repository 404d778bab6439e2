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
from tests.helpers.podman import PodmanApi, stub_network
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
    bindir, log = stub_network(work, STUB)
    try:
        with netns("nmpm") as ns:
            yield {"pm": pm, "work": work, "log": log, "ns": ns, "bindir": bindir}
    finally:
        pm.close()
        for h in (work / "handles").glob("*") if (work / "handles").exists() else ():
            subprocess.run(["umount", str(h)], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


def start_nm(e: dict, metadata: str = "http://127.0.0.1:1/2016-07-29", *extra: str) -> Proc:
    """netmanager in the test's namespace, entered with ``nsenter --net`` as a host daemon sees the
    system: ``ip netns exec`` would mount a sysfs of its own over /sys and hide the cgroup mounts."""
    w = e["work"]
    return Proc(["nsenter", f"--net=/run/netns/{e['ns']}", "env", "PYTHONUNBUFFERED=1", *corral_argv(
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


def add_lines(nm: Proc, cid: str, event: str = "CNI ADD done") -> list[dict]:
    """netmanager's JSON log lines ``event`` for container ``cid``."""
    out = []
    for ln in nm.log().splitlines():
        try:
            d = json.loads(ln)
        except ValueError:
            continue
        if isinstance(d, dict) and d.get("event") == event and d.get("container") == cid[:12]:
            out.append(d)
    return out


def started_at(pm: PodmanApi, cid: str) -> str:
    """``State.StartedAt`` as the Docker API gives it (the name of the state file)."""
    import docker

    api = docker.APIClient(base_url=f"unix://{pm.sock}", version="auto")
    try:
        return str(api.inspect_container(cid)["State"]["StartedAt"])
    finally:
        api.close()


def wait(pred: Callable[[], object], what: str, nm: Proc, timeout: float | None = None) -> None:
    try:
        until(pred, what=what, timeout=timeout, interval=0.05)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{nm.log()[-4000:]}") from None


def restart(e: dict, nm: Proc, cid: str, adds: int) -> str:
    """Stop ``cid`` (DEL: its state dir goes), start it again until its ``adds``-th ADD, and
    return the new start's ``StartedAt`` once the state file of that name is written."""
    pm: PodmanApi = e["pm"]
    state = e["work"] / "state" / cid
    pm.pm("stop", "-t", "0", cid)
    wait(lambda: not state.exists(), "DEL done", nm)
    pm.pm("start", cid)
    wait(lambda: len(calls(e, "ADD", cid)) == adds, f"ADD #{adds} after the restart", nm)
    started = started_at(pm, cid)
    wait(lambda: (state / started).exists(), "state file of the new start", nm)
    return started


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
        # the ADD found the process in the cgroup file system (created after netmanager connected:
        # its create-time facts were there), and the state file is named after the start the engine reports
        # (the plugin's own record of the call can come before netmanager's log line of it)
        wait(lambda: add_lines(nm, cid), "ADD logged", nm)
        assert [d["found"] for d in add_lines(nm, cid)] == ["cgroup"], nm.log()[-3000:]
        started = started_at(pm, cid)
        state = env["work"] / "state" / cid
        wait(lambda: (state / started).exists(), "state file", nm)
        assert [f.name for f in state.iterdir()] == [started]
        body = json.loads((state / started).read_text())
        assert body["ip4"]["ip"] == "10.42.5.5/16", (body, started)
        wait(lambda: add_lines(nm, cid, "CNI ADD reported"), "ADD reported", nm)
        hosts = pm.inspect(cid).get("HostsPath")
        if hosts and os.path.exists(hosts):
            assert "10.42.5.5\t" in Path(hosts).read_text()

        # stop and start: DEL, then an ADD for the new start, again from the cgroup (facts kept until destroy)
        started = restart(env, nm, cid, adds=2)
        assert [f.name for f in state.iterdir()] == [started]
        wait(lambda: len(add_lines(nm, cid)) == 2, "second ADD logged", nm)
        assert [d["found"] for d in add_lines(nm, cid)] == ["cgroup", "cgroup"]

        # a restarted manager does not ADD a container that is already networked
        nm.stop()
        nm = start_nm(env)
        wait(lambda: "docker events connected" in nm.log(), "replay done", nm)
        assert len(calls(env, "ADD", cid)) == 2
        assert not calls(env, "ADD", plain)

        # stop -> DEL with the namespace still reachable through the handle; state cleared
        pm.pm("stop", "-t", "0", cid)
        wait(lambda: not state.exists(), "DEL done (state dir removed)", nm)
        assert calls(env, "DEL", cid)[-1][2] == str(env["work"] / "handles" / cid)
        ok = Path(str(env["log"]) + ".netns-ok")  # the plugin saw the interface inside the namespace
        assert ok.exists() and cid in ok.read_text(), env["log"].read_text() + nm.log()[-5000:]
        wait(lambda: not (env["work"] / "handles" / cid).exists(), "handle released", nm)

        # start again -> a new ADD for the new start (this manager started after the create: it inspects)
        pm.pm("start", cid)
        wait(lambda: len(calls(env, "ADD", cid)) == 3, "third ADD", nm)
        assert not calls(env, "ADD", plain) and not calls(env, "DEL", plain)
        again = started_at(pm, cid)
        assert again != started
        wait(lambda: (state / again).exists(), "state file of the second start", nm)
        assert [f.name for f in state.iterdir()] == [again]
        wait(lambda: add_lines(nm, cid), "ADD logged", nm)
        assert [d["found"] for d in add_lines(nm, cid)] == ["inspect"]  # this manager's first ADD of it
    finally:
        nm.stop()


def test_add_falls_back_to_inspect(env: dict) -> None:
    """A container created while netmanager was not connected (no create-time facts): its start is
    inspected first, as the original did; a container that only has the ``io.rancher.container.network``
    label and network mode none gets no ADD either way."""
    pm: PodmanApi = env["pm"]
    cid = pm.pm("create", "--network", "none", *pm._labels({"io.rancher.cni.network": "mynet"}), "--rootfs",
                str(pm.work / "rootfs"), "/bin/busybox", "sleep", "600").stdout.strip()  # pm.create's exits after 1 s
    nm = start_nm(env)
    try:
        wait(lambda: "docker events connected" in nm.log(), "docker connected", nm)
        pm.pm("start", cid)
        skip = pm.run({"io.rancher.container.network": "true"})  # network mode none: not Rancher-managed
        wait(lambda: calls(env, "ADD", cid), "ADD", nm)
        assert calls(env, "ADD", cid)[0][2] == str(env["work"] / "handles" / cid)
        state = env["work"] / "state" / cid
        started = started_at(pm, cid)
        wait(lambda: (state / started).exists(), "state file", nm)
        wait(lambda: add_lines(nm, cid), "ADD logged", nm)
        assert [d["found"] for d in add_lines(nm, cid)] == ["inspect"]
        assert not add_lines(nm, cid, "CNI ADD reported")

        # stop -> DEL; start again -> ADD again the same way, the state file follows the new start
        restart(env, nm, cid, adds=2)
        wait(lambda: len(add_lines(nm, cid)) == 2, "second ADD logged", nm)
        assert [d["found"] for d in add_lines(nm, cid)] == ["inspect", "inspect"]
        assert not calls(env, "ADD", skip)
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


def test_arp_mac_and_veth(env: dict) -> None:
    """Spec §12.10 with a real container (podman) whose eth0 is a veth on the host's docker0:
    - a wrong neighbour entry for the local container's IP gets the container's MAC, one for a
      remote container's IP gets the router's MAC, an entry for an IP metadata does not know stays;
    - inside the container: eth0's MAC becomes ``primary_mac_address``, its entry for the remote
      container gets the router's MAC;
    - ``vethr0123456789`` on docker0 (no container) is deleted, ``vethr<first 10 of the live
      container's ID>`` and a vethr* on another bridge are not."""
    from tests.helpers.netns import run_in_netns
    from tests.unit.netmanager.conftest import objects

    pm: PodmanApi = env["pm"]
    ns = env["ns"]
    cid = pm.run({"role": "app"})
    pid = str(pm.inspect(cid)["State"]["Pid"])
    live = f"vethr{cid[:10]}"
    # docker0 with a MAC of its own: a bridge otherwise takes its lowest port's, and a port going
    # (the veth sweep) would change it - the kernel then flushes docker0's neighbour entries
    for cmd in (["ip", "link", "add", "docker0", "address", "02:00:00:00:00:01", "type", "bridge"],
                ["ip", "link", "add", "br-other", "type", "bridge"],
                ["ip", "addr", "add", "10.42.0.1/16", "dev", "docker0"], ["ip", "link", "set", "docker0", "up"],
                ["ip", "link", "add", "vethr0123456789", "type", "veth", "peer", "name", "p1"],
                ["ip", "link", "add", live, "type", "veth", "peer", "name", "eth0", "netns", pid],
                ["ip", "link", "add", "vethr9999999999", "type", "veth", "peer", "name", "p3"],
                ["ip", "link", "set", "vethr0123456789", "master", "docker0"],
                ["ip", "link", "set", live, "master", "docker0", "up"],
                ["ip", "link", "set", "vethr9999999999", "master", "br-other"],
                ["ip", "neigh", "replace", "10.42.200.5", "lladdr", "0e:00:00:00:00:05", "dev", "docker0", "nud", "stale"],
                ["ip", "neigh", "replace", "10.42.200.8", "lladdr", "0e:00:00:00:00:08", "dev", "docker0", "nud", "stale"],
                ["ip", "neigh", "replace", "10.42.77.77", "lladdr", "0e:00:00:00:00:77", "dev", "docker0", "nud", "stale"]):
        run_in_netns(ns, *cmd)
    inside = ["nsenter", f"--net=/proc/{pid}/ns/net"]
    for cmd in (["ip", "link", "set", "eth0", "address", "0e:00:00:00:00:01"], ["ip", "link", "set", "eth0", "up"],
                ["ip", "addr", "add", "10.42.200.5/16", "dev", "eth0"]):
        subprocess.run([*inside, *cmd], check=True, capture_output=True)
    objs = objects()
    for o in objs:
        if o.get("uuid") == "ctr-router-a":
            o["labels"].update({"io.rancher.network.arpsync": "true", "io.rancher.network.macsync": "true"})
        if o.get("uuid") == "ctr-web-1":
            o.update(external_id=cid, primary_mac_address="02:42:0A:2A:C8:05")
        if o.get("uuid") == "ctr-remote":
            o["primary_mac_address"] = "02:42:0a:2a:c8:08"
    answers = env["work"] / "answers.json"
    answers.write_text("\n".join(json.dumps(o) for o in objs) + "\n")
    md = Proc(["ip", "netns", "exec", ns, *corral_argv(
        "metadata", "--listen", "127.0.0.1:8780", "--listenReload", "127.0.0.1:8112", "--metrics-listen",
        "127.0.0.1:9112", "--answers", str(answers), "--file-poll", "0.1")], cwd=str(ROOT), name="nm-metadata")
    nm = start_nm(env, "http://127.0.0.1:8780/2016-07-29", "--vethsync-interval", "1", "--arpsync-interval", "1")

    def links() -> str:
        return run_in_netns(ns, "ip", "-o", "link").stdout

    def neigh(ip: str, where: list[str]) -> str:
        out = subprocess.run([*where, "ip", "neigh", "show", ip], capture_output=True, text=True).stdout
        return out.split("lladdr ")[1].split()[0] if "lladdr " in out else ""

    host = ["ip", "netns", "exec", ns]
    try:
        wait(lambda: neigh("10.42.200.5", host) == "02:42:0a:2a:c8:05", "local container's entry corrected", nm)
        wait(lambda: neigh("10.42.200.8", host) == "02:42:0a:2a:00:02", "remote container -> router MAC", nm)
        wait(lambda: "02:42:0a:2a:c8:05" in subprocess.run([*inside, "ip", "link", "show", "eth0"],
                                                           capture_output=True, text=True).stdout, "eth0 MAC", nm)
        wait(lambda: "vethr0123456789" not in links(), "dangling veth deleted", nm)
        assert live in links() and "vethr9999999999" in links()
        assert neigh("10.42.77.77", host) == "0e:00:00:00:00:77"  # not a container metadata knows: left alone

        # the router's MAC changes: host entries and, for the next passes, the containers' entries follow
        # (added only now: a MAC change of eth0 flushes the container's neighbour table)
        subprocess.run([*inside, "ip", "neigh", "replace", "10.42.200.8", "lladdr", "0e:00:00:00:00:08", "dev", "eth0",
                        "nud", "stale"], check=True, capture_output=True)
        for o in objs:
            if o.get("uuid") == "ctr-router-a":
                o["primary_mac_address"] = "02:42:0a:2a:00:99"
            if o["metadata_kind"] == "defaultData":
                o["version"] = "2"
        answers.with_suffix(".tmp").write_text("\n".join(json.dumps(o) for o in objs) + "\n")
        os.replace(answers.with_suffix(".tmp"), answers)
        wait(lambda: neigh("10.42.200.8", host) == "02:42:0a:2a:00:99", "host entry -> new router MAC", nm)
        wait(lambda: neigh("10.42.200.8", inside) == "02:42:0a:2a:00:99", "container's entry -> new router MAC", nm)
    finally:
        nm.stop()
        md.stop()


def test_reaper_stops_the_older_duplicate_metadata_container(env: dict) -> None:
    """Spec §11 (b): two running network-services/metadata containers -> the older one is stopped.
    The entrypoint's step (spec §1): a legacy NetworkAgent container, even a stopped one, is removed."""
    pm: PodmanApi = env["pm"]
    agent = pm.create({"io.rancher.container.system": "NetworkAgent"})
    bystander = pm.create({"io.rancher.container.system": "true"})
    label = {"io.rancher.stack_service.name": "network-services/metadata"}
    old = pm.run(label)
    time.sleep(1.1)  # Docker's Created is in whole seconds: the two must differ for "older" to mean anything
    new = pm.run(label)
    nm = start_nm(env)
    try:
        wait(lambda: not pm.inspect(old)["State"]["Running"], "older duplicate stopped", nm)
        assert pm.inspect(new)["State"]["Running"]
        wait(lambda: pm.pm("inspect", agent, check=False).returncode != 0, "NetworkAgent removed", nm)
        assert pm.pm("inspect", bystander, check=False).returncode == 0
    finally:
        nm.stop()


def test_resolv_conf_rewritten_on_start(env: dict) -> None:
    """Spec §12.14 on real containers (podman, in the test's namespace, with ``--dns`` and
    ``--dns-search``): the file at ``ResolvConfPath`` is rewritten for the label combinations that
    ask for it, byte for byte as the original writes it, and left alone for ``dns=false`` and for
    a container without Rancher labels."""
    pm: PodmanApi = env["pm"]

    def run(labels: dict[str, str]) -> tuple[str, Path]:
        """(the container's /etc/resolv.conf as it sees it, the file at its ResolvConfPath)"""
        p = pm.pm("run", "-d", "--network", f"ns:/run/netns/{env['ns']}", "--dns", "192.0.2.53", "--dns-search",
                  "corp.local", *pm._labels(labels), "--rootfs", str(pm.work / "rootfs"), "/bin/busybox", "sleep",
                  "600", check=False)
        if p.returncode != 0:
            pytest.skip(f"podman cannot start containers here: {p.stderr.strip()[-300:]}")
        info = pm.inspect(p.stdout.strip())
        return f"/proc/{info['State']['Pid']}/root/etc/resolv.conf", Path(info["ResolvConfPath"])

    docker = "search corp.local\nnameserver 192.0.2.53\n"
    inside, first = run({"io.rancher.container.network": "true", "io.rancher.stack_service.name": "App/Web"})
    last = run({"io.rancher.container.dns": "true", "io.rancher.stack_service.name": "app/web",
                "io.rancher.container.dns.priority": "service_last"})[1]
    nostack = run({"io.rancher.container.network": "true", "io.rancher.container.dns.priority": "None",
                   "io.rancher.stack_service.name": "app/web"})[1]
    off = run({"io.rancher.container.network": "true", "io.rancher.container.dns": "false"})[1]
    plain = run({"app": "x"})[1]
    for p in (first, last, nostack, off, plain):
        assert p.read_text() == docker
    mode = first.stat().st_mode
    nm = start_nm(env)
    try:
        want = {
            first: "search web.app.rancher.internal app.rancher.internal rancher.internal corp.local\n"
                   "# nameserver 192.0.2.53\nnameserver 169.254.169.250\n",
            last: "search corp.local web.app.rancher.internal app.rancher.internal rancher.internal\n"
                  "# nameserver 192.0.2.53\nnameserver 169.254.169.250\n",
            nostack: "search rancher.internal corp.local\n# nameserver 192.0.2.53\nnameserver 169.254.169.250\n",
        }
        for p, text in want.items():
            wait(lambda p=p, text=text: p.read_text() == text, f"{p.parent.parent.name[:12]} rewritten", nm)
        assert first.stat().st_mode == mode
        assert Path(inside).read_text() == want[first]  # written in place: the running container sees it
        assert off.read_text() == docker and plain.read_text() == docker
    finally:
        nm.stop()
