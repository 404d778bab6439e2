"""JSON without the ``json`` package: ``json`` imports ``re`` (and with it enum, functools, the
regex compiler), a few ms per plugin call. The C accelerator ``_json`` does the real work here:
its scanner parses, its string escaper encodes; this module only adds the glue (whitespace,
Go-style 4-space indentation). Error messages come from ``json.decoder`` (imported on error only).
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_WS = " \t\n\r"


class _Ctx:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__
    memo: dict[str, Any] = {}


_scan = _json.make_scanner(_Ctx())  # type: ignore[arg-type]
_esc = _json.encode_basestring_ascii


class JSONError(ValueError):
    pass


def loads(data: bytes | str) -> Any:
    if isinstance(data, bytes | bytearray):
        # a leading BOM is skipped, without the "utf-8-sig" codec (a module imported from disk)
        try:
            s = data[3:].decode() if data[:3] == b"\xef\xbb\xbf" else data.decode()
        except UnicodeDecodeError as e:
            raise JSONError(f"not UTF-8: {e}") from None
    else:
        s = data
    i = len(s) - len(s.lstrip(_WS))
    try:
        try:
            obj, end = _scan(s, i)
        except SystemError:
            # The C scanner raises its syntax errors as json.decoder.JSONDecodeError, which it
            # looks up in sys.modules only: when nothing has imported json.decoder yet it fails
            # with "returned NULL without setting an exception". Load it (error path only, ~3 ms)
            # and scan again for the real message.
            import json.decoder  # noqa: F401

            obj, end = _scan(s, i)
    except StopIteration as e:
        raise JSONError(_at_end(s, e.value) or f"Expecting value: char {e.value}") from None
    except ValueError as e:  # json.decoder.JSONDecodeError
        raise JSONError(_at_end(s, getattr(e, "pos", -1)) or str(e)) from None
    except RecursionError:
        raise JSONError("nested too deeply") from None
    if s[end:].strip(_WS):
        raise JSONError(f"Extra data: char {end}")
    return obj


def _at_end(s: str, pos: int) -> str:
    """Go's wording for a document cut short (what the reference plugins answer)."""
    return "unexpected end of JSON input" if pos >= len(s.rstrip(_WS)) else ""


def dumps(obj: Any, indent: int | None = None) -> str:
    """``json.dumps(obj, indent=indent)``; compact (no spaces) when ``indent`` is None."""
    out: list[str] = []
    _enc(obj, out, indent, 0)
    return "".join(out)


def _enc(o: Any, out: list[str], indent: int | None, level: int) -> None:
    if isinstance(o, str):
        out.append(_esc(o))
    elif o is None:
        out.append("null")
    elif o is True:
        out.append("true")
    elif o is False:
        out.append("false")
    elif isinstance(o, int):
        out.append(int.__repr__(o))
    elif isinstance(o, float):
        if o != o or o in (float("inf"), float("-inf")):
            out.append("NaN" if o != o else ("Infinity" if o > 0 else "-Infinity"))
        else:
            out.append(float.__repr__(o))
    elif isinstance(o, dict):
        if not o:
            out.append("{}")
            return
        out.append("{")
        first = True
        for k, v in o.items():
            if not isinstance(k, str):
                k = str(k).lower() if isinstance(k, bool) else str(k)
            out.append(("" if first else ",") + (("\n" + " " * (indent * (level + 1))) if indent is not None else ""))
            first = False
            out.append(_esc(k))
            out.append(": " if indent is not None else ":")
            _enc(v, out, indent, level + 1)
        out.append(("\n" + " " * (indent * level)) if indent is not None else "")
        out.append("}")
    elif isinstance(o, list | tuple):
        if not o:
            out.append("[]")
            return
        out.append("[")
        for n, v in enumerate(o):
            out.append(("," if n else "") + (("\n" + " " * (indent * (level + 1))) if indent is not None else ""))
            _enc(v, out, indent, level + 1)
        out.append(("\n" + " " * (indent * level)) if indent is not None else "")
        out.append("]")
    else:
        raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")
