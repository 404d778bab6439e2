import pytest

from agents.config import CattleConfig
from agents.errors import ConfigError, ProtocolError
from agents.metadata_client import Snapshot
from agents.metrics import parse_listen


def test_base_collapses_slashes_and_ws_changes_only_scheme():
    c = CattleConfig("http://myhttphost:8080//v1/", "a", "s")
    assert c.base == "http://myhttphost:8080/v1"
    assert c.ws_base == "ws://myhttphost:8080/v1"  # rancher#6957: only the scheme
    assert CattleConfig("https://h/v2-beta", "a", "s").ws_base == "wss://h/v2-beta"
    assert CattleConfig("http://h:1", "a", "s").base == "http://h:1/v1"


def test_missing_credentials_is_a_config_error(monkeypatch):
    for k in ("CATTLE_URL", "CATTLE_ACCESS_KEY", "CATTLE_SECRET_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("CATTLE_URL", "http://h/v1")
    with pytest.raises(ConfigError, match="CATTLE_ACCESS_KEY, CATTLE_SECRET_KEY"):
        CattleConfig.from_env()


@pytest.mark.parametrize("spec,expect", [(":80", ("0.0.0.0", 80)), ("127.0.0.1:8112", ("127.0.0.1", 8112)),
                                         ("[::1]:53", ("::1", 53)), ("9112", ("0.0.0.0", 9112))])
def test_parse_listen(spec, expect):
    assert parse_listen(spec) == expect


def test_parse_listen_rejects_garbage():
    with pytest.raises(ConfigError):
        parse_listen("host:http")


def test_snapshot_types_fields_and_tolerates_gaps():
    tree = {
        "version": "42-abc",
        "hosts": [{"uuid": "h1", "name": "node-a", "agent_ip": "10.0.0.1", "labels": {"a": "b"}, "memory": 1024}],
        "containers": [{"uuid": "c1", "name": "web-1", "primary_ip": "10.42.0.5", "start_count": "3",
                        "health_check_hosts": ["h1"], "labels": None}],
        "services": [{"uuid": "s1", "name": "web", "health_check": {"port": 80}, "scale": 2}],
        "stacks": None,
        "self": {"host": {"uuid": "h1", "name": "node-a"}},
    }
    s = Snapshot.from_tree(tree)
    assert s.version == "42-abc" and s.self_host is not None and s.self_host.uuid == "h1"
    assert s.self_container is None and s.stacks == ()
    c = s.containers[0]
    assert c.start_count == 3 and c.health_check_hosts == ("h1",) and c.labels == {}
    assert s.services[0].health_check == {"port": 80} and s.services[0].scale == 2
    assert s.hosts[0].uuid == "h1" and s.hosts[0].memory == 1024


@pytest.mark.parametrize("tree", [[], {"hosts": []}, {"version": "1", "containers": {"a": 1}}])
def test_snapshot_rejects_non_trees(tree):
    with pytest.raises(ProtocolError):
        Snapshot.from_tree(tree)


def test_snapshot_keeps_the_views_of_the_elements_an_earlier_tree_shares():
    old_tree = {"version": "1", "containers": [{"uuid": f"c{i}", "ports": [f"0.0.0.0:{80 + i}:80/tcp"]}
                                               for i in range(4)] + ["not an object"],
                "hosts": [{"uuid": "h1"}], "self": {"host": {"uuid": "h1"}}}
    old = Snapshot.from_tree(old_tree)
    changed = {**old_tree["containers"][2], "ports": ["0.0.0.0:9999:80/tcp"]}
    new_tree = {**old_tree, "version": "2",
                "containers": [*old_tree["containers"][:2], changed, old_tree["containers"][3],
                               old_tree["containers"][4], {"uuid": "c-new"}]}
    new = Snapshot.from_tree(new_tree, reuse=old)
    assert new == Snapshot.from_tree(new_tree)  # the same view as one built from scratch
    c = new.containers
    assert c[0] is old.containers[0] and c[1] is old.containers[1] and c[3] is old.containers[3]
    assert c[2] is not old.containers[2] and c[2].ports == ("0.0.0.0:9999:80/tcp",)
    assert c[2].raw is changed and c[5].uuid == "c-new"
    assert c[4].uuid is None and c[4] is not old.containers[4]  # not an object: built again, empty
    assert new.hosts[0] is old.hosts[0] and new.version == "2"
    # an equal element that is another object is built again, not matched by value
    copied = Snapshot.from_tree({**new_tree, "containers": [dict(o) if isinstance(o, dict) else o
                                                            for o in new_tree["containers"]]}, reuse=new)
    assert copied == new and not any(a is b for a, b in zip(copied.containers, new.containers, strict=True))
