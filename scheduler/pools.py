"""Resource pools per host and the three decisions: prioritize, reserve, release.

Pure: metadata rows and requests in, decisions out; no I/O, no clock (callers pass ``now``).

Where a host's usage comes from (the piece the original got wrong, scheduler.md §5):

    used = recount(metadata)                   containers that hold resources, minus
           - containers released but still shown by metadata (tombstones)
           - containers of a pending booking (counted by the booking instead)
           + pending bookings (reserved, not yet in metadata: the journal)

``Pools.install(base)`` applies a fresh :class:`Base` (built from metadata by
:class:`BaseBuilder`, in chunks if the caller wants) with that rule, so a resync never
forgets a reservation whose container metadata does not show yet, and never counts a
released container metadata still shows. Reserve and release update ``used`` in place and
the journal with it, so ``recount()`` (the same rule from scratch) always equals ``used``.
"""

from __future__ import annotations

import bisect
import operator
import random
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agents.errors import InputError
from scheduler.request import PortRequest, PortSpec, Request

__all__ = [
    "COMPUTE_RESOURCES", "IPS_LABEL", "JOURNAL_FORMAT", "PORT_RANGE", "REQUIRE_ANY_LABEL", "Base", "BaseBuilder",
    "BaseDiff", "Booking", "HostPools", "Mirror", "Pools", "SchedulerError", "Usage", "parse_port_binding",
]

IPS_LABEL = "io.rancher.scheduler.ips"
REQUIRE_ANY_LABEL = "io.rancher.scheduler.require_any"
PORT_RANGE = (32768, 61000)
INSTANCE_TOTAL = 1_000_000
ANY_IP = "0.0.0.0"
COMPUTE_RESOURCES = ("instanceReservation", "cpuReservation", "memoryReservation", "storageSize")
#: containers in these states hold nothing (compute and ports alike)
RELEASED_STATES = frozenset({"stopped", "removed", "purged", "removing", "error"})

PortKey = tuple[str, str]  # (ip, protocol)
JOURNAL_FORMAT = "corral-scheduler-journal/1"


class SchedulerError(Exception):
    """A placement that cannot be done; the message is the original's reply text."""


def parse_port_binding(spec: Any) -> tuple[str, int, str] | None:
    """Metadata's ``ip:public:private/proto`` (or ``public:private/proto``) -> (ip, public, proto)."""
    if not isinstance(spec, str):
        return None
    body, _, proto = spec.partition("/")
    parts = body.split(":")
    try:
        if len(parts) == 3:
            ip, pub = parts[0] or ANY_IP, int(parts[1])
        elif len(parts) == 2:
            ip, pub = ANY_IP, int(parts[0])
        else:
            return None
    except ValueError:
        return None
    if not 0 < pub <= 65535:
        return None
    return ip, pub, (proto or "tcp").lower()


def _ip_set(labels: dict[str, str]) -> tuple[str, ...]:
    raw = labels.get(IPS_LABEL, "")
    ips = tuple(dict.fromkeys(x.strip() for x in raw.split(",") if x.strip()))
    return ips or (ANY_IP,)


def _require_any(labels: dict[str, str]) -> tuple[tuple[str, str | None], ...]:
    raw = labels.get(REQUIRE_ANY_LABEL)
    if raw is None:
        return ()
    out: list[tuple[str, str | None]] = []
    for item in raw.split(","):
        k, eq, v = item.strip().lower().partition("=")
        if k.strip():
            out.append((k.strip(), v.strip() if eq else None))
    return tuple(out)


def _num(v: Any) -> int:
    if type(v) is int:  # the common case first (bool is not int here)
        return v if v > 0 else 0
    if v is None or isinstance(v, bool):
        return 0
    if isinstance(v, int):
        return max(0, v)
    if isinstance(v, float):
        return max(0, int(v))
    if isinstance(v, str):
        try:
            return max(0, int(v))
        except ValueError:
            return 0
    return 0


# -- what metadata says -----------------------------------------------------------------------

@dataclass(slots=True)
class Member:
    """One container's share of a host, as metadata shows it."""

    cpu: int
    memory: int
    ports: list[tuple[str, str, int, bool]]  # (ip, proto, port, ghost)


@dataclass(slots=True)
class HostBase:
    uuid: str
    total: dict[str, int]
    labels: dict[str, str]
    ips: tuple[str, ...]
    used: dict[str, int] = field(default_factory=dict)
    ports: dict[PortKey, dict[int, str]] = field(default_factory=dict)
    ghost: dict[PortKey, dict[int, str]] = field(default_factory=dict)
    members: dict[str, Member] = field(default_factory=dict)


@dataclass(slots=True)
class Base:
    """Pools as metadata alone would have them (no journal, no tombstones)."""

    hosts: dict[str, HostBase]
    version: str = ""

    def label_view(self) -> dict[str, dict[str, str]]:
        return {u: h.labels for u, h in self.hosts.items()}


