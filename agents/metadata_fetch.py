"""Blocking half of the metadata watch: download (or read), persist, parse and split one tree.

Runs in the watch's helper process (or a worker thread), never on a daemon's event loop, and
imports nothing heavy, so the helper starts fast. Split mode re-serialises every element of
every top-level list on its own, so the daemon decodes the tree in slices of a few
milliseconds (see :mod:`agents.metadata_watch`) instead of one C call that holds the GIL for
the whole body.

The helper keeps the last tree it split (``_prev``, named by a token). When the daemon says it
holds that tree (``base=``), only the elements that differ from it are re-serialised and sent;
the others are sent as the index of the equal element in that tree (same position, else same
``uuid``), which the daemon reuses without decoding anything. An unchanged body is not even
parsed again. The download's persist may be deferred (``defer_persist``) until the daemon has
published the new tree (:func:`persist_pending`), taking the fsync off the change's path.
"""

from __future__ import annotations

import array
import contextlib
import gc
import itertools
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["FetchError", "Fetched", "fetch", "helper_init", "persist_pending", "read_tree", "write_atomic"]


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
    token: str = ""             # names this split tree: pass it back as ``base=`` to the next fetch
    base: str = ""              # the token of the tree ``reuse`` indexes into ("" = none)
    # split mode against ``base``: key -> for each element, the index of the equal element of the
    # base tree's list, or -1 for the next element of ``blob`` (``bounds`` then covers only those)
    reuse: dict[str, array.array[int]] = field(default_factory=dict)
    persist_deferred: bool = False   # the body waits in the helper for :func:`persist_pending`


@dataclass
class _Prev:
    token: str
    body: bytes
    version: str
    small: dict[str, Any]
    order: list[str]
    lists: dict[str, tuple[list[Any], list[bytes]]]   # key -> (elements, each as it was sent)


_kept: tuple[str, dict[str, Any]] | None = None
_prev: _Prev | None = None                   # the last tree split with its lists (per process)
_unpersisted: tuple[str, bytes] | None = None  # a deferred persist: (state_file, body)
_tokens = itertools.count(1)


def persist_pending() -> str:
    """Write the body a ``fetch(defer_persist=True)`` left pending; the error message, or ""."""
    global _unpersisted
    if _unpersisted is None:
        return ""
    path, body = _unpersisted
    _unpersisted = None
    try:
        write_atomic(path, body)
    except OSError as e:
        return f"cannot persist the metadata state to {path}: {e.strerror or e}"
    return ""


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


def _persist(url: str, state_file: str, body: bytes, defer: bool) -> tuple[str, bool]:
    global _unpersisted
    if not (url and state_file):
        return "", False
    if defer:
        _unpersisted = (state_file, body)
        return "", True
    _unpersisted = None
    try:
        write_atomic(state_file, body)
    except OSError as e:  # the daemon goes on with the data; the next change tries again
        return f"cannot persist the metadata state to {state_file}: {e.strerror or e}", False
    return "", False


def fetch(url: str = "", path: str = "", *, state_file: str = "", timeout: float = 10.0,
          split: bool = True, lists: bool = True, base: str = "", defer_persist: bool = False) -> Fetched:
    """Download ``url`` (or read ``path``), check it is a metadata tree, persist it to
    ``state_file`` (downloads only; after :func:`persist_pending` with ``defer_persist``) and
    return it whole (``split=False``) or split.
    ``lists=False``: leave the top-level lists out (the caller reads the state file itself).
    ``base``: the token of the split tree the caller holds; elements equal to one of it are sent
    as its index (``Fetched.reuse``) instead of as bytes."""
    import time

    global _prev
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
    diff = split and lists
    prev = _prev if diff and base and _prev is not None and _prev.token == base else None
    if diff:
        _prev = None
    if prev is not None and body == prev.body:  # nothing changed: every element is reused
        persist_error, deferred = _persist(url, state_file, body, defer_persist)
        token = f"{os.getpid()}-{next(_tokens)}"
        _prev = _Prev(token, body, prev.version, prev.small, prev.order, prev.lists)
        return Fetched(prev.version, len(body), mtime, small=dict(prev.small), order=list(prev.order),
                       bounds={k: array.array("q", [0]) for k in prev.lists}, persist_error=persist_error,
                       token=token, base=base, persist_deferred=deferred,
                       reuse={k: array.array("q", range(len(v[0]))) for k, v in prev.lists.items()})
    was = gc.isenabled()
    gc.disable()  # a parse allocates a million acyclic objects: no collections meanwhile
    try:
        return _parse(body, url, path, state_file, mtime, split, lists, prev, defer_persist)
    finally:
        if diff:  # the kept tree is long-lived and acyclic: out of the helper's later collections
            gc.freeze()
        if was:
            gc.enable()


