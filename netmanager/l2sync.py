"""The ARP, MAC and conntrack syncers: thin loops around the pure functions of ``l2.py``.

- ARP (``--arpsync-interval`` apart, on every metadata change and every 120 s): wrong neighbour
  entries of this namespace for containers of arpsync networks are replaced. When a router's MAC
  changes (and once at start) the same check runs on ``eth0`` inside every local running
  container of those networks, on ten consecutive passes.
- MAC (on every metadata change and every 15 s): ``eth0`` of the local running containers of
  macsync networks gets the container's ``primary_mac_address``. The original stopped after a
  few passes; here a container started later is fixed too.
- Conntrack (``--conntracksync-interval`` apart, whenever a new ruleset is in the kernel and every
  120 s): flows of host ports that reach a container other than the port's are deleted. The
  moment of a retarget is covered by the rules applier itself; this sweep catches what that
  cannot see: flows created while the daemon was down, or by another manager.

Container namespaces are reached as ``/proc/<pid>/ns/net`` of the PID the Docker API reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from agents.errors import CorralError
from agents.log import get_logger
from agents.metadata_client import Snapshot
from agents.metrics import counter
from netmanager.desired import Ruleset
from netmanager.l2 import (
    expected_macs,
    expected_neighbours,
    local_container_ids,
    neighbour_fixes,
    router_macs,
    stale_conntrack,
)
from netmanager.netlink import ensure_mac, local_addrs, neighbours, replace_neighbours, sweep_conntrack

__all__ = ["L2Syncers"]

log = get_logger(__name__)
_NEIGH = counter("netmanager", "neighbours_fixed", "Neighbour entries replaced by arpsync", ["where"])
_MACS = counter("netmanager", "macs_fixed", "Container eth0 MAC addresses set by macsync")
_SWEPT = counter("netmanager", "conntrack_swept", "Stale host-port conntrack flows deleted by the periodic sweep")
_PASSES = counter("netmanager", "l2_passes", "Passes of the ARP, MAC and conntrack syncers", ["syncer", "outcome"])

POLL = 120.0  # the original's long-poll period for these syncers
MAC_PERIOD = 15.0
CONTAINER_ARP_PASSES = 10


class L2Syncers:
    def __init__(self, docker: Any, *, arp_interval: float, conntrack_interval: float,
                 applied: Callable[[], Ruleset | None]) -> None:
        self.docker = docker  # DockerSource or None (no container namespaces then)
        self.arp_interval = arp_interval
        self.conntrack_interval = conntrack_interval
        self.applied = applied
        self.snapshot: Snapshot | None = None
        self._changed = {"arp": asyncio.Event(), "mac": asyncio.Event()}
        self._routers: dict[str, str] | None = None
        self._container_passes = 0

    def on_snapshot(self, snap: Snapshot) -> None:
        self.snapshot = snap
        for ev in self._changed.values():
            ev.set()

    async def _pid_netns(self, cid: str) -> str | None:
        if self.docker is None or not self.docker.connected:
            return None
        info = await self.docker.inspect(cid)
        pid = int(((info or {}).get("State") or {}).get("Pid") or 0)
        return f"/proc/{pid}/ns/net" if pid else None

    @staticmethod
    async def _wait(stop: asyncio.Event, ev: asyncio.Event | None, timeout: float) -> None:
        waits = [asyncio.ensure_future(stop.wait())]
        if ev is not None:
            waits.append(asyncio.ensure_future(ev.wait()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait(waits, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()

    async def _loop(self, stop: asyncio.Event, name: str, period: float, gap: float,
                    ev: asyncio.Event | None, once: Callable[[], Any]) -> None:
        """Run ``once`` on ``ev`` or every ``period``, never less than ``gap`` apart."""
        last = -gap
        while not stop.is_set():
            wait = gap - (time.monotonic() - last)
            if wait > 0:
                await self._wait(stop, None, wait)
                if stop.is_set():
                    return
            if ev is not None:
                ev.clear()
            last = time.monotonic()
            again = False
            try:
                again = bool(await once())
                _PASSES.labels(name, "ok").inc()
            except CorralError as e:
                _PASSES.labels(name, "error").inc()
                log.warning(f"{name}sync pass failed", error=str(e))
            await self._wait(stop, ev, gap if again else period)

    # ------------------------------------------------------------------ ARP
    async def arp_once(self) -> bool:
        """One pass; True when container namespaces still need passes."""
        snap = self.snapshot
        if snap is None:
            return False
        want = expected_neighbours(snap)
        if want:
            fixes = neighbour_fixes(await neighbours(), want)
            if fixes:
                await replace_neighbours(fixes)
                _NEIGH.labels("host").inc(len(fixes))
                log.info("neighbour entries corrected", entries=[f"{f.ip} {f.mac}" for f in fixes][:20])
        routers = router_macs(snap)
        if routers != self._routers:
            self._routers = routers
            self._container_passes = CONTAINER_ARP_PASSES if routers else 0
        if self._container_passes <= 0 or self.docker is None:
            return False
        if not self.docker.connected:
            return True  # again soon: the Docker API gives the namespaces
        self._container_passes -= 1
        for cid in local_container_ids(snap, routers):
            ns = await self._pid_netns(cid)
            if ns is None:
                continue
            try:
                fixes = neighbour_fixes(await neighbours(ns, "eth0"), want)
                await replace_neighbours(fixes, ns)
            except CorralError as e:  # the container went away meanwhile: the others still get theirs
                log.info("container neighbour check skipped", container=cid[:12], error=str(e))
                continue
            if fixes:
                _NEIGH.labels("container").inc(len(fixes))
                log.info("container neighbour entries corrected", container=cid[:12],
                         entries=[f"{f.ip} {f.mac}" for f in fixes][:20])
        return self._container_passes > 0

    async def arpsync(self, stop: asyncio.Event) -> None:
        await self._loop(stop, "arp", POLL, self.arp_interval, self._changed["arp"], self.arp_once)

    # ------------------------------------------------------------------ MAC
    async def mac_once(self) -> bool:
        snap = self.snapshot
        if snap is None:
            return False
        want = expected_macs(snap)
        if want and not self.docker.connected:
            return True  # again soon: the Docker API gives the namespaces
        for cid, mac in want.items():
            ns = await self._pid_netns(cid)
            if ns is None:
                continue
            try:
                old = await ensure_mac(ns, "eth0", mac)
            except CorralError as e:
                log.info("container MAC check skipped", container=cid[:12], error=str(e))
                continue
            if old is not None:
                _MACS.inc()
                log.info("container MAC corrected", container=cid[:12], was=old, now=mac)
        return False

    async def macsync(self, stop: asyncio.Event) -> None:
        await self._loop(stop, "mac", MAC_PERIOD, 1.0, self._changed["mac"], self.mac_once)

    # ------------------------------------------------------------------ conntrack
    async def conntrack_once(self) -> bool:
        rs = self.applied()
        if rs is None:
            return False
        addrs = await local_addrs()
        n, seen = await sweep_conntrack(
            lambda flows: stale_conntrack(flows, rs.bindings, local_addrs=addrs, exclude=rs.conntrack_exclude))
        if n:
            _SWEPT.inc(n)
            log.info("stale host-port conntrack flows swept", deleted=n, natted_flows=seen)
        return False

    async def conntracksync(self, stop: asyncio.Event) -> None:
        """A sweep whenever a new ruleset is in the kernel (checked every second) and every 120 s."""
        moved = asyncio.Event()

        async def watch() -> None:
            seen: Ruleset | None = None
            while not stop.is_set():
                rs = self.applied()
                if rs is not None and rs is not seen:
                    seen = rs
                    moved.set()
                await self._wait(stop, None, 1.0)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(watch())
            await self._loop(stop, "conntrack", POLL, self.conntrack_interval, moved, self.conntrack_once)
