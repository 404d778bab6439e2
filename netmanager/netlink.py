"""Kernel adapter for all but iptables: routes, links, neighbours, conntrack, the NAT ipset, sysctls.

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
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from agents.errors import TransportError
from agents.log import get_logger
from netmanager.desired import NAT_IPSET, FlowFilter, Route
from netmanager.l2 import Flow, Neighbour

__all__ = [
    "NftGeneration", "RouteState", "delete_flows", "delete_link", "ensure_ipset", "ensure_mac", "ensure_route",
    "link_index", "local_addrs", "neighbours", "replace_neighbours", "route_state", "set_sysctl", "sweep_conntrack",
    "veth_ports",
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


# ---------------------------------------------------------------- layer 2 and the conntrack sweep

_NUD_REACHABLE = 0x02
_NUD_NOARP = 0x40
_CLONE_NEWNET = 0x40000000


def _ipr(netns: str | None) -> Any:
    """An AsyncIPRoute of this namespace, or of ``netns`` (a path such as ``/proc/<pid>/ns/net``).

    The socket is opened inside ``netns`` by this (netlink) thread switching there and back with
    setns(2) around ``socket()`` - no await in between, so nothing else on the thread runs in the
    wrong namespace. (pyroute2's own ``netns=`` forks a helper process from this threaded one.)
    """
    import ctypes
    import os
    import socket

    from pyroute2 import AsyncIPRoute

    if netns is None:
        return AsyncIPRoute()
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(netns, os.O_RDONLY)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {netns}: {os.strerror(ctypes.get_errno())}")
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0)  # NETLINK_ROUTE
            finally:
                if libc.setns(own, _CLONE_NEWNET) != 0:  # cannot stay elsewhere: the daemon's own sockets
                    os.abort()
        finally:
            os.close(target)
    finally:
        os.close(own)
    return AsyncIPRoute(use_socket=sock)


async def _neighbours(netns: str | None, ifname: str | None) -> list[Neighbour]:
    async with _ipr(netns) as ipr:
        only = None
        if ifname is not None:
            found = await ipr.link_lookup(ifname=ifname)
            if not found:
                return []
            only = found[0]
        out = []
        async for n in await ipr.neigh("dump", family=2):
            if n["state"] & _NUD_NOARP or (only is not None and n["ifindex"] != only):
                continue
            dst = n.get_attr("NDA_DST")
            if dst:
                out.append(Neighbour(str(dst), str(n.get_attr("NDA_LLADDR") or "").lower(), int(n["ifindex"])))
    return out


async def neighbours(netns: str | None = None, ifname: str | None = None) -> list[Neighbour]:
    """IPv4 neighbour entries (NOARP ones left out) of this namespace or of ``netns`` (a path)."""
    try:
        return await _NL.run(_neighbours(netns, ifname))
    except Exception as e:
        raise TransportError(f"netlink neighbour dump{' in ' + netns if netns else ''}: {e}") from e


async def replace_neighbours(fixes: list[Neighbour], netns: str | None = None) -> None:
    """``ip neigh replace <ip> lladdr <mac> dev <ifindex> nud reachable`` for each."""
    async def go() -> None:
        async with _ipr(netns) as ipr:
            for f in fixes:
                await ipr.neigh("replace", dst=f.ip, lladdr=f.mac, ifindex=f.ifindex, state=_NUD_REACHABLE)

    if fixes:
        try:
            await _NL.run(go())
        except Exception as e:
            raise TransportError(f"netlink neighbour replace: {e}") from e


async def ensure_mac(netns: str, ifname: str, mac: str) -> str | None:
    """Set ``ifname``'s MAC inside ``netns`` (a path) to ``mac`` when it differs (case-insensitive).
    Returns the MAC it had when it was changed, else None (already right, or no such link)."""
    async def go() -> str | None:
        async with _ipr(netns) as ipr:
            found = await ipr.link_lookup(ifname=ifname)
            if not found:
                return None
            links = await ipr.link("get", index=found[0])  # a list, not a stream
            have = str(links[0].get_attr("IFLA_ADDRESS") or "").lower()
            if have == mac.lower():
                return None
            await ipr.link("set", index=found[0], address=mac)
            return have

    try:
        return await _NL.run(go())
    except Exception as e:
        raise TransportError(f"netlink set {ifname} address in {netns}: {e}") from e


async def _local_addrs() -> list[str]:
    from pyroute2 import AsyncIPRoute

    async with AsyncIPRoute() as ipr:
        return [str(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS"))
                async for a in await ipr.addr("dump", family=2)]


async def local_addrs() -> list[str]:
    """This namespace's own IPv4 addresses."""
    try:
        return await _NL.run(_local_addrs())
    except Exception as e:
        raise TransportError(f"netlink address dump: {e}") from e


async def _sweep(select: Callable[[list[Flow]], list[Flow]]) -> tuple[int, int]:
    from pyroute2.conntrack import AsyncConntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import IPS_DST_NAT, IPS_SRC_NAT

    ct = AsyncConntrack()
    try:
        entries, flows = [], []
        async for e in await ct.dump_entries():
            o, r = e.tuple_orig, e.tuple_reply
            if o.proto not in (6, 17) or not o.daddr or ":" in str(o.daddr):
                continue
            status = int(e.status or 0)
            if not status & (IPS_DST_NAT | IPS_SRC_NAT):
                continue
            entries.append(e)
            flows.append(Flow(int(o.proto), str(o.saddr), str(o.daddr), int(o.dport or 0), str(r.saddr),
                              str(r.daddr), int(r.dport or 0), bool(status & IPS_DST_NAT),
                              bool(status & IPS_SRC_NAT)))
        doomed = {id(f) for f in select(flows)}
        n = 0
        for e, f in zip(entries, flows, strict=True):
            if id(f) in doomed:
                with contextlib.suppress(Exception):  # already gone
                    await ct.delete(e)
                    n += 1
        return n, len(flows)
    finally:
        ct.close()


async def sweep_conntrack(select: Callable[[list[Flow]], list[Flow]]) -> tuple[int, int]:
    """Dump the NATed IPv4 TCP/UDP flows, delete those ``select`` returns; (deleted, looked at)."""
    try:
        return await _NL.run(_sweep(select))
    except Exception as e:
        raise TransportError(f"conntrack sweep: {e}") from e
