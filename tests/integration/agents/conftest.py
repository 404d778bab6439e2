"""Fixtures of the shared-core integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.metadata import Metadata


@pytest.fixture
def md(tmp_path: Path) -> Iterator[Metadata]:
    """A real ``corral metadata`` serving version "1" with one container, web-1."""
    m = Metadata(tmp_path)
    m.write("1", ["web-1"])
    m.start()
    try:
        yield m
    finally:
        m.stop()
