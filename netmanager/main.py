"""``corral netmanager``: host ports, host NAT, the metadata route and the CNI volume, from metadata.

Data flow: the process's one metadata watch (``agents.metadata_watch.MetadataWatch``, which also
persists the last good tree to ``--metadata-state-file`` and loads it at start) -> each snapshot
is turned by pure functions into a :class:`Ruleset`
(``desired.py``) and the CNI volume's files (``cniconf.py``) -> two ``Reconciler`` loops apply them
(``firewall.RulesApplier`` through one ``iptables-restore --noflush --wait``; ``files.apply_cni``).
At boot the persisted tree is applied before metadata answers (fail-static: nothing is ever
flushed because metadata went away). Drift: the backend's change probe (nft: the generation id,
legacy: each table's entry count and size) is read every ``--drift-probe-interval`` and the kernel
is read back on every move and every ``--verify-interval``; the metadata route is checked every second.

Tasks (one TaskGroup): the metadata watch, the two reconcilers, the verify/probe loop, the route loop,
the ARP/MAC/conntrack syncers (``l2sync.py``) and, with a Docker API, events -> CNI, vethsync, the reaper.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agents.cli import run_daemon
from agents.config import add_common_args, int_arg, make_parser, positive_duration_arg
from agents.errors import ConfigError, CorralError
from agents.log import get_logger
from agents.metadata_client import Snapshot
from agents.metadata_watch import MetadataSnapshot, MetadataWatch, add_watch_args
from agents.metrics import AdminServer, Health, counter
from agents.reconcile import Reconciler
from netmanager.cniconf import CniFiles, cni_files, shim_script, shim_targets
from netmanager.cnievents import CNI_PATH
from netmanager.desired import HostFacts, Route, Ruleset, desired_ruleset, metadata_route
from netmanager.files import apply_cni, write_atomic
from netmanager.firewall import RulesApplier
from netmanager.iptables import detect_backend
from netmanager.netlink import RouteState, ensure_ipset, ensure_route, set_sysctl

__all__ = ["VERIFY_INTERVAL", "build_parser", "main", "verify_interval"]

log = get_logger(__name__)
API_VERSION = "2016-07-29"
# --verify-interval by backend: nft's change probe (the generation id) sees every commit, so the
# periodic read-back (an iptables-nft-save of every rule: ~0.6-0.9 s of CPU at 25k rules) is a
# backstop there; legacy's (table sizes) misses a same-size edit, so every 10 s the tables' rules
# are hashed (~35 ms at 25k rules) and read back only when that moved
VERIFY_INTERVAL = {"nft": 300.0, "legacy": 10.0, "default": 10.0}

_ROUTE_REPAIRS = counter("netmanager", "route_repairs", "Metadata route re-created")
_VETHS = counter("netmanager", "veths_deleted", "Dangling vethr* host ends deleted from local bridges")
_SNAPSHOTS = counter("netmanager", "snapshots", "Metadata snapshots by source (metadata, state-file)", ["source"])


def verify_interval(flag: float | None, backend: str) -> float:
    """Seconds between read-backs the change probe did not ask for: ``--verify-interval`` if given,
    else the backend's default."""
    return flag if flag else VERIFY_INTERVAL.get(backend, VERIFY_INTERVAL["default"])


