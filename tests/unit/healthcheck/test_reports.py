"""reports.py: the pure state machine and the delivery pipeline (against an in-process poster)."""

from __future__ import annotations

import asyncio

import pytest

from agents.errors import ApiError, TransportError
from healthcheck.haproxy import NO_ANSWER, StatRow, parse_cli_answers, parse_stat_csv
from healthcheck.reports import Report, Reporter, Tracker, reduce_row, report_body
from tests.helpers.wait import eventually

N = "cattle-H_c1_1"


def row(status: str, cs: str, name: str = N, **kw: str) -> StatRow:
    return StatRow(backend="hcp-x", name=name, status=status, check_status=cs, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("status", "cs", "want"), [
    ("UP", "L7OK", "UP"), ("UP 2/3", "L7STS", "UP"), ("UP 1/3", "INI", ""), ("DOWN", "INI", ""),
    ("DOWN", "L4CON", "DOWN"), ("DOWN 1/2", "L7OK", "DOWN"), ("MAINT", "", "IGNORE"),
    ("no check", "", "IGNORE"), ("DRAIN", "L7OK", "IGNORE"), ("NOLB", "L7OK", "IGNORE"),
    ("MAINT (resolution)", "", "IGNORE"), ("UP", "", ""),
])
def test_reduce(status: str, cs: str, want: str) -> None:
    assert reduce_row(status, cs) == want


def states(t: Tracker, seq: list[tuple[str, str]]) -> list[str]:
    out = []
    for s, cs in seq:
        out += [r.state for r in t.observe([row(s, cs)], 1000.0)]
    return out


def test_new_check_reports_up_only_after_rise_and_never_partial_states() -> None:
    t = Tracker()
    t.sync([N])
    assert states(t, [("DOWN", "INI"), ("DOWN 1/2", "L7OK"), ("UP", "L7OK"), ("UP 2/3", "L7STS"),
                      ("UP 1/3", "L7STS"), ("DOWN", "L7STS"), ("DOWN 1/2", "L7OK"), ("UP", "L7OK")]) == [
        "UP", "DOWN", "UP"]


def test_new_check_reports_down_after_first_failed_check() -> None:
    t = Tracker()
    t.sync([N])
    assert states(t, [("DOWN", "INI"), ("DOWN", "L4CON"), ("DOWN", "L4CON")]) == ["DOWN"]


def test_unknown_and_removed_checks_are_not_reported() -> None:
    t = Tracker()
    t.sync([N])
    assert t.observe([row("DOWN", "L4CON", name="cattle-other")], 1.0) == []
    t.sync([])
    assert t.observe([row("DOWN", "L4CON")], 1.0) == []


def test_emit_init_sends_init_before_up() -> None:
    t = Tracker(emit_init=True)
    t.sync([N])
    assert states(t, [("UP", "L7OK"), ("DOWN", "L7STS"), ("UP", "L7OK")]) == ["INIT", "UP", "DOWN", "INIT", "UP"]


def test_body_is_byte_exact() -> None:
    assert report_body(Report("H_c1_1", "DOWN", 1795451535.9)) == (
        b'{"externalTimestamp":1795451535,"healthcheckUuid":"H_c1_1","reportedHealth":"DOWN"}')


CSV = ('# pxname,svname,status,check_status,check_code,last_chk,lastchg,chkfail,chkdown,extra,\n'
       'hcp-a,cattle-H_c1_1,UP 2/3,* L7STS,503,"Down, really",12,1,0,x,\n'
       'hcp-a,cattle-H_c2_1,DOWN,L4CON,,Connection refused,3,2,1\n'
       'hcp-a,BACKEND,UP,,,,,,,,\n\n')


def test_stat_csv_with_quoted_comma_and_short_rows() -> None:
    r = parse_stat_csv(CSV)
    assert [(x.name, x.status, x.check_status, x.last_chk, x.lastchg) for x in r] == [
        ("cattle-H_c1_1", "UP 2/3", "L7STS", "Down, really", 12),
        ("cattle-H_c2_1", "DOWN", "L4CON", "Connection refused", 3)]


