"""Every command refuses bad input in one line: a non-zero exit, one line on stderr, no traceback.

Each case runs a real ``corral`` process. Daemons log to a file (``--log``), so that stderr holds
only what the command says to the person who started it. All cases of a test start at once and
are then waited for, so the whole file costs about one daemon start-up.
"""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.procs import ROOT, free_port
from tests.helpers.standin import StandIn

CATTLE = {"CATTLE_URL": "http://127.0.0.1:9/v1", "CATTLE_ACCESS_KEY": "k", "CATTLE_SECRET_KEY": "s"}


@dataclass
class Case:
    name: str
    argv: list[str]
    rc: int | None = None  # None: any non-zero
    says: str = ""  # a regex the stderr line must match


def _run_all(cases: list[Case], env: dict[str, str] | None = None) -> list[str]:
    """Start every case at once; return a description of each that broke the rules."""
    import os

    procs = [(c, subprocess.Popen([sys.executable, "-m", "agents.cli", *c.argv], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                  env={**os.environ, **CATTLE, **(env or {})}))
             for c in cases]
    bad = []
    for c, p in procs:
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            bad.append(f"{c.name}: still running after 60 s (the bad value was accepted)\n{err[-2000:]}")
            continue
        lines = err.splitlines()
        problems = []
        if p.returncode == 0 or (c.rc is not None and p.returncode != c.rc):
            problems.append(f"exit {p.returncode}, wanted {c.rc or 'non-zero'}")
        if "Traceback" in out + err:
            problems.append("a traceback")
        if len(lines) != 1:
            problems.append(f"{len(lines)} lines on stderr")
        elif c.says and not re.search(c.says, lines[0]):
            problems.append(f"stderr does not say /{c.says}/")
        if problems:
            bad.append(f"{c.name} ({' '.join(c.argv)}): {', '.join(problems)}\n  stderr: {err.strip()[:1500]}")
    return bad


@pytest.fixture
def taken() -> Iterator[int]:
    """A TCP port somebody else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_bad_flag_values_are_one_line_errors(tmp_path: Path) -> None:
    log = ["--log", str(tmp_path / "daemon.log")]
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"latest": {"default": {"version": ')
    cases = [
        Case("metadata corrupt answers, nothing good to serve", ["metadata", "--answers", str(corrupt),
             "--listen", f"127.0.0.1:{free_port()}", "--listenReload", "127.0.0.1:0", "--metrics-listen",
             "127.0.0.1:0", *log], rc=1, says=r"answers file .*corrupt\.json"),
        Case("metadata --answers is a directory", ["metadata", "--answers", str(tmp_path), *log], rc=2,
             says=r"--answers: .* is a directory"),
        Case("metadata --max-waiters -1", ["metadata", "--max-waiters", "-1", *log], rc=2,
             says=r"--max-waiters: must be >= 0"),
        Case("metadata --listen without a port", ["metadata", "--listen", "localhost", *log], rc=2,
             says=r"--listen: bad listen address"),
        Case("metadata --xff-trusted not a network", ["metadata", "--xff-trusted", "10.0.0.0/99", *log], rc=2,
             says=r"--xff-trusted"),
        Case("dns --log in a missing directory", ["dns", "--log", str(tmp_path / "no" / "dns.log")], rc=2,
             says=r"--log .*: No such file or directory"),
        Case("metadata --pid-file in a missing directory", ["metadata", "--answers", str(tmp_path / "a.json"),
             "--pid-file", str(tmp_path / "no" / "md.pid"), *log], rc=2, says=r"--pid-file .*: No such file"),
        Case("dns --recurser notanip", ["dns", "--recurser", "notanip", *log], rc=2,
             says=r"--recurser: not an IP address: 'notanip'"),
        Case("dns --ttl -1", ["dns", "--ttl", "-1", *log], rc=2, says=r"--ttl: must be >= 0"),
        Case("dns --metadata-url ftp", ["dns", "--metadata-url", "ftp://x/2016-07-29", *log], rc=2,
             says=r"--metadata-url: unsupported URL scheme"),
        Case("dns --listen port out of range", ["dns", "--listen", "127.0.0.1:70000", *log], rc=2,
             says=r"port out of range"),
        Case("healthcheck --poll-interval 0", ["healthcheck", "--poll-interval", "0", *log], rc=2,
             says=r"--poll-interval: must be greater than zero"),
        Case("healthcheck --check-networks", ["healthcheck", "--check-networks", "10.0.0.0/8,bogus", *log], rc=2,
             says=r"--check-networks: not a network"),
        Case("healthcheck --report-concurrency 0", ["healthcheck", "--report-concurrency", "0", *log], rc=2,
             says=r"must be >= 1"),
        Case("server --listen bad host", ["server", "--listen", "999.1.1.1:80", *log], rc=2,
             says=r"--listen: bad host"),
        Case("server --keys missing", ["server", "--keys", str(tmp_path / "nope.yaml"), *log], rc=2,
             says=r"--keys: no such file"),
        Case("demo --only nosuch", ["demo", "--only", "nosuch"], rc=2,
             says=r"--only: unknown 'nosuch' \(choose from metadata, dns, healthcheck"),
        Case("ctl --admin ftp", ["ctl", "--admin", "ftp://127.0.0.1:1", "status"], rc=2,
             says=r"--admin: unsupported URL scheme"),
        Case("ctl --admin nothing listening", ["ctl", "--admin", f"127.0.0.1:{free_port()}", "status"], rc=2,
             says=r"cannot reach the stand-in server admin API at http://127\.0\.0\.1:\d+"),
    ]
    bad = _run_all(cases)
    assert not bad, "\n".join(bad)


def _quiet_port(used: set[int]) -> int:
    """A free loopback port (TCP and UDP) below the kernel's ephemeral range: the cases run at once,
    and a port picked from that range can be taken by a neighbour case's own port-0 socket before
    its daemon binds it (CI saw dns fail on its --listen instead of the busy --metrics-listen)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    while True:
        port = rng.randrange(10000, low)
        if port in used:
            continue
        try:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        used.add(port)
        return port


