"""Request target -> complete HTTP response bytes (pure; §2.2–§2.6).

:func:`respond` decides everything about a metadata request except the connection handling:
path cleaning (301), percent-decoding (400), the version segment, the client tree, the walk
with its single lower-case retry, rendering and headers. Its result is a :class:`Response`
whose ``head`` holds the status line and every header but ``Date``/``Connection``, so the
HTTP layer caches it per (path, format, client tree) for the lifetime of a snapshot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from metadata.render import CONTENT_TYPES, TEXT, Chunks, error_body, needs_slices, render
from metadata.store import Snapshot

__all__ = ["MISSING", "Deferred", "Response", "bad_request", "clean_path", "finish", "respond", "router_404", "walk"]

MISSING: Any = object()
_REASONS = {200: "OK", 301: "Moved Permanently", 400: "Bad Request", 404: "Not Found",
            500: "Internal Server Error", 503: "Service Unavailable"}
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_INDEX = re.compile(r"^[+-]?[0-9]+$")
_INT_MAX = 2**63


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    head: bytes  # status line + headers (each ending CRLF), without Date and the blank line
    body: bytes | Chunks  # a big rendered body stays in the pieces it was rendered in (never joined)
    family: str = "other"
    close: bool = False
    value_text: bytes | None = None  # text form of the value (long-poll comparisons); None if missing


@dataclass(frozen=True, slots=True)
class Deferred:
    """A big JSON/YAML value: the HTTP layer renders it in slices, then calls :func:`finish`."""

    value: Any
    fmt: str
    family: str


def finish(d: Deferred, body: bytes | Chunks) -> Response:
    hdrs = [_CORS, (b"Content-Type", CONTENT_TYPES[d.fmt])]
    return Response(200, _head(200, hdrs, len(body)), body, d.family, value_text=render(d.value, TEXT))


def _head(status: int, headers: list[tuple[bytes, bytes]], body_len: int) -> bytes:
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, "Unknown").encode())]
    for k, v in headers:
        parts.append(k + b": " + v + b"\r\n")
    parts.append(b"Content-Length: %d\r\n" % body_len)
    return b"".join(parts)


_CORS = (b"Access-Control-Allow-Origin", b"*")
_CT_TEXT = (b"Content-Type", CONTENT_TYPES[TEXT])
_NOSNIFF = (b"X-Content-Type-Options", b"nosniff")


def router_404() -> Response:
    body = b"404 page not found\n"
    return Response(404, _head(404, [_CT_TEXT, _NOSNIFF], len(body)), body, "other")


def bad_request() -> Response:
    body = b"400 Bad Request"
    return Response(400, _head(400, [_CT_TEXT, (b"Connection", b"close")], len(body)), body, "other",
                    close=True)


def unavailable(msg: str = "too many waiters") -> Response:
    body = msg.encode() + b"\n"
    return Response(503, _head(503, [_CT_TEXT, (b"Retry-After", b"1")], len(body)), body, "other")


def _error(status: int, message: str, fmt: str, family: str) -> Response:
    body = error_body(status, message, fmt)
    return Response(status, _head(status, [_CORS, _CT_TEXT, _NOSNIFF], len(body)), body, family)


def _ok(value: Any, fmt: str, family: str) -> Response:
    body = render(value, fmt)
    hdrs = [_CORS]
    if fmt != TEXT or body:  # Go sniffs no Content-Type for an empty body (null, "", empty map)
        hdrs.append((b"Content-Type", CONTENT_TYPES[fmt]))
    vt = body if fmt == TEXT else render(value, TEXT)
    return Response(200, _head(200, hdrs, len(body)), body, family, value_text=vt)


def clean_path(p: str) -> str:
    """Go's path.Clean plus gorilla/mux's rule of keeping one trailing slash."""
    if p == "":
        return "/"
    if p[0] != "/":
        p = "/" + p
    out: list[str] = []
    for seg in p.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    np = "/" + "/".join(out)
    if p.endswith("/") and np != "/":
        np += "/"
    return np


def _index(seg: str) -> int | None:
    if not _INDEX.match(seg):
        return None
    n = int(seg)
    return n if -_INT_MAX <= n < _INT_MAX else None


def walk(node: Any, segs: list[str]) -> Any:
    for s in segs:
        if isinstance(node, dict):
            node = node.get(s, MISSING)
            if node is MISSING:
                return MISSING
        elif isinstance(node, list):
            i = _index(s)
            if i is not None:
                if 0 <= i < len(node):
                    node = node[i]
                else:
                    return MISSING
            else:
                for el in node:
                    if isinstance(el, dict) and (el.get("name") == s or el.get("uuid") == s):
                        node = el
                        break
                else:
                    return MISSING
        else:
            return MISSING
    return node


def _decode(seg: str) -> str:
    return unquote_to_bytes(seg).decode("utf-8", "surrogateescape")


def root_listing(snap: Snapshot, fmt: str) -> Response:
    names = sorted(set(snap.trees) | {"latest"})
    return _ok({n: "/" + n for n in names}, fmt, "root")


def respond(snap: Snapshot, path: str, query: str, fmt: str, ip: str,
            defer: bool = False) -> tuple[Response | Deferred, bool]:
    """The response to ``GET path?query`` from ``ip`` in format ``fmt``; (response, cacheable).
    With ``defer``, a value too big to render in one go comes back as :class:`Deferred`."""
    if path == "/":
        return root_listing(snap, fmt), True
    cp = clean_path(path)
    if cp != path:
        loc = cp + ("?" + query if query else "")
        if "\r" in loc or "\n" in loc:
            return bad_request(), False
        h = _head(301, [(b"Location", loc.encode("utf-8", "surrogateescape"))], 0)
        return Response(301, h, b"", "other"), False
    if _BAD_ESCAPE.search(path):
        return bad_request(), True
    raw = path[1:].rstrip("/").split("/")
    segs = [_decode(s) for s in raw]
    vname = segs[0]
    family = segs[1] if len(segs) > 1 else "root"
    if family not in ("self", "containers", "services", "stacks", "hosts", "networks", "version", "root"):
        family = "other"
    api = snap.resolve(vname)
    if api is None:
        if vname == "latest":
            return _error(404, "Not found", fmt, family), True
        return _error(404, "Invalid version", fmt, "other"), True
    tree = snap.tree(api, snap.client_key(api, ip))
    if tree is None:
        return _error(404, "Not found", fmt, family), True
    rest = segs[1:]
    val = walk(tree, rest)
    if val is MISSING:
        low = [s.lower() for s in rest]
        if low != rest:
            val = walk(tree, low)
    if val is MISSING:
        return _error(404, "Not found", fmt, family), True
    if defer and fmt != TEXT and needs_slices(val, fmt):
        return Deferred(val, fmt, family), False
    try:
        return _ok(val, fmt, family), True
    except (TypeError, ValueError, OverflowError, RecursionError):  # pragma: no cover - defensive
        return _error(500, "Internal error", fmt, family), True
