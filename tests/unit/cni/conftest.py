"""Make cni-plugins/ importable (the plugin package lives in a folder with a dash)."""

import sys
from pathlib import Path

PLUGINS = Path(__file__).resolve().parents[3] / "cni-plugins"
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))
