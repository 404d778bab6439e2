"""Kernel adapter for everything but iptables: routes, links, the host-NAT ipset and sysctls.

The only module of Corral's daemons that imports pyroute2 (netlink, never text parsing).
pyroute2's async classes run on a private standard asyncio loop in one worker thread (see
:class:`_NetlinkLoop`). Library errors come out as :class:`TransportError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import subprocess
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from agents.errors import TransportError
from agents.log import get_logger
from netmanager.desired import NAT_IPSET, FlowFilter, Route

__all__ = [
    "NftGeneration", "RouteState", "delete_flows", "delete_link", "ensure_ipset", "ensure_route", "link_index",
    "route_state", "set_sysctl", "veth_ports",
]

log = get_logger(__name__)
T = TypeVar("T")


class _NetlinkLoop:
    """One worker thread running a plain asyncio loop for pyroute2.

    The daemon runs on uvloop, whose datagram endpoints refuse AF_NETLINK ("invalid family
    16"); pyroute2's async classes therefore run on their own standard selector loop in this
    thread, and the daemon awaits them through ``run_coroutine_threadsafe``.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self.loop is None:
                loop = asyncio.SelectorEventLoop()
                threading.Thread(target=loop.run_forever, name="netlink", daemon=True).start()
                self.loop = loop
            return self.loop

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._start()))


_NL = _NetlinkLoop()


async def _ipset_create(name: str) -> None:
    from pyroute2.ipset import AsyncIPSet

    s = AsyncIPSet()
    try:
        await s.setup_endpoint()  # negotiates the ipset protocol version
        await s.create(name, stype="hash:net", exclusive=False)
    finally:
        s.close()


async def ensure_ipset(name: str = NAT_IPSET) -> None:
    """``ipset create --exist <name> hash:net``: operators list SNAT-exempt CIDRs there."""
    try:
        await _NL.run(_ipset_create(name))
    except Exception as e:
        raise TransportError(f"ipset {name}: {e}") from e


def set_sysctl(key: str, value: str, *, load_module: str = "") -> bool:
    """Write ``/proc/sys/<key>`` (dots -> slashes; interface names keep their dots).

    Returns False when the key does not exist even after ``modprobe load_module``.
    """
    parts = key.split(".")
    if parts[:3] == ["net", "ipv4", "conf"] and len(parts) > 5:
        parts = [*parts[:3], ".".join(parts[3:-1]), parts[-1]]
    path = Path("/proc/sys", *parts)
    if not path.exists() and load_module:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["modprobe", load_module], check=False, capture_output=True, timeout=10)
    try:
        if path.read_text().strip() != value:
            path.write_text(value)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise TransportError(f"sysctl {key}={value}: {e}") from e
    return True


async def _link_index(name: str) -> int | None:
    from pyroute2 import AsyncIPRoute

    async with AsyncIPRoute() as ipr:
        found = await ipr.link_lookup(ifname=name)
    return found[0] if found else None


async def link_index(name: str) -> int | None:
    try:
        return await _NL.run(_link_index(name))
    except Exception as e:
        raise TransportError(f"netlink link lookup {name}: {e}") from e


class RouteState:
    OK = "ok"
    MISSING = "missing"
    NO_LINK = "no-link"
    CONFLICT = "conflict"


async def _routes_to(ipr: Any, dst: str) -> list[Any]:
    net = ipaddress.IPv4Network(dst)
    out = []
    dump = await ipr.route("dump", family=2)
    async for r in dump:
        if r.get("dst") == str(net.network_address) and r["dst_len"] == net.prefixlen \
                and r.get("table", 254) == 254:
            out.append(r)
    return out


async def _route_state(route: Route) -> str:
    from pyroute2 import AsyncIPRoute

    async with AsyncIPRoute() as ipr:
        idx = await ipr.link_lookup(ifname=route.dev)
        if not idx:
            return RouteState.NO_LINK
        routes = await _routes_to(ipr, route.dst)
    if not routes:
        return RouteState.MISSING
    return RouteState.OK if any(r.get("oif") == idx[0] for r in routes) else RouteState.CONFLICT


async def route_state(route: Route) -> str:
    try:
        return await _NL.run(_route_state(route))
    except Exception as e:
        raise TransportError(f"netlink route dump: {e}") from e


