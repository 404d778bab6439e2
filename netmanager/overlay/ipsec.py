"""The IPsec backend's desired state, rancher-net's wire format (pure: no charon, no kernel).

Per remote host H (its underlay address ``agent_ip(H)``), one VICI connection ``conn-<agentIP>``
with one child ``child-<agentIP>``:

* IKE: version 2, ``local_addrs`` empty, ``remote_addrs [agent_ip(H)]``, proposals
  ``aes128gcm16-sha256-modp2048, aes-sha1-modp2048``, ``encap yes`` (UDP 4500 always: both ends
  sit behind NAT), ``dpd_delay 10s``, ``keyingtries 0``, PSK on both sides and no IDs (the IKE
  addresses are the identities, as the original's);
* CHILD: tunnel mode, ``local_ts``/``remote_ts 0.0.0.0/0``, ESP proposals
  ``aes128gcm16-modp2048, aes128-sha256-modp2048`` (the original sent a bare ``aes-modp2048``;
  we name its integrity algorithm), ``start_action``/``close_action start``, ``dpd_action
  restart``, ``policies no`` (the router owns the kernel policies), ``reqid 1234``, replay window
  1024;
* rekey: IKE every ``IPSEC_IKE_SA_REKEY_INTERVAL`` (4h), CHILD every
  ``IPSEC_CHILD_SA_REKEY_INTERVAL`` (1h), except on the host whose agent IP *string* compares
  greater, where both are 8760h, so only one side rekeys.

Beyond the original, one deterministic initiator per pair: the host with the smaller agent IP
string starts the SA (``start_action``/``close_action start``, ``dpd_action restart``); the other
side only responds (``none``/``none``/``clear``) and its adapter initiates itself only when no SA
came for a while. Kernel XFRM policies (kernel-ESP
mode), per remote IP w (routers included) on H, priority 10000, reqid 1234:
``out`` local subnet -> w/32 via ``esp tunnel <router IP> -> agent_ip(H)``; ``in`` and ``fwd``
w/32 -> local subnet via ``agent_ip(H) -> <router IP>``.

kernel-libipsec mode (no kernel ESP: charon does ESP in userspace through the TUN ``ipsec0``):
charon can only hold policies whose local selector contains an address of this host (it looks
one up for each outbound policy's route, and a container's /32 is not one), so the tunnel joins
the two *router IPs* only (``local_ts <router IP>/32``, ``remote_ts <peer router IP>/32``, ``policies
yes``), and the workloads travel inside it over VXLAN (rancher-net's VTEP, its FDB ``dst`` the
peer's router IP instead of its agent IP): VXLAN over IPsec. No kernel XFRM state or policy
exists in this mode, and each child gets its own reqid from charon, because libipsec picks the
outbound SA by reqid alone.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

__all__ = ["ESP_PROPOSALS", "IKE_PROPOSALS", "NO_REKEY", "PRIORITY", "REQID", "IpsecSettings", "Policy",
           "TopologyLike", "child_name", "conn_name", "connection", "desired_conns", "desired_policies",
           "filter_gcm", "initiator", "policy_diff", "psk_owners", "read_psk", "revision"]

IKE_PROPOSALS = ("aes128gcm16-sha256-modp2048", "aes-sha1-modp2048")
ESP_PROPOSALS = ("aes128gcm16-modp2048", "aes128-sha256-modp2048")
REQID = 1234
PRIORITY = 10000
NO_REKEY = "8760h"
IKE_PORT = 500
NAT_T_PORT = 4500


class TopologyLike(Protocol):
    """The fields of :class:`netmanager.overlay.peers.Topology` this module reads."""

    @property
    def router_ip(self) -> str: ...
    @property
    def agent_ip(self) -> str: ...
    @property
    def prefix(self) -> int: ...
    @property
    def routers(self) -> Mapping[str, str]: ...     # remote agent IP -> its router IP
    @property
    def workloads(self) -> Mapping[str, str]: ...   # remote workload IP -> agent IP
    @property
    def local(self) -> frozenset[str]: ...


@dataclass(frozen=True)
class IpsecSettings:
    """Tunables, named as rancher-net's environment variables."""

    ike_rekey: str = "4h"            # IPSEC_IKE_SA_REKEY_INTERVAL
    child_rekey: str = "1h"          # IPSEC_CHILD_SA_REKEY_INTERVAL
    replay_window: int = 1024        # IPSEC_REPLAY_WINDOW_SIZE
    gcm: bool = True                 # False: the aes128gcm16 proposals are filtered out
    libipsec: bool = False           # kernel-libipsec mode (see the module doc)
    ike_override: Mapping[str, Any] = field(default_factory=dict)    # ike.conf
    child_override: Mapping[str, Any] = field(default_factory=dict)  # childsa.conf

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, config_dir: str = "") -> IpsecSettings:
        """Read the variables (and ``ike.conf``/``childsa.conf`` from ``config_dir``); ValueError on bad ones."""
        e = os.environ if env is None else env
        window = e.get("IPSEC_REPLAY_WINDOW_SIZE") or "1024"
        if not window.isdigit() or not 0 <= int(window) <= 2**31:
            raise ValueError(f"IPSEC_REPLAY_WINDOW_SIZE must be a number of packets: {window!r}")
        ike = e.get("IPSEC_IKE_SA_REKEY_INTERVAL") or "4h"
        child = e.get("IPSEC_CHILD_SA_REKEY_INTERVAL") or "1h"
        for name, v in (("IPSEC_IKE_SA_REKEY_INTERVAL", ike), ("IPSEC_CHILD_SA_REKEY_INTERVAL", child)):
            if not _duration_ok(v):
                raise ValueError(f"{name} must be a duration like 90s, 30m, 4h or 1d: {v!r}")
        overrides = []
        for fname in ("ike.conf", "childsa.conf"):
            path = os.path.join(config_dir, fname) if config_dir else ""
            data: Mapping[str, Any] = {}
            if path and os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    try:
                        data = json.load(f)
                    except ValueError as err:
                        raise ValueError(f"{path}: not JSON: {err}") from err
                if not isinstance(data, dict):
                    raise ValueError(f"{path}: must be a JSON object of VICI keys")
            overrides.append(data)
        return cls(ike_rekey=ike, child_rekey=child, replay_window=int(window),
                   ike_override=overrides[0], child_override=overrides[1])


