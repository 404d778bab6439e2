"""The IPsec backend's adapters: strongSwan's charon (started, supervised, driven over VICI) and the kernel.

* :func:`probe_kernel` tries a throw-away ESP state (and then an AES-GCM one) with ``ip xfrm state
  add``: without kernel ESP the backend runs in kernel-libipsec mode (charon does ESP in userspace
  through the TUN ``ipsec0``), which is logged and exported as ``corral_overlay_ipsec_mode``, never
  chosen silently.
* :class:`Charon` writes a private ``strongswan.conf`` into its run directory, starts
  ``/usr/lib/ipsec/charon`` in a private mount namespace (``/run`` bind-mounted from the run
  directory, so several charons can run on one machine, each with its own pid file and VICI socket),
  with SIGTERM on parent death, and restarts it with capped jittered back-off when it exits.
* :class:`Vici` runs the blocking ``vici`` client in one worker thread (one session; an initiate,
  which waits for the peer, gets its own short session and thread).
* :class:`IpsecBackend` is the router's backend: PSK loaded for ``%any``, the peer routers and
  agents; ``load-conn`` only for changed connections, ``unload-conn`` and a forced terminate of
  their SAs for hosts that left; in kernel-ESP mode the XFRM policies (``ip -batch``); an SA
  watchdog every 10 s initiates, with per-peer jittered back-off, the children that have no
  installed SA (the responder of a pair only after ``responder_grace`` seconds without one) and
  terminates duplicate SAs of a connection; ``repair_peer`` (3 missed probes) gives the pair
  fresh SAs, never a second CHILD_SA.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import inspect
import os
import random
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from agents.backoff import Backoff
from agents.children import die_with_parent
from agents.errors import ConfigError, CorralError, TransportError
from agents.log import get_logger
from agents.metrics import counter, gauge
from netmanager.overlay.ipsec import (
    IpsecSettings,
    Policy,
    TopologyLike,
    child_name,
    conn_name,
    desired_conns,
    desired_policies,
    initiator,
    policy_diff,
    psk_owners,
    read_psk,
    revision,
)

__all__ = ["CHARON", "Charon", "IpsecBackend", "KernelProbe", "PskSource", "Vici", "make_backend", "probe_kernel",
           "strongswan_conf"]

log = get_logger(__name__)
CHARON = "/usr/lib/ipsec/charon"
TUN = "ipsec0"
TABLE = 220
INNER_MTU = 1350  # ipsec0's 1400 minus VXLAN's 50
PLUGINS = ("random nonce kdf openssl aes sha1 sha2 hmac gcm gmp pem pkcs1 x509 pubkey kernel-netlink "
           "socket-default vici updown")
_MODE = gauge("overlay", "ipsec_mode", "IPsec data path in use (1 on the active mode's label)", ["mode"])
_RESTARTS = counter("overlay", "charon_restarts", "charon exits that the router restarted")
_VICI = counter("overlay", "vici_calls", "VICI commands by command and outcome", ["command", "outcome"])
_INITIATES = counter("overlay", "ipsec_initiates", "CHILD_SA initiations by reason and outcome", ["reason", "outcome"])
_SAS = gauge("overlay", "ipsec_established_peers", "Peers with an ESTABLISHED IKE_SA and an INSTALLED CHILD_SA")
_DOWN = gauge("overlay", "ipsec_peers_without_sa", "Peers whose CHILD_SA is missing")
_DUPS = gauge("overlay", "ipsec_duplicate_agent_ips", "Agent IPs shared by several hosts (refused; alarm when > 0)")


# ---------------------------------------------------------------------------------------------- probe
@dataclass(frozen=True)
class KernelProbe:
    esp: bool
    gcm: bool
    message: str  # why not, when not

    @property
    def mode(self) -> str:
        return "kernel" if self.esp else "libipsec"


async def _ip(*args: str, netns: str = "", stdin: bytes | None = None) -> tuple[int, str]:
    cmd = ["ip", *(("-n", netns) if netns else ()), *args]
    proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.PIPE if stdin is not None else None,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate(stdin)
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def probe_kernel(netns: str = "") -> KernelProbe:
    """Can this kernel do ESP (and AES-GCM)? A dummy SA on loopback addresses, removed at once."""
    base = ("xfrm", "state", "add", "src", "127.0.0.7", "dst", "127.0.0.8", "proto", "esp", "spi", "0x00c0ffee",
            "mode", "tunnel")
    cbc = ("enc", "cbc(aes)", "0x" + "11" * 16, "auth", "hmac(sha256)", "0x" + "22" * 32)
    gcm = ("aead", "rfc4106(gcm(aes))", "0x" + "33" * 20, "128")
    results = []
    for algo in (cbc, gcm):
        rc, out = await _ip(*base, *algo, netns=netns)
        if rc == 0:
            await _ip("xfrm", "state", "delete", "src", "127.0.0.7", "dst", "127.0.0.8", "proto", "esp",
                      "spi", "0x00c0ffee", netns=netns)
        results.append((rc == 0, out))
    (esp, esp_err), (gcm_ok, gcm_err) = results
    msg = "" if esp and gcm_ok else (f"kernel ESP unavailable: ip xfrm state add ... proto esp: {esp_err}" if not esp
                                      else f"kernel AES-GCM unavailable: {gcm_err}")
    return KernelProbe(esp=esp, gcm=esp and gcm_ok, message=msg)


# ---------------------------------------------------------------------------------------------- charon
def strongswan_conf(run_dir: str, *, libipsec: bool, debug: int = 1) -> str:
    """charon's configuration: our plugins only, VICI socket and log in ``run_dir``."""
    plugins = PLUGINS.replace("kernel-netlink", "kernel-libipsec kernel-netlink") if libipsec else PLUGINS
    return f"""charon {{
  load_modular = no
  load = {plugins}
  install_routes = no
  make_before_break = yes
  ignore_acquire_ts = yes
  filelog {{
    main {{
      path = {run_dir}/charon.log
      default = {debug}
      flush_line = yes
    }}
  }}
  plugins {{
    vici {{
      socket = unix://{run_dir}/charon.vici
    }}
  }}
}}
"""