def _seconds(v: str) -> int:
    """The originals' interval flags: whole seconds (a bad value is an error, not the default)."""
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds: {v!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {v!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("corral netmanager", "host networking and CNI plumbing")
    p.add_argument("--metadata-address", default="169.254.169.250", help="metadata host (or host:port)")
    p.add_argument("--metadata-url", default="", help="full metadata URL (older templates), e.g. "
                   "http://169.254.169.250/2016-07-29; overrides --metadata-address")
    p.add_argument("--metadata-listen-port", type=int_arg(1, 65535),
                   default=int(os.environ.get("RANCHER_METADATA_LISTEN_PORT") or 80),
                   help="port metadata really listens on; not 80 installs the port-80 DNAT "
                        "(env RANCHER_METADATA_LISTEN_PORT)")
    for name in ("macsync", "arpsync", "vethsync", "routesync", "conntracksync"):
        p.add_argument(f"--disable-{name}", action="store_true", help=f"switch {name} off")
    p.add_argument("--arpsync-interval", type=_seconds, default=5,
                   help="minimum seconds between ARP syncs (run on metadata changes and every 120 s)")
    p.add_argument("--conntracksync-interval", type=_seconds, default=5,
                   help="minimum seconds between conntrack sweeps (run on rule changes and every 120 s; "
                        "a moved host port's flows also go right after the apply)")
    p.add_argument("--vethsync-interval", type=_seconds, default=60,
                   help="seconds between sweeps of dangling vethr* host ends on the local bridges")
    p.add_argument("--routesync-interval", type=_seconds, default=60,
                   help="accepted for compatibility; the route is checked every second")
    p.add_argument("--iptables-sync-interval", type=_seconds, default=120,
                   help="accepted for compatibility; see --verify-interval")
    p.add_argument("--disable-cni-setup", action="store_true", help="do not write CNI configs or shims")
    p.add_argument("--disable-dns-setup", action="store_true", help="do not rewrite containers' resolv.conf")
    p.add_argument("--verify-interval", type=positive_duration_arg, default=None,
                   help="read the owned chains back this often even when the change probe saw nothing, and "
                        "repair drift (default: 10s on legacy, whose probe misses an edit that keeps a table's "
                        "size; 300s on nft, whose generation id moves on every commit)")
    p.add_argument("--drift-probe-interval", type=positive_duration_arg, default=0.5,
                   help="probe the ruleset for changes this often (nft: generation id; legacy: table sizes)")
    p.add_argument("--iptables-backend", choices=("auto", "legacy", "nft"), default="auto",
                   help="auto: the backend that holds Docker's chains")
    p.add_argument("--cni-dir", default="/etc/cni", help="the rancher-cni-driver volume")
    p.add_argument("--docker-host", default=os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock",
                   help="Docker API for container events -> CNI ADD/DEL; '' switches it off (env DOCKER_HOST)")
    p.add_argument("--cni-state-dir", default="/var/lib/rancher/state/cni",
                   help="CNI results per container, as the Rancher agent reads them")
    p.add_argument("--netns-handle-dir", default="/run/corral/netns",
                   help="bind-mounted network namespace handles kept from ADD to DEL")
    p.add_argument("--cni-path", default=CNI_PATH, help="where CNI plugins are looked up")
    p.add_argument("--cni-retries", type=int_arg(0, 1000), default=15, help="ADD attempts after the first")
    p.add_argument("--cni-retry-delay", type=positive_duration_arg, default=2.0, help="mean delay between ADD attempts")
    p.add_argument("--reaper-remove", action="store_true",
                   help="force-remove containers whose uuid label metadata does not know (default: log only)")
    p.add_argument("--netns", default="", help="run inside this named network namespace (tests)")
    add_watch_args(p, state_file="/var/lib/rancher/state/corral/metadata.json")
    add_common_args(p, metrics_listen="127.0.0.1:9115")
    return p


def _metadata_base(args: argparse.Namespace) -> tuple[str, str]:
    if args.metadata_url:
        u = urlsplit(args.metadata_url)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ConfigError(f"--metadata-url must be http://host[:port]/<version>: {args.metadata_url!r}")
        version = u.path.strip("/") or API_VERSION
        return f"{u.scheme}://{u.netloc}", version
    return f"http://{args.metadata_address}", API_VERSION


def enter_netns(name: str) -> None:
    """setns(2) into ``/run/netns/<name>`` before any socket or child exists."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise ConfigError(f"setns {name}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


class NetManager:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.health = Health()
        self.url, self.api_version = _metadata_base(args)
        addr = urlsplit(self.url).hostname or args.metadata_address
        self.facts = HostFacts(
            docker_bridge=os.environ.get("DOCKER_BRIDGE", "docker0"),
            metadata_ip=os.environ.get("METADATA_IP", "169.254.169.250"),
            metadata_address=addr,
            metadata_listen_port=args.metadata_listen_port,
        )
        self.route: Route | None = None
        self.verify_interval = verify_interval(args.verify_interval, "default")
        if not args.disable_routesync and os.environ.get("DOCKER_BRIDGE") and os.environ.get("METADATA_IP"):
            self.route = metadata_route(self.facts)
        self.cni_root = Path(args.cni_dir)
        self.applier: RulesApplier | None = None
        self.rules: Reconciler[Ruleset] | None = None
        self.cni: Reconciler[CniFiles] | None = None
        self.shims: Reconciler[dict[str, str]] | None = None
        self.docker: Any = None  # DockerSource when --docker-host is set
        self.reaper: Any = None
        self.l2: Any = None  # L2Syncers
        self.snapshot: Snapshot | None = None

    # -------------------------------------------------------------- snapshot -> desired
    def on_snapshot(self, ms: MetadataSnapshot) -> None:
        snap = ms.typed
        if snap.self_host is None:
            log.warning("metadata snapshot has no self host; ignored", version=snap.version)
            return
        _SNAPSHOTS.labels(ms.source).inc()
        self.snapshot = snap
        assert self.rules is not None
        self.rules.submit(desired_ruleset(snap, self.facts))
        if self.cni is not None:
            self.cni.submit(cni_files(snap))
        if self.shims is not None:
            self.shims.submit(shim_targets(snap))
        if self.reaper is not None:
            self.reaper.on_snapshot(snap)
        if self.l2 is not None:
            self.l2.on_snapshot(snap)

    async def apply_cni(self, want: CniFiles) -> None:
        changed = await asyncio.to_thread(apply_cni, self.cni_root, want)
        if changed:
            log.info("cni files updated", changes=changed)

    # -------------------------------------------------------------- loops
    async def verify(self, stop: asyncio.Event) -> None:
        """Suspect drift at once when the backend's change probe (nft: generation id; legacy: table
        sizes) moves under us, and every --verify-interval (legacy: when the tables' digest moved
        since the last read-back, or we wrote since)."""
        assert self.applier is not None and self.rules is not None
        every = self.verify_interval
        probe = self.args.drift_probe_interval if self.applier.probe is not None else every
        next_verify = time.monotonic() + every
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), probe)
                if stop.is_set() or self.rules.current is None:
                    continue
                reason = "ruleset changed (probe)" if await self.applier.moved() else ""
                if not reason and time.monotonic() >= next_verify:
                    next_verify = time.monotonic() + every
                    if not await self.applier.unchanged():
                        reason = "verify interval"
                if reason:
                    next_verify = time.monotonic() + every
                    self.applier.suspect_drift()
                    self.rules.kick(reason)
        finally:
            self.applier.close()

    async def route_loop(self, stop: asyncio.Event) -> None:
        assert self.route is not None
        warned = ""
        while not stop.is_set():
            try:
                before = await ensure_route(self.route)
                if before in (RouteState.MISSING, RouteState.CONFLICT):
                    _ROUTE_REPAIRS.inc()
                    log.info("metadata route installed", dst=self.route.dst, dev=self.route.dev, was=before)
                if before == RouteState.NO_LINK and warned != before:
                    log.warning("metadata route: bridge not there yet", dev=self.route.dev)
                warned = before
                self.health.set("route", before != RouteState.NO_LINK, before)
            except CorralError as e:
                log.error("metadata route check failed", error=str(e))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def apply_shims(self, targets: dict[str, str]) -> None:
        """``<cni-dir>/bin/<name>``: nsenter into the driver container and run the real binary.
        Each shim on its own: one driver that is not running does not hold the others back."""
        errors = []
        for name, cid in targets.items():
            try:
                info = await self.docker.inspect(cid)
                pid = int(((info or {}).get("State") or {}).get("Pid") or 0)
                if not pid:
                    raise CorralError(f"driver container {cid[:12]} is not running")
                path = self.cni_root / "bin" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.is_dir() and not path.is_symlink():
                    import shutil

                    shutil.rmtree(path)
                if write_atomic(path, shim_script(pid), 0o700):
                    log.info("cni shim written", name=name, container=cid[:12], pid=pid)
            except (CorralError, OSError) as e:
                errors.append(f"{name}: {e}")
        if errors:
            raise CorralError("; ".join(errors))

    async def vethsync(self, stop: asyncio.Event) -> None:
        """Every --vethsync-interval: delete dangling ``vethr*`` host ends on local bridges."""
        from netmanager.desired import local_bridges, stale_veths
        from netmanager.netlink import delete_link, veth_ports

        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.args.vethsync_interval)
            if stop.is_set() or self.snapshot is None or not self.docker.connected:
                continue
            try:
                bridges = local_bridges(self.snapshot)
                if not bridges:
                    continue
                running = await self.docker.running_ids()
                for name in stale_veths(await veth_ports(), bridges, running):
                    await delete_link(name)
                    _VETHS.inc()
                    log.info("dangling veth deleted", link=name)
            except CorralError as e:
                log.warning("vethsync failed", error=str(e))

    async def docker_loop(self, stop: asyncio.Event) -> None:
        from netmanager.docker_events import CniHandler

        src = self.docker
        handler = CniHandler(src, cni_dir=self.cni_root, state_dir=Path(self.args.cni_state_dir),
                             handle_dir=Path(self.args.netns_handle_dir), cni_path=self.args.cni_path,
                             retries=self.args.cni_retries, retry_delay=self.args.cni_retry_delay,
                             metadata_ip=self.facts.metadata_ip, dns_setup=not self.args.disable_dns_setup)
        def on_event(cid: str, action: str, attrs: dict[str, str]) -> None:
            handler.on_event(cid, action, attrs)
            shims = self.shims
            if action == "start" and shims is not None and cid in (shims.current or {}).values():
                shims.kick("driver container started")  # its PID changed: rewrite the shim now

        try:
            await src.run(stop, on_event, handler.on_connect)
        finally:
            src.close()

    async def serve(self, stop: asyncio.Event) -> None:
        backend = await detect_backend(self.args.iptables_backend)
        self.verify_interval = verify_interval(self.args.verify_interval, backend.name)
        log.info("starting", metadata=self.url, backend=backend.name, route=self.route,
                 cni=not self.args.disable_cni_setup, verify_interval=self.verify_interval)
        self.applier = RulesApplier(backend, conntrack=not self.args.disable_conntracksync)
        self.rules = Reconciler("iptables", self.applier.apply, daemon="netmanager", health=self.health,
                                retry_max=30.0)
        if not self.args.disable_cni_setup:
            self.cni = Reconciler("cni", self.apply_cni, daemon="netmanager", health=self.health)
        if self.args.docker_host:
            from netmanager.docker_events import DockerSource
            from netmanager.reaper import Reaper

            self.docker = DockerSource(self.args.docker_host)
            self.reaper = Reaper(self.docker, remove=self.args.reaper_remove)
            if not self.args.disable_cni_setup:
                self.shims = Reconciler("shims", self.apply_shims, daemon="netmanager", retry_max=10.0)
        from netmanager.l2sync import L2Syncers

        applier = self.applier
        self.l2 = L2Syncers(self.docker, arp_interval=self.args.arpsync_interval,
                            conntrack_interval=self.args.conntracksync_interval, applied=lambda: applier.applied)
        if self.args.metadata_state_file:
            try:
                Path(self.args.metadata_state_file).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                log.error("metadata state directory not created", error=str(e))
        watch = MetadataWatch(self.url, api_version=self.api_version, component="netmanager",
                              state_file=self.args.metadata_state_file, max_wait=5,
                              stale_after=self.args.metadata_stale_after, health=self.health)
        watch.subscribe(self.on_snapshot)
        try:
            await ensure_ipset()
        except CorralError as e:
            log.error("host NAT ipset not created", error=str(e))
        try:
            set_sysctl("net.bridge.bridge-nf-call-iptables", "1", load_module="br_netfilter")
        except CorralError as e:
            log.warning("bridge-nf-call-iptables not set", error=str(e))
        try:
            if not self.facts.docker_bridge or not set_sysctl(
                    f"net.ipv4.conf.{self.facts.docker_bridge}.route_localnet", "1"):
                log.info("route_localnet not set: no such bridge yet", bridge=self.facts.docker_bridge)
        except CorralError as e:
            log.warning("route_localnet not set", error=str(e))
        admin = AdminServer(self.args.metrics_listen, self.health)
        await admin.start()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.rules.run(stop))
                if self.cni is not None:
                    tg.create_task(self.cni.run(stop))
                if self.shims is not None:
                    tg.create_task(self.shims.run(stop))
                tg.create_task(watch.run(stop))
                tg.create_task(self.verify(stop))
                if self.route is not None:
                    tg.create_task(self.route_loop(stop))
                if not self.args.disable_arpsync:
                    tg.create_task(self.l2.arpsync(stop))
                if not self.args.disable_conntracksync:
                    tg.create_task(self.l2.conntracksync(stop))
                if self.args.docker_host:
                    tg.create_task(self.docker_loop(stop))
                    if not self.args.disable_vethsync:
                        tg.create_task(self.vethsync(stop))
                    if not self.args.disable_macsync:
                        tg.create_task(self.l2.macsync(stop))
                    tg.create_task(self.reaper.run(stop))
        finally:
            await admin.stop()


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.netns:
            enter_netns(args.netns)
        nm: Any = NetManager(args)
    except (ConfigError, OSError) as e:
        print(f"netmanager: {e}", file=sys.stderr, flush=True)
        return 2
    return run_daemon("netmanager", nm.serve, debug=args.debug, log_file=args.log, log_json=args.log_json,
                      pid_file=args.pid_file)
