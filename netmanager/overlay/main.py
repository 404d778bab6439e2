"""``corral overlay``: the cross-host router (rancher-net compatible VXLAN), one per host."""

from __future__ import annotations

import argparse
import os
from typing import Any
from urllib.parse import urlsplit

from agents.cli import run_daemon
from agents.config import add_common_args, duration_arg, int_arg, listen_arg, make_parser
from agents.errors import ConfigError
from agents.metadata_watch import add_watch_args

__all__ = ["build_parser", "main"]

API_VERSION = "2015-12-19"


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("corral overlay", "cross-host overlay router (rancher-net wire format)")
    p.add_argument("--backend", default=os.environ.get("RANCHER_NET_BACKEND") or "vxlan",
                   help="vxlan or ipsec (env RANCHER_NET_BACKEND)")
    p.add_argument("--listen", default="0.0.0.0:8111", type=listen_arg,
                   help="/ping, /v1/reload, /connectivity, /metrics, /healthz, /ready")
    p.add_argument("--metadata-address", default=os.environ.get("RANCHER_METADATA_ADDRESS") or "169.254.169.250",
                   help="metadata host[:port] (env RANCHER_METADATA_ADDRESS)")
    p.add_argument("--metadata-url", default="", help="full metadata URL, e.g. http://169.254.169.250/2015-12-19; "
                   "overrides --metadata-address")
    p.add_argument("--vxlan-vtep-mtu", type=int_arg(0, 65535), default=int(os.environ.get("VXLAN_VTEP_MTU") or 0),
                   help="VTEP MTU (env VXLAN_VTEP_MTU); 0: the underlay route's MTU minus 50")
    p.add_argument("--bridge", default=os.environ.get("DOCKER_BRIDGE", "docker0"),
                   help="host-netns mode: the containers' bridge (proxy ARP, gateway masquerade); "
                   "'' for a router in its own container netns")
    p.add_argument("--gateway", default="", help="container-netns mode: the bridge gateway to masquerade")
    p.add_argument("--host-subnet-prefix", type=int_arg(0, 32), default=0,
                   help="vxlan: per-host-subnet mode, one route '<router IP>/N via <router IP>' for a host whose "
                   "/N holds only its own containers; 0: a /32 route and neighbour per container")
    p.add_argument("--debounce", type=duration_arg, default=0.2, help="wait this long for a burst of changes")
    p.add_argument("--resync-interval", type=duration_arg, default=60.0, help="full resync period")
    p.add_argument("--verify-interval", type=duration_arg, default=10.0,
                   help="read the kernel back this often (netlink events repair at once)")
    p.add_argument("--probe-interval", type=duration_arg, default=5.0, help="probe every peer router this often")
    p.add_argument("--probe-misses", type=int_arg(1, 100), default=3, help="missed probes before re-programming")
    p.add_argument("--netns", default="", help="run inside this named network namespace (tests)")
    add_watch_args(p, state_file="/var/lib/rancher/state/corral/overlay-metadata.json")
    add_common_args(p, metrics_listen="")
    return p


def metadata_base(args: argparse.Namespace) -> tuple[str, str]:
    """(base URL, API version): netmanager's rules, with rancher-net's ``2015-12-19`` as the default."""
    from netmanager.main import _metadata_base

    url, version = _metadata_base(args)
    if not urlsplit(args.metadata_url).path.strip("/"):
        version = API_VERSION
    return url, version


def make_router(args: argparse.Namespace) -> Any:
    from netmanager.overlay import BACKENDS
    from netmanager.overlay.router import Router

    if args.backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {' or '.join(BACKENDS)}: {args.backend!r}")
    url, version = metadata_base(args)
    backend = BACKENDS[args.backend](mtu=args.vxlan_vtep_mtu, host_mode=bool(args.bridge),
                                     resync_after=args.resync_interval, subnet_prefix=args.host_subnet_prefix)
    return Router(args, backend, metadata_url=url, api_version=version)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.netns:
            from netmanager.main import enter_netns

            enter_netns(args.netns)
        router = make_router(args)
    except (ConfigError, OSError) as e:
        print(f"overlay: {e}", flush=True)
        return 2
    return run_daemon("overlay", router.serve, debug=args.debug, log_file=args.log, log_json=args.log_json,
                      pid_file=args.pid_file)
