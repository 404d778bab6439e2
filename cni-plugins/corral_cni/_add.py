"""ADD (cni.md §3, kernel outcome of the original, CNI ≥0.3 strictness for new versions):
config → open netns → interface-exists check → bridge (create/reuse, up, promisc, address) →
IPAM (in-process for Corral's own IPAM; exec'd from CNI_PATH otherwise) → veth pair, created
with its peer directly in the container namespace (name, MAC and container MTU set at creation) →
host end enslaved + up + hairpin → container side: up, address, routes → gateway address and
ip_forward → ipMasq → result. Anything failing after IPAM or the veth undoes both (and the bridge
when this call created it and nothing else joined it).
"""

from __future__ import annotations

from . import _ipam
from . import _os as os
from ._bridge import (
    OWN_IPAM,
    BridgeConf,
    bridge_address,
    container_mtu,
    host_veth_name,
    open_netns,
    parse_conf,
    plan_ips,
    run_ipam,
)
from ._netlink import Link, Netlink, NetlinkError, open_in_netns
from ._proto import E_PLUGIN, LEGACY, CniError, Env, Result

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


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
    ns_fd = open_netns(env.netns)
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
            from . import _masq

            _masq.setup_masq(c.name, env.container_id, nets)
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
            from . import _masq

            _masq.teardown_masq(c.name, env.container_id)  # the chain is this container's own
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
