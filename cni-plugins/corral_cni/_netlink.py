"""A tiny rtnetlink client over a plain socket: just the messages the bridge plugin needs.

Why not pyroute2: importing it costs ~160 ms (asyncio and ~370 modules) while a whole reference
ADD takes ~15 ms. This module imports only ``_socket``, ``struct`` and ``posix`` (``_ctypes`` lazily,
for ``setns`` on Python < 3.12). Every request asks for an ACK and raises ``NetlinkError`` with
the kernel's errno, so callers decide which errors (EEXIST, ENODEV, ...) are benign.
"""

from __future__ import annotations

import _socket
import _struct as struct  # struct.py only re-exports the built-in _struct

from . import _os as os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from dataclasses import dataclass
else:
    from ._record import record as dataclass

AF_NETLINK = 16
AF_UNSPEC = 0
AF_INET = 2
AF_BRIDGE = 7

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNSID, RTM_GETNSID = 88, 90
NETNSA_NSID, NETNSA_FD = 1, 3

NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 1, 2, 4
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER = 1, 3, 4, 10
IFLA_PROTINFO, IFLA_LINKINFO, IFLA_NET_NS_FD = 12, 18, 28
IFLA_TARGET_NETNSID = 46
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFLA_BRPORT_MODE = 4  # hairpin
IFF_UP, IFF_PROMISC = 0x1, 0x100
SIOCGIFINDEX = 0x8933

IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST = 1, 2, 4
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTN_UNICAST = 1

_HDR = struct.Struct("=IHHII")
_IFI = struct.Struct("=BxHiII")
_IFA = struct.Struct("=BBBBI")
_RTM = struct.Struct("=BBBBBBBBI")
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_S32 = struct.Struct("=i")


class NetlinkError(OSError):
    pass


def attr(kind: int, data: bytes) -> bytes:
    n = 4 + len(data)
    return _NLA.pack(n, kind) + data + b"\0" * ((4 - n % 4) % 4)


