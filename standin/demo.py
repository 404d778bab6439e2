"""``corral demo``: the whole suite on one node against the embedded stand-in server.

Starts ``corral server`` with the sample environment (standin/sample_env.yaml), then
every daemon whose ``<pkg>/main.py`` defines ``demo_argv(ctx)``, each as its own process
(as they run in production: one container each), on loopback and non-privileged ports.
Prints what to try, and stops everything cleanly on Ctrl-C (SIGINT) or SIGTERM.

``--hosts N`` (N >= 2, root): N simulated hosts, each a network namespace with its own metadata,
dns, overlay router and etc-host-updater, and workloads networked across them (standin/demo_hosts.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agents.children import die_with_parent
from agents.config import choices_arg, dir_arg, file_arg, float_arg, int_arg, make_parser

__all__ = ["DEMO_ORDER", "DemoContext", "main"]

DEMO_ORDER = ["metadata", "dns", "healthcheck", "scheduler", "netmanager"]
SAMPLE = Path(__file__).resolve().parent / "sample_env.yaml"


@dataclass
class DemoContext:
    """What a daemon's ``demo_argv`` needs to know about the demo's world."""

    workdir: Path
    server_port: int
    admin_port: int
    access_key: str
    secret_key: str
    host_uuid: str
    host_ip: str
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def server_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/v1"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def metadata_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metadata']}"

    def port(self, name: str) -> int:
        """A free port reserved for ``name`` (stable for the demo's lifetime)."""
        if name not in self.ports:
            self.ports[name] = _free_port()
        return self.ports[name]

    def env(self) -> dict[str, str]:
        return {"CATTLE_URL": self.server_url, "CATTLE_ACCESS_KEY": self.access_key,
                "CATTLE_SECRET_KEY": self.secret_key, "CORRAL_ADMIN_URL": self.admin_url}

    def fmt(self) -> dict[str, Any]:
        d: dict[str, Any] = {"server": self.server_url, "admin": self.admin_url, "workdir": str(self.workdir),
                             "host_uuid": self.host_uuid, "host_ip": self.host_ip}
        for k, v in self.ports.items():
            d[f"{k}_port"] = v
        if "metadata" in self.ports:
            d["metadata"] = self.metadata_url
        return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            time.sleep(0.05)
    return False


class _Stop(BaseException):
    """Ctrl-C or SIGTERM: unwinds whatever the demo is doing (start-up included) to the clean stop."""


_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _child_setup() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, set())  # the parent blocks them around fork: not for the child
    die_with_parent()


