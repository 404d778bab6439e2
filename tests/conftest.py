"""Shared fixtures. Integration fixtures start real processes; see tests/helpers/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYTHONPATH", str(ROOT))

from hypothesis import settings  # noqa: E402

# The fuzz tests draw the same examples on every run by default, so a CI run is reproducible;
# HYPOTHESIS_PROFILE=explore draws fresh random examples on each run, to hunt for new bugs.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

pytest_plugins = ["tests.helpers.fixtures"]
