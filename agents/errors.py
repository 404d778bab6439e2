"""Corral's exception tree, shared by every daemon.

    CorralError
     ├── ConfigError          bad flags, env vars, config files (caller's fault, fix and restart)
     ├── InputError           malformed input from outside: events, answers, packets, CNI configs
     └── TransportError       something on the other end went away or misbehaved
          ├── ApiError        the server answered with a non-2xx status (carries status and body)
          └── ProtocolError   the other end spoke something we cannot parse

Adapters translate library exceptions (aiohttp, websockets, subprocess, pyroute2) into these
at the boundary, so daemon logic never catches a dependency's exception type.
"""

from __future__ import annotations

__all__ = ["ApiError", "ConfigError", "CorralError", "InputError", "ProtocolError", "TransportError"]


class CorralError(Exception):
    """Root of every error Corral raises on purpose."""


class ConfigError(CorralError):
    """Invalid configuration: flags, environment variables or configuration files."""


class InputError(CorralError):
    """Malformed input received from outside (event, answers file, packet, CNI config)."""


class TransportError(CorralError):
    """A peer (server, metadata, HAProxy, kernel) is unreachable or failed."""


class ApiError(TransportError):
    """Non-2xx answer from the server's HTTP API.

    The message has the go-rancher shape so logs read the same as the originals':
    ``Bad response statusCode [N]. Status [...]. Body: [...] from [url]``.
    """

    def __init__(self, status: int, reason: str, body: str, url: str) -> None:
        self.status = status
        self.reason = reason
        self.body = body
        self.url = url
        super().__init__(
            f"Bad response statusCode [{status}]. Status [{status} {reason}]. Body: [{body[:500]}] from [{url}]"
        )

    @property
    def retryable(self) -> bool:
        return self.status == 429 or self.status >= 500


class ProtocolError(TransportError):
    """The peer sent something that does not follow the protocol."""