def nest(kind: int, *parts: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def u32(kind: int, v: int) -> bytes:
    return attr(kind, _U32.pack(v))


def cstr(kind: int, s: str) -> bytes:
    return attr(kind, s.encode() + b"\0")


def ip4(s: str) -> bytes:
    return _socket.inet_aton(s)


def parse_attrs(buf: bytes, off: int = 0) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    end = len(buf)
    while off + 4 <= end:
        n, kind = _NLA.unpack_from(buf, off)
        if n < 4:
            break
        out[kind & 0x3FFF] = buf[off + 4 : off + n]
        off += (n + 3) & ~3
    return out


def mac_str(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def mac_bytes(s: str) -> bytes:
    parts = s.split(":")
    if len(parts) != 6:
        raise ValueError(f"invalid MAC address {s!r}")
    return bytes(int(p, 16) for p in parts)


@dataclass
class Link:
    index: int
    name: str
    flags: int
    mtu: int
    master: int
    mac: str
    kind: str


@dataclass
class Addr:
    index: int
    address: str
    prefixlen: int


@dataclass
class Route:
    dst: str  # CIDR
    gw: str
    oif: int
    scope: int
    protocol: int


class Netlink:
    """One rtnetlink socket, bound in the network namespace that was current when opened."""

    def __init__(self) -> None:
        self.sock = _socket.socket(AF_NETLINK, _socket.SOCK_RAW, 0)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------------
    def _send(self, mtype: int, flags: int, body: bytes) -> int:
        self.seq += 1
        self.sock.send(_HDR.pack(16 + len(body), mtype, flags | NLM_F_REQUEST, self.seq, 0) + body)
        return self.seq

    def _recv(self, seq: int) -> Iterator[tuple[int, bytes]]:
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                n, mtype, flags, mseq, _ = _HDR.unpack_from(data, off)
                body = data[off + 16 : off + n]
                off += (n + 3) & ~3
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    err = -_S32.unpack_from(body)[0]
                    if err:
                        raise NetlinkError(err, os.strerror(err))
                    return
                if mtype == NLMSG_DONE:
                    return
                yield mtype, body
                if not flags & NLM_F_MULTI:
                    # a single answer to a GET: the ACK (if any) follows; stop reading here.
                    return

    def do(self, mtype: int, flags: int, body: bytes) -> None:
        for _ in self._recv(self._send(mtype, flags | NLM_F_ACK, body)):
            pass

    def dump(self, mtype: int, body: bytes) -> list[bytes]:
        return [b for _, b in self._recv(self._send(mtype, NLM_F_DUMP, body))]

    # -- links -------------------------------------------------------------------------------
    @staticmethod
    def _link(body: bytes) -> Link:
        _fam, _type, index, flags, _change = _IFI.unpack_from(body)
        a = parse_attrs(body, _IFI.size)
        kind = ""
        if IFLA_LINKINFO in a:
            k = parse_attrs(a[IFLA_LINKINFO]).get(IFLA_INFO_KIND)
            if k:
                kind = k.rstrip(b"\0").decode()
        return Link(
            index,
            a.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(),
            flags,
            _U32.unpack(a[IFLA_MTU])[0] if IFLA_MTU in a else 0,
            _U32.unpack(a[IFLA_MASTER])[0] if IFLA_MASTER in a else 0,
            mac_str(a.get(IFLA_ADDRESS, b"")),
            kind,
        )

    def get_link(self, name: str) -> Link | None:
        body = _IFI.pack(AF_UNSPEC, 0, 0, 0, 0) + cstr(IFLA_IFNAME, name)
        try:
            for _, b in self._recv(self._send(RTM_GETLINK, 0, body)):
                return self._link(b)
        except NetlinkError as e:
            if e.errno in (19, 2):  # ENODEV, ENOENT
                return None
            raise
        return None

    def has_link(self, name: str) -> bool:
        """Whether a link ``name`` exists here, asked by ``SIOCGIFINDEX`` on this socket: a lookup
        under RCU, where ``RTM_GETLINK`` waits for the rtnl lock behind every link change in
        progress (50 DELs at once: each one's host-veth check queued behind the others' deletes).
        True when the answer is not a plain "no such device" (the caller then asks netlink)."""
        raw = name.encode()
        if not 0 < len(raw) < 16 or b"\0" in raw:
            return True
        import fcntl

        try:
            fcntl.ioctl(self.sock.fileno(), SIOCGIFINDEX, raw.ljust(40, b"\0"))
        except OSError as e:
            return e.errno != 19  # ENODEV
        return True

    def links(self) -> list[Link]:
        return [self._link(b) for b in self.dump(RTM_GETLINK, _IFI.pack(AF_UNSPEC, 0, 0, 0, 0))]

    def create_bridge(self, name: str, mtu: int) -> None:
        attrs = cstr(IFLA_IFNAME, name) + nest(IFLA_LINKINFO, cstr(IFLA_INFO_KIND, "bridge"))
        if mtu:
            attrs += u32(IFLA_MTU, mtu)
        self.do(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, _IFI.pack(AF_UNSPEC, 0, 0, 0, 0) + attrs)

    def create_veth(self, host: str, peer: str, peer_ns_fd: int, mtu: int, peer_mtu: int,
                    peer_mac: str) -> None:
        """Host end ``host`` here, the peer ``peer`` created directly in ``peer_ns_fd``."""
        pattrs = cstr(IFLA_IFNAME, peer) + u32(IFLA_NET_NS_FD, peer_ns_fd)
        if peer_mtu:
            pattrs += u32(IFLA_MTU, peer_mtu)
        if peer_mac:
            pattrs += attr(IFLA_ADDRESS, mac_bytes(peer_mac))
        peer_msg = _IFI.pack(AF_UNSPEC, 0, 0, 0, 0) + pattrs
        info = nest(IFLA_LINKINFO, cstr(IFLA_INFO_KIND, "veth"),
                    nest(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_msg)))
        attrs = cstr(IFLA_IFNAME, host) + info
        if mtu:
            attrs += u32(IFLA_MTU, mtu)
        self.do(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, _IFI.pack(AF_UNSPEC, 0, 0, 0, 0) + attrs)

    def set_link(self, index: int, *, up: bool | None = None, promisc: bool | None = None,
                 master: int | None = None, mtu: int | None = None, mac: str | None = None) -> None:
        flags = change = 0
        if up is not None:
            change |= IFF_UP
            flags |= IFF_UP if up else 0
        if promisc is not None:
            change |= IFF_PROMISC
            flags |= IFF_PROMISC if promisc else 0
        attrs = b""
        if master is not None:
            attrs += u32(IFLA_MASTER, master)
        if mtu:
            attrs += u32(IFLA_MTU, mtu)
        if mac:
            attrs += attr(IFLA_ADDRESS, mac_bytes(mac))
        self.do(RTM_NEWLINK, 0, _IFI.pack(AF_UNSPEC, 0, index, flags, change) + attrs)

    def set_hairpin(self, index: int, on: bool) -> None:
        body = _IFI.pack(AF_BRIDGE, 0, index, 0, 0) + nest(IFLA_PROTINFO, attr(IFLA_BRPORT_MODE, bytes([on])))
        self.do(RTM_SETLINK, 0, body)

    def hairpin(self, index: int) -> bool | None:
        for b in self.dump(RTM_GETLINK, _IFI.pack(AF_BRIDGE, 0, 0, 0, 0)):
            if _IFI.unpack_from(b)[2] != index:
                continue
            pi = parse_attrs(b, _IFI.size).get(IFLA_PROTINFO)
            if pi is None:
                return None
            mode = parse_attrs(pi).get(IFLA_BRPORT_MODE)
            return bool(mode and mode[0])
        return None

    def del_link(self, index: int = 0, name: str = "", netnsid: int = -1) -> bool:
        """Delete by index or name; False when it was already gone. With ``netnsid`` (see
        ``peer_nsid``) the link is looked up and deleted in that namespace, not in this one."""
        body = _IFI.pack(AF_UNSPEC, 0, index, 0, 0) + (cstr(IFLA_IFNAME, name) if name and not index else b"")
        if netnsid >= 0:
            body += attr(IFLA_TARGET_NETNSID, _S32.pack(netnsid))
        try:
            self.do(RTM_DELLINK, 0, body)
        except NetlinkError as e:
            if e.errno in (19, 2):
                return False
            raise
        return True

    def peer_nsid(self, ns_fd: int) -> int:
        """The id this namespace has for the namespace ``ns_fd`` (-1: none assigned). Creating a
        veth into a namespace assigns one; with it, links there can be deleted from here
        (``IFLA_TARGET_NETNSID``) without entering the namespace."""
        for _, b in self._recv(self._send(RTM_GETNSID, 0, b"\0\0\0\0" + u32(NETNSA_FD, ns_fd))):
            v = parse_attrs(b, 4).get(NETNSA_NSID)
            return _S32.unpack(v)[0] if v is not None else -1
        return -1

    # -- addresses ---------------------------------------------------------------------------
    def addrs(self, index: int = 0) -> list[Addr]:
        out = []
        for b in self.dump(RTM_GETADDR, _IFA.pack(AF_INET, 0, 0, 0, 0)):
            fam, plen, _fl, _scope, idx = _IFA.unpack_from(b)
            if fam != AF_INET or (index and idx != index):
                continue
            a = parse_attrs(b, _IFA.size)
            raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
            if raw:
                out.append(Addr(idx, _socket.inet_ntoa(raw), plen))
        return out

    def add_addr(self, index: int, address: str, prefixlen: int, broadcast: str = "") -> None:
        attrs = attr(IFA_LOCAL, ip4(address)) + attr(IFA_ADDRESS, ip4(address))
        if broadcast:
            attrs += attr(IFA_BROADCAST, ip4(broadcast))
        self.do(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, _IFA.pack(AF_INET, prefixlen, 0, 0, index) + attrs)

    # -- routes ------------------------------------------------------------------------------
    def add_route(self, dst: str, prefixlen: int, gw: str, oif: int) -> None:
        scope = RT_SCOPE_UNIVERSE if gw else RT_SCOPE_LINK
        body = _RTM.pack(AF_INET, prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0)
        if prefixlen:
            body += attr(RTA_DST, ip4(dst))
        if gw:
            body += attr(RTA_GATEWAY, ip4(gw))
        body += u32(RTA_OIF, oif)
        self.do(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)

    def routes(self) -> list[Route]:
        out = []
        for b in self.dump(RTM_GETROUTE, _RTM.pack(AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)):
            fam, dlen, _s, _t, table, proto, scope, rtype, _f = _RTM.unpack_from(b)
            a = parse_attrs(b, _RTM.size)
            tbl = _U32.unpack(a[RTA_TABLE])[0] if RTA_TABLE in a else table
            if fam != AF_INET or tbl != RT_TABLE_MAIN or rtype != RTN_UNICAST:
                continue
            dst = _socket.inet_ntoa(a[RTA_DST]) if RTA_DST in a else "0.0.0.0"
            gw = _socket.inet_ntoa(a[RTA_GATEWAY]) if RTA_GATEWAY in a else ""
            oif = _U32.unpack(a[RTA_OIF])[0] if RTA_OIF in a else 0
            out.append(Route(f"{dst}/{dlen}", gw, oif, scope, proto))
        return out


# -- namespaces ----------------------------------------------------------------------------------
CLONE_NEWNET = 0x40000000


_setns_fn = None


def setns(fd: int) -> None:
    """setns(2) into a network namespace. ``posix.setns`` on Python >= 3.12; on 3.11 the libc call
    through ``_ctypes`` directly (the ``ctypes`` package would cost ~5 ms of class set-up)."""
    global _setns_fn
    import posix

    if hasattr(posix, "setns"):
        posix.setns(fd, CLONE_NEWNET)
        return
    import _ctypes

    if _setns_fn is None:

        class _F(_ctypes.CFuncPtr):  # type: ignore[misc,name-defined]
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO  # restype: C int (default)

        _setns_fn = _F(_ctypes.dlsym(_ctypes.dlopen(None, 2), "setns"))  # type: ignore[arg-type]
    if _setns_fn(fd, CLONE_NEWNET) != 0:
        e = _ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def open_in_netns(ns_fd: int) -> Netlink:
    """A netlink socket living in the namespace ``ns_fd``; this process returns to its own."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        setns(ns_fd)
        try:
            return Netlink()
        finally:
            setns(own)
    finally:
        os.close(own)
