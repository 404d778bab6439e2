"""The reaper: duplicate metadata/dns containers, and containers metadata does not know.

(b) More than one running container of ``network-services/metadata`` (or of its ``dns``
sidekick) on this host: the oldest are stopped (timeout 0), on a back-off of 1 s -> 5 min (x1.5).
(a) A container whose ``io.rancher.container.uuid`` label differs from metadata's ``uuid`` for
its Docker ID is reported; it is force-removed only with ``--reaper-remove`` (the original removed
it unconditionally - deleting containers from a network daemon surprises operators).
(c) Once per start, as the original's entrypoint did: every container labelled
``io.rancher.container.system=NetworkAgent`` (the pre-CNI network agent, running or not) is
force-removed - it would fight this daemon over the same rules and links.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

from agents.errors import CorralError
from agents.log import get_logger
from agents.metadata_client import Snapshot
from agents.metrics import counter

__all__ = ["Reaper", "duplicates", "legacy_agents", "uuid_mismatches"]

log = get_logger(__name__)
_REAPED = counter("netmanager", "reaped", "Containers stopped or removed by the reaper", ["why"])
SINGLETONS = ("network-services/metadata", "network-services/metadata/dns")


def duplicates(rows: Iterable[dict[str, Any]]) -> list[str]:
    """IDs to stop: all but the newest running container of each singleton service (pure)."""
    out: list[str] = []
    for name in SINGLETONS:
        mine = [r for r in rows if (r.get("Labels") or {}).get("io.rancher.stack_service.name") == name]
        mine.sort(key=lambda r: (int(r.get("Created") or 0), str(r.get("Id"))))
        out += [str(r["Id"]) for r in mine[:-1]]
    return out


def legacy_agents(rows: Iterable[dict[str, Any]]) -> list[str]:
    """IDs of the legacy ``NetworkAgent`` system containers, running or not (pure)."""
    return sorted(str(r.get("Id")) for r in rows
                  if (r.get("Labels") or {}).get("io.rancher.container.system") == "NetworkAgent")


def uuid_mismatches(snap: Snapshot, rows: Iterable[dict[str, Any]]) -> list[str]:
    """IDs of local containers whose uuid label is not metadata's uuid for that Docker ID (pure)."""
    me = snap.self_host.uuid if snap.self_host is not None else None
    known = {c.external_id: c.uuid for c in snap.containers if c.host_uuid == me and c.external_id}
    out = []
    for r in rows:
        cid = str(r.get("Id"))
        label = (r.get("Labels") or {}).get("io.rancher.container.uuid")
        if label and cid in known and known[cid] != label:
            out.append(cid)
    return out


class Reaper:
    def __init__(self, docker: Any, *, remove: bool = False) -> None:
        self.docker = docker
        self.remove = remove
        self.snapshot: Snapshot | None = None
        self.legacy_done = False
        self._kick = asyncio.Event()

    def on_snapshot(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self._kick.set()

    async def run(self, stop: asyncio.Event) -> None:
        delay = 1.0
        while not stop.is_set():
            acted = False
            try:
                acted = await self.once()
            except CorralError as e:
                log.warning("reaper pass failed", error=str(e))
            delay = 1.0 if acted else min(delay * 1.5, 300.0)
            self._kick.clear()
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._kick.wait())]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()

    async def once(self) -> bool:
        if not self.docker.connected:
            return False
        acted = False
        if not self.legacy_done:
            for cid in legacy_agents(await self.docker.all_containers()):
                log.warning("legacy NetworkAgent container, removing it", container=cid[:12])
                await self.docker.remove(cid)
                _REAPED.labels("network-agent").inc()
                acted = True
            self.legacy_done = True
        rows = await self.docker.running()
        for cid in duplicates(rows):
            log.warning("duplicate metadata/dns container, stopping the older one", container=cid[:12])
            await self.docker.stop(cid)
            _REAPED.labels("duplicate").inc()
            acted = True
        if self.snapshot is not None:
            for cid in uuid_mismatches(self.snapshot, rows):
                if self.remove:
                    log.warning("container unknown to metadata, removing it", container=cid[:12])
                    await self.docker.remove(cid)
                    _REAPED.labels("uuid-mismatch").inc()
                    acted = True
                else:
                    log.warning("container unknown to metadata (left alone; --reaper-remove removes it)",
                                container=cid[:12])
        return acted
