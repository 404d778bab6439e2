"""The server-side health aggregation rule and reporter-host choice (healthcheck.md §1)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from standin.health import aggregate, apply_report, parse_healthcheck_uuid, pick_reporters


def test_reporters_avoid_own_host_and_cap_at_three() -> None:
    hosts = [f"h{i}" for i in range(6)]
    r = pick_reporters(1, "c1", "h0", hosts)
    assert len(r) == 3 and "h0" not in r and set(r) <= set(hosts)
    assert pick_reporters(1, "c1", "h0", hosts) == r  # seeded: stable
    assert pick_reporters(1, "c1", "h0", ["h0"]) == ["h0"]  # only host: itself
    assert pick_reporters(1, "c1", "h0", ["h0", "h1"]) == ["h1"]
    assert pick_reporters(1, "c1", "h0", []) == []


def test_reporters_spread_over_hosts() -> None:
    hosts = [f"h{i}" for i in range(8)]
    seen = set()
    for i in range(50):
        seen.update(pick_reporters(3, f"c{i}", None, hosts))
    assert len(seen) == 8


def test_reporters_are_stable_when_hosts_come_and_go() -> None:
    hosts = [f"h{i}" for i in range(6)]
    before = {f"c{i}": pick_reporters(5, f"c{i}", "h0", hosts) for i in range(200)}
    after = {c: pick_reporters(5, c, "h0", [*hosts, "h-new"]) for c in before}
    for c in before:
        if "h-new" not in after[c]:
            assert after[c] == before[c]  # only sets the new host ranks into change
    assert sum(before[c] != after[c] for c in before) < 120  # ~3/6 expected, not all
    gone = {c: pick_reporters(5, c, "h0", [h for h in hosts if h != "h3"]) for c in before}
    for c in before:
        if "h3" not in before[c]:
            assert gone[c] == before[c]


@given(st.lists(st.text(min_size=1, max_size=5), max_size=10, unique=True), st.integers(), st.text(max_size=8))
def test_reporters_properties(hosts: list[str], seed: int, own: str) -> None:
    r = pick_reporters(seed, "c", own, hosts)
    assert len(r) == min(3, len([h for h in hosts if h != own]) or len(hosts))
    assert len(set(r)) == len(r)
    if any(h != own for h in hosts):
        assert own not in r


def test_parse_healthcheck_uuid() -> None:
    assert parse_healthcheck_uuid("hostA_ctr-1_3") == ("hostA", "ctr-1", 3)
    assert parse_healthcheck_uuid("cattle-hostA_ctr-1_3") == ("hostA", "ctr-1", 3)
    assert parse_healthcheck_uuid("9f1c-aa_b2-c3_1") == ("9f1c-aa", "b2-c3", 1)
    for bad in ("", "nounderscore", "a_b", "a_b_x", "_b_1", "a__1"):
        assert parse_healthcheck_uuid(bad) is None, bad


def test_init_and_stale_reports_are_not_stored() -> None:
    r, ok = apply_report({}, "h1", 10, "INIT")
    assert not ok and r == {}
    r, ok = apply_report({}, "h1", 10, "DOWN")
    assert ok and r == {"h1": (10, "DOWN")}
    r2, ok = apply_report(r, "h1", 9, "UP")
    assert not ok and r2 == r
    r3, ok = apply_report(r, "h1", 10, "UP")
    assert ok and r3["h1"] == (10, "UP")


@pytest.mark.parametrize(("current", "reports", "active", "expected"), [
    ("initializing", {}, ["h1"], "initializing"),
    ("initializing", {"h1": (1, "DOWN")}, ["h1"], "initializing"),   # unhealthy ignored while initializing
    ("initializing", {"h1": (1, "UP")}, ["h1"], "healthy"),
    ("healthy", {"h1": (1, "DOWN"), "h2": (1, "UP")}, ["h1", "h2"], "healthy"),  # any UP keeps it healthy
    ("healthy", {"h1": (1, "DOWN"), "h2": (1, "DOWN 1/2")}, ["h1", "h2"], "unhealthy"),
    ("healthy", {"h1": (1, "DOWN"), "h2": (1, "UP")}, ["h1"], "unhealthy"),  # h2 no longer a reporter
    ("unhealthy", {"h1": (1, "UP")}, ["h1", "h2"], "healthy"),
    ("healthy", {"h9": (1, "DOWN")}, ["h1"], "healthy"),  # reports from non-reporters count for nothing
])
def test_aggregate(current: str, reports: dict[str, tuple[float, str]], active: list[str], expected: str) -> None:
    assert aggregate(current, reports, active) == expected
