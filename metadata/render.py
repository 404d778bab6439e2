"""Pure rendering of metadata values: text, JSON, YAML, errors and content negotiation (§2.6).

No I/O. Every function takes a value from a snapshot tree and returns bytes.
"""

from __future__ import annotations

import json
import math
from typing import Any
from urllib.parse import quote_plus

import orjson
import yaml

__all__ = [
    "FORMATS",
    "error_body",
    "negotiate",
    "render",
    "render_json",
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
    if v is None:
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
            if isinstance(val, dict | list):
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


def render_json(v: Any) -> bytes:
    """Compact JSON, keys sorted, HTML characters escaped as Go's encoder does, no newline."""
    try:
        out = orjson.dumps(v, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # integers beyond 64 bits, odd keys: the slow, general encoder
        out = json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                         default=str).encode("utf-8", "surrogateescape")
    for a, b in _JSON_ESC:
        if a in out:
            out = out.replace(a, b)
    return out


class _Dumper(yaml.SafeDumper):
    pass


def render_yaml(v: Any) -> bytes:
    return yaml.dump(v, Dumper=_Dumper, default_flow_style=False, sort_keys=True,
                     allow_unicode=True).encode("utf-8")


def render(v: Any, fmt: str) -> bytes:
    if fmt == JSON:
        return render_json(v)
    if fmt == YAML:
        return render_yaml(v)
    return render_text(v)


def error_body(code: int, message: str, fmt: str) -> bytes:
    """The original's error bodies: text ``Not found\\n``; JSON/YAML ``{code, message, type}``."""
    if fmt == JSON:
        return render_json({"code": code, "message": message, "type": "error"}) + b"\n"
    if fmt == YAML:
        return render_yaml({"code": code, "message": message, "type": "error"})
    return message.encode() + b"\n"
