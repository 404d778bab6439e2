"""The public names of each healthcheck module are pinned: a change here is a deliberate API change."""

from __future__ import annotations

import argparse
import importlib

import pytest

PUBLIC = {
    "healthcheck.desired": ["Check", "Desired", "HttpRequest", "MAX_INTERVAL_MS", "MAX_THRESHOLD", "Profile",
                            "Rejected", "desired_checks", "desired_from_tree", "parse_request_line"],
    "healthcheck.haproxy": ["NO_ANSWER", "HAProxy", "HAProxySettings", "InvalidConfig", "StatRow", "StatsSocket",
                            "haproxy_version", "parse_cli_answers", "parse_stat_csv", "render_config"],
    "healthcheck.reports": ["Report", "Reporter", "Tracker", "reduce_row", "report_body", "report_dict"],
    "healthcheck.main": ["DEMO_HINTS", "demo_argv", "main", "parse_duration"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_exports(module: str) -> None:
    m = importlib.import_module(module)
    assert sorted(m.__all__) == sorted(PUBLIC[module])
    for name in m.__all__:
        assert hasattr(m, name), name


def test_parse_duration() -> None:
    from healthcheck.main import parse_duration

    assert [parse_duration(v) for v in ("2s", "200ms", "1m", "0.5")] == [2.0, 0.2, 60.0, 0.5]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("soon")