class Vici:
    """The blocking ``vici`` client behind one worker thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vici")
        self._session: Any = None
        self._sock: socket.socket | None = None

    def _open(self) -> Any:
        import vici

        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)
        s.connect(self.path)
        return s, vici.Session(s)

    def _call(self, command: str, arg: Any) -> Any:
        if self._session is None:
            self._sock, self._session = self._open()
        try:
            res = getattr(self._session, command)(arg) if arg is not None else getattr(self._session, command)()
            return list(res) if inspect.isgenerator(res) else res  # streamed commands run when consumed
        except (OSError, ConnectionError):
            self._drop()
            raise

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = self._session = None

    async def call(self, command: str, arg: Any = None) -> Any:
        """Run ``Session.<command>(arg)``; TransportError on a socket problem or a refused command."""
        loop = asyncio.get_running_loop()
        try:
            res = await loop.run_in_executor(self._pool, self._call, command, arg)
        except Exception as e:
            _VICI.labels(command, "error").inc()
            raise TransportError(f"vici {command}: {_text(e)}") from e
        _VICI.labels(command, "ok").inc()
        return res

    def _initiate(self, child: str, ike: str, timeout_ms: int) -> list[str]:
        sock, session = self._open()
        try:
            logs = []
            for m in session.initiate({"child": child, "ike": ike, "timeout": str(timeout_ms), "init-limits": "no"}):
                logs.append(_text(m.get("msg", b"")))
            return logs
        finally:
            sock.close()

    async def initiate(self, child: str, ike: str, *, timeout: float = 5.0) -> list[str]:
        """``initiate`` on its own session (it waits for the peer); raises TransportError with charon's log."""
        try:
            res = await asyncio.to_thread(self._initiate, child, ike, int(timeout * 1000))
        except Exception as e:
            _VICI.labels("initiate", "error").inc()
            raise TransportError(f"vici initiate {child}: {_text(e)}") from e
        _VICI.labels("initiate", "ok").inc()
        return res

    def listen(self, events: Iterable[str], on_event: Callable[[str, Mapping[str, Any]], None],
               stop: Callable[[], bool]) -> None:
        """Blocking (run it in a thread): ``on_event(name, msg)`` for every event until ``stop()``;
        ``on_event("", {})`` about once a second while registered and idle."""
        sock, session = self._open()
        gen = session.listen(list(events), timeout=1.0)
        try:
            for name, msg in gen:
                if stop():
                    return
                on_event(_text(name) if name is not None else "", msg or {})
        finally:
            with contextlib.suppress(Exception):
                gen.close()
            sock.close()

    def close(self) -> None:
        self._pool.submit(self._drop)
        self._pool.shutdown(wait=False)


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, list):
        return ",".join(_text(x) for x in v)
    return str(v)


