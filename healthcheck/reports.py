"""HAProxy rows -> health reports, and the pipeline that delivers them to the server.

:class:`Tracker` is pure (no I/O, no clock): fed the rows of one poll, it returns the reports
to send (healthcheck.md §4.2). Rows reduce to UP, DOWN, IGNORE or "not yet" (a check that has
not finished its first check, or is going up without ever having been reported):

* ``UP``/``UP x/y`` -> UP; ``DOWN``/``DOWN x/y`` -> DOWN; ``MAINT*``, ``DRAIN``, ``NOLB``,
  ``no check`` -> IGNORE.
* ``check_status`` ``INI``/``UNK``/empty: the first check has not finished, report nothing.
* ``DOWN x/y`` with a passing ``check_status`` is going up: a check never reported stays quiet.
* A report goes out when the reduced state differs from the last one sent.

:class:`Reporter` posts them: a per-check mailbox where the latest state wins, a bounded pool
of workers (one request per check in flight, so a check's reports stay in order, and a slow
POST never delays another check), retries with back-off on network errors, 5xx, 409 and 429,
three tries for other 4xx until the state or the metadata changes. Nothing is dropped while
the server is away: when it returns, the latest state of every check is delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass

import orjson

from agents.backoff import Backoff
from agents.errors import ApiError, TransportError
from agents.log import get_logger
from agents.metrics import counter, gauge, histogram
from healthcheck.haproxy import StatRow

__all__ = ["Report", "Reporter", "Tracker", "reduce_row", "report_body", "report_dict"]

log = get_logger(__name__)
_SENT = counter("healthcheck", "reports", "Reports by state and outcome", ["state", "outcome"])
_LATENCY = histogram("healthcheck", "report_seconds", "Time from observing a state to the server accepting it",
                     buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
_PENDING = gauge("healthcheck", "reports_pending", "Checks with a report not yet delivered")

PASS = {"L4OK", "L6OK", "L7OK", "L7OKC"}
UNKNOWN = {"", "INI", "UNK"}


def reduce_row(status: str, check_status: str) -> str:
    """``UP``, ``DOWN``, ``IGNORE`` or ``""`` (nothing definite yet)."""
    head = status.split(" ", 1)[0]
    if head == "UP":
        red = "UP"
    elif head == "DOWN":
        red = "DOWN"
    else:
        return "IGNORE"
    if check_status in UNKNOWN:
        return ""
    return red


@dataclass
class _Track:
    last_sent: str | None = None
    last_seen: str = ""
    arming: bool = True  # (re)armed: wait for a definite verdict (UP, or DOWN from a failed check)
    resync: bool = False  # its state was restored from a previous run: the first report is a re-send


@dataclass(frozen=True)
class Report:
    uuid: str  # <host>_<container>_<startCount>
    state: str  # UP / DOWN (INIT with --emit-init)
    observed: float  # wall-clock seconds when the state was seen
    reason: str = ""
    resync: bool = False  # first report of a state restored from a previous run (rate-limited)


def report_dict(r: Report) -> dict[str, object]:
    """The original's body, keys in its order (orjson keeps the order and writes compact JSON)."""
    return {"externalTimestamp": int(r.observed), "healthcheckUuid": r.uuid, "reportedHealth": r.state}


def report_body(r: Report) -> bytes:
    """The exact bytes the original sends."""
    return orjson.dumps(report_dict(r))


class Tracker:
    """Per-check state machine over successive polls (pure)."""

    def __init__(self, prefix: str = "cattle-", emit_init: bool = False) -> None:
        self.prefix = prefix
        self.emit_init = emit_init
        self.checks: dict[str, _Track] = {}

    def sync(self, names: Iterable[str]) -> None:
        """The checks that exist now: new ones start unreported, gone ones are forgotten (no report)."""
        keep = set(names)
        for n in list(self.checks):
            if n not in keep:
                del self.checks[n]
        for n in keep:
            self.checks.setdefault(n, _Track())

    def rearm(self, names: Iterable[str]) -> None:
        """These checks were (re)added to HAProxy and start over from a forced DOWN."""
        for n in names:
            t = self.checks.get(n)
            if t is not None:
                t.arming = True

    def mark_resync(self, names: Iterable[str]) -> None:
        for n in names:
            t = self.checks.get(n)
            if t is not None and t.last_sent is None:
                t.resync = True

    def last_sent(self) -> dict[str, str]:
        return {n: t.last_sent for n, t in self.checks.items() if t.last_sent}

    def set_sent(self, states: dict[str, str]) -> None:
        for n, st in states.items():
            if n in self.checks:
                self.checks[n].last_sent = st

    def observe(self, rows: Iterable[StatRow], now: float) -> list[Report]:
        out: list[Report] = []
        for r in rows:
            t = self.checks.get(r.name)
            if t is None:
                continue  # not ours, or being armed/removed
            red = reduce_row(r.status, r.check_status)
            if red == "IGNORE":
                if t.last_seen != "IGNORE":
                    log.warning("check in maintenance or disabled, not reported", check=r.name, status=r.status)
                t.last_seen = red
                continue
            t.last_seen = red
            if not red:
                continue
            if t.arming:
                if red == "DOWN" and r.check_status in PASS:
                    continue  # going up after arming: its first verdict is UP or a real failure
                t.arming = False
            if red == t.last_sent:
                continue
            uuid = r.name[len(self.prefix):] if r.name.startswith(self.prefix) else r.name
            reason = ""
            if red == "DOWN":
                reason = " ".join(x for x in (r.check_status, r.check_code, r.last_chk or r.check_desc) if x)
                log.info("check down", check=uuid, status=r.status, reason=reason)
            if red == "UP" and self.emit_init and t.last_sent != "INIT":
                out.append(Report(uuid, "INIT", now))
            out.append(Report(uuid, red, now, reason, resync=t.resync))
            t.resync = False
            t.last_sent = red
        return out


