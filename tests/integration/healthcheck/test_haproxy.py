"""The HAProxy adapter against a real HAProxy and real backends."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from healthcheck.desired import desired_from_tree
from healthcheck.haproxy import HAProxy, HAProxySettings, StatRow
from tests.integration.healthcheck.common import container, hc, tree, until


async def rows(h: HAProxy) -> dict[str, StatRow]:
    return {r.name: r for r in await h.show_stat() if r.name.startswith("cattle-")}


async def all_up(h: HAProxy, n: int) -> dict[str, StatRow] | None:
    r = await rows(h)
    return r if len(r) == n and all(x.status == "UP" for x in r.values()) else None


async def test_runtime_changes_leave_other_checks_untouched(hap: HAProxy, flaky_factory) -> None:
    backs = [await flaky_factory("ok") for _ in range(4)]
    ctrs = [container(f"c{i}", hc(b.port)) for i, b in enumerate(backs[:3])]
    await hap.apply(desired_from_tree(tree(ctrs)))
    pid, reloads = hap.pid, hap.reloads
    await until(lambda: all_up(hap, 3), what="3 checks UP")
    await backs[2].set("fail")
    before = await until(lambda: _down(hap, "c2"), what="c2 DOWN")
    c0, c1 = (before[n] for n in sorted(before) if n.split("_")[1] in ("c0", "c1"))

    # change c1's interval, add c3, remove c2 in one step
    changed = [container("c0", hc(backs[0].port)), container("c1", hc(backs[1].port, interval=300)),
               container("c3", hc(backs[3].port))]
    await hap.apply(desired_from_tree(tree(changed)))
    assert hap.pid == pid and hap.reloads == reloads, "no reload for a runtime change"
    after = await rows(hap)
    assert not any("_c2_" in n for n in after), "c2 was deleted"
    a0 = after[c0.name]
    assert a0.status == "UP" and a0.chkdown == c0.chkdown and a0.chkfail == c0.chkfail
    assert a0.lastchg is not None and c0.lastchg is not None and a0.lastchg >= c0.lastchg
    a1 = after[c1.name]
    assert a1.check_status in ("INI", "L7OK") and a1.status.startswith("DOWN"), "c1 re-armed fresh"
    new = after[next(n for n in after if "_c3_" in n)]
    assert new.status.startswith("DOWN"), f"new check starts DOWN until rise successes: {new}"
    await until(lambda: all_up(hap, 3), what="3 checks UP after change")
    final = await rows(hap)
    assert final[c0.name].chkdown == c0.chkdown and final[c0.name].lastchg >= a0.lastchg  # type: ignore[operator]
    assert final[c1.name].check_rise == 2 and final[c1.name].check_fall == 2


async def _down(h: HAProxy, cuuid: str) -> dict[str, StatRow] | None:
    r = await rows(h)
    return r if any(f"_{cuuid}_" in n and x.status == "DOWN" for n, x in r.items()) else None


async def test_comma_in_reason_phrase_is_parsed(hap: HAProxy, flaky_factory) -> None:
    b = await flaky_factory("fail")
    await hap.apply(desired_from_tree(tree([container("c0", hc(b.port))])))
    async def failed() -> StatRow | None:
        r = [x for x in (await rows(hap)).values() if x.check_status == "L7STS"]
        return r[0] if r else None

    row = await until(failed, what="a failed check")
    assert row.status == "DOWN" and row.check_status == "L7STS" and row.check_code == "503" and row.last_chk == "Down, really"


async def test_new_profile_reloads_with_state_kept(hap: HAProxy, flaky_factory) -> None:
    ok, bad = await flaky_factory("ok"), await flaky_factory("fail")
    base = [container("c0", hc(ok.port)), container("c1", hc(bad.port))]
    await hap.apply(desired_from_tree(tree(base)))
    await until(lambda: _down(hap, "c1"), what="c1 DOWN")
    await until(lambda: _status(hap, "c0", "UP"), what="c0 UP")
    before = await rows(hap)
    pid = hap.pid
    more = [*base, container("c2", hc(ok.port, request_line="GET /other HTTP/1.1\\r\\nHost:\\ example"))]
    await hap.apply(desired_from_tree(tree(more)))
    assert hap.pid != pid, "a new profile needs a reload"
    after = await rows(hap)
    for n, old in before.items():
        assert after[n].status == old.status, f"{n}: {old.status} -> {after[n].status} across the reload"
        assert after[n].lastchg is not None and old.lastchg is not None and after[n].lastchg >= old.lastchg
    c2 = next(x for n, x in after.items() if "_c2_" in n)
    assert c2.status.startswith("DOWN") or c2.status == "MAINT"
    await until(lambda: _status(hap, "c2", "UP"), what="c2 UP")
    assert Path(hap.s.config_path).read_text().count("http-check send") == 2  # noqa: ASYNC240


async def _status(h: HAProxy, cuuid: str, status: str) -> bool:
    r = await rows(h)
    return any(f"_{cuuid}_" in n and x.status == status for n, x in r.items())


async def test_kill9_is_recovered_with_all_checks(hap: HAProxy, flaky_factory) -> None:
    ok, bad = await flaky_factory("ok"), await flaky_factory("fail")
    ctrs = [container(f"c{i}", hc(ok.port)) for i in range(5)] + [container("d0", hc(bad.port))]
    await hap.apply(desired_from_tree(tree(ctrs)))
    await until(lambda: _down(hap, "d0"), what="d0 DOWN")
    await until(lambda: _count_up(hap, 5), what="5 UP")
    hap._state_text = ""
    await until(lambda: _state_saved(hap), what="a state snapshot taken after that")
    pid = hap.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await until(lambda: _new_pid(hap, pid), timeout=5, what="a new HAProxy")
    r = await rows(hap)
    assert len(r) == 6
    assert r[next(n for n in r if "_d0_" in n)].status == "DOWN", "restored DOWN from the snapshot"
    assert sum(x.status == "UP" for x in r.values()) == 5, "restored UP from the snapshot"
    assert hap.restarts == 1
    # the socket answers with mode 0600 at the configured path and HAProxy listens on nothing
    assert oct(os.stat(hap.s.socket_path).st_mode & 0o777) == "0o600"
    assert _listening_inodes(hap.pid or 0) == set()


async def _count_up(h: HAProxy, n: int) -> bool:
    return sum(x.status == "UP" for x in (await rows(h)).values()) == n


async def _state_saved(h: HAProxy) -> bool:
    return h._state_text.count("cattle-") >= 6


async def _new_pid(h: HAProxy, old: int) -> bool:
    return h.pid not in (None, old) and h.running.is_set()


def _listening_inodes(pid: int) -> set[str]:
    fds = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            t = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if t.startswith("socket:["):
            fds.add(t[8:-1])
    listening = set()
    for f in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{f}").read_text().splitlines()[1:]:
            parts = line.split()
            if (f.startswith("udp") or parts[3] == "0A") and parts[9] in fds:
                listening.add(parts[9])
    return listening


async def test_rejected_profile_is_quarantined_and_retried(tmp_path: Path, flaky_factory) -> None:
    """A config HAProxy refuses: logged, counted, the other checks still apply, retried later."""
    import asyncio
    import contextlib

    from healthcheck.haproxy import InvalidConfig

    flag = tmp_path / "reject"
    wrapper = tmp_path / "haproxy-wrapper"
    wrapper.write_text("#!/bin/sh\n"
                       f'if [ "$1" = "-c" ] && [ -e {flag} ] && grep -q "/reject-me" "$3"; then\n'
                       '  echo "[ALERT] (1) : config : fake rejection of /reject-me"; exit 1; fi\n'
                       'exec haproxy "$@"\n')
    wrapper.chmod(0o755)
    flag.touch()
    h = HAProxy(HAProxySettings(state_dir=str(tmp_path / "hc"), binary=str(wrapper)))
    try:
        ok = await flaky_factory("ok")
        base = [container("a", hc(ok.port)), container("b", hc(ok.port, request_line="GET /other HTTP/1.0"))]
        await h.apply(desired_from_tree(tree(base)))
        await until(lambda: _count_up(h, 2), what="2 UP")
        pid = h.pid
        bad = [*base, container("c", hc(ok.port, request_line="GET /reject-me HTTP/1.0")),
               container("d", hc(ok.port, interval=300))]
        with contextlib.suppress(InvalidConfig):
            await h.apply(desired_from_tree(tree(bad)))
            raise AssertionError("expected InvalidConfig")
        assert h.pid == pid, "the running HAProxy is kept"
        assert len(h.quarantined) == 1
        r = await rows(h)
        assert sorted(n.split("_")[1] for n in r) == ["a", "b", "d"], "the good new check applied"
        flag.unlink()
        await h.apply(desired_from_tree(tree(bad)))  # the retry
        assert not h.quarantined
        await until(lambda: _count_up(h, 4), what="4 UP after the retry")
    finally:
        await h.stop()
        await asyncio.sleep(0)


async def test_haproxy_runs_unprivileged(tmp_path: Path, flaky_factory, monkeypatch) -> None:
    """HAProxy needs no privilege: run it as `nobody` (via a --haproxy-bin wrapper) with the same config.

    The caller's cwd is a directory `nobody` cannot enter (a checkout in /root, mode 700): HAProxy
    runs in its state dir and never needs it."""
    import pwd
    import shutil

    import pytest

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to switch to nobody")
    import tempfile

    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="corral-hc-nobody-"))  # pytest's tmp dirs are 0700
    os.chmod(base, 0o755)
    sd = base / "hc"
    sd.mkdir()
    os.chown(sd, nobody.pw_uid, nobody.pw_gid)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    monkeypatch.chdir(private)
    wrapper = base / "haproxy-nobody"
    wrapper.write_text(f"#!/bin/sh\nexec setpriv --reuid {nobody.pw_uid} --regid {nobody.pw_gid} --clear-groups "
                       'haproxy "$@"\n')
    wrapper.chmod(0o755)
    h = HAProxy(HAProxySettings(state_dir=str(sd), binary=str(wrapper)))
    try:
        ok = await flaky_factory("ok")
        await h.apply(desired_from_tree(tree([container("a", hc(ok.port))])))
        await until(lambda: _count_up(h, 1), what="UP")
        pid = h.pid
        assert pid is not None
        uid = next(int(ln.split()[1]) for ln in Path(f"/proc/{pid}/status").read_text().splitlines()  # noqa: ASYNC240
                   if ln.startswith("Uid:"))
        assert uid == nobody.pw_uid
        st = os.stat(h.s.socket_path)
        assert st.st_uid == nobody.pw_uid and oct(st.st_mode & 0o777) == "0o600"
        assert _listening_inodes(pid) == set()
    finally:
        await h.stop()
        shutil.rmtree(base, ignore_errors=True)


async def test_reload_mode_keeps_states_through_the_state_file(hap: HAProxy, flaky_factory) -> None:
    """--apply-mode=reload (HAProxy < 2.5): every change reloads, states come back from the state file."""
    hap.reload_only = True
    ok, bad = await flaky_factory("ok"), await flaky_factory("fail")
    base = [container("u", hc(ok.port)), container("d", hc(bad.port))]
    await hap.apply(desired_from_tree(tree(base)))
    await until(lambda: _down(hap, "d"), what="d DOWN")
    await until(lambda: _status(hap, "u", "UP"), what="u UP")
    before = await rows(hap)
    pid = hap.pid
    await hap.apply(desired_from_tree(tree([*base, container("n", hc(ok.port))])))
    assert hap.pid != pid, "reload mode reloads"
    after = await rows(hap)
    for n, b in before.items():
        assert after[n].status == b.status, (n, b.status, after[n].status)
        assert (after[n].lastchg or 0) >= (b.lastchg or 0)
    new = next(x for n, x in after.items() if "_n_" in n)
    assert new.status.startswith("DOWN"), "a new check still needs rise successes"
    await until(lambda: _status(hap, "n", "UP"), what="n UP")


async def test_ipv6_target_runtime_and_reload(hap: HAProxy) -> None:
    import socket

    import pytest

    from tests.integration.healthcheck.flaky import Flaky

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    b = await Flaky("ok", host="::1").start()
    try:
        v6 = [container("a", hc(b.port), ip="::1")]
        await hap.apply(desired_from_tree(tree(v6)))  # start: rendered in the config
        await until(lambda: _status(hap, "a", "UP"), what="a UP over IPv6")
        more = [*v6, container("b", hc(b.port), ip="::1")]
        await hap.apply(desired_from_tree(tree(more)))  # runtime: add server [::1]:port
        await until(lambda: _status(hap, "b", "UP"), what="b UP over IPv6")
        pid = hap.pid
        reload = [*more, container("c", hc(b.port, request_line="GET /v6 HTTP/1.0"), ip="::1")]
        await hap.apply(desired_from_tree(tree(reload)))  # reload: state file keeps a and b UP
        assert hap.pid != pid
        r = await rows(hap)
        assert r["cattle-host-a-uuid_a_1"].status == "UP" and r["cattle-host-a-uuid_b_1"].status == "UP"
    finally:
        await b.stop()


async def test_start_failure_loop_backs_off_and_recovers(tmp_path: Path, flaky_factory) -> None:
    """HAProxy dies, then every restart fails at once: the supervisor must back off, not spin at
    20 starts a second; once starting works again it comes back by itself."""
    import asyncio
    import contextlib

    broken = tmp_path / "broken"
    starts = tmp_path / "starts"
    wrapper = tmp_path / "haproxy-wrapper"
    wrapper.write_text("#!/bin/sh\n"
                       f'if [ "$1" != "-c" ] && [ -e {broken} ]; then\n'
                       f'  date +%s.%N >> {starts}; echo "[ALERT] (1) : fake start failure" >&2; exit 1; fi\n'
                       'exec haproxy "$@"\n')
    wrapper.chmod(0o755)
    h = HAProxy(HAProxySettings(state_dir=str(tmp_path / "hc"), binary=str(wrapper), state_interval=0.5))
    stop = asyncio.Event()
    sup = asyncio.create_task(h.supervise(stop))
    try:
        ok = await flaky_factory("ok")
        await h.apply(desired_from_tree(tree([container("a", hc(ok.port))])))
        await until(lambda: _count_up(h, 1), what="UP")
        pid = h.pid
        assert pid is not None
        broken.touch()
        os.kill(pid, signal.SIGKILL)

        async def failed_starts() -> list[float] | None:
            t = [float(x) for x in starts.read_text().split()] if starts.exists() else []
            return t if len(t) >= 4 else None

        t = await until(failed_starts, timeout=20, what="4 failed start attempts")
        # Back-off floors (full jitter within [c/2, c], c = 0.5, 1, 2 s): >= 0.25 + 0.5 + 1 s.
        gaps = [round(t[i + 1] - t[i], 3) for i in range(len(t) - 1)]
        assert t[3] - t[0] >= 1.5, f"restart attempts are not backed off: gaps {gaps}"
        assert h.restarts == 0 and not h.running.is_set()
        broken.unlink()
        await until(lambda: _new_pid(h, pid), timeout=20, what="HAProxy back once starting works")
        await until(lambda: _count_up(h, 1), what="UP again")
        assert h.restarts == 1
    finally:
        stop.set()
        await h.stop()
        sup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sup


async def test_start_cancelled_midway_leaves_no_haproxy(tmp_path: Path, flaky_factory) -> None:
    """The daemon is stopped while a (re)start waits for the new HAProxy to answer: that process
    must not outlive the call (it has its own session: nothing else would ever stop it)."""
    import asyncio
    import contextlib

    pidfile = tmp_path / "started"
    wrapper = tmp_path / "haproxy-slow"
    wrapper.write_text("#!/bin/sh\n"
                       f'if [ "$1" != "-c" ]; then echo $$ > {pidfile}; sleep 0.5 >/dev/null 2>&1; fi\n'
                       'exec haproxy "$@"\n')
    wrapper.chmod(0o755)
    h = HAProxy(HAProxySettings(state_dir=str(tmp_path / "hc"), binary=str(wrapper)))
    ok = await flaky_factory("ok")
    task = asyncio.create_task(h.apply(desired_from_tree(tree([container("a", hc(ok.port))]))))

    async def started() -> int | None:
        return int(pidfile.read_text()) if pidfile.exists() and pidfile.read_text().strip() else None

    pid = await until(started, what="the new HAProxy spawned")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await h.stop()

    async def gone() -> bool:
        return not os.path.exists(f"/proc/{pid}")  # noqa: ASYNC240 -- neither running nor a zombie

    try:
        await until(gone, timeout=5, what=f"HAProxy {pid} killed and reaped after the cancelled start")
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _runtime_errors() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("corral_healthcheck_runtime_commands_total", {"outcome": "error"}) or 0.0


async def test_500_checks_added_and_removed_at_once(hap: HAProxy, flaky_factory) -> None:
    """One batch of 500 `add server` and then of 500 `del server`: every answer read as its own command's
    (HAProxy 2.6 ends `Server deleted.` without the blank line other answers end with)."""
    ok = await flaky_factory("ok")
    keep = container("keep", hc(ok.port, interval=5000))
    await hap.apply(desired_from_tree(tree([keep])))
    pid = hap.pid
    errors = _runtime_errors()
    many = [container(f"m{i}", hc(ok.port, interval=5000)) for i in range(500)]
    await hap.apply(desired_from_tree(tree([keep, *many])))
    assert hap.pid == pid, "added at run time"
    assert len(hap.live) == 501 and len(await rows(hap)) == 501
    assert _runtime_errors() == errors
    await hap.apply(desired_from_tree(tree([keep])))
    assert hap.pid == pid, "removed at run time, no sweeping reload"
    assert hap.parked == set(), f"{len(hap.parked)} deletions taken for refusals"
    assert _runtime_errors() == errors, "no false errors"
    assert list(await rows(hap)) == ["cattle-host-a-uuid_keep_1"], "all 500 gone from HAProxy"
    assert list(hap.live) == ["cattle-host-a-uuid_keep_1"]