class Charon:
    """One charon per router: started in ``run_dir`` (and ``netns`` when given), restarted when it exits."""

    def __init__(self, run_dir: str, *, libipsec: bool, netns: str = "", debug: int = 1,
                 binary: str = CHARON, backoff: Backoff | None = None) -> None:
        self.run_dir = os.path.abspath(run_dir)
        self.libipsec = libipsec
        self.netns = netns
        self.debug = debug
        self.binary = binary
        self.backoff = backoff or Backoff(0.5, 30.0)
        self.proc: asyncio.subprocess.Process | None = None
        self.vici = Vici(self.socket)
        self.starts = 0
        self.ready = asyncio.Event()

    @property
    def socket(self) -> str:
        return os.path.join(self.run_dir, "charon.vici")

    @property
    def log_file(self) -> str:
        return os.path.join(self.run_dir, "charon.log")

    def command(self) -> list[str]:
        run = os.path.join(self.run_dir, "run")
        conf = os.path.join(self.run_dir, "strongswan.conf")
        inner = f"mount --bind {run} /run && exec env STRONGSWAN_CONF={conf} {self.binary}"
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", inner]
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd

    def _prepare(self) -> None:
        if not os.path.exists(self.binary):
            raise CorralError(f"{self.binary} not found: install strongswan-charon (scripts/setup.sh)")
        os.makedirs(os.path.join(self.run_dir, "run"), exist_ok=True)
        with open(os.path.join(self.run_dir, "strongswan.conf"), "w") as f:
            f.write(strongswan_conf(self.run_dir, libipsec=self.libipsec, debug=self.debug))
        for stale in (self.socket, os.path.join(self.run_dir, "run", "charon.pid")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)

    async def start(self) -> None:
        self._prepare()
        self.vici._drop()
        self.proc = await asyncio.create_subprocess_exec(*self.command(), stdin=asyncio.subprocess.DEVNULL,
                                                         stdout=asyncio.subprocess.DEVNULL,
                                                         stderr=asyncio.subprocess.DEVNULL,
                                                         preexec_fn=die_with_parent)
        self.starts += 1
        # VICI answers once charon has loaded its plugins; it may also die at start (a bad config).
        for _ in range(200):
            if self.proc.returncode is not None:
                raise TransportError(f"charon exited at start with {self.proc.returncode}; see {self.log_file}")
            try:
                await self.vici.call("version")
                break
            except TransportError:
                pass
            await asyncio.sleep(0.05)
        else:
            raise TransportError(f"charon's VICI socket {self.socket} did not answer; see {self.log_file}")
        log.info("charon started", pid=self.proc.pid, run_dir=self.run_dir, netns=self.netns or None,
                 mode="libipsec" if self.libipsec else "kernel")
        self.ready.set()

    async def stop(self) -> None:
        self.ready.clear()
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def supervise(self, stop: asyncio.Event, on_start: Callable[[], Any]) -> None:
        """Keep charon running until ``stop``; ``on_start()`` after every (re)start (reload everything)."""
        try:
            while not stop.is_set():
                try:
                    await self.start()
                    self.backoff.mark_up()
                    on_start()
                except (CorralError, OSError) as e:
                    log.error("charon did not start", error=str(e))
                    await self.stop()
                else:
                    assert self.proc is not None
                    waiter = asyncio.ensure_future(self.proc.wait())
                    stopper = asyncio.ensure_future(stop.wait())
                    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    stopper.cancel()
                    if stop.is_set():
                        waiter.cancel()
                        break
                    self.ready.clear()
                    _RESTARTS.inc()
                    log.error("charon exited; restarting", code=waiter.result(), log=self.log_file)
                delay = self.backoff.next()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            await self.stop()
            self.vici.close()


# ---------------------------------------------------------------------------------------------- backend
@dataclass
class _Peer:
    backoff: Backoff = field(default_factory=lambda: Backoff(1.0, 30.0))
    due: float = 0.0          # monotonic time of the next allowed initiate
    missing_since: float = 0.0


