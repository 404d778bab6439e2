"""etc-host-updater.md §7 with real processes: the stand-in server, Corral metadata fed by it, and
``corral etc-host-updater`` writing a hosts file; metadata faults through a small failing proxy."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web

from agents.metrics import start_listener
from etchosts.render import BEGIN, END, HEADER
from tests.helpers.procs import ROOT, Proc, free_port, start_corral, wait_http
from tests.helpers.standin import StandIn
from tests.helpers.wait import until

pytestmark = pytest.mark.slow

ENV = {"hosts": [{"name": "node-a", "uuid": "ha", "agent_ip": "10.9.0.1", "agentId": "1"},
                 {"name": "node-b", "uuid": "hb", "agent_ip": "10.9.0.2"}]}


class Meta:
    """The stand-in and a Corral metadata fed by it (one pair for the module)."""

    def __init__(self, tmp: Path) -> None:
        self.standin = StandIn(load=ENV)
        self.port = free_port()
        self.argv = ["metadata", "--subscribe", "--listen", f"127.0.0.1:{self.port}", "--listenReload",
                     f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}",
                     "--answers", str(tmp / "answers.json"), "--reload-interval-limit", "50"]
        self.proc = start_corral(*self.argv, env=self.standin.env(), name="metadata")
        wait_http(f"{self.url}/2015-12-19/version", timeout=20)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.stop()
        self.standin.close()


@pytest.fixture(scope="module")
def meta(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Meta]:
    m = Meta(tmp_path_factory.mktemp("md"))
    yield m
    m.close()


def updater(path: Path, metadata_url: str, *extra: str) -> Proc:
    admin = free_port()
    p = start_corral("etc-host-updater", "--metadata-url", metadata_url, "--hosts-file", str(path),
                     "--hostname", "localhost", "--metrics-listen", f"127.0.0.1:{admin}", "--update-interval", "1",
                     *extra, name="etc-host-updater")
    p.admin_port = admin  # type: ignore[attr-defined]
    return p


def wait_file(path: Path, cond: Any, proc: Proc | None = None, timeout: float | None = None) -> str:
    """Wait (tests/helpers/wait.py) until the hosts file matches ``cond``; the updater must stay up."""
    def matched() -> str | None:
        text = path.read_text() if path.exists() else ""
        assert proc is None or proc.alive(), proc.log()
        return text if cond(text) else None

    try:
        return str(until(matched, what="hosts file matched", timeout=timeout))
    except AssertionError as e:
        text = path.read_text() if path.exists() else ""
        raise AssertionError(f"{e}:\n{text}\n{proc.log() if proc else ''}") from None


def lines(text: str) -> list[str]:
    return text.splitlines()


def test_hosts_added_updated_removed(meta: Meta, tmp_path: Path) -> None:
    """§7.1-§7.3: header + one line per host; add, update (nothing else changes), remove."""
    f = tmp_path / "hosts"
    p = updater(f, meta.url, "--debug")  # §7.9: --debug accepted
    try:
        text = wait_file(f, lambda t: "10.9.0.1    node-a\n" in t and "10.9.0.2    node-b\n" in t, p)
        assert text.startswith(HEADER) and lines(text)[6].endswith("    localhost")
        meta.standin.ctl("host", "add", "--name", "node-c", "--agent-ip", "10.9.0.3")
        text = wait_file(f, lambda t: "10.9.0.3    node-c\n" in t, p)
        meta.standin.ctl("host", "update", "node-c", "--agent-ip", "10.9.0.33")
        after = wait_file(f, lambda t: "10.9.0.33    node-c\n" in t, p)
        assert [x for x in lines(after) if "node-c" not in x] == [x for x in lines(text) if "node-c" not in x]
        meta.standin.ctl("host", "rm", "node-c")
        wait_file(f, lambda t: "node-c" not in t, p)
    finally:
        p.stop()


def test_duplicates_and_invalid_entries(meta: Meta, tmp_path: Path) -> None:
    """§7.4 and §7.5: one line per hostname (the first in metadata order); no malformed line,
    or the original's malformed lines under --legacy-overwrite."""
    s = meta.standin
    s.ctl("host", "add", "--name", "dup-1", "--hostname", "twin", "--agent-ip", "10.9.1.1")
    s.ctl("host", "add", "--name", "dup-2", "--hostname", "twin", "--agent-ip", "10.9.1.2")
    s.ctl("host", "add", "--name", "no-ip", "--hostname", "lonely")
    s.ctl("host", "add", "--name", "no-name", "--agent-ip", "10.9.1.4")
    s.ctl("host", "update", "no-name", "--set", "hostname=")
    f, g = tmp_path / "hosts", tmp_path / "legacy"
    p = updater(f, meta.url)
    q = updater(g, meta.url, "--legacy-overwrite")
    try:
        text = wait_file(f, lambda t: "twin" in t, p)
        assert [x for x in lines(text) if "twin" in x] == ["10.9.1.1    twin"]
        assert "lonely" not in text and "10.9.1.4" not in text
        assert all(not x.startswith(" ") and not x.endswith(" ") for x in lines(text))
        legacy = wait_file(g, lambda t: "twin" in t, q)
        assert "    lonely" in lines(legacy) and "10.9.1.4    " in lines(legacy)
        assert [x for x in lines(legacy) if "twin" in x] == ["10.9.1.1    twin"]
    finally:
        p.stop()
        q.stop()
        for n in ("dup-1", "dup-2", "no-ip", "no-name"):
            s.ctl("host", "rm", n)


