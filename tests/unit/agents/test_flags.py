"""The shared flag types: what each accepts, and the one-line refusal of what it does not."""

from __future__ import annotations

import argparse

import pytest

from agents.config import (
    choices_arg,
    cidr_list_arg,
    file_arg,
    float_arg,
    host_port_arg,
    int_arg,
    ip_list_arg,
    ip_port_arg,
    listen_arg,
    make_parser,
    url_arg,
)


@pytest.mark.parametrize(("conv", "good", "bad"), [
    (int_arg(0), ["0", "10000"], ["-1", "1.5", "ten", ""]),
    (float_arg(above=0), ["0.5", "3"], ["0", "-1", "nan", "inf", "x"]),
    (listen_arg, [":80", "127.0.0.1:0", "[::1]:53", "0.0.0.0:65535", "localhost:8080"],
     ["localhost", "127.0.0.1:70000", "999.1.1.1:80", "host:http", "[::1]"]),
    (host_port_arg, ["rancher-metadata", "169.254.169.250", "10.0.0.1:8080", "[fe80::1]:80"], [":80", "a b:1"]),
    (ip_port_arg, ["8.8.8.8", "127.0.0.1:5353", "[::1]:53"], ["notanip", "dns.google:53", "1.2.3.4:0"]),
    (ip_list_arg("agent_ip"), ["169.254.169.250", "agent_ip,10.0.0.1"], ["10.0.0.300", "me"]),
    (cidr_list_arg, ["", "10.42.0.0/16,127.0.0.0/8"], ["10.0.0.0/99", "bogus"]),
    (url_arg(), ["http://h:8080/v1", "https://rancher.example.com"], ["h:8080", "ftp://h", "http://", "http://h:x"]),
    (choices_arg(["metadata", "dns"]), ["", "dns,metadata"], ["nosuch", "dns,x"]),
])
def test_accepts_and_refuses(conv, good: list[str], bad: list[str]) -> None:  # type: ignore[no-untyped-def]
    for v in good:
        conv(v)
    for v in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            conv(v)


def test_url_default_scheme_and_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert url_arg(default_scheme="http")("127.0.0.1:8081") == "http://127.0.0.1:8081"
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory"):
        file_arg()(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="no such file"):
        file_arg(must_exist=True)(str(tmp_path / "nope"))
    assert file_arg()(str(tmp_path / "new.json")).endswith("new.json")


def test_parser_errors_are_one_line_and_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    p = make_parser("corral x", "x")
    p.add_argument("--count", type=int_arg(0), default=3, help="how many")
    p.add_argument("--name", default="", help="a name")
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--count", "-1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "corral x: --count: must be >= 0, not -1 (see corral x --help)\n"
    help_text = p.format_help()
    assert "how many (default: 3)" in help_text and "a name (default: none)" in help_text


def test_no_two_commands_listen_on_the_same_default_address() -> None:
    """Daemons share a host: their default listen addresses (admin, reload, API) must all differ."""
    import importlib

    from agents.cli import SUBCOMMANDS

    seen: dict[str, str] = {}
    for name, (module, _) in SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        build = getattr(mod, "build_parser", None) or getattr(mod, "_parser", None)
        if build is None:
            continue
        for a in build()._actions:
            if a.option_strings and a.dest.endswith(("listen", "listen_reload")) and a.default:
                where = f"corral {name} {a.option_strings[0]}"
                assert a.default not in seen, f"{where} and {seen[a.default]} both default to {a.default}"
                seen[a.default] = where