def test_cli_answers_cut_at_the_prompts() -> None:
    # HAProxy 2.6's own bytes for: prompt; disable; del; disable; del (refused); add; enable health; quit
    text = ("\n> \n> Server deleted.\n> \n> Only servers in maintenance mode can be deleted.\n"
            "> New server registered.\n\n> Health check was not configured on this server, cannot enable.\n\n> ")
    assert parse_cli_answers(text, 6) == [
        "", "Server deleted.", "", "Only servers in maintenance mode can be deleted.", "New server registered.",
        "Health check was not configured on this server, cannot enable."]
    assert parse_cli_answers("> Server deleted.\n> \n> ", 2) == ["Server deleted.", ""]


def test_cli_answers_missing_are_never_taken_for_success() -> None:
    # the connection closed after two answers: the third command's answer is not an empty success
    assert parse_cli_answers("\n> Server deleted.\n> \n> ", 3) == ["Server deleted.", "", NO_ANSWER]
    assert parse_cli_answers("\n> Server deleted.\n> \n> New server", 3) == ["Server deleted.", "", NO_ANSWER]
    assert parse_cli_answers("", 2) == [NO_ANSWER, NO_ANSWER]


class Server:
    """An in-process poster: records bodies, can fail, hang or refuse per check."""

    def __init__(self) -> None:
        self.got: list[Report] = []
        self.down = False
        self.hang: set[str] = set()
        self.status: dict[str, int] = {}
        self.calls = 0

    async def post(self, r: Report) -> None:
        self.calls += 1
        if self.down:
            raise TransportError("connection refused")
        if r.uuid in self.hang:
            await asyncio.sleep(3600)
        st = self.status.get(r.uuid)
        if st:
            raise ApiError(st, "x", "", "u")
        self.got.append(r)


async def wait(pred) -> None:  # type: ignore[no-untyped-def]
    """Wait for a condition (tests/helpers/wait.py); never a time bound. Where a test must tell "at
    once" from "after a retry", the retry is set an hour out, so only the right behaviour gets there."""
    await eventually(pred, interval=0.005)


async def test_slow_post_does_not_delay_others_and_latest_wins_while_down() -> None:
    srv = Server()
    rep = Reporter(srv.post, concurrency=4, timeout=0.3, retry_min=0.01, retry_max=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(rep.run(stop))
    srv.hang.add("hang")
    rep.submit(Report("hang", "DOWN", 1.0))
    for i in range(10):
        rep.submit(Report(f"c{i}", "DOWN", 1.0))
    await wait(lambda: len(srv.got) == 10)
    srv.down = True
    for s in ("UP", "DOWN", "UP"):
        rep.submit(Report("c0", s, 2.0))
    await asyncio.sleep(0.1)
    srv.down = False
    srv.hang.clear()
    await wait(lambda: rep.pending == 0)
    c0 = [r.state for r in srv.got if r.uuid == "c0"]
    assert c0 == ["DOWN", "UP"], "only the latest state of c0 is delivered after the outage"
    assert [r.state for r in srv.got if r.uuid == "hang"] == ["DOWN"], "the hung report was retried"
    stop.set()
    await task


async def test_409_is_retried_and_403_parks_until_metadata_changes() -> None:
    srv = Server()
    rep = Reporter(srv.post, concurrency=2, retry_min=0.01, retry_max=0.02)
    stop = asyncio.Event()
    task = asyncio.create_task(rep.run(stop))
    srv.status = {"a": 409, "b": 403}
    rep.submit(Report("a", "DOWN", 1.0))
    rep.submit(Report("b", "DOWN", 1.0))
    await asyncio.sleep(0.2)
    calls_b = srv.calls
    del srv.status["a"]
    await wait(lambda: any(r.uuid == "a" for r in srv.got))
    await asyncio.sleep(0.1)
    assert not any(r.uuid == "b" for r in srv.got) and rep.boxes["b"].parked
    assert srv.calls - calls_b <= 1  # parked: no more attempts
    srv.status = {}
    rep.metadata_changed()
    await wait(lambda: any(r.uuid == "b" for r in srv.got))
    stop.set()
    await task


def test_stat_csv_roundtrip_of_any_reason_phrase() -> None:
    import csv
    import io

    from hypothesis import given
    from hypothesis import strategies as st

    @given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40))
    def check(reason: str) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["pxname", "svname", "status", "check_status", "last_chk"])
        w.writerow(["hcp-a", "cattle-H_c_1", "DOWN", "L7STS", reason])
        rows = parse_stat_csv("# " + buf.getvalue())
        assert [(r.name, r.status, r.last_chk) for r in rows] == [("cattle-H_c_1", "DOWN", reason)]

    check()