def test_user_lines_survive_fifty_changes(meta: Meta, tmp_path: Path) -> None:
    """§7.6: --preserve keeps every line outside the block byte for byte."""
    f = tmp_path / "hosts"
    above = "127.0.0.1\tlocalhost\n172.17.0.9\tmy-container  # docker's line\n"
    below = "# added by hand\n10.1.1.1 db db.local\n"
    f.write_text(above)
    p = updater(f, meta.url, "--preserve")
    try:
        wait_file(f, lambda t: END in t, p)
        f.write_text(f.read_text() + below)  # a user edits the file below the block
        for i in range(50):
            meta.standin.ctl("host", "update", "node-b", "--agent-ip", f"10.9.2.{i + 1}")
        text = wait_file(f, lambda t: "10.9.2.50    node-b\n" in t, p)
        assert text.startswith(above + BEGIN + "\n") and text.endswith(END + "\n" + below)
        # drift: someone rewrites a line inside the block; it is repaired
        f.write_text(text.replace("10.9.2.50    node-b", "6.6.6.6    node-b"))
        assert wait_file(f, lambda t: "10.9.2.50    node-b\n" in t, p) == text
    finally:
        p.stop()
        meta.standin.ctl("host", "update", "node-b", "--agent-ip", "10.9.0.2")


def test_metadata_down_at_start(meta: Meta, tmp_path: Path) -> None:
    """§7.7: the original gives up and exits non-zero; Corral keeps retrying and writes when
    metadata comes."""
    dead = f"http://127.0.0.1:{free_port()}"
    legacy = updater(tmp_path / "legacy", dead, "--legacy-overwrite", "--startup-backoff-scale", "0.01")
    assert legacy.p is not None and legacy.p.wait(60) != 0
    assert "metadata never answered" in legacy.log()
    port = free_port()
    f = tmp_path / "hosts"
    p = updater(f, f"http://127.0.0.1:{port}")
    md: Proc | None = None
    try:
        wait_http(f"http://127.0.0.1:{p.admin_port}/healthz", status=503)  # type: ignore[attr-defined]
        assert p.alive() and not f.exists()
        md = start_corral("metadata", "--subscribe", "--listen", f"127.0.0.1:{port}", "--listenReload",
                          f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}",
                          "--answers", str(tmp_path / "answers.json"), env=meta.standin.env(), name="metadata2")
        wait_file(f, lambda t: "10.9.0.1    node-a\n" in t, p)
        wait_http(f"http://127.0.0.1:{p.admin_port}/healthz", status=200)  # type: ignore[attr-defined]
    finally:
        p.stop()
        if md is not None:
            md.stop()


