"""Helpers shared by the test modules: reference models, generated data, local hub servers."""

from pathlib import Path

#: The repository root (README, hubconf.py, weights/manifest.json).
REPO = Path(__file__).resolve().parents[2]