class IpsecBackend:
    """The ``ipsec`` backend of the overlay router (see the module doc)."""

    name = "ipsec"

    def __init__(self, *, run_dir: str = "/var/run/corral-ipsec", settings: IpsecSettings | None = None,
                 psk: PskSource | Callable[[], str] | str = "", probe: KernelProbe | None = None, netns: str = "",
                 watchdog_interval: float = 10.0, responder_grace: float = 60.0, debug: int = 1,
                 host_mode: bool = False, **_: Any) -> None:
        self.host_mode = host_mode
        self._address = ""
        self.settings = settings or IpsecSettings()
        self.run_dir = run_dir
        self.netns = netns
        self._psk = psk
        self.probe = probe
        self.watchdog_interval = watchdog_interval
        self.responder_grace = responder_grace
        self.debug = debug
        self.own_writes = 0   # VICI loads, policies, routes
        self.writes = 0       # own_writes plus the inner VTEP's (libipsec mode)
        self.inner: Any = None  # libipsec mode: the VXLAN backend carried by the tunnel
        self._rule = False
        self.charon: Charon | None = None
        self.loaded: dict[str, str] = {}          # conn name -> revision loaded into this charon
        self.psk_loaded: tuple[str, tuple[str, ...]] | None = None
        self.policies: set[Policy] | None = None  # kernel mode: what we programmed
        self.topo: TopologyLike | None = None
        self.peers: dict[str, _Peer] = {}
        self._on_change: Callable[[str], None] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()
        self._hthresh = False
        self._dups: tuple[str, ...] = ()
        self.routes: set[str] | None = None       # libipsec mode: remote /32s routed into the TUN device

    # ------------------------------------------------------------------ life cycle
    @property
    def device(self) -> str:
        """Where the workloads' traffic leaves: the VTEP inside the tunnel (libipsec), else eth0."""
        return "vtep1042" if (self.probe is not None and not self.probe.esp) or self.settings.libipsec else "eth0"

    async def start(self) -> None:
        """Probe the kernel, pick the mode (logged and exported), start charon and its supervisor."""
        if self.charon is not None:
            return
        if self.probe is None:
            self.probe = await probe_kernel(self.netns)
        p = self.probe
        libipsec = not p.esp
        self.settings = IpsecSettings(**{**self.settings.__dict__, "libipsec": libipsec,
                                          "gcm": self.settings.gcm and (p.gcm or libipsec)})
        for m in ("kernel", "libipsec"):
            _MODE.labels(m).set(1 if m == p.mode else 0)
        if libipsec:
            log.warning("IPsec in kernel-libipsec mode: ESP runs in charon (userspace) through the TUN device",
                        reason=p.message, device=TUN)
        elif not p.gcm:
            log.warning("IPsec in kernel mode without AES-GCM: GCM proposals filtered", reason=p.message)
        else:
            log.info("IPsec in kernel mode (ESP and AES-GCM available)")
        if libipsec and self.inner is None and not self.netns:  # the VTEP is programmed in this process's netns
            from netmanager.overlay.vxlan import VxlanBackend

            self.inner = VxlanBackend(mtu=INNER_MTU, host_mode=self.host_mode)
        self.charon = Charon(self.run_dir, libipsec=libipsec, netns=self.netns, debug=self.debug)
        self._stop.clear()
        self._tasks = [asyncio.create_task(self.charon.supervise(self._stop, self._charon_started)),
                       asyncio.create_task(self._watchdog())]
        await asyncio.wait_for(self.charon.ready.wait(), 30)

    def _charon_started(self) -> None:
        self.loaded.clear()
        self.psk_loaded = None
        self.routes = None  # the TUN device (and its routes) went with the old charon
        if self._on_change is not None:
            self._on_change("charon started")

    async def close(self) -> None:
        self._stop.set()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        self.charon = None

    async def _ready(self) -> Charon:
        try:
            await self.start()
            assert self.charon is not None
            await asyncio.wait_for(self.charon.ready.wait(), 30)
        except TimeoutError as e:
            log_file = self.charon.log_file if self.charon is not None else self.run_dir
            raise TransportError(f"charon is not running (restarting with back-off); see {log_file}") from e
        return self.charon

    def _want(self, topo: TopologyLike) -> dict[str, dict[str, Any]]:
        """The connections to load: every remote host with a router, except shared agent IPs."""
        dups = set(getattr(topo, "duplicate_agent_ips", ()) or ())
        return {n: m for n, m in desired_conns(topo, self.settings).items() if n.removeprefix("conn-") not in dups}

    # ------------------------------------------------------------------ desired -> charon
    async def psk(self) -> str:
        if isinstance(self._psk, PskSource):
            return await self._psk.get()
        return self._psk() if callable(self._psk) else self._psk

    async def _host_address(self, router_ip: str) -> list[str]:
        """Host-netns mode: the router IP as a /32 on ``lo``, so the host is the tunnel's inner endpoint."""
        if not self.host_mode or router_ip == self._address:
            return []
        errors = []
        if self._address:
            await _ip("addr", "del", f"{self._address}/32", "dev", "lo", netns=self.netns)
        rc, out = await _ip("addr", "replace", f"{router_ip}/32", "dev", "lo", netns=self.netns)
        if rc:
            errors.append(f"ip addr replace {router_ip}/32 dev lo: {out}")
        else:
            self._address = router_ip
            self.own_writes += 1
        return errors

    async def apply(self, topo: TopologyLike) -> list[str]:
        """Load what changed, unload what left; every entry is tried, then the errors are raised."""
        charon = await self._ready()
        self.topo = topo
        dups = tuple(getattr(topo, "duplicate_agent_ips", ()) or ())
        _DUPS.set(len(dups))
        if dups and dups != self._dups:
            log.error("ALARM: hosts share an agent IP; no IPsec connection is loaded for them", agent_ips=list(dups))
        self._dups = dups
        errors: list[str] = await self._host_address(topo.router_ip)
        secret = await self.psk()
        owners = tuple(psk_owners(topo))
        if not secret:
            errors.append("no PSK: set RANCHER_IPSEC_PSK or let the server's configcontent/psk answer")
        elif self.psk_loaded != (secret, owners):
            try:
                await charon.vici.call("load_shared", {"type": "IKE", "data": secret, "owners": list(owners)})
                self.psk_loaded = (secret, owners)
                self.own_writes += 1
            except TransportError as e:
                errors.append(str(e))
        want = self._want(topo)
        for name, msg in want.items():
            rev = revision(msg)
            if self.loaded.get(name) == rev:
                continue
            for attempt in range(3):
                try:
                    await charon.vici.call("load_conn", msg)
                    self.loaded[name] = rev
                    self.own_writes += 1
                    log.info("connection loaded", conn=name)
                    break
                except TransportError as e:
                    if attempt == 2:
                        errors.append(str(e))
        for agent in {n.removeprefix("conn-") for n in want}:
            self.peers.setdefault(agent, _Peer())
        if self.settings.libipsec:
            errors += await self._apply_routes(topo)
            if self.inner is not None:
                try:
                    res = await self.inner.apply(_inner_topology(topo))
                    errors += list(getattr(res, "errors", ()))
                except (CorralError, OSError) as e:
                    errors.append(f"VTEP inside the tunnel: {e}")
        if not errors:  # like the original: removals only after every add went through
            for name in sorted(set(self.loaded) - set(want)):
                try:
                    await charon.vici.call("unload_conn", {"name": name})
                    self.own_writes += 1
                    log.info("connection unloaded", conn=name)
                except TransportError as e:
                    if "not found" not in str(e):
                        errors.append(str(e))
                        continue
                self.loaded.pop(name, None)
                self.peers.pop(name.removeprefix("conn-"), None)
                # unload-conn only closes the initiator's children; the IKE_SA (and, on the
                # responder, the children too) would linger until DPD: end them now, one DELETE
                with contextlib.suppress(TransportError):  # none left: nothing to do
                    await charon.vici.call("terminate", {"ike": name, "force": "yes"})
                    log.info("SAs of an unloaded connection terminated", conn=name)
            if not self.settings.libipsec:
                errors += await self._apply_policies(desired_policies(topo, self.settings))
        self._count()
        if errors:
            raise TransportError(f"{len(errors)} IPsec entries failed, first: {errors[0]}")
        return errors

    def _count(self) -> None:
        self.writes = self.own_writes + (self.inner.writes if self.inner is not None else 0)

    async def _apply_routes(self, topo: TopologyLike) -> list[str]:
        """libipsec mode: ``<peer router IP>/32 dev ipsec0 src <router IP> table 220`` and the rule
        ``220: from all lookup 220``, so the router IPs (and the VXLAN packets addressed to them)
        take the tunnel while the workloads' /32s in the main table take the VTEP. The routes follow
        metadata, not the SAs; kernel-libipsec adds its own copy of a route while its SA is up
        and removes it with the SA (taking ours along), so every charon event re-reads them."""
        errors: list[str] = []
        if not self._rule:
            rc, out = await _ip("rule", "show", "pref", str(TABLE), netns=self.netns)
            if f"lookup {TABLE}" not in out:
                rc, out = await _ip("rule", "add", "pref", str(TABLE), "lookup", str(TABLE), netns=self.netns)
                self.own_writes += 1
            if rc:
                errors.append(f"ip rule add pref {TABLE} lookup {TABLE}: {out}")
            self._rule = rc == 0
        want = {f"{r}/32" for r in topo.routers.values()}
        current = await read_tun_routes(self.netns) if self.routes is None else self.routes
        add, delete = sorted(want - current), sorted(current - want)
        if not add and not delete:
            self.routes = want
            return errors
        lines = [f"route replace {d} dev {TUN} src {topo.router_ip} table {TABLE}" for d in add]
        lines += [f"route delete {d} dev {TUN} table {TABLE}" for d in delete]
        rc, out = await _ip("-force", "-batch", "-", netns=self.netns, stdin="\n".join(lines).encode() + b"\n")
        self.own_writes += len(lines)
        self.routes = None if rc else want
        return errors + ([f"ip route ... dev {TUN} table {TABLE}: {out}"] if rc else [])

    async def _apply_policies(self, want: set[Policy]) -> list[str]:
        if not self._hthresh:
            # local /16 -> remote /32 policies are hashed, not scanned linearly, at 30 k entries
            rc, out = await _ip("xfrm", "policy", "set", "hthresh4", "16", "32", netns=self.netns)
            self._hthresh = rc == 0
            if rc:
                log.warning("ip xfrm policy set hthresh4 16 32 failed", error=out)
        current = await read_policies(self.netns) if self.policies is None else self.policies
        add, delete = policy_diff(current, want)
        if not add and not delete:
            self.policies = want
            return []
        lines = [" ".join(["xfrm", "policy", "delete", "src", p.src, "dst", p.dst, "dir", p.dir]) for p in delete]
        lines += [" ".join(["xfrm", "policy", "add", *p.ip_args()]) for p in add]
        rc, out = await _ip("-force", "-batch", "-", netns=self.netns, stdin="\n".join(lines).encode() + b"\n")
        self.own_writes += len(lines)
        self.policies = None if rc else want
        return [f"ip xfrm policy: {out}"] if rc else []

    async def in_sync(self, topo: TopologyLike) -> bool:
        if self.charon is None or not self.charon.ready.is_set():
            return False
        try:
            names = {_text(c) for conn in await self.charon.vici.call("list_conns") for c in conn}
        except TransportError:
            return False
        want = self._want(topo)
        if set(want) - names or set(self.loaded) - set(want):
            self.loaded = {n: r for n, r in self.loaded.items() if n in names}
            return False
        if not self.settings.libipsec:
            self.policies = None  # read the kernel back on the next apply
            return set(await read_policies(self.netns)) == desired_policies(topo, self.settings)
        self.routes = None
        self._rule = False
        ok = await read_tun_routes(self.netns) == {f"{r}/32" for r in topo.routers.values()}
        return ok and (self.inner is None or await self.inner.in_sync(_inner_topology(topo)))

    # ------------------------------------------------------------------ SAs
    async def sa_list(self) -> list[tuple[str, dict[str, Any]]]:
        """(IKE name, {state, ids, uniqueid, age, children}) for every IKE_SA of ``list-sas``."""
        assert self.charon is not None
        out: list[tuple[str, dict[str, Any]]] = []
        for entry in await self.charon.vici.call("list_sas"):
            for name, sa in entry.items():
                children = sa.get("child-sas") or {}
                out.append((_text(name), {
                    "state": _text(sa.get("state", b"")),
                    "uniqueid": _text(sa.get("uniqueid", b"")),
                    "age": int(_text(sa.get("established", b"0")) or 0),
                    "local_id": _text(sa.get("local-id", b"")),
                    "remote_id": _text(sa.get("remote-id", b"")),
                    "initiator": _text(sa.get("initiator", b"")) == "yes",
                    "children": [{k: _text(v) for k, v in c.items() if not isinstance(v, dict)}
                                 for c in children.values()],
                }))
        return out

    async def sas(self) -> dict[str, dict[str, Any]]:
        """IKE name -> its best IKE_SA (established with an installed child first, then the newest)."""
        out: dict[str, dict[str, Any]] = {}
        for name, sa in sorted(await self.sa_list(), key=lambda e: _rank(e[1])):
            out[name] = sa
        return out

    async def reap_duplicates(self, entries: list[tuple[str, dict[str, Any]]]) -> int:
        """Terminate the established IKE_SAs of a connection older than its best one, and every
        installed CHILD_SA but the newest in the best one: after a partition the side that missed
        the DELETE keeps the old pair beside the new one until its DPD gives up (minutes). SAs in
        the middle of an exchange are left alone. The number of SAs terminated."""
        assert self.charon is not None
        by_name: dict[str, list[dict[str, Any]]] = {}
        for name, sa in entries:
            by_name.setdefault(name, []).append(sa)
        targets: list[dict[str, str]] = []
        for sas in by_name.values():
            best = max(sas, key=_rank)
            if _rank(best)[0] < 2:
                continue  # nothing up yet: leave the exchanges alone
            # only established SAs older than the best: one still being set up may be the repair
            targets += [{"ike-id": sa["uniqueid"]} for sa in sas if sa is not best and sa["uniqueid"]
                        and sa["state"] == "ESTABLISHED" and sa["age"] > best["age"]]
            installed = sorted((c for c in best["children"] if c.get("state") == "INSTALLED"),
                               key=lambda c: int(c.get("install-time", "0") or 0))
            targets += [{"child-id": c["uniqueid"]} for c in installed[1:] if c.get("uniqueid")]
        done = 0
        for t in targets:
            try:
                await self.charon.vici.call("terminate", {**t, "force": "yes"})
                done += 1
                log.info("duplicate SA terminated", **{k.replace("-", "_"): v for k, v in t.items()})
            except TransportError as e:
                log.warning("duplicate SA not terminated", error=str(e), **{k.replace("-", "_"): v for k, v in t.items()})
        return done

    async def initiate(self, agent_ip: str, reason: str) -> bool:
        assert self.charon is not None
        try:
            await self.charon.vici.initiate(child_name(agent_ip), conn_name(agent_ip))
        except TransportError as e:
            _INITIATES.labels(reason, "error").inc()
            log.warning("CHILD_SA initiation failed", peer=agent_ip, reason=reason, error=str(e))
            return False
        _INITIATES.labels(reason, "ok").inc()
        log.info("CHILD_SA initiated", peer=agent_ip, reason=reason)
        return True

    async def watchdog_once(self) -> int:
        """Initiate every due child without an installed SA; the number of initiations tried."""
        if self.topo is None or self.charon is None or not self.charon.ready.is_set():
            return 0
        try:
            entries = await self.sa_list()
        except TransportError as e:
            log.warning("SA watchdog: list-sas failed", error=str(e))
            return 0
        await self.reap_duplicates(entries)
        sas = {name: sa for name, sa in sorted(entries, key=lambda e: _rank(e[1]))}
        now = time.monotonic()
        up = 0
        tried = 0
        for agent, peer in list(self.peers.items()):
            name = conn_name(agent)
            sa = sas.get(name)
            ok = sa is not None and sa["state"] == "ESTABLISHED" and any(
                c.get("state") == "INSTALLED" for c in sa["children"])
            if ok:
                up += 1
                peer.missing_since = 0.0
                peer.backoff.reset()
                peer.due = 0.0
                continue
            if sa is not None and sa["state"] in ("CONNECTING", "REKEYING"):
                continue
            if not peer.missing_since:
                peer.missing_since = now
            mine = initiator(self.topo.agent_ip, agent)
            if (not mine and now - peer.missing_since < self.responder_grace) or now < peer.due:
                continue
            peer.due = now + peer.backoff.next()
            tried += 1
            await self.initiate(agent, "watchdog" if mine else "watchdog-responder")
        _SAS.set(up)
        _DOWN.set(len(self.peers) - up)
        return tried

    async def _watchdog(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.watchdog_interval * (0.9 + 0.2 * random.random()))
            if not self._stop.is_set():
                try:
                    await self.watchdog_once()
                except Exception as e:  # the watchdog must outlive any one bad round
                    log.error("SA watchdog round failed", error=str(e))

    async def repair_peer(self, topo: TopologyLike, agent_ip: str) -> int:
        """3 missed probes: give the pair fresh SAs, never a second CHILD_SA beside the first.

        Without an SA the child is initiated. With one established, the tunnel answers IKE but not
        the probes (the peer lost its state, or a partition ate the DELETEs), and charon refuses a
        duplicate child anyway: the initiator of the pair terminates the IKE_SA (one DELETE, not
        waited for) and initiates afresh. A peer that missed the DELETE drops its old pair in its
        SA watchdog (:meth:`reap_duplicates`) once the new one is up.
        The responder of the pair leaves an established SA to the initiator, and initiates only
        once the initiator had ``responder_grace`` seconds to come back (both ends initiating at
        once is what made the original's pairs collide). While an exchange is under way
        (connecting, rekeying, deleting) nothing is done."""
        if self.charon is None or agent_ip not in topo.routers:
            return 0
        peer = self.peers.setdefault(agent_ip, _Peer())
        now = time.monotonic()
        if not peer.missing_since:
            peer.missing_since = now
        mine = initiator(topo.agent_ip, agent_ip)
        try:
            sa = (await self.sas()).get(conn_name(agent_ip))
        except TransportError as e:
            log.warning("probe repair: list-sas failed", peer=agent_ip, error=str(e))
            return 0
        state = sa["state"] if sa is not None else ""
        if state and state != "ESTABLISHED":
            return 0
        if not mine and (state or now - peer.missing_since < self.responder_grace):
            return 0
        writes = 0
        if state:
            try:  # forced: one DELETE is sent and the SA goes at once (no wait on a peer that may be gone)
                await self.charon.vici.call("terminate", {"ike": conn_name(agent_ip), "force": "yes"})
                writes += 1
                log.info("IKE_SA terminated for a fresh one", peer=agent_ip, reason="probe")
            except TransportError as e:  # still there: charon refuses the duplicate child below
                log.warning("probe repair: terminate failed", peer=agent_ip, error=str(e))
        return writes + (1 if await self.initiate(agent_ip, "probe") else 0)

    # ------------------------------------------------------------------ events
    def watch(self, on_change: Callable[[str], None]) -> _Events:
        self._on_change = on_change
        return _Events(self, on_change)

    def inner_watch(self, on_change: Callable[[str], None]) -> Any:
        return self.inner.watch(on_change) if self.inner is not None else None


