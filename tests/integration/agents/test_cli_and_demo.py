"""The ``corral`` command itself: dispatch, signals, exit codes, and the demo end to end."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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


def test_demo_runs_the_suite_and_stops_cleanly(tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-m", "agents.cli", "demo", "--workdir", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        assert p.stdout is not None
        head = ""
        deadline = time.monotonic() + 60
        while "Ctrl-C stops everything." not in head:
            line = p.stdout.readline()
            assert line, f"demo ended early:\n{head}"
            head += line
            assert time.monotonic() < deadline, head
        running = re.search(r"Corral demo running: (.*)", head)
        assert running is not None
        started = {s.strip() for s in running.group(1).split(",")}
        assert {"server", "metadata", "dns", "healthcheck"} <= started
        # The printed curl line works: metadata serves the sample environment through the stand-in.
        md = re.search(r"curl (http://127\.0\.0\.1:\d+)/latest/self/host/name", head)
        assert md is not None
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"{md.group(1)}/latest/self/host/name", timeout=2) as r:
                    if r.read() == b"node-a":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "metadata never served the sample environment"
            time.sleep(0.1)
        dig = re.search(r"dig @127\.0\.0\.1 -p (\d+) rancher-metadata", head)
        assert dig is not None
        deadline = time.monotonic() + 15
        while True:  # dns answers once it has its first table from metadata
            ans = subprocess.run(["dig", "+short", "+time=1", "+tries=1", "@127.0.0.1", "-p", dig.group(1),
                                  "web.shop.rancher.internal"], capture_output=True, text=True, timeout=20)
            if ans.stdout.strip() and not ans.stdout.startswith(";;"):  # ";;": not listening yet
                break
            assert time.monotonic() < deadline, "dns never answered a service name of the sample environment"
            time.sleep(0.2)
        assert all(re.fullmatch(r"10\.42\.\d+\.\d+", a) for a in ans.stdout.split()), ans.stdout
        p.send_signal(signal.SIGINT)
        rest, _ = p.communicate(timeout=30)
        assert p.returncode == 0, rest
        assert "demo stopped" in rest
        for name in ("server", "metadata", "dns", "healthcheck"):
            assert (tmp_path / f"{name}.log").exists()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
