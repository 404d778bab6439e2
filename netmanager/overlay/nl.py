"""The overlay's kernel adapter: the VTEP link through pyroute2, its entries through one batched socket.

Links (create, compare, MAC, MTU, up, the host-mode address) and the underlay route lookup go
through pyroute2's ``IPRoute``. Routes, neighbours and FDB entries are many (10k+ at 500 hosts) and
pyroute2 answers each request in about a millisecond here, so they are written the way ``ip -batch``
writes them: rtnetlink messages packed back to back on one ``NETLINK_ROUTE`` socket, each with its
own sequence number and ``NLM_F_ACK``, so every entry gets its own answer (one failing entry never
stops the others). Dumps are decoded with ``struct`` for the same reason, straight from one reused
receive buffer, reading only the attributes needed; with strict dump checking (Linux >= 4.20) they
are filtered by the kernel to the VTEP (and the main table for routes), so a host's other
neighbours and routes never reach Python. Nothing here parses command output.

:class:`EventWatch` listens on the link, neighbour and IPv4 route groups and reports any change to
the VTEP (an external ``ip neigh flush``, a deleted FDB entry or link) so the router repairs it at once.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agents.errors import TransportError
from agents.log import get_logger

# pyroute2's async classes run on netmanager's standard loop in one thread (uvloop refuses netlink)
from netmanager.netlink import _NL
from netmanager.nlattr import ATTR
from netmanager.nlattr import attr as _attr
from netmanager.nlattr import attrs as _attrs

if TYPE_CHECKING:
    from netmanager.overlay.vxlan import VtepSpec, VxlanState

__all__ = ["EventWatch", "Netlink", "Op", "fdb_op", "neigh_op", "route_op"]

log = get_logger(__name__)

NETLINK_ROUTE = 0
SOL_NETLINK = 270
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NLMSG_ERROR, NLMSG_DONE = 2, 3
F_REQUEST, F_ACK, F_DUMP = 0x1, 0x4, 0x300
F_REPLACE, F_EXCL, F_CREATE, F_APPEND = 0x100, 0x200, 0x400, 0x800
AF_BRIDGE = 7
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NDA_DST, NDA_LLADDR, NDA_IFINDEX = 1, 2, 8
NETLINK_GET_STRICT_CHK = 12
NUD_PERMANENT, NUD_NOARP = 0x80, 0x40
NTF_SELF = 0x02
RT_TABLE_MAIN = 254
RTNH_F_ONLINK = 4
RTPROT_KERNEL, RTPROT_BOOT = 2, 3
RTN_UNICAST = 1
RT_SCOPE_NOWHERE = 255
GROUPS = 0x1 | 0x4 | 0x40  # RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE
_HDR = struct.Struct("=LHHLL")
_RT = struct.Struct("=BBBBBBBBI")
_ND = struct.Struct("=BxxxiHBB")
_IFI = struct.Struct("=BxHiII")
# The answers' usual layouts, read in one call (any other layout takes the attribute walk):
# neighbour: ndmsg, NDA_DST (4), NDA_LLADDR (6); FDB: ndmsg, NDA_LLADDR, NDA_DST;
# route: rtmsg, RTA_TABLE, RTA_DST, RTA_OIF and nothing else (no gateway).
_NEIGH_FAST = struct.Struct("=BxxxiHBB HH4s HH6sxx")
_FDB_FAST = struct.Struct("=BxxxiHBB HH6sxx HH4s")
_ROUTE_FAST = struct.Struct("=BBBBBBBBI HHI HH4s HHI")
_CHUNK = 48 * 1024
OVERFLOW = "netlink events overflowed"  # events were lost: what was programmed is no longer known
_TABLE_MAIN = struct.pack("=HHI", 8, 15, 254)  # RTA_TABLE main


def _mac(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _mac_str(b: bytes | bytearray | memoryview) -> str:
    return ":".join(f"{x:02x}" for x in b)


def _pair(buf: bytearray, off: int, end: int, a: int, b: int) -> tuple[bytes | None, bytes | None]:
    """Attributes ``a`` and ``b`` (None when absent); the walk stops once both are found - in a
    neighbour or FDB answer they are the first two."""
    va = vb = None
    unpack = ATTR.unpack_from
    while off + 4 <= end:
        n, t = unpack(buf, off)
        if n < 4:
            break
        t &= 0x3FFF
        if t == a:
            va = bytes(buf[off + 4:off + n])
            if vb is not None:
                break
        elif t == b:
            vb = bytes(buf[off + 4:off + n])
            if va is not None:
                break
        off += (n + 3) & ~3
    return va, vb


@dataclass(frozen=True)
class Op:
    """One rtnetlink write: its message type, flags and body (built by the *_op helpers)."""

    kind: str        # "route" | "neigh" | "fdb"
    add: bool
    key: str
    type: int
    flags: int
    body: bytes

    def describe(self) -> str:
        return f"{'add' if self.add else 'del'} {self.kind} {self.key}"


def route_op(add: bool, route: str, ifindex: int) -> Op:
    """``route`` is ``a.b.c.d/len`` (scope global) or ``a.b.c.d/len via g`` (gateway ``g``,
    ``onlink``: the per-host-subnet mode's route); ``replace`` semantics on add."""
    dst, _, gw = route.partition(" via ")
    addr, _, plen = dst.partition("/")
    prefixlen = int(plen or 32)
    attrs = _TABLE_MAIN + _attr(RTA_DST, socket.inet_aton(addr)) + _attr(RTA_OIF, struct.pack("=I", ifindex))
    flags = 0
    if gw:
        attrs += _attr(RTA_GATEWAY, socket.inet_aton(gw))
        flags = RTNH_F_ONLINK
    if add:
        hdr = _RT.pack(socket.AF_INET, prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, 0, RTN_UNICAST, flags)
        return Op("route", True, route, RTM_NEWROUTE, F_CREATE | F_REPLACE, hdr + attrs)
    hdr = _RT.pack(socket.AF_INET, prefixlen, 0, 0, RT_TABLE_MAIN, 0, RT_SCOPE_NOWHERE, 0, 0)
    return Op("route", False, route, RTM_DELROUTE, 0, hdr + attrs)


def neigh_op(add: bool, ip: str, mac: str, ifindex: int) -> Op:
    """Permanent ARP entry ``ip lladdr mac``; ``replace`` semantics on add."""
    dst = _attr(NDA_DST, socket.inet_aton(ip))
    if add:
        body = _ND.pack(socket.AF_INET, ifindex, NUD_PERMANENT, 0, 0) + dst + _attr(NDA_LLADDR, _mac(mac))
        return Op("neigh", True, f"{ip} lladdr {mac}", RTM_NEWNEIGH, F_CREATE | F_REPLACE, body)
    return Op("neigh", False, ip, RTM_DELNEIGH, 0, _ND.pack(socket.AF_INET, ifindex, 0, 0, 0) + dst)


def fdb_op(add: bool, mac: str, dst: str, ifindex: int) -> Op:
    """``bridge fdb append <mac> dev <vtep> dst <dst> self permanent`` (or its delete)."""
    body = _ND.pack(AF_BRIDGE, ifindex, NUD_PERMANENT, NTF_SELF, 0) + _attr(NDA_LLADDR, _mac(mac)) \
        + _attr(NDA_DST, socket.inet_aton(dst))
    if add:
        return Op("fdb", True, f"{mac} dst {dst}", RTM_NEWNEIGH, F_CREATE | F_APPEND, body)
    return Op("fdb", False, f"{mac} dst {dst}", RTM_DELNEIGH, 0, body)


def _ok(op: Op, err: int) -> bool:
    if err == 0:
        return True
    if op.add:
        return err == errno.EEXIST
    return err in (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL)


class _Socket:
    """A blocking NETLINK_ROUTE socket for batched writes and dumps (used from one worker thread)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        # SO_SNDBUFFORCE / SO_RCVBUFFORCE (root), else the plain sizes
        for force, plain in ((32, socket.SO_SNDBUF), (33, socket.SO_RCVBUF)):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, force, 4 << 20)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, plain, 4 << 20)
        self.sock.bind((0, 0))
        # strict dump requests: the kernel filters by device and table (Linux >= 4.20)
        try:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            self.strict = True
        except OSError:
            self.strict = False
        self.buf = bytearray(1 << 20)
        self.seq = int(time.time()) & 0xFFFFFF

    def close(self) -> None:
        self.sock.close()

    def _recv(self) -> Iterator[tuple[int, int, bytes, int]]:
        """(type, seq, payload, 0) for each message of one datagram."""
        data = self.sock.recv(1 << 20)
        off = 0
        while off + 16 <= len(data):
            n, t, _f, seq, _pid = _HDR.unpack_from(data, off)
            if n < 16:
                break
            yield t, seq, data[off + 16:off + n], 0
            off += (n + 3) & ~3

    def batch(self, ops: list[Op]) -> list[str]:
        """Send every op, each acknowledged on its own; '' for success, else the error text."""
        out = [""] * len(ops)
        i = 0
        while i < len(ops):
            buf = bytearray()
            first = self.seq + 1
            j = i
            while j < len(ops) and len(buf) < _CHUNK:
                self.seq += 1
                op = ops[j]
                buf += _HDR.pack(16 + len(op.body), op.type, F_REQUEST | F_ACK | op.flags, self.seq, 0) + op.body
                j += 1
            self.sock.sendall(bytes(buf))
            waiting = j - i
            while waiting:
                for t, seq, payload, _ in self._recv():
                    k = seq - first + i
                    if t != NLMSG_ERROR or not i <= k < j:
                        continue
                    err = -struct.unpack_from("=i", payload, 0)[0]
                    if not _ok(ops[k], err):
                        out[k] = os.strerror(err)
                    waiting -= 1
            i = j
        return out

    def dump(self, type_: int, body: bytes) -> Iterator[tuple[bytearray, int, int]]:
        """(buffer, payload offset, payload end) for each answer of one dump.

        The buffer is reused by the next datagram: read what you need before asking for more.
        Nothing is copied per message (a 500-host read-back is 20k messages)."""
        self.seq += 1
        seq = self.seq
        self.sock.sendall(_HDR.pack(16 + len(body), type_, F_REQUEST | F_DUMP, seq, 0) + body)
        buf, unpack = self.buf, _HDR.unpack_from
        while True:
            size = self.sock.recv_into(buf)
            off = 0
            while off + 16 <= size:
                n, t, _flags, s, _pid = unpack(buf, off)
                if n < 16:
                    break
                if s == seq:
                    if t == NLMSG_DONE:
                        return
                    if t == NLMSG_ERROR:
                        err = -struct.unpack_from("=i", buf, off + 16)[0]
                        if err:
                            raise TransportError(f"netlink dump: {os.strerror(err)}")
                        return
                    yield buf, off + 16, off + n
                off += (n + 3) & ~3


class Netlink:
    """Everything the VXLAN backend asks of the kernel. Blocking; callers use ``asyncio.to_thread``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: _Socket | None = None

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _s(self) -> _Socket:
        if self._sock is None:
            self._sock = _Socket()
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ---------------------------------------------------------------- entries
    def batch(self, ops: list[Op]) -> list[str]:
        with self._lock:
            try:
                return self._s().batch(ops)
            except OSError as e:
                self._reset()
                raise TransportError(f"netlink batch: {e}") from e

    def read_vtep(self, ifindex: int) -> VxlanState:
        """Permanent FDB entries with a dst, permanent neighbours, and main-table routes on the device."""
        from netmanager.overlay.vxlan import VxlanState

        with self._lock:
            try:
                return VxlanState(fdb=frozenset(self._fdb(ifindex)), neigh=self._neigh(ifindex),
                                  routes=frozenset(self._routes(ifindex)))
            except OSError as e:
                self._reset()
                raise TransportError(f"netlink dump: {e}") from e

    def _fdb(self, ifindex: int) -> list[tuple[str, str]]:
        sock = self._s()
        # strict: the kernel dumps only this device's FDB (ndm_ifindex); else every device's
        req = _ND.pack(AF_BRIDGE, ifindex if sock.strict else 0, 0, 0, 0)
        out = []
        unpack, fast, ntoa = _ND.unpack_from, _FDB_FAST.unpack_from, socket.inet_ntoa
        for buf, p, end in sock.dump(RTM_GETNEIGH, req):
            if end - p >= _FDB_FAST.size:
                _fam, idx, state, _f, _t, ln, lt, mac, dn, dt, dst = fast(buf, p)
                if ln == 10 and lt == NDA_LLADDR and dn == 8 and dt == NDA_DST:
                    if idx == ifindex and state & NUD_PERMANENT:
                        out.append((mac.hex(":"), ntoa(dst)))
                    continue
            _fam, idx, state, _flags, _t = unpack(buf, p)
            if idx != ifindex or not state & NUD_PERMANENT:
                continue
            mac, dst = _pair(buf, p + _ND.size, end, NDA_LLADDR, NDA_DST)
            if dst is not None and mac is not None and len(dst) == 4:
                out.append((mac.hex(":"), ntoa(dst)))
        return out

    def _neigh(self, ifindex: int) -> dict[str, str]:
        sock = self._s()
        req = _ND.pack(socket.AF_INET, 0, 0, 0, 0) + _attr(NDA_IFINDEX, struct.pack("=I", ifindex))
        out = {}
        unpack, fast, ntoa = _ND.unpack_from, _NEIGH_FAST.unpack_from, socket.inet_ntoa
        for buf, p, end in sock.dump(RTM_GETNEIGH, req):
            if end - p >= _NEIGH_FAST.size:
                _fam, idx, state, _f, _t, dn, dt, dst, ln, lt, mac = fast(buf, p)
                if dn == 8 and dt == NDA_DST and ln == 10 and lt == NDA_LLADDR:
                    if idx == ifindex and state & NUD_PERMANENT:
                        out[ntoa(dst)] = mac.hex(":")
                    continue
            _fam, idx, state, _flags, _t = unpack(buf, p)
            if idx != ifindex or not state & NUD_PERMANENT:
                continue
            dst, mac = _pair(buf, p + _ND.size, end, NDA_DST, NDA_LLADDR)
            if dst is not None:
                out[ntoa(dst)] = mac.hex(":") if mac else ""
        return out

    def _routes(self, ifindex: int) -> list[str]:
        sock = self._s()
        oif = struct.pack("=I", ifindex)
        filtered = sock.strict
        if filtered:  # main table, unicast, this device: filtered by the kernel
            req = _RT.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, 0, 0, RTN_UNICAST, 0) + _attr(RTA_OIF, oif)
        else:
            req = _RT.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        out = []
        unpack, fast, ntoa, attr = _RT.unpack_from, _ROUTE_FAST.unpack_from, socket.inet_ntoa, ATTR.unpack_from
        for buf, p, end in sock.dump(RTM_GETROUTE, req):
            if end - p == _ROUTE_FAST.size:
                (_f, plen, _s, _tos, _tb, proto, _sc, rtype, _fl, tn, tt, table, dn, dt, dst, on, ot,
                 got) = fast(buf, p)
                if tn == 8 and tt == RTA_TABLE and dn == 8 and dt == RTA_DST and on == 8 and ot == RTA_OIF:
                    if rtype == RTN_UNICAST and proto != RTPROT_KERNEL and table == RT_TABLE_MAIN and (
                            filtered or got == ifindex):
                        out.append(f"{ntoa(dst)}/{plen}")
                    continue
            _f, plen, _s, _tos, table, proto, _sc, rtype, _fl = unpack(buf, p)
            if rtype != RTN_UNICAST or proto == RTPROT_KERNEL:
                continue
            # one pass over the few attributes (table, dst, priority, prefsrc, gateway, oif)
            dst = got_oif = gateway = None
            off = p + _RT.size
            while off + 4 <= end:
                n, t = attr(buf, off)
                if n < 4:
                    break
                t &= 0x3FFF
                if t == RTA_DST:
                    dst = bytes(buf[off + 4:off + n])
                elif t == RTA_OIF:
                    got_oif = bytes(buf[off + 4:off + n])
                elif t == RTA_GATEWAY:
                    gateway = bytes(buf[off + 4:off + n])
                elif t == RTA_TABLE:
                    table = struct.unpack_from("=I", buf, off + 4)[0]
                off += (n + 3) & ~3
            if table != RT_TABLE_MAIN or (not filtered and got_oif != oif):
                continue
            key = f"{ntoa(dst) if dst else '0.0.0.0'}/{plen}"
            out.append(f"{key} via {ntoa(gateway)}" if gateway else key)
        return out

    # ---------------------------------------------------------------- link (pyroute2)
    async def underlay_mtu(self, dst: str) -> int | None:
        """MTU of the device the kernel routes ``dst`` (or the default route) through."""
        try:
            return await _NL.run(_underlay_mtu(dst))
        except Exception as e:
            log.warning("underlay MTU not found", dst=dst, error=str(e))
            return None

    async def ensure_vtep(self, spec: VtepSpec) -> int:
        """Create the VTEP if missing, re-create it if its settings differ, set MAC, MTU, address, up."""
        try:
            return await _NL.run(_ensure(spec))
        except Exception as e:
            raise TransportError(f"vtep {spec.name}: {e}") from e


