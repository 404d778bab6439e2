"""Pure: (table, view, name, type) -> what to answer, with the wire bytes prepared once.

A :class:`Prepared` answer holds the response *after the question* (answer, authority and
additional sections, packed here by hand: owners equal to the asked name are a pointer to the
question at offset 12, other names uncompressed) for a few rotations of the A set; serving it is: new header (query ID, query RD, counts) + the
query's own question bytes (so owner names echo the asker's case through the compression
pointer) + one rotation + OPT when the query had one. Nothing else happens per query.

Decisions (dns.md §5 "Corral must", §6, §13):
- existing name: A set (after local CNAMEs); other types NOERROR/NODATA + zone SOA (minimum
  ``--ttl``); a CNAME whose chain leaves the table is completed upstream for any type but
  CNAME (:class:`Upstream`);
- missing name under ``rancher.internal.`` (or with ``rancher.internal`` inside it: search
  floods), and a single-label miss (unless --forward-single-label) -> NXDOMAIN as the original
  answers it in its zone: AA=1, RA=0, zone SOA with minimum 1;
- apex ``rancher.internal.`` SOA/NS answered locally; PTR for managed IPs and NXDOMAIN in the
  managed reverse zones (--ptr);
- everything else is forwarded (:data:`FORWARD`).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from dns import wire
from dns.table import ZONE, Table, in_zone, resolve_chain

__all__ = ["ASKED", "FORWARD", "NOT_READY", "Prepared", "Upstream", "decide", "prepare"]

MAX_ROTATIONS = 8


@dataclass(frozen=True, slots=True)
class Prepared:
    flags: int                       # QR|AA|RA|rcode (RD added per query)
    an: int
    ns: int
    ar: int
    rests: tuple[bytes, ...]         # rotations of the sections after the question
    kind: str                        # metrics label: local / nxdomain / nodata / ptr

    def render(self, q: wire.Query, n: int, tcp: bool) -> bytes:
        rest = self.rests[n % len(self.rests)] if len(self.rests) > 1 else self.rests[0]
        flags = self.flags | (q.flags & wire.RD)
        if q.edns:
            opt = wire.make_opt(q.do)
            out = wire.header(q.id, flags, self.an, self.ns, self.ar + 1) + q.qname + _qtail(q) + rest + opt
        else:
            out = wire.header(q.id, flags, self.an, self.ns, self.ar) + q.qname + _qtail(q) + rest
        if len(out) > q.limit(tcp):
            opt = wire.make_opt(q.do) if q.edns else b""
            return wire.header(q.id, flags | wire.TC, 0, 0, 1 if opt else 0) + q.qname + _qtail(q) + opt
        return out


def _qtail(q: wire.Query) -> bytes:
    return q.qtype.to_bytes(2, "big") + q.qclass.to_bytes(2, "big")


@dataclass(frozen=True, slots=True)
class Upstream:
    """Local CNAME chain whose last target must be asked upstream for ``qtype``."""

    chain: tuple[tuple[str, str], ...]
    target: str
    qtype: int
    ttl: int


FORWARD = "forward"
NOT_READY = "not-ready"
Decision = Prepared | Upstream | str


ASKED = b"\xc0\x0c"  # owner = the question's name (compression pointer to offset 12)
_RRH = struct.Struct("!HHIH")


def _rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + _RRH.pack(rtype, 1, ttl, len(rdata)) + rdata


def _n(name: str) -> bytes:
    return wire.text_to_wire(name)


def _soa(table: Table, zone: str = ZONE, *, minimum: int | None = None) -> bytes:
    """The zone's SOA: serial = table generation; minimum = ``--ttl`` (NODATA) unless given."""
    mini = table.ttl if minimum is None else minimum
    rdata = _n(ZONE) + _n(ZONE) + struct.pack("!IIIII", table.generation & 0xFFFFFFFF, 60, 10, 86400, mini)
    return _rr(_n(zone), wire.SOA, table.ttl, rdata)


NX_MINIMUM = 1  # the original's SOA minimum on NXDOMAIN: "no such name" is remembered for 1 s


_NX: dict[tuple[int, int, str], Prepared] = {}


def _nxdomain(table: Table, zone: str = ZONE) -> Prepared:
    """A local NXDOMAIN as the original answers one under ``rancher.internal``: AA=1, RA=0, the
    zone SOA (TTL ``--ttl``, minimum 1) in authority. Used for every name Corral answers
    NXDOMAIN itself (zone, reverse zones, search floods, single-label misses), so none of them
    looks like a reply relayed from upstream and none is cached for long downstream.

    The answer does not depend on the name (the owner of the SOA is the zone), so one object
    per (generation, ttl, zone) serves every missing name."""
    key = (table.generation, table.ttl, zone)
    p = _NX.get(key)
    if p is None:
        if len(_NX) >= 64:
            _NX.clear()
        p = _NX[key] = prepare(wire.NXDOMAIN, [], [_soa(table, zone, minimum=NX_MINIMUM)], ra=False,
                               kind="nxdomain")
    return p


