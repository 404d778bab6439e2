"""The original's wire details past the spec's examples, byte-exact: a field absent from the stream
is a 404 (not an empty 200), nil vs empty ``links`` maps, ``environments`` without an environment
object, YAML quoting as the original's emitter quotes, the YAML 404 body's last newline."""

from __future__ import annotations

import json

import pytest

from metadata.lookup import respond
from metadata.render import render_yaml
from metadata.store import Snapshot, build

from .conftest import deflate

LOCAL = "127.0.0.1"
NOT_FOUND = {"text": b"Not found\n", "json": b'{"code":404,"message":"Not found","type":"error"}\n',
             "yaml": b"code: 404\nmessage: Not found\ntype: error\n\n"}

# No environment object; a service sent without selector/vip/fqdn/token and without links; a
# standalone container (no serviceContainerLink) sent without service_name and friends.
SPARSE = b"""
{"metadata_kind":"host","agent_ip":"192.168.10.11","name":"node-a","hostname":"node-a","uuid":"host-a"}
{"metadata_kind":"stack","name":"Shop","uuid":"stack-shop"}
{"metadata_kind":"service","name":"Web","uuid":"svc-web","stack_name":"Shop","stack_uuid":"stack-shop","kind":"service","primary_service_name":"Web","sidekicks":[]}
{"metadata_kind":"container","name":"Lone","uuid":"ctr-lone","primary_ip":"10.42.0.9","host_uuid":"host-a","service_index":"1","labels":{"on":"yes","n":"010"}}
{"metadata_kind":"container","name":"Web-1","uuid":"ctr-web-1","primary_ip":"10.42.0.5","host_uuid":"host-a"}
{"metadata_kind":"serviceContainerLink","service_uuid":"svc-web","service_name":"Web","container_uuid":"ctr-web-1"}
{"metadata_kind":"defaultData","version":"7-abc","self":{"host":{"uuid":"host-a"}}}
"""


@pytest.fixture(scope="module")
def sparse() -> Snapshot:
    return build(deflate(SPARSE.strip()))


def get(snap: Snapshot, path: str, fmt: str = "text", ip: str = LOCAL) -> tuple[int, bytes]:
    r, _ = respond(snap, path, "", fmt, ip)
    return r.status, r.body  # type: ignore[union-attr]


@pytest.mark.parametrize("fmt", ["text", "json", "yaml"])
@pytest.mark.parametrize("path", [
    "/latest/services/web/selector", "/latest/services/web/vip", "/2015-12-19/services/Web/selector",
    "/latest/containers/lone/service_name", "/latest/containers/lone/stack_uuid",
    "/latest/containers/lone/health_state", "/latest/containers/lone/dns", "/latest/hosts/node-a/memory",
    "/latest/stacks/shop/system", "/latest/name", "/latest/region_name",
])
def test_field_absent_from_the_stream_is_404(sparse: Snapshot, path: str, fmt: str) -> None:
    assert get(sparse, path, fmt) == (404, NOT_FOUND[fmt])


def test_field_sent_as_null_is_200(snap: Snapshot) -> None:
    assert get(snap, "/latest/services/web/selector") == (200, b"")
    assert get(snap, "/latest/services/web/selector", "json") == (200, b"null")
    assert get(snap, "/latest/containers/shop-db-1/health_state", "yaml") == (200, b"null\n")
    assert get(snap, "/latest/containers/shop-db-1/dns", "json") == (200, b"[]")  # a null list is []


def test_absent_fields_are_absent_from_listings(sparse: Snapshot) -> None:
    st, body = get(sparse, "/latest/containers/lone")
    assert st == 200 and body == b"host_uuid\nlabels/\nlinks/\nmetadata_kind\nname\nprimary_ip\nservice_index\nuuid\n"
    assert json.loads(get(sparse, "/latest/containers/lone", "json")[1]) == {
        "host_uuid": "host-a", "labels": {"n": "010", "on": "yes"}, "links": None, "metadata_kind": "container",
        "name": "lone", "primary_ip": "10.42.0.9", "service_index": "1", "uuid": "ctr-lone"}
    # the derived fields of a service member are there, as the original fills them in
    assert get(sparse, "/latest/containers/web-1/service_name") == (200, b"web")
    assert get(sparse, "/latest/containers/web-1/stack_uuid") == (200, b"stack-shop")


