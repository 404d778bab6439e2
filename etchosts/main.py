"""``corral etc-host-updater``: one line per Rancher host in this container's hosts file.

The shared metadata watch (:class:`agents.metadata_watch.MetadataWatch`) long-polls metadata's
``/version`` (``--update-interval`` is the longest wait) and hands over each new tree; its hosts
are rendered (:mod:`etchosts.render`) and a reconcile loop rewrites the file in place under
``flock`` when its content differs - also when someone else changed it (drift, checked every
``--update-interval``). The file is usually a bind mount, so there is no rename: one ``write`` of
the whole content from offset 0, then ``truncate`` and ``fsync``; a reader never sees a file
without the header. With ``--metadata-state-file`` the last good tree is persisted and served at
start while metadata is down; ``/ready`` fails once it is older than ``--metadata-stale-after``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agents.cli import run_daemon
from agents.config import add_common_args, env_str, make_parser
from agents.errors import ConfigError, CorralError, TransportError
from agents.log import get_logger
from agents.metadata_client import MetadataClient
from agents.metadata_watch import MetadataSnapshot, MetadataWatch, add_watch_args
from agents.metrics import AdminServer, Health, counter, gauge
from agents.reconcile import Reconciler
from etchosts.render import Entry, entries, header, render_full, render_managed

__all__ = ["Updater", "main", "write_in_place"]

log = get_logger(__name__)
_WRITES = counter("etc_host_updater", "writes", "Hosts file rewrites, by reason", ["reason"])
_SKIPPED = gauge("etc_host_updater", "skipped_entries", "Hosts left out of the file (invalid or duplicate)")
_SKIPS = counter("etc_host_updater", "skipped_entries_seen", "Invalid or duplicate hosts met, counted per update")
_META_ERR = counter("etc_host_updater", "metadata_errors", "Failed metadata requests and unusable /hosts")
_ENTRIES = gauge("etc_host_updater", "entries", "Host lines in the file")
_FILE_ERR = counter("etc_host_updater", "file_errors", "Failed reads or writes of the hosts file")

API_VERSION = "2015-12-19"
VERSION = "corral etc-host-updater 1.0"


def write_in_place(path: str, want: Any, mode: int = 0o644) -> bool:
    """Rewrite ``path`` in place under an exclusive flock if its content differs from
    ``want(current) -> str``; return whether it wrote. One write of the whole content from
    offset 0, then truncate and fsync (no rename: the file may be a bind mount)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), "r+b", buffering=0) as f:
            current = f.read().decode("utf-8", "surrogateescape")
            new = want(current)
            if new == current:
                return False
            data = new.encode("utf-8", "surrogateescape")
            f.seek(0)
            f.write(data)
            f.truncate(len(data))
            os.fsync(fd)
        if os.stat(path).st_mode & 0o777 != mode:
            with contextlib.suppress(OSError):
                os.fchmod(fd, mode)
        return True
    finally:
        os.close(fd)  # also drops the lock


def _empty(path: str) -> bool:
    try:
        return os.stat(path).st_size == 0
    except OSError:
        return True


def _split_url(url: str) -> tuple[str, str]:
    """``http://h/2015-12-19`` -> (``http://h``, ``2015-12-19``); a bare base keeps the original's version."""
    u = url.rstrip("/")
    if "://" not in u:
        u = "http://" + u
    head, _, last = u.rpartition("/")
    if (last and last[0].isdigit() and "-" in last) or last == "latest":
        return head, last
    return u, API_VERSION


@dataclass(frozen=True)
class Desired:
    """What the file should hold: the hosts of one metadata version."""

    version: str
    entries: tuple[Entry, ...]