def test_a_listener_that_cannot_bind_is_one_line_naming_flag_and_address(tmp_path: Path, taken: int) -> None:
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"latest": {"default": {"version": "1", "hosts": []}}}))
    busy = f"127.0.0.1:{taken}"

    used = {taken}

    def free() -> str:
        return f"127.0.0.1:{_quiet_port(used)}"

    def md(**over: str) -> list[str]:
        flags = {"--listen": free(), "--listenReload": free(), "--metrics-listen": free(), **over}
        return ["metadata", "--answers", str(answers), *[x for kv in flags.items() for x in kv],
                "--log", str(tmp_path / f"md-{len(over)}-{next(iter(over))}.log")]

    def dns(**over: str) -> list[str]:
        flags = {"--listen": free(), "--listenReload": free(), "--metrics-listen": free(), **over}
        return ["dns", "--answers", str(tmp_path / "dns.yaml"), *[x for kv in flags.items() for x in kv],
                "--log", str(tmp_path / f"dns-{next(iter(over))}.log")]

    def server(**over: str) -> list[str]:
        flags = {"--listen": free(), "--admin-listen": free(), **over}
        return ["server", "--access-key", "a", "--secret-key", "b", *[x for kv in flags.items() for x in kv],
                "--log", str(tmp_path / f"server-{next(iter(over))}.log")]

    in_use = r"cannot listen on 127\.0\.0\.1:{port} \({flag}\): address already in use"
    cases = [
        Case("metadata --listen", md(**{"--listen": busy}), 2, in_use.format(port=taken, flag="--listen")),
        Case("metadata --listenReload", md(**{"--listenReload": busy}), 2,
             in_use.format(port=taken, flag="--listenReload")),
        Case("metadata --metrics-listen", md(**{"--metrics-listen": busy}), 2,
             in_use.format(port=taken, flag="--metrics-listen")),
        Case("metadata --metrics-listen not on this host", md(**{"--metrics-listen": "192.0.2.1:9112"}), 2,
             r"cannot listen on 192\.0\.2\.1:9112 \(--metrics-listen\): address not available"),
        Case("dns --listen", dns(**{"--listen": busy}), 2, in_use.format(port=taken, flag="--listen")),
        Case("dns --metrics-listen", dns(**{"--metrics-listen": busy}), 2,
             in_use.format(port=taken, flag="--metrics-listen")),
        Case("healthcheck --metrics-listen", ["healthcheck", "--metadata-address", "127.0.0.1:9", "--state-dir",
             str(tmp_path / "hc"), "--metrics-listen", busy, "--log", str(tmp_path / "hc.log")], 2,
             in_use.format(port=taken, flag="--metrics-listen")),
        Case("server --listen", server(**{"--listen": busy}), 2, in_use.format(port=taken, flag="--listen")),
        Case("server --admin-listen", server(**{"--admin-listen": busy}), 2,
             in_use.format(port=taken, flag="--admin-listen")),
        Case("server --metrics-listen", server(**{"--metrics-listen": busy}), 2,
             in_use.format(port=taken, flag="--metrics-listen")),
    ]
    bad = _run_all(cases)
    assert not bad, "\n".join(bad)


def test_ctl_admin_without_a_scheme_means_http(standin: StandIn) -> None:
    hostport = standin.admin_url.removeprefix("http://")
    out = subprocess.run([sys.executable, "-m", "agents.cli", "ctl", "--admin", hostport, "status"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "revision" in json.loads(out.stdout)


def test_every_command_has_version_and_shows_defaults_in_help() -> None:
    from agents.cli import SUBCOMMANDS
    from agents.config import VERSION

    names = list(SUBCOMMANDS)
    procs = {(n, flag): subprocess.Popen([sys.executable, "-m", "agents.cli", n, flag], cwd=ROOT, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for n in names for flag in ("--version", "--help")}
    for (n, flag), p in procs.items():
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and not err, (n, flag, err)
        if flag == "--version":
            assert out.startswith("corral") and n in out and len(out.splitlines()) == 1, out
            assert n in ("etc-host-updater",) or out.strip() == f"corral-{n} {VERSION}"
            continue
        # every option that takes a value and has a help text says its default
        entries = re.split(r"\n  (?=-)", out.split("options:", 1)[1])
        for e in entries:
            head = e.split("\n")[0]
            takes_value = re.match(r"-[-\w]+ [A-Z\[]", head.strip()) is not None
            if takes_value and len(e.split()) > 2 and "--help" not in head:
                assert "(default" in e, f"corral {n} --help: {head.strip()} shows no default"
