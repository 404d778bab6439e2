"""Shared fixtures. Integration fixtures start real processes; see tests/helpers/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYTHONPATH", str(ROOT))

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from tests.helpers.tools import MISSING_TOOL_WORDS, in_ci  # noqa: E402

# The fuzz tests draw the same examples on every run by default, so a CI run is reproducible;
# HYPOTHESIS_PROFILE=explore draws fresh random examples on each run, to hunt for new bugs.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

pytest_plugins = ["tests.helpers.fixtures"]


def _required_in_ci(rep: pytest.CollectReport | pytest.TestReport) -> str:
    """The skip reason when ``rep`` is a skip for something scripts/setup.sh provides and CI=true."""
    if not (rep.skipped and in_ci() and not hasattr(rep, "wasxfail")):
        return ""
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    return reason if any(w in reason for w in MISSING_TOOL_WORDS) else ""


def _fail(rep: pytest.CollectReport | pytest.TestReport, reason: str) -> None:
    rep.outcome = "failed"
    rep.longrepr = f"CI=true: {reason} - scripts/setup.sh provides it, so it is required, not skipped"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if reason := _required_in_ci(rep):
        _fail(rep, reason)
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if reason := _required_in_ci(rep):
        _fail(rep, reason)
    return None