class Updater:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        base, version = _split_url(args.metadata_url)
        self.meta = MetadataClient(base, api_version=version, timeout=10.0)  # --legacy-overwrite's start only
        self.health = Health()
        self.health.require("hosts-file")
        self.watch = MetadataWatch(base, api_version=version, component="etc_host_updater",
                                   state_file=args.metadata_state_file or None,
                                   stale_after=args.metadata_stale_after, max_wait=float(args.update_interval),
                                   health=self.health)
        interval = float(args.update_interval)
        self.loop: Reconciler[Desired] = Reconciler(
            "hosts", self._apply, daemon="etc_host_updater", health=self.health,
            refresh_interval=interval, retry_min=0.5, retry_max=max(1.0, interval))
        self.version = ""  # the metadata version last written
        self.entries: list[Entry] | None = None  # last good hosts (None: never had any)
        self.head: str | None = None
        self.last_error = ""
        self._warned: set[tuple[int, str, str]] = set()

    # -- metadata -------------------------------------------------------------------------
    async def _own_header(self) -> str | None:
        if self.head is not None:
            return self.head
        name = self.args.hostname or socket.gethostname()
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            log.error("own hostname does not resolve, update skipped", hostname=name, error=str(e))
            return None
        if not infos:
            log.error("own hostname resolves to no address, update skipped", hostname=name)
            return None
        self.head = header(name, str(infos[0][4][0]))
        return self.head

    def desired(self, snap: MetadataSnapshot) -> Desired | None:
        """A snapshot -> the entries to write; None (file left as it is) when its hosts are unusable."""
        hosts = snap.tree.get("hosts")
        if not isinstance(hosts, (list, tuple)):
            _META_ERR.inc()
            self._error(f"/hosts is not a list ({type(hosts).__name__}), file left as it is")
            return None
        ents, skipped = entries(hosts, legacy=self.args.legacy_overwrite, aliases=self.args.aliases)
        keys = {(s.index, s.hostname, s.reason) for s in skipped}
        for s in skipped:
            if (s.index, s.hostname, s.reason) not in self._warned:
                log.warning("host skipped", index=s.index, hostname=s.hostname, agent_ip=s.ip, reason=s.reason)
        self._warned = keys
        _SKIPPED.set(len(skipped))
        _SKIPS.inc(len(skipped))
        if self.last_error:
            log.info("metadata hosts usable again", version=snap.version)
        self.last_error = ""
        return Desired(snap.version, tuple(ents))

    def on_snapshot(self, snap: MetadataSnapshot) -> None:
        d = self.desired(snap)
        if d is not None:
            self.loop.submit(d)

    def _error(self, msg: str) -> None:
        if msg != self.last_error:
            log.warning("metadata problem, hosts file left as it is", error=msg)
        self.last_error = msg

    # -- the file -------------------------------------------------------------------------
    def _want(self, current: str) -> str:
        assert self.entries is not None
        if self.args.preserve:
            return render_managed(current, self.entries, self.head)
        assert self.head is not None
        return render_full(self.head, self.entries)

    async def _apply(self, d: Desired) -> None:
        """The reconcile loop's apply: a new version, or the periodic drift check of the same one."""
        self.entries = list(d.entries)
        await self.sync_file("metadata" if d.version != self.version else "drift")
        self.version = d.version

    async def sync_file(self, reason: str) -> None:
        """Make the file hold ``self.entries``; raise (the loop retries with back-off) when it cannot."""
        if self.entries is None:
            return
        if (not self.args.preserve or _empty(self.args.hosts_file)) and await self._own_header() is None:
            raise CorralError("own hostname does not resolve, update skipped")
        try:
            wrote = write_in_place(self.args.hosts_file, self._want)
        except OSError as e:
            _FILE_ERR.inc()
            log.error("hosts file could not be written", path=self.args.hosts_file, error=str(e))
            self.health.set("hosts-file", False, str(e))
            raise
        _ENTRIES.set(len(self.entries))
        self.health.set("hosts-file", True, f"{len(self.entries)} hosts, metadata version {self.version or '?'}")
        if wrote:
            _WRITES.labels(reason).inc()
            log.info("hosts file written", path=self.args.hosts_file, hosts=len(self.entries), reason=reason)

    # -- loop -----------------------------------------------------------------------------
    async def wait_metadata_legacy(self, stop: asyncio.Event) -> None:
        """The original's start-up: /version with back-off 1, 2, 4, 8, 16 s, then give up."""
        err: Exception | None = None
        for step in (1, 2, 4, 8, 16, None):
            delay = None if step is None else step * self.args.startup_backoff_scale
            try:
                await self.meta.version()
                return
            except TransportError as e:
                err = e
                _META_ERR.inc()
                log.warning("metadata not answering yet", error=str(e), retry_in=delay)
            if delay is None or stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        raise TransportError(f"metadata never answered: {err}")

    async def run(self, stop: asyncio.Event) -> None:
        if self.args.legacy_overwrite:
            await self.wait_metadata_legacy(stop)
        self.watch.subscribe(self.on_snapshot)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.watch.run(stop))
            tg.create_task(self.loop.run(stop))

    async def _healthz(self, request: web.Request) -> web.Response:
        rep = self.health.report()["conditions"]["hosts-file"]
        problem = self.last_error or ("" if self.watch.reachable else self.watch.last_error)
        stale = f" (metadata: {problem})" if problem else ""
        if rep["ok"]:
            return web.Response(text=f"ok: {rep['detail']}{stale}\n")
        return web.Response(status=503, text=f"not written yet: {rep['detail']}{stale}\n")

    async def serve(self, stop: asyncio.Event) -> None:
        admin: AdminServer | None = None
        if self.args.metrics_listen:
            admin = AdminServer(self.args.metrics_listen, self.health, extra={"/healthz": self._healthz})
            await admin.start()
        log.info("starting", metadata=self.watch.url, hosts_file=self.args.hosts_file,
                 mode="legacy-overwrite" if self.args.legacy_overwrite else "preserve" if self.args.preserve
                 else "full", state_file=self.args.metadata_state_file or None)
        try:
            await self.run(stop)
        finally:
            await self.meta.close()
            if admin is not None:
                await admin.stop()


