"""The shared test helpers: condition waits, and CI=true turning a missing tool's skip into a failure."""

from __future__ import annotations

import pytest

from tests.conftest import _required_in_ci
from tests.helpers import wait
from tests.helpers.wait import eventually, until


def skipped(reason: str) -> pytest.TestReport:
    return pytest.TestReport("t::x", ("t", 1, "x"), {}, "skipped", ("t", 1, f"Skipped: {reason}"), "call")


@pytest.mark.parametrize("ci,reason,required", [
    ("true", "dnsmasq not installed", True), ("true", "needs root and iproute2 (network namespaces)", True),
    ("true", "no IPv6 loopback", False), ("true", "no cgroup mount on this machine (runc create failed: ...)", False),
    ("", "dnsmasq not installed", False),
])
def test_a_missing_tool_fails_only_with_ci(monkeypatch: pytest.MonkeyPatch, ci: str, reason: str,
                                           required: bool) -> None:
    monkeypatch.setenv("CI", ci)
    assert bool(_required_in_ci(skipped(reason))) is required


def test_until_returns_the_value_and_names_what_never_came(monkeypatch: pytest.MonkeyPatch) -> None:
    box = iter([0, 0, 7])
    assert until(lambda: next(box), interval=0) == 7
    monkeypatch.setattr(wait, "DEFAULT_WAIT", 0.0)
    with pytest.raises(AssertionError, match="the moon never became true"):
        until(lambda: False, what="the moon", timeout=0, interval=0)


def test_a_callers_timeout_only_lengthens_the_wait() -> None:
    assert wait.patience(None) == wait.DEFAULT_WAIT
    assert wait.patience(1) == wait.DEFAULT_WAIT
    assert wait.patience(wait.DEFAULT_WAIT + 5) == wait.DEFAULT_WAIT + 5


async def test_eventually_awaits_coroutine_conditions() -> None:
    n = {"calls": 0}

    async def cond() -> int:
        n["calls"] += 1
        return n["calls"] if n["calls"] == 3 else 0

    assert await eventually(cond, interval=0) == 3
