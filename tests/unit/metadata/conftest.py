"""Shared data for the metadata unit tests: the spec's §8 answer set."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from metadata.store import Snapshot, build

EXAMPLE = Path(__file__).with_name("example.jsonl")


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


@pytest.fixture(scope="session")
def example_bytes() -> bytes:
    return EXAMPLE.read_bytes()


@pytest.fixture(scope="session")
def snap(example_bytes: bytes) -> Snapshot:
    return build(deflate(example_bytes))
