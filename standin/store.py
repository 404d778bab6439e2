"""Resources of the stand-in server, kept in SQLite (WAL) and cached in memory.

One table of resources (kind, id, JSON), one of key/value items (revision, id counters, the
environment, config items, health reports). Every write goes to SQLite inside a transaction
that :meth:`Store.commit` closes, bumping the global integer **revision** once per
operation, so a restart of the stand-in loses nothing that was acknowledged.

A write the database refuses (a full disk, an I/O error) rolls the open transaction back in
SQLite *and* in memory, then raises :class:`StorageError`: nothing half-stored stays visible,
and the next operation starts a fresh transaction, so the server recovers by itself once the
disk has room again.
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid as uuidlib
from collections.abc import Iterator
from typing import Any, Protocol

import orjson

from agents.errors import CorralError, InputError

__all__ = ["ID_PREFIX", "KINDS", "PLURALS", "Committed", "Resources", "StorageError", "Store"]


class StorageError(CorralError):
    """The state database refused a write; the operation was rolled back. ``full`` when the disk
    (or the file size limit) is what refused it."""

    def __init__(self, message: str, *, full: bool = False) -> None:
        super().__init__(message)
        self.full = full


def _storage_error(e: sqlite3.Error) -> StorageError:
    code = getattr(e, "sqlite_errorcode", None)
    full = code == getattr(sqlite3, "SQLITE_FULL", 13) or "full" in str(e)
    if full:
        return StorageError(f"disk full: the change was not stored ({e})", full=True)
    return StorageError(f"storage error: the change was not stored ({e})")

ID_PREFIX = {"host": "1h", "stack": "1st", "service": "1s", "container": "1i", "network": "1n"}
KINDS = tuple(ID_PREFIX)
PLURALS = {k + "s": k for k in KINDS}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (kind TEXT NOT NULL, id TEXT NOT NULL, data TEXT NOT NULL,
                                      PRIMARY KEY (kind, id));
CREATE TABLE IF NOT EXISTS kv (ns TEXT NOT NULL, k TEXT NOT NULL, v TEXT NOT NULL, PRIMARY KEY (ns, k));
"""


def _id_num(rid: str) -> int:
    digits = "".join(ch for ch in rid if ch.isdigit())
    try:
        return int(digits[1:] or 0) if digits else 0
    except ValueError:  # pragma: no cover
        return 0


class Resources(Protocol):
    """What renderers read: a :class:`Store` (work in progress) or a :class:`Committed` view."""

    revision: int

    @property
    def env(self) -> dict[str, Any]: ...

    def all(self, kind: str) -> list[dict[str, Any]]: ...


class Committed:
    """The resources as of the last commit. Stored dicts are never mutated in place, so a shallow
    copy of the id maps is a consistent snapshot; readers that must not see an operation in
    progress (the metadata answers, while an allocation waits for the scheduler) read this.
    The id maps come in creation order (the store keeps them so), so ``all`` is one copy."""

    def __init__(self, res: dict[str, dict[str, dict[str, Any]]], env: dict[str, Any], revision: int) -> None:
        self._res = res
        self._env = env
        self.revision = revision

    @property
    def env(self) -> dict[str, Any]:
        return self._env

    def all(self, kind: str) -> list[dict[str, Any]]:
        return list(self._res[kind].values())


