"""One way to log, for every daemon: structlog, JSON lines when stderr is not a TTY.

Every line carries ``component`` (the daemon) and ``event`` (a short fixed message); the
variable parts go in keys, so logs can be grepped and parsed the same way everywhere.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["get_logger", "lazy_logger", "setup_logging"]

_configured = False


def setup_logging(component: str, *, debug: bool = False, json: bool | None = None, stream: Any = None) -> None:
    """Configure structlog and the stdlib root logger once per process."""
    import logging

    import structlog

    global _configured
    out = stream or sys.stderr
    if json is None:
        json = not (hasattr(out, "isatty") and out.isatty())
    level = logging.DEBUG if debug else logging.INFO
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(component=component)
    # Libraries that use stdlib logging (aiohttp, websockets) go to the same stream, quietly.
    logging.basicConfig(level=logging.WARNING if not debug else logging.INFO, stream=out, force=True)
    _configured = True


def get_logger(name: str | None = None, **bound: Any) -> Any:
    """A structlog logger; ``name`` becomes the ``module`` key."""
    import structlog

    if name:
        bound = {"module": name, **bound}
    # Initial values, not .bind(): binding a lazy proxy at import time would freeze the default
    # configuration into module-level loggers, before setup_logging runs.
    return structlog.get_logger(**bound)


class _LazyLogger:
    """Stands for ``get_logger(name)`` and loads structlog at its first use."""

    __slots__ = ("_bound", "_log", "_name")

    def __init__(self, name: str | None, bound: dict[str, Any]) -> None:
        self._name = name
        self._bound = bound
        self._log: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._log is None:
            self._log = get_logger(self._name, **self._bound)
        return getattr(self._log, attr)


def lazy_logger(name: str | None = None, **bound: Any) -> Any:
    """:func:`get_logger` for modules on a start path that must not load structlog yet
    (metadata answers its first requests before the logging stack is imported)."""
    return _LazyLogger(name, bound)
