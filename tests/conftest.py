"""Shared fixtures: the verified MNIST copies beside the checkout, and a clean environment.

Tests compose the process as the command line does: every built-in plugin registered.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import simulator.run.builtins  # noqa: F401  (registers every built-in plugin)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

if not (SHARED_DATA / "mnist").is_dir():
    raise RuntimeError(
        f"tests need the verified MNIST files at {SHARED_DATA} (see shared/data/README.md)"
    )
os.environ.setdefault("LEAKSIM_DATA_DIR", str(SHARED_DATA))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The verified MNIST / Fashion-MNIST IDX files (layout ``<dir>/<dataset>/<file>``)."""
    return SHARED_DATA
