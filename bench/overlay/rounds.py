"""Interleaved iperf3 rounds: several paths measured in turn, several times, in the same run.

One iperf3 run per path is at the mercy of whatever else the 2-core machine does during its
window (two runs of the same path a minute apart differed by 20 % and more). Here every path
gets one window per round, the order rotating from round to round, after a warm-up window per
path that is thrown away; each figure is the median over the rounds, with its spread (min..max),
and a ratio between two paths is the median of the per-round ratios (both figures of a round
were taken seconds apart, so load that comes and goes cancels out of the ratio).

During every window (warm-up included) the bench's own daemons are stopped (SIGSTOP to their
process groups, SIGCONT after), so the metadata server's file poll and the routers' probe,
long-poll and verify loops never share the two cores with the stream. The iperf3 servers run
for the whole measure (no process start inside a window) and, with ``pin``, the client and the
server sit on fixed, different CPUs, so that every window of every path has the same placement
(unpinned, the scheduler may put both on one core in some windows). On a machine loaded by
others, pinning costs throughput, because a pinned process cannot move away from a busy core, and
it did not narrow the spread there. The bench's ``--pin off`` is for that case. ``congestion`` sets the TCP congestion control of the stream:
the namespaces otherwise inherit the host's (BBR on this machine's image), whose pacing timer and
bandwidth-probing cycles add their own dynamics to a CPU-bound path and depend on how the
machine is set up. The kernel's default, cubic, just fills the window. In two loaded runs, cubic
gave 1.05-1.5x BBR's throughput on both the underlay and VXLAN, in the same rounds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

__all__ = ["Path", "Rounds", "Sample", "frozen", "paired", "spread"]


@dataclass(frozen=True)
class Path:
    name: str
    client: str  # netns of the iperf3 client
    server: str  # netns of the iperf3 server
    dst: str
    port: int


@dataclass(frozen=True)
class Sample:
    gbit: float  # Gbit/s received
    cpu: float   # CPU seconds per Gbit transferred (client + server + ksoftirqd)


def ksoftirqd_seconds() -> float:
    """CPU time used so far by every ``ksoftirqd/N`` thread."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if "(ksoftirqd/" in stat:
            fields = stat.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def frozen(pids: Callable[[], Sequence[int]]) -> Iterator[None]:
    """SIGSTOP the process groups led by ``pids()`` for the block, SIGCONT after in reverse order
    (list clients before their server: the server runs again before they do)."""
    groups = [p for p in pids() if p]
    stopped = []
    try:
        for g in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(g, signal.SIGSTOP)
                stopped.append(g)
        yield
    finally:
        for g in reversed(stopped):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(g, signal.SIGCONT)


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def paired(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-round ratios a[i] / b[i]."""
    return [x / y for x, y in zip(a, b, strict=True) if y]


def _taskset(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


class Rounds:
    """Persistent iperf3 servers for ``paths``; :meth:`run` measures them in interleaved rounds."""

    def __init__(self, paths: Sequence[Path], *, pin: tuple[int, int] | None = None, congestion: str = "",
                 quiet: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext) -> None:
        self.paths = {p.name: p for p in paths}
        self.pin = pin
        self.congestion = congestion
        self.quiet = quiet
        self.servers: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Rounds:
        for p in self.paths.values():
            self.servers.append(subprocess.Popen(
                ["ip", "netns", "exec", p.server, *_taskset(self.pin[1] if self.pin else None),
                 "iperf3", "-s", "-B", p.dst, "-p", str(p.port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.servers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(s.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.wait(5)

    def once(self, name: str, seconds: int, streams: int = 1) -> Sample:
        """One client run (retried while the server is not listening yet)."""
        if seconds < 1:  # iperf3 reads -t as an integer, and 0 is "for ever"
            raise ValueError(f"iperf3 window of {seconds} s")
        p = self.paths[name]
        out = ""
        for _ in range(100):
            with self.quiet():
                soft = ksoftirqd_seconds()
                r = subprocess.run(["ip", "netns", "exec", p.client, *_taskset(self.pin[0] if self.pin else None),
                                    "iperf3", "-c", p.dst, "-p", str(p.port), "-t", str(seconds),
                                    "-P", str(streams), "-J", *(["-C", self.congestion] if self.congestion else [])],
                                   capture_output=True, text=True)
                soft = ksoftirqd_seconds() - soft
            out = r.stdout
            with contextlib.suppress(ValueError, KeyError):
                end = json.loads(out)["end"]
                rx, cpu = end["sum_received"], end["cpu_utilization_percent"]
                gbit = float(rx["bits_per_second"]) / 1e9
                used = (float(cpu["host_total"]) + float(cpu["remote_total"])) / 100 * float(rx["seconds"]) + soft
                return Sample(gbit, used / (gbit * float(rx["seconds"])))
            time.sleep(0.1)
        raise RuntimeError(f"iperf3 {name} to {p.dst}:{p.port} failed: {out[-300:]}")

    def run(self, rounds: int, seconds: int, streams: int = 1, warmup: int = 2) -> dict[str, list[Sample]]:
        """Gbit/s per path per round: a warm-up window per path (dropped), then ``rounds`` rounds of
        one window per path, the order rotated by one path each round."""
        names = list(self.paths)
        if warmup:
            for n in names:
                self.once(n, warmup, streams)
        out: dict[str, list[Sample]] = {n: [] for n in names}
        for r in range(rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                out[n].append(self.once(n, seconds, streams))
            print(f"  -P {streams} round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {out[n][-1].gbit:.2f} Gbit/s {out[n][-1].cpu * 1000:.0f} ms/Gbit" for n in names), flush=True)
        return out
