"""The iptables adapter: pick the backend, read with ``iptables-save``, write with one
``iptables-restore --noflush --wait``.

Backend choice follows the host's Docker (as kube-proxy's iptables wrapper does): whichever of
``iptables-legacy`` / ``iptables-nft`` holds Docker's chains (``DOCKER``, ``DOCKER-USER``) wins;
if neither or both do, the one with more rules; on a tie, the system default ``iptables``.
Writing to the other backend would create a second, invisible ruleset next to Docker's.

Change probes (:meth:`Backend.probe`): a cheap value that moves when anyone changes the ruleset,
polled often so drift is noticed without dumping 25k rules - nft: the nf_tables generation id
(one netlink read); legacy: per table, the kernel's entry count, blob size and hook offsets
(one ``IPT_SO_GET_INFO`` getsockopt each: no dump, no xtables lock). A legacy edit that keeps
all three (a rule replaced by one of the same size) is found by the periodic check, which
hashes the tables' rules as the kernel holds them, counters aside (:meth:`LegacyTables.digest`,
~35 ms at 25k rules), and reads back with ``iptables-save`` only when that hash moved.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import hashlib
import mmap
import shutil
import socket
import struct
from dataclasses import dataclass
from typing import Any, Protocol

from agents.errors import ConfigError, TransportError
from agents.log import get_logger

__all__ = ["Backend", "ChangeProbe", "LegacyTables", "choose_backend", "detect_backend"]

log = get_logger(__name__)
_DOCKER_MARKERS = (":DOCKER ", ":DOCKER-USER ", ":DOCKER-ISOLATION")


async def _run(argv: list[str], stdin: bytes | None = None, timeout: float = 60.0) -> bytes:
    try:
        p = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as e:
        raise TransportError(f"{argv[0]}: {e}") from e
    try:
        out, err = await asyncio.wait_for(p.communicate(stdin), timeout)
    except TimeoutError:
        p.kill()
        await p.wait()
        raise TransportError(f"{argv[0]} timed out after {timeout}s") from None
    if p.returncode != 0:
        raise TransportError(f"{' '.join(argv)} exited {p.returncode}: {err.decode(errors='replace').strip()}")
    return out


class ChangeProbe(Protocol):
    async def read(self) -> Any: ...
    async def digest(self) -> bytes | None: ...
    def ours(self, before: Any, after: Any, tables: frozenset[str], commits: int | None = None) -> bool: ...
    def close(self) -> None: ...


_IPT_SO_GET_INFO = 64  # IPT_BASE_CTL: struct ipt_getinfo {name[32]; valid_hooks; hook_entry[5]; underflow[5];
_INFO = struct.Struct("=32sI5I5III")  # num_entries; size}
_IPT_SO_GET_ENTRIES = 65
_GET_ENTRIES = struct.Struct("=32sI4x")  # struct ipt_get_entries {name[32]; size; (pad to 8) entrytable[]}
_ENTRY_COUNTERS = 96  # offsetof(struct ipt_entry, counters)
_NO_COUNTERS = bytes(16)
_U16 = struct.Struct("=H").unpack_from
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)  # faulted in at once


class LegacyTables:
    """Legacy backend change probe: {table: (entries, size, hook offsets)} read with one
    ``getsockopt(IPT_SO_GET_INFO)`` per table (microseconds; a table not loaded reads as None)."""

    def __init__(self, tables: tuple[str, ...] = ("raw", "nat", "filter")) -> None:
        self.tables = tables
        self._sock: socket.socket | None = None
        self._libc: Any = None

    def read_now(self) -> dict[str, tuple[int, ...] | None]:
        if self._sock is None:
            try:
                self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            except OSError as e:
                raise TransportError(f"legacy iptables probe: {e}") from e
            self._libc = ctypes.CDLL(None, use_errno=True)
        out: dict[str, tuple[int, ...] | None] = {}
        for t in self.tables:
            buf = ctypes.create_string_buffer(t.encode(), _INFO.size)
            n = ctypes.c_uint32(_INFO.size)
            if self._libc.getsockopt(self._sock.fileno(), socket.SOL_IP, _IPT_SO_GET_INFO, buf, ctypes.byref(n)) != 0:
                err = ctypes.get_errno()
                if err == errno.ENOENT:
                    out[t] = None
                    continue
                raise TransportError(f"legacy iptables probe {t}: {errno.errorcode.get(err, err)}")
            _, _, *rest = _INFO.unpack(buf.raw)
            out[t] = tuple(rest)
        return out

    async def read(self) -> dict[str, tuple[int, ...] | None]:
        # off the loop: the getsockopt takes the kernel's x_tables mutex, which any legacy
        # iptables run on the machine (any namespace) holds while it replaces a table
        return await asyncio.to_thread(self.read_now)

    def digest_now(self) -> bytes:
        """A hash of every table's rules as the kernel holds them (``IPT_SO_GET_ENTRIES``), the
        packet counters left out: it moves on any edit, a same-size one too, and not with traffic.
        ~25 ms of kernel time for a 5 MB nat table (20k rules), under the x_tables mutex."""
        h = hashlib.blake2b(digest_size=16)
        for t, info in self.read_now().items():
            h.update(t.encode() + b"\0")
            if info is None:
                continue
            size = info[-1]
            # an anonymous mapping, not the heap: a 5 MB buffer every few seconds would otherwise
            # leave the allocator's heap that much bigger for good
            with mmap.mmap(-1, _GET_ENTRIES.size + size, flags=_MAP_FLAGS) as mm:
                _GET_ENTRIES.pack_into(mm, 0, t.encode(), size)
                buf = ctypes.c_char.from_buffer(mm)
                n = ctypes.c_uint32(len(mm))
                assert self._sock is not None
                rc = self._libc.getsockopt(self._sock.fileno(), socket.SOL_IP, _IPT_SO_GET_ENTRIES, ctypes.byref(buf),
                                           ctypes.byref(n))
                err = ctypes.get_errno()
                del buf
                if rc != 0:  # EAGAIN: replaced between the two reads - a move all the same
                    raise TransportError(f"legacy iptables entries {t}: {errno.errorcode.get(err, err)}")
                with memoryview(mm) as whole:
                    blob = whole[_GET_ENTRIES.size:]
                    off = 0
                    while off < size:  # struct ipt_entry: next_offset at 90, counters at 96..112 - zeroed
                        nxt = _U16(blob, off + 90)[0] if off + _ENTRY_COUNTERS + 16 <= size else 0
                        if nxt < _ENTRY_COUNTERS + 16 or off + nxt > size:
                            blob.release()
                            raise TransportError(f"legacy iptables entries {t}: bad entry at offset {off}")
                        blob[off + _ENTRY_COUNTERS:off + _ENTRY_COUNTERS + 16] = _NO_COUNTERS
                        off += nxt
                    h.update(struct.pack("=I", size))
                    h.update(blob)
                    blob.release()
        return h.digest()

    async def digest(self) -> bytes:
        return await asyncio.to_thread(self.digest_now)

    def ours(self, before: Any, after: Any, tables: frozenset[str], commits: int | None = None) -> bool:
        """Only the tables we wrote moved (a foreign edit of one of them at the same moment is
        left to the periodic read-back)."""
        return all(before.get(t) == after.get(t) for t in self.tables if t not in tables)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class _NftProbe:
    """nft backend change probe: the generation id, one bump per committed transaction
    (``iptables-nft-restore`` commits each table on its own)."""

    def __init__(self) -> None:
        from netmanager.netlink import NftGeneration

        self._gen = NftGeneration()

    async def read(self) -> int:
        return await self._gen.read()

    async def digest(self) -> bytes | None:
        """None: the generation id moves on every commit, nothing else is needed to see a change."""
        return None

    def ours(self, before: Any, after: Any, tables: frozenset[str], commits: int | None = None) -> bool:
        """The generation moved by our commits: one per table for ``iptables-nft-restore``, or
        ``commits`` (one nf_tables transaction covers all its tables)."""
        return int(after) - int(before) == (len(tables) if commits is None else commits)

    def close(self) -> None:
        self._gen.close()


@dataclass(frozen=True)
class Backend:
    name: str  # "legacy" | "nft" | "default"
    save_cmd: str
    restore_cmd: str

    @classmethod
    def named(cls, name: str) -> Backend:
        if name == "default":
            return cls("default", "iptables-save", "iptables-restore")
        if name not in ("legacy", "nft"):
            raise ConfigError(f"unknown iptables backend {name!r} (auto, legacy, nft)")
        save, restore = f"iptables-{name}-save", f"iptables-{name}-restore"
        if shutil.which(save) is None or shutil.which(restore) is None:
            raise ConfigError(f"iptables backend {name!r} is not installed ({save} not found)")
        return cls(name, save, restore)

    async def save(self, tables: tuple[str, ...] = ("raw", "nat", "filter")) -> str:
        """``iptables-save`` of the given tables, concatenated."""
        outs = await asyncio.gather(*(_run([self.save_cmd, "-t", t]) for t in tables))
        return "".join(o.decode() for o in outs)

    def probe(self) -> ChangeProbe | None:
        """The backend's change probe (see the module doc); None when the backend is unknown."""
        if self.name == "nft":
            return _NftProbe()
        if self.name == "legacy":
            return LegacyTables()
        return None

    async def restore(self, payload: str) -> None:
        """One ``iptables-restore --noflush --wait``: each table commits atomically."""
        await _run([self.restore_cmd, "--noflush", "--wait"], payload.encode())


