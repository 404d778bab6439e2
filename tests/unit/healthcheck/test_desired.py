"""desired.py: selection (healthcheck.md §2) and per-field validation, as tables."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from healthcheck.desired import (
    Check,
    desired_checks,
    desired_from_tree,
    parse_request_line,
)
from healthcheck.haproxy import HAProxySettings, render_config

H = "hostA"


def hc(port: int = 80, **kw: Any) -> dict[str, Any]:
    d = {"port": port, "interval": 2000, "response_timeout": 2000, "healthy_threshold": 2,
         "unhealthy_threshold": 3, "request_line": "GET /healthz HTTP/1.0", "strategy": "recreate",
         "initializing_timeout": 60000, "reinitializing_timeout": 60000,
         "recreate_on_quorum_strategy_config": {"quorum": 1}}
    d.update(kw)
    return d


def ctr(uuid: str, *, ip: str = "10.42.0.1", hosts: tuple[str, ...] = (H,), state: str = "running",
        start_count: Any = 1, check: Any = None, service: str = "", net_from: str | None = None) -> dict[str, Any]:
    return {"uuid": uuid, "name": uuid, "primary_ip": ip, "health_check_hosts": list(hosts), "state": state,
            "start_count": start_count, "health_check": check, "service_name": service,
            "network_from_container_uuid": net_from}


def svc(name: str, check: Any, containers: list[dict[str, Any]]) -> dict[str, Any]:
    for c in containers:
        c["service_name"] = name
    return {"name": name, "health_check": check, "containers": containers}


def names(services: list[Any], containers: list[Any] | None = None) -> list[str]:
    return [c.name for c in desired_checks(H, services, containers or []).checks]


SELECTION = [
    ("service check used", [svc("web", hc(), [ctr("c1")])], [], ["cattle-hostA_c1_1"]),
    ("service port 0 means no check", [svc("web", hc(0), [ctr("c1", check=hc(81))])], [], []),
    ("service without check", [svc("web", None, [ctr("c1", check=hc(81))])], [], []),
    ("other host", [svc("web", hc(), [ctr("c1", hosts=("hostB",))])], [], []),
    ("host compared case-insensitively", [svc("web", hc(), [ctr("c1", hosts=("HOSTA",))])], [],
     ["cattle-hostA_c1_1"]),
    ("stopped skipped", [svc("web", hc(), [ctr("c1", state="stopped")])], [], []),
    ("Starting kept", [svc("web", hc(), [ctr("c1", state="Starting")])], [], ["cattle-hostA_c1_1"]),
    ("no ip skipped", [svc("web", hc(), [ctr("c1", ip="")])], [], []),
    ("start count in the name", [svc("web", hc(), [ctr("c1", start_count=7)])], [], ["cattle-hostA_c1_7"]),
    ("standalone", [], [ctr("s1", check=hc(90))], ["cattle-hostA_s1_1"]),
    ("standalone without port", [], [ctr("s1", check=hc(0))], []),
    ("net-from owner in a service", [svc("web", hc(), [ctr("o1", ip="10.0.0.9", hosts=()),
                                                        ctr("k1", ip="", net_from="o1")])], [],
     ["cattle-hostA_k1_1"]),
    ("net-from owner standalone (fix)", [svc("web", hc(), [ctr("k1", ip="", net_from="s9")])],
     [ctr("s9", ip="10.0.0.8", hosts=())], ["cattle-hostA_k1_1"]),
    ("duplicates collapsed", [svc("a", hc(), [ctr("c1")]), svc("b", hc(), [ctr("c1")])], [],
     ["cattle-hostA_c1_1"]),
]


@pytest.mark.parametrize(("what", "services", "containers", "want"), SELECTION, ids=[s[0] for s in SELECTION])
def test_selection(what: str, services: list[Any], containers: list[Any], want: list[str]) -> None:
    assert names(services, containers) == want


def test_own_check_replaces_service_check_whole() -> None:
    own = {"port": 81, "request_line": ""}  # TCP, all zero: never merged with the service's
    d = desired_checks(H, [svc("web", hc(), [ctr("c1", check=own), ctr("c2")])], [])
    c1, c2 = d.checks
    assert (c1.port, c1.profile.mode, c1.interval, c1.rise, c1.fall, c1.profile.response_timeout) == (
        81, "tcp", 0, 0, 0, 0)
    assert (c2.port, c2.profile.mode, c2.interval, c2.rise, c2.fall) == (80, "http", 2000, 2, 3)
    assert c1.uuid == "hostA_c1_1"


def test_net_from_ip_resolved() -> None:
    d = desired_checks(H, [svc("web", hc(), [ctr("o1", ip="10.0.0.9", hosts=()), ctr("k1", ip="", net_from="o1")])],
                       [])
    assert d.checks[0].ip == "10.0.0.9"


def test_zero_means_haproxy_default_never_inter_0() -> None:
    d = desired_checks(H, [], [ctr("s1", check=hc(90, interval=0, response_timeout=0, healthy_threshold=0,
                                                     unhealthy_threshold=0))])
    c = d.checks[0]
    assert c.server_options() == "check port 90"
    cfg = render_config(HAProxySettings(state_dir="/x"), d.profiles, d.checks)
    assert "inter 0" not in cfg and "timeout check" not in cfg and "rise" not in cfg
    assert "server cattle-hostA_s1_1 10.42.0.1:90 check port 90\n" in cfg


BAD = [
    ("negative interval", {"interval": -1}, "interval"),
    ("negative port", {"port": -80}, "port"),
    ("port too large", {"port": 70000}, "port"),
    ("non-integer interval", {"interval": 1.5}, "interval"),
    ("string threshold", {"healthy_threshold": "2"}, "healthy_threshold"),
    ("bool threshold", {"unhealthy_threshold": True}, "unhealthy_threshold"),
    ("absurd interval", {"interval": 10**12}, "interval"),
    ("absurd timeout", {"response_timeout": 10**9}, "response_timeout"),
    ("absurd rise", {"healthy_threshold": 10**6}, "healthy_threshold"),
    ("raw CRLF injection", {"request_line": "GET / HTTP/1.0\r\n\r\nbackend evil"}, "control character"),
    ("raw LF config injection", {"request_line": "GET /\n    server x 1.2.3.4:1"}, "control character"),
    ("NUL", {"request_line": "GET /\x00"}, "control character"),
    ("quote", {"request_line": "GET /'x HTTP/1.0"}, "uri"),
    ("comment", {"request_line": "GET /#x HTTP/1.0"}, "uri"),
    ("bad version", {"request_line": "GET / HTTP/2"}, "version"),
    ("too many words", {"request_line": "GET / HTTP/1.0 extra"}, "METHOD URI"),
    ("bad header", {"request_line": "GET / HTTP/1.1\\r\\nno colon"}, "header"),
    ("request_line not a string", {"request_line": 5}, "string"),
    ("huge request line", {"request_line": "GET /" + "a" * 2000}, "longer"),
]


@pytest.mark.parametrize(("what", "fields", "reason"), BAD, ids=[b[0] for b in BAD])
def test_malformed_fields_reject_only_that_check(what: str, fields: dict[str, Any], reason: str) -> None:
    d = desired_checks(H, [svc("web", hc(), [ctr("good")])], [ctr("bad", check={**hc(90), **fields})])
    assert [c.container_uuid for c in d.checks] == ["good"]
    assert len(d.rejected) == 1 and d.rejected[0].container_uuid == "bad"
    assert reason in d.rejected[0].reason
    cfg = render_config(HAProxySettings(state_dir="/x"), d.profiles, d.checks)
    assert "bad" not in cfg and "evil" not in cfg


def test_malformed_start_count_and_uuid_rejected() -> None:
    d = desired_checks(H, [], [ctr("a_b", check=hc()), ctr("c", check=hc(), start_count=-1),
                               ctr("d", check=hc(), start_count="x")])
    assert d.checks == () and len(d.rejected) == 3


def test_health_check_not_an_object() -> None:
    d = desired_checks(H, [svc("web", {"port": 80}, [ctr("c1", check="junk")])], [])
    assert [c.name for c in d.checks] == ["cattle-hostA_c1_1"]  # own check has no port: the service's


REQUESTS = [
    ("GET /healthz HTTP/1.0", ("GET", "/healthz", "HTTP/1.0", ())),
    ("/ping", ("OPTIONS", "/ping", "HTTP/1.0", ())),
    ("HEAD /", ("HEAD", "/", "HTTP/1.0", ())),
    ("GET /x HTTP/1.1\\r\\nHost:\\ example", ("GET", "/x", "HTTP/1.1", (("Host", "example"),))),
    ("GET /x?a=1&b=%20 HTTP/1.1\\r\\nHost: a.b\\r\\nX-Y:\\ 1\\ 2",
     ("GET", "/x?a=1&b=%20", "HTTP/1.1", (("Host", "a.b"), ("X-Y", "1 2")))),
]


@pytest.mark.parametrize(("line", "want"), REQUESTS)
def test_request_lines(line: str, want: tuple[Any, ...]) -> None:
    r = parse_request_line(line)
    assert (r.method, r.uri, r.version, r.headers) == want


def test_render_http_profile_uses_http_check_send() -> None:
    d = desired_checks(H, [], [ctr("s1", check=hc(90, request_line="GET /x HTTP/1.1\\r\\nHost:\\ example"))])
    cfg = render_config(HAProxySettings(state_dir="/st"), d.profiles, d.checks, disabled={d.checks[0].name})
    b = d.checks[0].profile.backend
    assert f"backend {b}\n    mode http\n    balance roundrobin\n    option httpchk\n" \
           "    http-check send meth 'GET' uri '/x' ver 'HTTP/1.1' hdr 'Host' 'example'\n" \
           "    timeout check 2000\n" \
           "    server cattle-hostA_s1_1 10.42.0.1:90 check port 90 inter 2000 rise 2 fall 3 disabled\n" in cfg
    assert "stats socket /st/haproxy.sock mode 600 level admin" in cfg
    assert "bind" not in cfg and "daemon" not in cfg and "chroot" not in cfg and "user " not in cfg


def test_ipv6_bracketed() -> None:
    d = desired_checks(H, [], [ctr("s1", ip="fd00::5", check=hc(90))])
    assert d.checks[0].addr == "[fd00::5]:90"


def test_profiles_share_backends() -> None:
    d = desired_checks(H, [svc("web", hc(), [ctr("c1"), ctr("c2", ip="10.0.0.2")])],
                       [ctr("s1", check=hc(99, interval=500))])
    assert len(d.profiles) == 1  # interval/port live on the server, not the backend


def test_tree_without_self_host_is_unusable() -> None:
    with pytest.raises(ValueError):
        desired_from_tree({"services": [], "containers": []})
    with pytest.raises(ValueError):
        desired_from_tree({"self": {"host": {"uuid": H}}, "containers": {"not": "a list"}})
    d = desired_from_tree({"self": {"host": {"uuid": H}}, "services": [], "containers": [ctr("s", check=hc())]})
    assert len(d.checks) == 1


def test_deterministic_order_and_equality() -> None:
    a = [ctr(f"s{i}", check=hc(90 + i)) for i in range(5)]
    d1 = desired_checks(H, [], a)
    d2 = desired_checks(H, [], list(reversed(a)))
    assert d1 == d2 and [c.name for c in d1.checks] == sorted(c.name for c in d1.checks)
    assert isinstance(d1.checks[0], Check)


junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda s: st.lists(s, max_size=3) | st.dictionaries(st.text(max_size=8), s, max_size=4),
                    max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(["port", "interval", "response_timeout", "healthy_threshold",
                                                "unhealthy_threshold", "request_line"]), junk),
       line=st.text(max_size=60))
def test_any_input_gives_a_valid_check_or_a_rejection(fields: dict[str, Any], line: str) -> None:
    check = {"port": 80, **fields}
    if "request_line" not in fields:
        check["request_line"] = line
    d = desired_checks(H, [], [ctr("s1", check=check)])
    assert len(d.checks) + len(d.rejected) <= 1
    for c in d.checks:
        assert 1 <= c.port <= 65535 and c.interval >= 0 and c.rise >= 0 and c.fall >= 0
        cfg = render_config(HAProxySettings(state_dir="/x"), d.profiles, d.checks)
        body = cfg.split("defaults", 1)[1]
        for ln in body.splitlines():
            assert "\r" not in ln
        assert cfg.count("\nbackend ") == 1 and cfg.count("    server ") == 1


def test_check_networks_limit_targets() -> None:
    d = desired_checks(H, [], [ctr("lo", ip="127.0.0.5", check=hc(90)), ctr("far", ip="10.42.0.3", check=hc(90)),
                               ctr("v6", ip="::1", check=hc(90))], networks=("127.0.0.0/8", "::1/128"))
    assert sorted(c.container_uuid for c in d.checks) == ["lo", "v6"]
    assert [r.container_uuid for r in d.rejected] == ["far"] and "outside" in d.rejected[0].reason
