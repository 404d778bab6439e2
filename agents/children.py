"""Child processes that never outlive their parent."""

from __future__ import annotations

import contextlib
import signal

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child (before exec, or first thing in a pool worker): SIGTERM it when its parent dies,
    even by SIGKILL, so no orphan keeps a port or a lock."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
