"""Bridge plugin: pure decisions (config, names, gateway, routes, result) and the apply steps.

ADD order (cni.md §3, kernel outcome of the original, CNI ≥0.3 strictness for new versions):
config → open netns → interface-exists check → bridge (create/reuse, up, promisc, address) →
IPAM (in-process for Corral's own IPAM; exec'd from CNI_PATH otherwise) → veth pair, created
with its peer directly in the container namespace (name, MAC and container MTU set at creation) →
host end enslaved + up + hairpin → container side: up, address, routes → gateway address and
ip_forward → ipMasq → result. Anything failing after IPAM or the veth undoes both (and the bridge
when this call created it and nothing else joined it).
"""

from __future__ import annotations

from . import _ipam, _js
from . import _os as os
from ._netlink import Link, Netlink, NetlinkError, open_in_netns
from ._proto import (
    E_INVALID_CONFIG,
    E_PLUGIN,
    LEGACY,
    CniError,
    Env,
    Result,
    parse_result,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from dataclasses import dataclass
    from typing import Any
else:
    from ._record import record as dataclass

OWN_IPAM = ("corral-ipam", "rancher-cni-ipam")


@dataclass(frozen=True)
class BridgeConf:
    name: str
    bridge: str
    bridge_subnet: str
    bridge_ip: str
    is_gateway: bool
    is_default_gateway: bool
    use_bridge_ip_as_gateway: bool
    ip_masq: bool
    mtu: int
    link_mtu_overhead: int
    hairpin: bool
    promisc: bool
    skip_bridge_ip: bool
    ipam: dict[str, Any]
    dns: dict[str, Any]
    skip_fast_path: bool = False


def _bool(conf: dict[str, Any], key: str) -> bool:
    v = conf.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise CniError(E_INVALID_CONFIG, f"invalid config: {key} must be a boolean, got {v!r}")
    return v


def _int(conf: dict[str, Any], key: str) -> int:
    v = conf.get(key, 0)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise CniError(E_INVALID_CONFIG, f"invalid config: {key} must be a non-negative integer, got {v!r}")
    return v


def parse_conf(conf: dict[str, Any], args: dict[str, str]) -> BridgeConf:
    br = conf.get("bridge") or "cni0"
    if not isinstance(br, str) or len(br) > 15 or "/" in br or " " in br:
        raise CniError(E_INVALID_CONFIG, f"invalid bridge name {br!r}")
    name = conf.get("name", "")
    if not isinstance(name, str):
        raise CniError(E_INVALID_CONFIG, "invalid config: name must be a string")
    is_dgw = _bool(conf, "isDefaultGateway")
    hairpin, promisc = _bool(conf, "hairpinMode"), _bool(conf, "promiscMode")
    if hairpin and promisc:
        raise CniError(E_INVALID_CONFIG, "cannot set hairpin mode and promiscuous mode at the same time.")
    subnet = conf.get("bridgeSubnet") or ""
    bip = conf.get("bridgeIP") or ""
    if subnet:
        a, plen = _ipam.parse_cidr(subnet)
        if bip:
            b = _ipam.aton(bip.split("/")[0])
            if _ipam.network_of(b, plen) != _ipam.network_of(a, plen):
                raise CniError(E_INVALID_CONFIG, f"bridgeIP {bip} is not in bridgeSubnet {subnet}")
    overhead = _int(conf, "linkMTUOverhead")
    arg = args.get("LinkMTUOverhead")
    if arg is not None and arg.lstrip("-").isdigit():
        overhead = int(arg)
    ipam = conf.get("ipam")
    if not isinstance(ipam, dict) or not isinstance(ipam.get("type"), str) or not ipam["type"]:
        raise CniError(E_INVALID_CONFIG, "IPAM config missing 'ipam' key" if ipam is None
                       else "invalid config: ipam.type missing")
    check_plugin_name(ipam["type"])
    dns = conf.get("dns")
    dns = {} if dns is None else dns
    if not isinstance(dns, dict):
        raise CniError(E_INVALID_CONFIG, "invalid config: dns must be an object")
    return BridgeConf(name, br, subnet, bip, _bool(conf, "isGateway") or is_dgw, is_dgw,
                      _bool(conf, "useBridgeIPAsGateway"), _bool(conf, "ipMasq"), _int(conf, "mtu"),
                      overhead, hairpin, promisc, _bool(conf, "skipBridgeConfigureIP"), ipam, dns,
                      skip_fast_path=_bool(conf, "skipFastPath"))


def host_veth_name(container_id: str, ifname: str = "eth0") -> str:
    """``vethr`` + first 10 chars of the ID (the original's name) for ``eth0``; for any other
    container interface (a second network on one container) the last 4 of those 10 chars are a
    CRC of the ifname, so the attachments cannot delete each other's "leftover" host end."""
    if len(container_id) < 10:
        raise CniError(E_PLUGIN, f"container ID {container_id!r} is shorter than 10 characters")
    if ifname == "eth0":
        return "vethr" + container_id[:10]
    import zlib

    return "vethr" + container_id[:6] + f"{zlib.crc32(ifname.encode()) & 0xFFFF:04x}"


def bridge_address(c: BridgeConf) -> tuple[str, int] | None:
    """The bridge's own address from bridgeSubnet/bridgeIP (None when not configured)."""
    if not c.bridge_subnet or c.skip_bridge_ip:
        return None
    a, plen = _ipam.parse_cidr(c.bridge_subnet)
    ip = _ipam.aton(c.bridge_ip.split("/")[0]) if c.bridge_ip else _ipam.network_of(a, plen) + 1
    return _ipam.ntoa(ip), plen


def container_mtu(c: BridgeConf) -> int:
    return c.mtu - c.link_mtu_overhead if c.link_mtu_overhead > 0 and c.mtu - c.link_mtu_overhead > 0 else c.mtu


def plan_ips(c: BridgeConf, res: Result, bridge_ip: str | None) -> Result:
    """Gateways and the default route (pure): steps 8–9 of the original."""
    if not any(":" not in ip["address"] for ip in res.ips):
        raise CniError(E_PLUGIN, "IPAM plugin returned missing IPv4 config")
    ips = []
    for ip in res.ips:
        ip = dict(ip)
        if ":" not in ip["address"] and c.is_gateway:
            if c.use_bridge_ip_as_gateway and bridge_ip:
                ip["gateway"] = bridge_ip
            elif not ip.get("gateway"):
                a, plen = _ipam.parse_cidr(ip["address"])
                ip["gateway"] = _ipam.ntoa(_ipam.network_of(a, plen) + 1)
        ips.append(ip)
    routes = [dict(r) for r in res.routes]
    if c.is_default_gateway:
        gw = next(ip["gateway"] for ip in ips if ":" not in ip["address"])
        for r in routes:
            if r["dst"] == "0.0.0.0/0" and r.get("gw") and r["gw"] != gw:
                raise CniError(E_PLUGIN, f'isDefaultGateway ineffective because IPAM sets default route via "{r["gw"]}"')
        if not any(r["dst"] == "0.0.0.0/0" for r in routes):
            routes.append({"dst": "0.0.0.0/0", "gw": gw})
    return Result([], ips, routes, res.dns)


def masq_chain(name: str, container_id: str) -> str:
    try:  # the C hash itself: hashlib would load OpenSSL first (~3 ms per call)
        from _sha2 import sha512  # type: ignore[import-not-found]  # Python >= 3.12
    except ImportError:
        try:
            from _sha512 import sha512  # type: ignore[import-not-found,no-redef]
        except ImportError:
            from hashlib import sha512  # type: ignore[no-redef]
    return "CNI-" + sha512((name + container_id).encode()).hexdigest()[:24]


def masq_comment(name: str, container_id: str) -> str:
    return f'name: "{name}" id: "{container_id}"'


# -- IPAM delegation ----------------------------------------------------------------------------


def check_plugin_name(kind: str) -> None:
    """A delegated plugin is a name looked up in CNI_PATH, never a path (the reference's rule)."""
    if os.sep in kind or kind in (".", ".."):
        raise CniError(E_INVALID_CONFIG, f"invalid plugin name: {kind}")


def find_plugin(kind: str, cni_path: str) -> str | None:
    """The first regular, executable file named ``kind`` in the CNI_PATH directories."""
    check_plugin_name(kind)
    for d in cni_path.split(os.pathsep):
        if not d:
            continue
        p = os.join(d, kind)
        if os.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def run_ipam(command: str, conf: dict[str, Any], raw: bytes, env: Env, version: str) -> Result | None:
    """IPAM ADD/DEL/CHECK: in-process for Corral's own IPAM, else exec ``ipam.type`` from CNI_PATH."""
    kind = conf["ipam"]["type"]
    if kind in OWN_IPAM:
        return _ipam.ipam_command(command, conf, env, version)
    path = find_plugin(kind, env.path)
    if path is None:
        raise CniError(E_PLUGIN, f'failed to find plugin "{kind}" in path {env.path.split(os.pathsep)}')
    e = dict(os.environ)
    e["CNI_COMMAND"] = command
    from . import _exec

    rc, out, errout = _exec.run([path], raw, e)
    if rc != 0:
        try:
            err = _js.loads(out)
            raise CniError(int(err.get("code", E_PLUGIN)), err.get("msg", "IPAM failed"), err.get("details", ""))
        except (ValueError, AttributeError):
            raise CniError(E_PLUGIN, f"IPAM plugin {kind} failed", errout.decode(errors="replace")) from None
    if command != "ADD":
        return None
    return parse_result(_js.loads(out))


# -- apply: ADD ----------------------------------------------------------------------------------


def _open_netns(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CniError(E_PLUGIN, f"failed to open netns {path!r}", str(e)) from None


def random_mac() -> str:
    """A random unicast, locally administered MAC address."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def ensure_bridge(nl: Netlink, c: BridgeConf) -> tuple[Link, bool]:
    created = False
    br = nl.get_link(c.bridge)
    if br is None:
        try:
            nl.create_bridge(c.bridge, c.mtu)
            created = True
        except NetlinkError as e:
            if e.errno != 17:
                raise CniError(E_PLUGIN, f'could not add "{c.bridge}"', str(e)) from None
        br = nl.get_link(c.bridge)
        if br is None:
            raise CniError(E_PLUGIN, f"bridge {c.bridge} vanished")
        if created and br.kind == "bridge":
            # Pin a MAC (addr_assign_type=SET) so it does not follow the lowest port's MAC. It must
            # differ from the one the kernel gave the bridge: writing back the same address marks
            # it SET without computing the bridge id, which then stays 8000.0:0:0:0:0:0 for good
            # (and the bridge's operstate UNKNOWN instead of UP).
            mac = br.mac
            while mac in ("", "00:00:00:00:00:00", br.mac):
                mac = random_mac()
            nl.set_link(br.index, mac=mac)
            br.mac = mac
    if br.kind != "bridge":
        raise CniError(E_PLUGIN, f'{c.bridge} already exists but is not a bridge')
    if not br.flags & 1 or (c.promisc and not br.flags & 0x100):
        nl.set_link(br.index, up=True, promisc=True if c.promisc else None)
    return br, created


def add_addr(nl: Netlink, index: int, ip: str, plen: int) -> None:
    a = _ipam.aton(ip)
    brd = _ipam.ntoa(_ipam.broadcast_of(a, plen)) if plen < 31 else ""
    try:
        nl.add_addr(index, ip, plen, brd)
    except NetlinkError as e:
        if e.errno != 17:
            raise CniError(E_PLUGIN, f"failed to add IP addr {ip}/{plen}", str(e)) from None


def cmd_add(conf: dict[str, Any], raw: bytes, env: Env, version: str) -> Result:
    c = parse_conf(conf, env.args)
    veth = host_veth_name(env.container_id, env.ifname)
    ns_fd = _open_netns(env.netns)
    if ns_fd is None:
        raise CniError(E_PLUGIN, f'failed to open netns "{env.netns}"', "no such file or directory")
    nl = Netlink()
    cnl = open_in_netns(ns_fd)
    legacy = version in LEGACY
    created_bridge = ipam_done = veth_done = masq_started = False
    lock_fd = bridge_lock(c.bridge)
    try:
        existing = cnl.get_link(env.ifname)
        if existing is not None and not legacy:
            raise CniError(E_PLUGIN, f"container veth name provided ({env.ifname}) already exists")
        br, created_bridge = ensure_bridge(nl, c)
        baddr = bridge_address(c)
        if baddr is not None:
            add_addr(nl, br.index, *baddr)
        fast = None
        if not c.skip_fast_path and not _ipam.is_local(c.ipam):
            # the originals' fast path: IP and MAC from the container's Docker labels
            from . import _docker

            fast = _docker.fast_path(_docker.labels(
                env.container_id, os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"))
        mac = (fast[1] if fast else "") or env.args.get("MACAddress") or env.args.get("MAC") or ""
        if fast is None and c.ipam.get("type") in OWN_IPAM and not _ipam.is_local(c.ipam) and not mac:
            # metadata mode: the record carries the MAC too (one lookup for both, cni.md §3 step 6)
            rec = _ipam.metadata_record(conf, env)
            mac = mac or rec.get("primary_mac_address") or ""
        if fast is not None:
            _ipam.parse_cidr(fast[0])
            # IP only from the labels; unlike the original, the configured IPAM routes still apply
            ipam_res: Result | None = Result([], [{"address": fast[0]}],
                                             [dict(r) for r in _ipam.parse_routes(c.ipam.get("routes"))], {})
        else:
            ipam_res = run_ipam("ADD", conf, raw, env, version)
            ipam_done = True
        assert ipam_res is not None
        bridge_ip = None
        if c.use_bridge_ip_as_gateway:
            addrs = nl.addrs(br.index)
            bridge_ip = addrs[0].address if addrs else (baddr[0] if baddr else None)
        res = plan_ips(c, ipam_res, bridge_ip)
        cmtu = container_mtu(c)
        if existing is None:
            old = nl.get_link(veth)
            if old is not None:
                nl.del_link(old.index)
            try:
                nl.create_veth(veth, env.ifname, ns_fd, c.mtu, cmtu, mac)
            except NetlinkError as e:
                raise CniError(E_PLUGIN, f"failed to create veth pair {veth}/{env.ifname}", str(e)) from None
            veth_done = True
            cif = cnl.get_link(env.ifname)
        else:
            cif = existing
            if mac and cif.mac != mac.lower():
                cnl.set_link(cif.index, mac=mac)
            if cmtu and cif.mtu != cmtu:
                cnl.set_link(cif.index, mtu=cmtu)
        host = nl.get_link(veth)
        if host is None or cif is None:
            raise CniError(E_PLUGIN, f"veth pair {veth}/{env.ifname} not found after creation")
        nl.set_link(host.index, up=True, master=br.index)
        if c.hairpin or not veth_done:
            nl.set_hairpin(host.index, c.hairpin)
        # container side
        cnl.set_link(cif.index, up=True)
        for ip in res.ips:
            if ":" in ip["address"]:
                continue
            a, plen = ip["address"].split("/")
            add_addr(cnl, cif.index, a, int(plen))
        gw4 = next((ip.get("gateway") for ip in res.ips if ":" not in ip["address"]), "") or ""
        for r in res.routes:
            if ":" in r["dst"]:
                continue
            d, plen = r["dst"].split("/")
            try:
                cnl.add_route(d, int(plen), r.get("gw") or gw4, cif.index)
            except NetlinkError as e:
                if e.errno != 17:
                    raise CniError(E_PLUGIN, f"failed to add route {r['dst']}", str(e)) from None
        # host side gateway
        if c.is_gateway and gw4:
            ip4 = next(ip for ip in res.ips if ":" not in ip["address"])
            plen = int(ip4["address"].split("/")[1])
            net = _ipam.network_of(_ipam.aton(gw4), plen)
            same = [a for a in nl.addrs(br.index) if _ipam.network_of(_ipam.aton(a.address), plen) == net]
            if not any(a.address == gw4 and a.prefixlen == plen for a in same):
                if same:
                    raise CniError(E_PLUGIN, f'"{c.bridge}" already has an IP address different from {gw4}/{plen}')
                add_addr(nl, br.index, gw4, plen)
            _sysctl("/proc/sys/net/ipv4/ip_forward", "1")
        if c.ip_masq:
            masq_started = True
            nets = []
            for ip in res.ips:
                a, plen = _ipam.parse_cidr(ip["address"])
                nets.append(f"{_ipam.ntoa(_ipam.network_of(a, plen))}/{plen}")
            setup_masq(c.name, env.container_id, nets)
        br_now = nl.get_link(c.bridge) or br
        res.interfaces = [
            {"name": c.bridge, "mac": br_now.mac},
            {"name": veth, "mac": host.mac},
            {"name": env.ifname, "mac": cif.mac, "sandbox": env.netns},
        ]
        for ip in res.ips:
            ip["interface"] = 2
        if c.dns:
            res.dns = dict(c.dns)
        return res
    except BaseException:
        if masq_started:
            teardown_masq(c.name, env.container_id)  # the chain is this container's own
        if veth_done:
            nl.del_link(name=veth)
        if ipam_done:
            try:
                run_ipam("DEL", conf, raw, env, version)
            except CniError:
                pass
        if created_bridge and bridge_lock_exclusive(lock_fd):
            # no other ADD on this bridge is in flight (they all hold the lock shared)
            br2 = nl.get_link(c.bridge)
            if br2 is not None and not any(ln.master == br2.index for ln in nl.links()):
                nl.del_link(br2.index)
        raise
    finally:
        os.close(lock_fd)
        nl.close()
        cnl.close()
        os.close(ns_fd)


def bridge_lock(bridge: str) -> int:
    """The bridges' lock, held *shared* by every ADD from before the bridge is ensured until the
    call ends, so a failing ADD that created the bridge removes it only when it can take the lock
    exclusively (nobody else is about to enslave a port). The lock is the network namespace's own
    inode (``flock`` on /proc/self/ns/net): per namespace, like the bridges, and no lock files
    are left anywhere. (``bridge`` is unused: one namespace rarely has several of our bridges.)"""
    import fcntl

    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def bridge_lock_exclusive(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _sysctl(path: str, value: str) -> None:
    with open(path, "r+") as f:
        if f.read().strip() != value:
            f.seek(0)
            f.write(value)


# -- ipMasq (iptables; only when asked) ---------------------------------------------------------


def _ipt_quote(s: str) -> str:
    """A word in iptables-restore's input: double-quoted, with backslash escapes."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ipt_restore(lines: list[str], what: str) -> None:
    from . import _exec

    payload = "*nat\n" + "".join(line + "\n" for line in lines) + "COMMIT\n"
    rc, out, err = _exec.run(["iptables-restore", "-w", "--noflush"], payload.encode())
    if rc != 0:
        raise CniError(E_PLUGIN, f"failed to {what} IP masquerade", (err or out).decode(errors="replace").strip())


def setup_masq(name: str, container_id: str, subnets: list[str]) -> None:
    """The container's chain (its rules replaced: the chain is its own) and one POSTROUTING jump per
    subnet, in one iptables-restore transaction. One ``iptables -C`` first per subnet, so a
    repeated ADD (tolerated for <= 0.2.0) does not add a second jump. Two executions in all,
    where one per rule (seven) took most of an ADD's time when many ran at once."""
    from . import _exec

    chain, comment = masq_chain(name, container_id), masq_comment(name, container_id)
    if any(ch in comment for ch in "\n\r\0"):
        raise CniError(E_INVALID_CONFIG, "invalid network name or container ID for ipMasq")
    cm = "-m comment --comment " + _ipt_quote(comment)
    lines = [f":{chain} - [0:0]"]
    lines += [f"-A {chain} -d {s} -j ACCEPT {cm}" for s in subnets]
    lines.append(f"-A {chain} ! -d 224.0.0.0/4 -j MASQUERADE {cm}")
    for s in subnets:
        rc, _, _ = _exec.run(["iptables", "-w", "-t", "nat", "-C", "POSTROUTING", "-s", s, "-j", chain,
                              "-m", "comment", "--comment", comment])
        if rc != 0:  # no such rule (or no such chain yet)
            lines.append(f"-A POSTROUTING -s {s} -j {chain} {cm}")
    _ipt_restore(lines, "set up")


def teardown_masq(name: str, container_id: str) -> None:
    """Every POSTROUTING jump to the container's chain, then the chain: one ``iptables-save`` to
    find them (a DEL without prevResult and namespace does not know the subnets), one restore to
    remove them; nothing when neither is there (DEL is idempotent)."""
    from . import _exec

    chain = masq_chain(name, container_id)
    rc, out, _ = _exec.run(["iptables-save", "-t", "nat"])
    if rc != 0:
        return  # no nat table to read (or no iptables): nothing of ours can be there
    lines = out.decode(errors="replace").splitlines()
    exists = any(line.startswith(f":{chain} ") for line in lines)
    jumps = ["-D" + line[2:] for line in lines if line.startswith("-A POSTROUTING ")
             and (line.endswith(f" -j {chain}") or f" -j {chain} " in line)]
    if not exists and not jumps:
        return
    _ipt_restore(([f":{chain} - [0:0]"] if exists else []) + jumps + ([f"-X {chain}"] if exists else []),
                 "tear down")


# -- apply: DEL / CHECK --------------------------------------------------------------------------


def cmd_del(conf: dict[str, Any], raw: bytes, env: Env, version: str) -> None:
    c = parse_conf(conf, env.args)
    run_ipam("DEL", conf, raw, env, version)
    prev = parse_result(conf["prevResult"]) if isinstance(conf.get("prevResult"), dict) else None
    hosts = [i["name"] for i in prev.interfaces if not i.get("sandbox") and i["name"] != c.bridge] if prev else []
    if len(env.container_id) >= 10:
        hosts.append(host_veth_name(env.container_id, env.ifname))
    with Netlink() as nl:
        if env.netns:
            ns_fd = _open_netns(env.netns)
            if ns_fd is not None:
                try:
                    _del_in_netns(nl, ns_fd, env.ifname)
                finally:
                    os.close(ns_fd)
        for h in dict.fromkeys(hosts):
            link = nl.get_link(h)
            if link is not None and link.kind == "veth":
                nl.del_link(link.index)
    if c.ip_masq:
        teardown_masq(c.name, env.container_id)


def _del_in_netns(nl: Netlink, ns_fd: int, ifname: str) -> None:
    """Delete ``ifname`` inside the namespace ``ns_fd``. Through the id this namespace has for it
    (the veth created by ADD gave it one): one request from here, no setns (and no ``_ctypes``
    to load for it on Python < 3.12). Without an id, from a socket opened inside."""
    try:
        nsid = nl.peer_nsid(ns_fd)
    except NetlinkError:
        nsid = -1
    if nsid >= 0:
        nl.del_link(name=ifname, netnsid=nsid)
        return
    try:
        cnl = open_in_netns(ns_fd)
    except OSError:
        return  # not a namespace (any more): nothing to remove inside
    with cnl:
        cnl.del_link(name=ifname)


def cmd_gc(conf: dict[str, Any], raw: bytes, env: Env, version: str) -> None:
    """GC (CNI 1.1): remove host ends on this bridge that belong to no valid attachment, then let
    the IPAM release addresses. Only Corral's own links are touched: ``vethr*`` veths enslaved to
    this plugin's bridge (another runtime's ports on the same bridge are left alone)."""
    c = parse_conf(conf, env.args)
    valid = _ipam.valid_attachments(conf)
    keep = {host_veth_name(cid, ifn) for cid, ifn in valid if len(cid) >= 10}
    with Netlink() as nl:
        br = nl.get_link(c.bridge)
        if br is not None and br.kind == "bridge":
            for ln in nl.links():
                if ln.master == br.index and ln.kind == "veth" and ln.name.startswith("vethr") \
                        and ln.name not in keep:
                    nl.del_link(ln.index)
    run_ipam("GC", conf, raw, env, version)


def cmd_check(conf: dict[str, Any], raw: bytes, env: Env, version: str) -> None:
    c = parse_conf(conf, env.args)
    if not isinstance(conf.get("prevResult"), dict):
        raise CniError(E_PLUGIN, "Required prevResult missing")
    prev = parse_result(conf["prevResult"])
    run_ipam("CHECK", conf, raw, env, version)
    cifs = [i for i in prev.interfaces if i.get("sandbox")]
    if not cifs:
        raise CniError(E_PLUGIN, "prevResult has no container interface")
    want = cifs[0]
    ns_fd = _open_netns(env.netns)
    if ns_fd is None:
        raise CniError(E_PLUGIN, f'failed to open netns "{env.netns}"')
    try:
        cnl = open_in_netns(ns_fd)
    finally:
        os.close(ns_fd)
    with cnl:
        link = cnl.get_link(env.ifname)
        if link is None:
            raise CniError(E_PLUGIN, f"interface {env.ifname} not found in {env.netns}")
        if want.get("mac") and link.mac != want["mac"].lower():
            raise CniError(E_PLUGIN, f"interface {env.ifname} MAC {link.mac} differs from prevResult {want['mac']}")
        cmtu = container_mtu(c)
        if cmtu and link.mtu != cmtu:
            raise CniError(E_PLUGIN, f"interface {env.ifname} MTU {link.mtu}, expected {cmtu}")
        have = {f"{a.address}/{a.prefixlen}" for a in cnl.addrs(link.index)}
        for ip in prev.ips:
            if ":" not in ip["address"] and ip["address"] not in have:
                raise CniError(E_PLUGIN, f"address {ip['address']} missing on {env.ifname}")
        gw4 = next((ip.get("gateway") for ip in prev.ips if ":" not in ip["address"]), "") or ""
        routes = {(r.dst, r.gw) for r in cnl.routes() if r.oif == link.index}
        for r in prev.routes:
            if ":" in r["dst"]:
                continue
            key = (_norm_cidr(r["dst"]), r.get("gw") or gw4)
            if key not in routes:
                raise CniError(E_PLUGIN, f"route {r['dst']} via {key[1] or 'link'} missing in {env.netns}")
    with Netlink() as nl:
        br = nl.get_link(c.bridge)
        if br is None or br.kind != "bridge":
            raise CniError(E_PLUGIN, f"bridge {c.bridge} missing")
        hname = next((i["name"] for i in prev.interfaces if not i.get("sandbox") and i["name"] != c.bridge),
                     host_veth_name(env.container_id, env.ifname))
        host = nl.get_link(hname)
        if host is None or host.master != br.index:
            raise CniError(E_PLUGIN, f"host veth {hname} is not attached to {c.bridge}")
        hp = nl.hairpin(host.index)
        if hp is not None and hp != c.hairpin:
            raise CniError(E_PLUGIN, f"host veth {hname} hairpin mode is {hp}, expected {c.hairpin}")


def _norm_cidr(s: str) -> str:
    a, plen = _ipam.parse_cidr(s)
    return f"{_ipam.ntoa(_ipam.network_of(a, plen))}/{plen}"
