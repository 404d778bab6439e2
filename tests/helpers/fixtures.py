"""pytest fixtures shared by every package's tests (registered from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.helpers.standin import StandIn


@pytest.fixture
def standin() -> Iterator[StandIn]:
    """A real ``corral server`` process on free ports with a temp SQLite db, an admin key and an
    agent key (agentId "1", hostUuid "host-a-uuid"). Empty environment (only the default networks)."""
    s = StandIn()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def standin_factory() -> Iterator[Callable[..., StandIn]]:
    """``standin_factory(**StandIn kwargs)`` -> a started StandIn, closed at the end of the test."""
    made: list[StandIn] = []

    def make(**kw: Any) -> StandIn:
        s = StandIn(**kw)
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.close()
