"""`corral healthcheck` end to end: real metadata, real HAProxy, real backends, a recording server.

Intervals are small (200 ms) so the checks turn quickly. The tests wait for each report (no time
bounds: how fast a failure is reported is measured in bench/healthcheck).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.standin import StandIn
from tests.integration.healthcheck.common import container, hc, tree, until
from tests.integration.healthcheck.conftest import Sink, StandInReports
from tests.integration.healthcheck.daemon import Daemon, Metadata

INTER, TIMEOUT, RISE, FALL = 200, 400, 2, 2  # a generous timeout: a loaded CI box must not fail checks


@pytest.fixture
async def daemon(tmp_path: Path, metadata: Metadata, server: StandInReports) -> AsyncIterator[Daemon]:
    d = Daemon(tmp_path, metadata.url, server.env()).start()
    yield d
    d.stop()
    assert "Traceback" not in d.log(), d.log()[-3000:]


async def reported(sink: Sink | StandInReports, part: str, state: str, t0: float, timeout: float = 0) -> float:
    """Wait until ``state`` of ``part`` is reported at or after ``t0``; return when, relative to ``t0``.
    ``timeout`` is only a floor on patience (see ``until``), never a bound the test asserts."""
    async def got() -> float | None:
        return await sink.first_after(part, state, t0)

    return float(await until(got, timeout=timeout, what=f"{part} reported {state}"))


async def test_fail_hang_recover_and_tcp_only(metadata: Metadata, daemon: Daemon, server: StandInReports,
                                              flaky_factory: Any) -> None:
    names = ["fail", "hang", "recover", "tcp"]
    backs = {n: await flaky_factory("fail" if n == "recover" else "ok") for n in names}
    ctrs = [container(n, hc(b.port, interval=INTER, timeout=TIMEOUT, rise=RISE, fall=FALL,
                            request_line="" if n == "tcp" else "GET /healthz HTTP/1.0"))
            for n, b in backs.items()]
    metadata.write(tree(ctrs))
    for n in ("fail", "hang", "tcp"):
        await reported(server, f"_{n}_", "UP", 0, 10)
    await reported(server, "_recover_", "DOWN", 0, 10)
    assert await server.states_async("_fail_") == ["UP"], "a new check sends UP only, no INIT and no DOWN first"

    t0 = time.time()
    await backs["fail"].set("fail")
    await backs["hang"].set("hang")
    await backs["recover"].set("ok")
    await backs["tcp"].set("fail")  # answers 503, but the TCP connection opens: stays UP
    await reported(server, "_fail_", "DOWN", t0)
    await reported(server, "_recover_", "UP", t0)
    await reported(server, "_hang_", "DOWN", t0)
    await backs["tcp"].set("hang")
    await asyncio.sleep(INTER * FALL * 2 / 1000)
    assert await server.states_async("_tcp_") == ["UP"], "TCP-only check stays UP on 503 and on a hang"
    t1 = time.time()
    await backs["tcp"].set("refuse")
    await reported(server, "_tcp_", "DOWN", t1)
    # exactly one DOWN per failure: no DOWN 1/2, no UP 2/3, the comma did no harm
    assert await server.states_async("_fail_") == ["UP", "DOWN"]
    assert await server.states_async("_recover_") == ["DOWN", "UP"]
    assert "host-a-uuid_fail_1" in {str(e["id"]) for e in await asyncio.to_thread(server.entries)}
    metrics = await asyncio.to_thread(_get, f"http://127.0.0.1:{daemon.admin_port}/metrics")
    assert "corral_healthcheck_checks 4.0" in metrics
    assert 'corral_healthcheck_check_states{state="DOWN"} 3.0' in metrics
    assert 'corral_healthcheck_reports_total{outcome="ok",state="DOWN"}' in metrics
    assert "corral_healthcheck_report_seconds_count" in metrics
    assert "corral_healthcheck_haproxy_up 1.0" in metrics
    assert (await asyncio.to_thread(_get, f"http://127.0.0.1:{daemon.admin_port}/healthz")).strip() == "ok"


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


async def test_change_add_remove_leave_others_untouched(metadata: Metadata, daemon: Daemon, server: StandInReports,
                                                        flaky_factory: Any) -> None:
    ok, bad = await flaky_factory("ok"), await flaky_factory("fail")
    base = [container("keep", hc(ok.port)), container("keepdown", hc(bad.port)),
            container("change", hc(ok.port)), container("drop", hc(ok.port))]
    metadata.write(tree(base))
    await reported(server, "_keep_", "UP", 0, 10)
    await reported(server, "_keepdown_", "DOWN", 0, 10)
    await reported(server, "_change_", "UP", 0, 10)
    await reported(server, "_drop_", "UP", 0, 10)
    before = await daemon.rows()
    pid = daemon.haproxy_pid()
    n_before = len(await asyncio.to_thread(server.entries))
    changed = [container("keep", hc(ok.port)), container("keepdown", hc(bad.port)),
               container("change", hc(ok.port, interval=300, rise=3)), container("new", hc(ok.port))]
    metadata.write(tree(changed))

    async def applied() -> bool:
        r = await daemon.rows()
        return any("_new_" in n for n in r) and not any("_drop_" in n for n in r)

    await until(applied, what="change applied")
    await reported(server, "_new_", "UP", 0, 10)
    await asyncio.sleep(0.5)
    after = await daemon.rows()
    assert daemon.haproxy_pid() == pid, "no reload"
    for name in ("cattle-host-a-uuid_keep_1", "cattle-host-a-uuid_keepdown_1"):
        b, a = before[name], after[name]
        assert (a.status, a.chkdown) == (b.status, b.chkdown), (b, a)
        assert a.lastchg is not None and b.lastchg is not None and a.lastchg >= b.lastchg
    assert after["cattle-host-a-uuid_change_1"].check_rise == 3
    later = (await asyncio.to_thread(server.entries))[n_before:]
    assert {str(e["id"]).split("_")[1] for e in later} == {"new"}, later


async def test_kill9_haproxy_recovered_with_all_checks(metadata: Metadata, daemon: Daemon, server: StandInReports,
                                                       flaky_factory: Any) -> None:
    ok, bad = await flaky_factory("ok"), await flaky_factory("fail")
    metadata.write(tree([container(f"u{i}", hc(ok.port)) for i in range(4)] + [container("d", hc(bad.port))]))
    for i in range(4):
        await reported(server, f"_u{i}_", "UP", 0, 10)
    await reported(server, "_d_", "DOWN", 0, 10)
    await asyncio.sleep(0.6)  # one state snapshot
    n = len(await asyncio.to_thread(server.entries))
    old = daemon.haproxy_pid()
    os.kill(old, signal.SIGKILL)

    async def back() -> bool:
        try:
            pid = daemon.haproxy_pid()
        except (OSError, ValueError):
            return False
        if pid == old:
            return False
        r = await daemon.rows()
        return len(r) == 5 and sum(x.status == "UP" for x in r.values()) == 4

    await until(back, timeout=5, what="HAProxy back with all checks")
    await asyncio.sleep(0.5)
    assert (await asyncio.to_thread(server.entries))[n:] == [], "no spurious report across the restart"
    t0 = time.time()
    await ok.set("fail")
    for i in range(4):
        await reported(server, f"_u{i}_", "DOWN", t0)
    assert "haproxy died" in daemon.log()


async def test_metadata_unreachable_or_malformed_keeps_last_good_checks(
        metadata: Metadata, daemon: Daemon, server: StandInReports, flaky_factory: Any) -> None:
    ok = await flaky_factory("ok")
    metadata.write(tree([container("a", hc(ok.port)), container("b", hc(ok.port))]))
    await reported(server, "_a_", "UP", 0, 10)
    await reported(server, "_b_", "UP", 0, 10)
    # malformed trees: no self host, containers not a list, not an object
    for bad in ({"version": "x", "services": [], "containers": []},
                {**tree([]), "containers": {"oops": 1}},
                ["not", "a", "tree"]):
        metadata.write(bad)
        await asyncio.sleep(0.4)
        assert len(await daemon.rows()) == 2
    assert "metadata unusable, keeping the last good checks" in daemon.log() or \
        "metadata unavailable" in daemon.log()
    await asyncio.to_thread(metadata.stop)  # never block the loop: the backends live in it
    await asyncio.sleep(1.0)
    assert len(await daemon.rows()) == 2
    t0 = time.time()
    await ok.set("fail")
    await reported(server, "_a_", "DOWN", t0)
    # metadata back with a malformed field in one check: only that one goes
    metadata.write(tree([container("a", hc(ok.port)), container("b", hc(ok.port, interval=-5)),
                         container("c", hc(ok.port, request_line="GET / HTTP/1.0\r\n\r\nbackend evil")),
                         container("z", hc(ok.port, timeout=2.5)), container("y", hc(ok.port, rise=10**9))]))
    await asyncio.to_thread(metadata.start)

    async def only_a() -> bool:
        r = await daemon.rows()
        return list(r) == ["cattle-host-a-uuid_a_1"]

    await until(only_a, what="b rejected, a kept")
    log = daemon.log()
    assert "health check rejected" in log and "interval out of range" in log
    assert "control character (raw CR/LF injection?)" in log
    assert "response_timeout must be an integer" in log and "healthy_threshold out of range" in log
    # only the check-derived lines: the global section holds tmp paths (pytest-5/...) that match "-5"
    checks = [ln for ln in daemon.config().splitlines()
              if ln.strip().startswith(("server ", "http-check", "timeout check", "backend "))]
    assert any("cattle-host-a-uuid_a_1" in ln for ln in checks), checks
    for bad in ("-5", "evil", "2.5", "1000000000"):
        assert not any(bad in ln for ln in checks), (bad, checks)


async def test_server_away_500s_then_refused_every_change_delivered_when_it_returns(
        tmp_path: Path, metadata: Metadata, server: StandInReports, standin: StandIn, flaky_factory: Any) -> None:
    """The server answers 500 to every report, then refuses connections, for OUTAGE seconds; backends
    fail meanwhile. With the default --report-retry-max (30 s) a back-off per check would have pushed
    the next try 8-16 s out; one shared probe finds the server back and delivers every DOWN at once.
    b goes UP -> DOWN -> UP while away: its latest state (UP) replaces the held DOWN."""
    d = Daemon(tmp_path, metadata.url, server.env(), "--report-retry-max", "30s").start()
    try:
        backs = [await flaky_factory("ok") for _ in range(AWAY_CHECKS)]
        flip = await flaky_factory("ok")
        metadata.write(tree([container(f"a{i}", hc(b.port)) for i, b in enumerate(backs)]
                            + [container("b", hc(flip.port))]))
        await until(lambda: _all_reported(server, "UP", AWAY_CHECKS + 1), timeout=20, what="all UP")
        ready = f"http://127.0.0.1:{d.admin_port}/ready"
        assert (await asyncio.to_thread(_status_of, ready))[0] == 200

        t_out = time.time()
        await asyncio.to_thread(standin.ctl, "fault", "http", "--path", "/v1/serviceevents", "--status", "500")
        for b in (*backs, flip):
            await b.set("fail")
        await until(lambda: _count(d, "DOWN", AWAY_CHECKS + 1), what="all DOWN in HAProxy")

        async def not_ready() -> bool:
            code, body = await asyncio.to_thread(_status_of, ready)
            return code == 503 and "reports failing: HTTP 500" in body

        await until(not_ready, what="/ready 503 while reports fail")
        await flip.set("ok")
        await until(lambda: _status(d, "_b_", "UP"), what="b up again in HAProxy")
        await server.stop()  # now connections are refused
        await asyncio.sleep(max(0.0, OUTAGE - (time.time() - t_out)))
        await server.start()  # a new process: the 500 fault is gone with the old one

        async def all_down() -> bool:
            es = await asyncio.to_thread(server.entries)
            return all("DOWN" in server.states(f"_a{i}_", es) for i in range(AWAY_CHECKS))

        await until(all_down, timeout=8, what="every DOWN delivered after the server came back")
        states_b = await server.states_async("_b_")
        assert states_b[-1] == "UP" and "DOWN" not in states_b, states_b

        async def ready_again() -> bool:
            return (await asyncio.to_thread(_status_of, ready))[0] == 200

        await until(ready_again, what="/ready 200 once reports are taken again")
    finally:
        d.stop()
    assert "Traceback" not in d.log(), d.log()[-3000:]
    assert d.log().count("server not taking reports") >= 1


OUTAGE = float(os.environ.get("CORRAL_HC_OUTAGE", "12"))
AWAY_CHECKS = 16


async def _all_reported(server: StandInReports, state: str, n: int) -> bool:
    es = await asyncio.to_thread(server.entries)
    return len({str(e["id"]) for e in es if e.get("name") == state}) >= n


async def _count(d: Daemon, status: str, n: int) -> bool:
    return sum(1 for r in (await d.rows()).values() if r.status == status) >= n


def _status_of(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def _status(d: Daemon, part: str, status: str) -> bool:
    return any(part in n and r.status == status for n, r in (await d.rows()).items())


async def test_hung_post_does_not_delay_others_and_409_is_retried(
        tmp_path: Path, metadata: Metadata, sink: Sink, flaky_factory: Any) -> None:
    """fake-cattle for the faults the stand-in cannot make: a POST that hangs, a 409 reply.
    The hung POST is held for the whole test (its timeout is an hour), so the other checks' reports
    arriving at all proves they did not wait behind it; then it fails (503) and is retried."""
    d = Daemon(tmp_path, metadata.url, sink.env(), "--report-timeout", "1h").start()
    try:
        ok = await flaky_factory("ok")
        names = ["h", "c409", "x1", "x2", "x3"]
        metadata.write(tree([container(n, hc(ok.port)) for n in names]))
        for n in names:
            await reported(sink, f"_{n}_", "UP", 0, 10)
        sink.hang.add("_h_")
        sink.conflict.add("_c409_")
        t0 = time.time()
        await ok.set("fail")
        for n in ("x1", "x2", "x3"):
            await reported(sink, f"_{n}_", "DOWN", t0)
        await until(lambda: _attempts(sink, "_h_", t0, 1), what="h's POST sent")
        assert "DOWN" not in sink.states("_h_") and not await _attempts(sink, "_h_", t0, 2), \
            "the others went out while h's one POST was still held"
        await until(lambda: _attempts(sink, "_c409_", t0, 2), what="409 retried")
        sink.conflict.clear()
        sink.hang.clear()
        sink.release()  # the held POST now fails with a 503: retried, and delivered
        await reported(sink, "_c409_", "DOWN", t0)
        await reported(sink, "_h_", "DOWN", t0)
        raw = next(r for _, b, r in sink.got if b["reportedHealth"] == "DOWN" and "_x1_" in str(b["healthcheckUuid"]))
        assert raw.startswith(b'{"externalTimestamp":')
        assert raw.endswith(b',"healthcheckUuid":"host-a-uuid_x1_1","reportedHealth":"DOWN"}')
        assert abs(int(raw[21:raw.index(b",")]) - t0) < 5, "unix seconds, integer"
    finally:
        d.stop()


async def test_emit_init_sends_init_then_up(tmp_path: Path, metadata: Metadata, sink: Sink,
                                            flaky_factory: Any) -> None:
    """--emit-init: the original's INIT goes out before the first UP (the UP must not replace it)."""
    d = Daemon(tmp_path, metadata.url, sink.env(), "--emit-init").start()
    try:
        ok = await flaky_factory("ok")
        metadata.write(tree([container("a", hc(ok.port))]))
        await reported(sink, "_a_", "UP", 0, 10)
        assert sink.states("_a_") == ["INIT", "UP"]
    finally:
        d.stop()


