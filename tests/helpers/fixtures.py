"""pytest fixtures shared by every package's tests (registered from tests/conftest.py)."""

from __future__ import annotations
