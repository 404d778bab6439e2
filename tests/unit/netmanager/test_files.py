"""Atomic writes and the CNI volume applier on a temporary directory (no root)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from netmanager.cniconf import CniFile, CniFiles
from netmanager.files import apply_cni, write_atomic


def test_write_atomic_skips_identical(tmp_path: Path) -> None:
    p = tmp_path / "f"
    assert write_atomic(p, b"a", 0o600)
    assert not write_atomic(p, b"a", 0o600)
    assert write_atomic(p, b"a", 0o644)  # mode change is a change
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert [x.name for x in tmp_path.iterdir()] == ["f"]  # no temp file left


def test_apply_removes_only_what_it_wrote(tmp_path: Path) -> None:
    want = CniFiles(("a.d",), (CniFile("a.d/1.conf", b"{}", 0o600), CniFile("a.d/2.conf", b"{}", 0o600)), "a.d")
    assert apply_cni(tmp_path, want)
    (tmp_path / "a.d" / "foreign.conf").write_text("x")
    assert apply_cni(tmp_path, want) == []  # nothing changed: nothing written
    want2 = CniFiles(("a.d", "b.d"), (CniFile("a.d/1.conf", b"{}", 0o600), CniFile("b.d/x", b"1", 0o600)),
                     "b.d")
    changes = apply_cni(tmp_path, want2)
    assert "removed a.d/2.conf" in changes and "managed.d -> b.d" in changes
    assert sorted(p.name for p in (tmp_path / "a.d").iterdir()) == ["1.conf", "foreign.conf"]
    assert os.readlink(tmp_path / "managed.d") == "b.d"
    assert stat.S_IMODE((tmp_path / "b.d").stat().st_mode) == 0o700


def test_a_concurrent_reader_never_sees_a_partial_file(tmp_path: Path) -> None:
    """Spec §12.11: configs are swapped whole (temp file + rename), so a reader polling the file
    while it is rewritten always parses a complete JSON document."""
    import json
    import threading

    p = tmp_path / "10-rancher.conf"
    write_atomic(p, json.dumps({"n": 0, "pad": "x" * 65536}).encode(), 0o600)
    stop = threading.Event()
    seen: list[int] = []
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(json.loads(p.read_bytes())["n"])
            except ValueError as e:
                bad.append(str(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for n in range(1, 200):
            write_atomic(p, json.dumps({"n": n, "pad": "x" * (65536 + n)}).encode(), 0o600)
    finally:
        stop.set()
        t.join()
    assert not bad and seen and seen == sorted(seen)
