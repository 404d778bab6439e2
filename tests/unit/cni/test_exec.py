"""The plugins' own process runner (no subprocess) and os stand-in (no os) on the plugin path."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

import pytest
from corral_cni import _exec
from corral_cni import _os as cos


def test_run_feeds_stdin_and_collects_both_outputs_without_deadlock() -> None:
    big = b"x" * 300_000  # more than a pipe holds, both ways
    rc, out, err = _exec.run(["sh", "-c", "head -c 300000 /dev/zero >&2; cat; echo done >&2; exit 3"], big)
    assert (rc, out, err) == (3, big, b"\0" * 300_000 + b"done\n")


def test_run_when_the_program_ignores_stdin_or_dies() -> None:
    assert _exec.run(["true"], b"y" * 300_000) == (0, b"", b"")
    rc, _, _ = _exec.run(["sh", "-c", "kill -9 $$"])
    assert rc == -9


def test_run_passes_env_and_searches_path() -> None:
    rc, out, _ = _exec.run(["sh", "-c", 'echo "$FOO"'], env={"FOO": "bar", "PATH": os.environ["PATH"]})
    assert (rc, out) == (0, b"bar\n")
    with pytest.raises(FileNotFoundError):
        _exec.run(["corral-no-such-program-anywhere"])


@pytest.mark.parametrize("parts", [("a", "b"), ("a/", "b"), ("/a", "/b", "c"), ("", "x"), ("a", ""), ("/", "x")])
def test_join_is_posixpath_join(parts: tuple[str, ...]) -> None:
    assert cos.join(*parts) == posixpath.join(*parts)


def test_makedirs_isdir_isfile(tmp_path: Path) -> None:
    d = str(tmp_path / "a" / "b" / "c")
    cos.makedirs(d, 0o755, exist_ok=True)
    cos.makedirs(d, 0o755, exist_ok=True)
    assert cos.isdir(d) and not cos.isfile(d)
    (tmp_path / "f").write_text("x")
    assert cos.isfile(str(tmp_path / "f")) and not cos.isdir(str(tmp_path / "f"))
    with pytest.raises(FileExistsError):
        cos.makedirs(str(tmp_path / "f"), exist_ok=True)
    assert not cos.isdir(str(tmp_path / "missing"))
