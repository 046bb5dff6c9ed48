"""Shared test fixtures: the read-only real datasets in ../shared/data."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.fail(f"real datasets not found at {SHARED_DATA} (shared/ must sit beside the checkout)")
    return SHARED_DATA
