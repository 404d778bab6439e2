"""The originals' fast path: the container's IP and MAC from its Docker labels (cni.md §3 step 5).

One hand-written HTTP/1.0 GET of ``/containers/<id>/json`` on ``DOCKER_HOST`` (``unix://`` or
``tcp://``; default the ``/var/run/docker.sock`` socket; podman's Docker-compatible service works
too). No daemon, an error or a missing label → ``None`` and the caller goes on without it, as the
original dropped the fast path silently.
"""

from __future__ import annotations

import _socket

from . import _js

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

IP_LABELS = ("annotation.io.rancher.container.ip", "io.rancher.container.ip")
MAC_LABELS = ("annotation.io.rancher.container.mac_address", "io.rancher.container.mac_address")


def _connect(docker_host: str, timeout: float) -> Any:
    if docker_host.startswith("unix://"):
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(docker_host[len("unix://"):])
        return s
    if docker_host.startswith("tcp://"):
        host, _, port = docker_host[len("tcp://"):].rstrip("/").rpartition(":")
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect((host, int(port)))
        return s
    raise OSError(f"unsupported DOCKER_HOST {docker_host!r}")


def labels(container_id: str, docker_host: str, timeout: float = 2.0) -> dict[str, Any] | None:
    if not container_id or "/" in container_id or "?" in container_id:
        return None
    try:
        s = _connect(docker_host, timeout)
    except (OSError, ValueError):
        return None
    try:
        s.sendall(f"GET /containers/{container_id}/json HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    except OSError:
        return None
    finally:
        s.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200":
        return None
    try:
        doc = _js.loads(body)
        lab = (doc.get("Config") or {}).get("Labels") or {}
    except (ValueError, AttributeError):
        return None
    return lab if isinstance(lab, dict) else None


def fast_path(lab: dict[str, Any] | None) -> tuple[str, str] | None:
    """(ip CIDR, mac) when both labels are there, else None."""
    if not lab:
        return None
    ip = next((lab[k] for k in IP_LABELS if isinstance(lab.get(k), str) and lab[k]), "")
    mac = next((lab[k] for k in MAC_LABELS if isinstance(lab.get(k), str) and lab[k]), "")
    return (ip, mac) if ip and mac else None