def _rank(sa: Mapping[str, Any]) -> tuple[int, int]:
    """Order of IKE_SAs of one connection, best last: established with an installed child, then
    established, then anything; among equals the newest (the smallest age)."""
    up = sa["state"] == "ESTABLISHED"
    installed = up and any(c.get("state") == "INSTALLED" for c in sa["children"])
    return (2 if installed else 1 if up else 0), -int(sa.get("age", 0))


class _Events:
    """``ike-updown``/``child-updown`` from charon -> ``on_change`` (a reconcile) on the loop."""

    def __init__(self, backend: IpsecBackend, on_change: Callable[[str], None]) -> None:
        self.backend = backend
        self.on_change = on_change
        self._stopped = False
        self._task: asyncio.Task[None] | None = None
        self.listening = False  # registered with the current charon

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._inner: Any = None

    def _start_inner(self) -> None:
        if self._inner is None and self.backend.inner is not None:
            self._inner = self.backend.inner_watch(self.on_change)
            if self._inner is not None:
                self._inner.start()

    def stop(self) -> None:
        """The router stops: stop listening, and stop charon (it also dies with this process)."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
        if getattr(self, "_inner", None) is not None:
            self._inner.stop()
        self.backend._stop.set()

    def _changed(self, reason: str) -> None:
        # kernel-libipsec adds and removes its own copy of a tunnel route with the SA: read them back
        self.backend.routes = None
        self.on_change(reason)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()

        def event(name: str, msg: Mapping[str, Any]) -> None:
            self.listening = True
            if name:
                loop.call_soon_threadsafe(self._changed, f"charon {name}")

        while not self._stopped:
            charon = self.backend.charon
            if charon is None or not charon.ready.is_set():
                await asyncio.sleep(0.5)
                continue
            self._start_inner()
            def done(c: Charon = charon) -> bool:
                return self._stopped or not c.ready.is_set()

            with contextlib.suppress(Exception):
                await asyncio.to_thread(charon.vici.listen, ("ike-updown", "child-updown"), event, done)
            self.listening = False
            await asyncio.sleep(0.5)


async def read_tun_routes(netns: str = "") -> set[str]:
    """Destinations routed into the TUN device (table 220), as ``a.b.c.d/32``."""
    rc, out = await _ip("route", "show", "table", str(TABLE), "dev", TUN, netns=netns)
    if rc:
        return set()  # no device yet: nothing routed
    return {(w if "/" in w else f"{w}/32") for w in (ln.split()[0] for ln in out.splitlines() if ln.strip())}


async def read_policies(netns: str = "") -> set[Policy]:
    """The kernel's in/out/fwd policies with an ESP tunnel template (``ip xfrm policy``)."""
    rc, out = await _ip("xfrm", "policy", "list", netns=netns)
    if rc:
        raise TransportError(f"ip xfrm policy list: {out}")
    return parse_policies(out)


