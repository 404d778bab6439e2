"""The last good metadata snapshot, persisted so a rebooted host programs its port forwards
before metadata answers (``<state dir>/corral/metadata.json``)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import orjson

from agents.errors import ProtocolError, TransportError
from agents.log import get_logger
from agents.metadata_client import Snapshot
from netmanager.files import write_atomic

__all__ = ["load_snapshot", "save_snapshot", "snapshot_path"]

log = get_logger(__name__)


def snapshot_path(state_dir: Path) -> Path:
    return state_dir / "corral" / "metadata.json"


def save_snapshot(path: Path, snap: Snapshot) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, orjson.dumps(snap.raw), 0o600)


def load_snapshot(path: Path) -> Snapshot | None:
    """The persisted snapshot, or None; a corrupt file is moved aside (``.corrupt``)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise TransportError(f"read {path}: {e}") from e
    try:
        return Snapshot.from_tree(orjson.loads(raw))
    except (orjson.JSONDecodeError, ProtocolError) as e:
        aside = path.with_name(path.name + ".corrupt")
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        log.error("persisted metadata snapshot is corrupt, moved aside", path=str(aside), error=str(e))
        return None