async def test_resync_reports_are_rate_limited_and_others_are_not() -> None:
    srv = Server()
    arrivals: dict[str, float] = {}
    loop = asyncio.get_running_loop()

    async def post(r: Report) -> None:
        arrivals[r.uuid] = loop.time()
        await srv.post(r)

    rep = Reporter(post, concurrency=4, resync_rate=50)
    stop = asyncio.Event()
    task = asyncio.create_task(rep.run(stop))
    t0 = loop.time()
    for i in range(10):
        rep.submit(Report(f"r{i}", "UP", 1.0, resync=True))
    rep.submit(Report("live", "DOWN", 1.0))
    await wait(lambda: len(srv.got) == 11)
    assert [r.uuid for r in srv.got].index("live") < [r.uuid for r in srv.got].index("r9"), \
        "a real change is not held behind the resync"
    # a lower bound only (a busy machine makes it longer, never shorter): the resyncs are spread
    assert arrivals["r9"] - t0 >= 9 / 50 * 0.9, "10 resyncs at 50/s span ~0.18 s"
    stop.set()
    await task


def test_tracker_marks_first_report_of_restored_state_as_resync() -> None:
    t = Tracker()
    t.sync([N])
    t.mark_resync([N])
    r1 = t.observe([row("UP", "L7OK")], 1.0)
    r2 = t.observe([row("DOWN", "L7STS")], 2.0)
    assert [(r.state, r.resync) for r in r1 + r2] == [("UP", True), ("DOWN", False)]


async def test_parked_report_of_a_removed_check_is_dropped_not_retried_at_every_metadata_change() -> None:
    """A container goes away and the server refuses its last report (4xx): parked. The check is not in
    the next metadata snapshot, so its box must go (not be re-posted 3 times at every later change,
    nor kept forever: with container churn that grows without bound)."""
    srv = Server()
    rep = Reporter(srv.post, concurrency=2, retry_min=0.01, retry_max=0.02)
    stop = asyncio.Event()
    task = asyncio.create_task(rep.run(stop))
    srv.status = {"gone": 404, "kept": 403}
    rep.submit(Report("gone", "DOWN", 1.0))
    rep.submit(Report("kept", "DOWN", 1.0))
    await wait(lambda: rep.boxes["gone"].parked and rep.boxes["kept"].parked)
    calls = srv.calls
    for _ in range(5):  # five later metadata versions, "gone" is in none of them
        rep.metadata_changed({"kept", "other"})
        await wait(lambda: rep.boxes["kept"].parked)
    assert "gone" not in rep.boxes, "the parked report of a removed check is dropped"
    assert srv.calls - calls == 5 * 3, "only the check that still exists is tried again (3 tries per change)"
    srv.status = {}
    rep.metadata_changed({"kept"})
    await wait(lambda: rep.pending == 0)
    assert [r.uuid for r in srv.got] == ["kept"]
    stop.set()
    await task