def parse_policies(text: str) -> set[Policy]:
    """Parse ``ip xfrm policy list`` output (entries start at column 0)."""
    out: set[Policy] = set()
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line and not line[0].isspace():
            blocks.append([])
        if blocks:
            blocks[-1].extend(line.split())
    for words in blocks:
        w = {words[i]: words[i + 1] for i in range(len(words) - 1)}
        if "tmpl" not in words or w.get("dir") not in ("in", "out", "fwd"):
            continue
        t = words.index("tmpl")
        tw = {words[i]: words[i + 1] for i in range(t, len(words) - 1)}
        try:
            out.add(Policy(w["dir"], words[1], words[3], tw["src"], tw["dst"], int(tw.get("reqid", "0")),
                           int(w.get("priority", "0"))))
        except (KeyError, ValueError):
            continue
    return out


class PskSource:
    """The environment's PSK: ``RANCHER_IPSEC_PSK``, else the server's ``configcontent/psk`` (kept in
    ``<config_dir>/psk.txt`` and acknowledged with ``?version=latest``), else that file's last copy."""

    def __init__(self, config_dir: str, env: Mapping[str, str] | None = None) -> None:
        self.config_dir = config_dir
        self.env = dict(os.environ if env is None else env)
        self.fetched = False

    @property
    def path(self) -> str:
        return os.path.join(self.config_dir, "psk.txt")

    async def get(self) -> str:
        if self.env.get("RANCHER_IPSEC_PSK"):
            return self.env["RANCHER_IPSEC_PSK"]
        if not self.fetched and self.env.get("CATTLE_URL"):
            try:
                await self._fetch()
                self.fetched = True
            except (CorralError, OSError) as e:
                log.warning("PSK not fetched from the server; using the last copy", error=str(e), file=self.path)
        return await asyncio.to_thread(read_psk, {}, path=self.path)

    async def _fetch(self) -> None:
        from agents.api import ApiClient
        from agents.config import CattleConfig

        cfg = CattleConfig(url=self.env["CATTLE_URL"], access_key=self.env.get("CATTLE_ACCESS_KEY", ""),
                           secret_key=self.env.get("CATTLE_SECRET_KEY", ""))
        async with ApiClient(cfg) as api:
            body = await api.get_bytes("configcontent/psk")
            secret = body.decode(errors="replace").strip()
            if not secret:
                raise TransportError("configcontent/psk is empty")
            await asyncio.to_thread(_write_private, self.path, secret + "\n")
            await api.put("configcontent/psk", params={"version": "latest"})
        log.info("PSK fetched from the server", file=self.path)


