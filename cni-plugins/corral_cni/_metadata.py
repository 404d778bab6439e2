"""A hand-written HTTP/1.0 GET to Rancher metadata: no urllib/http.client on the plugin path."""

from __future__ import annotations

import _socket

from . import _js

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class MetadataError(Exception):
    pass


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return address, 80


def get_json(address: str, path: str, timeout: float) -> Any:
    """GET ``http://<address><path>`` with ``Accept: application/json``; MetadataError on failure."""
    host, port = split_address(address)
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\n\r\n".encode())
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    except OSError as e:
        raise MetadataError(f"GET {path}: {e}") from None
    finally:
        s.close()
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise MetadataError(f"GET {path}: malformed HTTP answer")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200":
        raise MetadataError(f"GET {path}: HTTP {b' '.join(status[1:]).decode(errors='replace')}")
    try:
        return _js.loads(body)
    except ValueError as e:
        raise MetadataError(f"GET {path}: bad JSON: {e}") from None
