"""Tools the tests need from the machine: skipped when truly missing, required when ``CI=true``.

scripts/setup.sh installs every one of them, so on CI a missing tool is a broken machine and
the test fails instead of passing silently as a skip.
"""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["in_ci", "require_tool"]


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
