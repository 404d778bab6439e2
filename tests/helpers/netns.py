"""Throw-away network namespaces for tests. Never touches the root namespace's network."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator

import pytest

IS_ROOT = os.geteuid() == 0
HAS_IP = shutil.which("ip") is not None

requires_root = pytest.mark.skipif(not (IS_ROOT and HAS_IP), reason="needs root and iproute2 (network namespaces)")


def sh(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, input=input)


def run_in_netns(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *cmd, check=check)


@contextlib.contextmanager
def netns(prefix: str = "t") -> Iterator[str]:
    """Create ``corral-<prefix>-<rand>`` with loopback up; delete it (and its links) afterwards."""
    name = f"corral-{prefix}-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", name)
    try:
        run_in_netns(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        # Processes still inside would keep it alive: kill them first.
        pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        sh("ip", "netns", "del", name, check=False)
