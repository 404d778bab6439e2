"""main.py: the original's command line parses unchanged (Go flag spellings), Corral's switches."""

from __future__ import annotations

from pathlib import Path

import pytest

from dns.main import _metadata_base, _normalise, build_parser, main, read_resolv_conf


def parse(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(_normalise(list(argv)))


def test_catalog_command_line() -> None:
    # rancher/dns v0.17 catalog: network-services dns sidekick
    a = parse("-listen", "169.254.169.250:53", "-metadata-server", "localhost", "-answers",
              "/etc/rancher-dns/answers.json", "-ttl", "1", "--recurser-timeout=2", "-debug")
    assert a.listen == "169.254.169.250:53" and a.ttl == 1 and a.recurser_timeout == 2.0 and a.debug
    assert a.metadata_server == "localhost" and a.answers == "/etc/rancher-dns/answers.json"
    assert _metadata_base(a) == ("http://localhost", "2016-07-29")


def test_defaults_are_the_originals() -> None:
    a = parse()
    assert a.listen == ":53" and a.listen_reload == "127.0.0.1:8113" and a.ttl == 600
    assert a.recurser_timeout == 2.0 and a.ndots == 0 and a.cache_capacity == 1000
    assert a.rancher_metadata_answer == "169.254.169.250" and a.never_recurse_to == "169.254.169.250"
    assert a.metadata_server == "" and a.ptr is True and a.forward_single_label is False
    assert a.unhealthy_fallback == "last" and a.serve_stale is True


def test_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANCHER_METADATA_ANSWER", "agent_ip")
    monkeypatch.setenv("NEVER_RECURSE_TO", "agent_ip,10.0.0.9")
    monkeypatch.setenv("DNS_RECURSER_TIMEOUT", "3")
    a = parse()
    assert a.rancher_metadata_answer == "agent_ip" and a.never_recurse_to == "agent_ip,10.0.0.9"
    assert a.recurser_timeout == 3.0


def test_corral_switches_go_style_booleans() -> None:
    a = parse("--ptr=false", "--forward-single-label=true", "-serve-stale=0", "--unhealthy-fallback", "none",
              "--metadata-url", "http://127.0.0.1:9/2016-07-29", "--recurser", "127.0.0.1:5353")
    assert a.ptr is False and a.forward_single_label is True and a.serve_stale is False
    assert a.unhealthy_fallback == "none" and a.recurser == ["127.0.0.1:5353"]
    assert _metadata_base(a) == ("http://127.0.0.1:9", "2016-07-29")
    assert parse("--ptr").ptr is True


def test_bad_values_exit_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--ttl", "soon")
    assert main(["--ttl", "-1"]) == 2
    assert main(["--version"]) == 0
    assert "corral-dns" in capsys.readouterr().out


def test_read_resolv_conf(tmp_path: Path) -> None:
    p = tmp_path / "resolv.conf"
    p.write_text("# x\nsearch corp\nnameserver 10.0.0.2\nnameserver 127.0.0.11\noptions ndots:2\n")
    assert read_resolv_conf(str(p)) == ["10.0.0.2", "127.0.0.11"]
    assert read_resolv_conf(str(tmp_path / "missing")) == []
