"""IPAM: host-local-compatible allocation (pure range math + a file-locked store) and the
metadata lookup mode of the original rancher-cni-ipam.

Store layout is host-local's (containernetworking/plugins 1.x, disk backend): under
``<dataDir>/<network name>/`` one file per allocated IP holding ``<containerID>\\r\\n<ifname>``,
``last_reserved_ip.<rangeset index>`` and an empty ``lock`` file that is ``flock``-ed around every
read-modify-write, so the reference host-local and Corral can even share a directory.
"""

from __future__ import annotations

import _socket
import _struct as struct  # struct.py only re-exports the built-in _struct

from . import _os as os
from ._proto import E_INVALID_CONFIG, E_PLUGIN, E_TRY_AGAIN, LEGACY, CniError, Env, Result

TYPE_CHECKING = False
if TYPE_CHECKING:
    from dataclasses import dataclass
    from typing import Any
else:
    from ._record import record as dataclass

_U32 = struct.Struct("!I")
LINE_BREAK = "\r\n"


def aton(s: str) -> int:
    try:
        return int(_U32.unpack(_socket.inet_aton(s))[0]) if s.count(".") == 3 else _bad_ip(s)
    except OSError:
        return _bad_ip(s)


def _bad_ip(s: str) -> int:
    raise CniError(E_INVALID_CONFIG, f"invalid IPv4 address {s!r}")


def ntoa(n: int) -> str:
    return _socket.inet_ntoa(_U32.pack(n))


def parse_cidr(s: str) -> tuple[int, int]:
    """``a.b.c.d/n`` → (address as int, prefix length)."""
    if not isinstance(s, str) or "/" not in s:
        raise CniError(E_INVALID_CONFIG, f"invalid CIDR address {s!r}")
    ip, _, plen = s.partition("/")
    if not plen.isdigit() or not 0 <= int(plen) <= 32:
        raise CniError(E_INVALID_CONFIG, f"invalid CIDR address {s!r}")
    return aton(ip), int(plen)