def prepare(rcode: int, answers: list[bytes], authority: list[bytes] | None = None,
            additional: list[bytes] | None = None, *, aa: bool = True, ra: bool = True, rotate_last: int = 0,
            kind: str = "local") -> Prepared:
    """Concatenate packed RRs once; the trailing ``rotate_last`` answers (the A set) in up to
    ``MAX_ROTATIONS`` rotations. Owner names are either :data:`ASKED` or uncompressed."""
    auth = b"".join(authority or [])
    add = b"".join(additional or [])
    if rotate_last > 1:
        fixed = b"".join(answers[: len(answers) - rotate_last])
        rot = answers[len(answers) - rotate_last:]
        rests = tuple(fixed + b"".join(rot[k:] + rot[:k]) + auth + add for k in range(min(len(rot), MAX_ROTATIONS)))
    else:
        rests = (b"".join(answers) + auth + add,)
    flags = wire.QR | (wire.AA if aa else 0) | (wire.RA if ra else 0) | rcode
    return Prepared(flags, len(answers), len(authority or []), len(additional or []), rests, kind)


def _chunks(text: str) -> list[bytes]:
    """A TXT string longer than 255 bytes becomes several character-strings (the original dropped it)."""
    b = text.encode()
    return [b[i : i + 255] for i in range(0, len(b), 255)] or [b""]


def _a_rrs(owner: bytes, ips: tuple[str, ...], ttl: int) -> list[bytes]:
    return [_rr(owner, wire.A, ttl, socket.inet_aton(ip)) for ip in ips]


def _interior_zone(name: str) -> bool:
    return ".rancher.internal." in name[:-1] and not name.endswith(".rancher.internal.")


def decide(table: Table | None, view_key: str, name: str, qtype: int, *, ptr: bool = True,
           forward_single_label: bool = False, qkey: bytes | None = None) -> Decision:
    """What to answer for ``name`` (lower-case fqdn) of ``qtype`` asked by a client of ``view_key``.

    Records owned by the asked name point at the question (offset 12), so they echo the
    client's bytes and case whatever they are; ``qkey`` is accepted for callers that have it.
    """
    if table is None:
        return NOT_READY if in_zone(name) else FORWARD
    ttl = table.ttl
    if "\\" in name:  # escaped odd bytes: never a table name
        if in_zone(name) or _interior_zone(name):
            return _nxdomain(table)
        return FORWARD
    if name == ZONE:
        if qtype == wire.SOA:
            return prepare(wire.NOERROR, [_soa(table)])
        if qtype == wire.NS:
            ns = "rancher-metadata." + ZONE
            md = table.default.records.get(ns)
            extra = _a_rrs(_n(ns), md.a, ttl) if md else []
            return prepare(wire.NOERROR, [_rr(ASKED, wire.NS, ttl, _n(ns))], [], extra)
        return prepare(wire.NOERROR, [], [_soa(table)], kind="nodata")
    if ptr and name.endswith(".in-addr.arpa."):
        target = table.ptr.get(name)
        if target is not None:
            if qtype == wire.PTR:
                return prepare(wire.NOERROR, [_rr(ASKED, wire.PTR, ttl, _n(target))], kind="ptr")
            return prepare(wire.NOERROR, [], [_soa(table, _zone_of(table, name) or ZONE)], kind="nodata")
        zone = _zone_of(table, name)
        if zone is not None:
            return _nxdomain(table, zone)
        return FORWARD
    chain, final = resolve_chain(table, view_key, name)
    if chain or final is not None:
        rrs = [_rr(ASKED if i == 0 else _n(o), wire.CNAME, ttl, _n(t)) for i, (o, t) in enumerate(chain)]
        owner = _n(chain[-1][1]) if chain else ASKED
        if final is not None:
            rttl = final.ttl if final.ttl is not None else ttl
            if qtype == wire.A and final.a:
                return prepare(wire.NOERROR, rrs + _a_rrs(owner, final.a, rttl), rotate_last=len(final.a))
            if qtype == wire.CNAME and rrs:
                return prepare(wire.NOERROR, rrs[:1])
            if qtype == wire.TXT and final.txt:
                txts = [_rr(owner, wire.TXT, rttl, b"".join(bytes([len(c)]) + c for c in _chunks(t)))
                        for t in final.txt]
                return prepare(wire.NOERROR, rrs + txts)
            return prepare(wire.NOERROR, rrs, [_soa(table)], kind="nodata")
        target = chain[-1][1]
        if qtype != wire.CNAME and not in_zone(target):
            return Upstream(tuple(chain), target, qtype, ttl)  # any type: the alias is followed upstream
        if qtype == wire.CNAME:
            return prepare(wire.NOERROR, rrs[:1])
        return prepare(wire.NOERROR, rrs, [_soa(table)], kind="nodata")
    if in_zone(name) or _interior_zone(name) or (name.count(".") == 1 and not forward_single_label):
        return _nxdomain(table)
    return FORWARD


def _zone_of(table: Table, name: str) -> str | None:
    for z in table.reverse_zones:
        if name.endswith("." + z) or name == z:
            return z
    return None
