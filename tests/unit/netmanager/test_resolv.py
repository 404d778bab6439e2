"""resolv.conf rewriting for the label combinations (no root)."""

from __future__ import annotations

import pytest

from netmanager.resolv import render_resolv, wants_resolv
from tests.unit.netmanager.test_desired import check_golden

MD = "169.254.169.250"
DOCKER = "search example.com\nnameserver 8.8.8.8\noptions ndots:0\n"
CASES = {
    "plain": {"io.rancher.container.network": "true", "io.rancher.stack_service.name": "App/Web"},
    "priority_none": {"io.rancher.container.network": "true", "io.rancher.stack_service.name": "app/web",
                      "io.rancher.container.dns.priority": "None"},
    "service_last": {"io.rancher.cni.network": "ipsec", "io.rancher.stack_service.name": "app/web",
                     "io.rancher.container.dns.priority": "service_last"},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    out = render_resolv(DOCKER, metadata_ip=MD, labels=CASES[name], dns_search=["corp.local"])
    check_golden(f"resolv.{name}", out)
    assert render_resolv(out, metadata_ip=MD, labels=CASES[name], dns_search=["corp.local"]) == out


def test_no_search_line_and_metadata_nameserver_kept() -> None:
    out = render_resolv(f"nameserver {MD}\n", metadata_ip=MD, labels={})
    assert out == f"nameserver {MD}\nsearch rancher.internal\n"


def test_wants() -> None:
    assert wants_resolv({"io.rancher.container.network": "true"})
    assert wants_resolv({"io.rancher.cni.network": "x"})
    assert not wants_resolv({"io.rancher.cni.network": "x", "io.rancher.container.dns": "false"})
    assert not wants_resolv({})