def test_empty_links_render_as_the_originals_nil_or_empty_map(sparse: Snapshot, snap: Snapshot) -> None:
    # container links: a nil map (null in JSON, {} in YAML, a map in text listings)
    assert b"links/\n" in get(snap, "/latest/containers/shop-db-1")[1]
    assert get(snap, "/latest/containers/shop-db-1/links") == (200, b"")
    assert get(snap, "/latest/containers/shop-db-1/links", "json") == (200, b"null")
    assert get(snap, "/latest/containers/shop-db-1/links", "yaml") == (200, b"{}\n")
    assert b'"links":null' in get(snap, "/2015-12-19/containers/Shop-db-1", "json")[1]
    assert b"\nlinks: {}\n" in get(snap, "/latest/containers/shop-db-1", "yaml")[1]
    assert get(snap, "/latest/containers/shop-db-1/links/x") == (404, b"Not found\n")
    # service links: {} in 2016-07-29 (the lower-casing makes a map), nil in the 2015 versions
    assert b"links/\n" in get(snap, "/latest/services/db")[1]
    assert b'"links":{}' in get(snap, "/latest/services/db", "json")[1]
    assert b'"links":null' in get(snap, "/2015-12-19/services/db", "json")[1]
    assert b"links/\n" in get(snap, "/2015-07-25/services/db")[1]
    assert b"\nlinks: {}\n" in get(snap, "/2015-12-19/services/db", "yaml")[1]
    assert get(sparse, "/latest/services/web/links", "json") == (200, b"{}")
    # a whole list renders the same way as its elements
    assert b'"links":{}' in get(snap, "/latest/stacks/shop/services", "json")[1]
    assert b"links: {}" in get(snap, "/latest/services", "yaml")[1]


def test_environments_without_an_environment_object(sparse: Snapshot) -> None:
    assert get(sparse, "/latest/environments") == (200, b"")
    assert get(sparse, "/latest/environments", "json") == (200, b"null")
    assert get(sparse, "/latest")[1] == b"containers/\nenvironments\nhosts/\nnetworks/\nself/\nservices/\nstacks/\nversion\n"
    assert get(sparse, "/2015-12-19/environments")[0] == 404  # a 2016-07-29 key only


def test_yaml_quotes_like_the_original(sparse: Snapshot, snap: Snapshot) -> None:
    # a string that would read back as another type (a number, bool, null, "") is single-quoted,
    # as the original's emitter does (we double-quoted these before: "1")
    assert get(sparse, "/latest/containers/lone/service_index", "yaml") == (200, b"'1'\n")
    assert get(sparse, "/latest/containers/lone/labels", "yaml") == (200, b"n: '010'\n'on': 'yes'\n")
    assert b"\n  service_index: '1'\n" in get(snap, "/latest/containers", "yaml")[1]
    assert get(snap, "/latest/region_name", "yaml") == (200, b"''\n")
    assert get(snap, "/latest/version", "yaml") == (200, b"42-5cc6db68\n")  # plain stays plain
    r, _ = respond(snap, "/latest/containers/shop-web-1/service_index", "", "yaml", LOCAL)
    assert r.body == b"'1'\n"  # type: ignore[union-attr]


@pytest.mark.parametrize(("value", "want"), [
    ("1", b"'1'\n"), ("1.5", b"'1.5'\n"), ("1e5", b"'1e5'\n"),  # 1e5: a float to the Go reader
    ("true", b"'true'\n"), ("null", b"'null'\n"), ("", b"''\n"), ("~", b"'~'\n"),
    ("a: 'b'", b"'a: ''b'''\n"),  # a quote inside single quotes is doubled
    ("x\x01y", b'"x\\x01y"\n'),  # double quotes only where an escape is needed
    ("O'Neil", b"O'Neil\n"), ("plain", b"plain\n"),
])
def test_yaml_scalar_quoting(value: str, want: bytes) -> None:
    assert render_yaml(value) == want
    assert render_yaml({"k": value}) == b"k: " + want


def test_empty_text_body_has_no_content_type(snap: Snapshot) -> None:
    for path in ("/latest/region_name", "/latest/containers/shop-db-1/links", "/latest/services/web/token"):
        r, _ = respond(snap, path, "", "text", LOCAL)
        assert r.body == b"" and b"Content-Type" not in r.head  # type: ignore[union-attr]
