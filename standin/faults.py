"""Injected faults (server-protocol.md §7.6).

A fault has a type, parameters, and a scope: the next ``count`` matching requests/frames,
or every match for ``for`` seconds (or until cleared), on one connection or all, hit with
probability ``rate``. The app asks :meth:`Faults.take` at each decision point.
"""

from __future__ import annotations

import fnmatch
import random
import time
from dataclasses import dataclass, field
from typing import Any

from agents.config import parse_duration
from agents.errors import InputError

__all__ = ["MALFORMED_KINDS", "TYPES", "Fault", "Faults", "parse_duration"]

TYPES = (
    "ws-drop", "ws-stall", "no-pings", "no-pongs", "delay-events", "duplicate-events", "reorder-events",
    "drop-replies", "http", "handshake-delay", "auth-reject", "malformed", "truncate-configcontent",
    "config-storm",
)
MALFORMED_KINDS = ("bad-json", "not-object", "array-previousIds", "missing-name", "huge-data", "binary-frame",
                   "wrong-time-type")


@dataclass
class Fault:
    id: str
    type: str
    params: dict[str, Any] = field(default_factory=dict)
    count: int | None = None
    until: float | None = None
    conn: str = "all"
    rate: float = 1.0
    created: float = field(default_factory=time.time)
    hits: int = 0

    def alive(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.count is not None and self.count <= 0:
            return False
        return not (self.until is not None and now >= self.until)

    def public(self) -> dict[str, Any]:
        left = None if self.until is None else max(0.0, self.until - time.monotonic())
        return {"id": self.id, "type": self.type, "params": self.params, "count": self.count,
                "for_left_s": left, "conn": self.conn, "rate": self.rate, "hits": self.hits,
                "active": self.alive()}


class Faults:
    def __init__(self, seed: int = 0) -> None:
        self._faults: dict[str, Fault] = {}
        self._n = 0
        self._rnd = random.Random(seed)

    def add(self, type: str, params: dict[str, Any] | None = None, *, count: int | None = None,
            for_s: float | None = None, conn: str = "all", rate: float = 1.0) -> Fault:
        if type not in TYPES:
            raise InputError(f"unknown fault {type!r}; known: {', '.join(TYPES)}")
        if not 0.0 <= rate <= 1.0:
            raise InputError("rate must be between 0 and 1")
        if count is not None and count < 0:
            raise InputError("count must be >= 0")
        self._n += 1
        f = Fault(id=f"f{self._n}", type=type, params=dict(params or {}), count=count,
                  until=None if for_s is None else time.monotonic() + for_s, conn=str(conn or "all"), rate=rate)
        self._faults[f.id] = f
        return f

    def __bool__(self) -> bool:
        return bool(self._faults)

    def __len__(self) -> int:
        return len(self._faults)

    def all(self) -> list[Fault]:
        return list(self._faults.values())

    def clear(self, fid: str | None = None) -> int:
        if fid is None:
            n = len(self._faults)
            self._faults.clear()
            return n
        return 1 if self._faults.pop(fid, None) is not None else 0

    def _candidates(self, type: str, conn: str | None, path: str | None) -> list[Fault]:
        now = time.monotonic()
        out = []
        for f in list(self._faults.values()):
            if f.type != type or not f.alive(now):
                continue
            if conn is not None and f.conn not in ("all", "", conn):
                continue
            if path is not None:
                glob = str(f.params.get("path") or "*")
                if not (fnmatch.fnmatchcase(path, glob) or fnmatch.fnmatchcase(path, "*" + glob.lstrip("*"))):
                    continue
            out.append(f)
        return out

    def active(self, type: str, conn: str | None = None) -> Fault | None:
        """A live fault of this type for this connection, without consuming it (state-like faults)."""
        c = self._candidates(type, conn, None)
        return c[0] if c else None

    def take(self, type: str, *, conn: str | None = None, path: str | None = None) -> Fault | None:
        """Consume one hit of a matching fault (respecting rate and count)."""
        for f in self._candidates(type, conn, path):
            if f.rate < 1.0 and self._rnd.random() >= f.rate:
                continue
            if f.count is not None:
                f.count -= 1
            f.hits += 1
            return f
        return None
