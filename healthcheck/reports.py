"""HAProxy rows -> health reports, and the pipeline that delivers them to the server.

:class:`Tracker` is pure (no I/O, no clock): fed the rows of one poll, it returns the reports
to send (healthcheck.md §4.2). Rows reduce to UP, DOWN, IGNORE or "not yet" (a check that has
not finished its first check, or is going up without ever having been reported):

* ``UP``/``UP x/y`` -> UP; ``DOWN``/``DOWN x/y`` -> DOWN; ``MAINT*``, ``DRAIN``, ``NOLB``,
  ``no check`` -> IGNORE.
* ``check_status`` ``INI``/``UNK``/empty: the first check has not finished, report nothing.
* ``DOWN x/y`` with a passing ``check_status`` is going up: a check never reported stays quiet.
* A report goes out when the reduced state differs from the last one sent.

:class:`Reporter` posts them: a per-check mailbox where the latest state wins (an INIT is delivered
before the UP that follows it), a bounded pool of workers (one request per check in flight, so
a check's reports stay in order, and a slow POST never delays another check). Network errors,
timeouts, 5xx and 429 mean the server is away: reports are held and one shared back-off probes
it with one held report per step; its first answer releases them all, so the latest state of
every changed check is delivered right after it returns. 409 retries per check, other 4xx
three tries until the state or the metadata changes; a newer state never waits for a retry.
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
_AWAY = gauge("healthcheck", "server_away", "1 while the server does not take reports (held, probing)")

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
    pending: list[Report]  # oldest first: the first ``kept`` must be delivered (INIT), then the latest state
    kept: int = 0
    in_queue: bool = False
    in_flight: bool = False
    attempts: int = 0  # attempts of a non-retryable 4xx for the current state
    parked: bool = False
    backoff: Backoff | None = None  # this check's own back-off: only for 409 and other 4xx (the server answered)
    retry_handle: asyncio.TimerHandle | None = None
    tried: float = 0.0  # monotonic time of the last POST: the probe takes the check that waited longest

    @property
    def latest(self) -> Report:
        return self.pending[-1]


class Reporter:
    """Deliver reports: latest state per check wins, N concurrent POSTs, retries forever.

    A network error, a timeout, a 5xx or a 429 means the *server* is away, not this check: every
    report is then held, and one shared back-off (from 50 ms up to ``probe_max``) re-sends one held
    report per step, the one that waited longest, as a probe. The first answer from the server
    (a success, or any other status) releases everything held, so the current state of every
    changed check goes out at once. A 409 or another 4xx concerns one check: it retries on its own
    back-off (``retry_min`` .. ``retry_max``), cut short by any newer state.
    """

    def __init__(self, post: Poster, *, concurrency: int = 8, timeout: float = 10.0,
                 retry_min: float = 1.0, retry_max: float = 30.0, probe_max: float = 0.5,
                 resync_rate: float = 0.0, on_server: Callable[[bool, str], None] | None = None) -> None:
        """``on_server(answering, error)`` is called when the server stops answering reports and
        when it answers again."""
        self.post = post
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.boxes: dict[str, _Box] = {}
        self.resync_rate = resync_rate
        self.on_server = on_server or (lambda _ok, _err: None)
        self.away_since: float | None = None  # monotonic: since when the server does not answer reports
        self.away_error = ""
        self.probes = 0
        self._probe = Backoff(min(0.05, probe_max), probe_max, reset_after=1e9)
        self._away = asyncio.Event()
        self._probing: set[asyncio.Task[None]] = set()
        self._next_slot = 0.0
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self.sent = 0
        self.failed = 0

    @property
    def pending(self) -> int:
        return len(self.boxes)

    def submit(self, r: Report) -> None:
        """Queue ``r`` for its check, replacing the state not yet delivered (also one waiting for a
        retry). An INIT is never replaced, only followed: it goes out before the UP after it."""
        box = self.boxes.get(r.uuid)
        if box is None:
            self.boxes[r.uuid] = box = _Box([r])
        else:
            if box.latest.state != r.state:
                box.attempts, box.parked, box.backoff = 0, False, None
                if box.retry_handle is not None:  # a newer state does not wait for an older one's retry
                    box.retry_handle.cancel()
                    box.retry_handle = None
            box.pending = [*box.pending[: box.kept], r]
        if r.state == "INIT":
            box.kept = len(box.pending)
        _PENDING.set(len(self.boxes))
        if box.in_flight or box.parked or box.retry_handle is not None or self.away_since is not None:
            return  # sent when the flight ends, when the server is back, or when the retry fires
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
            if self.boxes.get(uuid) is box and not box.parked and self.away_since is None:
                self._enqueue(uuid)

        box.retry_handle = asyncio.get_running_loop().call_later(delay, fire)

    # ---- the server's presence (shared by every check)
    def _server_away(self, error: str) -> None:
        self.away_error = error
        if self.away_since is not None:
            return
        self.away_since = time.monotonic()
        self._probe.reset()
        self._away.set()
        _AWAY.set(1)
        log.warning("server not taking reports, holding them and probing", error=error, pending=len(self.boxes))
        self.on_server(False, error)

    def _server_back(self) -> None:
        if self.away_since is None:
            return
        away = time.monotonic() - self.away_since
        self.away_since = None
        self.away_error = ""
        _AWAY.set(0)
        held = [u for u, b in self.boxes.items() if not (b.parked or b.in_flight or b.retry_handle is not None)]
        log.info("server takes reports again, sending the held ones", away_s=round(away, 1), held=len(held))
        for u in held:
            self._enqueue(u)
        self.on_server(True, "")

    async def _prober(self) -> None:
        while True:
            await self._away.wait()
            while self.away_since is not None:
                await asyncio.sleep(self._probe.next())
                if self.away_since is None:
                    break
                cands = [(b.tried, u) for u, b in self.boxes.items()
                         if not (b.parked or b.in_flight or b.retry_handle is not None)]
                if cands:
                    # not awaited: a probe that hangs (up to --report-timeout) must not stall the next one
                    _, uuid = min(cands)
                    self.probes += 1
                    self.boxes[uuid].in_flight = True
                    t = asyncio.create_task(self._send(uuid, self.boxes[uuid]))
                    self._probing.add(t)
                    t.add_done_callback(self._probing.discard)
                elif not any(b.in_flight for b in self.boxes.values()):
                    self._server_back()  # nothing left to hold: the next report tries for itself
            self._away.clear()

    async def run(self, stop: asyncio.Event) -> None:
        workers = [asyncio.create_task(self._worker()) for _ in range(self.concurrency)]
        workers.append(asyncio.create_task(self._prober()))
        try:
            await stop.wait()
        finally:
            # in-flight POSTs get a moment to finish
            busy = [b for b in self.boxes.values() if b.in_flight]
            if busy:
                deadline = time.monotonic() + 5
                while any(b.in_flight for b in busy) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            workers += self._probing
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
            if box.in_flight or box.parked or self.away_since is not None:
                continue  # held: the probe finds out when the server is back, then every held one goes
            await self._send(uuid, box)

    async def _send(self, uuid: str, box: _Box) -> None:
        rep = box.pending[0]
        box.in_flight = True
        box.tried = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                await self.post(rep)
        except ApiError as e:
            self.failed += 1
            _SENT.labels(rep.state, str(e.status)).inc()
            if e.status == 429 or e.status >= 500:
                self._server_away(f"HTTP {e.status}")
                return
            self._server_back()  # it answered: the server is there, this report is the problem
            if e.status == 409:
                log.warning("report refused, retrying", check=uuid, state=rep.state, status=e.status)
                self._retry_later(uuid, box)
                return
            box.attempts += 1
            if box.attempts >= 3:
                box.parked = True
                log.error("report rejected, parked until the state or metadata changes", check=uuid,
                          state=rep.state, status=e.status, body=e.body[:200])
            else:
                self._retry_later(uuid, box)
            return
        except (TransportError, TimeoutError, OSError) as e:
            self.failed += 1
            _SENT.labels(rep.state, "error").inc()
            self._server_away(str(e) or type(e).__name__)
            return
        except Exception as e:  # a bug in a poster must not kill the worker
            self.failed += 1
            log.error("report crashed, retrying", check=uuid, error=repr(e))
            self._retry_later(uuid, box)
            return
        finally:
            box.in_flight = False
        self.sent += 1
        _SENT.labels(rep.state, "ok").inc()
        _LATENCY.observe(max(0.0, time.time() - rep.observed))
        self._server_back()
        if box.pending and box.pending[0] is rep:
            box.pending.pop(0)
            box.kept = max(0, box.kept - 1)
        if not box.pending:
            if self.boxes.get(uuid) is box:
                del self.boxes[uuid]
        else:
            box.attempts = 0
            box.backoff = None
            if box.retry_handle is None and not box.parked:
                self._enqueue(uuid)  # a newer state arrived meanwhile
        _PENDING.set(len(self.boxes))
