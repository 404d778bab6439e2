"""Lookup rules (§2.4), negotiation (§2.6), the version matrix (§3) and rendering details."""

from __future__ import annotations

import pytest

from metadata.lookup import clean_path, respond
from metadata.render import negotiate, render_json, render_text, text_scalar
from metadata.store import Snapshot, build, load_answers_bytes

from .conftest import deflate


def get(snap: Snapshot, path: str, fmt: str = "text", ip: str = "127.0.0.1") -> tuple[int, bytes]:
    r, _ = respond(snap, path, "", fmt, ip)
    return r.status, r.body


@pytest.mark.parametrize(("path", "status", "body"), [
    ("/latest/containers/0/name", 200, b"shop-db-1"),
    ("/latest/containers/01/name", 200, b"shop-web-1"),
    ("/latest/containers/+2/name", 200, b"shop-web-log-tail-1"),
    ("/latest/containers/-1/name", 404, b"Not found\n"),
    ("/latest/containers/3/name", 404, b"Not found\n"),
    ("/latest/containers/ctr-web-1/name", 200, b"shop-web-1"),  # by uuid
    ("/latest/containers/SHOP-WEB-1/name", 200, b"shop-web-1"),  # lower-case retry
    ("/latest/services/WEB/name", 200, b"web"),
    ("/2015-12-19/services/web", 404, b"Not found\n"),  # names kept as sent there
    ("/2015-12-19/services/Web/name", 200, b"Web"),
    ("/latest/containers/", 200, b"0=shop-db-1\n1=shop-web-1\n2=shop-web-log-tail-1\n"),
    ("/latest/containers///", 301, b""),
    ("/latest/containers/shop-web-1/labels/io.rancher.stack_service.name", 200, b"Shop/Web"),
    ("/latest/containers/shop-web-1/name/x", 404, b"Not found\n"),  # descending into a scalar
    ("/latest/containers/shop-web-1/start_count", 200, b"1"),
    ("/latest/containers/shop-web-1/system", 200, b"false"),
    ("/latest/hosts/node-a/memory", 200, b"8589934592"),
    ("/latest/networks/0/metadata", 200, b"cniConfig/\n"),
    ("/latest/networks/managed/is_default", 200, b"true"),
    ("/latest/stacks/shop/services", 200, b"0=db\n1=log-tail\n2=web\n"),
    ("/2015-07-25/stacks/Shop/services", 200, b"0\n1\n2\n"),
    ("/latest/bad%zzescape", 400, b"400 Bad Request"),
    ("/latest/services/web/links/shop%2Fdb", 200, b"database"),
    ("/2016-07-29/self/host/name", 200, b"node-a"),
])
def test_lookup(snap: Snapshot, path: str, status: int, body: bytes) -> None:
    assert get(snap, path) == (status, body)


def test_version_matrix(snap: Snapshot) -> None:
    # service.containers: names in 2015-07-25, objects later
    assert get(snap, "/2015-07-25/services/Web/containers/0", "json")[1] == b'"Shop-Web-1"'
    assert get(snap, "/2015-12-19/services/Web/containers/0/name")[1] == b"Shop-Web-1"
    # stack.services: names in 2015-07-25
    assert get(snap, "/2015-07-25/stacks/Shop/services", "json")[1] == b'["Web","db","log-tail"]'
    assert get(snap, "/2015-12-19/stacks/Shop/services/0/name")[1] == b"Web"
    # lower-casing only in 2016-07-29
    assert get(snap, "/2016-07-29/services/web/primary_service_name")[1] == b"web"
    assert get(snap, "/2015-12-19/services/Web/primary_service_name")[1] == b"Web"
    assert get(snap, "/2016-07-29/services/web/sidekicks/0")[1] == b"log-tail"
    assert get(snap, "/2015-12-19/services/Web/links", "json")[1] == b'{"Shop/db":"database"}'
    # ports: host agent_ip in 2015-x, 0.0.0.0 in 2016
    assert get(snap, "/2015-12-19/containers/Shop-Web-1/ports/0")[1] == b"192.168.10.11:8080:80/tcp"
    # hostId removed in 2016
    assert get(snap, "/2016-07-29/hosts/node-a/hostId")[0] == 404
    assert get(snap, "/2015-07-25/hosts/node-a/hostId")[1] == b"1"
    # environments only in 2016
    assert get(snap, "/2016-07-29/environments", "json")[1] == b"[]"
    assert get(snap, "/2015-12-19/environments")[0] == 404
    assert get(snap, "/2015-12-19/name")[1] == b"demo"
    # derived service fields on containers; the sidekick's launch-config name
    assert get(snap, "/latest/containers/shop-web-log-tail-1/service_name")[1] == b"log-tail"
    assert get(snap, "/2015-12-19/containers/Shop-Web-1/stack_name")[1] == b"Shop"
    # tokens only under self/service
    assert get(snap, "/latest/services/db/token", "json")[1] == b"null"
    assert get(snap, "/latest/self/service/token", "json", "192.168.10.12")[1] == b'"tok-db-secret"'
    assert get(snap, "/2015-07-25/self/service/token", "json", "10.42.0.5")[1] == b'"tok-web-secret"'


