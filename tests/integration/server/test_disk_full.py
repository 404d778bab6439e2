"""A full disk under the stand-in's state database: the refused write is rolled back in memory
and in SQLite, the client is told "disk full" (507), later writes are refused the same clean way
(not wedged in autocommit), and everything works again once space returns - no restart.

The disk is a 1 MiB tmpfs mounted in a private mount namespace around the server process only
(``unshare -m``); the test fills and frees it through ``/proc/<pid>/root``."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

import pytest

from standin.ctl import CtlError
from tests.helpers.procs import ROOT, Proc, corral_argv, wait_http
from tests.helpers.standin import StandIn

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="needs root and unshare to mount a private tmpfs")


def _fill(path: Path) -> int:
    n = 0
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
                n += 65536
        except OSError as e:
            assert e.errno in (errno.ENOSPC, errno.EDQUOT), e
    return n


def test_disk_full_is_rolled_back_reported_and_recovered() -> None:
    s = StandIn(start=False)
    disk = s.dir / "disk"
    disk.mkdir()
    argv = list(s.argv)
    argv[argv.index("--state") + 1] = str(disk / "state.db")
    shell = f"mount -t tmpfs -o size=1m corral-test-disk {disk} && exec \"$0\" \"$@\""
    s.proc = Proc(["unshare", "-m", "--propagation", "private", "sh", "-c", shell, *corral_argv(*argv)],
                  env={"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}, name="standin-diskfull")
    try:
        wait_http(f"{s.admin_url}/healthz", timeout=15)
        s.ctl("host", "add", "--name", "node-a", "--agent-ip", "127.0.0.11")
        s.ctl("container", "create", "--name", "before", "--host", "node-a")
        rev = s.ctl("revision")
        inside = Path(f"/proc/{s.proc.pid}/root") / str(disk).lstrip("/")
        filler = inside / "filler"
        assert _fill(filler) > 0
        big = "x" * 200_000  # more than any free page left: the database must grow
        for _ in range(2):  # refused cleanly, and again (not "cannot commit - no transaction is active")
            with pytest.raises(CtlError) as e:
                s.ctl("container", "create", "--name", "ghost", "--host", "node-a", "--label", f"big={big}")
            assert e.value.status == 507 and "disk full" in str(e.value), (e.value.status, str(e.value))
            names = [c["name"] for c in s.ctl("container", "ls")]
            assert "ghost" not in names and "before" in names  # no ghost in memory
            assert s.ctl("revision") == rev
        assert s.proc.alive()
        filler.unlink()  # space returns
        s.ctl("container", "create", "--name", "after", "--host", "node-a", "--label", f"big={big}")
        names = [c["name"] for c in s.ctl("container", "ls")]
        assert "after" in names and "ghost" not in names
        assert s.ctl("revision") != rev
        assert s.proc.stop() == 0
    finally:
        with contextlib.suppress(Exception):
            s.proc.stop()
        shutil.rmtree(s.dir, ignore_errors=True)