async def test_server_away_is_probed_by_one_shared_backoff_and_every_held_state_goes_at_its_return() -> None:
    """A per-check back-off far out (an hour) must not matter: while the server is away one report at a
    time probes it, and its first answer releases the latest state of every check."""
    srv = Server()
    inflight, most = 0, 0
    probing = False
    seen: list[tuple[bool, str]] = []

    async def post(r: Report) -> None:
        nonlocal inflight, most
        inflight += 1
        if probing:
            most = max(most, inflight)
        try:
            await asyncio.sleep(0.005)
            await srv.post(r)
        finally:
            inflight -= 1

    rep = Reporter(post, concurrency=8, retry_min=3600.0, retry_max=7200.0,
                   on_server=lambda ok, err: seen.append((ok, err)))
    stop = asyncio.Event()
    task = asyncio.create_task(rep.run(stop))
    srv.down = True
    for i in range(30):
        rep.submit(Report(f"c{i}", "DOWN", 1.0))
    await wait(lambda: srv.calls >= 1 and inflight == 0)
    first_wave = srv.calls
    assert first_wave <= 8, "the first failure holds the rest"
    probing = True
    await wait(lambda: srv.calls >= first_wave + 3)  # probes: a per-check retry is an hour away
    assert most == 1, "one probe per step while the server is away"
    assert seen and seen[0][0] is False and "refused" in seen[0][1]
    rep.submit(Report("c0", "UP", 2.0))  # a newer state replaces the held one
    srv.down = False
    await wait(lambda: rep.pending == 0)
    assert sorted(r.uuid for r in srv.got if r.state == "DOWN") == sorted(f"c{i}" for i in range(1, 30))
    assert [r.state for r in srv.got if r.uuid == "c0"] == ["UP"]
    assert seen[-1] == (True, "")
    stop.set()
    await task


async def test_newer_state_does_not_wait_for_the_scheduled_retry_of_an_older_one() -> None:
    srv = Server()
    rep = Reporter(srv.post, concurrency=2, retry_min=3600.0, retry_max=7200.0)
    stop = asyncio.Event()
    task = asyncio.create_task(rep.run(stop))
    srv.status = {"a": 409}
    rep.submit(Report("a", "DOWN", 1.0))
    await wait(lambda: rep.boxes["a"].retry_handle is not None)  # its retry: an hour away
    del srv.status["a"]
    rep.submit(Report("a", "UP", 2.0))
    await wait(lambda: rep.pending == 0)
    assert [r.state for r in srv.got] == ["UP"]
    stop.set()
    await task


async def test_reporter_delivers_init_before_the_up_after_it() -> None:
    t = Tracker(emit_init=True)
    t.sync([N])
    srv = Server()
    rep = Reporter(srv.post, concurrency=4)
    stop = asyncio.Event()
    task = asyncio.create_task(rep.run(stop))
    for r in t.observe([row("UP", "L7OK")], 1.0):
        rep.submit(r)
    await wait(lambda: rep.pending == 0)
    assert [r.state for r in srv.got] == ["INIT", "UP"]
    # DOWN, then INIT + UP, then DOWN again before anything is sent: the INIT stays, the DOWN after it
    # replaces the UP (and the first DOWN is replaced by the INIT's newer state)
    for r in t.observe([row("DOWN", "L7STS")], 2.0) + t.observe([row("UP", "L7OK")], 3.0):
        rep.submit(r)
    rep.submit(Report("H_c1_1", "DOWN", 4.0))
    await wait(lambda: rep.pending == 0)
    assert [r.state for r in srv.got] == ["INIT", "UP", "INIT", "DOWN"]
    stop.set()
    await task


async def test_a_hung_probe_does_not_stall_the_next() -> None:
    srv = Server()
    rep = Reporter(srv.post, concurrency=4, timeout=3600.0)
    stop = asyncio.Event()
    task = asyncio.create_task(rep.run(stop))
    srv.down = True
    for u in ("c0", "c1", "c2", "h"):  # tried in this order, all refused
        rep.submit(Report(u, "DOWN", 1.0))
    # the probes go by the oldest try: wait until h is the next one
    await wait(lambda: not any(b.in_flight for b in rep.boxes.values())
               and min(rep.boxes, key=lambda u: rep.boxes[u].tried) == "h")
    srv.hang.add("h")
    srv.down = False  # back, but h's POST hangs (its timeout is an hour: the others cannot wait it out)
    await wait(lambda: len(srv.got) == 3)
    assert rep.away_since is None and rep.boxes["h"].in_flight
    stop.set()
    await task