Poster = Callable[[Report], Awaitable[object]]


@dataclass
class _Box:
    latest: Report
    in_queue: bool = False
    in_flight: bool = False
    attempts: int = 0  # attempts of a non-retryable 4xx for the current state
    parked: bool = False
    backoff: Backoff | None = None
    retry_handle: asyncio.TimerHandle | None = None


class Reporter:
    """Deliver reports: latest state per check wins, N concurrent POSTs, retries forever."""

    def __init__(self, post: Poster, *, concurrency: int = 8, timeout: float = 10.0,
                 retry_min: float = 1.0, retry_max: float = 30.0, resync_rate: float = 0.0) -> None:
        self.post = post
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.boxes: dict[str, _Box] = {}
        self.resync_rate = resync_rate
        self._next_slot = 0.0
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self.sent = 0
        self.failed = 0

    @property
    def pending(self) -> int:
        return len(self.boxes)

    def submit(self, r: Report) -> None:
        box = self.boxes.get(r.uuid)
        if box is None:
            self.boxes[r.uuid] = box = _Box(r)
        else:
            if box.latest.state != r.state:
                box.attempts, box.parked = 0, False
            box.latest = r
        _PENDING.set(len(self.boxes))
        if box.in_flight or box.parked or box.retry_handle is not None:
            return
        if r.resync and self.resync_rate > 0:
            loop = asyncio.get_running_loop()
            slot = max(loop.time(), self._next_slot)
            self._next_slot = slot + 1.0 / self.resync_rate
            if slot > loop.time():
                self._later(r.uuid, box, slot - loop.time())
                return
        self._enqueue(r.uuid)

    def metadata_changed(self, live: Collection[str] | None = None) -> None:
        """A 403 may mean the reporter map moved: try parked reports again.

        ``live``: the report uuids of the checks in the new snapshot. A parked report of a check
        that is gone is dropped: retrying it can only be refused again, and keeping it would grow
        the mailboxes with every removed container."""
        for uuid, box in list(self.boxes.items()):
            if not box.parked:
                continue
            if live is not None and uuid not in live:
                if box.retry_handle is not None:
                    box.retry_handle.cancel()
                del self.boxes[uuid]
                continue
            box.parked, box.attempts = False, 0
            self._enqueue(uuid)
        _PENDING.set(len(self.boxes))

    def _enqueue(self, uuid: str) -> None:
        box = self.boxes.get(uuid)
        if box is None or box.in_queue:
            return
        box.in_queue = True
        self._queue.put_nowait(uuid)

    def _retry_later(self, uuid: str, box: _Box) -> None:
        if box.backoff is None:
            box.backoff = Backoff(self.retry_min, self.retry_max, reset_after=1e9)
        self._later(uuid, box, box.backoff.next())

    def _later(self, uuid: str, box: _Box, delay: float) -> None:
        def fire() -> None:
            box.retry_handle = None
            if self.boxes.get(uuid) is box and not box.parked:
                self._enqueue(uuid)

        box.retry_handle = asyncio.get_running_loop().call_later(delay, fire)

    async def run(self, stop: asyncio.Event) -> None:
        workers = [asyncio.create_task(self._worker()) for _ in range(self.concurrency)]
        try:
            await stop.wait()
        finally:
            # in-flight POSTs get a moment to finish
            busy = [b for b in self.boxes.values() if b.in_flight]
            if busy:
                deadline = time.monotonic() + 5
                while any(b.in_flight for b in busy) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            for w in workers:
                w.cancel()
            for w in workers:
                with contextlib.suppress(asyncio.CancelledError):
                    await w
            for b in self.boxes.values():
                if b.retry_handle is not None:
                    b.retry_handle.cancel()

    async def _worker(self) -> None:
        while True:
            uuid = await self._queue.get()
            box = self.boxes.get(uuid)
            if box is None:
                continue
            box.in_queue = False
            if box.in_flight or box.parked:
                continue
            rep = box.latest
            box.in_flight = True
            ok = False
            try:
                async with asyncio.timeout(self.timeout):
                    await self.post(rep)
                ok = True
            except ApiError as e:
                self.failed += 1
                _SENT.labels(rep.state, str(e.status)).inc()
                if e.status in (409, 429) or e.status >= 500:
                    log.warning("report refused, retrying", check=uuid, state=rep.state, status=e.status)
                    self._retry_later(uuid, box)
                else:
                    box.attempts += 1
                    if box.attempts >= 3:
                        box.parked = True
                        log.error("report rejected, parked until the state or metadata changes", check=uuid,
                                  state=rep.state, status=e.status, body=e.body[:200])
                    else:
                        self._retry_later(uuid, box)
            except (TransportError, TimeoutError, OSError) as e:
                self.failed += 1
                _SENT.labels(rep.state, "error").inc()
                log.warning("report failed, retrying", check=uuid, state=rep.state, error=str(e) or type(e).__name__)
                self._retry_later(uuid, box)
            except asyncio.CancelledError:
                box.in_flight = False
                raise
            except Exception as e:  # a bug in a poster must not kill the worker
                self.failed += 1
                log.error("report crashed, retrying", check=uuid, error=repr(e))
                self._retry_later(uuid, box)
            finally:
                box.in_flight = False
            if ok:
                self.sent += 1
                _SENT.labels(rep.state, "ok").inc()
                _LATENCY.observe(max(0.0, time.time() - rep.observed))
                if box.latest is rep:
                    del self.boxes[uuid]
                else:
                    box.attempts = 0
                    box.backoff = None
                    self._enqueue(uuid)  # a newer state arrived meanwhile
                _PENDING.set(len(self.boxes))
