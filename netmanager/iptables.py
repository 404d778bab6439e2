"""The iptables adapter: pick the backend, read with ``iptables-save``, write with one
``iptables-restore --noflush --wait``.

Backend choice follows the host's Docker (as kube-proxy's iptables wrapper does): whichever of
``iptables-legacy`` / ``iptables-nft`` holds Docker's chains (``DOCKER``, ``DOCKER-USER``) wins;
if neither or both do, the one with more rules; on a tie, the system default ``iptables``.
Writing to the other backend would create a second, invisible ruleset next to Docker's.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass

from agents.errors import ConfigError, TransportError
from agents.log import get_logger

__all__ = ["Backend", "choose_backend", "detect_backend"]

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