async def _underlay_mtu(dst: str) -> int | None:
    from pyroute2 import AsyncIPRoute

    async with AsyncIPRoute() as ipr:
        if dst:
            routes = await ipr.route("get", dst=dst)
        else:
            routes = [r async for r in await ipr.route("dump", family=socket.AF_INET) if r["dst_len"] == 0
                      and r.get("RTA_TABLE", RT_TABLE_MAIN) == RT_TABLE_MAIN]
        for r in routes:
            mtu = (r.get("RTA_METRICS") or {}).get("RTAX_MTU") if r.get("RTA_METRICS") else None
            if mtu:
                return int(mtu)
            oif = r.get("RTA_OIF")
            if oif:
                return int((await ipr.link("get", index=oif))[0].get("IFLA_MTU"))
    return None


async def _ensure(spec: VtepSpec) -> int:
    from pyroute2 import AsyncIPRoute

    async with AsyncIPRoute() as ipr:
        found = await ipr.link_lookup(ifname=spec.name)
        if found:
            link = (await ipr.link("get", index=found[0]))[0]
            info = link.get("IFLA_LINKINFO")
            data = info.get("IFLA_INFO_DATA") if info is not None else None
            kind = info.get("IFLA_INFO_KIND") if info is not None else None
            ok = kind == "vxlan" and data is not None and data.get("IFLA_VXLAN_ID") == spec.vni \
                and data.get("IFLA_VXLAN_PORT") == spec.port and not data.get("IFLA_VXLAN_LEARNING") \
                and not data.get("IFLA_VXLAN_LOCAL") and not data.get("IFLA_VXLAN_LINK")
            if not ok:
                log.warning("vtep settings differ, re-creating it", device=spec.name, kind=kind)
                await ipr.link("del", index=found[0])
                found = []
        if not found:
            await ipr.link("add", ifname=spec.name, kind="vxlan", vxlan_id=spec.vni, vxlan_port=spec.port,
                           vxlan_learning=0, vxlan_proxy=1, vxlan_l2miss=1, vxlan_l3miss=1, vxlan_rsc=1,
                           address=spec.mac, mtu=spec.mtu)
            log.info("vtep created", device=spec.name, vni=spec.vni, port=spec.port, mac=spec.mac, mtu=spec.mtu)
            found = await ipr.link_lookup(ifname=spec.name)
        idx = int(found[0])
        link = (await ipr.link("get", index=idx))[0]
        changes: dict[str, Any] = {}
        if link.get("IFLA_ADDRESS") != spec.mac:
            changes["address"] = spec.mac
        if link.get("IFLA_MTU") != spec.mtu:
            changes["mtu"] = spec.mtu
        if changes:
            await ipr.link("set", index=idx, **changes)
            log.info("vtep updated", device=spec.name, **changes)
        if spec.address:
            have = {a.get("IFA_ADDRESS") async for a in await ipr.get_addr(index=idx, family=socket.AF_INET)}
            if spec.address not in have:
                await ipr.addr("add", index=idx, address=spec.address, prefixlen=32)
        if not link["flags"] & 1:  # IFF_UP; 3 tries 200 ms apart, as rancher-net
            for attempt in range(3):
                try:
                    await ipr.link("set", index=idx, state="up")
                    break
                except Exception:
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.2)
        return idx