class _Procs:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.specs: dict[str, tuple[list[str], dict[str, str], bool]] = {}
        self.restarts: dict[str, list[float]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str], raw: bool = False) -> subprocess.Popen[bytes]:
        """Start ``corral <argv>`` (``raw``: ``argv`` as given) in its own session, logging to <name>.log."""
        self.specs[name] = (argv, env, raw)
        log = open(self.workdir / f"{name}.log", "ab")
        # A stop signal that arrives while the child is being forked waits until the child is
        # recorded here, so the clean stop always knows every process it must end.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            cmd = argv if raw else [sys.executable, "-m", "agents.cli", *argv]
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                                 start_new_session=True, preexec_fn=_child_setup)
            self.procs.append((name, p))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            log.close()
        return p

    def dead(self) -> list[str]:
        # Popen.poll holds the Popen's wait lock while it reaps; a stop signal raised in there would
        # leave it held and the clean stop's wait() would block for ever. Signals wait until after.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            return [n for n, p in self.procs if p.poll() is not None]
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def restart(self, name: str) -> bool:
        """Start ``name`` again as it was started, as Docker's ``restart: always`` would; False once it
        has died 5 times within a minute (then it stays down)."""
        now = time.monotonic()
        recent = [t for t in self.restarts.get(name, []) if now - t < 60]
        if len(recent) >= 5:
            return False
        self.restarts[name] = [*recent, now]
        self.procs = [(n, p) for n, p in self.procs if n != name]
        argv, env, raw = self.specs[name]
        self.start(name, argv, env, raw)
        return True

    def stop_all(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 8
        for _, p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(p.pid, signal.SIGKILL)  # its own session: HAProxy and helpers go with it
                p.wait()


def _sample_host() -> tuple[str, str]:
    with contextlib.suppress(OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
        env = yaml.safe_load(SAMPLE.read_text())
        h = env["hosts"][0]
        return str(h["uuid"]), str(h.get("agent_ip") or "127.0.0.1")
    return "", "127.0.0.1"


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("corral demo", __doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--workdir", default="", type=dir_arg,
                   help="where logs, state and answers go, kept afterwards (none given: a temporary "
                        "directory, removed on exit)")
    p.add_argument("--only", default=[], type=choices_arg(DEMO_ORDER), metavar="NAMES",
                   help=f"comma-separated daemons to start besides the server ({', '.join(DEMO_ORDER)}; "
                        "none given: every one built)")
    p.add_argument("--env", default="", type=file_arg(must_exist=True),
                   help="environment file (YAML/JSON) loaded into the stand-in server (none given: the "
                        "sample shipped in standin/sample_env.yaml)")
    p.add_argument("--duration", type=float_arg(0), default=0, help="stop by itself after this many seconds (0: Ctrl-C)")
    p.add_argument("--hosts", type=int_arg(1, 20), default=None,
                   help="simulated hosts; 1: the single-node demo on loopback; 2 or more: one network namespace "
                        "per host on an underlay bridge, workloads networked across them (needs root) "
                        "(none given: 3 as root, else 1; --only and --env imply 1)")
    p.add_argument("--backend", default="vxlan", choices=["vxlan", "ipsec"],
                   help="overlay between the simulated hosts (--hosts 2 or more)")
    p.add_argument("--workloads", default="", choices=["podman", "netns"],
                   help="--hosts 2 or more: workloads as real containers (one podman engine per host, networked by "
                        "netmanager -> CNI) or as bare network namespaces (none given: podman when podman and runc "
                        "are installed and run a first busybox container, probed at start)")
    return p


def _walkthrough(ctx: DemoContext, started: list[str], env_file: str) -> list[str]:
    """Hints that cross daemons: scaling a service and watching it reach DNS, per-container views."""
    from standin.ctl import AdminClient

    if env_file != str(SAMPLE):
        return []
    ips = {}
    with contextlib.suppress(Exception):  # hints only: without the addresses they are left out
        for c in AdminClient(ctx.admin_url, 10).get("/_admin/containers"):
            ips[c["name"]] = c.get("primary_ip") or ""
    out: list[str] = []
    f = ctx.fmt()
    if "metadata" in started and ips.get("Shop-Web-1"):
        out += [
            "a container's own view (`self`): metadata answers by the caller's address; from the host, say",
            "which container you are with X-Forwarded-For (the demo trusts it from loopback) or --interface:",
            f"  $ curl -s -H 'X-Forwarded-For: {ips['Shop-Web-1']}' {f['metadata']}/latest/self/container/name"
            "    # shop-web-1: Shop-Web-1's name as metadata gives it",
        ]
        if "toggle-me" in ips:
            out.append(f"  $ curl -s --interface {ips['toggle-me']} {f['metadata']}/latest/self/container/name"
                       "    # toggle-me (its address is a local one)")
    if "dns" in started:
        dig = f"dig +short @127.0.0.1 -p {f['dns_port']} web.shop.rancher.internal"
        out += [
            "scale a service: new containers reach DNS once their health check reports them healthy (until",
            "then, with no healthy container, dns answers one fallback address). This demo's checker reaches",
            "only loopback addresses, so you report the new container healthy yourself:",
            f"  $ corral ctl --admin {ctx.admin_url} service scale Shop/Web 3    # creates Shop-Web-3",
            f"  $ corral ctl --admin {ctx.admin_url} container get Shop-Web-3 | grep health_state    # initializing",
            f"  $ {dig}    # still one address: no Web container is healthy yet",
            f"  $ corral ctl --admin {ctx.admin_url} container health Shop-Web-3 healthy    # as a health report would",
            f"  $ {dig}    # Shop-Web-3's address, a second later",
        ]
    return out


def main(argv: list[str]) -> int:
    from standin.ctl import AdminClient, CtlError

    args = build_parser().parse_args(argv)
    if args.hosts is None:
        args.hosts = 3 if os.geteuid() == 0 and not args.only and not args.env else 1
    env_file = args.env or str(SAMPLE)
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if stopping:  # already on the way out: let the clean stop finish
            return
        stopping = True
        raise _Stop

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    made_workdir = not args.workdir
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="corral-demo-"))
    procs = _Procs(workdir)
    topo: Any = None
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        if args.hosts > 1:
            from standin.demo_hosts import HostsDemo

            engine = args.workloads or ("podman" if shutil.which("podman") and shutil.which("runc") else "netns")
            topo = HostsDemo(args.hosts, workdir, lambda n, a, e: procs.start(n, a, e, raw=True), args.backend, engine)
            topo.engine_required = args.workloads == "podman"
            return _run_hosts(args, topo, procs)
        return _run(args, workdir, env_file, procs, AdminClient, CtlError)
    except _Stop:
        return 0
    finally:
        stopping = True  # from here on a signal changes nothing
        procs.stop_all()
        if topo is not None:
            left = topo.close()
            if left:
                print(f"could not delete network namespaces: {', '.join(left)}", file=sys.stderr)
        if made_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        print("demo stopped" + ("" if made_workdir else f" (logs and state kept in {workdir})"))
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def _run(args: argparse.Namespace, workdir: Path, env_file: str, procs: _Procs, client: Any, ctl_error: Any) -> int:
    host_uuid, host_ip = _sample_host()
    ctx = DemoContext(workdir=workdir, server_port=_free_port(), admin_port=_free_port(),
                      access_key="demo-agent", secret_key="demo-agent-secret", host_uuid=host_uuid, host_ip=host_ip)
    keys = [
        {"access": "demo-admin", "secret": "demo-admin-secret", "role": "admin"},
        {"access": ctx.access_key, "secret": ctx.secret_key, "role": "agent", "agentId": "1a1",
         "hostUuid": host_uuid},
    ]
    (workdir / "keys.yaml").write_text(yaml.safe_dump(keys))
    procs.start("server", ["server", "--listen", f"127.0.0.1:{ctx.server_port}",
                           "--admin-listen", f"127.0.0.1:{ctx.admin_port}", "--keys", str(workdir / "keys.yaml"),
                           "--state", str(workdir / "state.db"), "--journal", str(workdir / "journal.jsonl")],
                {})
    if not _wait_http(f"http://127.0.0.1:{ctx.server_port}/ping") or not _wait_http(ctx.admin_url):
        print(f"the stand-in server did not start; see {workdir / 'server.log'}", file=sys.stderr)
        return 1
    try:
        text = Path(env_file).read_text()
        doc = yaml.safe_load(text)
        client(ctx.admin_url, 30).post("/_admin/load", doc, replace="true")
    except (OSError, yaml.YAMLError, ctl_error) as e:
        print(f"loading {env_file} failed: {e}", file=sys.stderr)
        return 1
    only = set(args.only)
    hints: list[str] = [
        f"stand-in server (API {ctx.server_url}, admin {ctx.admin_url}):",
        f"  $ corral ctl --admin {ctx.admin_url} host ls | grep '\"name\"'    # node-a and node-b",
        f"  $ curl -s {ctx.admin_url}/ready    # the server's readiness",
    ]
    started = ["server"]
    waits: list[str] = []
    for name in DEMO_ORDER:
        if only and name not in only:
            continue
        try:
            mod = importlib.import_module(f"{name}.main")
        except ImportError:
            continue
        fn = getattr(mod, "demo_argv", None)
        if fn is None:
            continue
        d_argv = fn(ctx)
        if d_argv is None:
            continue
        procs.start(name, [name, *d_argv], ctx.env())
        started.append(name)
        ready_url = getattr(mod, "demo_ready_url", None)
        if ready_url is not None:
            waits.append(ready_url(ctx))
        for line in getattr(mod, "DEMO_HINTS", []):
            hints.append(line.format(**ctx.fmt()))
    for url in waits:  # every daemon's listener is up before a hint is printed
        _wait_http(url)
    hints += _walkthrough(ctx, started, env_file)
    print(f"Corral demo running: {', '.join(started)}")
    print(f"logs and state in {workdir}")
    print("\nTry (each line after $ is a command; # says what it shows):")
    _path_hint()
    for h in hints:
        print(h)
    print("\nCtrl-C stops everything.")
    sys.stdout.flush()
    return _watch(procs, workdir, args.duration)


