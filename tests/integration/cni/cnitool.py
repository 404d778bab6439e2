"""A small cnitool: run a CNI plugin (Corral's or the reference) with CNI_* env inside a
namespace that stands for the host, and read kernel state back with iproute2's JSON output."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.wait import until

ROOT = Path(__file__).resolve().parents[3]
REFERENCE = Path("/usr/lib/cni")


def build_bundle(dest: Path) -> Path:
    """The real package step: returns the bin/ directory of a fresh bundle."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("corral_cni_package", ROOT / "cni-plugins" / "package.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build(dest, "auto", network=None)  # type: ignore[no-any-return]


@dataclass
class Call:
    rc: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out) if self.out else None


def env_for(command: str, container_id: str, netns: str, ifname: str = "eth0", args: str = "",
            path: str = "", extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
           "CNI_CONTAINERID": container_id, "CNI_NETNS": netns, "CNI_IFNAME": ifname, "CNI_PATH": path}
    if args:
        env["CNI_ARGS"] = args
    env.update(extra or {})
    return {k: v for k, v in env.items() if v is not None}


def cni(plugin: str, host_ns: str, command: str, conf: dict[str, Any] | bytes, container_id: str = "",
        netns: str = "", ifname: str = "eth0", args: str = "", path: str = "",
        extra: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> Call:
    """Run ``plugin`` inside ``host_ns`` (nsenter: no /sys remount) and collect its output."""
    env = env_for(command, container_id, netns, ifname, args, path or str(Path(plugin).parent), extra)
    for d in drop:
        env.pop(d, None)
    data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    p = subprocess.run(["nsenter", f"--net=/run/netns/{host_ns}", plugin], input=data, capture_output=True,
                       env=env, check=False, timeout=60)
    return Call(p.returncode, p.stdout.decode(), p.stderr.decode())


def ip_json(ns: str, *args: str) -> Any:
    p = subprocess.run(["ip", "-n", ns, "-j", "-d", *args], capture_output=True, text=True, check=True)
    return json.loads(p.stdout or "[]")


def links(ns: str) -> dict[str, dict[str, Any]]:
    return {ln["ifname"]: ln for ln in ip_json(ns, "link", "show")}


def addrs(ns: str, dev: str) -> list[str]:
    out = []
    for ln in ip_json(ns, "addr", "show", "dev", dev):
        for a in ln.get("addr_info", []):
            if a["family"] == "inet":
                out.append(f"{a['local']}/{a['prefixlen']}")
    return out


def routes(ns: str) -> list[tuple[str, str, str]]:
    """(dst, gateway, dev) of the main table, kernel-generated subnet routes included."""
    return sorted((r["dst"], r.get("gateway", ""), r.get("dev", "")) for r in ip_json(ns, "route", "show"))


def sysctl(ns: str, name: str) -> str:
    p = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "cat", f"/proc/sys/{name.replace('.', '/')}"],
                       capture_output=True, text=True, check=True)
    return p.stdout.strip()


def normalised_state(host_ns: str, cont_ns: str, bridge: str, ifname: str = "eth0") -> dict[str, Any]:
    """Kernel state with veth names and MACs removed, for the differential test."""
    hl = links(host_ns)
    br = hl[bridge]
    ports = [ln for ln in hl.values() if ln.get("master") == bridge]
    c = links(cont_ns)[ifname]
    return {
        "bridge": {"kind": br["linkinfo"]["info_kind"], "mtu": br["mtu"], "up": "UP" in br["flags"],
                   "addrs": addrs(host_ns, bridge)},
        "ports": sorted((p["linkinfo"]["info_kind"], p["mtu"], "UP" in p["flags"],
                         p["linkinfo"]["info_slave_data"]["hairpin"]) for p in ports),
        "container": {"kind": c["linkinfo"]["info_kind"], "mtu": c["mtu"], "up": "UP" in c["flags"],
                      "addrs": addrs(cont_ns, ifname)},
        "container_routes": routes(cont_ns),
        "ip_forward": sysctl(host_ns, "net.ipv4.ip_forward"),
    }


# per-read values (timers) and names/indexes that differ between any two runs
_LINK_VOLATILE = {"ifindex", "ifname", "address", "linkinfo"}
_BRIDGE_TIMERS = {"gc_timer", "hello_timer", "tcn_timer", "topology_change_timer"}


def _mac_bytes(s: str) -> tuple[int, ...]:
    return tuple(int(x, 16) for x in s.split(":"))


def bridge_state(host_ns: str, bridge: str, result: dict[str, Any]) -> dict[str, Any]:
    """The bridge link as iproute2 shows it (``ip -d -j link``), every attribute kept except names,
    indexes and running timers. The MAC and the bridge/root ids are random per run, so what is
    compared is what they must be: a real unicast MAC, the one the result reports, and a bridge id
    of ``<priority>.<that MAC>`` (a bridge whose MAC was written back unchanged keeps the id
    ``8000.0:0:0:0:0:0`` and the operstate UNKNOWN)."""
    def settled() -> dict[str, Any] | None:
        br = links(host_ns)[bridge]
        # the operstate follows the carrier through the kernel's linkwatch, up to ~1 s later
        return br if br["operstate"] not in ("DOWN", "LOWERLAYERDOWN") else None

    br = until(settled, what=f"{bridge} operstate settled")
    mac = br["address"]
    info = dict(br["linkinfo"]["info_data"])
    for k in _BRIDGE_TIMERS:
        info.pop(k, None)
    for k in ("bridge_id", "root_id"):
        prio, _, addr = info[k].partition(".")
        info[k] = f"{prio}.<bridge mac>" if _mac_bytes(addr) == _mac_bytes(mac) else info[k]
    first = _mac_bytes(mac)[0]
    return {
        "link": {k: v for k, v in br.items() if k not in _LINK_VOLATILE},
        "kind": br["linkinfo"]["info_kind"],
        "info_data": info,
        "mac": {"unicast": not first & 1, "zero": not any(_mac_bytes(mac)),
                "in_result": result["interfaces"][0]["name"] == bridge
                and _mac_bytes(result["interfaces"][0]["mac"]) == _mac_bytes(mac)},
    }


def normalised_result(res: dict[str, Any]) -> dict[str, Any]:
    res = json.loads(json.dumps(res))
    for i in res.get("interfaces", []):
        i.pop("mac", None)
        if i.get("sandbox"):
            i["sandbox"] = "<netns>"
        if not i.get("sandbox") and i["name"].startswith("veth"):
            i["name"] = "<veth>"
    return res