def _duration_ok(v: str) -> bool:
    v = v.strip()
    if v.isdigit():
        return True
    return len(v) > 1 and v[:-1].isdigit() and v[-1] in "smhd"


def conn_name(agent_ip: str) -> str:
    return f"conn-{agent_ip}"


def child_name(agent_ip: str) -> str:
    return f"child-{agent_ip}"


def filter_gcm(proposals: Iterable[str], gcm: bool) -> list[str]:
    """Without kernel GCM the original dropped every proposal starting with ``aes128gcm16``."""
    return [p for p in proposals if gcm or not p.startswith("aes128gcm16")]


def initiator(local_agent_ip: str, remote_agent_ip: str) -> bool:
    """True on the side that starts (and rekeys) the pair's SAs: the smaller agent IP *string*."""
    return local_agent_ip < remote_agent_ip


def local_subnet(router_ip: str, prefix: int) -> str:
    return str(ipaddress.IPv4Network(f"{router_ip}/{prefix}", strict=False))


def remote_ips_by_host(topo: TopologyLike) -> dict[str, list[str]]:
    """Remote agent IP -> its /32s (the router first, then its workloads, sorted)."""
    out: dict[str, list[str]] = {a: [] for a in topo.routers}
    for ip, a in topo.workloads.items():
        if a in out:
            out[a].append(ip)
    return {a: [topo.routers[a], *sorted(ips, key=_ip_key)] for a, ips in out.items()}


def _ip_key(ip: str) -> int:
    return int(ipaddress.IPv4Address(ip))


def connection(local_agent_ip: str, remote_agent_ip: str, settings: IpsecSettings, *,
               local_ts: str = "0.0.0.0/0", remote_ts: Iterable[str] = ("0.0.0.0/0",)) -> dict[str, Any]:
    """The VICI ``load-conn`` message for one remote host (``{conn-<ip>: {...}}``)."""
    rekeys = initiator(local_agent_ip, remote_agent_ip)
    child: dict[str, Any] = {
        "mode": "tunnel",
        "local_ts": [local_ts],
        "remote_ts": list(remote_ts),
        "esp_proposals": filter_gcm(ESP_PROPOSALS, settings.gcm),
        "start_action": "start" if rekeys else "none",
        "close_action": "start" if rekeys else "none",
        "dpd_action": "restart" if rekeys else "clear",
        "policies": "yes" if settings.libipsec else "no",
        "replay_window": str(settings.replay_window),
        "rekey_time": settings.child_rekey if rekeys else NO_REKEY,
    }
    if not settings.libipsec:
        child["reqid"] = str(REQID)
    child.update(settings.child_override)
    conn: dict[str, Any] = {
        "version": "2",
        "local_addrs": [],
        "remote_addrs": [remote_agent_ip],
        "proposals": filter_gcm(IKE_PROPOSALS, settings.gcm),
        "encap": "yes",
        "dpd_delay": "10s",
        "keyingtries": "0",
        "rekey_time": settings.ike_rekey if rekeys else NO_REKEY,
        "local": {"auth": "psk"},
        "remote": {"auth": "psk"},
    }
    conn.update(settings.ike_override)
    conn["children"] = {child_name(remote_agent_ip): child}
    return {conn_name(remote_agent_ip): conn}


