"""Pure rendering of metadata values: text, JSON, YAML, errors and content negotiation (§2.6).

No I/O. Every function takes a value from a snapshot tree and returns bytes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Generator
from functools import lru_cache
from typing import Any
from urllib.parse import quote_plus

import orjson

from metadata.store import NIL_MAP, NilMap

__all__ = [
    "FORMATS",
    "Chunks",
    "error_body",
    "is_big",
    "needs_slices",
    "negotiate",
    "render",
    "render_json",
    "render_steps",
    "render_text",
    "render_yaml",
    "text_scalar",
]

TEXT, JSON, YAML = "text", "json", "yaml"
FORMATS = (TEXT, JSON, YAML)
# Offers in the original's order (§2.6) and the format each maps to.
OFFERS: tuple[tuple[str, str], ...] = (
    ("text/plain", TEXT),
    ("application/json", JSON),
    ("application/yaml", YAML),
    ("application/x-yaml", YAML),
    ("text/yaml", YAML),
    ("text/x-yaml", YAML),
)
CONTENT_TYPES = {
    TEXT: b"text/plain; charset=utf-8",
    JSON: b"application/json",
    YAML: b"application/yaml",
}


def _parse_accept(header: str) -> list[tuple[str, float]]:
    specs: list[tuple[str, float]] = []
    for part in header.split(","):
        fields = part.split(";")
        value = fields[0].strip()
        if not value or "/" not in value:
            continue
        q = 1.0
        for p in fields[1:]:
            k, _, v = p.partition("=")
            if k.strip() == "q":
                try:
                    q = float(v.strip())
                except ValueError:
                    q = 0.0
                if not (0.0 <= q <= 1.0) or math.isnan(q):
                    q = 0.0
        specs.append((value, q))
    return specs


def negotiate(accept: str | None) -> str:
    """The format for an ``Accept`` header, as gddo's NegotiateContentType picks it:
    highest q wins, ties go to the earlier offer, more specific beats wildcard, case-sensitive."""
    if not accept:
        return TEXT
    best, best_q, best_wild = TEXT, -1.0, 3
    specs = _parse_accept(accept)
    for offer, fmt in OFFERS:
        for value, q in specs:
            if q == 0.0 or q < best_q:
                continue
            if value == "*/*":
                if q > best_q or best_wild > 2:
                    best, best_q, best_wild = fmt, q, 2
            elif value.endswith("/*"):
                if offer.startswith(value[:-1]) and (q > best_q or best_wild > 1):
                    best, best_q, best_wild = fmt, q, 1
            elif value == offer and (q > best_q or best_wild > 0):
                best, best_q, best_wild = fmt, q, 0
    return best


def text_scalar(v: Any) -> str:
    """Text form of a scalar (no trailing newline)."""
    if v is None or v is NIL_MAP:
        return ""
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        s = f"{v:.6f}".rstrip("0").rstrip(".")
        return "0" if s in ("-0", "") else s
    return str(v)


def _esc(s: str) -> str:
    return quote_plus(s, safe="")


def render_text(v: Any) -> bytes:
    if isinstance(v, dict):
        lines = []
        for k, val in v.items():
            e = _esc(str(k))
            if isinstance(val, dict | list | NilMap):
                e += "/"
            lines.append(e)
        lines.sort(key=lambda s: s.encode("utf-8", "surrogateescape"))
        return "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape")
    if isinstance(v, list):
        out = []
        for i, el in enumerate(v):
            if isinstance(el, dict):
                name, uuid = el.get("name"), el.get("uuid")
                if isinstance(name, str):
                    out.append(f"{i}={_esc(name)}\n")
                elif isinstance(uuid, str):
                    out.append(f"{i}={uuid}\n")
                else:
                    out.append(f"{i}/\n")
            elif isinstance(el, list):
                out.append(f"{i}/\n")
            else:
                out.append(f"{i}\n")
        return "".join(out).encode("utf-8", "surrogateescape")
    return text_scalar(v).encode("utf-8", "surrogateescape")


_JSON_ESC = ((b"<", b"\\u003c"), (b">", b"\\u003e"), (b"&", b"\\u0026"),
             ("\u2028".encode(), b"\\u2028"), ("\u2029".encode(), b"\\u2029"))


def _json_default(o: Any) -> Any:
    if o is NIL_MAP:
        return None  # a nil map is null in Go's JSON
    raise TypeError(type(o).__name__)


def _json_default_slow(o: Any) -> Any:
    return None if o is NIL_MAP else str(o)


def render_json(v: Any) -> bytes:
    """Compact JSON, keys sorted, HTML characters escaped as Go's encoder does, no newline."""
    try:
        out = orjson.dumps(v, default=_json_default, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # integers beyond 64 bits, odd keys: the slow, general encoder
        out = json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                         default=_json_default_slow).encode("utf-8", "surrogateescape")
    for a, b in _JSON_ESC:
        if a in out:
            out = out.replace(a, b)
    return out


