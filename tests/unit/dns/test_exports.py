"""The dns package's public names are pinned (style guide: small, explicit surface)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

EXPORTS = {
    "dns.table": {"ZONE", "Rec", "Resolved", "Settings", "Table", "View", "build", "build_from_answers", "resolve",
                  "reverse_name"},
    "dns.answer": {"ASKED", "FORWARD", "NOT_READY", "Prepared", "Upstream", "decide", "prepare"},
    "dns.wire": {"ANY", "FORMERR", "NOERROR", "NOTIMP", "NXDOMAIN", "OPT", "REFUSED", "SERVFAIL", "Query", "Scan",
                 "WireError", "error_reply", "make_opt", "parse_query", "scan"},
    "dns.cache": {"Cache", "Entry", "Key"},
    "dns.forward": {"Upstreams", "parse_addr"},
    "dns.server": {"CHAIN", "Engine", "Listener", "Slow"},
    "dns.rebuild": {"Diff", "FetchError", "apply", "build_from_state", "build_tree_diff", "diff", "dump_answers"},
    "dns.forkpool": {"ForkPool"},
    "dns.main": {"DEMO_HINTS", "build_parser", "demo_argv", "main"},
    "dns.batch": {"BatchReader", "available"},
    "dns.slow": {"MAX_INFLIGHT", "answer_slow"},
}


@pytest.mark.parametrize("mod", sorted(EXPORTS))
def test_exports(mod: str) -> None:
    m = importlib.import_module(mod)
    assert set(m.__all__) == EXPORTS[mod]
    for name in m.__all__:
        assert hasattr(m, name), f"{mod}.{name}"



def _imports(path: Path) -> set[str]:
    """dns modules that ``path`` imports, at the top or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "dns":
                out |= {f"dns.{a.name}" for a in node.names}
            elif node.module.startswith("dns."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("dns.")}
    return out


def test_no_import_cycles() -> None:
    pkg = Path(importlib.import_module("dns.wire").__file__ or "").parent
    graph = {f"dns.{p.stem}": _imports(p) for p in pkg.glob("*.py") if p.stem != "__init__"}

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = list(graph.get(start, ()))
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph.get(m, ())
        return seen

    assert [m for m in sorted(graph) if m in reach(m)] == []
