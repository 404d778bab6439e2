"""File mode (no metadata): YAML/JSON answers, PTR keys, SIGHUP and POST /v1/reload, bad files
rejected loudly, original-style flags on a real process, and the metadata-mode answers dump."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE

from tests.helpers.procs import free_port, start_corral
from tests.helpers.wait import until
from tests.integration.dns.conftest import DnsProc, Metadata, start_dns, write_legacy
from tests.unit.dns import example

pytestmark = pytest.mark.timeout(120)

YAML = """
default:
  a:
    foo.rancher.internal.: {answer: [10.1.1.1]}
  cname:
    bar.rancher.internal.: {answer: foo.rancher.internal.}
  ptr:
    10.1.1.1: foo.rancher.internal.
  authorative: [rancher.internal]
127.0.0.21:
  search: [x.rancher.internal]
  a:
    only-me.rancher.internal.: {answer: [10.2.2.2]}
"""


def a_set(r) -> set[str]:  # type: ignore[no-untyped-def]
    return {str(x.rdata) for x in r.rr if x.rtype == QTYPE.A}


def reload(d: DnsProc) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{d.reload_port}/v1/reload", method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_a(d: DnsProc, name: str, want: set[str], **kw: str) -> None:
    until(lambda: a_set(d.ask(name, **kw)) == want, what=f"{name} answering {want}")


def test_yaml_answers_reload_and_bad_file(tmp_path: Path) -> None:
    f = tmp_path / "answers.yaml"
    f.write_text(YAML)
    d = start_dns("--answers", str(f), recursers=["127.0.0.1:9"])
    try:
        assert a_set(d.ask("foo.rancher.internal.")) == {"10.1.1.1"}
        r = d.ask("bar.rancher.internal.")
        assert r.rr[0].rtype == QTYPE.CNAME and a_set(r) == {"10.1.1.1"}
        assert str(d.ask("1.1.1.10.in-addr.arpa.", "PTR").rr[0].rdata) == "foo.rancher.internal."
        assert a_set(d.ask("only-me.rancher.internal.", src="127.0.0.21")) == {"10.2.2.2"}
        assert RCODE[d.ask("only-me.rancher.internal.").header.rcode] == "NXDOMAIN"
        # POST /v1/reload
        f.write_text(YAML.replace("10.1.1.1]", "10.1.1.9]"))
        assert reload(d) == (200, "OK")
        assert a_set(d.ask("foo.rancher.internal.")) == {"10.1.1.9"}
        # SIGHUP
        f.write_text(YAML.replace("10.1.1.1]", "10.1.1.7]"))
        d.proc.signal(signal.SIGHUP)
        wait_a(d, "foo.rancher.internal.", {"10.1.1.7"})
        # a broken file is refused and the old answers stay
        f.write_text("default: {a: {x.: [not-an-ip]}}")
        status, body = reload(d)
        assert status == 500 and "non-IPv4" in body
        assert a_set(d.ask("foo.rancher.internal.")) == {"10.1.1.7"}
    finally:
        d.proc.stop()


def test_unparseable_answers_file_exits_loudly(tmp_path: Path) -> None:
    f = tmp_path / "answers.json"
    f.write_text("{not json")
    p = start_corral("dns", "--answers", str(f), "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen",
                     f"127.0.0.1:{free_port()}", "--listenReload", "127.0.0.1:0", name="dns-bad")
    assert p.p is not None
    assert p.p.wait(15) == 2
    assert "does not parse" in p.log()


def test_original_style_flags_on_a_real_process(tmp_path: Path) -> None:
    f = tmp_path / "answers.json"
    f.write_text(json.dumps({"default": {"a": {"x.rancher.internal.": {"answer": ["10.3.3.3"]}}}}))
    port = free_port()
    p = start_corral("dns", "-listen", f"127.0.0.1:{port}", "-answers", str(f), "-ttl", "1",
                     "--recurser-timeout=1", "-cache-capacity", "50", "-ndots", "0", "-never-recurse-to",
                     "169.254.169.250", "-rancher-metadata-answer", "10.9.9.9", "-metrics-listen",
                     f"127.0.0.1:{free_port()}", "-listenReload", "127.0.0.1:0", name="dns-goflags")
    d = DnsProc(p, port, 0, 0)
    try:
        r = until(lambda: d.ask("x.rancher.internal."), what="dns answering")
        assert a_set(r) == {"10.3.3.3"} and r.rr[0].ttl == 1
    finally:
        p.stop()


def test_metadata_mode_switches_and_dump(tmp_path: Path) -> None:
    md_file = tmp_path / "md.json"
    tree = example.tree(prefix="127.42.0.")
    for c in tree["containers"]:
        if c["service_name"] == "db":
            c["health_state"] = "unhealthy"
    write_legacy(md_file, tree)
    m = Metadata(md_file)
    dump = tmp_path / "dump.json"
    d = start_dns("--metadata-url", m.url, "--unhealthy-fallback", "none", "--ptr=false",
                  "--forward-single-label=true", "--answers", str(dump), "--rancher-metadata-answer", "agent_ip",
                  recursers=["127.0.0.1:9"])
    try:
        assert RCODE[d.ask("db.data.rancher.internal.").header.rcode] == "NXDOMAIN"  # no healthy, no fallback
        assert a_set(d.ask("rancher-metadata.rancher.internal.")) == {"10.0.0.5"}   # agent_ip of this host
        # --ptr=false: reverse names are forwarded (to a closed port here: SERVFAIL)
        assert RCODE[d.ask("11.0.42.127.in-addr.arpa.", "PTR").header.rcode] == "SERVFAIL"
        # --forward-single-label=true: unknown short names are forwarded too
        assert RCODE[d.ask("nosuch.").header.rcode] == "SERVFAIL"
        until(dump.exists, what="answers dump written")
        data = json.loads(dump.read_text())
        assert "web.shop.rancher.internal." in data["default"]["a"]
        assert data["default"]["authoritative"] == ["rancher.internal"]
        assert "127.42.0.11" in data
    finally:
        d.proc.stop()
        m.proc.stop()


def test_big_service_truncates_by_rrset_over_udp_only(tmp_path: Path) -> None:
    f = tmp_path / "answers.json"
    ips = [f"10.42.1.{i}" for i in range(1, 41)]
    huge = [f"10.42.2.{i}" for i in range(1, 121)]  # ~2 KB: above the batch reader's send slot
    f.write_text(json.dumps({"default": {"a": {"big.rancher.internal.": {"answer": ips},
                                               "huge.rancher.internal.": {"answer": huge}}}}))
    d = start_dns("--answers", str(f), recursers=["127.0.0.1:9"])
    try:
        small = d.ask("big.rancher.internal.", edns=False)
        assert small.header.tc and not small.rr
        large = d.ask("big.rancher.internal.", bufsize=4096)
        assert not large.header.tc and a_set(large) == set(ips)
        assert any(x.rtype == QTYPE.OPT for x in large.ar)
        tcp = d.ask("big.rancher.internal.", tcp=True, edns=False)
        assert not tcp.header.tc and a_set(tcp) == set(ips)
        out = d.dig("big.rancher.internal")  # dig advertises EDNS 1232: all 40 fit
        assert all(ip in out for ip in ips)
        for _ in range(2):  # the second one comes from the reply cache
            h = d.ask("huge.rancher.internal.", bufsize=4096)
            assert not h.header.tc and a_set(h) == set(huge)
    finally:
        d.proc.stop()


def _http(url: str, data: bytes | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:  # not listening yet (URLError is an OSError)
        return 0, str(e)


def _alive(pid: str) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_no_process_stays_between_rebuilds(tmp_path: Path) -> None:
    """Each rebuild runs in a child forked for it, which exits and is reaped before the new table
    is installed: no helper process (and its memory) stays beside the daemon."""
    import subprocess

    md_file = tmp_path / "md.json"
    write_legacy(md_file, example.tree(prefix="127.42.0."))
    m = Metadata(md_file)
    d = start_dns("--metadata-url", m.url, recursers=["127.0.0.1:9"])
    try:
        write_legacy(md_file, example.tree(prefix="127.42.0.", version="2", web_scale=3))
        until(lambda: RCODE[d.ask("shop-web-3.rancher.internal.").header.rcode] == "NOERROR",
              what="the second table installed")
        assert d.proc.log().count('"table installed"') == 2
        kids = subprocess.run(["pgrep", "-P", str(d.proc.pid)], capture_output=True, text=True).stdout.split()
        assert kids == []
    finally:
        d.proc.stop()
        m.proc.stop()


def test_resolv_conf_change_switches_upstream(tmp_path: Path) -> None:
    """No --recurser: upstreams come from resolv.conf (loopback entries are dropped like the
    original does, so a loopback test upstream is only reachable via the answers file's
    default recurse list); a resolv.conf change is picked up without a restart."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")  # dropped (loopback): falls back to nothing usable
    f = tmp_path / "answers.json"
    f.write_text(json.dumps({"default": {"recurse": ["127.0.0.1:9"]}}))
    d = start_dns("--answers", str(f), "--resolv-conf", str(resolv), recursers=[])
    try:
        assert RCODE[d.ask("x.example.").header.rcode] == "SERVFAIL"  # 127.0.0.1:9 refuses
        assert "resolv.conf changed" not in d.proc.log()
        time.sleep(0.01)
        resolv.write_text("nameserver 127.0.0.1\nnameserver 169.254.169.250\n")
        until(lambda: "resolv.conf changed" in d.proc.log(), what="resolv.conf change noticed")
    finally:
        d.proc.stop()