_STR_TAG = "tag:yaml.org,2002:str"
_GO_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")  # yaml.v2 reads these as floats


@lru_cache(maxsize=1)
def _dumper() -> Any:
    """The YAML dumper, built on first use (PyYAML is imported only when YAML is asked for).

    Block style, sorted keys, and never anchors/aliases: the trees share objects (a service's
    containers are the same dicts as /containers) but clients expect plain copies. Strings are
    quoted as the original's emitter quotes them: one that would read back as something else
    (``'1'``, ``'true'``, ``'null'``, ``''``, and the Go reader's floats such as ``'1e5'``) or
    cannot stay plain (``'a: b'``) is single-quoted, ``'`` doubled inside; double quotes only
    where escapes are needed (control characters). A nil map is ``{}``."""
    import yaml

    base: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's emitter when available

    class Dumper(base):  # type: ignore[misc, valid-type]
        def ignore_aliases(self, data: Any) -> bool:
            return True

    def represent_str(dumper: Any, data: str) -> Any:
        style = None
        if dumper.resolve(yaml.ScalarNode, data, (True, False)) != _STR_TAG or _GO_FLOAT.match(data):
            style = "'"  # the emitter still picks double quotes when escapes are needed
        return dumper.represent_scalar(_STR_TAG, data, style=style)

    def represent_nil_map(dumper: Any, data: Any) -> Any:
        return dumper.represent_dict({})

    Dumper.add_representer(str, represent_str)
    Dumper.add_representer(NilMap, represent_nil_map)
    return Dumper


def yaml_module() -> Any:
    """PyYAML, loaded (with the dumper) on first use."""
    import yaml

    _dumper()
    return yaml


def render_yaml(v: Any) -> bytes:
    text: str = yaml_module().dump(v, Dumper=_dumper(), default_flow_style=False, sort_keys=True,
                                   allow_unicode=True)
    return text.encode("utf-8")


# ---------------------------------------------------------------- big values, rendered in slices

BIG_LIST = 256  # a list this long (or a map holding a list longer than SPLIT) is rendered in slices
SPLIT = 64
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def is_big(v: Any) -> bool:
    """Whether rendering ``v`` as JSON/YAML could hold the loop for long (whole trees, big lists)."""
    if isinstance(v, list):
        return len(v) > BIG_LIST
    if isinstance(v, dict):
        return any(isinstance(x, list) and len(x) > SPLIT for x in v.values())
    return False


def needs_slices(v: Any, fmt: str) -> bool:
    """Whether to render ``v`` in slices off the request path rather than in one go."""
    if fmt == JSON:
        return is_big(v)
    if fmt == YAML:  # PyYAML is ~50x slower than orjson: anything with nested maps goes in slices
        return _dict_list(v) or _heavy_map(v)
    return False


def _json_parts(v: Any, out: list[bytes], every: int) -> Generator[None, None, None]:
    if isinstance(v, list) and len(v) > SPLIT:
        out.append(b"[")
        for i, el in enumerate(v):
            if i:
                out.append(b",")
            if is_big(el):
                yield from _json_parts(el, out, every)
            else:
                out.append(render_json(el))
            if i % every == every - 1:
                yield
        out.append(b"]")
    elif isinstance(v, dict) and is_big(v) and all(isinstance(k, str) for k in v):
        out.append(b"{")
        for i, k in enumerate(sorted(v)):
            if i:
                out.append(b",")
            out.append(render_json(k) + b":")
            yield from _json_parts(v[k], out, every)
        out.append(b"}")
    else:
        out.append(render_json(v))


@lru_cache(maxsize=4096)
def _yaml_key(k: str) -> bytes | None:
    """``k`` as PyYAML writes it before ``:`` (``'on'``, ``'null'`` come quoted: YAML 1.1 booleans
    and nulls), or None when it is not a one-line simple key (PyYAML's ``? `` form past 128 chars)."""
    text = render_yaml({k: None})
    if not text.endswith(b": null\n") or b"\n" in text[:-1]:
        return None
    return text[:-len(b": null\n")]


