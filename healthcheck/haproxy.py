"""HAProxy adapter: config render, the child process, the runtime API and the stats CSV.

Design (healthcheck.md §5.2, §6):

* One backend per check *profile* (mode, HTTP request, response timeout) named
  ``hcp-<8 hex>``; servers keep the original's ``cattle-…`` names.
* A change that needs no new profile is applied over the admin socket: ``add server`` +
  ``enable health`` + ``enable server`` + ``set server … health down`` (a new check needs a
  real ``rise``-long warm-up), ``disable server`` + ``del server`` to remove. Nothing else is
  touched, so the other checks keep their state and counters.
* A new profile needs a reload: render, ``haproxy -c``, save ``show servers state`` to the
  state file (dropping lines whose address moved, haproxy#985), start the new process with
  ``-sf <old>``. Servers the state file does not know are forced DOWN before anything reads them.
* HAProxy runs as our foreground child (``-db``), unprivileged, with no listener at all; its
  stdout carries ``Server b/s is UP|DOWN`` lines, used only as a hint to poll at once.
* A child that dies is restarted with back-off from the latest state snapshot (taken every
  ``state_interval`` seconds); afterwards every check's health is forced back to the state last
  reported for it, so a stale snapshot never causes a spurious report.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agents.backoff import Backoff
from agents.errors import ConfigError, ProtocolError, TransportError
from agents.log import get_logger
from agents.metrics import counter, gauge
from healthcheck.desired import Check, Desired, Profile

__all__ = [
    "NO_ANSWER",
    "HAProxy",
    "HAProxySettings",
    "InvalidConfig",
    "StatRow",
    "StatsSocket",
    "haproxy_version",
    "parse_cli_answers",
    "parse_stat_csv",
    "render_config",
]

log = get_logger(__name__)
_RESTARTS = counter("healthcheck", "haproxy_restarts", "HAProxy restarts after it died")
_RELOADS = counter("healthcheck", "haproxy_reloads", "HAProxy (re)starts with a new config", ["reason"])
_INVALID = counter("healthcheck", "config_invalid", "Configs HAProxy rejected")
_RUNTIME_CMDS = counter("healthcheck", "runtime_commands", "Runtime API commands by outcome", ["outcome"])
_UP = gauge("healthcheck", "haproxy_up", "1 while HAProxy runs and answers")

STATE_FILE = "server-state"
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes, the last one a NUL
CHUNK_BYTES = 8000  # one CLI line must fit in HAProxy's buffer (tune.bufsize 16k)


class InvalidConfig(TransportError):
    """HAProxy rejected a rendered config (the message is HAProxy's own)."""


@dataclass(frozen=True)
class HAProxySettings:
    """Paths are made absolute here: HAProxy reads a relative ``stats socket`` as host:port, and it
    runs in its state dir, not in the caller's working directory."""

    state_dir: str
    binary: str = "haproxy"
    stats_socket: str = ""
    threads: int = 1
    fastinter: int = 0
    state_interval: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", os.path.abspath(self.state_dir))
        if self.stats_socket:
            object.__setattr__(self, "stats_socket", os.path.abspath(self.stats_socket))
        if len(os.fsencode(self.socket_path)) > UNIX_PATH_MAX:
            raise ConfigError(f"admin socket path {self.socket_path} is longer than the {UNIX_PATH_MAX} bytes "
                              "a unix socket allows; choose a shorter --state-dir or --stats-socket")

    @property
    def socket_path(self) -> str:
        return self.stats_socket or os.path.join(self.state_dir, "haproxy.sock")

    @property
    def config_path(self) -> str:
        return os.path.join(self.state_dir, "haproxy.cfg")

    @property
    def state_path(self) -> str:
        return os.path.join(self.state_dir, STATE_FILE)

    @property
    def pid_path(self) -> str:
        return os.path.join(self.state_dir, "haproxy.pid")


# --------------------------------------------------------------------------- rendering

def _q(s: str) -> str:
    """Single-quoted config word (desired.py guarantees no quote inside)."""
    if "'" in s:
        raise ValueError(f"cannot quote {s!r}")
    return f"'{s}'"


def _profile_lines(p: Profile) -> list[str]:
    lines = [f"backend {p.backend}", f"    mode {p.mode}", "    balance roundrobin"]
    if p.request is not None:
        r = p.request
        send = f"    http-check send meth {_q(r.method)} uri {_q(r.uri)} ver {_q(r.version)}"
        for name, value in r.headers:
            send += f" hdr {_q(name)} {_q(value)}"
        lines += ["    option httpchk", send]
    if p.response_timeout:
        lines.append(f"    timeout check {p.response_timeout}")
    return lines


def server_args(c: Check, fastinter: int = 0) -> str:
    s = f"{c.addr} {c.server_options()}"
    if fastinter:
        s += f" fastinter {fastinter}"
    return s


def render_config(settings: HAProxySettings, profiles: Iterable[Profile], servers: Iterable[Check],
                  disabled: Iterable[str] = ()) -> str:
    """The whole config: global, defaults, one backend per profile with its servers."""
    dis = set(disabled)
    by_backend: dict[str, list[Check]] = {}
    for c in servers:
        by_backend.setdefault(c.profile.backend, []).append(c)
    out = [
        "# Written by corral healthcheck; rewritten on every reload.",
        "global",
        f"    stats socket {settings.socket_path} mode 600 level admin",
        "    stats timeout 30s",
        "    log stdout format raw local0 notice",
        f"    server-state-file {settings.state_path}",
        "    hard-stop-after 5s",
        f"    nbthread {max(1, settings.threads)}",
        "",
        "defaults",
        "    mode tcp",
        "    log global",
        "    timeout connect 5s",
        "    timeout client 30s",
        "    timeout server 30s",
        "    load-server-state-from-file global",
        "",
    ]
    for p in sorted(set(profiles), key=lambda x: x.backend):
        out += _profile_lines(p)
        for c in sorted(by_backend.get(p.backend, ()), key=lambda x: x.name):
            line = f"    server {c.name} {server_args(c, settings.fastinter)}"
            if c.name in dis:
                line += " disabled"
            out.append(line)
        out.append("")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- stats

@dataclass(frozen=True)
class StatRow:
    backend: str
    name: str
    status: str
    check_status: str  # "* " prefix stripped
    check_code: str = ""
    last_chk: str = ""
    check_desc: str = ""
    lastchg: int | None = None
    chkfail: int | None = None
    chkdown: int | None = None
    check_rise: int | None = None
    check_fall: int | None = None
    addr: str = ""


def _opt_int(v: str | None) -> int | None:
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        return None


def parse_stat_csv(text: str) -> list[StatRow]:
    """Parse ``show stat`` output: header by name, real CSV quoting, server rows only.

    Lines without a quote (almost all) are split directly; a line with a quoted field (a
    reason phrase with a comma, the original's crash) goes through the csv module.
    """
    if not text.startswith("# "):
        raise ProtocolError(f"show stat: no CSV header in {text[:80]!r}")
    lines = text[2:].split("\n")
    header = next(csv.reader([lines[0]]))
    idx = {name: i for i, name in enumerate(header) if name}
    for need in ("pxname", "svname", "status"):
        if need not in idx:
            raise ProtocolError(f"show stat: column {need} missing")
    names = ("pxname", "svname", "status", "check_status", "check_code", "last_chk", "check_desc", "lastchg",
             "chkfail", "chkdown", "check_rise", "check_fall", "addr")
    pos = [idx.get(n, 1 << 30) for n in names]
    out: list[StatRow] = []
    for ln in lines[1:]:
        if not ln:
            continue
        row = ln.split(",") if '"' not in ln else next(csv.reader([ln]))
        if len(row) < 3:
            continue
        n = len(row)
        v = [row[i] if i < n else "" for i in pos]
        if v[1] in ("FRONTEND", "BACKEND"):
            continue
        cs = v[3]
        if cs.startswith("* "):
            cs = cs[2:]
        out.append(StatRow(
            backend=v[0], name=v[1], status=v[2], check_status=cs, check_code=v[4], last_chk=v[5],
            check_desc=v[6], lastchg=_opt_int(v[7]), chkfail=_opt_int(v[8]), chkdown=_opt_int(v[9]),
            check_rise=_opt_int(v[10]), check_fall=_opt_int(v[11]), addr=v[12],
        ))
    return out


NO_ANSWER = "(no answer)"  # a command HAProxy never answered (it closed the connection first)


def parse_cli_answers(text: str, n: int) -> list[str]:
    """Split the answers to ``prompt`` + ``n`` commands + ``quit`` sent in interactive mode.

    In that mode HAProxy writes its prompt ``> `` after every answer, whatever the answer's own
    ending (2.6 ends ``del server``'s answers without the blank line the others end with), so
    the answers are cut at the prompts, one per command; each is returned stripped. A command
    left unanswered gets :data:`NO_ANSWER`, never an empty (successful-looking) answer.
    """
    parts = text.split("\n> ")
    if parts[0] == "":  # the answer to `prompt` itself, before the first prompt
        parts = parts[1:]
    elif parts[0].startswith("> "):
        parts[0] = parts[0][2:]
    # the last piece is whatever followed the final prompt (nothing, after `quit`): a piece is an
    # answer only when HAProxy wrote a prompt after it
    out = [p.strip() for p in parts[: max(0, min(n, len(parts) - 1))]]
    return out + [NO_ANSWER] * (n - len(out))


class StatsSocket:
    """The admin socket: one connection per query, or per batch of commands in interactive mode."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    async def raw(self, line: str) -> str:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(self.path, limit=1 << 24)
                try:
                    writer.write(line.encode() + b"\n")
                    await writer.drain()
                    data = await reader.read()
                finally:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
        except (OSError, TimeoutError) as e:
            raise TransportError(f"haproxy socket {self.path}: {type(e).__name__}: {e}") from e
        return data.decode("utf-8", "replace")

    async def run(self, cmds: Sequence[str]) -> list[str]:
        """Run commands in as few connections as fit; one answer per command (stripped).

        Each batch is one interactive session (``prompt``, a command per line, ``quit``), so every
        answer is delimited by the prompt that follows it (:func:`parse_cli_answers`)."""
        out: list[str] = []
        i = 0
        while i < len(cmds):
            batch: list[str] = []
            size = 0
            while i < len(cmds) and (not batch or size + len(cmds[i]) + 1 < CHUNK_BYTES):
                if "\n" in cmds[i] or ";" in cmds[i]:
                    raise ValueError(f"one command per line: {cmds[i]!r}")
                batch.append(cmds[i])
                size += len(cmds[i]) + 1
                i += 1
            text = await self.raw("\n".join(["prompt", *batch, "quit"]))
            out.extend(parse_cli_answers(text, len(batch)))
        return out

    async def show_stat(self) -> list[StatRow]:
        return parse_stat_csv(await self.raw("show stat -1 4 -1"))

    async def info(self) -> dict[str, str]:
        text = await self.raw("show info")
        d: dict[str, str] = {}
        for ln in text.splitlines():
            k, sep, v = ln.partition(":")
            if sep:
                d[k.strip()] = v.strip()
        return d


async def haproxy_version(binary: str) -> tuple[int, int]:
    try:
        p = await asyncio.create_subprocess_exec(binary, "-v", stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.STDOUT)
        out, _ = await p.communicate()
    except OSError as e:
        raise ConfigError(f"cannot run {binary}: {e}") from e
    m = re.search(r"version (\d+)\.(\d+)", out.decode(errors="replace"))
    if not m:
        raise ConfigError(f"{binary} -v: version not understood")
    return int(m.group(1)), int(m.group(2))


# --------------------------------------------------------------------------- state file

def filter_state(text: str, servers: Mapping[str, Check]) -> tuple[str, set[str]]:
    """Keep the state lines of servers that stay in the same backend at the same address.

    Returns the state file text and the names it restores. haproxy#985: a restored port
    overrides the config's, so a moved server must start fresh instead.
    """
    lines = text.splitlines()
    if not lines or lines[0].strip() != "1":
        return "1\n", set()
    header = None
    keep = ["1"]
    names: set[str] = set()
    for ln in lines[1:]:
        if ln.startswith("#"):
            header = ln[1:].split()
            keep.append(ln)
            continue
        if not ln.strip() or header is None:
            continue
        f = dict(zip(header, ln.split(), strict=False))
        c = servers.get(f.get("srv_name", ""))
        if c is None or c.profile.backend != f.get("be_name"):
            continue
        if f.get("srv_addr") != c.ip or f.get("srv_port") != str(c.port):
            continue
        keep.append(ln)
        names.add(c.name)
    return "\n".join(keep) + "\n", names


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the process

@dataclass
class _Child:
    proc: asyncio.subprocess.Process
    stderr: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    expected_exit: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class HAProxy:
    """Owns the HAProxy child and what it runs; every change goes through :meth:`apply`."""

    def __init__(self, settings: HAProxySettings, *, on_hint: Callable[[], None] | None = None,
                 forced_health: Callable[[], Mapping[str, str]] | None = None,
                 on_start_error: Callable[[str], None] | None = None) -> None:
        """``on_start_error`` is called with a one-line reason when HAProxy cannot be started (no
        process runs our checks), and with ``""`` once one runs again."""
        self.s = settings
        self.sock = StatsSocket(settings.socket_path)
        self.on_hint = on_hint or (lambda: None)
        self.forced_health = forced_health or (lambda: {})
        self.on_start_error = on_start_error or (lambda _: None)
        self.start_error = ""  # why no HAProxy runs although one should ("" when one runs or none is wanted)
        self.live: dict[str, Check] = {}  # servers HAProxy has, as configured
        self.profiles: set[Profile] = set()  # backends of the running config
        self.parked: set[tuple[str, str]] = set()  # (backend, name) left in MAINT after a failed del
        self.armed: set[str] = set()  # names (re)armed since the last take_armed()
        self.restored: set[str] = set()  # names whose state came from a previous HAProxy (take_restored())
        self.generation = 0  # bumps on every (re)start: states may have been restored
        self.running = asyncio.Event()
        self.crashed = asyncio.Event()
        self.restarts = 0
        self.reloads = 0
        self.reload_only = False  # --apply-mode=reload: every change is a reload with the state file
        self.quarantined: set[Profile] = set()  # profiles HAProxy rejected (retried by the reconcile loop)
        self.runtime_commands = 0
        self._child: _Child | None = None
        self._lock = asyncio.Lock()
        self._desired: Desired | None = None
        self._state_text = ""  # latest good `show servers state`
        Path(settings.state_dir).mkdir(parents=True, exist_ok=True)

    @property
    def pid(self) -> int | None:
        return self._child.proc.pid if self._child and self._child.proc.returncode is None else None

    # ---- public
    async def apply(self, desired: Desired) -> None:
        """Make HAProxy run ``desired``; a profile HAProxy rejects is quarantined, the rest applies.

        Raises :class:`InvalidConfig` while anything is quarantined, so the reconcile loop retries
        the whole set with back-off (up to ``--retry-invalid``) and at every change.
        """
        async with self._lock:
            try:
                await self._apply_quarantine(desired)
            except Exception as e:
                self._note_start(e)
                raise
            self._note_start(None)

    async def _apply_quarantine(self, desired: Desired) -> None:
        try:
            await self._apply(desired)
            self.quarantined = set()
            self._desired = desired
        except InvalidConfig:
            if not self.running.is_set():
                # the global part itself (socket, state file) is refused: no profile is to blame
                await self._check_config(render_config(self.s, [], []), quiet=True)
            good, bad = await self._bisect(desired)
            if not bad:
                raise
            self.quarantined = bad
            log.error("profiles quarantined, applying the other checks", profiles=sorted(p.backend for p in bad),
                      checks=[c.name for c in desired.checks if c.profile in bad][:20])
            await self._apply(good)
            self._desired = good
            raise InvalidConfig(f"{len(bad)} check profile(s) rejected by HAProxy, retrying later") from None

    def _note_start(self, error: BaseException | None) -> None:
        """Track whether a HAProxy runs our checks; say so (once per change) through on_start_error."""
        if self.running.is_set():
            msg = ""
        elif error is not None:
            msg = _one_line(str(error)) or type(error).__name__
        else:
            return
        if msg != self.start_error:
            self.start_error = msg
            self.on_start_error(msg)

    async def _apply(self, desired: Desired) -> None:
        if not self.running.is_set():
            await self._reload(desired, reason="start")
        elif not desired.profiles <= self.profiles:
            await self._reload(desired, reason="profiles")
        elif self.reload_only:
            if desired.by_name() != self.live:
                await self._reload(desired, reason="change")
        else:
            await self._runtime(desired)

    async def _bisect(self, desired: Desired) -> tuple[Desired, set[Profile]]:
        """Check each profile on its own; return the desired set without the rejected ones."""
        bad: set[Profile] = set()
        for p in sorted(desired.profiles, key=lambda x: x.backend):
            servers = [c for c in desired.checks if c.profile == p]
            try:
                await self._check_config(render_config(self.s, [p], servers), quiet=True)
            except InvalidConfig:
                bad.add(p)
        good = Desired(desired.host_uuid, tuple(c for c in desired.checks if c.profile not in bad),
                       desired.rejected, desired.warnings)
        return good, bad

    def take_restored(self) -> set[str]:
        out, self.restored = self.restored, set()
        return out

    def take_armed(self) -> set[str]:
        out, self.armed = self.armed, set()
        return out

    async def show_stat(self) -> list[StatRow]:
        return await self.sock.show_stat()

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart a dead child (with back-off) and snapshot server state periodically."""
        bo = Backoff(0.5, 10.0, reset_after=30.0)
        next_snap = time.monotonic() + self.s.state_interval
        failing = False  # a restart failed: every further attempt backs off (no 20/s spawn loop)
        while not stop.is_set():
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.crashed.wait())]
            timeout = max(0.05, next_snap - time.monotonic())
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if stop.is_set():
                return
            if self.crashed.is_set():
                delay = bo.next() if self.restarts or failing else 0.05
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)  # a back-off never delays shutdown
                if stop.is_set():
                    return
                async with self._lock:
                    self.crashed.clear()
                    if self._desired is None or self.running.is_set():
                        continue
                    try:
                        await self._reload(self._desired, reason="crash", restore_text=self._state_text)
                        self.restarts += 1
                        _RESTARTS.inc()
                        bo.mark_up()
                        failing = False
                        self._note_start(None)
                    except Exception as e:
                        if not failing:
                            log.error("haproxy restart failed", error=_one_line(str(e)))
                        failing = True
                        self._note_start(e)
                        self.crashed.set()
                continue
            next_snap = time.monotonic() + self.s.state_interval
            if self.running.is_set():
                with contextlib.suppress(TransportError):
                    await self._snapshot_state()

    async def stop(self) -> None:
        """SIGUSR1 (soft stop), then SIGTERM after 5 s."""
        self.running.clear()
        _UP.set(0)
        child, self._child = self._child, None
        if child is None or child.proc.returncode is not None:
            return
        child.expected_exit = True
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(10)  # SIGUSR1
        try:
            await asyncio.wait_for(child.proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                child.proc.terminate()
            await child.proc.wait()
        for t in child.tasks:
            t.cancel()
        with contextlib.suppress(OSError):
            os.unlink(self.s.pid_path)

    # ---- internals
    async def _snapshot_state(self) -> str:
        text = await self.sock.raw("show servers state")
        if text.startswith("1\n"):
            self._state_text = text
        return text

    async def _check_config(self, text: str, quiet: bool = False) -> None:
        path = os.path.join(self.s.state_dir, "haproxy.cfg.new")
        _atomic_write(path, text)
        p = await asyncio.create_subprocess_exec(self.s.binary, "-c", "-f", path, cwd=self.s.state_dir,
                                                 stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.STDOUT)
        out, _ = await p.communicate()
        if p.returncode != 0:
            msg = out.decode(errors="replace").strip()
            if not quiet:
                _INVALID.inc()
                log.error("haproxy rejected the config", rc=p.returncode, message=msg[-2000:])
            raise InvalidConfig(f"haproxy -c failed: {msg[-500:]}")

    async def _reload(self, desired: Desired, *, reason: str, restore_text: str | None = None) -> None:
        servers = desired.by_name()
        profiles = set(desired.profiles)  # profiles nobody uses any more go away here
        old = self._child if self._child and self._child.proc.returncode is None else None
        orphan = await self._find_orphan() if old is None else None
        if restore_text is None:
            restore_text = self._state_text
            if old is not None or orphan is not None:
                try:
                    restore_text = await self._snapshot_state()
                except TransportError as e:
                    log.warning("could not save server state before reload", error=str(e))
        stale = old is None and orphan is None  # restored from a periodic snapshot, not one taken now
        state, restored = filter_state(restore_text or "", servers)
        fresh = [n for n in servers if n not in restored]
        # Fresh servers start enabled, so HAProxy spreads their first checks over `inter`; they are
        # forced DOWN right after start (before any poll may read them) and need `rise` to come UP.
        cfg = render_config(self.s, profiles, servers.values())
        _atomic_write(self.s.state_path, state)  # first: `haproxy -c` warns about a missing state file
        await self._check_config(cfg)
        _atomic_write(self.s.config_path, cfg)
        argv = [self.s.binary, "-db", "-f", self.s.config_path]
        if old is not None:
            argv += ["-sf", str(old.proc.pid)]
            old.expected_exit = True
        elif orphan is not None:
            argv += ["-sf", str(orphan)]  # the HAProxy of a daemon that died: take over its state, stop it
        t0 = time.monotonic()
        was_running = self.running.is_set()
        self.running.clear()  # no poll until the new process is armed and forced
        child = None
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, start_new_session=True, cwd=self.s.state_dir)
            except OSError as e:
                raise ConfigError(f"cannot start {self.s.binary}: {e}") from e
            child = _Child(proc)
            child.tasks = [asyncio.create_task(self._read_stdout(child)),
                           asyncio.create_task(self._read_stderr(child)),
                           asyncio.create_task(self._watch(child))]
            await self._wait_ready(child)
        except BaseException:
            if child is not None and child.proc.returncode is None:
                # not ready (or cancelled while waiting): it runs in its own session and nobody
                # else would ever stop it
                child.expected_exit = True
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
            if old is not None and old.proc.returncode is None:
                old.expected_exit = False  # the old process keeps serving
                if was_running:
                    self.running.set()
            raise
        self._child = child
        _atomic_write(self.s.pid_path, f"{proc.pid}\n")
        self.live = dict(servers)
        self.profiles = profiles
        self.parked.clear()
        self.generation += 1
        self.reloads += 1
        _RELOADS.labels(reason).inc()
        cmds: list[str] = []
        for n in fresh:
            cmds.append(f"set server {servers[n].profile.backend}/{n} health down")
        self.armed.update(fresh)
        if orphan is not None:
            self.restored.update(restored)
        if stale:
            # A stale snapshot must not cause a report: force each check to the state last reported.
            for n, st in self.forced_health().items():
                srv = servers.get(n)
                if srv is not None and n in restored:
                    cmds.append(f"set server {srv.profile.backend}/{n} health {'up' if st == 'UP' else 'down'}")
        answers = await self._cmds(cmds)
        bad = [(cmd, a) for cmd, a in zip(cmds, answers, strict=False) if a.strip()]
        if bad:
            log.warning("arming answered unexpectedly", first=bad[0][0], answer=bad[0][1], count=len(bad))
        self.running.set()  # only now: a poll must not see states the forcing above corrects
        _UP.set(1)
        log.info("haproxy started", reason=reason, pid=proc.pid, servers=len(servers), profiles=len(profiles),
                 restored=len(restored), fresh=len(fresh), took=round(time.monotonic() - t0, 3))

    async def _find_orphan(self) -> int | None:
        """A live HAProxy left by a previous daemon (its pid file, and its socket answers with that pid)."""
        pid = _read_pid(self.s.pid_path)
        if pid is None:
            return None
        try:
            os.kill(pid, 0)
            info = await self.sock.info()
        except (OSError, TransportError):
            return None
        if info.get("Pid") != str(pid):
            return None
        log.info("found the HAProxy of a previous run, taking over its state", pid=pid)
        asyncio.get_running_loop().call_later(6.0, _kill_if_alive, pid, self.s.config_path)
        return pid

    async def _wait_ready(self, child: _Child, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if child.proc.returncode is not None:
                with contextlib.suppress(TimeoutError):  # its last words: the stderr pipe closes at exit
                    await asyncio.wait_for(asyncio.shield(child.tasks[1]), 1.0)
                raise TransportError(f"haproxy exited at start (rc={child.proc.returncode}): "
                                     + " | ".join(child.stderr))
            with contextlib.suppress(TransportError):
                info = await self.sock.info()
                if info.get("Pid") == str(child.proc.pid):
                    return
            if time.monotonic() > deadline:
                child.expected_exit = True
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                raise TransportError("haproxy did not answer on its socket in time")
            await asyncio.sleep(0.02)

    async def _cmds(self, cmds: Sequence[str]) -> list[str]:
        if not cmds:
            return []
        answers = await self.sock.run(cmds)
        self.runtime_commands += len(cmds)
        _RUNTIME_CMDS.labels("sent").inc(len(cmds))
        return answers

    async def _runtime(self, desired: Desired) -> None:
        want = desired.by_name()
        remove = [c for n, c in self.live.items() if want.get(n) != c]
        add = [c for n, c in want.items() if self.live.get(n) != c]
        if not remove and not add:
            return
        errors: list[str] = []
        if remove:
            cmds: list[str] = []
            for c in remove:
                b = f"{c.profile.backend}/{c.name}"
                cmds += [f"disable server {b}", f"del server {b}"]
            answers = await self._cmds(cmds)
            for i, c in enumerate(remove):
                ans = answers[2 * i + 1].strip()
                self.live.pop(c.name, None)
                if ans != "Server deleted.":
                    self.parked.add((c.profile.backend, c.name))
                    _RUNTIME_CMDS.labels("error").inc()
                    log.warning("del server refused, parked in maintenance", server=c.name, answer=ans)
        if add:
            cmds = []
            for c in add:
                cmds += _arm_cmds(c, new=True, fastinter=self.s.fastinter)
            answers = await self._cmds(cmds)
            for i, c in enumerate(add):
                ans = answers[4 * i].strip()
                rest = [a.strip() for a in answers[4 * i + 1: 4 * i + 4]]
                if ans == "New server registered." and not any(rest):
                    self.live[c.name] = c
                    self.armed.add(c.name)
                else:
                    _RUNTIME_CMDS.labels("error").inc()
                    errors.append(f"{c.name}: {ans or rest}")
                    if ans == "New server registered.":
                        # It exists but is not armed: a placeholder makes the retry remove and re-add it.
                        self.live[c.name] = Check(c.name, c.container_uuid, c.ip, 0, c.profile)
        log.info("checks changed at run time", added=len(add), removed=len(remove), errors=len(errors))
        if errors and self.parked:
            # A server we could not delete is in the way: a reload sweeps every leftover.
            log.warning("runtime add failed with leftovers parked, reloading to sweep them", parked=len(self.parked))
            await self._reload(desired, reason="sweep")
            return
        if errors:
            raise TransportError(f"{len(errors)} runtime command(s) failed, first: {errors[0]}")

    async def _read_stdout(self, child: _Child) -> None:
        assert child.proc.stdout is not None
        while True:
            line = await child.proc.stdout.readline()
            if not line:
                return
            if line.startswith(b"Server ") and b" is " in line:
                self.on_hint()

    async def _read_stderr(self, child: _Child) -> None:
        assert child.proc.stderr is not None
        while True:
            line = await child.proc.stderr.readline()
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            if text.startswith("[ALERT]") or (text.startswith("[WARNING]") and "Server " not in text):
                child.stderr.append(text)

    async def _watch(self, child: _Child) -> None:
        rc = await child.proc.wait()
        if child.expected_exit:
            return
        if self._child is not child:
            return
        self.running.clear()
        _UP.set(0)
        log.error("haproxy died", rc=rc, pid=child.proc.pid, stderr=list(child.stderr)[-5:])
        self.crashed.set()


_ALERT_HEAD = re.compile(r"\[(?:ALERT|WARNING)\]\s*\(\d+\)\s*:\s*(?:config\s*:\s*)?")


def _one_line(text: str) -> str:
    """HAProxy's multi-line answer in one stable line: its alerts, without pids and summaries."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    alerts = [ln for ln in lines if "[ALERT]" in ln and "Fatal errors found" not in ln
              and "Error(s) found in configuration" not in ln]
    return _ALERT_HEAD.sub("", " | ".join(alerts or lines))


def _read_pid(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def _kill_if_alive(pid: int, config_path: str) -> None:
    """The previous run's HAProxy got -sf; if it still lives (it is not our child), terminate it.

    Only if that pid is still an haproxy running our config (never a recycled pid)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if any(b"haproxy" in a for a in cmd[:1]) and config_path.encode() in cmd:
        with contextlib.suppress(OSError):
            os.kill(pid, 15)


def _arm_cmds(c: Check, new: bool = False, fastinter: int = 0) -> list[str]:
    b = f"{c.profile.backend}/{c.name}"
    cmds = [f"add server {b} {server_args(c, fastinter)}"] if new else []
    return [*cmds, f"enable health {b}", f"enable server {b}", f"set server {b} health down"]
