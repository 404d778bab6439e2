"""The web workload of ``corral demo --hosts N``: a tiny HTTP server inside a workload namespace.

``GET /cgi-bin/health`` (the path of the podman workload's CGI) answers 200, or 503 while the container carries the label ``demo.health=fail`` in
metadata (its own ``self``, asked on each request; the last answer while metadata is away): so ``corral ctl container update <name> --set
'merge_labels={demo.health: fail}'`` makes the container fail its health check, and removing the
label (``...=ok``) makes it pass again. Any other path answers one line naming the container.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import urllib.error
import urllib.request

__all__ = ["main"]

META = "http://169.254.169.250/2016-07-29/self/container"


def _self() -> dict[str, object]:
    req = urllib.request.Request(META, headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=2) as r:
        doc = json.loads(r.read())
    return doc if isinstance(doc, dict) else {}


_last: dict[str, object] = {}


async def _answer(path: str) -> tuple[int, str]:
    try:
        me = await asyncio.wait_for(asyncio.to_thread(_self), 3)
        _last.clear()
        _last.update(me)
    except (OSError, ValueError, TimeoutError, urllib.error.URLError) as e:
        me = dict(_last) or {"name": "?", "labels": {}, "error": str(e)}  # metadata away: its last answer
    raw = me.get("labels")
    labels: dict[str, object] = raw if isinstance(raw, dict) else {}
    name = str(me.get("name") or "?")
    if path.rstrip("/").endswith("/health"):  # /health, /cgi-bin/health (the podman workload's path)
        failing = str(labels.get("demo.health", "")).lower() == "fail"
        return (503, f"{name}: failing (label demo.health=fail)\n") if failing else (200, f"{name}: ok\n")
    return 200, f"hello from {name} ({me.get('primary_ip') or '?'})\n"


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        line = (await asyncio.wait_for(reader.readline(), 5)).decode(errors="replace").split()
        while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
            pass
        path = line[1] if len(line) >= 2 else "/"
        status, body = await _answer(path)
        reason = {200: "OK", 503: "Service Unavailable"}[status]
        data = body.encode()
        writer.write(f"HTTP/1.0 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(data)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + data)
        await writer.drain()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _serve(ip: str, port: int) -> None:
    server = await asyncio.start_server(_handle, ip, port)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m standin.demo_web")
    p.add_argument("--listen", required=True, help="address to serve on")
    p.add_argument("--port", type=int, default=80)
    a = p.parse_args(argv)
    try:
        asyncio.run(_serve(a.listen, a.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