def test_starts_without_metadata_and_comes_back_by_itself(tmp_path: Path) -> None:
    md_file = tmp_path / "md.json"
    write_legacy(md_file, example.tree(prefix="127.42.0."))
    m = Metadata(md_file)
    m.proc.stop()  # metadata is down when dns starts
    port, admin = free_port(), free_port()
    p = start_corral("dns", "--listen", f"127.0.0.1:{port}", "--metadata-url", m.url, "--metrics-listen",
                     f"127.0.0.1:{admin}", "--listenReload", "127.0.0.1:0", "--recurser", "127.0.0.1:9",
                     name="dns-nomd")
    d = DnsProc(p, port, admin, 0)
    try:
        from tests.helpers.procs import wait_http

        wait_http(f"http://127.0.0.1:{admin}/ready", status=503, timeout=15)
        # in-zone names: SERVFAIL (never a wrong NXDOMAIN) until the first table
        assert RCODE[d.ask("web.shop.rancher.internal.").header.rcode] == "SERVFAIL"
        m.proc.start()
        wait_http(f"http://127.0.0.1:{admin}/ready", timeout=20)
        assert a_set(d.ask("web.shop.rancher.internal.")) == {"127.42.0.11", "127.42.0.12"}
    finally:
        p.stop()
        m.proc.stop()


