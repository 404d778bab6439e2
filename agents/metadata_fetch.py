"""Blocking half of the metadata watch: download (or read), persist, parse and split one tree.

Runs in the watch's helper process (or a worker thread), never on a daemon's event loop, and
imports nothing heavy, so the helper starts fast. Split mode re-serialises every element of
every top-level list on its own, so the daemon decodes the tree in slices of a few
milliseconds (see :mod:`agents.metadata_watch`) instead of one C call that holds the GIL for
the whole body.
"""

from __future__ import annotations

import array
import contextlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["FetchError", "Fetched", "fetch", "helper_init", "read_tree", "write_atomic"]


class FetchError(Exception):
    """The tree could not be fetched, read or parsed (the message says which; picklable)."""


@dataclass
class Fetched:
    version: str
    size: int                                   # bytes of JSON
    mtime: float = 0.0                          # unix time the body was fetched / the file written
    tree: dict[str, Any] | None = None          # whole tree (thread mode)
    small: dict[str, Any] = field(default_factory=dict)          # split mode: values that are not lists
    blob: bytes = b""                                            # split mode: elements, one after another
    bounds: dict[str, array.array[int]] = field(default_factory=dict)  # key -> element offsets in blob
    order: list[str] = field(default_factory=list)               # the tree's keys, in order
    persist_error: str = ""                                      # the state file could not be written


_kept: tuple[str, dict[str, Any]] | None = None


def read_tree(path: str) -> dict[str, Any]:
    """The whole tree persisted at ``path``: the one the last ``fetch(lists=False)`` of this process
    parsed for that file (taken, not copied), else read and parsed from the file."""
    global _kept
    if _kept is not None and _kept[0] == path:
        tree = _kept[1]
        _kept = None
        return tree
    f = fetch(path=path, split=False)
    assert f.tree is not None
    return f.tree


def helper_init() -> None:
    """First thing in the helper process: die with the daemon, and let serving win the CPU."""
    from agents.children import die_with_parent

    die_with_parent()
    with contextlib.suppress(OSError):
        os.nice(10)


def write_atomic(path: str, data: bytes, *, tmp: str = "") -> None:
    """Temp file, fsync, rename, fsync the directory: a crash leaves the old file or the new one.

    ``os.write`` may write only part of the data (disk nearly full, file size limit): it is called
    until all of it is out, so a short write ends in an error (ENOSPC/EFBIG) instead of a truncated
    file renamed over the last good one. A failed temp file is removed. ``tmp``: the temp file's
    name (default ``<path>.<pid>.tmp``: per process, as several daemons may share one file)."""
    tmp = tmp or f"{path}.{os.getpid()}.tmp"
    view = memoryview(data)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _download(url: str, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return bytes(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise FetchError(f"metadata has no data yet (HTTP 404 for {url})") from None
        raise FetchError(f"metadata answered HTTP {e.code} for {url}") from None
    except (OSError, ValueError) as e:
        raise FetchError(f"metadata unreachable at {url}: {e}") from None


def fetch(url: str = "", path: str = "", *, state_file: str = "", timeout: float = 10.0,
          split: bool = True, lists: bool = True) -> Fetched:
    """Download ``url`` (or read ``path``), check it is a metadata tree, persist it to
    ``state_file`` (downloads only) and return it whole (``split=False``) or split.
    ``lists=False``: leave the top-level lists out (the caller reads the state file itself)."""
    import time

    mtime = time.time()
    if url:
        body = _download(url, timeout)
    else:
        try:
            with open(path, "rb") as fh:
                body = fh.read()
            mtime = os.stat(path).st_mtime
        except OSError as e:
            raise FetchError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        tree = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise FetchError(f"{'metadata sent' if url else path + ' holds'} invalid JSON: {e}") from None
    if not isinstance(tree, dict):
        raise FetchError(f"metadata tree must be an object, got {type(tree).__name__}")
    version = tree.get("version")
    if not isinstance(version, str | int) or isinstance(version, bool):
        raise FetchError("metadata tree has no version")
    persist_error = ""
    if url and state_file:
        try:
            write_atomic(state_file, body)
        except OSError as e:  # the daemon goes on with the data; the next change tries again
            persist_error = f"cannot persist the metadata state to {state_file}: {e.strerror or e}"
    if not lists:
        global _kept
        _kept = (state_file or path, tree)  # for a consumer in this same helper process: no second parse
        tree = {k: v for k, v in tree.items() if not isinstance(v, list)}
    if not split:
        return Fetched(str(version), len(body), mtime, tree=tree, persist_error=persist_error)
    out = Fetched(str(version), len(body), mtime, order=list(tree), persist_error=persist_error)
    parts: list[bytes] = []
    pos = 0
    for key, value in tree.items():
        if not isinstance(value, list):
            out.small[key] = value
            continue
        offs = array.array("q", [pos])
        for item in value:
            b = orjson.dumps(item)
            parts.append(b)
            pos += len(b)
            offs.append(pos)
        out.bounds[key] = offs
    out.blob = b"".join(parts)
    return out