def _parse(body: bytes, url: str, path: str, state_file: str, mtime: float, split: bool, lists: bool,
           prev: _Prev | None, defer_persist: bool) -> Fetched:
    global _prev
    try:
        tree = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise FetchError(f"{'metadata sent' if url else path + ' holds'} invalid JSON: {e}") from None
    if not isinstance(tree, dict):
        raise FetchError(f"metadata tree must be an object, got {type(tree).__name__}")
    version = tree.get("version")
    if not isinstance(version, str | int) or isinstance(version, bool):
        raise FetchError("metadata tree has no version")
    persist_error, deferred = _persist(url, state_file, body, defer_persist and split and lists)
    if not lists:
        global _kept
        _kept = (state_file or path, tree)  # for a consumer in this same helper process: no second parse
        tree = {k: v for k, v in tree.items() if not isinstance(v, list)}
    if not split:
        return Fetched(str(version), len(body), mtime, tree=tree, persist_error=persist_error)
    token = f"{os.getpid()}-{next(_tokens)}" if lists else ""
    out = Fetched(str(version), len(body), mtime, order=list(tree), persist_error=persist_error, token=token,
                  base=prev.token if prev is not None else "", persist_deferred=deferred)
    parts: list[bytes] = []
    pos = 0
    dumps = orjson.dumps
    kept: dict[str, tuple[list[Any], list[bytes]]] = {}
    for key, value in tree.items():
        if not isinstance(value, list):
            out.small[key] = value
            continue
        raw = [dumps(item) for item in value]
        kept[key] = (value, raw)
        offs = array.array("q", [pos])
        was = prev.lists.get(key) if prev is not None else None
        if was is None:
            for b in raw:
                parts.append(b)
                pos += len(b)
                offs.append(pos)
        else:
            # compared as bytes, not as objects (1 == 1.0 == True would hide a change of type)
            old, old_raw = was
            reuse = out.reuse[key] = array.array("q", bytes(8 * len(value)))
            n_old = len(old_raw)
            by_uuid: dict[str, int] | None = None
            for i, b in enumerate(raw):
                if i < n_old and old_raw[i] == b:
                    reuse[i] = i
                    continue
                j = -1
                item = value[i]
                u = item.get("uuid") if isinstance(item, dict) else None
                if isinstance(u, str) and not (i < n_old and isinstance(old[i], dict) and old[i].get("uuid") == u):
                    # not the same element at the same place (then it changed): look it up
                    if by_uuid is None:
                        by_uuid = {}
                        for k, o in enumerate(old):
                            ou = o.get("uuid") if isinstance(o, dict) else None
                            if isinstance(ou, str):
                                by_uuid.setdefault(ou, k)
                    k2 = by_uuid.get(u, -1)
                    if k2 >= 0 and old_raw[k2] == b:
                        j = k2
                reuse[i] = j
                if j < 0:
                    parts.append(b)
                    pos += len(b)
                    offs.append(pos)
        out.bounds[key] = offs
    out.blob = b"".join(parts)
    if lists:
        _prev = _Prev(token, body, out.version, dict(out.small), list(out.order), kept)
    return out