def test_answers_dump_on_a_full_disk_keeps_the_previous_file(tmp_path: Path) -> None:
    """The dump goes to a 8 KiB tmpfs, mounted in a private mount namespace of the dns process
    only (the host's mounts are untouched); a table that no longer fits must be said in the log,
    leave no ``.tmp`` behind and keep the previous file."""
    import os
    import shutil
    import sys

    from tests.helpers.procs import ROOT, Proc, wait_http

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a small tmpfs in a private mount namespace")
    md_file = tmp_path / "md.json"
    write_legacy(md_file, example.tree(prefix="127.42.0."))
    m = Metadata(md_file)
    small = tmp_path / "small"
    small.mkdir()
    port, admin = free_port(), free_port()
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs -o size=8k corral-test "$0" && exec "$@"', str(small),
            sys.executable, "-m", "agents.cli", "dns", "--listen", f"127.0.0.1:{port}", "--metrics-listen",
            f"127.0.0.1:{admin}", "--listenReload", "127.0.0.1:0", "--metadata-url", m.url,
            "--recurser", "127.0.0.1:9", "--answers", str(small / "dump.json")]
    p = Proc(argv, env={"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}, cwd=str(ROOT), name="dns-fulldisk")
    d = DnsProc(p, port, admin, 0)
    try:
        wait_http(f"http://127.0.0.1:{admin}/ready", timeout=15)
        inside = Path(f"/proc/{p.pid}/root") / str(small).lstrip("/")  # the dns process's own view
        until((inside / "dump.json").exists, what="the first answers dump written")
        assert not (small / "dump.json").exists()  # the tmpfs exists only in that namespace
        first = (inside / "dump.json").read_text()
        assert "shop-web-2.rancher.internal." in json.loads(first)["default"]["a"]
        # 200 web containers: the new table's dump (~23 KB) does not fit any more
        write_legacy(md_file, example.tree(prefix="127.42.0.", version="2", web_scale=200))
        until(lambda: RCODE[d.ask("shop-web-150.rancher.internal.").header.rcode] == "NOERROR",
              what="the bigger table installed")
        assert "answers file not written, the previous one is kept" in p.log()
        assert "No space left on device" in p.log()
        assert sorted(x.name for x in inside.iterdir()) == ["dump.json"]  # no .tmp left behind
        assert (inside / "dump.json").read_text() == first
    finally:
        p.stop()
        m.proc.stop()