def _inner_topology(topo: TopologyLike) -> Any:
    """The VTEP's view in libipsec mode: every peer is reached at its router IP (through the tunnel)."""
    routers = dict(topo.routers)
    return dataclasses.replace(cast(Any, topo), routers={r: r for r in routers.values()},
                               workloads={ip: routers[a] for ip, a in topo.workloads.items() if a in routers})


def _write_private(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def make_backend(*, host_mode: bool = True, netns: str = "", **_: Any) -> IpsecBackend:
    """``corral overlay --backend ipsec``: settings and PSK from the environment, the kernel probed now
    (so the router's first reconcile already knows the data path's device). Environment:
    ``CORRAL_IPSEC_DIR`` (charon's run directory, default /var/run/corral-ipsec),
    ``CORRAL_IPSEC_CONFIG_DIR`` (psk.txt, ike.conf, childsa.conf; default
    /var/lib/rancher/state/corral/ipsec), ``RANCHER_DEBUG=true`` (charon log level 3)."""
    config_dir = os.environ.get("CORRAL_IPSEC_CONFIG_DIR") or "/var/lib/rancher/state/corral/ipsec"
    try:
        settings = IpsecSettings.from_env(config_dir=config_dir)
    except (ValueError, OSError) as e:
        raise ConfigError(str(e)) from e
    probe = asyncio.run(probe_kernel(netns))
    return IpsecBackend(run_dir=os.environ.get("CORRAL_IPSEC_DIR") or "/var/run/corral-ipsec", settings=settings,
                        psk=PskSource(config_dir), probe=probe, netns=netns, host_mode=host_mode,
                        debug=3 if os.environ.get("RANCHER_DEBUG", "").lower() == "true" else 1)


def have_charon() -> str:
    """'' when charon and the kernel-libipsec plugin are installed, else what is missing."""
    missing = [p for p in (CHARON, "/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so",
                           "/usr/lib/ipsec/plugins/libstrongswan-openssl.so") if not os.path.exists(p)]
    if shutil.which("unshare") is None:
        missing.append("unshare")
    return ", ".join(missing)
