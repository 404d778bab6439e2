"""Cross-host overlay networking (rancher-net's VXLAN wire format), one router per host.

Data flow: metadata tree -> :func:`peers.topology` (pure: remote hosts, their routers and workloads)
-> the backend's pure desired state -> a diff against the kernel -> netlink. A backend is anything
that satisfies :class:`Overlay`; :data:`BACKENDS` maps ``--backend`` names to constructors, so an
IPsec backend is a new module plus one entry, not a change to the router.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from netmanager.overlay.peers import Topology

__all__ = ["BACKENDS", "Overlay"]


class Overlay(Protocol):
    """What :class:`netmanager.overlay.router.Router` needs from a backend."""

    name: str
    writes: int  # kernel writes since start (a no-op reconcile adds 0)

    async def apply(self, topo: Topology) -> Any:
        """Make the kernel match ``topo``; raise after trying every entry if any failed."""

    async def in_sync(self, topo: Topology) -> bool:
        """Cheap drift check against ``topo`` (False: apply again)."""

    async def repair_peer(self, topo: Topology, agent_ip: str) -> int:
        """A peer stopped answering probes: re-program its tunnel (FDB entry / CHILD SA)."""

    def watch(self, on_change: Callable[[str], None]) -> Any:
        """An object with ``start()``/``stop()`` calling ``on_change(reason)`` when owned kernel state moves."""

    async def close(self) -> None:
        """Release sockets and helpers at exit (called once when the router stops)."""


def _vxlan(**kw: Any) -> Overlay:
    from netmanager.overlay.vxlan import VxlanBackend

    return VxlanBackend(**kw)


def _ipsec(**kw: Any) -> Overlay:
    from netmanager.overlay.charon import make_backend

    return make_backend(**kw)


BACKENDS: dict[str, Callable[..., Overlay]] = {"vxlan": _vxlan, "ipsec": _ipsec}
"""Backend name -> constructor."""