async def _attempts(sink: Sink, part: str, t0: float, n: int) -> bool:
    return sum(1 for t, u in sink.attempts if t >= t0 and part in u) >= n


async def test_daemon_killed_and_restarted_keeps_haproxy_state(
        metadata: Metadata, daemon: Daemon, server: StandInReports, flaky_factory: Any) -> None:
    """kill -9 of the daemon: the next run takes over the old HAProxy's state (no resets, no leak)."""
    ok, bad = await flaky_factory("ok"), await flaky_factory("fail")
    metadata.write(tree([container("u", hc(ok.port)), container("d", hc(bad.port))]))
    await reported(server, "_u_", "UP", 0, 10)
    await reported(server, "_d_", "DOWN", 0, 10)
    old = daemon.haproxy_pid()
    assert daemon.proc is not None
    await asyncio.to_thread(daemon.proc.kill)
    t0 = time.time()
    await asyncio.to_thread(daemon.start)

    async def taken_over() -> bool:
        try:
            pid = daemon.haproxy_pid()
        except (OSError, ValueError):
            return False
        return pid != old and len(await daemon.rows()) == 2

    await until(taken_over, what="a new HAProxy")
    rows = await daemon.rows()
    assert {n.split("_")[1]: r.status for n, r in rows.items()} == {"u": "UP", "d": "DOWN"}, "states kept"
    await until(lambda: _gone(old), timeout=8, what="the old HAProxy exited")
    # the one-time resync re-sends the states last reported, nothing else
    await reported(server, "_u_", "UP", t0, 5)
    await reported(server, "_d_", "DOWN", t0, 5)
    await asyncio.sleep(0.5)
    assert [s for s in await server.states_async("_u_")] == ["UP", "UP"]
    assert [s for s in await server.states_async("_d_")] == ["DOWN", "DOWN"]