def choose_backend(saves: dict[str, str], default: str) -> str:
    """Pure choice from each backend's ``iptables-save`` text (see the module doc)."""
    docker = [n for n, t in saves.items() if any(m in t for m in _DOCKER_MARKERS)]
    if len(docker) == 1:
        return docker[0]
    counts = {n: sum(1 for ln in t.splitlines() if ln.startswith("-A ")) for n, t in saves.items()}
    if counts and len(set(counts.values())) > 1:
        return max(counts, key=lambda n: counts[n])
    return default


async def _default_backend() -> str:
    try:
        out = (await _run(["iptables", "--version"])).decode()
    except TransportError:
        return "nft"
    return "nft" if "nf_tables" in out else "legacy"


async def detect_backend(wanted: str = "auto") -> Backend:
    if wanted != "auto":
        return Backend.named(wanted)
    default = await _default_backend()
    saves: dict[str, str] = {}
    for name in ("legacy", "nft"):
        if shutil.which(f"iptables-{name}-save") is None:
            continue
        try:
            saves[name] = (await _run([f"iptables-{name}-save", "-t", "nat"])).decode() + \
                (await _run([f"iptables-{name}-save", "-t", "filter"])).decode()
        except TransportError as e:
            log.info("iptables backend unusable", backend=name, error=str(e))
    if not saves:
        return Backend.named("default")
    name = choose_backend(saves, default if default in saves else next(iter(saves)))
    log.info("iptables backend chosen", backend=name, docker_in=[n for n, t in saves.items()
                                                                 if any(m in t for m in _DOCKER_MARKERS)])
    return Backend.named(name)