class EventWatch:
    """Netlink notifications -> ``classify(type, payload)`` -> ``on_change(reason)`` (on the event loop).

    The backend's ``classify`` tells its own writes (which match what it just programmed) from
    outside changes; only the latter are reported.
    """

    def __init__(self, classify: Callable[[int, bytes], str], on_change: Callable[[str], None]) -> None:
        self.classify = classify
        self.on_change = on_change
        self.sock: socket.socket | None = None
        self.events = 0

    def start(self) -> None:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            s.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((0, GROUPS))
        s.setblocking(False)
        self.sock = s
        asyncio.get_running_loop().add_reader(s.fileno(), self._readable)

    def stop(self) -> None:
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def _readable(self) -> None:
        assert self.sock is not None
        reason = ""
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # overflow: events were lost, look at everything
                    reason = OVERFLOW
                    continue
                log.warning("netlink event socket failed", error=str(e))
                break
            reason = self.parse(data) or reason
        if reason:
            self.events += 1
            self.on_change(reason)

    def parse(self, data: bytes) -> str:
        off = 0
        reason = ""
        while off + 16 <= len(data):
            n, t, _f, _seq, _pid = _HDR.unpack_from(data, off)
            if n < 16:
                break
            reason = self.classify(t, data[off + 16:off + n]) or reason
            off += (n + 3) & ~3
        return reason


