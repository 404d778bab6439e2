"""Tools the tests need from the machine: skipped when truly missing, required when ``CI=true``.

scripts/setup.sh installs every one of them, so on CI a missing tool is a broken machine and
the test fails instead of passing silently as a skip.
"""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["MISSING_TOOL_WORDS", "NO_CGROUP", "cgroup_mounted", "in_ci", "require_cgroup_mounts", "require_tool"]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_tool(name: str, *, module_level: bool = False) -> str:
    """The path of ``name``; without it: skip with the reason, or fail when ``CI=true``."""
    path = shutil.which(name)
    if path is not None:
        return path
    msg = f"{name} is not installed"
    if in_ci():
        pytest.fail(f"{msg} (CI=true: scripts/setup.sh installs it, so it is required)", pytrace=False)
    pytest.skip(msg, allow_module_level=module_level)


# A skip whose reason says one of these is about something scripts/setup.sh provides (a tool, root
# and iproute2 on the CI machine): with CI=true tests/conftest.py turns it into a failure.
MISSING_TOOL_WORDS = ("not installed", "missing", "needs root", "needs unshare", "unshare(1)", "setpriv",
                      "iproute2", "reference plugins")


def cgroup_mounted() -> bool:
    """True when a cgroup (v1 or v2) hierarchy is mounted: runc cannot create a container without."""
    try:
        with open("/proc/self/mounts") as f:
            return any(ln.split()[2] in ("cgroup", "cgroup2") for ln in f if len(ln.split()) > 2)
    except OSError:
        return False


NO_CGROUP = "no cgroup mount on this machine (runc create failed: no cgroup mount found)"


def require_cgroup_mounts() -> None:
    """Skip (even with CI=true: a machine may truly lack them) when no cgroup is mounted."""
    if not cgroup_mounted():
        pytest.skip(NO_CGROUP)