def _host_rows(hosts: Iterable[dict[str, Any]]) -> dict[str, tuple[dict[str, int], dict[str, str]]]:
    """uuid -> (total, labels) of every usable host row (the first of a uuid wins)."""
    out: dict[str, tuple[dict[str, int], dict[str, str]]] = {}
    for h in hosts:
        if not isinstance(h, dict) or not h.get("uuid"):
            continue
        uuid = str(h["uuid"])
        if uuid in out:
            continue
        raw = h.get("labels")
        labels = {str(k): "" if v is None else str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        total = {"instanceReservation": INSTANCE_TOTAL, "cpuReservation": _num(h.get("milli_cpu")),
                 "memoryReservation": _num(h.get("memory")), "storageSize": _num(h.get("local_storage_mb"))}
        out[uuid] = (total, labels)
    return out


#: what of a container row counts for the pools: (host_uuid, state, memory, cpu, ports)
Sig = tuple[Any, Any, Any, Any, Any]


def _sig(c: dict[str, Any]) -> Sig:
    return (c.get("host_uuid"), c.get("state"), c.get("memory_reservation"), c.get("milli_cpu_reservation"),
            c.get("ports"))


def _add_member(h: HostBase, uuid: str, c: dict[str, Any]) -> None:
    """Count one container row on ``h`` (the caller checked it holds resources)."""
    mv, cv = c.get("memory_reservation"), c.get("milli_cpu_reservation")
    mem = (mv if mv > 0 else 0) if type(mv) is int else _num(mv)
    cpu = (cv if cv > 0 else 0) if type(cv) is int else _num(cv)
    plist: list[tuple[str, str, int, bool]] = []
    h.members[uuid] = Member(cpu, mem, plist)
    used = h.used
    used["instanceReservation"] += 1
    if cpu:
        used["cpuReservation"] += cpu
    if mem:
        used["memoryReservation"] += mem
    ports = c.get("ports")
    if not ports:
        return
    for spec in ports:
        b = _binding(spec)
        if b is None:
            continue
        ip, port, proto = b
        if ip == ANY_IP:
            for x in h.ips:
                h.ports.setdefault((x, proto), {})[port] = uuid
                plist.append((x, proto, port, False))
        elif ip in h.ips:
            h.ports.setdefault((ip, proto), {})[port] = uuid
            plist.append((ip, proto, port, False))
        else:
            h.ghost.setdefault((ip, proto), {})[port] = uuid
            plist.append((ip, proto, port, True))


def _drop_member(h: HostBase, uuid: str) -> None:
    m = h.members.pop(uuid, None)
    if m is None:
        return
    used = h.used
    used["instanceReservation"] -= 1
    used["cpuReservation"] -= m.cpu
    used["memoryReservation"] -= m.memory
    for ip, proto, port, ghost in m.ports:
        pm = (h.ghost if ghost else h.ports).get((ip, proto))
        if pm is not None and pm.get(port) == uuid:
            del pm[port]


_BINDINGS: dict[str, tuple[str, int, str] | None] = {}


def _binding(spec: Any) -> tuple[str, int, str] | None:
    """:func:`parse_port_binding`, remembered (the same few specs come back in every snapshot)."""
    if type(spec) is not str:
        return parse_port_binding(spec)
    b = _BINDINGS.get(spec, _BINDINGS)
    if b is _BINDINGS:
        if len(_BINDINGS) > 65536:
            _BINDINGS.clear()
        b = _BINDINGS[spec] = parse_port_binding(spec)
    return b  # type: ignore[return-value]


class BaseBuilder:
    """Builds a :class:`Base` from metadata rows; feed containers in as many chunks as you like.
    A container uuid counts once (its first row); ``sigs`` records what each row counted, so a
    later snapshot can be folded in as a diff (:class:`BaseDiff`)."""

    def __init__(self, hosts: Iterable[dict[str, Any]], version: str = "",
                 rows: dict[str, tuple[dict[str, int], dict[str, str]]] | None = None) -> None:
        self.base = Base({}, version)
        for uuid, (total, labels) in (rows if rows is not None else _host_rows(hosts)).items():
            self.base.hosts[uuid] = HostBase(uuid, total, labels, _ip_set(labels), {r: 0 for r in COMPUTE_RESOURCES})
        self.sigs: dict[str, Sig] = {}

    def add_containers(self, containers: Iterable[dict[str, Any]]) -> None:
        hosts, sigs = self.base.hosts, self.sigs
        for c in containers:
            if type(c) is not dict:
                continue
            uuid = c.get("uuid")
            if not uuid or uuid in sigs:
                continue
            sig = sigs[uuid] = _sig(c)
            h = hosts.get(sig[0])
            if h is None or sig[1] in RELEASED_STATES:
                continue
            _add_member(h, uuid, c)

    def result(self) -> Base:
        return self.base

    @classmethod
    def build(cls, hosts: Iterable[dict[str, Any]], containers: Iterable[dict[str, Any]], version: str = "") -> Base:
        b = cls(hosts, version)
        b.add_containers(containers)
        return b.result()


class BaseDiff:
    """A new snapshot folded into the last :class:`Base` as a diff by container uuid.

    :meth:`add_containers` only compares (what each row counts against what it counted last
    time) and collects the rows that changed; :meth:`result` applies them in one step, so the
    base in use never shows half a snapshot. Possible when the hosts and their IP sets are the
    same as last time (see :meth:`Mirror.begin`); labels and totals are updated in place."""

    def __init__(self, mirror: Mirror, rows: dict[str, tuple[dict[str, int], dict[str, str]]], version: str) -> None:
        self.mirror = mirror
        self.rows = rows
        self.version = version
        self.seen: set[str] = set()
        self.changed: list[tuple[str, dict[str, Any] | None, Sig | None]] = []

    def add_containers(self, containers: Iterable[dict[str, Any]]) -> None:
        sigs, seen, changed = self.mirror.sigs, self.seen, self.changed
        add = seen.add
        for c in containers:
            if type(c) is not dict:
                continue
            uuid = c.get("uuid")
            if not uuid or uuid in seen:
                continue
            add(uuid)
            sig = _sig(c)
            if sigs.get(uuid) != sig:
                changed.append((uuid, c, sig))

    @property
    def size(self) -> int:
        return len(self.changed)

    def result(self) -> Base:
        mirror = self.mirror
        base, sigs = mirror.base, mirror.sigs
        assert base is not None
        for uuid in sigs.keys() - self.seen:  # gone from metadata
            self.changed.append((uuid, None, None))
        hosts = base.hosts
        for uuid, (total, labels) in self.rows.items():
            h = hosts[uuid]
            if h.total != total:
                h.total = total
            if h.labels != labels:
                h.labels = labels  # a new dict: label views taken before keep the old one
        for uuid, c, sig in self.changed:
            old = sigs.get(uuid)
            if old is not None:
                was = hosts.get(old[0])
                if was is not None:
                    _drop_member(was, uuid)
            if c is None or sig is None:
                sigs.pop(uuid, None)
                continue
            sigs[uuid] = sig
            now = hosts.get(sig[0])
            if now is not None and sig[1] not in RELEASED_STATES:
                _add_member(now, uuid, c)
        base.version = self.version
        return base


class Mirror:
    """Metadata's share of each host kept from one snapshot to the next (what :meth:`Pools.install`
    takes): a full build the first time or when the hosts change, a diff by uuid otherwise."""

    def __init__(self) -> None:
        self.base: Base | None = None
        self.sigs: dict[str, Sig] = {}

    def begin(self, hosts: Iterable[dict[str, Any]], version: str = "", *, full: bool = False) -> BaseBuilder | BaseDiff:
        rows = _host_rows(hosts)
        base = self.base
        if not full and base is not None and rows.keys() == base.hosts.keys() and \
                all(_ip_set(labels) == base.hosts[u].ips for u, (_t, labels) in rows.items()):
            return BaseDiff(self, rows, version)
        return BaseBuilder(hosts, version, rows)

    def done(self, b: BaseBuilder | BaseDiff) -> Base:
        """The result of ``b`` (from :meth:`begin`), kept for the next snapshot."""
        base = b.result()
        if isinstance(b, BaseBuilder):
            self.sigs = b.sigs
        self.base = base
        return base


# -- live pools ---------------------------------------------------------------------------------

@dataclass(slots=True)
class HostPools:
    uuid: str
    total: dict[str, int]
    used: dict[str, int]
    labels: dict[str, str]
    ips: tuple[str, ...]
    ports: dict[PortKey, dict[int, str]]
    ghost: dict[PortKey, dict[int, str]]
    require_any: tuple[tuple[str, str | None], ...]
    idx: int = 0  # place in the tie-break order
    #: one IP (0.0.0.0) and no bindings outside it: the port filter is a lookup per port. Set
    #: at install, cleared when a binding outside the set is booked (never set again until the
    #: next install: the general filter is right for every host, just slower)
    simple: bool = False

    def free(self, res: str) -> int:
        return self.total.get(res, 0) - self.used.get(res, 0)

    def port_owner(self, ip: str, proto: str, port: int) -> str | None:
        return self.ports.get((ip, proto), {}).get(port)

    def ghost_holds(self, proto: str, port: int, owner: str) -> bool:
        for (_ip, p), m in self.ghost.items():
            if p == proto:
                o = m.get(port)
                if o is not None and o != owner:
                    return True
        return False


@dataclass(slots=True)
class Booking:
    """A reservation not yet visible in metadata (the journal entry)."""

    key: str
    host: str
    uuids: set[str]
    compute: dict[str, int]
    ports: list[tuple[str, str, int, str, bool]]  # (ip, proto, port, owner, ghost)
    reply: dict[str, Any] | None
    at: float


@dataclass(frozen=True, slots=True)
class Usage:
    host: str
    resource: str
    used: int
    total: int


class Pools:
    """Every host's pools, the journal of pending bookings, and the three decisions."""

    def __init__(self, *, port_range: tuple[int, int] = PORT_RANGE, seed: int | None = None,
                 shuffle_ties: bool = False, pending_ttl: float = 600.0, tombstone_grace: float = 120.0,
                 event_cache: int = 4096) -> None:
        lo, hi = port_range
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"bad port range {lo}-{hi}")
        self.port_range = (lo, hi)
        self.rng = random.Random(seed)
        self.shuffle_ties = shuffle_ties
        self._tie: dict[str, int] = {}
        self._tie_seed = seed or 0
        self.pending_ttl = pending_ttl
        self.tombstone_grace = tombstone_grace
        self.hosts: dict[str, HostPools] = {}
        self._order: list[str] = []  # host uuids in tie-break order
        self._hosts_in_order: list[HostPools] = []
        #: per order of compute resources asked for: (idx -> key, every key sorted), key =
        #: (-free of each resource..., idx). Kept sorted across reserves and releases (the hosts
        #: they touched are re-placed by bisection), so prioritize is one walk, not a sort.
        self._ranks: OrderedDict[tuple[str, ...], tuple[list[tuple[int, ...]], list[tuple[int, ...]]]] = OrderedDict()
        self._dirty: set[int] = set()  # hosts whose used amounts changed since the ranks were right
        self.base: Base | None = None
        self._label_view: dict[str, dict[str, str]] | None = None
        self.journal: dict[str, Booking] = {}
        self.tombstones: dict[str, tuple[str, float]] = {}  # container uuid -> (host, released at)
        self._events: OrderedDict[str, dict[str, Any] | None] = OrderedDict()
        self._event_cache = event_cache
        self._released: OrderedDict[str, str] = OrderedDict()  # container uuid -> host, for idempotency
        #: bumped whenever the journal, the tombstones or the released set change (what is persisted)
        self.mutations = 0

    # -- keeping current ------------------------------------------------------------------
    @property
    def synced(self) -> bool:
        return self.base is not None

    def install(self, base: Base, now: float) -> bool:
        """Make ``base`` (metadata's share, see :class:`Mirror`) the truth, keeping the journal and
        tombstones. The live pools start as copies of the base's maps (the base stays metadata's
        alone, for the next diff). Returns whether host labels or the host set changed."""
        view = base.label_view()
        changed = self._label_view is not None and self._label_view != view
        self._label_view = view
        # bookings whose containers metadata now shows all of are counted by metadata: resolved
        for key, bk in list(self.journal.items()):
            h = base.hosts.get(bk.host)
            if h is None or bk.uuids <= h.members.keys() or now - bk.at > self.pending_ttl:
                del self.journal[key]
                self.mutations += 1
        # a tombstone ends once metadata no longer shows the container, after a grace period for a
        # metadata that has not even shown its creation yet
        for uuid, (host, at) in list(self.tombstones.items()):
            h = base.hosts.get(host)
            if (h is None or uuid not in h.members) and now - at > self.tombstone_grace:
                del self.tombstones[uuid]
                self.mutations += 1
        covered = {u: bk.host for bk in self.journal.values() for u in bk.uuids}
        skip = {u: host for u, (host, _) in self.tombstones.items()}
        skip.update(covered)
        hosts: dict[str, HostPools] = {}
        for uuid, hb in base.hosts.items():
            hosts[uuid] = HostPools(uuid, hb.total, dict(hb.used), hb.labels, hb.ips,
                                    {k: dict(v) for k, v in hb.ports.items()}, {k: dict(v) for k, v in hb.ghost.items()},
                                    _require_any(hb.labels))
        for cu, host in skip.items():
            hbase = base.hosts.get(host)
            m = hbase.members.get(cu) if hbase is not None else None
            if m is None:
                continue
            hp = hosts[host]
            self._unmember(hp, cu, m)
        for bk in self.journal.values():
            hp = hosts[bk.host]
            for res, amt in bk.compute.items():
                hp.used[res] = hp.used.get(res, 0) + amt
            for ip, proto, port, owner, ghost in bk.ports:
                (hp.ghost if ghost else hp.ports).setdefault((ip, proto), {})[port] = owner
        self.hosts = hosts
        self.base = base
        if self.shuffle_ties:
            self._tie = {u: random.Random(f"{self._tie_seed}:{u}").random() for u in hosts}  # type: ignore[misc]
        self._order = sorted(hosts, key=(lambda u: (self._tie[u], u)) if self.shuffle_ties else None)
        self._hosts_in_order = [hosts[u] for u in self._order]
        for i, hp in enumerate(self._hosts_in_order):
            hp.idx = i
            hp.simple = not hp.ghost and hp.ips == (ANY_IP,)
        self._ranks.clear()
        self._dirty.clear()
        return changed

    @staticmethod
    def _unmember(hp: HostPools, cu: str, m: Member) -> None:
        u = hp.used
        u["instanceReservation"] = max(0, u["instanceReservation"] - 1)
        u["cpuReservation"] = max(0, u["cpuReservation"] - m.cpu)
        u["memoryReservation"] = max(0, u["memoryReservation"] - m.memory)
        for ip, proto, port, ghost in m.ports:
            pm = (hp.ghost if ghost else hp.ports).get((ip, proto))
            if pm is not None and pm.get(port) == cu:
                del pm[port]

    def recount(self) -> dict[str, tuple[dict[str, int], dict[PortKey, dict[int, str]], dict[PortKey, dict[int, str]]]]:
        """(used, ports, ghost) per host computed from scratch with the install rule (for checks)."""
        if self.base is None:
            return {}
        shadow = Pools(port_range=self.port_range, pending_ttl=float("inf"), tombstone_grace=float("inf"))
        shadow.journal = {k: Booking(b.key, b.host, set(b.uuids), dict(b.compute), list(b.ports), b.reply, b.at)
                          for k, b in self.journal.items()}
        shadow.tombstones = dict(self.tombstones)
        base = self.base
        fresh = Base({}, base.version)
        for u, h in base.hosts.items():  # metadata's share again, from the members alone
            hb = fresh.hosts[u] = HostBase(h.uuid, dict(h.total), h.labels, h.ips, {r: 0 for r in COMPUTE_RESOURCES},
                                           members=h.members)
            for cu, m in h.members.items():
                hb.used["instanceReservation"] += 1
                hb.used["cpuReservation"] += m.cpu
                hb.used["memoryReservation"] += m.memory
                for ip, proto, port, ghost in m.ports:
                    (hb.ghost if ghost else hb.ports).setdefault((ip, proto), {})[port] = cu
        shadow.install(fresh, now=max([b.at for b in self.journal.values()], default=0.0))
        return {u: (h.used, h.ports, h.ghost) for u, h in shadow.hosts.items()}

    # -- the journal on disk -----------------------------------------------------------------
    def dump_journal(self, now: float, wall: float) -> dict[str, Any]:
        """What a restart must not forget: pending bookings, tombstones and the released set.
        Times are kept as ages (``now`` is the monotonic clock, ``wall`` the unix time of the dump)."""
        return {
            "format": JOURNAL_FORMAT, "saved_at": wall,
            "bookings": [{"key": b.key, "host": b.host, "uuids": sorted(b.uuids), "compute": b.compute,
                          "ports": [list(p) for p in b.ports], "reply": b.reply, "age": max(0.0, now - b.at)}
                         for b in self.journal.values()],
            "tombstones": [[u, host, max(0.0, now - at)] for u, (host, at) in self.tombstones.items()],
            "released": [[u, host] for u, host in self._released.items()],
        }

    def load_journal(self, doc: Any, now: float, wall: float) -> int:
        """Take a :meth:`dump_journal` document back (at start, before the first install); the
        number of pending bookings. A malformed document raises :class:`InputError` and changes nothing."""
        if not isinstance(doc, dict) or doc.get("format") != JOURNAL_FORMAT:
            raise InputError(f"not a scheduler journal (format {JOURNAL_FORMAT!r} expected)")
        try:
            gone = max(0.0, wall - float(doc.get("saved_at") or wall))
            journal: dict[str, Booking] = {}
            for b in doc.get("bookings") or []:
                ports = [(str(ip), str(proto), int(port), str(owner), bool(ghost))
                         for ip, proto, port, owner, ghost in b["ports"]]
                reply = b.get("reply")
                if reply is not None and not isinstance(reply, dict):
                    raise ValueError("reply must be an object")
                key = str(b["key"])
                journal[key] = Booking(key, str(b["host"]), {str(u) for u in b["uuids"]},
                                       {str(r): int(a) for r, a in b["compute"].items()}, ports, reply,
                                       now - float(b["age"]) - gone)
            tombstones = {str(u): (str(host), now - float(age) - gone) for u, host, age in doc.get("tombstones") or []}
            released = OrderedDict((str(u), str(host)) for u, host in doc.get("released") or [])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f"scheduler journal is malformed: {type(e).__name__}: {e}") from None
        self.journal.update(journal)
        self.tombstones.update(tombstones)
        self._released.update(released)
        return len(journal)

    def usage(self) -> list[Usage]:
        return [Usage(u, r, h.used.get(r, 0), h.total.get(r, 0)) for u, h in self.hosts.items() for r in h.total]

    # -- prioritize ------------------------------------------------------------------------
    def _ranked(self, order: tuple[str, ...]) -> list[tuple[int, ...]]:
        """Every host's key for ``order`` (see ``_ranks``), sorted: most free first, ties by host order."""
        hosts = self._hosts_in_order
        if self._dirty:  # bring every kept ranking up to date with the hosts that changed
            dirty, self._dirty = self._dirty, set()
            for o, (keys, ranked) in self._ranks.items():
                if len(dirty) * 8 > len(hosts):  # many changed: sorting again is cheaper
                    ranked.clear()
                    continue
                for i in dirty:
                    h = hosts[i]
                    used, total = h.used, h.total
                    new = (*[used[res] - total[res] for res in o], i)
                    old = keys[i]
                    if new != old:
                        del ranked[bisect.bisect_left(ranked, old)]
                        bisect.insort(ranked, new)
                        keys[i] = new
        r = self._ranks.get(order)
        if r is None or not r[1]:
            keys = [(*[h.used[res] - h.total[res] for res in order], i) for i, h in enumerate(hosts)]
            r = (keys, sorted(keys))
            self._ranks[order] = r
            while len(self._ranks) > 8:
                self._ranks.popitem(last=False)
        self._ranks.move_to_end(order)
        return r[1]

    def _walk(self, need: tuple[tuple[str, int], ...], checks: list[tuple[tuple[tuple[str, int, str], ...], str]],
              ctx_labels: list[dict[str, str]]) -> list[str]:
        """prioritize over the kept ranking: the hosts in rank order that pass every filter."""
        ranked = self._ranked(tuple(res for res, _ in need))
        hosts = self._hosts_in_order
        limits = tuple(-amt for _, amt in need)  # key[j] = -free: fits when key[j] <= -amount
        first = limits[0] if limits else 0
        le = operator.le
        lookups = [((ANY_IP, proto), pub, owner) for pspecs, owner in checks for proto, pub, _sip in pspecs]
        out: list[str] = []
        for k in ranked:
            if limits:
                if k[0] > first:
                    break  # ranked by the first resource: nobody after this has enough of it
                if not all(map(le, k, limits)):
                    continue
            h = hosts[k[-1]]
            if checks:
                ok = True
                if h.simple:  # one IP (0.0.0.0), no ghost bindings: a lookup per port
                    ports = h.ports
                    for pkey, pub, owner in lookups:
                        pm = ports.get(pkey)
                        if pm:
                            o = pm.get(pub)
                            if o is not None and o != owner:
                                ok = False
                                break
                else:
                    for pspecs, owner in checks:
                        if not _port_fit(h, pspecs, owner):
                            ok = False
                            break
                if not ok:
                    continue
            if h.require_any and not _labels_match(h.require_any, ctx_labels):
                continue
            out.append(h.uuid)
        return out

    def prioritize(self, req: Request, *, by_sort: bool = False) -> list[str]:
        """Host uuids that can take the request, best first (scheduler.md §4.2).

        Over the kept ranking when the request names only the standard pools; ``by_sort`` (and
        any other pool name) filters and sorts every host from scratch - the same answer, slower
        (the tests compare the two)."""
        sums: dict[str, int] = {}
        for res, amt in req.honoured_compute:
            sums[res] = sums.get(res, 0) + amt
        need = tuple(sums.items())
        checks = []
        for pr in req.ports:
            specs = [(s.protocol, s.public, s.ip if s.ip != ANY_IP else "") for s in pr.specs if s.public]
            if len({(x[2], x[0], x[1]) for x in specs}) != len(specs):
                return []  # one container cannot bind the same public port twice: no host fits
            if specs:
                checks.append((tuple(specs), pr.resource_uuid))
        ctx_labels = [{k.lower(): v.lower() for k, v in i.labels.items()} for i in req.context]
        if not by_sort and all(res in COMPUTE_RESOURCES for res, _ in need):  # every host has these pools
            return self._walk(need, checks, ctx_labels)
        keyed: list[tuple[int, ...]] = []
        hosts = self._hosts_in_order
        for idx, h in enumerate(hosts):
            total, used = h.total, h.used
            key: list[int] = []
            for res, amt in need:  # the filter and the sort key in one pass, most free first
                t = total.get(res)
                if t is None:
                    break
                free = t - used[res]
                if free < amt:
                    break
                key.append(-free)
            else:
                ok = True
                for pspecs, owner in checks:
                    if h.simple:  # one IP (0.0.0.0), no ghost bindings: a lookup per port
                        for proto, pub, _sip in pspecs:
                            m = h.ports.get((ANY_IP, proto))
                            if m:
                                o = m.get(pub)
                                if o is not None and o != owner:
                                    ok = False
                                    break
                    elif not _port_fit(h, pspecs, owner):
                        ok = False
                    if not ok:
                        break
                if not ok or (h.require_any and not _labels_match(h.require_any, ctx_labels)):
                    continue
                key.append(idx)  # ties keep the deterministic host order
                keyed.append(tuple(key))
        if need:
            keyed.sort()
        return [hosts[k[-1]].uuid for k in keyed]

    def _fits(self, h: HostPools, ip: str, s: PortSpec, owner: str) -> bool:
        if not s.public:
            return True
        if s.ip and s.ip != ANY_IP and s.ip not in h.ips:
            return True  # a binding outside the set is checked where it is booked (ghost map)
        o = h.ports.get((ip, s.protocol), {}).get(s.public)
        if o is not None and o != owner:
            return False
        return not (ip == ANY_IP and h.ghost_holds(s.protocol, s.public, owner))

    def _fitting_ip(self, h: HostPools, pr: PortRequest) -> str | None:
        publics = [(s.ip, s.protocol, s.public) for s in pr.specs if s.public]
        if len(set(publics)) != len(publics):
            return None  # one container cannot bind the same public port twice
        for ip in h.ips:
            if all(self._fits(h, ip, s, pr.resource_uuid) for s in pr.specs
                   if not s.ip or s.ip == ANY_IP or s.ip not in h.ips or s.ip == ip) and \
                    all(s.ip == ip for s in pr.specs if s.ip and s.ip != ANY_IP and s.ip in h.ips):
                return ip
        return None

    # -- reserve ---------------------------------------------------------------------------
    def _remember(self, event_id: str, reply: dict[str, Any] | None) -> None:
        if not event_id:
            return
        self._events[event_id] = reply
        self._events.move_to_end(event_id)
        while len(self._events) > self._event_cache:
            self._events.popitem(last=False)

    def reserve(self, req: Request, *, event_id: str = "", now: float = 0.0) -> dict[str, Any] | None:
        """Book the request on ``req.host_id``; the reply ``data`` (port reservations) or None.

        Idempotent per event id and per container: a redelivery, or a second reserve of the
        same containers on the same host, books nothing and returns the first reply.
        """
        if event_id and event_id in self._events:
            return self._events[event_id]
        h = self.hosts.get(req.host_id)
        if h is None:
            return None  # not synced yet: the original answers success with no data
        uuids = req.uuids
        key = f"{req.host_id}|{','.join(sorted(uuids))}" if uuids else f"{req.host_id}|event:{event_id}"
        bk = self.journal.get(key)
        if bk is not None:
            self._remember(event_id, bk.reply)
            return bk.reply
        members = self.base.hosts[req.host_id].members if self.base is not None else {}
        if uuids and all(u in members and u not in self.tombstones for u in uuids):
            reply = self._reply_from_owned(h, req)  # already running there, as metadata shows
            self._remember(event_id, reply)
            return reply
        compute = req.honoured_compute
        if not req.force:
            for res, amt in compute:
                if res in h.total and h.used.get(res, 0) + amt > h.total[res]:
                    raise SchedulerError(f"Not enough available resources on host {h.uuid} to reserve {{{res} {amt}}}")
        booked: list[tuple[str, str, int, str, bool]] = []
        reply_ports: list[dict[str, Any]] = []
        try:
            for pr in req.ports:
                if not pr.specs:
                    continue
                try:
                    allocated = self._book_ports(h, pr, booked)
                except SchedulerError:
                    if not req.force:
                        raise
                    allocated = []
                reply_ports.append({"instanceID": pr.instance_id, "allocatedIPs": allocated})
        except SchedulerError:
            for ip, proto, port, owner, ghost in booked:  # roll back this request's ports
                pm = (h.ghost if ghost else h.ports).get((ip, proto))
                if pm is not None and pm.get(port) == owner:
                    del pm[port]
            raise
        amounts: dict[str, int] = {}
        for res, amt in compute:
            if res in h.total:
                h.used[res] = h.used.get(res, 0) + amt
                amounts[res] = amounts.get(res, 0) + amt
        if amounts:
            self._dirty.add(h.idx)
        reply = {"portReservation": reply_ports} if reply_ports else None
        self.journal[key] = Booking(key, h.uuid, set(uuids), amounts, booked, reply, now)
        self.mutations += 1
        self._remember(event_id, reply)
        return reply

    def _reply_from_owned(self, h: HostPools, req: Request) -> dict[str, Any] | None:
        out = []
        given: set[tuple[str, str, int]] = set()
        for pr in req.ports:
            if not pr.specs:
                continue
            allocated = []
            for s in pr.specs:
                for (ip, proto), pm in list(h.ports.items()) + list(h.ghost.items()):
                    if proto != s.protocol:
                        continue
                    for port, owner in pm.items():
                        if owner == pr.resource_uuid and (port == s.public or not s.public) and \
                                (ip, proto, port) not in given:
                            given.add((ip, proto, port))
                            allocated.append({"allocatedIP": ip, "publicPort": port, "privatePort": s.private,
                                              "protocol": proto})
                            break
                    else:
                        continue
                    break
            out.append({"instanceID": pr.instance_id, "allocatedIPs": allocated})
        return {"portReservation": out} if out else None

    def _book_ports(self, h: HostPools, pr: PortRequest,
                    booked: list[tuple[str, str, int, str, bool]]) -> list[dict[str, Any]]:
        owner = pr.resource_uuid
        ip = self._fitting_ip(h, pr)
        if ip is None:
            if len(h.ips) > 1:
                raise SchedulerError("No available ip satisfies the port requests")
            for s in pr.specs:
                if s.public and not self._fits(h, h.ips[0], s, owner):
                    raise SchedulerError(f"Port {s.public} is already used in ip {h.ips[0]} on protocol {s.protocol}")
            raise SchedulerError("No available ip satisfies the port requests")
        out = []
        for s in pr.specs:
            target, ghost = ip, False
            if s.ip and s.ip != ANY_IP:
                target = s.ip
                if s.ip not in h.ips:
                    ghost = True
                    held = h.ghost.get((s.ip, s.protocol), {}).get(s.public) if s.public else None
                    any_held = h.ports.get((ANY_IP, s.protocol), {}).get(s.public) if s.public else None
                    if (held is not None and held != owner) or (any_held is not None and any_held != owner):
                        raise SchedulerError(f"Port {s.public} is already used in ip {s.ip} on protocol {s.protocol}")
            port = s.public or self._random_port(h, target, s.protocol, ghost)
            if ghost:
                h.simple = False
            pm = (h.ghost if ghost else h.ports).setdefault((target, s.protocol), {})
            o = pm.get(port)
            if o is not None and o != owner:
                raise SchedulerError(f"Port {port} is already used in ip {target} on protocol {s.protocol}")
            if o is None:
                pm[port] = owner
                booked.append((target, s.protocol, port, owner, ghost))
            elif (target, s.protocol, port, owner, ghost) in booked:
                raise SchedulerError(f"Port {port} is already used in ip {target} on protocol {s.protocol}")
            out.append({"allocatedIP": target, "publicPort": port, "privatePort": s.private, "protocol": s.protocol})
        return out

    def _random_port(self, h: HostPools, ip: str, proto: str, ghost: bool) -> int:
        """A port drawn uniformly from the free ones in the range; a clear error when none is left."""
        lo, hi = self.port_range
        taken = (h.ghost if ghost else h.ports).get((ip, proto), {})
        ghosts = [m for (_i, p), m in h.ghost.items() if p == proto] if ip == ANY_IP and not ghost else []

        def free(p: int) -> bool:
            return p not in taken and not any(p in g for g in ghosts)

        for _ in range(32):  # rejection sampling is uniform over the free set and cheap while it is large
            p = self.rng.randint(lo, hi)
            if free(p):
                return p
        choices = [p for p in range(lo, hi + 1) if free(p)]
        if not choices:
            raise SchedulerError(f"No free port left in {lo}-{hi} on ip {ip} protocol {proto}")
        return self.rng.choice(choices)

    # -- release ---------------------------------------------------------------------------
    def release(self, req: Request, *, event_id: str = "", now: float = 0.0) -> None:
        """Give back what ``req`` booked on ``req.host_id`` (scheduler.md §4.4); never fails.

        Idempotent per event id and per container: releasing a container twice gives back once.
        """
        if event_id and event_id in self._events:
            return
        self._remember(event_id, None)
        h = self.hosts.get(req.host_id)
        if h is None:
            return
        uuids = req.uuids
        if uuids and all(self._released.get(u) == h.uuid for u in uuids):
            return  # released before
        self.mutations += 1
        for u in uuids:
            self._released[u] = h.uuid
            self._released.move_to_end(u)
        while len(self._released) > 4 * self._event_cache:
            self._released.popitem(last=False)
        members = self.base.hosts[h.uuid].members if self.base is not None else {}
        for res, amt in req.honoured_compute:
            if res in h.used:
                h.used[res] = max(0, h.used[res] - amt)
        if req.honoured_compute:
            self._dirty.add(h.idx)
        for pr in req.ports:
            for s in pr.specs:
                self._free_port(h, pr.resource_uuid, s)
        # the journal and tombstones follow, so a recount agrees with what we just did
        left = dict(req.honoured_compute)
        for key, bk in list(self.journal.items()):
            if bk.host != h.uuid or not (bk.uuids & uuids):
                continue
            for res, amt in list(left.items()):
                take = min(amt, bk.compute.get(res, 0))
                if res in bk.compute:
                    bk.compute[res] -= take
                left[res] = amt - take
            bk.ports = [p for p in bk.ports if p[3] not in uuids or self._still_owned(h, p)]
            bk.uuids -= uuids
            if not bk.uuids:
                del self.journal[key]
        for u in uuids:
            self.tombstones[u] = (h.uuid, now)
        # anything metadata counts for these containers but the request did not give back
        for u in uuids:
            m = members.get(u)
            if m is not None:
                for ip, proto, port, ghost in m.ports:
                    pm = (h.ghost if ghost else h.ports).get((ip, proto))
                    if pm is not None and pm.get(port) == u:
                        del pm[port]

    @staticmethod
    def _still_owned(h: HostPools, p: tuple[str, str, int, str, bool]) -> bool:
        ip, proto, port, owner, ghost = p
        return (h.ghost if ghost else h.ports).get((ip, proto), {}).get(port) == owner

    @staticmethod
    def _free_port(h: HostPools, owner: str, s: PortSpec) -> None:
        ip = s.ip or ANY_IP
        maps = list(h.ports.items()) + list(h.ghost.items())
        for (pip, proto), pm in maps:
            if proto != s.protocol:
                continue
            if ip != ANY_IP and pip != ip:
                continue
            if s.public:
                if pm.get(s.public) == owner:
                    del pm[s.public]
            else:  # the public port is not known: free what this owner holds for the protocol
                for port in [p for p, o in pm.items() if o == owner]:
                    del pm[port]


def _port_fit(h: HostPools, specs: tuple[tuple[str, int, str], ...], owner: str) -> bool:
    """Some IP of the host has every requested public port free (the prioritize filter)."""
    ports, ips = h.ports, h.ips
    for ip in ips:
        for proto, pub, sip in specs:
            if sip:
                if sip not in ips:  # bound outside the set (a ghost binding): what reserve would refuse
                    g = h.ghost.get((sip, proto))
                    o = g.get(pub) if g else None
                    m = ports.get((ANY_IP, proto))
                    o2 = m.get(pub) if m else None
                    if (o is not None and o != owner) or (o2 is not None and o2 != owner):
                        break
                    continue
                if sip != ip:
                    break
            m = ports.get((ip, proto))
            if m:
                o = m.get(pub)
                if o is not None and o != owner:
                    break
            if ip == ANY_IP and h.ghost and h.ghost_holds(proto, pub, owner):
                break
        else:
            return True
    return False


def _labels_match(required: tuple[tuple[str, str | None], ...], ctx: list[dict[str, str]]) -> bool:
    for labels in ctx:
        for k, v in required:
            if k in labels and (v is None or labels[k] == v):
                return True
    return False
