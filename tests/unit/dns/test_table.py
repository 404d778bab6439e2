"""table.py: the worked example's views (dns.md §13) and the lookup rules (§3, §4)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dns.table import Rec, Settings, build, build_from_answers, filter_recursers, resolve
from tests.unit.dns import example

ST = Settings(ttl=600, default_recurse=("10.0.0.2:53",))


@pytest.fixture(scope="module")
def t():  # type: ignore[no-untyped-def]
    return build(example.tree(), ST)


def test_default_records(t) -> None:  # type: ignore[no-untyped-def]
    r = t.default.records
    assert set(r["web.shop.rancher.internal."].a) == {"10.42.0.11", "10.42.0.12"}
    assert r["logger.web.shop.rancher.internal."].a == ("10.42.0.21",)
    assert r["db.data.rancher.internal."].a == ("10.42.0.31",)
    for name, ip in [("shop-web-1", "11"), ("shop-web-2", "12"), ("shop-web-logger-1", "21"),
                     ("data-db-1", "31"), ("data-db-2", "32")]:
        assert r[f"{name}.rancher.internal."].a == (f"10.42.0.{ip}",)
    assert r["rancher-metadata.rancher.internal."].a == ("169.254.169.250",)
    assert r["payments.data.rancher.internal."] == Rec(cname="api.payments.example.")
    # sidekick IPs never in the primary's set (#3785)
    assert "10.42.0.21" not in r["web.shop.rancher.internal."].a
    assert t.default.search == ("rancher.internal",)
    assert t.default.recurse == ("10.0.0.2:53",)


def test_views_only_for_this_host(t) -> None:  # type: ignore[no-untyped-def]
    assert set(t.views) == {"10.42.0.11", "10.42.0.21", "10.42.0.31"}
    v11 = t.views["10.42.0.11"]
    assert v11.search == ("shop.rancher.internal", "web.shop.rancher.internal", "rancher.internal")
    assert v11.recurse == ()  # 169.254.169.250 dropped
    assert v11.records["database.rancher.internal."].a == ("10.42.0.31",)
    assert v11.records["database.data.rancher.internal."].a == ("10.42.0.31",)
    # the sidekick inherits the primary's link aliases
    assert t.views["10.42.0.21"].records == v11.records
    assert t.views["10.42.0.31"].records == {}


@pytest.mark.parametrize(
    ("src", "name", "found"),
    [
        ("10.42.0.11", "web.", {"10.42.0.11", "10.42.0.12"}),                       # row 1
        ("10.42.0.11", "web.shop.rancher.internal.", {"10.42.0.11", "10.42.0.12"}),  # row 2
        ("10.42.0.31", "web.shop.", {"10.42.0.11", "10.42.0.12"}),                   # row 3
        ("10.42.0.31", "web.", None),                                                # row 4
        ("10.42.0.11", "database.", {"10.42.0.31"}),                                 # row 5
        ("10.42.0.31", "database.", None),                                           # row 6
        ("10.42.0.21", "logger.", {"10.42.0.21"}),                                   # row 7
        ("10.42.0.31", "logger.web.shop.", {"10.42.0.21"}),                          # row 8
        ("10.42.0.11", "db.data.rancher.internal.", {"10.42.0.31"}),                 # row 9
        ("10.42.0.31", "data-db-2.", {"10.42.0.32"}),                                # row 10
        ("10.0.0.5", "rancher-metadata.", {"169.254.169.250"}),                      # row 14
        ("10.42.0.21", "database.", {"10.42.0.31"}),                                 # row 19
        ("10.42.0.11", "nosuch.shop.rancher.internal.", None),                       # row 13
        ("10.42.0.99", "database.", None),                                           # unknown client: default only
        ("10.42.0.99", "web.shop.", {"10.42.0.11", "10.42.0.12"}),
    ],
)
def test_lookup_rows(t, src: str, name: str, found: set[str] | None) -> None:  # type: ignore[no-untyped-def]
    r = resolve(t, t.view_key(src), name)
    if found is None:
        assert r is None
    else:
        assert r is not None and set(r.rec.a) == found


def test_health_fallback_and_modes() -> None:
    # both db containers unhealthy -> one IP (lowest create_index among running), or none
    tree = example.tree(db2_health="unhealthy")
    tree["containers"][-2]["health_state"] = "unhealthy"  # data-db-1
    t = build(tree, ST)
    assert t.default.records["db.data.rancher.internal."].a == ("10.42.0.31",)
    t2 = build(tree, Settings(unhealthy_fallback="none"))
    assert "db.data.rancher.internal." not in t2.default.records
    # container names ignore health
    assert t2.default.records["data-db-1.rancher.internal."].a == ("10.42.0.31",)
    # db-2 healthy -> both
    t3 = build(example.tree(db2_health="healthy"), ST)
    assert set(t3.default.records["db.data.rancher.internal."].a) == {"10.42.0.31", "10.42.0.32"}


def test_scale_changes_set() -> None:
    t = build(example.tree(web_scale=4), ST)
    assert len(t.default.records["web.shop.rancher.internal."].a) == 4
    t1 = build(example.tree(web_scale=1), ST)
    assert t1.default.records["web.shop.rancher.internal."].a == ("10.42.0.11",)


def test_vip_alias_external_ips_and_other_env() -> None:
    tree = example.tree()
    tree["services"].append({"name": "alias", "uuid": "svc-alias", "stack_name": "data", "kind": "dnsService",
                             "links": {"data/db": None, "shop/web": None, "data/alias2": None},
                             "environment_uuid": example.ENV})
    tree["services"].append({"name": "alias2", "uuid": "svc-alias2", "stack_name": "data", "kind": "dnsService",
                             "links": {"data/alias": None, "data/ext": None}, "environment_uuid": example.ENV})
    tree["services"].append({"name": "ext", "uuid": "svc-ext", "stack_name": "data", "kind": "externalService",
                             "external_ips": ["192.0.2.1", "bogus"], "environment_uuid": example.ENV})
    tree["services"].append({"name": "lb", "uuid": "svc-lb", "stack_name": "data", "kind": "loadBalancerService",
                             "vip": "10.43.0.1", "environment_uuid": example.ENV})
    tree["services"].append({"name": "other", "uuid": "svc-o", "stack_name": "data", "kind": "service",
                             "environment_uuid": "env-other"})
    t = build(tree, ST)
    r = t.default.records
    assert set(r["alias.data.rancher.internal."].a) == {"10.42.0.31", "10.42.0.11", "10.42.0.12", "192.0.2.1"}
    assert r["alias2.data.rancher.internal."].a  # alias -> alias, loop-safe
    assert r["ext.data.rancher.internal."].a == ("192.0.2.1",)
    assert r["lb.data.rancher.internal."].a == ("10.43.0.1",)
    assert "other.data.rancher.internal." not in r


def test_container_links_and_service_links_override() -> None:
    tree = example.tree()
    tree["containers"][0]["links"] = {"database": "ctr-data-db-2", "friend": "ctr-data-db-2"}
    t = build(tree, ST)
    v = t.views["10.42.0.11"].records
    assert v["friend.rancher.internal."].a == ("10.42.0.32",)
    assert v["database.rancher.internal."].a == ("10.42.0.31",)  # service link wins


def test_ptr_and_zones(t) -> None:  # type: ignore[no-untyped-def]
    assert t.ptr["11.0.42.10.in-addr.arpa."] == "shop-web-1.rancher.internal."
    assert "42.10.in-addr.arpa." in t.reverse_zones


def test_ndots_and_search_skip() -> None:
    t = build(example.tree(), Settings(ndots=2))
    assert resolve(t, "10.42.0.11", "web.") is not None
    assert resolve(t, "10.42.0.31", "logger.web.shop.") is None  # 3 dots >= ndots 2: no suffixes


def test_empty_ips_skipped_and_garbage_tolerated() -> None:
    tree = example.tree()
    tree["containers"][0]["primary_ip"] = ""
    tree["containers"].append("junk")
    tree["services"].append(None)
    t = build(tree, ST)
    assert "10.42.0.11" not in t.default.records["web.shop.rancher.internal."].a
    assert "shop-web-1.rancher.internal." not in t.default.records
    assert build({}, ST).default.records.keys() == {"rancher-metadata.rancher.internal."}


def test_filter_recursers() -> None:
    assert filter_recursers(["169.254.169.250", "127.0.0.11", "10.0.0.2", "10.0.0.3:5353", "x"],
                            ["169.254.169.250"]) == ("10.0.0.2:53", "10.0.0.3:5353")
    assert filter_recursers(["127.0.0.53:5353"], [], allow_loopback=True) == ("127.0.0.53:5353",)


def test_answers_file() -> None:
    t = build_from_answers({
        "default": {"a": {"foo.rancher.internal.": {"answer": ["1.2.3.4"]}}, "recurse": ["127.0.0.1:5353"],
                    "ptr": {"1.2.3.4": "foo.rancher.internal"}},
        "10.1.1.1": {"search": ["x.rancher.internal"], "cname": {"bar.rancher.internal.": "foo.rancher.internal."}},
    }, ST)
    assert resolve(t, "10.1.1.1", "bar.rancher.internal.").rec.cname == "foo.rancher.internal."  # type: ignore[union-attr]
    assert t.ptr["4.3.2.1.in-addr.arpa."] == "foo.rancher.internal."
    with pytest.raises(ValueError):
        build_from_answers({"default": {"a": {"x.": ["not-an-ip"]}}}, ST)
    with pytest.raises(ValueError):
        build_from_answers(["x"], ST)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        build_from_answers({"default": {"txt": {"x.": [1]}}}, ST)


def test_names_that_cannot_go_on_the_wire_are_dropped() -> None:
    tree = example.tree()
    tree["containers"][0]["name"] = "x" * 70
    tree["containers"][1]["name"] = "caf\u00e9"
    tree["services"][3]["hostname"] = "y" * 64 + ".example"
    t = build(tree, ST)
    names = set(t.default.records)
    assert not any(n.startswith("x" * 70) or n.startswith("caf") for n in names)
    assert "payments.data.rancher.internal." not in names
    assert "web.shop.rancher.internal." in names


# ---------------------------------------------------------------- hostile metadata


# Cheap to draw (the suite runs it on every CI run): a few of the fields per object, values from a
# small pool of plain shapes, nesting at most a couple of levels. A fixed_dictionaries of 22 optional
# recursive fields took ~100 ms per example to generate and found nothing more.
_FIELDS = ("name", "uuid", "primary_ip", "host_uuid", "state", "health_state", "service_name", "service_uuid",
           "stack_name", "dns", "dns_search", "links", "network_from_container_uuid", "environment_uuid", "kind",
           "hostname", "vip", "external_ips", "health_check", "primary_service_name", "containers", "create_index")
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text("ab.-_é\x00 ", max_size=6),
                    st.sampled_from(["10.42.0.1", "127.0.0.1", "running", "healthy", "host-1", "svc-web", "shop",
                                     "externalService", "dnsService", "web", "a/b"]))
_json = st.recursive(_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.sampled_from(_FIELDS), inner, max_size=2)),
                     max_leaves=3)
_obj = st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=4)


@settings(max_examples=200, deadline=None)
@given(st.lists(_obj, max_size=4), st.lists(_obj, max_size=4), _json)
def test_build_survives_any_metadata_shape(containers: list, services: list, self_: object) -> None:  # type: ignore[type-arg]
    """Garbage field types in metadata never crash the build; every produced name is encodable."""
    from dns.table import valid_name

    tree = {"containers": containers + example.tree()["containers"], "services": services,
            "self": self_, "version": 1, "hosts": containers}
    t = build(tree, ST)
    for view in (t.default, *t.views.values()):
        for name, rec in view.records.items():
            assert valid_name(name) and all(isinstance(ip, str) for ip in rec.a)
    for name in ("web.", "web.shop.rancher.internal.", "x.y."):
        resolve(t, t.view_key("10.42.0.11"), name)


def test_kubernetes_services_under_cluster_local() -> None:
    tree = example.tree()
    tree["services"].append({"name": "api", "uuid": "svc-k8s", "stack_name": "kube", "kind": "kubernetesService",
                             "vip": "10.43.0.10", "environment_uuid": example.ENV})
    tree["containers"].append({"name": "api-pod-1", "uuid": "ctr-pod", "primary_ip": "10.42.0.50",
                               "host_uuid": "host-2", "state": "running", "service_name": "api",
                               "service_uuid": "svc-k8s", "stack_name": "kube", "environment_uuid": example.ENV})
    t = build(tree, ST)
    r = t.default.records
    assert r["api.kube.svc.cluster.local."].a == ("10.43.0.10",)
    assert r["api-pod-1.api.kube.svc.cluster.local."].a == ("10.42.0.50",)
    assert "api.kube.rancher.internal." not in r
    # not authoritative: a miss under cluster.local is forwarded, not NXDOMAIN
    from dns.answer import FORWARD, decide

    assert decide(t, "", "nosuch.kube.svc.cluster.local.", 1) == FORWARD
