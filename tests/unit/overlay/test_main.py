"""The command line and the router's handling of unusable metadata."""

from __future__ import annotations

import struct

import pytest

from netmanager.overlay import nl
from netmanager.overlay.main import build_parser, main, make_router


def test_unknown_backend_and_ipsec_are_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--backend", "wireguard", "--listen", "127.0.0.1:0"]) == 2
    assert "--backend must be one of vxlan or ipsec" in capsys.readouterr().out
    assert main(["--backend", "ipsec", "--listen", "127.0.0.1:0"]) == 2
    assert "IPsec backend is not built yet" in capsys.readouterr().out


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


def test_event_watch_reports_only_changes_to_the_vtep() -> None:
    seen: list[str] = []
    w = nl.EventWatch(lambda: 7, "vtep1042", seen.append)
    other_neigh = _msg(nl.RTM_DELNEIGH, nl._ND.pack(2, 3, 0, 0, 0))
    assert w._parse(other_neigh) == ""
    assert w._parse(_msg(nl.RTM_DELNEIGH, nl._ND.pack(7, 7, 0, 0, 0))) == "neighbour or fdb entry changed"
    route = nl._RT.pack(2, 32, 0, 0, 254, 3, 0, 1, 0) + nl._attr(nl.RTA_OIF, struct.pack("=I", 7))
    assert w._parse(_msg(nl.RTM_DELROUTE, route)) == "route changed"
    link = nl._IFI.pack(0, 1, 7, 0, 0)
    assert w._parse(_msg(nl.RTM_DELLINK, link)) == "vtep deleted or down"
    assert w._parse(_msg(nl.RTM_NEWLINK, nl._IFI.pack(0, 1, 7, 1, 0))) == ""  # up: nothing to repair
    assert w._parse(other_neigh + _msg(nl.RTM_DELNEIGH, nl._ND.pack(7, 7, 0, 0, 0))) != ""
