"""Fixtures for the CNI integration tests: a packaged plugin bundle and throw-away namespaces."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.netns import HAS_IP, IS_ROOT, netns, sh

from .cnitool import build_bundle


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    """Every test here uses network namespaces (a conftest's pytestmark would not apply)."""
    if not (IS_ROOT and HAS_IP):
        pytest.skip("needs root and iproute2 (network namespaces)")


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("cni-bundle"))


@pytest.fixture
def host_ns() -> Iterator[str]:
    """Stands for the root namespace: the bridge and host veth ends live here."""
    with netns("cnih") as ns:
        yield ns


class Containers:
    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()

    def new(self) -> str:
        return self.stack.enter_context(netns("cnic"))


@pytest.fixture
def containers() -> Iterator[Containers]:
    c = Containers()
    with c.stack:
        yield c


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "ipam"
    yield d
    shutil.rmtree(d, ignore_errors=True)


__all__ = ["Containers", "sh"]
