"""The ``corral`` command: one subcommand per daemon, and the shared way to run a daemon.

Each subcommand lives in its own module that exposes ``main(argv: list[str]) -> int``;
modules are imported only when their subcommand runs, so ``corral dns`` never pays for
pyroute2 and ``corral ctl`` never pays for dnslib; dispatching itself imports neither asyncio
nor the logging stack (metadata answers its first requests before loading them).

:func:`run_daemon` is how every daemon's ``main`` runs its ``serve`` coroutine: uvloop when
available, structlog set up, a pid file, SIGTERM/SIGINT turned into a stop event (a second
signal exits at once), and a clean exit code.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from agents.errors import ConfigError, InputError

if TYPE_CHECKING:  # asyncio and structlog load when a daemon runs, not to dispatch a command
    import asyncio

__all__ = ["SUBCOMMANDS", "main", "run_daemon"]

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "server": ("standin.main", "the stand-in Rancher server"),
    "ctl": ("standin.ctl", "drive the stand-in server (resources, faults, journal)"),
    "demo": ("standin.demo", "run the whole suite on one node against the stand-in server"),
    "metadata": ("metadata.main", "the metadata service"),
    "dns": ("dns.main", "the DNS service"),
    "healthcheck": ("healthcheck.main", "HAProxy-driven health checks"),
    "netmanager": ("netmanager.main", "host networking, CNI and overlays"),
    "overlay": ("netmanager.overlay.main", "cross-host VXLAN router (rancher-net wire format)"),
    "scheduler": ("scheduler.main", "the resource scheduler"),
    "etc-host-updater": ("etchosts.main", "the /etc/hosts writer"),
    "status": ("agents.status", "one view of this node, read from the daemons' admin endpoints"),
}


def _usage() -> str:
    lines = ["usage: corral <command> [flags]", "", "commands:"]
    for name, (_, doc) in SUBCOMMANDS.items():
        lines.append(f"  {name:<18} {doc}")
    lines.append("")
    lines.append("corral <command> --help shows a command's flags; corral --version the version.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        from agents.config import VERSION

        print(f"corral {VERSION}")
        return 0
    name, rest = args[0], args[1:]
    entry = SUBCOMMANDS.get(name)
    if entry is None:
        print(f"corral: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        mod = importlib.import_module(entry[0])
    except ModuleNotFoundError as e:
        if e.name and entry[0].startswith(e.name):
            print(f"corral: command {name!r} is not built yet", file=sys.stderr)
            return 2
        raise
    try:
        rc = mod.main(rest)
    except KeyboardInterrupt:  # Ctrl-C on a short command (ctl, or a daemon still parsing): no traceback
        return 130
    except BrokenPipeError:  # `corral ctl ... | head`: the reader went away, not an error of ours
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")
        return 0
    return int(rc or 0)


def _install_loop() -> None:
    import asyncio

    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass


_held_signals: list[int] = []


def hold_signals() -> None:
    """Keep SIGTERM/SIGINT that arrive before :func:`run_daemon`'s loop runs (a daemon that serves
    while it is still importing, as metadata does) and deliver them once the loop is up, so such a
    signal stops the daemon cleanly instead of killing it mid-import."""
    import signal

    def held(sig: int, _frame: object) -> None:
        _held_signals.append(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, held)


def run_daemon(
    component: str,
    serve: Callable[[asyncio.Event], Awaitable[Any]],
    *,
    debug: bool = False,
    log_file: str = "",
    log_json: bool | None = None,
    pid_file: str = "",
) -> int:
    """Run ``serve(stop)`` until it returns or a signal sets ``stop``; return the exit code.

    ``serve`` must return soon after ``stop`` is set (lame-duck work is its own business).
    A :class:`ConfigError` (bad flags, a listener that cannot bind) is printed as one line on
    stderr with exit code 2; an :class:`InputError` that reaches here (bad input found at start
    with nothing good to serve instead, e.g. a corrupt answers file) is one line and exit code 1;
    any other crash is logged with its traceback and exits 1.
    """
    import asyncio
    import signal

    from agents.log import get_logger, setup_logging

    try:
        stream: Any = open(log_file, "a", buffering=1) if log_file else None
    except OSError as e:
        print(f"{component}: --log {log_file}: {e.strerror or e}", file=sys.stderr)
        return 2
    setup_logging(component, debug=debug, json=log_json, stream=stream)
    log = get_logger("cli")
    if pid_file:
        try:
            with open(pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as e:
            print(f"{component}: --pid-file {pid_file}: {e.strerror or e}", file=sys.stderr)
            if stream is not None:
                setup_logging(component, debug=debug, json=log_json)
                stream.close()
            return 2
    _install_loop()

    async def runner() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        hits = 0

        def on_signal(sig: int) -> None:
            nonlocal hits
            hits += 1
            log.info("signal", signal=signal.Signals(sig).name, count=hits)
            if hits > 1:
                os._exit(130)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        if _held_signals:  # arrived before the loop ran (hold_signals): one stop, as if now
            on_signal(_held_signals[0])
            _held_signals.clear()
        try:
            await serve(stop)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return 0

    try:
        rc = asyncio.run(runner())
        log.info("stopped")
        return rc
    except (ConfigError, InputError) as e:
        if log_file:  # on stderr the plain line below says it; a log file gets the record too
            log.error("config error" if isinstance(e, ConfigError) else "bad input at start", error=str(e))
        print(f"{component}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a crash is logged in the daemon's own log format, then exit 1
        log.exception("daemon crashed", error=str(e), error_type=type(e).__name__)
        return 1
    finally:
        if pid_file:
            try:
                os.unlink(pid_file)
            except OSError:
                pass
        if stream is not None:
            setup_logging(component, debug=debug, json=log_json)  # nothing may log to a closed file
            stream.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
