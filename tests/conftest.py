"""Shared test fixtures: the read-only real datasets in ../shared/data; every figure saved is recorded; one
intra-op thread for modules of tiny models; two tiny real-MNIST runs; the flags and keyword arguments of a
quiet, offline CPU command or experiment."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from figures import forget_figures, record_figures
from lmclab.config import DataConfig, ModelConfig, RunConfig, SeedConfig, TrainConfig
from lmclab.store import Run, RunStore
from lmclab.training import RunOptions, train

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: The tiny real-MNIST MLP of `tiny_pair` (30 examples per class, 2 epochs of Adam).
TINY_MLP = RunConfig(
    data=DataConfig("mnist", train_per_class=30),
    model=ModelConfig("mlp", hidden=(24, 24)),
    train=TrainConfig(optimizer="adam", lr=3e-3, batch_size=50, epochs=2),
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.fail(f"real datasets not found at {SHARED_DATA} (shared/ must sit beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread while a module of tiny models runs (no contention on the shared 2-core machine);
    a module takes it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[RunStore, list[Run]]:
    """Two `TINY_MLP` runs (seeds 0 and 1) trained into a fresh store of the module's own."""
    root = tmp_path_factory.mktemp("runs")
    opts = RunOptions(runs_dir=str(root), data_dir=str(shared_data), device="cpu", progress=False, download=False)
    runs = [train(dataclasses.replace(TINY_MLP, seeds=SeedConfig.from_seed(s)), opts) for s in (0, 1)]
    return RunStore(root), runs


@pytest.fixture(scope="session")
def cli_io(shared_data: Path) -> Callable[[str | Path], list[str]]:
    """`cli_io(runs_dir)`: the `lmclab` flags of a quiet offline CPU command on the shared data and that store."""

    def flags(runs_dir: str | Path) -> list[str]:
        data = ["--data-dir", str(shared_data), "--offline"]
        return ["--runs-dir", str(runs_dir), *data, "--device", "cpu", "--no-progress"]

    return flags


@pytest.fixture(scope="session")
def quiet_run(shared_data: Path) -> Callable[[Path], dict[str, Any]]:
    """`quiet_run(root)`: the keyword arguments of an experiment run (or `ExperimentContext`) writing to
    root/out with the store root/runs, on the shared data, on the CPU, without progress or messages."""

    def kwargs(root: Path) -> dict[str, Any]:
        where = {"out": root / "out", "runs_dir": str(root / "runs"), "data_dir": str(shared_data)}
        return {**where, "device": "cpu", "progress": False, "say": lambda _: None}

    return kwargs


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