async def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_unrelated_metadata_changes_cause_no_reload_and_no_command(
        metadata: Metadata, daemon: Daemon, server: StandInReports, flaky_factory: Any) -> None:
    ok = await flaky_factory("ok")
    mine = [container("a", hc(ok.port)), container("b", hc(ok.port))]
    metadata.write(tree(mine))
    await reported(server, "_a_", "UP", 0, 10)
    await reported(server, "_b_", "UP", 0, 10)
    url = f"http://127.0.0.1:{daemon.admin_port}/metrics"

    def counters(text: str) -> tuple[str, ...]:
        keep = ("corral_healthcheck_runtime_commands_total", "corral_healthcheck_haproxy_reloads_total",
                "corral_reconcile_applies_total")
        return tuple(sorted(ln for ln in text.splitlines() if ln.startswith(keep)))

    text0 = await asyncio.to_thread(_get, url)
    before = counters(text0)
    n = len(await asyncio.to_thread(server.entries))
    pid = daemon.haproxy_pid()
    for i in range(10):  # another host's containers come and go
        other = [container(f"o{j}", hc(ok.port), hosts=("host-z-uuid",)) for j in range(i)]
        metadata.write(tree(mine + other))
        await asyncio.sleep(0.15)
    await asyncio.sleep(0.5)
    text1 = await asyncio.to_thread(_get, url)
    assert _fetches(text1) >= _fetches(text0) + 10, "the daemon did read the new versions"
    assert counters(text1) == before
    assert daemon.haproxy_pid() == pid
    assert len(await asyncio.to_thread(server.entries)) == n