def _is_tree(q: str) -> bool:
    """The updater's download: the whole tree of its API version (the watch reads ``hosts`` from it)."""
    return q.split("?")[0].rstrip("/").endswith("/2015-12-19")


class FailingProxy:
    """Forwards to metadata; answers 500 for the tree while ``fail`` is set; records the queries."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.fail = False
        self.seen: list[str] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.path_qs)
        if self.fail and _is_tree(request.path):
            return web.Response(status=500, text="injected")
        async with ClientSession() as s, s.get(self.target + request.path_qs, headers={
                "Accept": request.headers.get("Accept", "*/*")}) as r:
            return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)

    async def start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self.port = free_port()
        return await start_listener("127.0.0.1", self.port, app)


async def test_hosts_500_leaves_the_file_untouched(meta: Meta, tmp_path: Path) -> None:
    """§7.8, and §7.9's interval: the long-poll asks with maxWait=1."""
    proxy = FailingProxy(meta.url)
    runner = await proxy.start()
    f = tmp_path / "hosts"
    p = updater(f, f"http://127.0.0.1:{proxy.port}")
    try:
        await asyncio.to_thread(wait_file, f, lambda t: "node-a" in t, p)
        before = f.read_bytes()
        proxy.fail = True
        n = len(proxy.seen)
        await asyncio.to_thread(meta.standin.ctl, "host", "add", "--name", "node-x", "--agent-ip", "10.9.3.1")
        while not any(_is_tree(q) for q in proxy.seen[n:]):  # the updater tried, and got 500s
            assert p.alive()
            await asyncio.sleep(0.02)
        n = len([q for q in proxy.seen if _is_tree(q)])
        while len([q for q in proxy.seen if _is_tree(q)]) < n + 2:  # and retried
            await asyncio.sleep(0.02)
        assert f.read_bytes() == before
        proxy.fail = False
        await asyncio.to_thread(wait_file, f, lambda t: "10.9.3.1    node-x\n" in t, p)
        assert any("maxWait=1" in q and "wait=true" in q for q in proxy.seen)
    finally:
        p.stop()
        await runner.cleanup()
        await asyncio.to_thread(meta.standin.ctl, "host", "rm", "node-x")


def test_reader_never_sees_a_file_without_header(meta: Meta, tmp_path: Path) -> None:
    """§7.10: a reader looping as fast as it can while the file is rewritten 20 times."""
    f = tmp_path / "hosts"
    p = updater(f, meta.url)
    bad: list[str] = []
    reads = 0
    done = threading.Event()

    def reader() -> None:
        nonlocal reads
        while not done.is_set():
            with open(f, "rb") as fh:
                data = fh.read()
            reads += 1
            if not data.startswith(HEADER.encode()):
                bad.append(data[:80].decode(errors="replace"))

    try:
        wait_file(f, lambda t: "node-a" in t, p)
        t = threading.Thread(target=reader)
        t.start()
        for i in range(20):
            meta.standin.ctl("host", "update", "node-a", "--agent-ip", f"10.9.4.{i + 1}")
            wait_file(f, lambda t, i=i: f"10.9.4.{i + 1}    node-a\n" in t, p)
        done.set()
        t.join()
        assert reads > 100 and bad == []
    finally:
        done.set()
        p.stop()
        meta.standin.ctl("host", "update", "node-a", "--agent-ip", "10.9.0.1")


def test_flags_and_bad_flags() -> None:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "agents.cli", "etc-host-updater", "--version"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "etc-host-updater" in out.stdout
    out = subprocess.run([sys.executable, "-m", "agents.cli", "etc-host-updater", "--preserve", "--legacy-overwrite",
                          "--metrics-listen", "127.0.0.1:0"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "exclude each other" in out.stderr
