"""Listen addresses: parsing ``host:port`` and the one-line error for a listener that cannot bind.

Kept apart from :mod:`agents.metrics` (which loads prometheus_client) so a daemon can open its
port before anything heavy is imported; :mod:`agents.metrics` re-exports these names.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator

from agents.errors import ConfigError

__all__ = ["ListenError", "binding", "listen_error", "parse_listen"]


def parse_listen(spec: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """Parse ``host:port``, ``:port`` or ``[v6]:port`` into (host, port)."""
    s = spec.strip()
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        port_s = rest.lstrip(":")
    else:
        host, sep, port_s = s.rpartition(":")
        if not sep:
            host, port_s = "", s
    try:
        port = int(port_s)
    except ValueError as e:
        raise ConfigError(f"bad listen address {spec!r}: port is not a number") from e
    if not 0 <= port <= 65535:
        raise ConfigError(f"bad listen address {spec!r}: port out of range")
    return (host or default_host), port


class ListenError(ConfigError, OSError):
    """A listener could not be opened: one line naming the flag, the address and why. It is a
    ConfigError (the daemon prints it and exits 2) and an OSError (code that carries on without
    an optional listener keeps catching OSError)."""


_WHY = {
    errno.EADDRINUSE: "address already in use (another process listens there)",
    errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
    errno.EPERM: "operation not permitted",
    errno.EADDRNOTAVAIL: "address not available (no interface on this host has it)",
    errno.EAFNOSUPPORT: "address family not supported",
}


def listen_error(flag: str, address: str, e: OSError) -> ListenError:
    """The one-line error for a failed bind of ``address`` given by ``flag``."""
    if isinstance(e, socket.gaierror):
        why = f"cannot resolve the host ({e.strerror or e})"
    else:
        why = _WHY.get(e.errno or 0) or (e.strerror or str(e)).splitlines()[0]
    where = f"{address} ({flag})" if flag else address
    return ListenError(f"cannot listen on {where}: {why}")


@contextlib.contextmanager
def binding(flag: str, address: str) -> Iterator[None]:
    """Every listener's bind runs inside this: any OSError becomes a :class:`ListenError`
    naming ``flag`` and ``address`` (``with binding("--listen", args.listen): await srv.start()``)."""
    try:
        yield
    except ListenError:
        raise
    except OSError as e:
        raise listen_error(flag, address, e) from None
