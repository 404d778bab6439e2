"""File mode: an answers file that cannot be decoded (not UTF-8) or read is a clear error on every
reload path, and the daemon keeps serving the last good table."""

from __future__ import annotations

import os
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from dnslib import QTYPE

from tests.helpers.procs import free_port, start_corral, wait_http
from tests.helpers.wait import until
from tests.integration.dns.conftest import DnsProc

pytestmark = pytest.mark.timeout(60)

GOOD = '{"default": {"a": {"foo.rancher.internal.": {"answer": ["10.1.1.1"]}}}}'


def a_set(d: DnsProc) -> set[str]:
    return {str(x.rdata) for x in d.ask("foo.rancher.internal.").rr if x.rtype == QTYPE.A}


def start(answers: Path, resolv: Path) -> DnsProc:
    port, admin, rport = free_port(), free_port(), free_port()
    # no --recurser: upstreams come from --resolv-conf, which is watched for changes
    p = start_corral("dns", "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{admin}",
                     "--listenReload", f"127.0.0.1:{rport}", "--answers", str(answers),
                     "--resolv-conf", str(resolv), name="dns")
    try:
        wait_http(f"http://127.0.0.1:{admin}/ready", timeout=15)
    except TimeoutError:
        p.stop()
        raise AssertionError(f"dns did not become ready:\n{p.log()}") from None
    return DnsProc(p, port, admin, rport)


def test_undecodable_answers_file_is_a_clear_error_and_keeps_serving(tmp_path: Path) -> None:
    answers = tmp_path / "answers.json"
    answers.write_text(GOOD)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    d = start(answers, resolv)
    try:
        assert a_set(d) == {"10.1.1.1"}
        answers.write_bytes(b'{"default": {"a": {"\xff\xfe": 1}}}')  # not UTF-8
        # POST /v1/reload: 500 naming the file, not a bare "Internal Server Error"
        req = urllib.request.Request(f"http://127.0.0.1:{d.reload_port}/v1/reload", method="POST", data=b"")
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(req, timeout=5)
        assert ei.value.code == 500
        assert str(answers) in ei.value.read().decode()
        # SIGHUP: logged, still serving
        d.proc.signal(signal.SIGHUP)
        # resolv.conf changes: the watcher re-reads the answers file too; it must not kill the daemon
        st = resolv.stat()
        resolv.write_text("nameserver 127.0.0.2\n")
        os.utime(resolv, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
        # the SIGHUP and the watcher each log the failure; the daemon must be alive after both
        def both_logged() -> bool:
            assert d.proc.alive(), d.proc.log()
            return d.proc.log().count("reload failed, keeping the old answers") >= 2

        until(both_logged, what="both reload failures logged")
        assert "resolv.conf changed" in d.proc.log()
        assert "does not decode as UTF-8" in d.proc.log()
        assert d.proc.alive()
        assert a_set(d) == {"10.1.1.1"}
    finally:
        d.proc.stop()