def _path_hint() -> None:
    here = Path(sys.executable).parent
    if shutil.which("corral") is None and (here / "corral").exists():
        print(f"  $ export PATH={here}:$PATH    # so that `corral` below is found")


def _watch(procs: _Procs, workdir: Path, duration: float, restart: bool = False) -> int:
    """Until Ctrl-C (or ``--duration`` seconds): 1 as soon as a daemon dies, with its name; with
    ``restart`` (the simulated hosts) a daemon that dies is started again, as Docker restarts the
    original's containers, unless it keeps dying (5 times in a minute)."""
    t_end = time.monotonic() + duration if duration else None
    while True:
        dead = procs.dead()
        if dead and restart:
            again = [n for n in dead if procs.restart(n)]
            if again:
                print(f"restarted {', '.join(again)} (it stopped; see {workdir}/<name>.log)", file=sys.stderr,
                      flush=True)
            dead = [n for n in dead if n not in again]
        if dead:
            print(f"stopped unexpectedly: {', '.join(dead)} (see {workdir}/<name>.log)", file=sys.stderr)
            return 1
        if t_end is not None and time.monotonic() >= t_end:
            return 0
        time.sleep(0.2)


def _ping(topo: Any, ns: str, ip: str) -> bool:
    return bool(topo.nsx(ns, "ping", "-c", "1", "-W", "1", ip, check=False).returncode == 0)


