"""A container's init process from a (fake) cgroup file system and /proc, by container ID."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from netmanager.cgroups import CgroupLocator, cgroup_roots

CID = "4c76bc1e512f423bb01d20bf79ae661b4bedcf3988ddff87c3132a3d1bfd3424"
OTHER = "9" * 64


class Host:
    """A cgroup hierarchy under ``root`` and a /proc under ``proc``: processes with a parent, a
    cgroup line and a network namespace file."""

    def __init__(self, tmp: Path) -> None:
        self.root, self.proc = tmp / "cgroup", tmp / "proc"

    def cgroup(self, rel: str, *pids: int) -> None:
        d = self.root / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
        for p in pids:
            self.process(p, 1, f"0::/{rel}")

    def process(self, pid: int, ppid: int, cgroup: str) -> None:
        d = self.proc / str(pid)
        (d / "ns").mkdir(parents=True, exist_ok=True)
        (d / "ns" / "net").write_text(f"netns of {pid}")
        (d / "stat").write_text(f"{pid} (sleep) S {ppid} {pid} {pid} 0 -1\n")
        (d / "cgroup").write_text(cgroup + "\n")

    def locator(self) -> CgroupLocator:
        return CgroupLocator([str(self.root)], proc=str(self.proc))


def found(loc: CgroupLocator, cid: str = CID) -> int | None:
    got = loc.find(cid)
    if got is None:
        return None
    pid, fd = got
    try:
        assert os.read(fd, 100) == f"netns of {pid}".encode()  # the fd is that process's namespace
    finally:
        os.close(fd)
    return pid


@pytest.mark.parametrize("rel", [f"libpod_parent/libpod-{CID}", f"machine.slice/libpod-{CID}.scope",
                                 f"system.slice/docker-{CID}.scope", f"docker/{CID}"])
def test_engine_layouts(tmp_path: Path, rel: str) -> None:
    h = Host(tmp_path)
    h.cgroup(rel, 4242)
    assert found(h.locator()) == 4242


def test_conmon_scope_and_other_containers_do_not_match(tmp_path: Path) -> None:
    h = Host(tmp_path)
    h.cgroup(f"machine.slice/libpod-conmon-{CID}.scope", 100)
    h.cgroup(f"libpod_parent/libpod-{OTHER}", 200)
    assert found(h.locator()) is None


def test_init_is_the_process_whose_parent_is_outside(tmp_path: Path) -> None:
    h = Host(tmp_path)
    rel = f"libpod_parent/libpod-{CID}"
    h.cgroup(rel, 30, 10, 20)
    h.process(10, 9, f"0::/{rel}")  # 9 (conmon) is not in the cgroup: 10 is the container's init
    h.process(20, 10, f"0::/{rel}")
    h.process(30, 20, f"0::/{rel}")
    assert found(h.locator()) == 10


def test_processes_in_a_child_cgroup(tmp_path: Path) -> None:
    h = Host(tmp_path)
    h.cgroup(f"machine.slice/libpod-{CID}.scope")
    h.cgroup(f"machine.slice/libpod-{CID}.scope/container", 77)
    assert found(h.locator()) == 77


def test_gone_empty_or_reused(tmp_path: Path) -> None:
    h = Host(tmp_path)
    loc = h.locator()
    assert found(loc) is None  # no cgroup
    h.cgroup(f"docker/{CID}")
    assert found(loc) is None  # empty: the container has exited
    h.cgroup(f"docker/{CID}", 55)
    h.process(55, 1, "0::/user.slice")  # the PID now belongs to something else
    assert found(loc) is None
    (h.proc / "55").rename(h.proc / "gone")
    assert found(loc) is None  # the process went between the read and the open


def test_layout_learnt_from_a_pid_the_engine_reported(tmp_path: Path) -> None:
    h = Host(tmp_path)
    h.cgroup(f"kubepods/besteffort/pod1/{OTHER}", 300)
    loc = h.locator()
    assert found(loc, OTHER) is None
    loc.learn(OTHER, 300)
    h.cgroup(f"kubepods/besteffort/pod1/{CID}", 301)
    assert found(loc) == 301


def test_roots_from_mountinfo(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
        "31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
        "32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd\n"
        "33 30 0:29 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu\n"
        "34 30 0:30 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids\n"
        "35 30 0:31 /docker/abc /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n")
    # the memory mount shows a sub-tree (a private cgroup namespace): not searched
    assert cgroup_roots(str(mi)) == ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/pids", "/sys/fs/cgroup/systemd"]
    assert cgroup_roots(str(tmp_path / "none")) == []