def classify(t: int, p: bytes, ifindex: int, fdb: frozenset[tuple[str, str]] | None,
             neigh: dict[str, str] | Any, routes: frozenset[str] | None) -> str:
    """Why a notification about ``ifindex`` means the kernel left the programmed state ('' if not).

    ``fdb``/``neigh``/``routes`` are what was last programmed (None: unknown, any change counts).
    """
    if not ifindex:
        return ""
    if t in (RTM_NEWLINK, RTM_DELLINK) and len(p) >= _IFI.size:
        _fam, _type, li, flags, _chg = _IFI.unpack_from(p, 0)
        if li == ifindex and (t == RTM_DELLINK or not flags & 1):
            return "vtep deleted or down"
        return ""
    if t in (RTM_NEWNEIGH, RTM_DELNEIGH) and len(p) >= _ND.size:
        fam, idx, state, _flags, _t = _ND.unpack_from(p, 0)
        if idx != ifindex:
            return ""
        a = _attrs(p, _ND.size, len(p))
        if NDA_DST not in a or len(a[NDA_DST]) != 4:
            return ""
        dst = socket.inet_ntoa(a[NDA_DST])
        mac = _mac_str(a.get(NDA_LLADDR, b""))
        perm = bool(state & NUD_PERMANENT)
        if fam == AF_BRIDGE:
            if fdb is None:
                return "fdb changed"
            known = (mac, dst) in fdb
            if t == RTM_DELNEIGH:
                return "fdb entry removed" if known else ""
            return "stray fdb entry" if perm and not known else ""
        if fam == socket.AF_INET:
            if neigh is None:
                return "neighbour changed"
            want = neigh.get(dst)
            if want is None:
                return "stray neighbour" if t == RTM_NEWNEIGH and perm else ""
            if t == RTM_DELNEIGH:
                return "neighbour removed"
            return "neighbour changed" if (mac != want or not perm) else ""
        return ""
    if t in (RTM_NEWROUTE, RTM_DELROUTE) and len(p) >= _RT.size:
        _f, plen, _s, _tos, table, proto, _sc, rtype, _fl = _RT.unpack_from(p, 0)
        a = _attrs(p, _RT.size, len(p))
        if a.get(RTA_OIF) != struct.pack("=I", ifindex) or rtype != RTN_UNICAST or proto == RTPROT_KERNEL:
            return ""
        if (struct.unpack("=I", a[RTA_TABLE])[0] if RTA_TABLE in a else table) != RT_TABLE_MAIN:
            return ""
        if routes is None:
            return "route changed"
        key = f"{socket.inet_ntoa(a[RTA_DST]) if RTA_DST in a else '0.0.0.0'}/{plen}"
        if RTA_GATEWAY in a:
            key += f" via {socket.inet_ntoa(a[RTA_GATEWAY])}"
        known = key in routes
        if t == RTM_DELROUTE:
            return "route removed" if known else ""
        return "stray route" if not known else ""
    return ""