def _run_hosts(args: argparse.Namespace, topo: Any, procs: _Procs) -> int:
    """``--hosts N`` (N >= 2): see standin/demo_hosts.py for the layout."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("corral demo --hosts N (N >= 2) needs root and iproute2: every simulated host is a network "
              "namespace (--hosts 1 runs without)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    workdir = topo.workdir
    try:
        topo.build()
        topo.start_server()
        if not topo.wait_server():
            print(f"the stand-in server did not start; see {workdir / 'server.log'}", file=sys.stderr)
            return 1
        topo.load()
        routers = topo.routers()
        if sorted(routers) != list(range(1, topo.n + 1)):
            print(f"the server placed no overlay router on some host: {routers}", file=sys.stderr)
            return 1
        for i in range(1, topo.n + 1):
            topo.start_host(i, routers[i])
        topo.start_scheduler()
        deadline = time.monotonic() + 60
        while not topo.scheduler_subscribed():  # else the server would place by round-robin
            if procs.dead() or time.monotonic() > deadline:
                print(f"the scheduler did not subscribe to the server; see {workdir}/scheduler.log", file=sys.stderr)
                return 1
            time.sleep(0.2)
        topo.create_workloads()
    except subprocess.CalledProcessError as e:  # an `ip` command refused: say which (all is undone below)
        print(f"setting up the simulated hosts failed: {' '.join(e.cmd)}: {(e.stderr or '').strip()}", file=sys.stderr)
        return 1
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print(f"setting up the simulated hosts failed: {e}", file=sys.stderr)
        return 1
    from standin.demo_hosts import HOST_PORT, service_of

    webs = {topo.host_index(c): str(c["primary_ip"]) for c in topo.workload_containers()
            if service_of(c)[1] == f"web{topo.host_index(c)}" and c.get("ports")}
    clients = {topo.host_index(c): str(c["name"]) for c in topo.workload_containers() if service_of(c)[1] == "client"}
    if sorted(webs) != list(range(1, topo.n + 1)) or sorted(clients) != list(range(1, topo.n + 1)):
        print(f"the server did not place a web and a client on every host: {webs} {clients}", file=sys.stderr)
        return 1
    # Every client reaches every web container (its own host's through the bridge, the others' through
    # the overlay): the demo is up.
    todo = {(i, j) for i in clients for j in webs}
    told = time.monotonic() + 60
    while todo:
        dead = procs.dead()
        if dead:
            print(f"stopped unexpectedly: {', '.join(dead)} (see {workdir}/<name>.log)", file=sys.stderr)
            return 1
        ns = topo.workloads
        todo = {(i, j) for i, j in todo if clients[i] not in ns or not _ping(topo, ns[clients[i]], webs[j])}
        if todo and time.monotonic() > told:  # say what is missing once; keep waiting (Ctrl-C stops)
            told = float("inf")
            pairs = ", ".join(f"client on node-{i} -> web{j}" for i, j in sorted(todo))
            print(f"still waiting for {pairs}; see {workdir}/h<i>-overlay.log", file=sys.stderr, flush=True)
        if todo:
            time.sleep(0.2)
    up = time.monotonic() - t0
    c1 = topo.workloads[clients[1]]
    last = topo.n
    ul, adm = topo.ul, topo.admin_url
    print(f"Corral demo running on {topo.n} simulated hosts ({args.backend} overlay): "
          f"all workloads reachable after {up:.1f} s")
    print(f"logs and state in {workdir}")
    print("\nThe namespaces (ip netns list | grep corral-demo):")
    print(f"  {ul}: the underlay bridge {topo.prefix}.0/24 and the stand-in server")
    for i in range(1, topo.n + 1):
        names = ", ".join(sorted(n for n, ns in topo.workloads.items() if ns.startswith(topo.h(i) + "-")))
        print(f"  {topo.h(i)}: node-{i}, agent IP {topo.prefix}.{i}; metadata, dns, healthcheck (HAProxy), netmanager,"
              f" overlay, etc-host-updater{', scheduler' if i == 1 else ''}; workloads {names} in {topo.h(i)}-<n>")
    ctl = f"ip netns exec {ul} corral ctl --admin {adm}"
    web2 = next((str(c["name"]) for c in topo.workload_containers() if service_of(c)[1] == "web2"), "demo-web2-1")
    hosts = " ".join(topo.h(i) for i in range(1, topo.n + 1))
    print("\nTry (each line after $ is a command; # says what it shows):")
    _path_hint()
    print(f"  $ for h in {hosts}; do ip netns exec $h corral status; done"
          "    # every host: daemons up/ready, containers with health, overlay peers")
    print(f"  $ ip netns exec {c1} dig +short @169.254.169.250 web{last}.demo.rancher.internal"
          f"    # web{last}'s address (on node-{last}), from node-1's Corral dns")
    print(f"  $ ip netns exec {c1} curl -s http://169.254.169.250/latest/self/container/name"
          f"    # {clients[1]}: metadata knows the caller by its address")
    print(f"  $ ip netns exec {c1} ping -c 2 {webs[last]}    # across the {args.backend} overlay to node-{last}")
    print(f"  $ ip netns exec {c1} curl -s http://{webs[last]}/    # web{last} answers over HTTP")
    print(f"  $ ip netns exec {topo.h(1)} curl -s http://{topo.prefix}.2:{HOST_PORT}/"
          f"    # node-2's host port {HOST_PORT} (netmanager's DNAT), from node-1's underlay address")
    print(f"  $ {ctl} container update {web2} --set 'merge_labels={{demo.health: fail}}'"
          f"    # {web2} now fails its health check")
    print(f"  $ ip netns exec {topo.h(1)} curl -s http://169.254.169.250/latest/containers/{web2}/health_state"
          "    # unhealthy a few seconds later (HAProxy on another host reported it DOWN)")
    print(f"  $ {ctl} container update {web2} --set 'merge_labels={{demo.health: ok}}'    # and healthy again")
    print(f"  $ {ctl} service scale demo/client {topo.n + 1}"
          "    # the scheduler places one more client; its runtime starts it, dns and the overlay follow")
    print(f"  $ ip netns exec {topo.h(1)} cat /etc/hosts    # node-1's hosts file: etc-host-updater lists every node")
    print(f"  $ ip netns exec {topo.h(1)} ip route | grep vtep1042    # the overlay's routes to the other hosts' containers")
    print(f"  $ ip netns exec {topo.h(2)} iptables -t nat -S CATTLE_PREROUTING    # netmanager's host port rules")
    if args.backend == "ipsec":
        print(f"  $ ip netns exec {topo.h(1)} ip -s link show ipsec0    # charon's kernel-libipsec tunnel: its counters")
    print(f"  $ {ctl} container ls | grep '\"name\"'    # what the scheduler placed")
    print("\nCtrl-C stops everything and deletes every namespace.")
    sys.stdout.flush()
    return _watch(procs, workdir, args.duration, restart=True)
