"""Shared fixtures. Integration fixtures start real processes; see tests/helpers/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYTHONPATH", str(ROOT))

pytest_plugins = ["tests.helpers.fixtures"]