def _fetches(text: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith('corral_metadata_client_fetches_total{outcome="ok"}'))


class FakeMetadata:
    """fake-metadata for the one fault the real one cannot make: HTTP 500 on the tree after a bump."""

    def __init__(self) -> None:
        self.tree: dict[str, Any] = tree([])
        self.fail = False
        self.requests_500 = 0
        self.port = 0
        self._changed = asyncio.Event()

    def set(self, t: dict[str, Any]) -> None:
        self.tree = {**t, "version": str(int(self.tree["version"]) + 1)}
        self._changed.set()
        self._changed = asyncio.Event()

    async def start(self) -> Any:
        from aiohttp import web

        async def version(request: web.Request) -> web.Response:
            if request.query.get("wait") == "true" and request.query.get("value") == self.tree["version"]:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), float(request.query.get("maxWait", "1")))
            return web.json_response(self.tree["version"])

        async def whole(request: web.Request) -> web.Response:
            if self.fail:
                self.requests_500 += 1
                return web.Response(status=500, text="boom")
            return web.json_response(self.tree)

        app = web.Application()
        app.router.add_get("/2015-12-19/version", version)
        app.router.add_get("/2015-12-19", whole)
        app.router.add_get("/2015-12-19/", whole)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        return runner


async def test_metadata_500_keeps_checks_and_sends_nothing(tmp_path: Path, server: StandInReports,
                                                           flaky_factory: Any) -> None:
    fake = FakeMetadata()
    runner = await fake.start()
    ok = await flaky_factory("ok")
    fake.set(tree([container("a", hc(ok.port)), container("b", hc(ok.port))]))
    d = Daemon(tmp_path, f"http://127.0.0.1:{fake.port}", server.env())
    await asyncio.to_thread(d.start)
    try:
        await reported(server, "_a_", "UP", 0, 10)
        await reported(server, "_b_", "UP", 0, 10)
        n = len(await asyncio.to_thread(server.entries))
        fake.fail = True
        fake.set(tree([container("a", hc(ok.port))]))  # b would go, but the tree answers 500
        await until(lambda: _true(fake.requests_500 >= 2), what="the daemon hit the 500")
        await asyncio.sleep(0.5)
        assert len(await d.rows()) == 2, "no server removed on a failed read"
        assert len(await asyncio.to_thread(server.entries)) == n, "no report"
        fake.fail = False

        async def only_a() -> bool:
            return list(await d.rows()) == ["cattle-host-a-uuid_a_1"]

        await until(only_a, timeout=15, what="the diff applied after recovery")
    finally:
        await asyncio.to_thread(d.stop)
        await runner.cleanup()


async def _true(v: bool) -> bool:
    return v


def test_missing_credentials_exit_with_a_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CATTLE_")}
    r = subprocess.run([sys.executable, "-m", "agents.cli", "healthcheck", "--state-dir", str(tmp_path),
                        "--metadata-address", "http://127.0.0.1:9", "--metrics-listen", "127.0.0.1:0"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "CATTLE_URL" in r.stderr and "CATTLE_ACCESS_KEY" in r.stderr
    assert not (tmp_path / "haproxy.pid").exists(), "no HAProxy started without credentials"
