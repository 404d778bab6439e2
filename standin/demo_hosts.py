"""``corral demo --hosts N`` (N >= 2): simulated hosts in network namespaces, one overlay between them.

Per host: metadata, dns, healthcheck (HAProxy), netmanager, the overlay router, etc-host-updater,
a container engine (podman) and the runtime; on host 1 also the scheduler. See docs/demo.md.

Layout (every name starts with ``corral-demo-<pid>``; nothing is created in the root namespace):

* ``<tag>-ul``: the underlay. Bridge ``br0`` 192.168.77.254/24 with one veth per host; the
  stand-in server listens here (API 192.168.77.254:8080, admin 127.0.0.1:8088 of this namespace).
* ``<tag>-h<i>``: host i. ``eth0`` 192.168.77.<i>/24 into ``br0`` (its agent IP); bridge ``docker0``
  10.42.0.1/16 for the workloads; 169.254.169.250/32 on ``lo``. Runs ``corral metadata`` (port 80,
  subscribed to the server with host i's agent key), ``corral dns`` (169.254.169.250:53, same netns
  as metadata), ``corral overlay --backend vxlan|ipsec`` (host-netns mode on ``docker0``) and
  ``corral etc-host-updater`` (keeps ``/etc/netns/<tag>-h<i>/hosts``, the host's ``/etc/hosts``
  under ``ip netns exec``).
* ``<tag>-h<i>-<n>``: the network namespace of a workload container the scheduler placed on host i
  (a podman container networked by host i's netmanager -> CNI, or with ``--workloads netns`` a bare
  namespace), behind host i's ``docker0`` with the address metadata gives it; the runtime
  (standin/demo_runtime.py) follows metadata. ``web<i>`` serves HTTP on port 80.

The router container's address (10.42.x.y, allocated by the server) is also put on host i's ``lo``:
the router runs in the host's namespace and metadata tells containers apart by the caller's address,
so the router asks metadata from that address and gets its own ``self``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["META_IP", "UNDERLAY", "HostsDemo", "env_doc", "service_of"]

UNDERLAY = "192.168.77"  # /24 inside the underlay namespace only; never routed from the root namespace
META_IP = "169.254.169.250"
SERVER_PORT = 8080
ADMIN_PORT = 8088
ROUTER_LABEL = "io.rancher.container.agent_service.{backend}"

Starter = Callable[[str, list[str], dict[str, str]], Any]


def _sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=timeout)


def service_of(c: dict[str, Any]) -> tuple[str, str]:
    """``(stack, service)`` of a container, from the labels the server gives every service container."""
    stack, _, svc = str((c.get("labels") or {}).get("io.rancher.stack_service.name") or "").partition("/")
    return stack, svc


HEALTH_CHECK = {"port": 80, "request_line": "GET /cgi-bin/health HTTP/1.0", "interval": 1000,
                "response_timeout": 2000, "healthy_threshold": 2, "unhealthy_threshold": 2}
# What netmanager writes into each host's CNI volume (managed.d/) for the CNI plugins to run
CNI_CONF = {"cniVersion": "0.3.1", "name": "rancher-cni-network", "type": "rancher-bridge", "bridge": "docker0",
            "bridgeSubnet": "10.42.0.0/16", "isDefaultGateway": True, "hairpinMode": True, "mtu": 1400,
            "ipam": {"type": "rancher-cni-ipam", "subnetPrefixSize": "/16", "timeoutSeconds": 20,
                     "routes": [{"dst": "169.254.169.250/32"}]}}
HOST_PORT = 8080


def env_doc(n: int, backend: str = "vxlan") -> dict[str, Any]:
    """What the demo loads at once: N hosts, the managed network and one overlay router per host.

    The workloads come afterwards, through ``corral ctl`` (``workload_commands``), so that the
    scheduler places them."""
    names = [f"node-{i}" for i in range(1, n + 1)]
    hosts = [{"name": names[i - 1], "uuid": f"demo-host-{i}", "agent_ip": f"{UNDERLAY}.{i}", "agentId": str(i),
              "labels": {"demo-host": str(i)}} for i in range(1, n + 1)]
    return {
        "environment": {"name": "demo-hosts"},
        "networks": [{"name": "managed", "kind": "network", "subnets": ["10.42.0.0/16"], "is_default": True,
                      "host_ports": True, "metadata": {"cniConfig": {"10-rancher.conf": CNI_CONF}}}],
        "hosts": hosts,
        "stacks": [
            {"name": "network-services", "system": True, "services": [
                {"name": backend, "image": "corral", "scale": n, "hosts": names, "system": True,
                 "labels": {ROUTER_LABEL.format(backend=backend): "true"}}]},
        ],
    }


def workload_commands(n: int) -> list[list[str]]:
    """``corral ctl`` arguments that create the demo's workloads: per host a web service (HTTP health
    check, host port 8080, a sidekick ``helper``) kept to that host, and a client service of scale N
    that the scheduler spreads (most free host first)."""
    out = [["stack", "create", "--name", "demo"]]
    for i in range(1, n + 1):
        out.append(["service", "create", "--stack", "demo", "--name", f"web{i}", "--image", "busybox",
                    "--port", f"{HOST_PORT}:80/tcp", "--health-check", json.dumps(HEALTH_CHECK),
                    "--label", "demo.serve=http", "--sidekick", "helper", "--set", f"hosts=[node-{i}]",
                    "--scale", "1"])
    out.append(["service", "create", "--stack", "demo", "--name", "client", "--image", "busybox",
                "--scale", str(n)])
    return out


class HostsDemo:
    """Builds, runs and tears down the namespaces of an N-host demo. ``start`` starts a process."""

    def __init__(self, n: int, workdir: Path, start: Starter, backend: str = "vxlan", engine: str = "netns") -> None:
        self.n = n
        self.engine = engine
        self.engine_required = False  # True: --workloads podman was asked for, no fallback
        self.workdir = workdir
        self.start = start
        self.backend = backend
        self.tag = f"corral-demo-{os.getpid()}"
        self.ul = f"{self.tag}-ul"
        self.namespaces: list[str] = []
        self.containers: list[dict[str, Any]] = []
        self.prefix = UNDERLAY
        self.etc_dirs: list[Path] = []
        self.psk = secrets.token_hex(24)

    def h(self, i: int) -> str:
        return f"{self.tag}-h{i}"

    def probe_podman(self) -> str:
        """'' when podman runs a container from the demo's root file system here, else podman's error."""
        from standin.demo_runtime import Podman

        pm = Podman(self.workdir / "probe-podman", Path("/run") / self.tag / "probe")
        pm.prepare()
        try:
            pm.pm("run", "--network", "none", "--rootfs", str(self.workdir / "rootfs"), "/bin/busybox", "true",
                  timeout=120)
            return ""
        except subprocess.CalledProcessError as e:
            return (str(e.stderr or "").strip().splitlines() or [f"exit {e.returncode}"])[-1]
        except (OSError, subprocess.TimeoutExpired) as e:
            return str(e)
        finally:
            pm.clear()
            # conmon runs podman's clean-up after the container exits, which mounts the storage again:
            # wait until no process works on the probe's storage, then unmount
            from standin.demo_runtime import unmount_under

            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _running_with(str(pm.work)):
                time.sleep(0.1)
            unmount_under(pm.work)
            unmount_under(pm.run)
            shutil.rmtree(pm.work, ignore_errors=True)
            shutil.rmtree(pm.run, ignore_errors=True)

    def podman_run(self, i: int) -> Path:
        """Host i's engine's run root and tmp dir: podman wants a run root of at most 50 characters."""
        return Path("/run") / self.tag / f"h{i}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{ADMIN_PORT}"

    @property
    def server_url(self) -> str:
        return f"http://{UNDERLAY}.254:{SERVER_PORT}/v1"

    # ------------------------------------------------------------------ namespaces
    def nsx(self, ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _sh("ip", "netns", "exec", ns, *cmd, check=check)

    def _ns(self, name: str) -> None:
        self.namespaces.append(name)  # recorded first: a failed add is still looked for on the way out
        _sh("ip", "netns", "add", name)
        self.nsx(name, "ip", "link", "set", "lo", "up")

    def build(self) -> None:
        self._ns(self.ul)
        ul = self.ul
        self.nsx(ul, "ip", "link", "add", "br0", "type", "bridge")
        self.nsx(ul, "ip", "addr", "add", f"{UNDERLAY}.254/24", "dev", "br0")
        self.nsx(ul, "ip", "link", "set", "br0", "up")
        for i in range(1, self.n + 1):
            h = self.h(i)
            self._ns(h)
            # Both ends are made from inside the underlay namespace: the root namespace never holds them.
            self.nsx(ul, "ip", "link", "add", f"u{i}", "type", "veth", "peer", "name", "eth0", "netns", h)
            self.nsx(ul, "ip", "link", "set", f"u{i}", "master", "br0", "up")
            self.nsx(h, "ip", "addr", "add", f"{UNDERLAY}.{i}/24", "dev", "eth0")
            self.nsx(h, "ip", "link", "set", "eth0", "up")
            self.nsx(h, "ip", "link", "add", "docker0", "type", "bridge")
            self.nsx(h, "ip", "addr", "add", "10.42.0.1/16", "dev", "docker0")
            self.nsx(h, "ip", "link", "set", "docker0", "up")
            self.nsx(h, "ip", "addr", "add", f"{META_IP}/32", "dev", "lo")
            self.nsx(h, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            (self.workdir / f"h{i}").mkdir(parents=True, exist_ok=True)
        if self.engine == "podman":
            from standin.demo_runtime import make_rootfs

            make_rootfs(self.workdir / "rootfs", shutil.which("busybox") or "/bin/busybox")
            why = self.probe_podman()
            if why and not self.engine_required:  # chosen by default: say so and go on without
                print(f"podman cannot run containers here ({why}): workloads are network namespaces "
                      "(--workloads netns)", file=sys.stderr, flush=True)
                self.engine = "netns"
            elif why:
                raise RuntimeError(f"--workloads podman: podman cannot run containers here: {why}")
        if self.engine == "podman":
            # the CNI plugins, packaged as for a real host; netmanager runs them from here
            _sh(sys.executable, str(ROOT / "cni-plugins" / "package.py"), str(self.workdir / "cni-bundle"),
                "--no-config")

    # ------------------------------------------------------------------ server
    def keys(self) -> list[dict[str, Any]]:
        keys: list[dict[str, Any]] = [{"access": "demo-admin", "secret": "demo-admin-secret", "role": "admin"}]
        for i in range(1, self.n + 1):
            keys.append({"access": f"demo-agent-{i}", "secret": f"demo-agent-{i}-secret", "role": "agent",
                         "agentId": str(i), "hostUuid": f"demo-host-{i}"})
        return keys

    def start_server(self) -> None:
        import yaml

        (self.workdir / "keys.yaml").write_text(yaml.safe_dump(self.keys()))
        self.start("server", ["ip", "netns", "exec", self.ul, *_corral(
            "server", "--listen", f"{UNDERLAY}.254:{SERVER_PORT}", "--admin-listen", f"127.0.0.1:{ADMIN_PORT}",
            "--keys", str(self.workdir / "keys.yaml"), "--state", str(self.workdir / "state.db"),
            "--journal", str(self.workdir / "journal.jsonl"))], {})

    def admin(self, method: str, path: str, body: Any = None, **params: str) -> Any:
        """One admin API call, made from inside the underlay namespace (the admin listener lives there)."""
        code = ("import json,sys\nfrom standin.ctl import AdminClient\n"
                "a=json.loads(sys.argv[1])\nc=AdminClient(a['url'],30)\n"
                "r=c.get(a['path'],**a['params']) if a['method']=='GET' else c.post(a['path'],a['body'],**a['params'])\n"
                "print(json.dumps(r))")
        arg = json.dumps({"url": self.admin_url, "method": method, "path": path, "body": body, "params": params})
        r = self.nsx(self.ul, sys.executable, "-c", code, arg, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"admin {method} {path}: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
        return json.loads(r.stdout)

    def wait_server(self, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, ValueError):
                self.admin("GET", "/_admin/containers")
                return True
            time.sleep(0.2)
        return False

    def load(self) -> None:
        self.admin("POST", "/_admin/load", env_doc(self.n, self.backend), replace="true")
        self.containers = list(self.admin("GET", "/_admin/containers"))

    def host_index(self, c: dict[str, Any]) -> int:
        uuid = str(c.get("host_uuid") or "")
        return int(uuid.rsplit("-", 1)[1]) if uuid.startswith("demo-host-") else 0

    def routers(self) -> dict[int, str]:
        return {self.host_index(c): str(c["primary_ip"]) for c in self.containers
                if (c.get("labels") or {}).get(ROUTER_LABEL.format(backend=self.backend)) and c.get("primary_ip")}

    # ------------------------------------------------------------------ per host
    def agent_env(self, i: int) -> dict[str, str]:
        return {"CATTLE_URL": self.server_url, "CATTLE_ACCESS_KEY": f"demo-agent-{i}",
                "CATTLE_SECRET_KEY": f"demo-agent-{i}-secret"}

    def start_host(self, i: int, router_ip: str) -> None:
        h, d = self.h(i), self.workdir / f"h{i}"
        self.nsx(h, "ip", "addr", "add", f"{router_ip}/32", "dev", "lo")
        if self.backend == "ipsec":
            # The host's own traffic to other hosts' containers (healthcheck's HAProxy) leaves with the
            # router address as source; in libipsec mode the peer routes that address into its
            # tunnel, which carries only the VXLAN between routers, so the answer never comes back.
            # Rancher ran healthcheck in a container with its own managed address; here the host's
            # packets into the VTEP take the host's underlay address, which every host reaches directly.
            self.nsx(h, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", f"{router_ip}/32", "-o", "vtep1042",
                     "-j", "SNAT", "--to-source", f"{UNDERLAY}.{i}")
        # `ip netns exec <host>` shows /etc/netns/<host>/hosts as /etc/hosts: the host's own hosts file,
        # which etc-host-updater keeps (it needs its own name to resolve, as in its container).
        etc = Path("/etc/netns") / h
        self.etc_dirs.append(etc)
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n{UNDERLAY}.{i}\tnode-{i}\n")
        (d / "resolv.conf").write_text("# corral demo: no upstream resolver inside the simulated hosts\n")
        run = ["ip", "netns", "exec", h]
        self.start(f"h{i}-metadata", [*run, *_corral(
            "metadata", "--subscribe", "--listen", "0.0.0.0:80", "--listenReload", "127.0.0.1:8112",
            "--metrics-listen", "127.0.0.1:9112", "--answers", str(d / "metadata-answers.json"))], self.agent_env(i))
        self.start(f"h{i}-dns", [*run, *_corral(
            "dns", "--listen", f"{META_IP}:53", "--metadata-url", f"http://{META_IP}/2016-07-29",
            "--metrics-listen", "127.0.0.1:9113", "--listenReload", "127.0.0.1:8113",
            "--answers", str(d / "dns-answers.json"), "--ttl", "1", "--resolv-conf", str(d / "resolv.conf"))], {})
        self.start(f"h{i}-overlay", [*run, *_corral(
            "overlay", "--backend", self.backend, "--metadata-url", f"http://{router_ip}/2015-12-19",
            "--listen", "127.0.0.1:8111", "--bridge", "docker0", "--probe-interval", "1",
            "--metadata-state-file", str(d / "overlay-metadata.json"))], self.ipsec_env(i))
        # Only the router reads the 2015-12-19 tree: metadata caches a version's whole tree (which
        # holds `self`) once for every caller, so a second reader of it from another address could
        # leave the router without its own `self`. The hosts list is the same in 2016-07-29.
        self.start(f"h{i}-etc-host-updater", [*run, *_corral(
            "etc-host-updater", "--metadata-url", f"http://{META_IP}/2016-07-29", "--hosts-file", "/etc/hosts",
            "--update-interval", "1", "--hostname", f"node-{i}")], {})
        docker, cni_path = "", str(self.workdir / "cni-bundle" / "bin")
        if self.engine == "podman":
            # this host's container engine: its own storage, run root and tmp dir, its Docker API socket
            from standin.demo_runtime import Podman

            pm = Podman(d / "podman", self.podman_run(i))
            pm.prepare()
            self.start(f"h{i}-podman", [*run, *pm.service_argv()], {"CONTAINERS_CONF": str(pm.work / "containers.conf")})
            docker = f"unix://{pm.sock}"
            deadline = time.monotonic() + 30
            while not pm.sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        # netmanager: host ports and host NAT from metadata in this host's iptables, the CNI volume
        # (the configs metadata gives) in <workdir>/h<i>/cni; with podman, the engine's container
        # events -> CNI ADD/DEL with the packaged plugins.
        self.start(f"h{i}-netmanager", [*run, *_corral(
            "netmanager", "--metadata-address", META_IP, "--cni-dir", str(d / "cni"), "--docker-host", docker,
            "--cni-path", cni_path,
            "--cni-state-dir", str(d / "cni-state"), "--netns-handle-dir", str(d / "netns"),
            "--disable-dns-setup", "--metrics-listen", "127.0.0.1:9115",
            "--metadata-state-file", str(d / "netmanager-metadata.json"))], {})
        # healthcheck: a real HAProxy checking the containers the server gave this host to check
        # (containers of the other hosts, through the overlay), reports to the server.
        self.start(f"h{i}-healthcheck", [*run, *_corral(
            "healthcheck", "--metadata-address", META_IP, "--state-dir", str(d / "healthcheck"),
            "--host-uuid", f"demo-host-{i}", "--check-networks", "10.42.0.0/16", "--poll-interval", "1s",
            "--metrics-listen", "127.0.0.1:9114", "--metadata-state-file", str(d / "healthcheck-metadata.json"))],
            self.agent_env(i))
        # What Docker and the agent do on a host: the server's containers for it become namespaces.
        engine = ["--engine", "podman", "--podman-dir", str(d / "podman"), "--podman-run", str(self.podman_run(i)),
                  "--rootfs", str(self.workdir / "rootfs"), "--www", str(d / "www")] if self.engine == "podman" else []
        self.start(f"h{i}-runtime", [sys.executable, "-m", "standin.demo_runtime", "--netns", h, "--tag", self.tag,
                                     "--index", str(i), "--host-uuid", f"demo-host-{i}",
                                     "--state", str(d / "workloads.json"), *engine], {})

    def ipsec_env(self, i: int) -> dict[str, str]:
        """``--backend ipsec``: charon's run and config directories per host, one pre-shared key for all."""
        if self.backend != "ipsec":
            return {}
        d = self.workdir / f"h{i}"
        return {"CORRAL_IPSEC_DIR": str(d / "ipsec-run"), "CORRAL_IPSEC_CONFIG_DIR": str(d / "ipsec"),
                "RANCHER_IPSEC_PSK": self.psk}

    def start_scheduler(self) -> None:
        """One scheduler for the server, in host 1's namespace (an environment service of Rancher 1.2):
        placement decisions from host 1's metadata, with host 1's agent key."""
        d = self.workdir / "h1"
        self.start("scheduler", ["ip", "netns", "exec", self.h(1), *_corral(
            "scheduler", "--metadata-address", f"http://{META_IP}", "--health-check-port", "0",
            "--metrics-listen", "127.0.0.1:9117", "--metadata-state-file", str(d / "scheduler-metadata.json"))],
            self.agent_env(1))

    def scheduler_subscribed(self) -> bool:
        with contextlib.suppress(RuntimeError, ValueError):
            return any("scheduler.prioritize" in (c.get("eventNames") or [])
                       for c in self.admin("GET", "/_admin/conns"))
        return False

    def ctl(self, *argv: str) -> Any:
        """``corral ctl`` against the stand-in, from the underlay namespace; its JSON output."""
        r = self.nsx(self.ul, *_corral("ctl", "--admin", self.admin_url, *argv), check=False)
        if r.returncode != 0:
            raise RuntimeError(f"corral ctl {' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")
        return json.loads(r.stdout) if r.stdout.strip() else None

    def create_workloads(self) -> None:
        for argv in workload_commands(self.n):
            self.ctl(*argv)
        self.containers = list(self.admin("GET", "/_admin/containers"))

    def workload_containers(self) -> list[dict[str, Any]]:
        return [c for c in self.containers if service_of(c)[0] == "demo" and c.get("primary_ip")
                and self.host_index(c)]

    @property
    def workloads(self) -> dict[str, str]:
        """Container name -> its namespace, as the hosts' runtimes made them."""
        out: dict[str, str] = {}
        for i in range(1, self.n + 1):
            with contextlib.suppress(OSError, ValueError):
                out.update(json.loads((self.workdir / f"h{i}" / "workloads.json").read_text()))
        return out

    # ------------------------------------------------------------------ teardown
    def close(self) -> list[str]:
        """Delete every namespace made (their links go with them); returns the ones still there."""
        if self.engine == "podman":  # containers a runtime could not remove, before their conmon goes
            from standin.demo_runtime import Podman, unmount_under

            for i in range(1, self.n + 1):
                if (self.workdir / f"h{i}" / "podman" / "storage").exists():
                    Podman(self.workdir / f"h{i}" / "podman", self.podman_run(i)).clear()
            unmount_under(self.workdir)
        from standin.demo_runtime import unmount_under as _unmount

        _unmount(Path("/run") / self.tag)  # the engines' (and the probe's) run roots
        shutil.rmtree(Path("/run") / self.tag, ignore_errors=True)
        for ns in reversed(self.namespaces):
            for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            _sh("ip", "netns", "del", ns, check=False)
        for etc in self.etc_dirs:
            shutil.rmtree(etc, ignore_errors=True)
        left = [ns for ns in _sh("ip", "netns", "list", check=False).stdout.split() if ns.startswith(self.tag + "-")]
        for ns in left:  # the runtimes' workloads, when a runtime could not clean up after itself
            for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            _sh("ip", "netns", "del", ns, check=False)
        return [ns for ns in _sh("ip", "netns", "list", check=False).stdout.split() if ns.startswith(self.tag + "-")]


ROOT = Path(__file__).resolve().parents[1]


def _running_with(text: str) -> bool:
    """A process other than this one has ``text`` in its command line."""
    me = str(os.getpid())
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and d.name != me:
            with contextlib.suppress(OSError):
                if text.encode() in (d / "cmdline").read_bytes():
                    return True
    return False


def _corral(*argv: str) -> list[str]:
    return [sys.executable, "-m", "agents.cli", *argv]
