"""The ``corral`` command itself: dispatch, signals, exit codes, and the demo end to end."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.procs import ROOT, free_port, start_corral, wait_http
from tests.helpers.wait import DEFAULT_WAIT


def corral(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agents.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_usage_and_unknown_commands() -> None:
    out = corral()
    assert out.returncode == 2 and "usage: corral <command>" in out.stdout
    for name in ("server", "ctl", "demo", "metadata", "dns", "healthcheck"):
        assert re.search(rf"^  {name}\s", out.stdout, re.M), name
    bad = corral("frobnicate")
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr


def test_missing_server_credentials_is_a_clear_error(tmp_path: Path) -> None:
    env_less = subprocess.run([sys.executable, "-m", "agents.cli", "healthcheck", "--metrics-listen", "127.0.0.1:0"],
                              capture_output=True, text=True, timeout=30, cwd=ROOT,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert env_less.returncode != 0
    assert "CATTLE_URL" in env_less.stderr + env_less.stdout


def test_sigterm_stops_a_daemon_cleanly_with_json_logs(tmp_path: Path) -> None:
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"latest": {"default": {"version": "1", "hosts": []}}}))
    port = free_port()
    p = start_corral("metadata", "--answers", str(answers), "--listen", f"127.0.0.1:{port}",
                     "--listenReload", f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}")
    try:
        wait_http(f"http://127.0.0.1:{port}/latest/version")
        p.signal(signal.SIGTERM)
        assert p.p is not None
        assert p.p.wait(DEFAULT_WAIT) == 0
        lines = [json.loads(x) for x in p.log().splitlines() if x.startswith("{")]
        assert lines, p.log()
        assert all(rec["component"] == "metadata" for rec in lines)
        assert any(rec["event"] == "signal" and rec["signal"] == "SIGTERM" for rec in lines)
    finally:
        p.stop()


# What each printed hint must show: (command regex, regex on the note after '#', regex its output must
# match, whether it changes something (run once) or only reads (re-run until it shows it: the
# daemons follow the server within a second or two)). A hint with no row here fails the test.
EXPECT: list[tuple[str, str, str, bool]] = [
    (r"^export PATH=", "", r"", True),
    (r"host ls", "", r'"node-a"[\s\S]*"node-b"', False),
    (r"/ready$", "", r'"ready": true', False),
    (r"/latest/self/host/name$", "", r"^node-a$", False),
    (r"Accept: application/json.*/latest/self/host$", "", r'"name":"node-a"', False),
    (r"dig \+short .* rancher-metadata\.rancher\.internal$", "", r"^169\.254\.169\.250$", False),
    (r"dig \+short .* web\.shop\.rancher\.internal$", "a Web container", r"^10\.42\.\d+\.\d+$", False),
    (r"dig .* db\.shop\.rancher\.internal SRV$", "", r"status: NOERROR[\s\S]*ANSWER: 0,", False),
    (r"/metrics \| grep '\^corral_dns_generation'$", "", r"^corral_dns_generation [1-9]", False),
    (r"container get toggle-me \| grep health_state$", "healthy, after", r'"health_state": "healthy"', False),
    (r"/demo/toggle$", "fails", r"now failing", True),
    (r"container get toggle-me \| grep health_state$", "unhealthy", r'"health_state": "unhealthy"', False),
    (r"/demo/toggle$", "healthy again", r"now healthy", True),
    (r"reports --kind health \| grep -c toggle-me$", "", r"^[1-9]\d*$", False),
    (r"/metrics \| grep '\^corral_healthcheck_checks '$", "", r"^corral_healthcheck_checks [1-9]", False),
    (r"X-Forwarded-For: \S+' .*/latest/self/container/name$", "", r"^shop-web-1$", False),
    (r"--interface 127\.0\.0\.21 .*/latest/self/container/name$", "", r"^toggle-me$", False),
    (r"service scale Shop/Web 3$", "", r'"scale": 3', True),
    (r"container get Shop-Web-3 \| grep health_state$", "", r'"health_state": "initializing"', False),
    (r"dig \+short .* web\.shop\.rancher\.internal$", "still one address", r"^10\.42\.\d+\.\d+$", False),
    (r"container health Shop-Web-3 healthy$", "", r'"health_state": "healthy"', True),
    (r"dig \+short .* web\.shop\.rancher\.internal$", "Shop-Web-3's address", r"^{web3}$", False),
]


def _expectation(cmd: str, note: str) -> tuple[str, bool]:
    for c_re, n_re, out_re, once in EXPECT:
        if re.search(c_re, cmd) and re.search(n_re, note):
            return out_re, once
    raise AssertionError(f"a demo hint nobody checks: {cmd!r} (# {note}); add what it shows to EXPECT")


def _procs_mentioning(text: str) -> list[str]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(f"{d.name}: {cmd}")
    return found


def _wait_gone(tmp: Path) -> None:
    """Wait until no process mentions ``tmp`` any more (children stop after the demo returns)."""
    for _ in range(300):
        if not _procs_mentioning(str(tmp)):
            return
        time.sleep(0.1)
    raise AssertionError("left running:\n" + "\n".join(_procs_mentioning(str(tmp))))


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """The demo's TMPDIR: short, as /tmp is (HAProxy's unix socket path must fit in 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="cdt-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _start_demo(tmp: Path, *argv: str) -> subprocess.Popen[str]:
    import os

    env = {**os.environ, "TMPDIR": str(tmp), "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    # --hosts 1: as root the demo's default is the three-host one
    return subprocess.Popen([sys.executable, "-m", "agents.cli", "demo", "--hosts", "1", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)


def test_demo_hints_work_as_printed_and_ctrl_c_leaves_nothing(short_tmp: Path) -> None:
    import os

    tmp = short_tmp
    p = _start_demo(tmp)
    try:
        assert p.stdout is not None
        head = ""
        while "Ctrl-C stops everything." not in head:
            line = p.stdout.readline()
            assert line, f"demo ended early:\n{head}"
            head += line
        running = re.search(r"Corral demo running: (.*)", head)
        assert running is not None
        assert {"server", "metadata", "dns", "healthcheck"} <= {s.strip() for s in running.group(1).split(",")}
        hints = [h.split("    # ", 1) for h in re.findall(r"^  \$ (.*)$", head, re.M)]
        assert len(hints) >= 15, head
        admin = re.search(r"admin (http://127\.0\.0\.1:\d+)\)", head)
        workdir = re.search(r"logs and state in (\S+)", head)
        assert admin is not None and workdir is not None
        wd = Path(workdir.group(1))

        def logs() -> str:
            if p.poll() is not None:
                return "the demo ended:\n" + p.communicate()[0]
            return "\n".join(f"--- {f.name}\n" + f.read_text()[-1500:] for f in sorted(wd.glob("*.log")))
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        for cmd, note in ((h[0], h[1] if len(h) > 1 else "") for h in hints):
            want, once = _expectation(cmd, note)
            if "{web3}" in want:
                from standin.ctl import AdminClient

                ip = AdminClient(admin.group(1)).get("/_admin/containers/Shop-Web-3")["primary_ip"]
                want = want.replace("{web3}", re.escape(ip))
            for _attempt in range(1 if once else 60):
                out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60, env=env)
                if out.returncode == 0 and re.search(want, out.stdout.strip(), re.M):
                    break
                time.sleep(0.2)
            assert out.returncode == 0, f"{cmd}: exit {out.returncode}\n{out.stderr}\n{logs()}"
            assert re.search(want, out.stdout.strip(), re.M), f"{cmd} (# {note}) printed:\n{out.stdout}\n{logs()}"
        assert wd.parent == tmp
        p.send_signal(signal.SIGINT)
        rest, _ = p.communicate(timeout=60)
        assert p.returncode == 0, rest
        assert "demo stopped" in rest and "Traceback" not in head + rest
        _wait_gone(tmp)
        assert list(tmp.iterdir()) == [], "the demo's temporary directory was left behind"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_ctrl_c_during_start_up_stops_everything_and_removes_the_temp_dir(short_tmp: Path) -> None:
    tmp = short_tmp
    p = _start_demo(tmp)
    try:
        # interrupt while the daemons are being started: the server is up, metadata is starting
        while not list(tmp.glob("corral-demo-*/metadata.log")):
            assert p.poll() is None, p.communicate()[0]
            time.sleep(0.02)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out
        assert "demo stopped" in out and "Traceback" not in out
        assert "Ctrl-C stops everything." not in out  # it did stop during start-up
        _wait_gone(tmp)
        assert list(tmp.iterdir()) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