def _parser() -> argparse.ArgumentParser:
    p = make_parser("corral etc-host-updater", (__doc__ or "").splitlines()[0], version=VERSION)
    p.add_argument("--update-interval", type=int, default=5,
                   help="seconds: the longest wait on metadata's /version (default 5)")
    p.add_argument("--metadata-url", default=env_str("CORRAL_METADATA_URL", f"http://rancher-metadata/{API_VERSION}"),
                   help="metadata base URL, with or without the API version (env CORRAL_METADATA_URL)")
    p.add_argument("--hosts-file", default="/etc/hosts",
                   help="the file rewritten in place under flock (usually a bind mount of the host's /etc/hosts)")
    p.add_argument("--preserve", action="store_true",
                   help="only rewrite the lines between the corral markers; keep every other line byte for byte")
    p.add_argument("--legacy-overwrite", action="store_true",
                   help="the original exactly: malformed lines for empty hostnames/addresses, and exit when "
                        "metadata does not answer at start")
    p.add_argument("--aliases", action="store_true", help="add the short name and the display name to each line")
    p.add_argument("--hostname", default="", help="own hostname for the header (default: this machine's)")
    p.add_argument("--startup-backoff-scale", type=float, default=1.0, help=argparse.SUPPRESS)  # tests
    add_watch_args(p, state_file="", stale_after=60.0)
    add_common_args(p, metrics_listen="127.0.0.1:9116")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)

    async def serve(stop: asyncio.Event) -> None:
        if args.update_interval < 1:
            raise ConfigError("--update-interval must be at least 1 second")
        if args.preserve and args.legacy_overwrite:
            raise ConfigError("--preserve and --legacy-overwrite exclude each other")
        t0 = time.monotonic()
        await Updater(args).serve(stop)
        log.debug("ran", seconds=round(time.monotonic() - t0, 1))

    return run_daemon("etc-host-updater", serve, debug=args.debug, log_file=args.log, log_json=args.log_json,
                      pid_file=args.pid_file)
