"""What the hosts file should say: pure functions from metadata's host list (and the current file).

Three outputs, one line format (``<agent_ip>    <hostname>``, four spaces, as the original):

- :func:`render_full` (the default): the original's fixed header, then one line per host; the
  whole file is ours. Entries are sorted by hostname, and hosts with an empty or invalid
  hostname or address are skipped (the original wrote ``    name`` or ``1.2.3.4    ``).
- :func:`render_managed` (``--preserve``): only the lines between the two marker lines are
  ours; everything else in the file is kept byte for byte. Without markers the block is
  appended to the existing content.
- ``legacy=True`` in :func:`entries` keeps the original's malformed lines for hosts with an
  empty hostname or address (``--legacy-overwrite``).

In every mode, when two hosts share a hostname the first in metadata order wins.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["BEGIN", "END", "HEADER", "Entry", "Skipped", "entries", "header", "render_block", "render_full",
           "render_managed"]

SEP = "    "
HEADER = (
    "127.0.0.1    localhost\n"
    "::1    localhost ip6-localhost ip6-loopback\n"
    "fe00::0    ip6-localnet\n"
    "ff00::0    ip6-mcastprefix\n"
    "ff02::1    ip6-allnodes\n"
    "ff02::2    ip6-allrouters\n"
)
BEGIN = "# BEGIN corral etc-host-updater"
END = "# END corral etc-host-updater"
_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")


@dataclass(frozen=True, slots=True)
class Entry:
    ip: str
    names: tuple[str, ...]  # hostname first, then aliases

    def line(self) -> str:
        return f"{self.ip}{SEP}{' '.join(self.names)}\n"


@dataclass(frozen=True, slots=True)
class Skipped:
    index: int
    hostname: str
    ip: str
    reason: str


def header(own_hostname: str, own_ip: str) -> str:
    """The original's fixed header (no newline after the own-host line)."""
    return f"{HEADER}{own_ip}{SEP}{own_hostname}"


def valid_hostname(name: str) -> bool:
    return _HOSTNAME.fullmatch(name) is not None


def _valid_ip(ip: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, ip)
            return True
        except (OSError, ValueError):
            continue
    return False


_VERDICTS: dict[tuple[str, str], str] = {}  # (hostname, agent_ip) -> why it is skipped ("": kept)
_KNOWN: dict[tuple[str, str], Entry] = {}  # (hostname, agent_ip) as metadata gives them -> a valid entry


def _verdict(name: str, ip: str) -> str:
    """Why a host line cannot be written ("" when it can); remembered, as the same hosts come back
    in every snapshot and the checks (a regex, inet_pton) are most of the render's time."""
    key = (name, ip)
    reason = _VERDICTS.get(key)
    if reason is None:
        reason = ("empty hostname" if not name else "invalid hostname" if not valid_hostname(name)
                  else "empty agent_ip" if not ip else "invalid agent_ip" if not _valid_ip(ip) else "")
        if len(_VERDICTS) >= 100_000:
            _VERDICTS.clear()
        _VERDICTS[key] = reason
    return reason


def entries(hosts: Iterable[Any], *, legacy: bool = False, aliases: bool = False) -> tuple[list[Entry], list[Skipped]]:
    """Metadata's ``/hosts`` -> entries sorted by hostname, and what was skipped and why."""
    seen: dict[str, Entry] = {}
    skipped: list[Skipped] = []
    plain = not legacy and not aliases
    for i, h in enumerate(hosts):
        if not isinstance(h, dict):
            skipped.append(Skipped(i, "", "", "not an object"))
            continue
        name = h.get("hostname")
        ip = h.get("agent_ip")
        if plain and type(name) is str and type(ip) is str:  # the common case: one lookup per host
            known = _KNOWN.get((name, ip))
            if known is not None and known.names[0] not in seen:
                seen[known.names[0]] = known
                continue
            raw = (name, ip)
        else:
            raw = None
        name = name.strip() if isinstance(name, str) else ""
        ip = ip.strip() if isinstance(ip, str) else ""
        if not legacy:
            reason = _verdict(name, ip)
            if reason:
                skipped.append(Skipped(i, name, ip, reason))
                continue
        if name in seen:
            skipped.append(Skipped(i, name, ip, "duplicate hostname (the first one wins)"))
            continue
        names = [name]
        if aliases:
            short = name.split(".", 1)[0]
            display = h.get("name") if isinstance(h.get("name"), str) else ""
            for a in (short, display.strip().lower() if display else ""):
                if a and a not in names and (legacy or valid_hostname(a)):
                    names.append(a)
        e = seen[name] = Entry(ip, tuple(names))
        if raw is not None:
            if len(_KNOWN) >= 100_000:
                _KNOWN.clear()
            _KNOWN[raw] = e
    return [seen[k] for k in sorted(seen)], skipped


def render_full(head: str, ents: Iterable[Entry]) -> str:
    """The original's whole file: header, a newline, one line per host."""
    return head + "\n" + "".join(e.line() for e in ents)


def render_block(ents: Iterable[Entry]) -> str:
    return f"{BEGIN}\n" + "".join(e.line() for e in ents) + f"{END}\n"


def render_managed(current: str, ents: Iterable[Entry], head: str | None = None) -> str:
    """``current`` with the managed block replaced (or appended); nothing else changes.

    An empty file gets ``head`` first (when given), so the container still resolves localhost.
    Markers are whole lines; a BEGIN without an END is treated as no block (appended anew).
    """
    block = render_block(ents)
    lines = current.splitlines(keepends=True)
    begin = end = -1
    for i, line in enumerate(lines):
        s = line.rstrip("\r\n")
        if begin < 0 and s == BEGIN:
            begin = i
        elif begin >= 0 and s == END:
            end = i
            break
    if begin >= 0 and end >= 0:
        return "".join(lines[:begin]) + block + "".join(lines[end + 1:])
    if not current.strip():
        return (head + "\n" if head else current) + block
    return current + ("" if current.endswith("\n") else "\n") + block
