"""Docker events -> CNI ADD/DEL, resolv.conf, and the state files the Rancher agent reads.

``DockerSource`` wraps the docker SDK (blocking: every call runs in a worker thread; the event
stream is read by one thread and handed to the loop). On every (re)connect every container is
replayed as a synthetic ``start`` (the original never reconnected after a dockerd restart).

``CniHandler`` evaluates one container at a time per ID (events for one container are
serialised, different containers run concurrently; each event is a task of its own, so a slow
one never holds the next back; at most 100 plugin chains run at once): ADD with a netns handle
bind-mounted under
``--netns-handle-dir`` so that the DEL after ``die`` still reaches the namespace and the plugin
can remove the interface inside; bounded retries with jitter; results (or ``{"error": ...}``)
in ``<cni state dir>/<id>/<startedAt>``, removed on DEL; the container's IP appended to its
hosts file. Decisions are pure (``cnievents.py``); plugins run through ``cni_runner.py``.

The ADD after a ``start`` does not wait for the engine when it need not. A container whose
``create`` event's labels (Docker and podman send every label in ``Actor.Attributes``) ask for
Rancher networking is inspected then, before it starts: its network mode, labels, hostname and
DNS search do not change when it starts. On its ``start`` the process (hence the netns) is found
in the cgroup file system by ID (``cgroups.py``), the plugins run, and only then does the engine's
answer matter: ``State.StartedAt`` names the state file the Rancher agent reads, and the hosts
and resolv.conf paths are set at start. That inspect is sent as the ADD begins and the files are
written when it answers ("CNI ADD reported"); until then the container counts as networked for
an unknown start (``""``), and an answer showing another process (stopped or started again
meanwhile) leaves it to the events that follow. Anything missing - no create-time facts
(netmanager started after the create), no cgroup found, a namespace that is the host's or another
networked container's - and the ADD inspects first, as the original did.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import json
import os
import random
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from agents.backoff import Backoff
from agents.children import run
from agents.errors import CorralError, TransportError
from agents.log import get_logger
from agents.metrics import counter, histogram
from netmanager.cgroups import CgroupLocator
from netmanager.cni_runner import load_configs, result_ipv4, run_add, run_del
from netmanager.cnievents import CNI_PATH, Container, cni_env, decide, hosts_line, network_for
from netmanager.files import write_atomic
from netmanager.resolv import render_resolv, wants_resolv

__all__ = ["CniHandler", "DockerSource"]

T = TypeVar("T")

log = get_logger(__name__)
_CALLS = counter("netmanager", "cni_calls", "CNI ADD/DEL by outcome", ["command", "outcome"])
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5, 10, 30)
_LAT = histogram("netmanager", "cni_seconds", "Docker event to CNI command done", ["command"], buckets=_BUCKETS)
_REPORTED = histogram("netmanager", "cni_reported_seconds",
                      "Docker start event to the CNI state file (and hosts line, resolv.conf) written",
                      buckets=_BUCKETS)
_FOUND = counter("netmanager", "cni_add_lookups", "How ADDs found the container's process", ["how"])
_NET_LABELS = ("io.rancher.cni.network", "io.rancher.container.ip")


class DockerSource:
    """The Docker API through the docker SDK, off the event loop."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._client: Any = None
        self._stream: Any = None
        self.connected = False
        # its own threads: a burst of starts keeps many API calls waiting on the runtime at once,
        # and the loop's default executor (cores + 4 threads) would queue them behind each other
        self._pool = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="docker-api")

    def _api(self) -> Any:
        if self._client is None:
            import docker  # imported lazily: only daemons with a Docker socket pay for it

            self._client = docker.APIClient(base_url=self.base_url, version="auto", timeout=30, max_pool_size=32)
        return self._client

    async def _call(self, fn: Callable[[], Any]) -> Any:
        import docker.errors
        import requests.exceptions

        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except docker.errors.NotFound:
            raise
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as e:
            raise TransportError(f"docker {self.base_url}: {e}") from e

    async def inspect(self, cid: str) -> dict[str, Any] | None:
        import docker.errors

        try:
            return await self._call(lambda: self._api().inspect_container(cid))  # type: ignore[no-any-return]
        except docker.errors.NotFound:
            return None

    async def running(self) -> list[dict[str, Any]]:
        """``docker ps`` rows of the running containers (Id, Labels, Created, HostConfig...)."""
        return await self._call(lambda: self._api().containers())  # type: ignore[no-any-return]

    async def all_containers(self) -> list[dict[str, Any]]:
        """``docker ps -a`` rows (running or not)."""
        return await self._call(lambda: self._api().containers(all=True))  # type: ignore[no-any-return]

    async def stop(self, cid: str) -> None:
        await self._call(lambda: self._api().stop(cid, timeout=0))

    async def remove(self, cid: str) -> None:
        await self._call(lambda: self._api().remove_container(cid, force=True))

    async def running_ids(self) -> list[str]:
        """IDs of running containers that have a namespace of their own (not host, not container:)."""
        rows = await self._call(lambda: self._api().containers())
        out = []
        for r in rows:
            mode = str((r.get("HostConfig") or {}).get("NetworkMode") or "")
            if mode != "host" and not mode.startswith("container:"):
                out.append(str(r["Id"]))
        return out

    async def container_ids(self) -> list[str]:
        rows = await self._call(lambda: self._api().containers(all=True, quiet=True))
        return [str(r["Id"]) for r in rows]

    async def run(self, stop: asyncio.Event, on_event: Callable[[str, str, dict[str, str]], None],
                  on_connect: Callable[[list[str]], Awaitable[None]]) -> None:
        """Stream container start/die events forever (reconnect with back-off, replay on connect)."""
        loop = asyncio.get_running_loop()
        bo = Backoff(0.5, 30.0)
        while not stop.is_set():
            ended = asyncio.Event()
            try:
                stream = await self._call(lambda: self._api().events(decode=True, filters={"type": "container"}))
                self._stream = stream
                self.connected = True
                await on_connect(await self.container_ids())
                bo.reset()

                threading.Thread(target=self._pump, args=(loop, stream, on_event, ended), name="docker-events",
                                 daemon=True).start()
                waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(ended.wait())]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
            except CorralError as e:
                log.warning("docker API unavailable, retrying", error=str(e))
            finally:
                self.connected = False
                if self._stream is not None:
                    with contextlib.suppress(Exception):
                        self._stream.close()
                    self._stream = None
            if not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), bo.next())

    @staticmethod
    def _pump(loop: asyncio.AbstractEventLoop, stream: Any, on_event: Callable[[str, str, dict[str, str]], None],
              ended: asyncio.Event) -> None:
        """The one thread reading the blocking event stream; events are handed to the loop."""
        try:
            for ev in stream:
                action = str(ev.get("Action") or ev.get("status") or "")
                actor = ev.get("Actor") or {}
                cid = str(ev.get("id") or actor.get("ID") or "")
                attrs = {str(k): str(v) for k, v in (actor.get("Attributes") or {}).items()}
                if cid and action:
                    loop.call_soon_threadsafe(on_event, cid, action, attrs)
        except Exception as e:  # the stream ended: the loop reconnects and replays
            msg = str(e)
            loop.call_soon_threadsafe(lambda: log.warning("docker event stream ended", error=msg))
        finally:
            loop.call_soon_threadsafe(ended.set)

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None


