"""CNI files of the ``rancher-cni-driver`` volume, as pure functions of a snapshot.

Layout (the volume is mounted both as ``/etc/cni`` and ``/opt/cni``): ``<network>.d/<key>``
one config per ``cniConfig`` key (directories 0700, files 0600, JSON re-serialised with
2-space indentation and sorted keys, ``__host_label__: name`` strings replaced by the host's
label), ``managed.d`` a relative symlink to the default network's directory, and
``bin/<name>`` shims that re-execute the plugin inside the network driver container.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agents.metadata_client import Snapshot
from netmanager.desired import substitute

__all__ = ["CniFile", "CniFiles", "cni_files", "shim_script", "shim_targets"]


@dataclass(frozen=True)
class CniFile:
    path: str  # relative to the volume root
    content: bytes
    mode: int


@dataclass(frozen=True)
class CniFiles:
    dirs: tuple[str, ...]  # relative, mode 0700
    files: tuple[CniFile, ...]
    managed: str | None  # target of managed.d (relative: "<name>.d"), None = leave alone


def _safe(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..") and "\0" not in name


def cni_files(snap: Snapshot) -> CniFiles:
    host = snap.self_host
    labels = host.labels if host is not None else {}
    env = host.environment_uuid if host is not None else None
    dirs: list[str] = []
    files: list[CniFile] = []
    managed: str | None = None
    for net in sorted(snap.networks, key=lambda n: n.name or ""):
        if env is not None and net.environment_uuid != env:
            continue
        md = net.metadata if isinstance(net.metadata, dict) else {}
        cfg = md.get("cniConfig")
        if not isinstance(cfg, dict) or not cfg or not _safe(net.name or ""):
            continue
        d = f"{net.name}.d"
        dirs.append(d)
        for key in sorted(cfg):
            if not _safe(key):
                continue
            value: Any = cfg[key]
            if isinstance(value, str):
                body = value.encode()
            else:
                body = json.dumps(substitute(value, labels), indent=2, sort_keys=True).encode()
            files.append(CniFile(f"{d}/{key}", body, 0o600))
        if net.is_default and managed is None:
            managed = d
    return CniFiles(tuple(dirs), tuple(files), managed)


def shim_script(pid: int) -> bytes:
    """``/opt/cni/bin/<name>``: run the same path inside the driver container's namespaces."""
    return f'#!/bin/sh\nexec nsenter -m -u -i -n -p -t {int(pid)} -- "$0" "$@"\n'.encode()


def shim_targets(snap: Snapshot) -> dict[str, str]:
    """Shim name -> Docker ID of the driver container on this host that carries the real binary.

    Driver services: kind ``networkDriverService`` or ``storageDriverService``, plus the services
    of the same stack whose ``primary_service_name`` is one of them (sidekicks); their containers
    on this host with an ``external_id`` and the label ``io.rancher.network.cni.binary=<name>``.
    """
    me = snap.self_host.uuid if snap.self_host is not None else None
    drivers = [s for s in snap.services if s.kind in ("networkDriverService", "storageDriverService")]
    names = {(s.stack_uuid, s.name) for s in drivers}
    chosen = [s for s in snap.services if s in drivers or (s.stack_uuid, s.primary_service_name) in names]
    by_uuid = {c.uuid: c for c in snap.containers}
    out: dict[str, str] = {}
    for svc in sorted(chosen, key=lambda s: s.uuid or ""):
        for raw in svc.containers:
            ref = raw.get("uuid") if isinstance(raw, dict) else raw
            c = by_uuid.get(ref) if isinstance(ref, str) else None
            if c is None or c.host_uuid != me or not c.external_id:
                continue
            name = c.labels.get("io.rancher.network.cni.binary", "")
            if _safe(name):
                out.setdefault(name, c.external_id)
    return dict(sorted(out.items()))
