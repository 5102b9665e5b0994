"""Fixtures for the hardening tests; the helpers live in hardeninghelpers.py (imported by name)."""

from __future__ import annotations