_MS_BIND = 4096


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _own_namespaces() -> set[tuple[int, int]]:
    """(st_dev, st_ino) of the host's network namespace (PID 1's) and this daemon's."""
    out = set()
    for path in ("/proc/1/ns/net", "/proc/self/ns/net"):
        with contextlib.suppress(OSError):
            st = os.stat(path)
            out.add((st.st_dev, st.st_ino))
    return out


def _is_mount(p: Path) -> bool:
    """A bind-mounted namespace file counts (pathlib's is_mount only sees directories before 3.12)."""
    return os.path.ismount(p)


async def _sh(*argv: str) -> tuple[int, str]:
    try:
        p = await run(argv, timeout=30)
    except (OSError, TimeoutError) as e:
        return 127, str(e)
    return p.returncode, (p.stdout + p.stderr).decode(errors="replace")


class CniHandler:
    """Turns container events into CNI ADD/DEL, one container at a time per ID."""

    def __init__(self, docker: DockerSource, *, cni_dir: Path, state_dir: Path, handle_dir: Path,
                 cni_path: str = CNI_PATH, retries: int = 15, retry_delay: float = 2.0,
                 metadata_ip: str = "169.254.169.250", dns_setup: bool = True, timeout: float = 60.0,
                 cgroups: CgroupLocator | None = None) -> None:
        self.docker = docker
        self.cni_dir = cni_dir
        self.state_dir = state_dir
        self.handle_dir = handle_dir
        self.cni_path = cni_path
        self.retries = retries
        self.retry_delay = retry_delay
        self.metadata_ip = metadata_ip
        self.dns_setup = dns_setup
        self.timeout = timeout
        self.cgroups = cgroups if cgroups is not None else CgroupLocator()
        self.networked: dict[str, tuple[str, str]] = {}  # id -> (startedAt, network); "": not known yet
        self._created: dict[str, asyncio.Task[Container | None]] = {}  # id -> its inspect after ``create``
        self._unreported: dict[str, tuple[int, dict[str, Any]]] = {}  # id -> (PID, CNI result) until startedAt known
        self._netns: dict[str, tuple[int, int]] = {}  # id -> (st_dev, st_ino) of the namespace its handle holds
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sem = asyncio.Semaphore(100)  # plugin chains at once (the original's 100 workers)
        # resolv.conf, state and hosts files (fsync'd): threads of their own, so that a burst of ADDs
        # does not queue behind the loop's default executor (cores + 4 threads) or wait on other work there
        self._files = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="cni-files")
        # the cgroup look-ups and handle mounts of the ADDs that need no inspect: not queued behind fsyncs
        self._claims = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="cni-claims")

    # ------------------------------------------------------------ events
    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def on_event(self, cid: str, action: str, attrs: dict[str, str] | None = None) -> None:
        action = "die" if action in ("die", "died") else action
        if action == "create":
            if attrs and (any(k in attrs for k in _NET_LABELS) or attrs.get("io.rancher.container.network") == "true"):
                self._created[cid] = self._spawn(self._facts(cid))
            return
        if action == "destroy":
            self._created.pop(cid, None)
            return
        if action not in ("start", "die"):
            return
        self._spawn(self._handle(cid, action, asyncio.get_running_loop().time()))

    async def _facts(self, cid: str) -> Container | None:
        """A created container's inspect: what its start does not change (network mode, labels, hostname)."""
        try:
            info = await self.docker.inspect(cid)
        except CorralError:
            return None
        return Container.from_inspect(info) if info is not None else None

    async def on_connect(self, ids: list[str]) -> None:
        """Replay: a running container with more than ``lo`` in its namespace counts as networked."""
        for cid in ids:
            if cid in self.networked:
                continue
            info = await self.docker.inspect(cid)
            if info is None:
                continue
            c = Container.from_inspect(info)
            net = network_for(c)
            if c.running and net and c.pid and await self._links(c.pid) > 1:
                self.networked[cid] = (c.started_at, net)
                with contextlib.suppress(CorralError):  # a handle kept by a previous run died with its mounts
                    await self._handle_path(cid, c.pid)
        for cid in set(self._created) - set(ids):
            self._created.pop(cid, None)
        t0 = asyncio.get_running_loop().time()
        await asyncio.gather(*(self._handle(cid, "start", t0) for cid in ids),
                             *(self._handle(cid, "die", t0) for cid in set(self.networked) - set(ids)))
        log.info("docker events connected, containers replayed", containers=len(ids),
                 networked=len(self.networked))

    async def _links(self, pid: int) -> int:
        rc, out = await _sh("nsenter", "-t", str(pid), "-n", "ip", "-o", "link")
        return len(out.splitlines()) if rc == 0 else 0

    async def _handle(self, cid: str, action: str, t0: float) -> None:
        lock = self._locks.setdefault(cid, asyncio.Lock())
        async with lock:  # no global slot held here: waiting on the engine must not hold other containers back
            try:
                await self.evaluate(cid, action, t0)
            except Exception as e:
                log.exception("container event failed", container=cid[:12], action=action, error=str(e))
        if not lock.locked() and cid not in self.networked:
            self._locks.pop(cid, None)

    async def evaluate(self, cid: str, action: str, t0: float) -> None:
        loop = asyncio.get_running_loop()
        first = 0
        if action == "start" and cid not in self.networked and cid in self._created:
            outcome = await self._fast_add(cid, t0)
            if outcome == "done":
                return
            if outcome == "failed":
                first = 1
                await asyncio.sleep(self.retry_delay * (0.5 + random.random()))
        for attempt in range(first, self.retries + 1):
            t_inspect = loop.time()
            info = await self.docker.inspect(cid)
            marks = (t_inspect, loop.time())
            c = Container.from_inspect(info) if info is not None else None
            resolv = None
            if c is not None and action == "start" and self.dns_setup:
                # written while the netns handle and the plugin run (it needs neither); awaited before
                # the ADD counts as done, so resolv.conf is in place when the state file appears
                resolv = loop.run_in_executor(self._files, self._write_resolv, c)
            try:
                if await self._attempt(cid, action, t0, c, marks, resolv, attempt):
                    return
            finally:
                if resolv is not None:
                    await resolv

    async def _attempt(self, cid: str, action: str, t0: float, c: Container | None, marks: tuple[float, float],
                       resolv: asyncio.Future[None] | None, attempt: int) -> bool:
        """One try of ``evaluate``: False when the ADD failed and is to be retried."""
        prev = self.networked.get(cid)
        if prev is not None and prev[0] == "" and c is not None and await self._report(cid, c, t0, marks, resolv):
            return True  # networked before its start was known: the same start, now written down
        net = network_for(c) if c is not None else None
        if prev is None and net is None:
            await self._release(cid)  # a handle taken by a failed try before the container went
            return True
        what = decide(prev[0] if prev else None, c)
        if what is None:
            return True
        if what == "del" or (prev is not None and what == "add"):
            assert prev is not None
            await self._del(cid, prev[1], t0, c)
            if what == "del":
                return True
            net = network_for(c) if c is not None else None
            if net is None:
                return True
        assert c is not None and net is not None
        try:
            await self._add(c, net, t0, marks, resolv)
            return True
        except CorralError as e:
            if attempt == self.retries:
                self._failed(cid, c.started_at, net, e)
                await self._release(cid)
                return True
            self._retry(cid, net, e, attempt)
            await asyncio.sleep(self.retry_delay * (0.5 + random.random()))
            return False

    def _failed(self, cid: str, started_at: str, net: str, e: Exception) -> None:
        _CALLS.labels("ADD", "failed").inc()
        log.error("CNI ADD failed for good", container=cid[:12], network=net, error=str(e))
        self._record(cid, started_at, {"error": str(e)})

    def _retry(self, cid: str, net: str, e: Exception, attempt: int) -> None:
        _CALLS.labels("ADD", "retry").inc()
        log.warning("CNI ADD failed, retrying", container=cid[:12], network=net, error=str(e), attempt=attempt + 1)

    # ------------------------------------------------------------ ADD without the engine
    async def _fast_add(self, cid: str, t0: float) -> str:
        """ADD from the create-time facts and the cgroup file system: "done", "failed" (the plugins
        failed: retried the usual way) or "fallback" (something missing: nothing done, inspect)."""
        loop = asyncio.get_running_loop()
        t_facts = loop.time()
        try:
            c0 = await self._created[cid]  # done long before, unless the start came right after the create
        except Exception as e:  # whatever went wrong there, the inspect path still works
            log.warning("create-time inspect failed", container=cid[:12], error=str(e))
            return "fallback"
        net = network_for(c0) if c0 is not None else None
        if c0 is None or net is None:
            return "fallback"
        t_look = loop.time()
        # reads of /sys/fs/cgroup and /proc, and mount(2), in a thread: the kernel's cgroup and mount
        # locks are busy while the engine starts other containers, and the loop must not wait on them
        claimed = await loop.run_in_executor(self._claims, self._claim, cid, set(self._netns.values()))
        if claimed is None:
            return "fallback"
        pid, netns, ns = claimed
        self._netns[cid] = ns
        _FOUND.labels("cgroup").inc()
        # the start's identity (the state file's name) and the hosts/resolv.conf paths: asked now, needed later
        asked = loop.time()
        answer = self._spawn(self.docker.inspect(cid))
        t_plugin = loop.time()
        try:
            configs = load_configs(self.cni_dir / f"{net}.d")
            async with self._sem:
                res = await run_add(configs, cni_env("ADD", cid, netns, c0.labels, cni_path=self.cni_path),
                                    timeout=self.timeout)
        except CorralError as e:
            self._retry(cid, net, e, 0)
            return "failed"
        now = loop.time()
        self.networked[cid] = ("", net)
        self._unreported[cid] = (pid, res)
        _CALLS.labels("ADD", "ok").inc()
        _LAT.labels("ADD").observe(now - t0)
        log.info("CNI ADD done", container=cid[:12], network=net, ip=result_ipv4(res), found="cgroup",
                 since_event_ms=_ms(now - t0), wait_ms=_ms(t_look - t0), facts_ms=_ms(t_look - t_facts), inspect_ms=0.0,
                 lookup_ms=_ms(asked - t_look), before_plugin_ms=_ms(t_plugin - t0), plugin_ms=_ms(now - t_plugin),
                 files_ms=0.0)
        try:
            info = await answer
        except CorralError as e:
            log.warning("CNI ADD not reported yet: no answer from the engine", container=cid[:12], error=str(e))
            return "done"  # reported when the container is evaluated next (reconnect, replay)
        c = Container.from_inspect(info) if info is not None else None
        if c is not None:
            resolv = (loop.run_in_executor(self._files, self._write_resolv, c)
                      if self.dns_setup and c.running and c.pid == pid else None)
            await self._report(cid, c, t0, (asked, loop.time()), resolv)
        return "done"

    async def _report(self, cid: str, c: Container, t0: float, marks: tuple[float, float],
                      resolv: asyncio.Future[None] | None) -> bool:
        """State file, hosts line (resolv.conf: ``resolv``) of an ADD done before its start was known,
        when ``c`` is still the process it was done for; False otherwise (its own events follow)."""
        pending = self._unreported.get(cid)
        if pending is None or not c.running or c.pid != pending[0] or cid not in self.networked:
            return False
        _, res = pending
        net = self.networked[cid][1]
        self.networked[cid] = (c.started_at, net)
        del self._unreported[cid]
        loop = asyncio.get_running_loop()
        ip = result_ipv4(res)
        t_files = loop.time()

        def files() -> None:
            self._record(cid, c.started_at, res)
            if ip and c.hosts_path:
                self._hosts(c.hosts_path, ip, c.hostname)

        if resolv is not None:
            await resolv
        await loop.run_in_executor(self._files, files)
        now = loop.time()
        _REPORTED.observe(now - t0)
        log.info("CNI ADD reported", container=cid[:12], network=net, since_event_ms=_ms(now - t0),
                 inspect_ms=_ms(marks[1] - marks[0]), files_ms=_ms(now - t_files))
        return True

    def _claim(self, cid: str, taken: set[tuple[int, int]]) -> tuple[int, str, tuple[int, int]] | None:
        """In a thread: the container's init from the cgroup file system and a handle on its namespace
        -> (PID, handle, namespace's (st_dev, st_ino)); None when not found or the namespace is the
        host's, this daemon's or one in ``taken`` (no handle then)."""
        found = self.cgroups.find(cid)
        if found is None:
            return None
        pid, fd = found
        try:
            st = os.fstat(fd)
            ns = (st.st_dev, st.st_ino)
            if ns in _own_namespaces() or ns in taken:
                return None  # network mode host or container:<networked one>: let the engine say
            return pid, self._mount_handle(cid, f"/proc/self/fd/{fd}"), ns
        except TransportError as e:
            log.warning("netns handle from the cgroup's process not taken", container=cid[:12], error=str(e))
            return None
        finally:
            os.close(fd)

    # ------------------------------------------------------------ ADD / DEL
    def _mount_handle(self, cid: str, source: str) -> str:
        self.handle_dir.mkdir(parents=True, exist_ok=True)
        h = self.handle_dir / cid
        if not h.exists():
            h.touch()
        if not _is_mount(h):  # mount(2) directly: two fewer processes per ADD than mountpoint + mount
            if _libc().mount(source.encode(), str(h).encode(), None, _MS_BIND, None) != 0:
                err = ctypes.get_errno()
                raise TransportError(f"netns handle for {cid[:12]}: bind mount: {os.strerror(err)}")
        return str(h)

    async def _handle_path(self, cid: str, pid: int) -> str:
        h = self._mount_handle(cid, f"/proc/{pid}/ns/net")
        with contextlib.suppress(OSError):
            st = os.stat(h)
            self._netns[cid] = (st.st_dev, st.st_ino)
        return h

    async def _release(self, cid: str) -> None:
        self._netns.pop(cid, None)
        self._unreported.pop(cid, None)
        h = self.handle_dir / cid
        if h.exists():
            if _is_mount(h) and _libc().umount2(str(h).encode(), 0) != 0:
                log.warning("netns handle not unmounted", container=cid[:12], error=os.strerror(ctypes.get_errno()))
            with contextlib.suppress(OSError):
                h.unlink()

    async def _add(self, c: Container, net: str, t0: float, marks: tuple[float, float] | None = None,
                   resolv: asyncio.Future[None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        configs = load_configs(self.cni_dir / f"{net}.d")
        netns = await self._handle_path(c.id, c.pid)
        self.cgroups.learn(c.id, c.pid)
        _FOUND.labels("inspect").inc()
        t_plugin = loop.time()
        async with self._sem:
            res = await run_add(configs, cni_env("ADD", c.id, netns, c.labels, cni_path=self.cni_path),
                                timeout=self.timeout)
        t_files = loop.time()
        self.networked[c.id] = (c.started_at, net)
        self._unreported.pop(c.id, None)
        ip = result_ipv4(res)

        def files() -> None:  # fsync'd writes: off the loop, a burst of ADDs would queue behind them
            self._record(c.id, c.started_at, res)
            if ip and c.hosts_path:
                self._hosts(c.hosts_path, ip, c.hostname)

        if resolv is not None:
            await resolv
        await loop.run_in_executor(self._files, files)
        _CALLS.labels("ADD", "ok").inc()
        now = loop.time()
        _LAT.labels("ADD").observe(now - t0)
        _REPORTED.observe(now - t0)
        # where the time went from the event reaching this daemon: waiting (lock, earlier tries),
        # inspect, then resolv.conf + netns handle, the plugin chain, the state/hosts files
        t_in, t_out = marks or (t0, t0)
        log.info("CNI ADD done", container=c.id[:12], network=net, ip=ip, found="inspect",
                 since_event_ms=_ms(now - t0), wait_ms=_ms(t_in - t0), inspect_ms=_ms(t_out - t_in),
                 before_plugin_ms=_ms(t_plugin - t0), plugin_ms=_ms(t_files - t_plugin), files_ms=_ms(now - t_files))

    async def _del(self, cid: str, net: str, t0: float, c: Container | None) -> None:
        h = self.handle_dir / cid
        netns = str(h) if _is_mount(h) else ""
        labels = c.labels if c is not None else {}
        try:
            configs = load_configs(self.cni_dir / f"{net}.d")
            async with self._sem:
                await run_del(configs, cni_env("DEL", cid, netns, labels, cni_path=self.cni_path),
                              timeout=self.timeout)
            _CALLS.labels("DEL", "ok").inc()
        except CorralError as e:
            _CALLS.labels("DEL", "failed").inc()
            log.warning("CNI DEL failed (state cleared anyway)", container=cid[:12], network=net, error=str(e))
        finally:
            self.networked.pop(cid, None)
            await self._release(cid)
            d = self.state_dir / cid
            if d.is_dir():
                for f in d.iterdir():
                    with contextlib.suppress(OSError):
                        f.unlink()
                with contextlib.suppress(OSError):
                    d.rmdir()
            _LAT.labels("DEL").observe(asyncio.get_running_loop().time() - t0)
            log.info("CNI DEL done", container=cid[:12], network=net, netns=bool(netns))

    # ------------------------------------------------------------ files
    def _record(self, cid: str, started_at: str, body: dict[str, Any]) -> None:
        d = self.state_dir / cid
        try:
            d.mkdir(parents=True, exist_ok=True)
            write_atomic(d / started_at, json.dumps(body).encode(), 0o644)
        except (OSError, CorralError) as e:
            log.error("CNI state file not written", container=cid[:12], error=str(e))

    def _hosts(self, path: str, ip: str, hostname: str) -> None:
        line = hosts_line(ip, hostname)
        try:
            p = Path(path)
            text = p.read_text() if p.exists() else ""
            if line.strip() not in text.splitlines():
                with p.open("a") as f:
                    f.write(line)
        except OSError as e:
            log.warning("hosts line not written", path=path, error=str(e))

    def _write_resolv(self, c: Container) -> None:
        if not c.running or not wants_resolv(c.labels):
            return
        if not c.resolv_conf_path or c.resolv_conf_path == "/etc/resolv.conf":
            return
        try:
            p = Path(c.resolv_conf_path)
            old = p.read_text()
            new = render_resolv(old, metadata_ip=self.metadata_ip, labels=c.labels, dns_search=c.dns_search)
            if new != old:
                # in place, as the original: the running container has this very file (inode) bind-mounted
                # at /etc/resolv.conf, and a file renamed over it would only be seen after a restart
                with p.open("r+b") as f:
                    f.write(new.encode())
                    f.truncate()
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            log.warning("resolv.conf not written", container=c.id[:12], error=str(e))