def mask(plen: int) -> int:
    return (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF if plen else 0


def network_of(addr: int, plen: int) -> int:
    return addr & mask(plen)


def broadcast_of(addr: int, plen: int) -> int:
    return network_of(addr, plen) | (~mask(plen) & 0xFFFFFFFF)


@dataclass(frozen=True)
class Range:
    network: int
    plen: int
    start: int
    end: int
    gateway: int

    def contains(self, ip: int) -> bool:
        return self.start <= ip <= self.end

    def text(self) -> str:
        return f"{ntoa(self.start)}-{ntoa(self.end)}"


def parse_range(obj: dict[str, Any]) -> Range:
    """One host-local range with its defaults (start = network+1, end = broadcast-1, gw = .1)."""
    if not isinstance(obj, dict) or "subnet" not in obj:
        raise CniError(E_INVALID_CONFIG, "invalid range: missing subnet")
    addr, plen = parse_cidr(obj["subnet"])
    if plen > 30:
        raise CniError(E_INVALID_CONFIG, f"network {obj['subnet']} too small to allocate from")
    net = network_of(addr, plen)
    if net != addr:
        raise CniError(E_INVALID_CONFIG, f"network has host bits set: {obj['subnet']}")
    bcast = broadcast_of(net, plen)
    start = aton(obj["rangeStart"]) if obj.get("rangeStart") else net + 1
    end = aton(obj["rangeEnd"]) if obj.get("rangeEnd") else bcast - 1
    gw = aton(obj["gateway"]) if obj.get("gateway") else net + 1
    for what, v in (("RangeStart", start), ("RangeEnd", end)):
        if not net < v < bcast:
            raise CniError(E_INVALID_CONFIG, f"{what} {ntoa(v)} not in network {obj['subnet']}")
    if start > end:
        raise CniError(E_INVALID_CONFIG, f"RangeStart {ntoa(start)} after RangeEnd {ntoa(end)}")
    return Range(net, plen, start, end, gw)


@dataclass(frozen=True)
class LocalConfig:
    name: str
    rangesets: tuple[tuple[Range, ...], ...]
    routes: tuple[dict[str, Any], ...]
    data_dir: str
    resolv_conf: str


@dataclass(frozen=True)
class MetadataConfig:
    prefix: str  # "/16"
    routes: tuple[dict[str, Any], ...]
    timeout: float
    address: str


def is_local(ipam: dict[str, Any]) -> bool:
    return "ranges" in ipam or "subnet" in ipam


def parse_routes(raw: Any) -> tuple[dict[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise CniError(E_INVALID_CONFIG, "invalid routes: not a list")
    out = []
    for r in raw:
        if not isinstance(r, dict) or not isinstance(r.get("dst"), str):
            raise CniError(E_INVALID_CONFIG, f"invalid route {r!r}")
        parse_cidr(r["dst"])
        if r.get("gw"):
            aton(r["gw"])
        out.append({"dst": r["dst"], **({"gw": r["gw"]} if r.get("gw") else {})})
    return tuple(out)


def ipam_section(conf: dict[str, Any]) -> dict[str, Any]:
    ipam = conf.get("ipam")
    if not isinstance(ipam, dict):
        raise CniError(E_INVALID_CONFIG, "IPAM config missing 'ipam' key")
    return ipam


def parse_local(conf: dict[str, Any]) -> LocalConfig:
    ipam = ipam_section(conf)
    name = conf.get("name")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise CniError(E_INVALID_CONFIG, f"invalid network name {name!r}")
    if "ranges" in ipam:
        raw = ipam["ranges"]
        if not isinstance(raw, list) or not raw or not all(isinstance(s, list) and s for s in raw):
            raise CniError(E_INVALID_CONFIG, "invalid ranges: need a non-empty list of range sets")
        sets = tuple(tuple(parse_range(r) for r in s) for s in raw)
    else:
        sets = ((parse_range({k: ipam.get(k) for k in ("subnet", "rangeStart", "rangeEnd", "gateway")}),),)
    flat = [r for s in sets for r in s]
    for i, a in enumerate(flat):
        for b in flat[i + 1 :]:
            if a.start <= b.end and b.start <= a.end:
                raise CniError(E_INVALID_CONFIG, f"range {a.text()} overlaps with range {b.text()}")
    data_dir = ipam.get("dataDir") or "/var/lib/cni/networks"
    if not isinstance(data_dir, str):
        raise CniError(E_INVALID_CONFIG, "invalid dataDir")
    return LocalConfig(name, sets, parse_routes(ipam.get("routes")), data_dir,
                       ipam.get("resolvConf") or "")


def parse_metadata(conf: dict[str, Any], environ: Any) -> MetadataConfig:
    ipam = ipam_section(conf)
    prefix = ipam.get("subnetPrefixSize") or "/16"
    if not isinstance(prefix, str) or not prefix.startswith("/") or not prefix[1:].isdigit():
        raise CniError(E_INVALID_CONFIG, f"invalid subnetPrefixSize {prefix!r}")
    timeout = ipam.get("timeoutSeconds", 30)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise CniError(E_INVALID_CONFIG, f"invalid timeoutSeconds {timeout!r}")
    address = environ.get("RANCHER_METADATA_ADDRESS") or "169.254.169.250"
    return MetadataConfig(prefix, parse_routes(ipam.get("routes")), float(timeout), address)


# -- pure allocation ---------------------------------------------------------------------------


def pick(rangeset: tuple[Range, ...], taken: set[int], last: int | None) -> int | None:
    """Next free address after ``last`` (round robin over the set), as host-local's RangeIter."""
    gws = {r.gateway for r in rangeset}
    idx = next((i for i, r in enumerate(rangeset) if last is not None and r.contains(last)), None)
    seq: list[tuple[int, int]] = []
    if idx is None:
        seq = [(r.start, r.end) for r in rangeset]
    else:
        assert last is not None
        r0 = rangeset[idx]
        seq = [(last + 1, r0.end)] + [(r.start, r.end) for r in rangeset[idx + 1 :]]
        seq += [(r.start, r.end) for r in rangeset[:idx]] + [(r0.start, last)]
    for lo, hi in seq:
        ip = lo
        while ip <= hi:
            if ip not in taken and ip not in gws:
                return ip
            ip += 1
    return None


def dns_from_resolv(text: str) -> dict[str, Any]:
    dns: dict[str, Any] = {}
    for line in text.splitlines():
        f = line.split()
        if not f or f[0].startswith(("#", ";")):
            continue
        if f[0] == "nameserver" and len(f) > 1:
            dns.setdefault("nameservers", []).append(f[1])
        elif f[0] == "domain" and len(f) > 1:
            dns["domain"] = f[1]
        elif f[0] == "search":
            dns["search"] = f[1:]
        elif f[0] == "options":
            dns.setdefault("options", []).extend(f[1:])
    return dns


# -- the store (file-locked, host-local layout) --------------------------------------------------


def _write_fd(fd: int, text: str) -> None:
    """Write all of ``text`` and close ``fd``."""
    try:
        data = text.encode()
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


class Store:
    def __init__(self, data_dir: str, network: str) -> None:
        self.dir = os.join(data_dir, network)
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        self.lock_fd = os.open(os.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT, 0o750)

    def __enter__(self) -> Store:
        import fcntl

        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.lock_fd)  # closing releases the flock

    # Everything between lock and unlock is plain posix open/read/write: every ADD and DEL of the
    # network queues on this lock, so under load a slow critical section (a text-mode open() per
    # file costs several times the syscalls) turns into a convoy of waiting calls.

    def _read(self, name: str) -> str | None:
        try:
            fd = os.open(os.join(self.dir, name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            return os.read(fd, 65536).decode("utf-8", "replace")
        finally:
            os.close(fd)

    def _write(self, name: str, text: str) -> None:
        _write_fd(os.open(os.join(self.dir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644), text)

    def allocations(self) -> dict[int, str]:
        """IP → file content, for every reserved IPv4 address."""
        out: dict[int, str] = {}
        for fn in os.listdir(self.dir):
            if fn.count(".") != 3 or not fn[0].isdigit():
                continue
            try:
                ip = aton(fn)
            except CniError:
                continue
            content = self._read(fn)
            if content is not None:
                out[ip] = content.strip()
        return out

    def last_reserved(self, idx: int) -> int | None:
        try:
            text = self._read(f"last_reserved_ip.{idx}")
            return aton(text.strip()) if text is not None else None
        except CniError:
            return None

    def reserve(self, ip: int, container_id: str, ifname: str, idx: int) -> bool:
        path = os.join(self.dir, ntoa(ip))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        try:
            _write_fd(fd, container_id.strip() + LINE_BREAK + ifname)
            self._write(f"last_reserved_ip.{idx}", ntoa(ip))
        except BaseException:
            # disk full: an empty (ownerless) file would hold the address forever, as upstream knew
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        return True

    def release_known(self, container_id: str, ifname: str, ips: list[int],
                      rangesets: tuple[tuple[Range, ...], ...]) -> bool:
        """Release the attachment's addresses named by the caller (its prevResult) without reading
        the rest of the store. True when one was released in every range set: an attachment holds
        one address per range set, so nothing of it is left and the full scan is not needed."""
        cid = container_id.strip()
        match = cid + LINE_BREAK + ifname
        done = set()
        for ip in ips:
            idx = next((i for i, rs in enumerate(rangesets) if any(r.contains(ip) for r in rs)), None)
            if idx is None or idx in done:
                continue
            content = self._read(ntoa(ip))
            if content is None:
                continue
            content = content.strip()
            if content == match or (content == cid and ifname == "eth0"):
                try:
                    os.unlink(os.join(self.dir, ntoa(ip)))
                except FileNotFoundError:
                    continue
                done.add(idx)
        return len(done) == len(rangesets)

    def release_by_id(self, container_id: str, ifname: str) -> list[int]:
        match = container_id.strip() + LINE_BREAK + ifname
        gone = []
        for ip, content in self.allocations().items():
            if content == match or (content == container_id.strip() and ifname == "eth0"):
                try:
                    os.unlink(os.join(self.dir, ntoa(ip)))
                    gone.append(ip)
                except FileNotFoundError:
                    pass
        return gone

    def by_id(self, container_id: str, ifname: str) -> list[int]:
        match = container_id.strip() + LINE_BREAK + ifname
        return sorted(ip for ip, c in self.allocations().items() if c == match)


def local_add(cfg: LocalConfig, container_id: str, ifname: str, requested: list[str],
              reuse: bool = False) -> Result:
    """Allocate one address per range set (host-local ADD)."""
    ips: list[dict[str, Any]] = []
    with Store(cfg.data_dir, cfg.name) as st:
        taken = st.allocations()
        mine = {ip for ip, c in taken.items() if c == container_id.strip() + LINE_BREAK + ifname}
        want = [aton(r.split("/")[0]) for r in requested]
        done: list[int] = []
        try:
            for idx, rs in enumerate(cfg.rangesets):
                have = [ip for ip in mine if any(r.contains(ip) for r in rs)]
                if have:
                    if not reuse:
                        raise CniError(E_PLUGIN, f"{ntoa(have[0])} has been allocated to {container_id}, "
                                       "duplicate allocation is not allowed")
                    ip = have[0]
                else:
                    req = [w for w in want if any(r.contains(w) for r in rs)]
                    if req:
                        ip = req[0]
                        if ip in taken or any(ip == r.gateway for r in rs):
                            raise CniError(E_PLUGIN, f"requested IP address {ntoa(ip)} is not available "
                                           f"in range set {','.join(r.text() for r in rs)}")
                    else:
                        picked = pick(rs, set(taken), st.last_reserved(idx))
                        if picked is None:
                            raise CniError(E_PLUGIN, "no IP addresses available in range set: "
                                           + ",".join(r.text() for r in rs))
                        ip = picked
                    if not st.reserve(ip, container_id, ifname, idx):
                        raise CniError(E_PLUGIN, f"requested IP address {ntoa(ip)} is not available")
                    done.append(ip)
                r = next(r for r in rs if r.contains(ip))
                ips.append({"address": f"{ntoa(ip)}/{r.plen}", "gateway": ntoa(r.gateway)})
            for w in want:
                if not any(r.contains(w) for rs in cfg.rangesets for r in rs):
                    raise CniError(E_PLUGIN, f"requested IP address {ntoa(w)} is not in any range")
        except BaseException:
            for ip in done:
                try:
                    os.unlink(os.join(st.dir, ntoa(ip)))
                except FileNotFoundError:
                    pass
            raise
    dns: dict[str, Any] = {}
    if cfg.resolv_conf:
        try:
            with open(cfg.resolv_conf) as f:
                dns = dns_from_resolv(f.read())
        except OSError as e:
            raise CniError(E_PLUGIN, f"failed to read resolvConf {cfg.resolv_conf}", str(e)) from None
    return Result([], ips, [dict(r) for r in cfg.routes], dns)


def local_del(cfg: LocalConfig, container_id: str, ifname: str, known: list[int] | None = None) -> None:
    """host-local DEL: every address held by (container, ifname). ``known`` (the addresses of the
    prevResult) are looked at first; the whole store is read only when they do not account for
    every range set (no prevResult, an older store, another owner), so a DEL holds the store's
    lock for a few file operations instead of one read per allocation."""
    if not os.isdir(os.join(cfg.data_dir, cfg.name)):
        return
    with Store(cfg.data_dir, cfg.name) as st:
        if known and st.release_known(container_id, ifname, known, cfg.rangesets):
            return
        st.release_by_id(container_id, ifname)


def prev_addresses(conf: dict[str, Any]) -> list[int]:
    """The IPv4 addresses of the config's prevResult (any version); [] when there are none or the
    prevResult is not understood (the caller then reads the whole store)."""
    prev = conf.get("prevResult")
    if not isinstance(prev, dict):
        return []
    ips = prev.get("ips")
    if isinstance(ips, list):
        addrs = [ip.get("address") for ip in ips if isinstance(ip, dict)]
    else:
        addrs = [sect.get("ip") for sect in (prev.get("ip4"),) if isinstance(sect, dict)]
    out = []
    for a in addrs:
        if isinstance(a, str) and "/" in a and ":" not in a:
            try:
                out.append(aton(a.split("/")[0]))
            except CniError:
                pass
    return out


def local_check(cfg: LocalConfig, container_id: str, ifname: str) -> list[int]:
    if not os.isdir(os.join(cfg.data_dir, cfg.name)):
        mine: list[int] = []
    else:
        with Store(cfg.data_dir, cfg.name) as st:
            mine = st.by_id(container_id, ifname)
    if not mine:
        raise CniError(E_PLUGIN, f"host-local: Failed to find address added by container {container_id}")
    return mine


def local_gc(cfg: LocalConfig, valid: set[tuple[str, str]]) -> list[int]:
    """GC (CNI 1.1): release every allocation whose (containerID, ifname) is not in ``valid``."""
    if not os.isdir(os.join(cfg.data_dir, cfg.name)):
        return []
    keep = {cid.strip() + LINE_BREAK + ifn for cid, ifn in valid}
    gone = []
    with Store(cfg.data_dir, cfg.name) as st:
        for ip, content in st.allocations().items():
            if content not in keep:
                try:
                    os.unlink(os.join(st.dir, ntoa(ip)))
                    gone.append(ip)
                except FileNotFoundError:
                    pass
    return sorted(gone)


def local_status(cfg: LocalConfig) -> None:
    """STATUS (CNI 1.1): 50 when the store cannot be used, 51 when every range set is full."""
    try:
        st = Store(cfg.data_dir, cfg.name)
    except OSError as e:
        raise CniError(50, "IPAM store unavailable", str(e)) from None
    with st:
        taken = set(st.allocations())
    for idx, rs in enumerate(cfg.rangesets):
        if pick(rs, taken, None) is None:
            raise CniError(51, "no IP addresses available in range set: " + ",".join(r.text() for r in rs),
                           f"range set {idx}")


def metadata_status(cfg: MetadataConfig) -> None:
    from ._metadata import MetadataError, get_json

    try:
        get_json(cfg.address, "/2015-12-19/version", 2.0)
    except MetadataError as e:
        raise CniError(50, "metadata unreachable", str(e)) from None


# -- metadata mode -------------------------------------------------------------------------------


def find_record(containers: list[dict[str, Any]], container_id: str, uuid: str) -> dict[str, Any] | None:
    """The first record matching ``external_id`` (or ``uuid``) with a non-empty primary_ip."""
    for c in containers:
        if not isinstance(c, dict) or not c.get("primary_ip"):
            continue
        if (container_id and c.get("external_id") == container_id) or (uuid and c.get("uuid") == uuid):
            return c
    return None


def metadata_result(cfg: MetadataConfig, record: dict[str, Any]) -> Result:
    ip = f"{record['primary_ip']}{cfg.prefix}"
    parse_cidr(ip)
    return Result([], [{"address": ip}], [dict(r) for r in cfg.routes], {})


def _urlsafe(v: str) -> str:
    ok = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
    return "".join(c if c in ok else "".join(f"%{b:02X}" for b in c.encode()) for c in v)


def metadata_lookup(cfg: MetadataConfig, container_id: str, uuid: str) -> dict[str, Any]:
    """Find this container's record, waiting for it until the deadline (code 11 then).

    Hot path: one GET of /containers. On a miss: note the answer set's version, look again (closes
    the race with a change in between), then long-poll ``/version?wait=true&value=V`` (at most 2 s,
    so a source that does not bump its version is still re-read) instead of polling /containers:
    the record is seen as soon as metadata has it, and a burst of waiting ADDs costs metadata one
    parked request each. A server that does not park the request (answers at once, same version)
    or fails gets the back-off polling of before (50 ms doubling to 0.5 s).
    """
    import time

    from ._metadata import MetadataError, get_json

    deadline = time.monotonic() + cfg.timeout
    delay = 0.05
    last_err = ""
    version: str | None = None
    misses = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CniError(E_TRY_AGAIN, "No IP address found", f"metadata at {cfg.address}: {last_err}")
        timeout = min(2.0, max(left, 0.05))
        try:
            if version is not None:
                wait = max(1, min(2, int(left)))
                t0 = time.monotonic()
                now = get_json(cfg.address, f"/2015-12-19/version?wait=true&value={_urlsafe(version)}"
                               f"&maxWait={wait}", min(wait + 1.0, max(left, 0.05)))
                if now == version and time.monotonic() - t0 < 0.5 * wait:
                    version = None  # not parked: fall back to polling
                    raise MetadataError("long poll not supported")
            if misses:
                v = get_json(cfg.address, "/2015-12-19/version", timeout)
                version = v if isinstance(v, str) and v else None
            data = get_json(cfg.address, "/2015-12-19/containers", timeout)
            if not isinstance(data, list):
                raise MetadataError("unexpected /containers answer")
            rec = find_record(data, container_id, uuid)
            if rec is not None:
                return rec
            last_err = "No IP address found"
            misses += 1
            if version is not None or misses == 1:
                continue
        except MetadataError as e:
            last_err = str(e)
            version = None
        left = deadline - time.monotonic()
        if left > 0:
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.5)


# -- dispatch (shared by corral-ipam and the bridge's in-process IPAM) -----------------------------


_records: dict[str, dict[str, Any]] = {}


def metadata_record(conf: dict[str, Any], env: Env) -> dict[str, Any]:
    """The metadata record for this container (looked up once per process)."""
    key = env.container_id + "|" + env.args.get("RancherContainerUUID", "")
    if key not in _records:
        cfg = parse_metadata(conf, os.environ)
        _records[key] = metadata_lookup(cfg, env.container_id, env.args.get("RancherContainerUUID", ""))
    return _records[key]


def _requested(conf: dict[str, Any], env: Env) -> list[str]:
    out: list[str] = []
    for key in ("IP", "IPAddress"):
        v = env.args.get(key)
        if v:
            out.extend(x for x in v.split(",") if x)
    for src in ((conf.get("runtimeConfig") or {}).get("ips"), ((conf.get("args") or {}).get("cni") or {}).get("ips")):
        if isinstance(src, list):
            out.extend(x for x in src if isinstance(x, str))
    return out


def valid_attachments(conf: dict[str, Any]) -> set[tuple[str, str]]:
    """GC's ``cni.dev/valid-attachments``: the (containerID, ifname) pairs to keep."""
    raw = conf.get("cni.dev/valid-attachments")
    if raw is None:
        raw = []
    if not isinstance(raw, list) or not all(
            isinstance(a, dict) and isinstance(a.get("containerID"), str) and isinstance(a.get("ifname"), str)
            for a in raw):
        raise CniError(E_INVALID_CONFIG, "invalid cni.dev/valid-attachments",
                       "need a list of {containerID, ifname}")
    return {(a["containerID"], a["ifname"]) for a in raw}


def ipam_command(command: str, conf: dict[str, Any], env: Env, version: str) -> Result | None:
    ipam = ipam_section(conf)
    if is_local(ipam):
        cfg = parse_local(conf)
        if command == "ADD":
            return local_add(cfg, env.container_id, env.ifname, _requested(conf, env), reuse=version in LEGACY)
        if command == "DEL":
            local_del(cfg, env.container_id, env.ifname, prev_addresses(conf))
        elif command == "CHECK":
            local_check(cfg, env.container_id, env.ifname)
        elif command == "GC":
            local_gc(cfg, valid_attachments(conf))
        elif command == "STATUS":
            local_status(cfg)
        return None
    mcfg = parse_metadata(conf, os.environ)
    if command == "STATUS":
        metadata_status(mcfg)
        return None
    if command != "ADD":
        return None  # metadata mode keeps no local state: DEL/CHECK/GC are metadata-free
    fixed = env.args.get("IPAddress")
    if fixed:
        parse_cidr(fixed)
        return Result([], [{"address": fixed}], [dict(r) for r in mcfg.routes], {})
    return metadata_result(mcfg, metadata_record(conf, env))
