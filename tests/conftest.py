"""Shared test fixtures: the read-only real datasets in ../shared/data; every figure saved is recorded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from figures import forget_figures, record_figures

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.fail(f"real datasets not found at {SHARED_DATA} (shared/ must sit beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _recorded_figures() -> Iterator[None]:
    """Keep every figure a report function saves, so tests can check it by content (`figures.drawn`)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        record_figures(monkeypatch)
        yield


@pytest.fixture(scope="module", autouse=True)
def _forget_figures() -> Iterator[None]:
    """Recorded figures are kept while a test module runs (its module fixtures draw them), then dropped."""
    yield
    forget_figures()
