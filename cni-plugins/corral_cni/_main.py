"""Entry point shared by ``corral-bridge`` and ``corral-ipam``: stdin + env in, JSON out.

Exit 0 with the result (ADD) or nothing (DEL/CHECK) on stdout; exit 1 with a CNI error object
otherwise. Nothing here imports asyncio, pyroute2 or the rest of Corral (start-up cost, cni.md §9).
"""

from __future__ import annotations

import sys

from . import _js
from . import _os as os
from ._proto import (
    E_INCOMPATIBLE,
    E_PLUGIN,
    LEGACY,
    SUPPORTED,
    CniError,
    at_least,
    check_unknown_args,
    config_version,
    dumps,
    error_object,
    parse_config,
    parse_env,
    render,
    version_info,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

def run(role: str, stdin: bytes, environ: Any) -> tuple[int, str]:
    """One plugin call. Returns (exit status, stdout text)."""
    version: str | None = None
    try:
        conf = parse_config(stdin)
        command = environ.get("CNI_COMMAND", "")
        if command == "VERSION":
            return 0, _js.dumps(version_info(conf))
        version = config_version(conf)
        env = parse_env(environ, version)
        if env.command not in ("ADD", "DEL", "CHECK", "GC", "STATUS"):
            raise CniError(E_PLUGIN if version in LEGACY else 4, f"unknown CNI_COMMAND: {env.command}")
        if env.command == "CHECK" and not at_least(version, "0.4.0"):
            raise CniError(E_INCOMPATIBLE, "config version does not allow CHECK")
        if env.command in ("GC", "STATUS") and not at_least(version, "1.1.0"):
            raise CniError(E_INCOMPATIBLE, f"config version does not allow {env.command}")
        check_unknown_args(env.args)
        if role == "bridge":
            from . import _bridge

            if env.command == "ADD":
                from . import _add

                return 0, dumps(render(_add.cmd_add(conf, stdin, env, version), version))
            if env.command == "DEL":
                _bridge.cmd_del(conf, stdin, env, version)
            elif env.command in ("CHECK", "GC"):
                from . import _check

                (_check.cmd_check if env.command == "CHECK" else _check.cmd_gc)(conf, stdin, env, version)
            else:
                _bridge.run_ipam("STATUS", conf, stdin, env, version)
            return 0, ""
        from ._ipam import ipam_command

        res = ipam_command(env.command, conf, env, version)
        return 0, (dumps(render(res, version)) if res is not None else "")
    except CniError as e:
        return 1, dumps(error_object(e, version))
    except OSError as e:
        return 1, dumps(error_object(CniError(E_PLUGIN, str(e)), version))
    except Exception as e:  # a bug must still answer with an error object, never a traceback
        return 1, dumps(error_object(CniError(E_PLUGIN, f"internal error: {type(e).__name__}: {e}"), version))


def log_call(role: str, stdin: bytes, environ: Any, status: int, out: str) -> None:
    """``logToFile`` (the originals' field): one JSON line per call, appended. Never fails the call."""
    try:
        conf = _js.loads(stdin)
        path = conf.get("logToFile") if isinstance(conf, dict) else None
        if not isinstance(path, str) or not path:
            return
        import time

        line = {"ts": round(time.time(), 3), "plugin": role, "command": environ.get("CNI_COMMAND", ""),
                "containerID": environ.get("CNI_CONTAINERID", ""), "netns": environ.get("CNI_NETNS", ""),
                "ifname": environ.get("CNI_IFNAME", ""), "cniVersion": conf.get("cniVersion", ""),
                "prevResult": isinstance(conf.get("prevResult"), dict), "status": status}
        if status:
            line["error"] = _js.loads(out).get("msg", "")
        with open(path, "a") as f:
            f.write(_js.dumps(line) + "\n")
    except Exception:  # logging never turns a call into a traceback
        pass


def main(role: str) -> None:
    stdin = sys.stdin.buffer.read()
    environ = os.environ
    if environ.get("CNI_COMMAND") in ("ADD", "DEL", "CHECK"):
        # the original prints each missing variable on stderr before the error object
        try:
            v = _js.loads(stdin or b"{}").get("cniVersion") or "0.1.0"
        except Exception:  # any bad config: run() below answers it with an error object
            v = "0.1.0"
        if v in SUPPORTED:
            from ._proto import required_env

            for n in required_env(environ["CNI_COMMAND"], v):
                if not environ.get(n):
                    sys.stderr.write(f"{n} env variable missing\n")
    status, out = run(role, stdin, environ)
    if b"logToFile" in stdin:
        log_call(role, stdin, environ, status, out)
    if out:
        sys.stdout.write(out)
    sys.stdout.flush()
    os._exit(status)
