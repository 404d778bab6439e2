"""Atomic file writes and the CNI volume applier.

Every file is written to a temporary name in the same directory, fsynced, given its mode and
renamed over the old one, so a reader (kubelet, a CNI runtime) never sees a partial JSON.
``managed.d`` is swapped with a rename over the symlink. What Corral wrote is listed in a
manifest in the volume (``.corral-manifest.json``); a file or directory that left metadata is
removed only if the manifest says it is ours, so foreign files are never deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from agents.errors import TransportError
from agents.log import get_logger
from netmanager.cniconf import CniFiles

__all__ = ["MANIFEST", "apply_cni", "write_atomic"]

log = get_logger(__name__)
MANIFEST = ".corral-manifest.json"


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Write ``data`` to ``path`` atomically; False (and no write) when it is already there."""
    try:
        st = path.lstat()
        if path.is_file() and not path.is_symlink() and (st.st_mode & 0o7777) == mode and \
                st.st_size == len(data) and path.read_bytes() == data:
            return False
        if path.is_dir() and not path.is_symlink():
            raise TransportError(f"{path} is a directory")
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.corral-tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, data)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise TransportError(f"write {path}: {e}") from e
    return True


def _swap_symlink(link: Path, target: str) -> bool:
    if link.is_symlink() and os.readlink(link) == target:
        return False
    if link.exists() and not link.is_symlink():
        if link.resolve() == (link.parent / target).resolve():
            return False
        raise TransportError(f"{link} exists and is not a symlink; leaving it")
    tmp = link.with_name(f".{link.name}.corral-tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except OSError as e:
        raise TransportError(f"symlink {link} -> {target}: {e}") from e
    return True


def apply_cni(root: Path, want: CniFiles) -> list[str]:
    """Make the volume at ``root`` hold ``want``; return what changed (for the log)."""
    changed: list[str] = []
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / MANIFEST
    try:
        old = json.loads(manifest.read_text())
        old_files, old_dirs = set(old.get("files", [])), set(old.get("dirs", []))
    except (OSError, ValueError, AttributeError):
        old_files, old_dirs = set(), set()
    for d in want.dirs:
        p = root / d
        p.mkdir(mode=0o700, exist_ok=True)
        if (p.stat().st_mode & 0o777) != 0o700:
            p.chmod(0o700)
    errors: list[str] = []
    for f in want.files:
        try:
            if write_atomic(root / f.path, f.content, f.mode):
                changed.append(f"wrote {f.path}")
        except TransportError as e:  # one bad file must not stop the others
            errors.append(str(e))
    if want.managed is not None:
        try:
            if _swap_symlink(root / "managed.d", want.managed):
                changed.append(f"managed.d -> {want.managed}")
        except TransportError as e:
            errors.append(str(e))
    new_files = {f.path for f in want.files}
    for rel in sorted(old_files - new_files):
        p = root / rel
        if p.is_file() and not p.is_symlink():
            p.unlink()
            changed.append(f"removed {rel}")
    for rel in sorted(old_dirs - set(want.dirs)):
        with contextlib.suppress(OSError):  # not empty: someone else's files are in it
            (root / rel).rmdir()
            changed.append(f"removed {rel}/")
    if old_files != new_files or old_dirs != set(want.dirs) or not manifest.exists():
        write_atomic(manifest, json.dumps({"files": sorted(new_files), "dirs": sorted(want.dirs)},
                                          indent=2).encode(), 0o600)
    if errors:
        raise TransportError("; ".join(errors))
    return changed
