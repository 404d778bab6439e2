"""The hosts file's content (etc-host-updater.md §3, §6): the original's format, the managed
block, deterministic order, invalid entries skipped."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etchosts.main import _split_url, write_in_place
from etchosts.render import BEGIN, END, entries, header, render_full, render_managed

HEAD = header("me", "172.17.0.5")
ORIGINAL_HEADER = (
    "127.0.0.1    localhost\n::1    localhost ip6-localhost ip6-loopback\nfe00::0    ip6-localnet\n"
    "ff00::0    ip6-mcastprefix\nff02::1    ip6-allnodes\nff02::2    ip6-allrouters\n172.17.0.5    me"
)


def h(hostname: object, ip: object, name: str = "") -> dict[str, object]:
    return {"hostname": hostname, "agent_ip": ip, "name": name, "uuid": "u"}


def test_original_format() -> None:
    ents, skipped = entries([h("node-b", "10.0.0.2"), h("node-a", "10.0.0.1")])
    assert HEAD == ORIGINAL_HEADER
    assert render_full(HEAD, ents) == ORIGINAL_HEADER + "\n10.0.0.1    node-a\n10.0.0.2    node-b\n"
    assert skipped == []


def test_no_hosts_is_header_and_newline() -> None:
    assert render_full(HEAD, entries([])[0]) == ORIGINAL_HEADER + "\n"


def test_first_duplicate_wins() -> None:
    ents, skipped = entries([h("x", "10.0.0.1"), h("x", "10.0.0.2"), h("y", "10.0.0.3")])
    assert [(e.ip, e.names) for e in ents] == [("10.0.0.1", ("x",)), ("10.0.0.3", ("y",))]
    assert [s.reason for s in skipped] == ["duplicate hostname (the first one wins)"]


@pytest.mark.parametrize(("host", "reason"), [
    (h("", "10.0.0.1"), "empty hostname"),
    (h("ok", ""), "empty agent_ip"),
    (h(None, None), "empty hostname"),
    (h("bad name", "10.0.0.1"), "invalid hostname"),
    (h("a" * 64, "10.0.0.1"), "invalid hostname"),
    (h("-x", "10.0.0.1"), "invalid hostname"),
    (h("ok", "10.0.0.300"), "invalid agent_ip"),
    (h("ok", "not-an-ip"), "invalid agent_ip"),
    ("junk", "not an object"),
])
def test_invalid_entries_are_skipped_with_a_reason(host: object, reason: str) -> None:
    ents, skipped = entries([host, h("good", "10.0.0.9")])
    assert [e.names[0] for e in ents] == ["good"]
    assert [s.reason for s in skipped] == [reason]


def test_legacy_keeps_the_malformed_lines() -> None:
    ents, _ = entries([h("", "10.0.0.1"), h("named", "")], legacy=True)
    assert render_full(HEAD, ents) == ORIGINAL_HEADER + "\n10.0.0.1    \n    named\n"


def test_ipv6_and_fqdn_and_aliases() -> None:
    ents, _ = entries([h("node-a.example.com", "fd00::1", name="Node-A")], aliases=True)
    assert [e.line() for e in ents] == ["fd00::1    node-a.example.com node-a\n"]
    ents, _ = entries([h("n1", "10.0.0.1", name="Display")], aliases=True)
    assert [e.line() for e in ents] == ["10.0.0.1    n1 display\n"]


def test_managed_block_appended_then_replaced() -> None:
    user = "127.0.0.1\tlocalhost\n172.17.0.5\tme  # docker\n10.1.1.1 db\n"
    ents, _ = entries([h("a", "10.0.0.1")])
    once = render_managed(user, ents)
    assert once == user + f"{BEGIN}\n10.0.0.1    a\n{END}\n"
    ents2, _ = entries([h("a", "10.0.0.1"), h("b", "10.0.0.2")])
    below = "# mine, below\n1.1.1.1 one"  # no newline at the end: kept as it is
    twice = render_managed(once + below, ents2)
    assert twice == user + f"{BEGIN}\n10.0.0.1    a\n10.0.0.2    b\n{END}\n" + below
    assert render_managed(twice, ents2) == twice


def test_managed_block_on_empty_file_and_missing_newline() -> None:
    ents, _ = entries([h("a", "10.0.0.1")])
    assert render_managed("", ents, HEAD) == ORIGINAL_HEADER + f"\n{BEGIN}\n10.0.0.1    a\n{END}\n"
    assert render_managed("1.2.3.4 x", ents).startswith("1.2.3.4 x\n" + BEGIN)
    # a BEGIN without an END is left alone, and a complete block appended
    out = render_managed(f"{BEGIN}\nstray\n", ents)
    assert out == f"{BEGIN}\nstray\n{BEGIN}\n10.0.0.1    a\n{END}\n"


user_text = st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"),
                             max_size=30), max_size=6).map(lambda ls: "".join(x + "\n" for x in ls))
hosts = st.lists(st.tuples(st.sampled_from(["a", "b", "c", "node-1", "x.y", ""]),
                           st.sampled_from(["10.0.0.1", "10.0.0.2", "fd00::2", "", "zz"])), max_size=8)


@settings(max_examples=150, deadline=None)
@given(user_text, user_text, hosts, hosts)
def test_user_lines_survive_any_changes(above: str, below: str, first: list, second: list) -> None:  # type: ignore[type-arg]
    above = "\n".join(x for x in above.split("\n") if x not in (BEGIN, END))
    below = "\n".join(x for x in below.split("\n") if x not in (BEGIN, END))
    start = above + ("" if above.endswith("\n") or not above else "\n")
    f1 = render_managed(start, entries([h(n, i) for n, i in first])[0])
    f2 = render_managed(f1 + below, entries([h(n, i) for n, i in second])[0])
    assert f2.startswith(start)
    assert f2.endswith(below)
    ents = entries([h(n, i) for n, i in second])[0]
    assert f2 == start + f"{BEGIN}\n" + "".join(e.line() for e in ents) + f"{END}\n" + below


def test_write_in_place_keeps_the_inode_and_skips_equal_content(tmp_path: Path) -> None:
    p = tmp_path / "hosts"
    p.write_text("old content that is longer than the new one\n")
    ino = p.stat().st_ino
    assert write_in_place(str(p), lambda cur: "new\n") is True
    assert p.read_text() == "new\n" and p.stat().st_ino == ino
    assert oct(p.stat().st_mode & 0o777) == oct(0o644)
    assert write_in_place(str(p), lambda cur: cur) is False
    assert write_in_place(str(tmp_path / "created"), lambda cur: "x\n") is True


@pytest.mark.parametrize(("url", "out"), [
    ("http://rancher-metadata/2015-12-19", ("http://rancher-metadata", "2015-12-19")),
    ("http://127.0.0.1:9/latest/", ("http://127.0.0.1:9", "latest")),
    ("127.0.0.1:9", ("http://127.0.0.1:9", "2015-12-19")),
])
def test_metadata_url(url: str, out: tuple[str, str]) -> None:
    assert _split_url(url) == out