def _plain_map(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and all(
        isinstance(k, str) and _PLAIN_KEY.match(k) and _yaml_key(k) is not None for k in v)


def _dict_list(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and any(isinstance(e, dict) for e in x)


def _heavy_map(v: Any) -> bool:
    """A plain-keyed map holding a list of maps (a stack, a service, a version tree)."""
    return _plain_map(v) and any(_dict_list(x) or _heavy_map(x) for x in v.values())


def _indent(text: bytes, first: bytes, rest: bytes) -> bytes:
    lines = text.split(b"\n")
    tail = lines[-1] == b""
    body = [first + lines[0]] + [rest + ln if ln else ln for ln in lines[1:-1 if tail else None]]
    return b"\n".join(body) + (b"\n" if tail else b"")


def _yaml_parts(v: Any, out: list[bytes], every: int) -> Generator[None, None, None]:
    """Block YAML of ``v`` in slices: sequences item by item, and maps holding long lists key by
    key, recursing into items that are themselves heavy (a stack with its services...)."""
    if isinstance(v, list) and v:
        for i, el in enumerate(v):  # a block sequence is the concatenation of one-item sequences
            if _heavy_map(el):
                sub: list[bytes] = []
                yield from _yaml_parts(el, sub, every)
                out.append(_indent(b"".join(sub), b"- ", b"  "))
            else:
                out.append(render_yaml([el]))
            if i % every == every - 1:
                yield
    elif _plain_map(v):
        for k in sorted(v):
            x = v[k]
            key = _yaml_key(k) or k.encode()  # never None here: _plain_map checked every key
            if _dict_list(x):
                out.append(key + b":\n")  # PyYAML's indentless sequence under a key
                yield from _yaml_parts(x, out, every)
            elif _heavy_map(x):
                sub2: list[bytes] = []
                yield from _yaml_parts(x, sub2, every)
                out.append(key + b":\n" + _indent(b"".join(sub2), b"  ", b"  "))
            else:
                out.append(render_yaml({k: x}))
            yield
    else:
        out.append(render_yaml(v))


PIECE = 256 * 1024  # a big body is kept in pieces of about this size


class Chunks:
    """A big rendered body, kept as the pieces it was rendered in (each about ``PIECE`` bytes):
    the HTTP layer writes them one by one. One contiguous 16 MB body (5,000 containers) cost a
    copy of everything so far whenever the buffer it grew in moved (4-6 ms in one step), or
    ~50 ms when joined at the end."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = tuple(parts)
        self.size = sum(map(len, parts))

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Chunks):
            other = bytes(other)
        if isinstance(other, bytes | bytearray):
            return len(other) == self.size and bytes(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def render_steps(v: Any, fmt: str, every: int = 1) -> Generator[None, None, bytes | Chunks]:
    """Render ``v`` like :func:`render`, yielding every ``every`` list elements (big values).

    The result is :class:`Chunks` when it takes more than one piece, else ``bytes``."""
    out: list[bytes] = []
    if fmt == JSON:
        parts = _json_parts(v, out, every)
    elif fmt == YAML:
        parts = _yaml_parts(v, out, every)
    else:
        return render_text(v)
    pieces: list[bytes] = []
    cur: list[bytes] = []
    size = 0
    for _ in parts:
        for piece in out:
            cur.append(piece)
            size += len(piece)
        out.clear()
        if size >= PIECE:
            pieces.append(b"".join(cur))
            cur.clear()
            size = 0
        yield
    cur += out
    if cur or not pieces:
        pieces.append(b"".join(cur))
    return pieces[0] if len(pieces) == 1 else Chunks(pieces)


def render(v: Any, fmt: str) -> bytes:
    if fmt == JSON:
        return render_json(v)
    if fmt == YAML:
        return render_yaml(v)
    return render_text(v)


def error_body(code: int, message: str, fmt: str) -> bytes:
    """The original's error bodies: text ``Not found\\n``; JSON/YAML ``{code, message, type}``, each
    followed by the newline Go's ``http.Error`` adds (after YAML's own last newline too)."""
    if fmt == JSON:
        return render_json({"code": code, "message": message, "type": "error"}) + b"\n"
    if fmt == YAML:
        return render_yaml({"code": code, "message": message, "type": "error"}) + b"\n"
    return message.encode() + b"\n"
