"""metadata.md §8: every example request, byte-exact status, headers and body (text, JSON, YAML);
and the original's wire details past the spec's examples (absent fields, nil maps, quoting)."""

from __future__ import annotations

import json

import pytest

from metadata.lookup import respond
from metadata.render import negotiate
from metadata.store import Snapshot

J = "application/json"
Y = "application/yaml"
LOCAL = "127.0.0.1"
CT_TEXT = b"Content-Type: text/plain; charset=utf-8\r\n"
CT_JSON = b"Content-Type: application/json\r\n"
CT_YAML = b"Content-Type: application/yaml\r\n"
CORS = b"Access-Control-Allow-Origin: *\r\n"
HOST_B = (b'{"agent_ip":"192.168.10.12","environment_uuid":"env-demo-0001","hostname":"node-b",'
          b'"labels":{"zone":"b"},"local_storage_mb":40960,"memory":8589934592,"metadata_kind":"host",'
          b'"milli_cpu":4000,"name":"node-b","uuid":"host-b-uuid"}')
DB_SELF = (b'{"create_index":1,"dns":[],"dns_search":[],"environment_uuid":"env-demo-0001","external_id":"d0c3",'
           b'"health_check_hosts":[],"health_state":null,"host_uuid":"host-b-uuid","hostname":"node-b",'
           b'"ips":["192.168.10.12"],"labels":{"io.rancher.container.network":"host"},"links":null,'
           b'"memory_reservation":null,"metadata_kind":"container","milli_cpu_reservation":null,'
           b'"name":"shop-db-1","network_from_container_uuid":null,"network_uuid":"net-host-uuid","ports":[],'
           b'"primary_ip":"192.168.10.12","primary_mac_address":null,"service_index":"1","service_name":"db",'
           b'"service_uuid":"svc-db-uuid","stack_name":"shop","stack_uuid":"stack-shop-uuid","start_count":1,'
           b'"state":"running","system":false,"uuid":"ctr-db-1"}')