async def ensure_route(route: Route) -> str:
    """``ip route replace <dst> dev <dev> scope global``; returns the state before the change."""
    from pyroute2 import AsyncIPRoute

    state = await route_state(route)
    if state in (RouteState.OK, RouteState.NO_LINK):
        return state
    if state == RouteState.CONFLICT:
        log.warning("metadata route points elsewhere, replacing", dst=route.dst, dev=route.dev)
    async def replace() -> None:
        async with AsyncIPRoute() as ipr:
            idx = (await ipr.link_lookup(ifname=route.dev))[0]
            await ipr.route("replace", dst=route.dst, oif=idx, scope=0)

    try:
        await _NL.run(replace())
    except Exception as e:
        if isinstance(e, OSError) and e.errno == errno.ENODEV:
            return RouteState.NO_LINK
        raise TransportError(f"netlink route replace {route.dst} dev {route.dev}: {e}") from e
    return state


class NftGeneration:
    """The nf_tables ruleset generation id: bumps on every commit by anyone (~0.4 ms to read),
    so drift can be noticed without dumping 25k rules. Only for the nft backend."""

    def __init__(self) -> None:
        self._sock: Any = None

    async def _read(self) -> int:
        from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_GETGEN, AsyncNFTSocket, nft_gen_msg

        if self._sock is None:
            self._sock = AsyncNFTSocket()
        msgs = [m async for m in await self._sock.request_get(nft_gen_msg(), NFT_MSG_GETGEN)]
        return int(msgs[0].get_attr("NFTA_GEN_ID"))

    async def read(self) -> int:
        try:
            return await _NL.run(self._read())
        except Exception as e:
            self.close()
            raise TransportError(f"nf_tables generation: {e}") from e

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(Exception):
                sock.close()


_PROTO = {"tcp": 6, "udp": 17}


async def _delete_flows(filters: tuple[FlowFilter, ...], exclude: str) -> int:
    from pyroute2.conntrack import AsyncConntrack

    skip = ipaddress.IPv4Network(exclude, strict=False) if exclude else None
    by_port: dict[tuple[int, int], list[FlowFilter]] = {}
    for f in filters:
        by_port.setdefault((_PROTO[f.proto], f.dport), []).append(f)
    n = 0
    ct = AsyncConntrack()
    try:
        doomed = []
        async for e in await ct.dump_entries():  # one dump, whatever the number of moved ports
            o, r = e.tuple_orig, e.tuple_reply
            cands = by_port.get((o.proto, o.dport))
            if not cands or r.saddr == o.daddr:
                continue  # not a moved port, or not DNATed: not one of ours
            if skip is not None and ipaddress.IPv4Address(o.daddr) in skip:
                continue  # Kubernetes cluster IPs (rancher/rancher#10288)
            for f in cands:
                if (f.daddr is None or f.daddr == o.daddr) and (f.keep_src is None or r.saddr != f.keep_src):
                    doomed.append(e)
                    break
        for e in doomed:
            with contextlib.suppress(Exception):  # already gone
                await ct.delete(e)
                n += 1
    finally:
        ct.close()
    return n


async def delete_flows(filters: tuple[FlowFilter, ...], exclude: str = "") -> int:
    """Delete the conntrack flows ``filters`` describe (netlink, never ``conntrack -L`` text)."""
    if not filters:
        return 0
    try:
        return await _NL.run(_delete_flows(filters, exclude))
    except Exception as e:
        raise TransportError(f"conntrack clean-up: {e}") from e


async def _veth_ports() -> list[tuple[str, str]]:
    from pyroute2 import AsyncIPRoute

    async with AsyncIPRoute() as ipr:
        links = [x async for x in await ipr.link("dump")]
    names = {ln["index"]: ln.get_attr("IFLA_IFNAME") for ln in links}
    out = []
    for ln in links:
        info = ln.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        master = ln.get_attr("IFLA_MASTER")
        if kind == "veth" and master:
            out.append((str(ln.get_attr("IFLA_IFNAME")), str(names.get(master, ""))))
    return out


async def veth_ports() -> list[tuple[str, str]]:
    """(name, bridge) of every veth enslaved to a bridge."""
    try:
        return await _NL.run(_veth_ports())
    except Exception as e:
        raise TransportError(f"netlink link dump: {e}") from e


async def delete_link(name: str) -> None:
    from pyroute2 import AsyncIPRoute

    async def go() -> None:
        async with AsyncIPRoute() as ipr:
            idx = await ipr.link_lookup(ifname=name)
            if idx:
                await ipr.link("del", index=idx[0])

    try:
        await _NL.run(go())
    except Exception as e:
        raise TransportError(f"netlink delete {name}: {e}") from e