def desired_conns(topo: TopologyLike, settings: IpsecSettings) -> dict[str, dict[str, Any]]:
    """Connection name -> its ``load-conn`` message, for every remote host with a router."""
    out: dict[str, dict[str, Any]] = {}
    if settings.libipsec:
        for agent, router in sorted(topo.routers.items()):
            out[conn_name(agent)] = connection(topo.agent_ip, agent, settings, local_ts=f"{topo.router_ip}/32",
                                               remote_ts=[f"{router}/32"])
    else:
        for agent in sorted(topo.routers):
            out[conn_name(agent)] = connection(topo.agent_ip, agent, settings)
    return out


def revision(msg: Mapping[str, Any]) -> str:
    """A stable digest of one ``load-conn`` message: an unchanged one is not loaded again."""
    return hashlib.sha1(json.dumps(msg, sort_keys=True).encode(), usedforsecurity=False).hexdigest()


def psk_owners(topo: TopologyLike) -> list[str]:
    """Owners of the environment's one PSK: ``%any``, every peer router IP and every remote agent IP."""
    routers = sorted(set(topo.routers.values()), key=_ip_key)
    agents = sorted(topo.routers, key=_ip_key)
    return ["%any", *routers, *agents]


def read_psk(env: Mapping[str, str] | None = None, *, path: str = "") -> str:
    """``RANCHER_IPSEC_PSK`` when set, else the first line of ``path`` (the server's copy); '' when neither."""
    e = os.environ if env is None else env
    if e.get("RANCHER_IPSEC_PSK"):
        return e["RANCHER_IPSEC_PSK"]
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return ""


@dataclass(frozen=True, order=True)
class Policy:
    """One kernel XFRM policy as rancher-net keys it: ``dir-src-dst-tmplSrc-tmplDst-reqid``."""

    dir: str
    src: str
    dst: str
    tmpl_src: str
    tmpl_dst: str
    reqid: int = REQID
    priority: int = PRIORITY

    @property
    def key(self) -> str:
        return f"{self.dir}-{self.src}-{self.dst}-{self.tmpl_src}-{self.tmpl_dst}-{self.reqid}"

    def ip_args(self) -> list[str]:
        """``ip xfrm policy add`` arguments (without the verb)."""
        return ["src", self.src, "dst", self.dst, "dir", self.dir, "priority", str(self.priority),
                "tmpl", "src", self.tmpl_src, "dst", self.tmpl_dst, "proto", "esp", "reqid", str(self.reqid),
                "mode", "tunnel"]

    def with_priority(self, priority: int) -> Policy:
        return replace(self, priority=priority)


def desired_policies(topo: TopologyLike, settings: IpsecSettings | None = None) -> set[Policy]:
    """The kernel-ESP mode's policies: 3 per remote IP; none in kernel-libipsec mode."""
    if settings is not None and settings.libipsec:
        return set()
    subnet = local_subnet(topo.router_ip, topo.prefix)
    me = topo.router_ip
    out: set[Policy] = set()
    for agent, ips in remote_ips_by_host(topo).items():
        for ip in ips:
            w = f"{ip}/32"
            out.add(Policy("out", subnet, w, me, agent))
            out.add(Policy("in", w, subnet, agent, me))
            out.add(Policy("fwd", w, subnet, agent, me))
    return out


def policy_diff(current: Iterable[Policy], desired: Iterable[Policy]) -> tuple[list[Policy], list[Policy]]:
    """(to add, to delete), keyed as rancher-net keys them (priority changes count as a change)."""
    cur = {(p.key, p.priority): p for p in current}
    want = {(p.key, p.priority): p for p in desired}
    add = sorted(p for k, p in want.items() if k not in cur)
    delete = sorted(p for k, p in cur.items() if k not in want)
    return add, delete
