"""The router daemon: metadata -> topology -> backend, probed, with rancher-net's HTTP API.

One :class:`~agents.metadata_watch.MetadataWatch` feeds :meth:`Router.on_snapshot`, which turns
each tree into a :class:`~netmanager.overlay.peers.Topology` (pure) and submits it to one
:class:`~agents.reconcile.Reconciler`: bursts coalesce (debounce 200 ms, one apply in flight, the
latest topology wins), a failed apply is retried with back-off, every ``--resync-interval`` the
whole state is compared again, and ``--verify-interval`` reads the kernel back. Netlink events on
the VTEP kick the loop at once, so an external flush is repaired within the debounce.

HTTP (``--listen``, ``:8111``): ``GET /ping`` -> ``OK``; ``/v1/reload`` (any method) downloads
metadata again and reconciles, 500 with the error when that fails; ``GET /connectivity`` ->
per-peer probe status and RTT (always 200: probe results are information, never a reason to
restart routers); ``/metrics``, ``/healthz``, ``/ready``.

Host-netns mode (``--bridge``, the default ``docker0``): the router IP sits on the VTEP as a /32,
the bridge answers ARP for remote workloads (``proxy_arp``, no delay) and forwarding is on. In the
original layout (router in a holder container's netns, ``--bridge ''``) the interface holding the
router IP answers ARP for remote workloads instead (the kernel's proxy ARP in place of the
original's raw ARP responder) and forwarding is on in that netns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
from typing import Any

from agents.errors import CorralError, TransportError
from agents.log import get_logger
from agents.metadata_watch import MetadataSnapshot, MetadataWatch
from agents.metrics import AdminServer, Health, counter, gauge
from agents.reconcile import Reconciler
from netmanager.overlay import Overlay
from netmanager.overlay.peers import Topology, describe, topology
from netmanager.overlay.probe import Prober

__all__ = ["Router", "apply_errors"]

log = get_logger(__name__)
_PEERS = gauge("overlay", "peers", "Remote hosts with a router")
_REMOTE = gauge("overlay", "remote_workloads", "Remote workload IPs routed through the overlay")
_SKIPPED = gauge("overlay", "skipped_entries", "Remote entries left out (no agent IP, no router, shared agent IP)")
_DUP = gauge("overlay", "duplicate_agent_ips", "Agent IPs claimed by more than one host (refused; alarm when > 0)")
_WRITES = gauge("overlay", "kernel_writes", "Kernel writes made by the backend since start")
_BAD = counter("overlay", "bad_snapshots", "Metadata trees the overlay could not use (last good state kept)")


def _sysctl(key: str, value: str) -> None:
    path = "/proc/sys/" + key
    try:
        with open(path) as f:
            if f.read().strip() == value:
                return
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        log.warning("sysctl not set", key=key, value=value, error=str(e))


def _bridge_ip(name: str) -> str:
    """First IPv4 address of ``name`` (SIOCGIFADDR), '' when it has none or does not exist."""
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return ""
    return socket.inet_ntoa(res[20:24])


def _device_of(ip: str) -> str:
    """The interface whose first IPv4 address is ``ip`` ('' when none is)."""
    for _idx, name in socket.if_nameindex():
        if _bridge_ip(name) == ip:
            return name
    return ""


async def _iptables(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec("iptables", "-w", "5", *args, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    return proc.returncode or 0, err.decode(errors="replace").strip()


def apply_errors(res: Any) -> list[str]:
    """The failed entries a backend's ``apply`` reports: a result with ``.errors`` (VXLAN) or the
    list of error lines itself (IPsec); either way a failure makes the loop retry with back-off."""
    if isinstance(res, list | tuple):
        return [str(e) for e in res]
    return [str(e) for e in getattr(res, "errors", None) or ()]


class Router:
    def __init__(self, args: argparse.Namespace, backend: Overlay, *, metadata_url: str, api_version: str) -> None:
        self.args = args
        self.backend = backend
        self.health = Health()
        self.topo: Topology | None = None
        self.metadata_url = metadata_url
        self.api_version = api_version
        self.loop: Reconciler[Topology] = Reconciler(
            backend.name, self.apply, daemon="overlay", health=self.health, debounce=args.debounce,
            refresh_interval=args.resync_interval, verify=self.verify, verify_interval=args.verify_interval)
        self.prober = Prober(self.on_peer_down, interval=args.probe_interval, misses=args.probe_misses)
        self.watch: MetadataWatch | None = None
        self._rules_due = True
        self._last_skipped: tuple[Any, ...] = ()

    # ------------------------------------------------------------------ metadata -> desired
    def on_snapshot(self, ms: MetadataSnapshot) -> None:
        topo = topology(ms.tree)
        if not topo.ok:
            _BAD.inc()
            log.error("metadata tree not usable, keeping the last good one", version=ms.version, error=topo.error)
            return
        if topo.duplicate_agent_ips:
            log.error("hosts share an agent IP; their entries are not programmed",
                      agent_ips=list(topo.duplicate_agent_ips))
        if topo.skipped != self._last_skipped:
            self._last_skipped = topo.skipped
            if topo.skipped:
                log.warning("remote entries skipped", count=len(topo.skipped), first=describe(topo.skipped[:5]))
        _PEERS.set(len(topo.routers))
        _REMOTE.set(len(topo.workloads))
        _SKIPPED.set(len(topo.skipped))
        _DUP.set(len(topo.duplicate_agent_ips))
        self.topo = topo
        self.prober.set_targets(topo.routers)
        self.loop.submit(topo)

    # ------------------------------------------------------------------ apply
    def rules(self) -> list[tuple[str, ...]]:
        """The gateway masquerade and the MSS clamp, as iptables arguments (table first)."""
        dev = getattr(self.backend, "device", "vtep1042")
        gateway = _bridge_ip(self.args.bridge) if self.args.bridge else self.args.gateway
        rules: list[tuple[str, ...]] = [("mangle", "FORWARD", "-o", dev, "-p", "tcp", "--tcp-flags", "SYN,RST", "SYN",
                                         "-j", "TCPMSS", "--clamp-mss-to-pmtu")]
        if gateway:
            rules.append(("nat", "POSTROUTING", "-o", dev, "-s", gateway, "-j", "MASQUERADE"))
        return rules

    async def missing_rules(self) -> list[tuple[str, ...]]:
        out = []
        for table, chain, *spec in self.rules():
            if (await _iptables("-t", table, "-C", chain, *spec))[0] != 0:
                out.append((table, chain, *spec))
        return out

    async def host_setup(self, topo: Topology) -> None:
        """Forwarding, proxy ARP on the bridge, the gateway masquerade and the MSS clamp."""
        _sysctl("net/ipv4/ip_forward", "1")
        # Proxy ARP answers for remote workloads (routed through the VTEP) on the side the local
        # containers ask from: the bridge in the host netns, the router's own interface in a
        # container netns (the original's ARP responder on eth0). Local IPs are never answered.
        dev = self.args.bridge or _device_of(topo.router_ip)
        if dev:
            _sysctl(f"net/ipv4/conf/{dev}/proxy_arp", "1")
            _sysctl(f"net/ipv4/neigh/{dev}/proxy_delay", "0")
        if not self._rules_due:
            return
        for table, chain, *spec in await self.missing_rules():
            rc, err = await _iptables("-t", table, "-A", chain, *spec)
            if rc != 0:
                raise TransportError(f"iptables -t {table} -A {chain} {' '.join(spec)}: {err}")
            log.info("iptables rule added", table=table, chain=chain, rule=" ".join(spec))
        self._rules_due = False

    async def apply(self, topo: Topology) -> None:
        await self.host_setup(topo)
        res = await self.backend.apply(topo)
        _WRITES.set(self.backend.writes)
        errors = apply_errors(res)
        if errors:
            raise TransportError(f"{len(errors)} entries failed, first: {errors[0]}")

    async def verify(self, topo: Topology) -> bool:
        """The kernel's entries and the iptables rules still as programmed (False: apply again)."""
        if await self.missing_rules():
            self._rules_due = True
            return False
        return await self.backend.in_sync(topo)

    def kernel_changed(self, reason: str) -> None:
        self.loop.kick(reason)

    async def on_peer_down(self, agent_ip: str) -> None:
        if self.topo is not None:
            n = await self.backend.repair_peer(self.topo, agent_ip)
            _WRITES.set(self.backend.writes)
            log.info("peer tunnel re-programmed", peer=agent_ip, writes=n)

    # ------------------------------------------------------------------ HTTP
    async def _ping(self, request: Any) -> Any:
        from aiohttp import web

        return web.Response(text="OK")

    async def _reload(self, request: Any) -> Any:
        from aiohttp import web

        if self.watch is not None:
            self.watch.refresh()
        before_ok, before_fail = self.loop.applied, self.loop.failures
        self.loop.kick("reload requested")
        for _ in range(500):
            if self.loop.applied > before_ok or self.loop.failures > before_fail or self.loop.current is None:
                break
            await asyncio.sleep(0.02)
        if self.loop.current is None:
            return web.Response(status=500, text="no metadata yet\n")
        if self.loop.failures > before_fail:
            return web.Response(status=500, text=f"{self.loop.last_error}\n")
        return web.Response(text="OK")

    async def _connectivity(self, request: Any) -> Any:
        from aiohttp import web

        peers = self.prober.report()
        return web.json_response({"peers": peers, "all_up": all(p["status"] == "up" for p in peers.values()),
                                  "writes": self.backend.writes})

    # ------------------------------------------------------------------ run
    async def serve(self, stop: asyncio.Event) -> None:
        a = self.args
        self.watch = MetadataWatch(self.metadata_url, api_version=self.api_version, component="overlay",
                                   state_file=a.metadata_state_file or None, stale_after=a.metadata_stale_after,
                                   max_wait=5, health=self.health)
        self.watch.subscribe(self.on_snapshot)
        admin = AdminServer(a.listen, self.health, flag="--listen",
                            extra={"/ping": self._ping, "/connectivity": self._connectivity})
        admin.app.router.add_route("*", "/v1/reload", self._reload)
        await admin.start()
        extra = None
        if a.metrics_listen:
            extra = AdminServer(a.metrics_listen, self.health)
            await extra.start()
        events = self.backend.watch(self.kernel_changed)
        events.start()
        log.info("overlay router started", backend=self.backend.name, metadata=self.metadata_url,
                 listen=f"{admin.host}:{admin.port}", bridge=a.bridge)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.watch.run(stop))
                tg.create_task(self.loop.run(stop))
                tg.create_task(self.prober.run(stop))
        finally:
            events.stop()
            await admin.stop()
            if extra is not None:
                await extra.stop()
            close = getattr(self.backend, "close", None)
            if close is not None:
                with contextlib.suppress(CorralError):
                    await close()
