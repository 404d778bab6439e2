"""The benchmark harness every daemon's bench reuses.

A benchmark runs a peer (nginx, dnsmasq, the reference CNI plugins, ...) and Corral in the
same run, on the same machine, and reports each figure beside the peer's as a ratio. Each run
writes its section to ``bench/results/<section>.md`` (ignored by git), with the command that
produced it and the machine. The tracked ``bench/RESULTS.md`` changes only when asked: run the
benchmark with ``--update-results`` (or ``CORRAL_BENCH_UPDATE=1``) and its section there is
replaced. Benchmarks are never collected by pytest.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
RESULTS_DIR = ROOT / "bench" / "results"

# ``--update-results`` is the harness's own flag: taken out of argv before a benchmark parses it.
UPDATE_RESULTS = os.environ.get("CORRAL_BENCH_UPDATE", "") not in ("", "0") or "--update-results" in sys.argv
if "--update-results" in sys.argv:
    sys.argv.remove("--update-results")

__all__ = [
    "Row", "Table", "cpu_seconds", "machine", "percentile", "rss_mib", "update_results", "wrk",
]


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def tree_rss_mib(pid: int) -> float:
    """RSS of ``pid`` plus all its descendants (workers), in MiB."""
    total = rss_mib(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for c in children:
        try:
            total += tree_rss_mib(int(c))
        except (OSError, ValueError):
            pass
    return total


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User+system CPU time used so far by ``pid`` (seconds); ``children``: with that of its
    children it has waited for (the tools a daemon runs)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    used = int(fields[11]) + int(fields[12])
    if children:
        used += int(fields[13]) + int(fields[14])
    return used / ticks


_WRK_LUA = """
done = function(summary, latency, requests)
  io.write(string.format("JSON {\\"requests\\": %d, \\"duration_us\\": %d, \\"errors\\": %d, \\"non2xx\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d, \\"bytes\\": %d}\\n",
    summary.requests, summary.duration, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99), summary.bytes))
end
"""


def wrk(url: str, *, duration: float = 5, threads: int = 2, connections: int = 50,
        headers: dict[str, str] | None = None, timeout: str = "5s") -> dict[str, float]:
    """Run wrk against ``url``; return req_s, p50_ms, p99_ms, errors, non2xx, mb_s."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    script = ROOT / "bench" / "out" / "wrk_report.lua"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(_WRK_LUA)
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s", "--timeout", timeout,
           "-s", str(script)]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"^JSON (\{.*\})$", out, re.M)
    if not m:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    d = json.loads(m.group(1))
    secs = d["duration_us"] / 1e6
    return {
        "req_s": d["requests"] / secs,
        "p50_ms": d["p50_us"] / 1000.0,
        "p99_ms": d["p99_us"] / 1000.0,
        "errors": d["errors"],
        "non2xx": d["non2xx"],
        "mb_s": d["bytes"] / secs / 1e6,
    }


@dataclass
class Row:
    """One measured figure: Corral's value beside the peer's from the same run."""

    what: str
    corral: float
    peer: float | None = None
    unit: str = ""
    higher_is_better: bool = True
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.peer in (None, 0) or self.corral == 0:
            return None
        assert self.peer is not None
        return self.corral / self.peer


@dataclass
class Table:
    title: str
    peer_name: str
    rows: list[Row] = field(default_factory=list)

    def add(self, *a: Any, **kw: Any) -> Row:
        r = Row(*a, **kw)
        self.rows.append(r)
        return r

    def markdown(self) -> str:
        def fmt(v: float | None) -> str:
            if v is None:
                return "-"
            if abs(v) >= 100:
                return f"{v:,.0f}"
            return f"{v:.3g}"

        lines = [f"| measure | Corral | {self.peer_name} | Corral / {self.peer_name} | note |",
                 "|---|---|---|---|---|"]
        for r in self.rows:
            ratio = r.ratio
            rs = "-" if ratio is None else f"{ratio:.2f}x"
            lines.append(f"| {r.what} | {fmt(r.corral)} {r.unit} | {fmt(r.peer)} {r.unit if r.peer is not None else ''} "
                         f"| {rs} | {r.note} |")
        return "\n".join(lines)

    def print(self) -> None:
        print(f"\n## {self.title}\n")
        print(self.markdown())


def update_results(section: str, body: str, command: str | None = None) -> None:
    """Write ``## <section>`` to bench/results/<section>.md; with ``--update-results`` (or
    CORRAL_BENCH_UPDATE=1) also replace (or add) that section of the tracked bench/RESULTS.md."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if command:
        cmd = command
    elif spec is not None and spec.name:  # run with -m: say so (argv[0] is then the file's full path)
        cmd = " ".join([".venv/bin/python", "-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]])
    else:
        cmd = " ".join([Path(sys.executable).name, *sys.argv])
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    block = f"## {section}\n\nRun {stamp} on {machine()}.\nCommand: `{cmd}`\n\n{body.strip()}\n"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / (re.sub(r"[^A-Za-z0-9._-]+", "-", section).strip("-") + ".md")
    out.write_text(block)
    if not UPDATE_RESULTS:
        print(f"results written to {out.relative_to(ROOT)} (bench/RESULTS.md unchanged; --update-results updates it)")
        return
    text = RESULTS.read_text() if RESULTS.exists() else (
        "# Benchmark results\n\nLatest figures of each benchmark, Corral beside a peer measured in the same run.\n"
        "Regenerate a section with the command shown under it. Ratios are Corral / peer.\n\n")
    pat = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pat.search(text):
        text = pat.sub(lambda _m: block + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(text)
