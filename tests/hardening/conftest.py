"""Fixtures for the hardening tests; the helpers live in hardeninghelpers.py (imported by name)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # hardeninghelpers, without a package __init__