# (row, path, accept, client ip, status, body)
ROWS = [
    (1, "/latest", "", LOCAL, 200,
     b"containers/\nenvironments/\nhosts/\nname\nnetworks/\nregion_name\nself/\nservices/\nstacks/\nuuid\nversion\n"),
    (2, "/latest/version", "", LOCAL, 200, b"42-5cc6db68"),
    (2, "/latest/version", J, LOCAL, 200, b'"42-5cc6db68"'),
    (3, "/2016-07-29/containers", "", LOCAL, 200, b"0=shop-db-1\n1=shop-web-1\n2=shop-web-log-tail-1\n"),
    (4, "/2015-12-19/containers", "", LOCAL, 200, b"0=Shop-db-1\n1=Shop-Web-1\n2=Shop-Web-log-tail-1\n"),
    (5, "/2016-07-29/containers/shop-web-1/ports/0", "", LOCAL, 200, b"0.0.0.0:8080:80/tcp"),
    (6, "/2015-07-25/containers/Shop-Web-1/ports/0", "", LOCAL, 200, b"192.168.10.11:8080:80/tcp"),
    (7, "/2015-07-25/services/Web/containers", J, LOCAL, 200, b'["Shop-Web-1"]'),
    (7, "/2015-07-25/services/web", "", LOCAL, 404, b"Not found\n"),
    (8, "/latest/self/container/name", "", "10.42.0.5", 200, b"shop-web-1"),
    (9, "/latest/self/service/name", "", "192.168.10.12", 200, b"db"),
    (10, "/latest/self", "", LOCAL, 200, b"host/\n"),
    (10, "/latest/self/container", "", LOCAL, 404, b"Not found\n"),
    (11, "/latest/self/host/name", "", LOCAL, 200, b"node-a"),
    (12, "/latest/services/web/links", "", LOCAL, 200, b"shop%2Fdb\n"),
    (12, "/latest/services/web/links", J, LOCAL, 200, b'{"shop/db":"database"}'),
    (13, "/latest/containers/shop-web-1/links", J, LOCAL, 200, b'{"database":"ctr-db-1"}'),
    (14, "/latest/services/web/health_check", J, LOCAL, 200,
     b'{"healthy_threshold":2,"interval":2000,"port":80,"request_line":"GET /healthz HTTP/1.0",'
     b'"response_timeout":2000,"unhealthy_threshold":3}'),
    (15, "/latest/hosts/node-b", J, LOCAL, 200, HOST_B),
    (15, "/2015-12-19/hosts/node-b", J, LOCAL, 200, HOST_B.replace(b'"hostname"', b'"hostId":2,"hostname"')),
    (16, "/latest/services/web/token", J, LOCAL, 200, b"null"),
    (16, "/latest/self/service/token", J, "10.42.0.5", 200, b'"tok-web-secret"'),
    (17, "/latest/containers/shop-web-1/dns_search", "", LOCAL, 200, b"0\n1\n2\n"),
    (18, "/2099-01-01/version", J, LOCAL, 404, b'{"code":404,"message":"Invalid version","type":"error"}\n'),
    (18, "/2099-01-01/version", "", LOCAL, 404, b"Invalid version\n"),
    (19, "/latest//containers", "", LOCAL, 301, b""),
    (20, "/2016-07-29/self/container", J, "192.168.10.12", 200, DB_SELF),
    # ... and every row in the other rendering
    (1, "/latest/environments", J, LOCAL, 200, b"[]"),
    (3, "/2016-07-29/containers/2/name", J, LOCAL, 200, b'"shop-web-log-tail-1"'),
    (4, "/2015-12-19/containers/0/name", J, LOCAL, 200, b'"Shop-db-1"'),
    (5, "/2016-07-29/containers/shop-web-1/ports/0", J, LOCAL, 200, b'"0.0.0.0:8080:80/tcp"'),
    (6, "/2015-07-25/containers/Shop-Web-1/ports/0", J, LOCAL, 200, b'"192.168.10.11:8080:80/tcp"'),
    (7, "/2015-07-25/services/Web/containers", "", LOCAL, 200, b"0\n"),
    (7, "/2015-07-25/services/web", J, LOCAL, 404, b'{"code":404,"message":"Not found","type":"error"}\n'),
    (8, "/latest/self/container/name", J, "10.42.0.5", 200, b'"shop-web-1"'),
    (9, "/latest/self/service/name", J, "192.168.10.12", 200, b'"db"'),
    (10, "/latest/self/container", J, LOCAL, 404, b'{"code":404,"message":"Not found","type":"error"}\n'),
    (11, "/latest/self/host/name", J, LOCAL, 200, b'"node-a"'),
    (13, "/latest/containers/shop-web-1/links", "", LOCAL, 200, b"database\n"),
    (14, "/latest/services/web/health_check", "", LOCAL, 200,
     b"healthy_threshold\ninterval\nport\nrequest_line\nresponse_timeout\nunhealthy_threshold\n"),
    (15, "/latest/hosts/node-b", "", LOCAL, 200,
     b"agent_ip\nenvironment_uuid\nhostname\nlabels/\nlocal_storage_mb\nmemory\nmetadata_kind\nmilli_cpu\nname\nuuid\n"),
    (16, "/latest/services/web/token", "", LOCAL, 200, b""),
    (16, "/latest/self/service/token", "", "10.42.0.5", 200, b"tok-web-secret"),
    (17, "/latest/containers/shop-web-1/dns_search", J, LOCAL, 200,
     b'["shop.rancher.internal","web.shop.rancher.internal","rancher.internal"]'),
    (19, "/latest//containers", J, LOCAL, 301, b""),
    # YAML (block style, keys sorted, like Go's yaml.v2 for these values)
    (2, "/latest/version", Y, LOCAL, 200, b"42-5cc6db68\n"),
    (7, "/2015-07-25/services/Web/containers", Y, LOCAL, 200, b"- Shop-Web-1\n"),
    (7, "/2015-07-25/services/web", Y, LOCAL, 404, b"code: 404\nmessage: Not found\ntype: error\n\n"),
    (12, "/latest/services/web/links", Y, LOCAL, 200, b"shop/db: database\n"),
    (14, "/latest/services/web/health_check", Y, LOCAL, 200,
     b"healthy_threshold: 2\ninterval: 2000\nport: 80\nrequest_line: GET /healthz HTTP/1.0\n"
     b"response_timeout: 2000\nunhealthy_threshold: 3\n"),
    (16, "/latest/services/web/token", Y, LOCAL, 200, b"null\n"),
    (17, "/latest/containers/shop-web-1/dns_search", Y, LOCAL, 200,
     b"- shop.rancher.internal\n- web.shop.rancher.internal\n- rancher.internal\n"),
    (18, "/2099-01-01/version", Y, LOCAL, 404, b"code: 404\nmessage: Invalid version\ntype: error\n\n"),
    (20, "/2016-07-29/self/container", "", "192.168.10.12", 200,
     b"".join(k.encode() + (b"/" if k in ("dns", "dns_search", "health_check_hosts", "ips", "labels", "links",
                                          "ports")
                            else b"") + b"\n"
              for k in sorted(json.loads(DB_SELF)))),
]


