"""The dns package's public names are pinned (style guide: small, explicit surface)."""

from __future__ import annotations

import importlib

import pytest

EXPORTS = {
    "dns.table": {"ZONE", "Rec", "Resolved", "Settings", "Table", "View", "build", "build_from_answers", "resolve",
                  "reverse_name"},
    "dns.answer": {"ASKED", "FORWARD", "NOT_READY", "Prepared", "Upstream", "decide", "prepare"},
    "dns.wire": {"ANY", "FORMERR", "NOERROR", "NOTIMP", "NXDOMAIN", "OPT", "REFUSED", "SERVFAIL", "Query", "Scan",
                 "WireError", "error_reply", "make_opt", "parse_query", "scan"},
    "dns.cache": {"Cache", "Entry", "Key"},
    "dns.forward": {"Upstreams", "parse_addr"},
    "dns.server": {"CHAIN", "Engine", "Listener", "Slow"},
    "dns.rebuild": {"Diff", "FetchError", "apply", "build_diff", "diff", "helper_build", "helper_init"},
    "dns.main": {"DEMO_HINTS", "build_parser", "demo_argv", "main"},
    "dns.batch": {"BatchReader", "available"},
    "dns.workers": {"Supervisor", "merge_metrics", "reload_listener", "write_ports"},
}


@pytest.mark.parametrize("mod", sorted(EXPORTS))
def test_exports(mod: str) -> None:
    m = importlib.import_module(mod)
    assert set(m.__all__) == EXPORTS[mod]
    for name in m.__all__:
        assert hasattr(m, name), f"{mod}.{name}"

