"""Parsing a metadata request head (pure, no asyncio): shared by the HTTP listener and the
first answers served at start (:mod:`metadata.early`)."""

from __future__ import annotations

from typing import Any

__all__ = ["BADPATH", "BAD_HEAD", "LOOKUP", "NOTFOUND", "parse_head"]

LOOKUP, NOTFOUND, BADPATH = 0, 1, 2  # what a request asks for: a lookup, a plain 404, a 400
BAD_HEAD: Any = ("bad",)


def parse_head(head: bytes, fmt_for: Any) -> Any:
    """Request line and headers -> (method, path, query, fmt, xff, ctr, keep, content-length, kind),
    or ``BAD_HEAD``. Pure: the result depends on the bytes only, so it is memoised per head."""
    lines = head.split(b"\r\n")
    rl = lines[0].split(b" ")
    if len(rl) != 3 or not rl[2].startswith(b"HTTP/1."):
        return BAD_HEAD
    method, target, ver = rl
    accept = xff = ctr = None
    keep = ver == b"HTTP/1.1"
    clen = 0
    for ln in lines[1:]:
        name, sep, value = ln.partition(b":")
        if not sep:
            return BAD_HEAD
        n = name.lower()
        if n == b"accept":
            accept = value.strip()
        elif n == b"x-forwarded-for":
            xff = value.strip()
        elif n == b"x-corral-container":
            ctr = value.strip()
        elif n == b"connection":
            v = value.strip().lower()
            if v == b"close":
                keep = False
            elif v == b"keep-alive":
                keep = True
        elif n == b"content-length":
            try:
                clen = int(value.strip())
            except ValueError:
                return BAD_HEAD
            if clen < 0:
                return BAD_HEAD
        elif n == b"transfer-encoding":
            keep = False  # we never read request bodies; close after answering
    fmt = fmt_for(accept)
    if method != b"GET" and method != b"HEAD":
        return (method, "", "", fmt, xff, ctr, keep, clen, NOTFOUND)
    if target.startswith(b"http://") or target.startswith(b"https://"):
        slash = target.find(b"/", target.find(b"//") + 2)
        target = target[slash:] if slash >= 0 else b"/"
    if not target.startswith(b"/"):
        return (method, "", "", fmt, xff, ctr, False, clen, BADPATH)
    try:
        t = target.decode("utf-8")
    except UnicodeDecodeError:
        t = target.decode("latin-1")
    path, _, query = t.partition("?")
    kind = NOTFOUND if path == "/favicon.ico" else LOOKUP
    return (method, path, query, fmt, xff or None, ctr or None, keep, clen, kind)
