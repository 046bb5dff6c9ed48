"""bench/gpu_profile.py (what bounds each GPU workload), dry-run on the CPU: every workload profiles at a tiny
size, the numbers are consistent with an independent timing, and the verdict reads busy correctly."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from bench_scripts import imported

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_profile.py"


@pytest.fixture(scope="module")
def gp() -> Iterator[ModuleType]:
    with imported("gpu_profile") as module:
        yield module


def test_every_workload_profiles_on_the_cpu(gp: ModuleType, tmp_path: Path) -> None:
    records = gp.run(torch.device("cpu"), True, tmp_path)
    assert [r["workload"] for r in records] == [w.name for w in gp.WORKLOADS]
    assert not [r["error"] for r in records if "error" in r]
    for r in records:
        assert r["wall_ms"] > 0 and r["host_ms"] > 0
        assert "busy" not in r and r["verdict"].startswith("no device")
        assert "Self CPU" in r["table"]
    text = (tmp_path / "gpu_profile.txt").read_text()
    assert all(f"## {w.name}" in text for w in gp.WORKLOADS)


def test_profile_call_times_and_names_the_work(gp: ModuleType) -> None:
    a = torch.randn(64, 64)

    def work() -> object:
        time.sleep(0.02)  # the wall time must include it; the host time of ops cannot
        return a @ a

    rec = gp.profile_call(work, torch.device("cpu"), calls=2)
    assert rec["wall_ms"] >= 20.0
    assert rec["host_ms"] < rec["wall_ms"]
    assert "aten::mm" in rec["table"]


def test_a_failing_workload_is_recorded_and_the_rest_run(gp: ModuleType, tmp_path: Path) -> None:
    def broken(device: torch.device, tiny: bool) -> object:
        raise RuntimeError("no kernel")

    ok = gp.Workload("ok", lambda device, tiny: lambda: torch.ones(3).sum())
    records = gp.run(torch.device("cpu"), True, tmp_path, workloads=(gp.Workload("broken", broken), ok))
    assert records[0] == {"workload": "broken", "error": "RuntimeError: no kernel"}
    assert "error" not in records[1]
    assert "failed: RuntimeError: no kernel" in (tmp_path / "gpu_profile.txt").read_text()


@pytest.mark.parametrize(
    ("busy", "start"), [(0.95, "kernel-bound"), (0.8, "kernel-bound"), (0.6, "mixed"), (0.2, "host-bound")]
)
def test_verdict_reads_busy(gp: ModuleType, busy: float, start: str) -> None:
    assert gp.verdict({"busy": busy, "launches": 300.0}).startswith(start)


def test_bad_calls_exit_2_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--calls", "0"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("--calls must be at least 1")
    assert "Traceback" not in done.stderr