def test_self_unknown_and_shared_ip(snap: Snapshot) -> None:
    assert get(snap, "/latest/self")[1] == b"host/\n"
    assert get(snap, "/latest/self", ip="10.42.0.5")[1] == b"container/\nhost/\nservice/\nstack/\n"
    assert get(snap, "/latest/self/stack/name", ip="10.42.0.5")[1] == b"shop"
    assert get(snap, "/latest/self/host/name", ip="192.168.10.12")[1] == b"node-b"


def test_shared_ip_tie_break_is_deterministic(example_bytes: bytes) -> None:
    # same stream with the sidekick listed first: the primary still wins
    lines = example_bytes.splitlines()
    web = next(i for i, ln in enumerate(lines) if b'"ctr-web-1"' in ln and b'"container"' in ln)
    lt = next(i for i, ln in enumerate(lines) if b'"ctr-logtail-1"' in ln and b'"container"' in ln)
    lines[web], lines[lt] = lines[lt], lines[web]
    s = build(deflate(b"\n".join(lines)))
    assert get(s, "/latest/self/container/name", ip="10.42.0.5")[1] == b"shop-web-1"


def test_concatenated_without_separators(example_bytes: bytes) -> None:
    s = build(deflate(b"".join(example_bytes.splitlines())))
    assert get(s, "/latest/containers")[1] == b"0=shop-db-1\n1=shop-web-1\n2=shop-web-log-tail-1\n"


@pytest.mark.parametrize(("accept", "fmt"), [
    (None, "text"), ("", "text"), ("*/*", "text"),
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", "text"),
    ("application/json, text/plain", "text"), ("application/JSON", "text"),
    ("application/json", "json"), ("application/yaml", "yaml"), ("text/yaml", "yaml"),
    ("application/json;q=0.9, text/plain;q=0.5", "json"), ("application/*", "json"),
    ("text/plain;q=0, application/json;q=0.1", "json"), ("garbage", "text"),
])
def test_negotiation(accept: str | None, fmt: str) -> None:
    assert negotiate(accept) == fmt


@pytest.mark.parametrize(("v", "out"), [
    (None, ""), (True, "true"), (0, "0"), (0.5, "0.5"), (3.0, "3"), (1e-9, "0"), (-2.25, "-2.25"), ("x y", "x y"),
])
def test_text_scalars(v: object, out: str) -> None:
    assert text_scalar(v) == out


def test_text_map_and_list_rules() -> None:
    assert render_text({"b c": 1, "a/b": {}, "z": None, "l": []}) == b"a%2Fb/\nb+c\nl/\nz\n"
    assert render_text([{"name": "a b"}, {"uuid": "u1"}, {"name": None, "uuid": "u2"}, {}, [], 5]) == \
        b"0=a+b\n1=u1\n2=u2\n3/\n4/\n5\n"


def test_json_escapes_like_go() -> None:
    assert render_json({"a": "<&>"}) == b'{"a":"\\u003c\\u0026\\u003e"}'
    assert render_json({"big": 2**70}) == b'{"big":1180591620717411303424}'


def test_clean_path() -> None:
    assert clean_path("/a//b/") == "/a/b/"
    assert clean_path("/a/./b/../c") == "/a/c"
    assert clean_path("/..") == "/"


def test_legacy_format_served_as_is() -> None:
    doc = b"""
2015-07-25:
  default: {version: v1, self: {host: {name: h0}}}
latest:
  default: {version: v7, containers: [{name: A, primary_ip: 10.0.0.1}], self: {host: {name: h1}}}
  10.0.0.1: {self: {container: {name: A}}}
"""
    s = load_answers_bytes(doc)
    assert s.legacy and s.version == "v7"
    assert get(s, "/latest/version") == (200, b"v7")
    assert get(s, "/latest/self/container/name", ip="10.0.0.1") == (200, b"A")
    assert get(s, "/latest/version", ip="10.0.0.1")[0] == 404  # no per-key fall-back
    assert get(s, "/2015-07-25/version") == (200, b"v1")
    assert get(s, "/2016-07-29/version") == (404, b"Invalid version\n")
    assert get(s, "/")[1] == b"2015-07-25\nlatest\n"


