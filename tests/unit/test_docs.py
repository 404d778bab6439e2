"""The docs stand on their own: every relative link resolves inside the repository, and the
generated tables of docs/operating.md (listeners, flags, metrics) match the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|^\[[^\]]+\]:\s*(\S+)", re.M)


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_every_relative_link_resolves_inside_the_repository() -> None:
    bad = []
    for doc in _docs():
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # code blocks hold commands, not links
        for m in LINK.finditer(text):
            target = m.group(1) or m.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # http:, mailto:, an anchor in the same page
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            where = f"{doc.relative_to(ROOT)}: {target}"
            if not path.is_relative_to(ROOT):
                bad.append(f"{where} points outside the repository")
            elif not path.exists():
                bad.append(f"{where} does not exist")
    assert not bad, "\n".join(bad)


def test_docs_never_point_at_files_outside_the_repository() -> None:
    bad = [f"{d.relative_to(ROOT)}:{i}" for d in _docs() for i, line in enumerate(d.read_text().splitlines(), 1)
           if "../shared/" in line]
    assert not bad, bad


def test_the_generated_tables_match_the_code() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr + out.stdout
