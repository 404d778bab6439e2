"""The original's command line works unchanged (Go flag spellings too)."""

from __future__ import annotations

import pytest

from metadata import main as md_main


def test_original_flags_and_defaults() -> None:
    a = md_main.build_parser().parse_args([])
    assert (a.listen, a.listen_reload, a.answers, a.subscribe, a.reload_interval_limit, a.xff) == (
        ":80", "127.0.0.1:8112", "./answers.json", False, 1000, False)
    assert a.metrics_listen == "127.0.0.1:9112"


@pytest.mark.parametrize("dash", ["-", "--"])
def test_go_style_single_dash(dash: str) -> None:
    a = md_main.build_parser().parse_args([
        f"{dash}listen", ":8080", f"{dash}listenReload", "127.0.0.1:1", f"{dash}answers", "/tmp/a.json",
        f"{dash}subscribe", f"{dash}reload-interval-limit", "250", f"{dash}xff", f"{dash}debug",
        f"{dash}log", "/tmp/x.log", f"{dash}pid-file", "/tmp/p"])
    assert (a.listen, a.listen_reload, a.answers, a.subscribe, a.reload_interval_limit, a.xff, a.debug,
            a.log, a.pid_file) == (":8080", "127.0.0.1:1", "/tmp/a.json", True, 250, True, True, "/tmp/x.log",
                                   "/tmp/p")


def test_demo_hook() -> None:
    class Ctx:
        workdir = "/tmp/w"

        def port(self, name: str) -> int:
            return {"metadata": 1, "metadata_reload": 2, "metadata_admin": 3}[name]

    argv = md_main.demo_argv(Ctx())
    a = md_main.build_parser().parse_args(argv)
    assert a.subscribe and a.listen == "127.0.0.1:1" and a.answers == "/tmp/w/metadata-answers.json"
    import string

    fields = {f for h in md_main.DEMO_HINTS for _, f, _, _ in string.Formatter().parse(h) if f}
    assert fields <= {"metadata", "metadata_admin_port"}  # what the demo's context provides for metadata


def test_go_bool_forms() -> None:
    p = md_main.build_parser()
    assert p.parse_args(["-xff=true", "-subscribe=false"]).xff is True
    assert p.parse_args(["-xff=true", "-subscribe=false"]).subscribe is False
    assert p.parse_args(["--subscribe", "--listen", ":1"]).subscribe is True
    with pytest.raises(SystemExit):
        p.parse_args(["-xff=maybe"])