def test_legacy_without_latest_uses_greatest() -> None:
    s = load_answers_bytes(b'{"2015-07-25":{"default":{"version":"a"}},"2016-07-29":{"default":{"version":"b"}}}')
    assert get(s, "/latest/version")[1] == b"b"


def test_empty_snapshot_errors() -> None:
    from metadata.store import empty_snapshot

    s = empty_snapshot()
    assert get(s, "/") == (200, b"latest\n")
    assert get(s, "/latest/version") == (404, b"Not found\n")
    assert get(s, "/2016-07-29/version") == (404, b"Invalid version\n")


def test_host_network_container_by_header_from_local_host(example_bytes: bytes) -> None:
    # make db a host-network container of the local host (node-a, where this instance runs)
    body = example_bytes.replace(b'"host_uuid":"host-b-uuid","host_ip":"192.168.10.12","hostname":"node-b"',
                                 b'"host_uuid":"host-a-uuid","host_ip":"192.168.10.11","hostname":"node-a"')
    s = build(deflate(body))
    key = s.container_key("Shop-db-1")
    assert key == "ctr:ctr-db-1" and s.container_key("ctr-db-1") == key
    assert get(s, "/latest/self/container/name", ip=key) == (200, b"shop-db-1")
    assert get(s, "/latest/self/service/token", "json", ip=key)[1] == b'"tok-db-secret"'
    assert s.container_key("shop-web-1") is None  # not on the host network
    assert s.local_ips == frozenset({"192.168.10.11"})
    # a remote host's host-network container is never reachable this way
    assert build(deflate(example_bytes)).container_key("shop-db-1") is None


def test_self_ref_only_from_the_local_host(example_bytes: bytes) -> None:
    from metadata.http import MetadataServer

    body = example_bytes.replace(b'"host_uuid":"host-b-uuid","host_ip":"192.168.10.12","hostname":"node-b"',
                                 b'"host_uuid":"host-a-uuid","host_ip":"192.168.10.11","hostname":"node-a"')
    srv = MetadataServer()
    srv.swap(build(deflate(body)))
    assert srv.self_ref("127.0.0.1", b"shop-db-1") == "ctr:ctr-db-1"
    assert srv.self_ref("192.168.10.11", b"ctr-db-1") == "ctr:ctr-db-1"
    assert srv.self_ref("10.42.0.9", b"shop-db-1") is None
    assert srv.self_ref("127.0.0.1", b"nope") is None


def test_xff_cannot_name_a_container() -> None:
    from metadata.http import MetadataServer

    srv = MetadataServer(xff=True)
    assert srv.client_ip("10.0.0.1", b"ctr:ctr-db-1") == "10.0.0.1"
    assert srv.client_ip("10.0.0.1", b"1.2.3.4, 10.42.0.5") == "10.42.0.5"
    trusted = MetadataServer(xff=True, xff_trusted=["127.0.0.0/8"])
    assert trusted.client_ip("10.0.0.1", b"10.42.0.5") == "10.0.0.1"
    assert trusted.client_ip("127.0.0.3", b"10.42.0.5") == "10.42.0.5"


def test_local_addresses_include_loopback() -> None:
    from metadata.http import local_addresses

    assert "127.0.0.1" in local_addresses(max_age=0)


def test_shared_host_ip_tie_break_create_index_then_name(example_bytes: bytes) -> None:
    hostnet0 = (b'\n{"metadata_kind":"container","name":"Shop-db-0","uuid":"ctr-db-0","primary_ip":"192.168.10.12",'
                b'"host_uuid":"host-b-uuid","network_uuid":"net-host-uuid","create_index":0,'
                b'"labels":{"io.rancher.container.network":"host"}}')
    managed = (b'\n{"metadata_kind":"container","name":"A-managed","uuid":"ctr-a","primary_ip":"192.168.10.12",'
               b'"host_uuid":"host-b-uuid","network_uuid":"net-managed-uuid","create_index":9}')
    s = build(deflate(example_bytes + hostnet0 + managed))
    # non-host network first (ctr-a), even with a higher create_index
    assert get(s, "/latest/self/container/name", ip="192.168.10.12")[1] == b"a-managed"
    s2 = build(deflate(example_bytes + hostnet0))
    # among host-network containers: lowest create_index (Shop-db-0 has 0, Shop-db-1 has 1)
    assert get(s2, "/latest/self/container/name", ip="192.168.10.12")[1] == b"shop-db-0"
