"""The stand-in server's journal: every interesting thing that happened, in order.

Entries are ``{seq, t, kind, conn, key, name, id, data, status}`` kept in memory (bounded)
and, with ``--journal FILE``, appended as JSON lines. :meth:`Journal.wait` long-polls for a
matching entry so tests never sleep.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, TextIO

import orjson

__all__ = ["KINDS", "Journal"]

KINDS = (
    "http", "ws-in", "ws-out", "call", "reply", "late-reply", "serviceevent", "externalhostevent",
    "config-applied", "fault", "mutation", "conn", "allocation",
)


def _match(e: dict[str, Any], kind: str | None, name: str | None, since: int, eid: str | None,
           status: str | None, conn: str | None) -> bool:
    if e["seq"] <= since:
        return False
    if kind and e["kind"] != kind:
        return False
    if name and e.get("name") != name:
        return False
    if eid and e.get("id") != eid:
        return False
    if status and e.get("status") != status:
        return False
    return not (conn and str(e.get("conn")) != conn)


class Journal:
    def __init__(self, path: str = "", maxlen: int = 200_000) -> None:
        self.seq = 0
        self._entries: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self._changed = asyncio.Event()
        self._waiters = 0
        self._file: TextIO | None = open(path, "a", buffering=1 << 16) if path else None
        self._flush_scheduled = False

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._file is not None:
            try:
                self._file.flush()
            except OSError:  # pragma: no cover
                pass

    def _schedule_flush(self) -> None:
        """Lines reach the file within 50 ms, in one write per burst (not one syscall per entry)."""
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_later(0.05, self.flush)

    def add(self, kind: str, *, name: str | None = None, id: str | None = None, conn: str | None = None,
            key: str | None = None, data: Any = None, status: str | None = None) -> dict[str, Any]:
        self.seq += 1
        e = {"seq": self.seq, "t": time.time(), "kind": kind, "conn": conn, "key": key, "name": name,
             "id": id, "data": data, "status": status}
        self._entries.append(e)
        if self._file is not None:
            try:
                self._file.write(orjson.dumps(e, default=str).decode() + "\n")
            except (OSError, TypeError):  # pragma: no cover - journal file trouble must not stop serving
                pass
            self._schedule_flush()
        if self._waiters:  # wake long-polls (only when someone waits: this runs per frame under load)
            ev, self._changed = self._changed, asyncio.Event()
            ev.set()
        return e

    def query(self, *, kind: str | None = None, name: str | None = None, since: int = 0, id: str | None = None,
              status: str | None = None, conn: str | None = None, limit: int = 0) -> list[dict[str, Any]]:
        out = [e for e in self._entries if _match(e, kind, name, since, id, status, conn)]
        if limit > 0:
            out = out[-limit:]
        return out

    async def wait(self, *, kind: str | None = None, name: str | None = None, since: int = 0,
                   id: str | None = None, status: str | None = None, conn: str | None = None,
                   timeout: float = 10.0) -> dict[str, Any] | None:
        """The first entry after ``since`` that matches, waiting up to ``timeout`` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        scanned = since
        while True:
            fresh: list[dict[str, Any]] = []
            for e in reversed(self._entries):  # only what arrived since the last look
                if e["seq"] <= scanned:
                    break
                fresh.append(e)
            hit: dict[str, Any] | None = next(
                (f for f in reversed(fresh) if _match(f, kind, name, since, id, status, conn)), None)
            if hit is not None:
                return hit
            scanned = max(scanned, self.seq)
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return None
            changed = self._changed
            self._waiters += 1
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                return None
            finally:
                self._waiters -= 1
