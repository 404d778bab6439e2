"""A real ``corral metadata`` (file mode) against real HTTP clients (raw sockets, urllib, curl)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.wait import DEFAULT_WAIT, until
from tests.unit.metadata.test_golden import ROWS

from .conftest import EXAMPLE, Metadata, Reply, fetch, loopback_example, read_reply, start_metadata

J = "application/json"


@pytest.mark.parametrize(("row", "path", "accept", "ip", "status", "body"), ROWS,
                         ids=[f"{r[0]}:{r[1]}:{r[2] or 'text'}" for r in ROWS])
def test_spec_examples_over_http(md_ro: Metadata, row: int, path: str, accept: str, ip: str, status: int,
                                 body: bytes) -> None:
    h = {}
    if accept:
        h["Accept"] = accept
    if ip != "127.0.0.1":
        h["X-Forwarded-For"] = ip
    md = md_ro
    r = md.get(path, headers=h)
    assert (r.status, r.body) == (status, body)
    assert r.header("Content-Length") == str(len(body))
    assert r.header("Date")
    if status == 301:
        assert r.header("Location") == "/latest/containers"
        assert r.header("Access-Control-Allow-Origin") is None
        return
    assert r.header("Access-Control-Allow-Origin") == "*"
    want_ct = {J: "application/json", "application/yaml": "application/yaml"}.get(accept) if status == 200 else None
    want_ct = want_ct or "text/plain; charset=utf-8"
    if status == 200 and accept not in (J, "application/yaml") and body == b"":
        want_ct = None
    assert r.header("Content-Type") == want_ct
    if status == 404:
        assert r.header("X-Content-Type-Options") == "nosniff"
    # the same request as HEAD: same headers, no body
    hr = md.get(path, headers=h, method="HEAD")
    assert hr.status == status and hr.body == b"" and hr.header("Content-Length") == str(len(body))


def test_example_row20_long_poll(md: Metadata) -> None:
    # value=init answers at once, not after maxWait: the client gives up (an error) long before 120 s
    r = md.get("/latest/version?wait=true&value=init&maxWait=120", timeout=min(DEFAULT_WAIT, 100))
    assert (r.status, r.body) == (200, b"42-5cc6db68")
    r = md.get("/latest/version?wait=true&value=42-5cc6db68&maxWait=2")
    assert (r.status, r.body) == (200, b"42-5cc6db68")
    assert r.elapsed >= 1.95, r.elapsed  # the same version: held for maxWait


def test_router_errors_and_methods(md: Metadata) -> None:
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        r = md.get("/latest/version", method=method)
        assert (r.status, r.body) == (404, b"404 page not found\n")
        assert r.header("Access-Control-Allow-Origin") is None
    r = md.get("/favicon.ico")
    assert (r.status, r.body) == (404, b"404 page not found\n")
    r = md.get("/latest/a%zzb", check_closed=True)
    assert r.status == 400 and r.closed and r.header("Connection") == "close"
    # a POST with a body keeps the connection usable (the body is skipped)
    raw = (b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
           b"GET /latest/version HTTP/1.1\r\n\r\n")
    s = socket.create_connection(("127.0.0.1", md.port), timeout=5)
    s.sendall(raw)
    assert read_reply(s).status == 404
    assert read_reply(s).body == b"42-5cc6db68"
    s.close()


def test_keepalive_pipelining_and_http10(md: Metadata) -> None:
    s = socket.create_connection(("127.0.0.1", md.port), timeout=5)
    s.sendall(b"GET /latest/version HTTP/1.1\r\n\r\nGET /latest/self/host/name HTTP/1.1\r\n\r\n")
    assert read_reply(s).body == b"42-5cc6db68"
    assert read_reply(s).body == b"node-a"
    s.close()
    r = fetch(md.port, "", raw=b"GET /latest/version HTTP/1.0\r\n\r\n", check_closed=True)
    assert r.body == b"42-5cc6db68" and r.closed


def test_curl_and_json_clients(md: Metadata) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl missing")
    out = subprocess.run(["curl", "-sf", f"{md.url}/latest/self/host/name"], capture_output=True, check=True)
    assert out.stdout == b"node-a"
    out = subprocess.run(["curl", "-sf", "-H", "Accept: application/json", f"{md.url}/latest/containers"],
                         capture_output=True, check=True)
    assert [c["name"] for c in json.loads(out.stdout)] == ["shop-db-1", "shop-web-1", "shop-web-log-tail-1"]
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                          f"{md.url}/latest//containers"], capture_output=True, check=True)
    assert out.stdout.decode() == f"301 {md.url}/latest/containers"


def test_xff_rules(md: Metadata) -> None:
    assert md.get("/latest/self/container/name", headers={"X-Forwarded-For": "10.42.0.5"}).body == b"shop-web-1"
    # Corral takes the right-most address of a multi-value header (the original: no match)
    r = md.get("/latest/self/container/name", headers={"X-Forwarded-For": "10.1.1.1, 10.42.0.5"})
    assert r.body == b"shop-web-1"
    assert md.get("/latest/self", headers={"X-Forwarded-For": "10.9.9.9"}).body == b"host/\n"
    assert md.get("/latest/self", headers={"X-Forwarded-For": ""}).body == b"host/\n"


def test_xff_trusted_only(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_bytes(EXAMPLE.read_bytes())
    m = start_metadata(f, "--xff", "--xff-trusted", "127.0.0.7/32")
    try:
        h = {"X-Forwarded-For": "10.42.0.5"}
        assert m.get("/latest/self", headers=h).body == b"host/\n"  # peer 127.0.0.1 not trusted
        assert m.get("/latest/self/container/name", headers=h, src="127.0.0.7").body == b"shop-web-1"
    finally:
        m.proc.stop()


def test_self_by_peer_address(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_bytes(loopback_example())
    m = start_metadata(f)  # no --xff: the TCP peer decides, XFF is ignored
    try:
        assert m.get("/latest/self/container/name", src="127.0.0.5").body == b"shop-web-1"
        assert m.get("/latest/self/service/name", src="127.0.0.12").body == b"db"
        assert m.get("/latest/self/container/network_uuid", src="127.0.0.12").body == b"net-host-uuid"
        r = m.get("/latest/self/container", src="127.0.0.1", headers={"X-Forwarded-For": "127.0.0.5"})
        assert (r.status, r.body) == (404, b"Not found\n")
        assert m.get("/latest/self", src="127.0.0.9").body == b"host/\n"
        # non-self paths are the same for everybody
        assert m.get("/latest/containers/0/name", src="127.0.0.5").body == b"shop-db-1"
    finally:
        m.proc.stop()


def _rewrite_version(path: Path, new: str) -> None:
    data = EXAMPLE.read_bytes().replace(b'"version":"42-5cc6db68"', f'"version":"{new}"'.encode())
    tmp = path.with_name("tmp.json")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_long_poll_wakes_on_change_and_not_on_identical(md: Metadata) -> None:
    res: dict[str, object] = {}

    def poll(key: str, q: str) -> None:
        t0 = time.monotonic()
        r = md.get("/latest/version?wait=true&value=42-5cc6db68&" + q, headers={"Accept": J}, timeout=30)
        res[key] = (r.body, time.monotonic() - t0)

    # identical reload: nobody wakes, the poll runs to maxWait
    t = threading.Thread(target=poll, args=("same", "maxWait=2"))
    t.start()
    md.wait_for(lambda: md.metric("corral_metadata_longpoll_waiters") == 1)
    assert md.reload() == (200, "OK")
    t.join()
    body, dt = res["same"]  # type: ignore[misc]
    assert body == b'"42-5cc6db68"' and dt >= 1.9

    # a real change wakes the waiter long before its maxWait
    t = threading.Thread(target=poll, args=("changed", "maxWait=120"))
    t.start()
    md.wait_for(lambda: md.metric("corral_metadata_longpoll_waiters") == 1)
    _rewrite_version(md.answers, "43-aaaa")
    t.join(150)
    body, dt = res["changed"]  # type: ignore[misc]
    assert body == b'"43-aaaa"' and dt < 60  # woken by the change, not by maxWait
    assert md.metric("corral_metadata_longpoll_waiters") == 0


def test_long_poll_missing_key_and_caps(md: Metadata) -> None:
    t0 = time.monotonic()
    r = md.get("/latest/nothere?wait=true&value=x&maxWait=1")
    assert r.status == 404 and time.monotonic() - t0 >= 0.9  # held for maxWait, then the 404
    # not a long poll without value= (answered at once, not after maxWait: the client would give up first)
    assert md.get("/latest/version?wait=true&maxWait=120", timeout=min(DEFAULT_WAIT, 100)).body == b"42-5cc6db68"


def test_waiter_cap(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_bytes(EXAMPLE.read_bytes())
    m = start_metadata(f, "--max-waiters", "3")
    socks = []
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", m.port), timeout=5)
            s.sendall(b"GET /latest/version?wait=true&value=42-5cc6db68&maxWait=60 HTTP/1.1\r\n\r\n")
            socks.append(s)
        m.wait_for(lambda: m.metric("corral_metadata_longpoll_waiters") == 3)
        r = m.get("/latest/version?wait=true&value=42-5cc6db68&maxWait=60")
        assert r.status == 503 and r.header("Retry-After") == "1"
    finally:
        for s in socks:
            s.close()
        m.proc.stop()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_ten_thousand_aborted_long_polls_leave_nothing(md: Metadata) -> None:
    base = _fds(md.proc.pid)
    req = b"GET /latest/version?wait=true&value=42-5cc6db68&maxWait=120 HTTP/1.1\r\n\r\n"
    batch, total = 1000, 10_000
    for i in range(total // batch):
        socks = []
        for _ in range(batch):
            s = socket.create_connection(("127.0.0.1", md.port), timeout=10)
            s.sendall(req)
            socks.append(s)
        md.wait_for(lambda: md.metric("corral_metadata_longpoll_waiters") == batch, timeout=30)
        for j, s in enumerate(socks):
            if (i + j) % 2:  # half abort with RST, half close normally
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        md.wait_for(lambda: md.metric("corral_metadata_longpoll_waiters") == 0, timeout=30)
    md.wait_for(lambda: _fds(md.proc.pid) <= base, timeout=10)
    assert md.metric("corral_metadata_connections") == 0
    assert md.get("/latest/version").body == b"42-5cc6db68"


def test_bad_answers_keep_last_good(md: Metadata) -> None:
    for bad in (b"{not json", b'{"metadata_kind":"container","uuid":5}', b"[1,2]",
                b'{"metadata_kind":"host","uuid":"h"}\n{"metadata_kind":"defaultData"}'):
        md.answers.write_bytes(bad)
        status, text = md.reload()
        assert status == 500 and "answers" in text
        assert md.get("/latest/version").body == b"42-5cc6db68"
    assert md.metric("corral_metadata_apply_failures_total") >= 4
    md.answers.write_bytes(EXAMPLE.read_bytes())
    assert md.reload() == (200, "OK")


def test_admin_endpoints(md: Metadata) -> None:
    assert md.admin("/healthz") == (200, "ok\n")
    status, body = md.admin("/ready")
    assert status == 200 and json.loads(body)["ready"] is True
    md.get("/latest/version")
    md.get("/latest/nothere")
    m = md.admin("/metrics")[1]
    assert 'corral_metadata_requests_total{code="200",family="version"}' in m
    assert 'corral_metadata_requests_total{code="404",family="other"}' in m
    assert 'corral_metadata_answers_version_info{version="42-5cc6db68"} 1.0' in m
    # the admin routes are not on the metadata port
    assert md.get("/metrics").status == 404


def test_legacy_file_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "legacy.yaml"
    f.write_text("latest:\n  default: {version: v1, hosts: [{name: h}]}\n")
    m = start_metadata(f, "--file-poll", "0.1")
    try:
        assert m.get("/latest/hosts/0/name").body == b"h"
        f.unlink()
        assert m.reload()[0] == 500
        assert m.get("/latest/hosts/0/name").body == b"h"
    finally:
        m.proc.stop()
    m = start_metadata(tmp_path / "none.json")
    try:
        assert m.get("/latest/version").body == b"Not found\n"
        assert m.admin("/healthz")[0] == 200 and m.admin("/ready")[0] == 503
    finally:
        m.proc.stop()


def test_sighup_rereads_file(md: Metadata) -> None:
    data = EXAMPLE.read_bytes().replace(b'"version":"42-5cc6db68"', b'"version":"44-b"')
    md.answers.write_bytes(data)
    md.proc.signal(1)
    md.wait_for(lambda: md.get("/latest/version").body == b"44-b")


def test_waiter_answered_by_the_swap_of_a_change(md: Metadata) -> None:
    got: dict[str, bytes] = {}

    def poll() -> None:
        r = md.get("/latest/version?wait=true&value=42-5cc6db68&maxWait=120", timeout=150)
        got["body"] = r.body

    t = threading.Thread(target=poll)
    t.start()
    md.wait_for(lambda: md.metric("corral_metadata_longpoll_waiters") == 1)
    data = EXAMPLE.read_bytes().replace(b'"version":"42-5cc6db68"', b'"version":"45-c"')
    tmp = md.answers.with_name("next.json")
    tmp.write_bytes(data)
    os.replace(tmp, md.answers)
    status, _ = md.reload()  # answers after the new set is swapped in (the waiter is answered in the swap)
    assert status == 200
    # answered by the change, not by its maxWait (120 s, beyond the wait's patience)
    until(lambda: not t.is_alive(), what="the waiter answered", timeout=min(DEFAULT_WAIT, 100))
    assert got["body"] == b"45-c"


def test_go_style_client_against_corral(md: Metadata) -> None:
    """The shared MetadataClient (go-rancher-metadata's calls: /version long poll with value=init and
    Accept: application/json, GetContainers...) against the real daemon."""
    import asyncio

    from agents.metadata_client import MetadataClient

    async def go() -> None:
        async with MetadataClient(md.url) as c:
            assert await c.version() == "42-5cc6db68"
            snap = await c.snapshot()
            assert [x.name for x in snap.containers] == ["shop-db-1", "shop-web-1", "shop-web-log-tail-1"]
            assert snap.self_host is not None and snap.self_host.name == "node-a"
            assert await c.wait_version("init", max_wait=5) == "42-5cc6db68"
            t0 = time.monotonic()
            assert await c.wait_version("42-5cc6db68", max_wait=1) == "42-5cc6db68"
            assert time.monotonic() - t0 >= 0.9

    asyncio.run(go())


def test_reload_endpoint_methods(md: Metadata) -> None:
    import urllib.error
    import urllib.request

    for method in ("GET", "PUT", "DELETE"):
        req = urllib.request.Request(f"http://127.0.0.1:{md.reload_port}/v1/reload", method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 404
    assert md.reload() == (200, "OK")


def test_idle_connections_are_closed(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_bytes(EXAMPLE.read_bytes())
    m = start_metadata(f, "--idle-timeout", "1")
    try:
        idle = socket.create_connection(("127.0.0.1", m.port), timeout=10)
        poll = socket.create_connection(("127.0.0.1", m.port), timeout=10)
        poll.sendall(b"GET /latest/version?wait=true&value=42-5cc6db68&maxWait=3 HTTP/1.1\r\n\r\n")
        assert idle.recv(1) == b""  # closed by the server after ~1-2 s of silence
        assert read_reply(poll).body == b"42-5cc6db68"  # a waiting long poll is not idle
        idle.close()
        poll.close()
    finally:
        m.proc.stop()


def test_host_network_self_by_header(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_bytes(EXAMPLE.read_bytes().replace(
        b'"host_uuid":"host-b-uuid","host_ip":"192.168.10.12","hostname":"node-b"',
        b'"host_uuid":"host-a-uuid","host_ip":"192.168.10.11","hostname":"node-a"'))
    m = start_metadata(f)
    try:
        h = {"X-Corral-Container": "shop-db-1"}
        assert m.get("/latest/self/container/name", headers=h).body == b"shop-db-1"
        assert m.get("/latest/self/stack/name", headers=h).body == b"shop"
        assert m.get("/latest/self", headers={"X-Corral-Container": "shop-web-1"}).body == b"host/\n"
        assert m.get("/latest/self").body == b"host/\n"
    finally:
        m.proc.stop()


def test_big_responses_render_in_slices_without_stalling(tmp_path: Path) -> None:
    """/latest as YAML at 400 containers takes ~0.4 s of CPU: it is rendered in slices, the loop keeps
    answering scalar requests meanwhile, concurrent and aborted requests share one render."""
    import yaml

    from bench.metadata.gen import generate, stream

    f = tmp_path / "a.json"
    f.write_bytes(stream(generate(400)))
    m = start_metadata(f)
    try:
        out: dict[int, Reply] = {}

        def big(i: int) -> None:
            out[i] = m.get("/latest", headers={"Accept": "application/yaml"}, timeout=60)

        threads = [threading.Thread(target=big, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        aborted = socket.create_connection(("127.0.0.1", m.port))
        aborted.sendall(b"GET /latest HTTP/1.1\r\nAccept: application/yaml\r\n\r\n")
        aborted.close()
        while any(t.is_alive() for t in threads):  # small requests are answered during the renders
            r = m.get("/latest/containers/0/name")
            assert r.status == 200
        for t in threads:
            t.join()
        bodies = {out[i].body for i in out}
        assert len(bodies) == 1 and out[0].header("Content-Type") == "application/yaml"
        js = json.loads(m.get("/latest", headers={"Accept": "application/json"}).body)

        def nil_links(v: object) -> object:  # a nil links map: null in JSON, {} in YAML (as Go writes them)
            if isinstance(v, dict):
                return {k: ({} if k == "links" and x is None else nil_links(x)) for k, x in v.items()}
            return [nil_links(x) for x in v] if isinstance(v, list) else v

        assert yaml.load(bodies.pop(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) == nil_links(js)
        assert m.metric("corral_metadata_connections") <= 1
    finally:
        m.proc.stop()


def test_many_waiters_all_woken_by_one_change(md: Metadata) -> None:
    n = 2000
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", md.port), timeout=20)
        s.sendall(b"GET /latest/version?wait=true&value=42-5cc6db68&maxWait=60 HTTP/1.1\r\n\r\n")
        socks.append(s)
    md.wait_for(lambda: md.metric("corral_metadata_longpoll_waiters") == n, timeout=30)
    _rewrite_version(md.answers, "46-many")
    assert md.reload() == (200, "OK")
    bodies = {read_reply(s).body for s in socks}
    for s in socks:
        s.close()
    assert bodies == {b"46-many"}
    assert md.metric("corral_metadata_longpoll_waiters") == 0


def test_big_bodies_stream_with_flow_control(tmp_path: Path) -> None:
    """A 1+ MB body goes out in chunks as the socket drains; slow readers, pipelining and
    half-closed clients all get the exact bytes."""
    from bench.metadata.gen import generate, stream

    f = tmp_path / "a.json"
    f.write_bytes(stream(generate(1500)))
    m = start_metadata(f)
    try:
        ref = m.get("/latest/containers", headers={"Accept": "application/json"}).body
        assert len(ref) > 1_000_000 and json.loads(ref)
        # pipelined: big, small, big on one connection, read slowly
        s = socket.create_connection(("127.0.0.1", m.port), timeout=20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        big = b"GET /latest/containers HTTP/1.1\r\nAccept: application/json\r\n\r\n"
        s.sendall(big + b"GET /latest/version HTTP/1.1\r\n\r\n" + big)
        time.sleep(0.3)  # let the server hit the full socket (flow control engaged)
        assert read_reply(s).body == ref
        assert read_reply(s).status == 200
        assert read_reply(s).body == ref
        s.close()
        # half-closed client (request, then shutdown of its write side)
        s = socket.create_connection(("127.0.0.1", m.port), timeout=20)
        s.sendall(b"GET /latest/containers HTTP/1.1\r\nAccept: application/json\r\nConnection: close\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
        s.close()
        assert data.endswith(ref)
        # a reader that goes away mid-body leaves nothing behind
        s = socket.create_connection(("127.0.0.1", m.port), timeout=20)
        s.sendall(big)
        s.recv(1000)
        s.close()
        m.wait_for(lambda: m.metric("corral_metadata_connections") == 0)
        assert m.get("/latest/version").status == 200
    finally:
        m.proc.stop()


def test_shared_watch_follows_changes(md: Metadata) -> None:
    """The shared MetadataWatch (go-rancher-metadata's OnChange): a snapshot at once, then one per change."""
    import asyncio

    from agents.metadata_watch import MetadataWatch

    async def go() -> list[str]:
        stop = asyncio.Event()
        seen: list[str] = []
        w = MetadataWatch(md.url, max_wait=5, parse_in="thread")
        task = asyncio.create_task(w.run(stop))
        async for snap in w.updates(stop):
            seen.append(snap.version)
            if len(seen) == 1:
                await asyncio.to_thread(_rewrite_version, md.answers, "47-watch")
                await asyncio.to_thread(md.reload)
            else:
                stop.set()
        await task
        return seen

    assert asyncio.run(go()) == ["42-5cc6db68", "47-watch"]


def test_negative_max_wait_answers_at_once(md: Metadata) -> None:
    # the original's wait loop sees maxWait already passed: current value (or 404) without waiting
    r = md.get("/latest/version?wait=true&value=42-5cc6db68&maxWait=-5", timeout=20)
    assert (r.status, r.body) == (200, b"42-5cc6db68")
    r = md.get("/latest/nothere?wait=true&value=x&maxWait=-1", timeout=20)
    assert (r.status, r.body) == (404, b"Not found\n")
    assert md.metric("corral_metadata_longpoll_waiters") == 0


def test_slow_request_heads_are_closed(tmp_path: Path) -> None:
    """Slowloris: clients trickling a request head (or a declared body) a byte at a time are closed
    once the request has been arriving for --header-timeout, while other clients are served."""
    import select

    f = tmp_path / "a.json"
    f.write_bytes(EXAMPLE.read_bytes())
    m = start_metadata(f, "--header-timeout", "1")
    socks: list[socket.socket] = []
    try:
        payload = b"GET /latest/version HTTP/1.1\r\nHost: metadata\r\nX-Pad: " + b"a" * 4096
        body = b"GET /latest/version HTTP/1.1\r\nContent-Length: 100000\r\n\r\n"
        for i in range(100):
            s = socket.create_connection(("127.0.0.1", m.port), timeout=10)
            if i % 10 == 0:  # a complete head, then a body that never finishes
                s.sendall(body)
            socks.append(s)
        open_ = set(socks)
        deadline = time.monotonic() + 60  # a failsafe only: they must close after ~1-2 s
        step = 0
        while open_ and time.monotonic() < deadline:
            for s in list(open_):
                try:
                    s.send(payload[step % len(payload):step % len(payload) + 1])
                except OSError:
                    open_.discard(s)
            readable, _, _ = select.select(list(open_), [], [], 0.3)
            for s in readable:
                try:
                    if s.recv(1) == b"":
                        open_.discard(s)
                except OSError:
                    open_.discard(s)
            step += 1
            if step == 2:  # meanwhile an ordinary client is served
                assert m.get("/latest/version").body == b"42-5cc6db68"
        assert not open_, f"{len(open_)} trickling connections still open"
        m.wait_for(lambda: m.metric("corral_metadata_connections") == 0)
        assert m.get("/latest/version").body == b"42-5cc6db68"
    finally:
        for s in socks:
            s.close()
        m.proc.stop()


def test_open_files_soft_limit_raised_to_hard(tmp_path: Path) -> None:
    import resource

    f = tmp_path / "a.json"
    f.write_bytes(EXAMPLE.read_bytes())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    if low == hard:
        pytest.skip("the hard open-files limit is already at 256 or below")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # inherited by the daemon
    try:
        m = start_metadata(f)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        limits = Path(f"/proc/{m.proc.pid}/limits").read_text()
        line = next(ln for ln in limits.splitlines() if ln.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)], line
    finally:
        m.proc.stop()


@pytest.mark.parametrize("path", ["/latest", "/latest/", "/2015-12-19", "/2016-07-29/"])
def test_whole_tree_carries_each_callers_own_self(md: Metadata, path: str) -> None:
    """A whole version tree holds ``self``: a container asking for it must get its own ``self``, never
    the one of whoever asked first (the answer cache was shared by every caller for such paths)."""
    as_host = {"X-Forwarded-For": ""}
    as_web = {"X-Forwarded-For": "10.42.0.5"}
    for first, second in ((as_host, as_web), (as_web, as_host)):
        md.reload()  # a fresh cache: ``first`` fills it
        a = json.loads(md.get(path, headers={**first, "Accept": "application/json"}).body)
        b = json.loads(md.get(path, headers={**second, "Accept": "application/json"}).body)
        for tree, who in ((a, first), (b, second)):
            name = (tree.get("self") or {}).get("container", {}).get("name") if isinstance(tree, dict) else None
            # (2015-12-19 keeps the name's case, later versions lower-case it)
            assert (name.lower() if name else None) == ("shop-web-1" if who is as_web else None), (path, who)