class Store:
    """In-memory view of every resource, written through to SQLite."""

    def __init__(self, path: str = "") -> None:
        self.path = path
        self.db = sqlite3.connect(path or ":memory:", isolation_level=None, check_same_thread=False)
        if path:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self._in_txn = False
        self._changes: list[str] = []
        self._reload()
        self._snapshot_due = True
        self.committed = self._snapshot()
        self.fresh = "environment" not in self._kv.get("meta", {})
        if self.fresh:
            self.kv_set("meta", "environment", self.new_environment())
            self.commit("init", bump=False)

    # -- environment ------------------------------------------------------------------
    @staticmethod
    def new_environment(name: str = "Default", uuid: str | None = None) -> dict[str, Any]:
        return {"id": "1a5", "uuid": uuid or f"env-{uuidlib.uuid4()}", "name": name,
                "system_stack_uuid": None, "region_name": ""}

    @property
    def env(self) -> dict[str, Any]:
        env: dict[str, Any] = self.kv_get("meta", "environment") or self.new_environment()
        return env

    # -- transactions -----------------------------------------------------------------
    def _begin(self) -> None:
        if not self._in_txn:
            self._exec("BEGIN")
            self._in_txn = True

    def _exec(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        """One write statement; a refusal undoes the whole operation (database and memory)."""
        try:
            self.db.execute(sql, params)
        except sqlite3.Error as e:
            err = _storage_error(e)
            self.rollback()
            raise err from e

    def commit(self, reason: str = "", *, bump: bool = True) -> int:
        """Close the open transaction; bump the revision when anything changed."""
        if self._changes and bump:
            self.revision += 1
            self.kv_set("meta", "revision", self.revision)
            self._snapshot_due = True
        self._changes.clear()
        if self._in_txn:
            self._exec("COMMIT")
            self._in_txn = False
        if self._snapshot_due:
            self.committed = self._snapshot()
        return self.revision

    def _snapshot(self) -> Committed:
        self._snapshot_due = False
        return Committed({k: dict(v) for k, v in self._res.items()}, dict(self.env), self.revision)

    def rollback(self) -> None:
        """Throw away the open transaction and reload the cache from SQLite."""
        if self._in_txn:
            self._in_txn = False
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.OperationalError:  # SQLite already rolled back (a failed COMMIT on a full disk)
                pass
        self._changes.clear()
        self._reload()
        self._snapshot_due = False  # the committed view is still right

    def _reload(self) -> None:
        self._clear_resources()
        self._kv: dict[str, dict[str, Any]] = {}
        rows: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
        for kind, _rid, data in self.db.execute("SELECT kind, id, data FROM resources"):
            if kind in rows:
                rows[kind].append(orjson.loads(data))
        for kind, objs in rows.items():
            objs.sort(key=lambda o: _id_num(o["id"]))
            for o in objs:
                self._put_mem(kind, o)
        for ns, k, v in self.db.execute("SELECT ns, k, v FROM kv"):
            self._kv.setdefault(ns, {})[k] = orjson.loads(v)
        self.revision = int(self.kv_get("meta", "revision", 0))

    # -- the in-memory maps and their indexes ---------------------------------------------
    # Every lookup a creation makes (by uuid, by name, the next free container address, the
    # list in creation order) is a dict access, so loading n resources costs O(n), not O(n^2).

    def _clear_resources(self) -> None:
        #: id -> object per kind, kept in creation order (``all`` is one copy, no sort)
        self._res: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in KINDS}
        self._last_num: dict[str, int] = dict.fromkeys(KINDS, -1)
        self._by_uuid: dict[str, dict[str, str]] = {k: {} for k in KINDS}  # uuid -> id
        self._by_name: dict[str, dict[str, dict[str, None]]] = {k: {} for k in KINDS}  # name -> ids
        self._by_lname: dict[str, dict[str, dict[str, None]]] = {k: {} for k in KINDS}  # lower(name) -> ids
        self._ips: dict[str, int] = {}  # container primary_ip -> how many containers hold it
        #: per subnet: host offset below which every address is known to be held (reset on a release)
        self.ip_floor: dict[str, int] = {}

    def _put_mem(self, kind: str, obj: dict[str, Any]) -> None:
        objs = self._res[kind]
        rid = obj["id"]
        old = objs.get(rid)
        if old is not None:
            self._unindex(kind, old)
            objs[rid] = obj  # keeps its place in the creation order
        else:
            num = _id_num(rid)
            if num < self._last_num[kind]:  # an id older than the newest (a state load): re-sort once
                objs[rid] = obj
                self._res[kind] = dict(sorted(objs.items(), key=lambda kv: _id_num(kv[0])))
            else:
                objs[rid] = obj
                self._last_num[kind] = num
        self._index(kind, obj)

    def _del_mem(self, kind: str, rid: str) -> dict[str, Any] | None:
        o = self._res[kind].pop(rid, None)
        if o is not None:
            self._unindex(kind, o)
        return o

    def _index(self, kind: str, o: dict[str, Any]) -> None:
        rid = o["id"]
        u = o.get("uuid")
        if u:
            self._by_uuid[kind].setdefault(str(u), rid)
        name = o.get("name")
        if isinstance(name, str):
            self._by_name[kind].setdefault(name, {})[rid] = None
            self._by_lname[kind].setdefault(name.lower(), {})[rid] = None
        if kind == "container":
            ip = o.get("primary_ip")
            if ip:
                self._ips[ip] = self._ips.get(ip, 0) + 1

    def _unindex(self, kind: str, o: dict[str, Any]) -> None:
        rid = o["id"]
        u = o.get("uuid")
        if u and self._by_uuid[kind].get(str(u)) == rid:
            del self._by_uuid[kind][str(u)]
            for other in self._res[kind].values():  # another object with that uuid (not seen in practice)
                if other.get("uuid") == u and other["id"] != rid:
                    self._by_uuid[kind][str(u)] = other["id"]
                    break
        name = o.get("name")
        if isinstance(name, str):
            for ix, key in ((self._by_name[kind], name), (self._by_lname[kind], name.lower())):
                ids = ix.get(key)
                if ids is not None:
                    ids.pop(rid, None)
                    if not ids:
                        del ix[key]
        if kind == "container":
            ip = o.get("primary_ip")
            if ip and ip in self._ips:
                self._ips[ip] -= 1
                if not self._ips[ip]:
                    del self._ips[ip]
                    self.ip_floor.clear()  # an address came free: the next allocation looks from the start

    def ip_used(self, ip: str) -> bool:
        """Whether some container has ``ip`` as its primary address."""
        return ip in self._ips

    def _first_named(self, kind: str, ids: dict[str, None] | None) -> dict[str, Any] | None:
        if not ids:
            return None
        return self._res[kind][min(ids, key=_id_num)]

    @property
    def dirty(self) -> bool:
        return bool(self._changes)

    def touch(self, what: str) -> None:
        """Record a change that is not a resource write (forces a revision bump on commit)."""
        self._begin()
        self._changes.append(what)

    def close(self) -> None:
        """Close the database; a transaction still open belongs to an unfinished operation: dropped."""
        if self._in_txn:
            self._in_txn = False
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
        self.db.close()

    # -- key/value --------------------------------------------------------------------
    def kv_get(self, ns: str, k: str, default: Any = None) -> Any:
        return self._kv.get(ns, {}).get(k, default)

    def kv_all(self, ns: str) -> dict[str, Any]:
        return dict(self._kv.get(ns, {}))

    def kv_set(self, ns: str, k: str, v: Any) -> None:
        self._begin()
        self._kv.setdefault(ns, {})[k] = v
        self._exec("INSERT OR REPLACE INTO kv (ns, k, v) VALUES (?, ?, ?)", (ns, k, orjson.dumps(v)))
        if ns == "meta" and k == "environment":
            self._snapshot_due = True

    def kv_del(self, ns: str, k: str) -> None:
        self._begin()
        self._kv.get(ns, {}).pop(k, None)
        self._exec("DELETE FROM kv WHERE ns = ? AND k = ?", (ns, k))

    def next_number(self, kind: str) -> int:
        n = int(self.kv_get("counter", kind, 0)) + 1
        self.kv_set("counter", kind, n)
        return n

    def next_id(self, kind: str) -> str:
        return f"{ID_PREFIX[kind]}{self.next_number(kind)}"

    # -- resources --------------------------------------------------------------------
    def all(self, kind: str) -> list[dict[str, Any]]:
        """Every resource of a kind, in creation order."""
        return list(self._res[kind].values())

    def count(self, kind: str) -> int:
        return len(self._res[kind])

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for kind in KINDS:
            for o in self.all(kind):
                yield kind, o

    def by_id(self, kind: str, rid: str) -> dict[str, Any] | None:
        return self._res[kind].get(rid)

    def by_uuid(self, kind: str, uuid: str | None) -> dict[str, Any] | None:
        if not uuid:
            return None
        rid = self._by_uuid[kind].get(uuid)
        return None if rid is None else self._res[kind].get(rid)

    def by_name(self, kind: str, name: str) -> dict[str, Any] | None:
        """The oldest resource of a kind with exactly this name."""
        return self._first_named(kind, self._by_name[kind].get(name))

    def find(self, kind: str, ref: str) -> dict[str, Any] | None:
        """Look a resource up by id, uuid, name ("stack/service" for services), case-insensitive last."""
        objs = self._res[kind]
        if ref in objs:
            return objs[ref]
        o = self.by_uuid(kind, ref)
        if o is not None:
            return o
        if kind == "service" and "/" in ref:
            stack_ref, _, name = ref.partition("/")
            st = self.find("stack", stack_ref)
            if st is None:
                return None
            cands = [o for o in objs.values() if o.get("stack_uuid") == st["uuid"]]
            for o in cands:
                if o.get("name") == name:
                    return o
            for o in cands:
                if str(o.get("name", "")).lower() == name.lower():
                    return o
            return None
        return self.by_name(kind, ref) or self._first_named(kind, self._by_lname[kind].get(ref.lower()))

    def get(self, kind: str, ref: str) -> dict[str, Any]:
        o = self.find(kind, ref)
        if o is None:
            raise InputError(f"no {kind} {ref!r}")
        return o

    def put(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        if kind not in self._res:
            raise InputError(f"unknown resource kind {kind!r}")
        self._begin()
        self._put_mem(kind, obj)
        self._snapshot_due = True
        self._exec("INSERT OR REPLACE INTO resources (kind, id, data) VALUES (?, ?, ?)",
                   (kind, obj["id"], orjson.dumps(obj)))
        self._changes.append(f"{kind}:{obj['id']}")
        return obj

    def delete(self, kind: str, rid: str) -> dict[str, Any] | None:
        self._begin()
        o = self._del_mem(kind, rid)
        self._snapshot_due = True
        self._exec("DELETE FROM resources WHERE kind = ? AND id = ?", (kind, rid))
        if o is not None:
            self._changes.append(f"-{kind}:{rid}")
        return o

    def wipe(self) -> None:
        """Delete every resource and key/value item except the revision (which keeps growing)."""
        self._begin()
        self._exec("DELETE FROM resources")
        self._exec("DELETE FROM kv WHERE ns != 'meta' OR k != 'revision'")
        rev = self.revision
        self._snapshot_due = True
        self._clear_resources()
        self._kv = {"meta": {"revision": rev}}
        self._changes.append("wipe")
