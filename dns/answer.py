"""Pure: (table, view, name, type) -> what to answer, with the wire bytes prepared once.

A :class:`Prepared` answer holds the response *after the question* (answer, authority and
additional sections, names compressed against the question at offset 12) for a few
rotations of the A set; serving it is: new header (query ID, query RD, counts) + the
query's own question bytes (so owner names echo the asker's case through the compression
pointer) + one rotation + OPT when the query had one. Nothing else happens per query.

Decisions (dns.md §5 "Corral must", §6, §13):
- existing name: A set (after local CNAMEs); other types NOERROR/NODATA + zone SOA; a CNAME
  whose chain leaves the table is completed upstream (:class:`Upstream`);
- missing name under ``rancher.internal.`` (or with ``rancher.internal`` inside it: search
  floods) -> NXDOMAIN + SOA; single-label miss -> NXDOMAIN (unless --forward-single-label);
- apex ``rancher.internal.`` SOA/NS answered locally; PTR for managed IPs and NXDOMAIN in the
  managed reverse zones (--ptr);
- everything else is forwarded (:data:`FORWARD`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dnslib import CNAME as RD_CNAME
from dnslib import NS as RD_NS
from dnslib import PTR as RD_PTR
from dnslib import QTYPE, RR, SOA, A, DNSHeader, DNSLabel, DNSQuestion, DNSRecord
from dnslib import TXT as RD_TXT

from dns import wire
from dns.table import ZONE, Table, in_zone, resolve, resolve_chain

__all__ = ["FORWARD", "NOT_READY", "Prepared", "Upstream", "decide", "prepare"]

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


def _soa(table: Table, zone: str = ZONE) -> RR:
    return RR(zone, QTYPE.SOA, ttl=table.ttl,
              rdata=SOA(ZONE, ZONE, (table.generation, 60, 10, 86400, table.ttl)))


def prepare(name: str | DNSLabel, qtype: int, rcode: int, answers: list[RR], authority: list[RR] | None = None,
            additional: list[RR] | None = None, *, aa: bool = True, rotate_last: int = 0,
            kind: str = "local") -> Prepared:
    """Pack once with dnslib; keep only the bytes after the question.

    ``rotate_last``: the trailing ``rotate_last`` answer RRs form the A set to rotate.
    """
    fixed, rot = (answers[: len(answers) - rotate_last], answers[len(answers) - rotate_last:]) \
        if rotate_last > 1 else (answers, [])
    n = min(len(rot), MAX_ROTATIONS) if rot else 1
    rests = []
    hdr_flags = 0
    qlen = 0
    for k in range(n):
        order = rot[k:] + rot[:k] if rot else []
        rec = DNSRecord(DNSHeader(id=0, qr=1, aa=int(aa), ra=1, rcode=rcode), q=DNSQuestion(name, qtype))
        for r in fixed + order:
            rec.add_answer(r)
        for r in authority or []:
            rec.add_auth(r)
        for r in additional or []:
            rec.add_ar(r)
        packed = rec.pack()
        if not qlen:
            qlen = (len(wire.label_to_wire(name)) if isinstance(name, DNSLabel) else len(wire.text_to_wire(name))) + 4
            hdr_flags = int.from_bytes(packed[2:4], "big")
        rests.append(bytes(packed[12 + qlen:]))
    return Prepared(hdr_flags & ~wire.RD, len(answers), len(authority or []), len(additional or []),
                    tuple(rests), kind)


def _chunks(text: str) -> list[bytes]:
    """A TXT string longer than 255 bytes becomes several character-strings (the original dropped it)."""
    b = text.encode()
    return [b[i : i + 255] for i in range(0, len(b), 255)] or [b""]


def _a_rrs(owner: str | DNSLabel, ips: tuple[str, ...], ttl: int) -> list[RR]:
    return [RR(owner, QTYPE.A, ttl=ttl, rdata=A(ip)) for ip in ips]


def _interior_zone(name: str) -> bool:
    return ".rancher.internal." in name[:-1] and not name.endswith(".rancher.internal.")


def decide(table: Table | None, view_key: str, name: str, qtype: int, *, ptr: bool = True,
           forward_single_label: bool = False, qkey: bytes | None = None) -> Decision:
    """What to answer for ``name`` (lower-case fqdn) of ``qtype`` asked by a client of ``view_key``.

    ``qkey`` is the question name in wire form (lower-case): the prepared question and the
    asked owner names are built from its exact labels, so the compression offsets of the
    prepared sections match the client's question byte for byte, whatever odd bytes it holds.
    """
    if table is None:
        return NOT_READY if in_zone(name) else FORWARD
    if qkey is not None:
        asked = DNSLabel(wire.wire_labels(qkey))
        return _decide(table, view_key, name, qtype, ptr, forward_single_label, asked)
    return _decide(table, view_key, name, qtype, ptr, forward_single_label, name)


def _decide(table: Table, view_key: str, name: str, qtype: int, ptr: bool, forward_single_label: bool,
            asked: str | DNSLabel) -> Decision:
    ttl = table.ttl
    if "\\" in name:  # escaped odd bytes: never a table name
        if in_zone(name) or _interior_zone(name):
            return prepare(asked, qtype, wire.NXDOMAIN, [], [_soa(table)], kind="nxdomain")
        return FORWARD
    if name == ZONE:
        if qtype == wire.SOA:
            return prepare(asked, qtype, wire.NOERROR, [_soa(table)])
        if qtype == wire.NS:
            ns = "rancher-metadata." + ZONE
            md = table.default.records.get(ns)
            extra = _a_rrs(ns, md.a, ttl) if md else []
            return prepare(asked, qtype, wire.NOERROR, [RR(ZONE, QTYPE.NS, ttl=ttl, rdata=RD_NS(ns))], [], extra)
        return prepare(asked, qtype, wire.NOERROR, [], [_soa(table)], kind="nodata")
    if ptr and name.endswith(".in-addr.arpa."):
        target = table.ptr.get(name)
        if target is not None:
            if qtype == wire.PTR:
                return prepare(asked, qtype, wire.NOERROR, [RR(asked, QTYPE.PTR, ttl=ttl, rdata=RD_PTR(target))],
                               kind="ptr")
            return prepare(asked, qtype, wire.NOERROR, [], [_soa(table, _zone_of(table, name) or ZONE)],
                           kind="nodata")
        zone = _zone_of(table, name)
        if zone is not None:
            return prepare(asked, qtype, wire.NXDOMAIN, [], [_soa(table, zone)], kind="nxdomain")
        return FORWARD
    chain, final = resolve_chain(table, view_key, name)
    if chain or final is not None:
        rrs = [RR(asked if o == name else o, QTYPE.CNAME, ttl=ttl, rdata=RD_CNAME(t)) for o, t in chain]
        if final is not None:
            rttl = final.ttl if final.ttl is not None else ttl
            if qtype == wire.A and final.a:
                owner: str | DNSLabel = chain[-1][1] if chain else asked
                return prepare(asked, qtype, wire.NOERROR, rrs + _a_rrs(owner, final.a, rttl),
                               rotate_last=len(final.a))
            if qtype == wire.CNAME and rrs:
                return prepare(asked, qtype, wire.NOERROR, rrs[:1])
            if qtype == wire.TXT and final.txt:
                towner = chain[-1][1] if chain else asked
                txts = [RR(towner, QTYPE.TXT, ttl=rttl, rdata=RD_TXT(_chunks(t))) for t in final.txt]
                return prepare(asked, qtype, wire.NOERROR, rrs + txts)
            return prepare(asked, qtype, wire.NOERROR, rrs, [_soa(table)], kind="nodata")
        target = chain[-1][1]
        if qtype in (wire.A, wire.AAAA) and not in_zone(target):
            return Upstream(tuple(chain), target, qtype, ttl)
        if qtype == wire.CNAME:
            return prepare(asked, qtype, wire.NOERROR, rrs[:1])
        return prepare(asked, qtype, wire.NOERROR, rrs, [_soa(table)], kind="nodata")
    if in_zone(name) or _interior_zone(name):
        return prepare(asked, qtype, wire.NXDOMAIN, [], [_soa(table)], kind="nxdomain")
    if name.count(".") == 1 and not forward_single_label:
        return prepare(asked, qtype, wire.NXDOMAIN, [], [], aa=False, kind="nxdomain")
    return FORWARD


def _zone_of(table: Table, name: str) -> str | None:
    for z in table.reverse_zones:
        if name.endswith("." + z) or name == z:
            return z
    return None


def resolve_name(table: Table, view_key: str, name: str) -> tuple[str, ...]:
    """The A set a name resolves to (tests and debugging)."""
    r = resolve(table, view_key, name)
    return r.rec.a if r is not None else ()
