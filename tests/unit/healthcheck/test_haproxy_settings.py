"""HAProxySettings: absolute paths whatever the caller's cwd; a socket path too long is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agents.errors import ConfigError
from healthcheck.haproxy import HAProxySettings, _one_line


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = HAProxySettings(state_dir="./run/healthcheck")
    assert s.state_dir == str(tmp_path / "run" / "healthcheck")
    assert s.socket_path == str(tmp_path / "run" / "healthcheck" / "haproxy.sock")
    assert s.state_path.startswith("/") and s.config_path.startswith("/")
    assert HAProxySettings(state_dir="x", stats_socket="s/h.sock").socket_path == str(tmp_path / "s" / "h.sock")


def test_socket_path_longer_than_a_unix_address_is_refused() -> None:
    long_dir = "/" + "d" * 100
    with pytest.raises(ConfigError, match="longer than the 107 bytes"):
        HAProxySettings(state_dir=long_dir)
    HAProxySettings(state_dir=long_dir, stats_socket="/run/h.sock")  # its own socket elsewhere is fine
    assert len(os.fsencode(HAProxySettings(state_dir="/" + "d" * 93).socket_path)) == 107


def test_haproxy_alerts_in_one_stable_line() -> None:
    text = ("haproxy -c failed: [NOTICE]   (12251) : haproxy version is 2.6.12\n"
            "[ALERT]    (12251) : config : parsing [h.cfg:2] : 'stats socket' : missing port specification\n\n"
            "[ALERT]    (12251) : config : Error(s) found in configuration file : h.cfg\n"
            "[ALERT]    (12251) : config : Fatal errors found in configuration.")
    assert _one_line(text) == "parsing [h.cfg:2] : 'stats socket' : missing port specification"
    assert _one_line(text.replace("12251", "999")) == _one_line(text), "no pid: the same failure reads the same"
    assert _one_line("plain\nmessage") == "plain | message"
