"""Backend choice, the way kube-proxy's wrapper picks it (no root)."""

from __future__ import annotations

import pytest

from agents.errors import ConfigError
from netmanager.iptables import Backend, choose_backend

DOCKER_NAT = "*nat\n:PREROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n-A PREROUTING -j DOCKER\nCOMMIT\n"
EMPTY = "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"
OTHER = "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j ACCEPT\n-A PREROUTING -j RETURN\nCOMMIT\n"


def test_docker_chains_win() -> None:
    assert choose_backend({"legacy": DOCKER_NAT, "nft": OTHER}, "nft") == "legacy"
    assert choose_backend({"legacy": EMPTY, "nft": DOCKER_NAT}, "legacy") == "nft"


def test_more_rules_then_default() -> None:
    assert choose_backend({"legacy": OTHER, "nft": EMPTY}, "nft") == "legacy"
    assert choose_backend({"legacy": EMPTY, "nft": EMPTY}, "nft") == "nft"
    assert choose_backend({"legacy": DOCKER_NAT, "nft": DOCKER_NAT}, "legacy") == "legacy"


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        Backend.named("ebpf")
