"""Runs CNI plugins over a network's config directory, the way libcni does.

Config files ``<dir>/*.conf``, ``*.json`` and ``*.conflist`` in name order (none: "couldn't find
any CNI network configurations"). ADD runs every file in order and keeps the last result with an
IPv4 address (the original's rule); a ``.conflist`` runs its plugins in order, each given the
previous one's result as ``prevResult`` (CNI >= 0.3.0). DEL runs the files in reverse, every one
attempted, the last error returned. Plugins are found on ``CNI_PATH``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from agents.children import run
from agents.errors import TransportError

__all__ = ["CniError", "load_configs", "result_ipv4", "run_add", "run_del"]


class CniError(TransportError):
    """A plugin failed (its CNI error message) or no configuration was found."""


def load_configs(conf_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        names = sorted(p.name for p in conf_dir.iterdir()
                       if p.suffix in (".conf", ".json", ".conflist") and p.is_file())
    except FileNotFoundError:
        names = []
    if not names:
        raise CniError(f"couldn't find any CNI network configurations in {conf_dir}")
    out = []
    for n in names:
        try:
            conf = json.loads((conf_dir / n).read_text())
        except (OSError, ValueError) as e:
            raise CniError(f"{conf_dir / n}: {e}") from e
        if not isinstance(conf, dict):
            raise CniError(f"{conf_dir / n}: not a JSON object")
        out.append((n, conf))
    return out


def _find(plugin: str, cni_path: str) -> str:
    for d in cni_path.split(":"):
        p = os.path.join(d, plugin)
        if d and os.access(p, os.X_OK) and os.path.isfile(p):
            return p
    raise CniError(f"failed to find plugin {plugin!r} in path {cni_path}")


async def _exec(conf: dict[str, Any], env: dict[str, str], timeout: float) -> dict[str, Any]:
    plugin = str(conf.get("type") or "")
    if not plugin:
        raise CniError(f"network config {conf.get('name')!r} has no type")
    path = _find(plugin, env["CNI_PATH"])
    try:
        p = await run([path], input=json.dumps(conf).encode(), env={**os.environ, **env}, timeout=timeout)
    except TimeoutError:
        raise CniError(f"{plugin} {env['CNI_COMMAND']} timed out after {timeout}s") from None
    except OSError as e:
        raise CniError(f"{plugin}: {e}") from e
    out, err = p.stdout, p.stderr
    try:
        res = json.loads(out) if out.strip() else {}
    except ValueError:
        res = {}
    if p.returncode != 0:
        msg = res.get("msg") if isinstance(res, dict) else None
        raise CniError(f"{plugin} {env['CNI_COMMAND']}: {msg or err.decode(errors='replace').strip() or p.returncode}")
    return res if isinstance(res, dict) else {}


def result_ipv4(res: dict[str, Any]) -> str | None:
    """The first IPv4 address (without prefix) of a CNI result of any version."""
    ip4 = res.get("ip4")
    first = ip4.get("ip") if isinstance(ip4, dict) else None
    if isinstance(first, str):
        return first.split("/")[0]
    for ip in res.get("ips") or ():
        addr = ip.get("address") if isinstance(ip, dict) else None
        if isinstance(addr, str) and "." in addr:
            return addr.split("/")[0]
    return None


def _plugins(conf: dict[str, Any]) -> list[dict[str, Any]]:
    if isinstance(conf.get("plugins"), list):  # a conflist: name and cniVersion go into each plugin
        return [{"cniVersion": conf.get("cniVersion", "0.3.1"), "name": conf.get("name", ""), **p}
                for p in conf["plugins"] if isinstance(p, dict)]
    return [conf]


async def run_add(configs: list[tuple[str, dict[str, Any]]], env: dict[str, str], *,
                  timeout: float = 60.0) -> dict[str, Any]:
    kept: dict[str, Any] | None = None
    for _, conf in configs:
        prev: dict[str, Any] | None = None
        for plugin in _plugins(conf):
            if prev is not None:
                plugin = {**plugin, "prevResult": prev}
            prev = await _exec(plugin, {**env, "CNI_COMMAND": "ADD"}, timeout)
        if prev is not None and result_ipv4(prev):
            kept = prev
    if kept is None:
        raise CniError("no IPv4 address in any CNI result")
    return kept


async def run_del(configs: list[tuple[str, dict[str, Any]]], env: dict[str, str], *,
                  timeout: float = 60.0) -> None:
    last: CniError | None = None
    for _, conf in reversed(configs):
        for plugin in reversed(_plugins(conf)):
            try:
                await _exec(plugin, {**env, "CNI_COMMAND": "DEL"}, timeout)
            except CniError as e:
                last = e
    if last is not None:
        raise last
