"""Regenerate the generated parts of docs/operating.md from the code, so they cannot drift.

    .venv/bin/python scripts/gen_docs.py           # rewrite docs/operating.md
    .venv/bin/python scripts/gen_docs.py --check   # exit 1 when docs/operating.md is stale

Three blocks are generated: the listeners of every command (its ``*listen*`` flags), every command's flags (from the same argparse parser ``--help``
prints: names, default, environment variable, meaning) and the Prometheus metrics (from the
``counter``/``gauge``/``histogram`` definitions in the source). Defaults are rendered with the
environment variables that feed them unset, so the tables say what a fresh node gets.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "operating.md"
# Environment variables some flags take their default from; unset while the tables are made.
ENV_DEFAULTS = ("CATTLE_URL", "CATTLE_ACCESS_KEY", "CATTLE_SECRET_KEY", "RANCHER_DEBUG", "DNS_RECURSER_TIMEOUT",
                "RANCHER_METADATA_ANSWER", "NEVER_RECURSE_TO", "XDG_RUNTIME_DIR", "RANCHER_METADATA_LISTEN_PORT",
                "CORRAL_METADATA_ADDRESS", "CORRAL_ADMIN_URL")
PACKAGES = ("agents", "standin", "metadata", "dns", "healthcheck", "netmanager", "scheduler")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def _default(a: argparse.Action) -> str:
    d = a.default
    if a.nargs == 0:  # a switch
        return "on" if d else "off"
    if d is None or d == "" or d == []:
        return "none"
    if isinstance(d, bool):
        return "true" if d else "false"
    if isinstance(d, float) and d.is_integer():
        d = int(d)
    return f"`{d}`"


def flag_table(parser: argparse.ArgumentParser) -> str:
    rows = ["| flag | default | env | what |", "|---|---|---|---|"]
    for a in parser._actions:
        if not a.option_strings or a.help == argparse.SUPPRESS or a.dest in ("help", "version"):
            continue
        text = a.help or ""
        env = ""
        m = re.search(r"\s*\(env ([A-Z_, ]+)\)", text)
        if m:
            env = ", ".join(f"`{e.strip()}`" for e in m.group(1).split(","))
            text = (text[: m.start()] + text[m.end():]).strip()
        if a.choices:
            text += f" (one of: {', '.join(map(str, a.choices))})"
        names = ", ".join(f"`{o}`" for o in a.option_strings)
        rows.append(f"| {names} | {_cell(_default(a))} | {env} | {_cell(text)} |")
    return "\n".join(rows)


def _parser_of(module: str) -> argparse.ArgumentParser | None:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    fn = getattr(mod, "build_parser", None) or getattr(mod, "_parser", None)
    return fn() if fn is not None else None


def flags_block() -> str:
    from agents.cli import SUBCOMMANDS

    out = []
    for name, (module, doc) in SUBCOMMANDS.items():
        p = _parser_of(module)
        if p is None:
            continue
        out.append(f"### `corral {name}`: {doc}\n")
        out.append(flag_table(p))
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        for s in subs:
            out.append(f"\nSub-commands ({'`corral ' + name + ' <sub-command> --help`'} shows each one's flags): "
                       + ", ".join(f"`{c}`" for c in s.choices) + ".")
        out.append("")
    out.append("Every command also has `--help` and `--version`.")
    return "\n".join(out)


def ports_block() -> str:
    """Every listener of every command: the flags whose name says ``listen``."""
    from agents.cli import SUBCOMMANDS

    rows = ["| command | flag | default | what |", "|---|---|---|---|"]
    for name, (module, _) in SUBCOMMANDS.items():
        p = _parser_of(module)
        if p is None:
            continue
        for a in p._actions:
            if a.option_strings and re.search(r"listen(_reload)?$", a.dest.lower()) and a.help != argparse.SUPPRESS:
                text = re.sub(r"\s*\(env [A-Z_, ]+\)", "", a.help or "")
                rows.append(f"| `corral {name}` | `{a.option_strings[0]}` | {_cell(_default(a))} | {_cell(text)} |")
    return "\n".join(rows)


_DEF = re.compile(r'\b(counter|gauge|histogram)\(\s*"(\w+)",\s*"(\w+)",\s*"([^"]+)"(?:,\s*\[([^\]]*)\])?')


def metrics_block() -> str:
    rows = ["| metric | type | labels | what | defined in |", "|---|---|---|---|---|"]
    seen = set()
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for kind, sub, name, doc, labels in _DEF.findall(path.read_text()):
                full = f"corral_{sub}_{name}" + ("_total" if kind == "counter" else "")
                if full in seen:
                    continue
                seen.add(full)
                lab = ", ".join(f"`{x.strip().strip(chr(34))}`" for x in labels.split(",") if x.strip())
                rows.append(f"| `{full}` | {kind} | {lab} | {_cell(doc)} | `{rel}` |")
    return "\n".join(rows)


def render(text: str) -> str:
    for key, body in (("ports", ports_block()), ("flags", flags_block()), ("metrics", metrics_block())):
        start, end = f"<!-- generated:{key} (scripts/gen_docs.py) -->", f"<!-- /generated:{key} -->"
        if start not in text or end not in text:
            raise SystemExit(f"{DOC}: the markers {start} ... {end} are missing")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{body}\n{end}{tail}"
    return text


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/operating.md is stale; change nothing")
    args = ap.parse_args(argv)
    for k in ENV_DEFAULTS:
        os.environ.pop(k, None)
    sys.path.insert(0, str(ROOT))
    old = DOC.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("docs/operating.md is stale: run .venv/bin/python scripts/gen_docs.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        DOC.write_text(new)
        print("docs/operating.md updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
