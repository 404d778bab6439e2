"""The command line and the router's handling of unusable metadata."""

from __future__ import annotations

import socket
import struct

import pytest

from netmanager.overlay import nl
from netmanager.overlay.main import build_parser, main, make_router


def test_unknown_backend_and_ipsec_are_clear_errors(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["--backend", "wireguard", "--listen", "127.0.0.1:0"]) == 2
    assert "--backend must be one of vxlan or ipsec" in capsys.readouterr().out
    monkeypatch.setenv("IPSEC_REPLAY_WINDOW_SIZE", "lots")
    assert main(["--backend", "ipsec", "--listen", "127.0.0.1:0"]) == 2
    assert "IPSEC_REPLAY_WINDOW_SIZE must be a number" in capsys.readouterr().out


def test_backend_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANCHER_NET_BACKEND", "vxlan")
    assert build_parser().parse_args([]).backend == "vxlan"


@pytest.mark.parametrize("argv", [["--listen", "nope:port"], ["--vxlan-vtep-mtu", "-1"], ["--probe-misses", "0"]])
def test_bad_flags_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2


def test_bad_metadata_url() -> None:
    from agents.errors import ConfigError

    args = build_parser().parse_args(["--metadata-url", "ftp://x"])
    with pytest.raises(ConfigError, match="--metadata-url"):
        make_router(args)


def test_unusable_tree_keeps_the_last_good_topology() -> None:
    from types import MappingProxyType

    from agents.metadata_watch import MetadataSnapshot
    from tests.unit.overlay.trees import host, router, tree, workload

    r = make_router(build_parser().parse_args(["--listen", "127.0.0.1:0"]))
    good = tree(1, [host(1), host(2)], [router(1), router(2), workload(2)])
    r.on_snapshot(MetadataSnapshot("1", MappingProxyType(good)))
    assert r.loop.current is not None and r.loop.current.routers == {"192.0.2.2": "10.42.2.2"}
    r.on_snapshot(MetadataSnapshot("2", MappingProxyType({"self": {}})))
    assert r.loop.current.routers == {"192.0.2.2": "10.42.2.2"}


def _msg(t: int, body: bytes) -> bytes:
    return nl._HDR.pack(16 + len(body), t, 0, 0, 0) + body


def _neigh(t: int, fam: int, idx: int, state: int, dst: str, mac: str) -> bytes:
    body = nl._ND.pack(fam, idx, state, 0, 0) + nl._attr(nl.NDA_DST, socket.inet_aton(dst))
    return _msg(t, body + nl._attr(nl.NDA_LLADDR, bytes.fromhex(mac.replace(":", ""))))


def _route(t: int, dst: str, idx: int) -> bytes:
    body = nl._RT.pack(2, 32, 0, 0, 254, 3, 0, 1, 0) + nl._attr(nl.RTA_DST, socket.inet_aton(dst)) \
        + nl._attr(nl.RTA_OIF, struct.pack("=I", idx))
    return _msg(t, body)


def test_events_tell_our_writes_from_outside_changes() -> None:
    from netmanager.overlay.vxlan import VxlanBackend, VxlanState

    b = VxlanBackend()
    b.ifindex = 7
    mac = "0e:00:0a:2a:02:02"
    b.cache = VxlanState(fdb=frozenset({(mac, "192.0.2.2")}), neigh={"10.42.2.10": mac},
                         routes=frozenset({"10.42.2.10/32"}))
    seen: list[str] = []
    w = b.watch(seen.append)
    P, INET, BR = nl.NUD_PERMANENT, socket.AF_INET, nl.AF_BRIDGE
    # Our own writes (they match what was programmed) and other devices: nothing to do.
    for quiet in (_neigh(nl.RTM_NEWNEIGH, INET, 7, P, "10.42.2.10", mac),
                  _neigh(nl.RTM_NEWNEIGH, BR, 7, P, "192.0.2.2", mac),
                  _neigh(nl.RTM_DELNEIGH, INET, 7, P, "10.42.9.9", mac),       # we deleted it
                  _neigh(nl.RTM_NEWNEIGH, INET, 7, 0x01, "10.42.9.9", mac),    # l3miss probe, not ours
                  _neigh(nl.RTM_DELNEIGH, INET, 3, P, "10.42.2.10", mac),      # another device
                  _route(nl.RTM_NEWROUTE, "10.42.2.10", 7), _route(nl.RTM_DELROUTE, "10.42.9.9", 7),
                  _msg(nl.RTM_NEWLINK, nl._IFI.pack(0, 1, 7, 1, 0))):
        assert w.parse(quiet) == "" and b.cache is not None
    for loud, why in ((_neigh(nl.RTM_DELNEIGH, INET, 7, P, "10.42.2.10", mac), "neighbour removed"),
                      (_neigh(nl.RTM_NEWNEIGH, INET, 7, P, "10.42.2.10", "0e:00:00:00:00:01"), "neighbour changed"),
                      (_neigh(nl.RTM_DELNEIGH, BR, 7, P, "192.0.2.2", mac), "fdb entry removed"),
                      (_neigh(nl.RTM_NEWNEIGH, BR, 7, P, "192.0.2.9", mac), "stray fdb entry"),
                      (_route(nl.RTM_DELROUTE, "10.42.2.10", 7), "route removed"),
                      (_route(nl.RTM_NEWROUTE, "10.42.9.9", 7), "stray route"),
                      (_msg(nl.RTM_DELLINK, nl._IFI.pack(0, 1, 7, 0, 0)), "vtep deleted or down")):
        saved = b.cache
        assert w.parse(loud) == why
        assert b.cache is None  # the next apply reads the kernel back
        b.cache = saved


def test_lost_events_mean_read_the_kernel_back() -> None:
    from netmanager.overlay.vxlan import VxlanBackend, VxlanState

    b = VxlanBackend()
    b.cache = VxlanState()
    seen: list[str] = []
    w = b.watch(seen.append)
    w.on_change(nl.OVERFLOW)
    assert seen == [nl.OVERFLOW] and b.cache is None


def test_apply_errors_from_either_backend_shape() -> None:
    """VXLAN reports failed entries on its result's ``errors``; IPsec returns the list itself: both
    must reach the router's loop as a failure (before, the IPsec list was ignored and never retried)."""
    from types import SimpleNamespace

    from netmanager.overlay.router import apply_errors

    assert apply_errors(["conn-10.0.0.2: load-conn refused"]) == ["conn-10.0.0.2: load-conn refused"]
    assert apply_errors([]) == []
    assert apply_errors(SimpleNamespace(errors=["fdb 0e:00:0a:2a:01:02: EINVAL"])) == ["fdb 0e:00:0a:2a:01:02: EINVAL"]
    assert apply_errors(SimpleNamespace(errors=[])) == []
    assert apply_errors(None) == []
