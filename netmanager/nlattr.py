"""Netlink attributes (type-length-value, 4-byte aligned), built and walked: shared by the
rtnetlink client of the overlay (netmanager/overlay/nl.py) and the nf_tables rule-handle editor
(netmanager/nft.py). The CNI bundle keeps its own copy: it ships without the rest of Corral."""

from __future__ import annotations

import struct

__all__ = ["ATTR", "attr", "attrs"]

ATTR = struct.Struct("=HH")  # nla_len, nla_type
_TYPE = 0x3FFF  # nla_type without NLA_F_NESTED / NLA_F_NET_BYTEORDER


def attr(kind: int, data: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    n = 4 + len(data)
    return ATTR.pack(n, kind) + data + b"\0" * (-n % 4)


def attrs(buf: bytes | bytearray | memoryview, off: int, end: int) -> dict[int, bytes | bytearray | memoryview]:
    """The attributes in ``buf[off:end]`` by type (flags masked off; the last of a repeated type
    wins). Values are slices of ``buf``; a length under 4 ends the walk instead of looping."""
    out: dict[int, bytes | bytearray | memoryview] = {}
    while off + 4 <= end:
        n, t = ATTR.unpack_from(buf, off)
        if n < 4:
            break
        out[t & _TYPE] = buf[off + 4:off + n]
        off += (n + 3) & ~3
    return out