@pytest.mark.parametrize(("row", "path", "accept", "ip", "status", "body"), ROWS,
                         ids=[f"{r[0]}:{r[1]}:{r[2] or 'text'}" for r in ROWS])
def test_example_rows(snap: Snapshot, row: int, path: str, accept: str, ip: str, status: int, body: bytes) -> None:
    r, _ = respond(snap, path, "", negotiate(accept), ip)
    assert r.status == status
    assert r.body == body
    assert f"Content-Length: {len(body)}\r\n".encode() in r.head
    if status == 301:
        assert b"Location: /latest/containers\r\n" in r.head
        assert CORS not in r.head
        return
    assert CORS in r.head
    if status == 404:
        assert CT_TEXT in r.head and b"X-Content-Type-Options: nosniff\r\n" in r.head
    elif accept not in (J, Y) and body == b"":
        assert b"Content-Type" not in r.head  # text null: no Content-Type, like the original
    else:
        assert {J: CT_JSON, Y: CT_YAML}.get(accept, CT_TEXT) in r.head


def test_row1_json_and_row3_json(snap: Snapshot) -> None:
    r, _ = respond(snap, "/latest", "", "json", LOCAL)
    doc = json.loads(r.body)
    assert list(doc) == sorted(doc) and b" " not in r.body.split(b'"request_line"')[0][:50]
    assert sorted(doc) == ["containers", "environments", "hosts", "name", "networks", "region_name", "self",
                           "services", "stacks", "uuid", "version"]
    r, _ = respond(snap, "/2016-07-29/containers", "", "json", LOCAL)
    assert [c["name"] for c in json.loads(r.body)] == ["shop-db-1", "shop-web-1", "shop-web-log-tail-1"]
    assert json.loads(r.body)[0] == json.loads(DB_SELF)
    r, _ = respond(snap, "/latest/self", "", "json", LOCAL)
    assert list(json.loads(r.body)) == ["host"]


def test_text_null_has_no_content_type(snap: Snapshot) -> None:
    r, _ = respond(snap, "/latest/services/web/token", "", "text", LOCAL)
    assert r.status == 200 and r.body == b"" and b"Content-Type" not in r.head and CORS in r.head


def test_root_listing(snap: Snapshot) -> None:
    r, _ = respond(snap, "/", "", "text", LOCAL)
    assert r.body == b"2015-07-25\n2015-12-19\n2016-07-29\nlatest\n"
    r, _ = respond(snap, "/", "", "json", LOCAL)
    assert r.body == (b'{"2015-07-25":"/2015-07-25","2015-12-19":"/2015-12-19",'
                      b'"2016-07-29":"/2016-07-29","latest":"/latest"}')


def test_redirect_keeps_query(snap: Snapshot) -> None:
    r, cacheable = respond(snap, "/latest/./self/../version", "a=b", "text", LOCAL)
    assert r.status == 301 and b"Location: /latest/version?a=b\r\n" in r.head and not cacheable


def test_yaml_rendering(snap: Snapshot) -> None:
    r, _ = respond(snap, "/latest/hosts/node-b/labels", "", "yaml", LOCAL)
    assert r.body == b"zone: b\n" and b"Content-Type: application/yaml\r\n" in r.head
    r, _ = respond(snap, "/latest/nothere", "", "yaml", LOCAL)
    assert r.body == b"code: 404\nmessage: Not found\ntype: error\n\n"  # http.Error's newline after YAML's
