"""bench/gpu_session.py, the prepared GPU session of issue 13, dry-run on the CPU so that a GPU session does not
spend its budget finding a broken script: `--device cpu --tiny` runs every stage at a tiny size (no stage needs
CUDA to run: each bench function runs on any device; the `gpu` presets, minutes each even on a GPU, run as
`--plan`), and the record it writes holds every case with its ratio and the benches' own cross-checks (both
sides of a comparison agree). Also: the stage budget (a spent budget skips the remaining cases, an overrunning
case is interrupted), the data pack's round trip, and bad flag values."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from bench_scripts import imported

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.py"
BENCH_STAGES = [
    "train_throughput",
    "packed",
    "pack_candidates",
    "hessian_trace",
    "logit_derivatives",
    "second_order",
    "weight_matching",
]
# pyhessian: needs PyHessian 0.1 (else skipped); profile: no ratio (what bounds each workload)
STAGES = BENCH_STAGES[:4] + ["pyhessian"] + BENCH_STAGES[4:] + ["profile"]
PYHESSIAN_CASES = ["PyHessian 0.1 vs lmclab, trace", "PyHessian 0.1 vs lmclab, top eigenvalue"]
HAVE_PYHESSIAN = importlib.util.find_spec("pyhessian") is not None
PRESETS = ["benko", "ito", "singh", "width"]


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


@pytest.fixture(scope="module")
def session() -> Iterator[ModuleType]:
    """bench/gpu_session.py imported as a module."""
    with imported("gpu_session") as module:
        yield module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gpu_out")
    args = ["--device", "cpu", "--tiny", "--threads", "1", "--budget", "3600", "--out", str(out)]
    done = run_script(*args, "--data-dir", str(shared_data), "--presets", ",".join(PRESETS))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "gpu_session.json").read_text())


def cases(record: dict, stage: str) -> list[dict]:
    (st,) = [s for s in record["stages"] if s["name"] == stage]
    return st["cases"]


def test_dry_run_runs_every_stage_and_case(dry_run: tuple[Path, dict]) -> None:
    out, record = dry_run
    assert record["finished"] is True
    assert record["meta"]["device"] == "cpu" and record["meta"]["mode"] == "tiny (dry run)"
    assert record["meta"]["torch"] == torch.__version__
    assert [s["name"] for s in record["stages"]] == STAGES + [f"preset_{p}" for p in PRESETS]
    every = [c for s in record["stages"] for c in s["cases"] if HAVE_PYHESSIAN or s["name"] != "pyhessian"]
    failed = [(c["case"], c.get("error") or c.get("why")) for c in every if c.get("error") or c.get("why")]
    assert not failed, failed
    assert all(c["status"] == "ok" for c in every)
    for stage in BENCH_STAGES:
        ratios = [c["ratio"] for c in cases(record, stage)]
        assert ratios and all(math.isfinite(r) and r > 0 for r in ratios), (stage, ratios)
    assert len(cases(record, "train_throughput")) == 4  # BN and LN × DataLoader with 0 and with 1 worker
    assert len(cases(record, "weight_matching")) == 3
    profiles = cases(record, "profile")  # every workload profiled, its table in gpu_profile.txt (not the JSON)
    assert len(profiles) == 8 and all(c["wall_ms"] > 0 and "table" not in c for c in profiles)
    text = (out / "gpu_profile.txt").read_text()
    assert all(f"## {c['case']}" in text for c in profiles) and text.count("Self CPU time total") == 8
    for p in PRESETS:
        (c,) = cases(record, f"preset_{p}")
        assert c["exit_code"] == 0
    md = (out / "gpu_session.md").read_text()
    assert all(f"| {s} |" in md for s in STAGES) and "| ≥ 2 |" in md and "| ≤ 1.5 |" in md
    assert "NOT FINISHED" not in md
    log = (out / "gpu_session.log").read_text()
    assert "== stage weight_matching" in log and "lmclab run width --preset gpu" in log


def test_dry_run_sides_agree(dry_run: tuple[Path, dict]) -> None:
    """Each comparison computes the same thing both ways: equal traces on equal probes, equal logit coefficients,
    the same permutation and objective."""
    _, record = dry_run
    for c in cases(record, "hessian_trace"):
        lm, py = c["lmclab"], c["pyhessian_way"]
        assert lm["probes"] == py["probes"] and lm["passes"] < py["passes"]  # probes share data passes
        assert lm["trace"] == pytest.approx(py["trace"], rel=1e-4)
    for c in cases(record, "logit_derivatives"):
        assert max(c["max_rel_diff_orders_0_1_2"]) < 1e-4
    for c in cases(record, "weight_matching"):
        assert c["same_permutation"] is True and c["objective"]["lmclab"] == c["objective"]["port"]
    for c in cases(record, "second_order"):
        assert c["ratio"] == pytest.approx((c["path_s"] + c["derivatives_s"]) / c["path_s"])
    (c,) = cases(record, "pack_candidates")  # every candidate's first step agrees with the eager one's
    ran = {n: r for n, r in c["detail"]["candidates"].items() if r["status"] == "ok"}
    assert set(ran) == {"sequential", "vmap", "compile", "vmap+compile", "processes"}
    assert all(r["check"]["agrees"] for r in ran.values()) and c["ratio"] == ran[c["winner"]]["ratio"]
    assert c["statuses"]["cudagraphs"] == c["statuses"]["vmap+cudagraphs"] == "skipped"


def test_dry_run_pyhessian_ran_or_says_why(dry_run: tuple[Path, dict]) -> None:
    """The stage against PyHessian itself ran both cases (PyHessian's Hutchinson and lmclab's on the same probes
    give the same trace; the eigenvalues near the tight reference; the ratios from the recorded times), or, without
    PyHessian, skipped both saying why."""
    _, record = dry_run
    got = cases(record, "pyhessian")
    assert [c["case"] for c in got] == PYHESSIAN_CASES
    if not HAVE_PYHESSIAN:
        assert all(c["status"] == "skipped" and c["why"].startswith("pyhessian not importable") for c in got)
        return
    trace, eigen = got
    assert trace["status"] == eigen["status"] == "ok"
    (seed,) = trace["detail"]  # one seed in the dry run
    assert seed["pyhessian"]["hvps"] == seed["hutchinson"]["hvps"]
    assert seed["pyhessian"]["trace"] == pytest.approx(seed["hutchinson"]["trace"], rel=1e-4)
    times = trace["times_s"]
    assert trace["ratios"] == pytest.approx({m: times["pyhessian"] / times[m] for m in trace["ratios"]})
    assert trace["ratio"] == max(trace["ratios"].values()) == trace["ratios"][trace["best"]]
    ref, power = eigen["reference"], eigen["pyhessian_power"]
    assert power["error"] == pytest.approx(abs(power["value"] - ref) / abs(ref)) and power["error"] < 0.05
    lanczos = eigen["detail"]["one_run"]["lanczos"]
    assert lanczos[-1]["tol"] == 1e-3 and lanczos[-1]["value"] == pytest.approx(ref, rel=1e-3)
    seeds = eigen["detail"]["seeds"]
    for h in ("random", "gradient"):
        assert seeds[h]["matched"] == (max(seeds[h]["errors"]) <= min(seeds["pyhessian"]["errors"]))
    fair = [seeds["pyhessian"]["seconds"] / seeds[h]["seconds"] for h in ("random", "gradient") if seeds[h]["matched"]]
    if fair:
        assert eigen["ratio"] == pytest.approx(max(fair)) and eigen["ratio_basis"].startswith("1 seeds")
    else:
        assert eigen["ratio_basis"].startswith("one run")


def test_pyhessian_missing_skips_with_the_reason(
    session: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyhessian", None)  # import pyhessian.hessian now raises ImportError
    monkeypatch.delitem(sys.modules, "pyhessian.hessian", raising=False)
    record = {"_t0": time.monotonic(), "meta": {}, "stages": []}
    ctx = session.Context(torch.device("cpu"), True, "", tmp_path, tmp_path, record)
    record["meta"] = {"device_name": "cpu", "torch": "", "cuda": None, "cudnn": None, "python": "", "mode": "tiny"}
    record["meta"].update(started_utc="", budget_s=1.0)
    record["stages"].append({"name": "pyhessian", "target": "≥ 2", "cases": ctx.cases})
    session.stage_pyhessian(ctx)
    assert [(c["case"], c["status"]) for c in ctx.cases] == [(c, "skipped") for c in PYHESSIAN_CASES]
    assert all(c["why"].startswith("pyhessian not importable: ModuleNotFoundError") for c in ctx.cases)
    assert "| pyhessian | PyHessian 0.1 vs lmclab, trace | skipped |" in (tmp_path / "gpu_session.md").read_text()


def test_wheels_install_offline_onto_the_path(session: ModuleType, tmp_path: Path) -> None:
    """A pure-Python wheel installs with pip --no-index into the target, which goes first on sys.path; a failed
    install is recorded, not raised; pack_wheels keeps a wheel already there (no download)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    dist = "h5probe-0.1.dist-info"
    files = {
        "h5probe/__init__.py": "VALUE = 42\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: h5probe\nVersion: 0.1\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(wheels / "h5probe-0.1-py3-none-any.whl", "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(f"{dist}/RECORD", "".join(f"{n},,\n" for n in [*files, f"{dist}/RECORD"]))
    site = tmp_path / "site"
    before = list(sys.path)
    try:
        rec = session.install_wheels(wheels, site)
        assert rec["ok"] is True, rec
        assert rec["wheels"] == ["h5probe-0.1-py3-none-any.whl"] and sys.path[0] == str(site)
        assert importlib.import_module("h5probe").VALUE == 42
    finally:
        sys.path[:] = before
        sys.modules.pop("h5probe", None)
    bad = session.install_wheels(tmp_path / "empty", tmp_path / "site2")
    assert bad["ok"] is False and bad["error"] and sys.path == before
    (wheels / "PyHessian-0.1-py3-none-any.whl").write_bytes(b"")
    assert session.pack_wheels(wheels, ("pyhessian==0.1",)) == sorted(wheels.glob("*.whl"))


def test_spent_budget_skips_the_remaining_cases(tmp_path: Path, shared_data: Path) -> None:
    args = ["--device", "cpu", "--tiny", "--stages", "second_order,weight_matching", "--budget", "0.01"]
    done = run_script(*args, "--out", str(tmp_path), "--data-dir", str(shared_data))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "gpu_session.json").read_text())
    assert record["finished"] is True and [s["name"] for s in record["stages"]] == ["second_order", "weight_matching"]
    every = [c for s in record["stages"] for c in s["cases"]]
    assert len(every) == 2 + 3 and all(
        c == {"case": c["case"], "status": "skipped", "why": "stage budget spent"} for c in every
    )
    assert "skipped" in (tmp_path / "gpu_session.md").read_text()


def test_a_case_past_its_stage_budget_is_interrupted(session: ModuleType, tmp_path: Path) -> None:
    record = {"_t0": time.monotonic(), "meta": {}, "stages": []}
    ctx = session.Context(torch.device("cpu"), True, "", tmp_path, tmp_path, record)
    record["meta"] = {"device_name": "cpu", "torch": "", "cuda": None, "cudnn": None, "python": "", "mode": "tiny"}
    record["meta"].update(started_utc="", budget_s=1.0)
    record["stages"].append({"name": "s", "target": "≥ 2", "cases": ctx.cases})
    ctx.deadline = time.monotonic() + 0.2
    ctx.case("sleeps", lambda: time.sleep(60) or {"ratio": 1.0})  # type: ignore[func-returns-value]
    ctx.case("after it", lambda: {"ratio": 3.0})
    ctx.deadline = time.monotonic() + 60
    ctx.case("fails", lambda: {"ratio": 1 / 0})
    ctx.case("fine", lambda: {"ratio": 3.0})
    status = [(c["case"], c["status"]) for c in ctx.cases]
    assert status == [("sleeps", "interrupted"), ("after it", "skipped"), ("fails", "failed"), ("fine", "ok")]
    assert "ZeroDivisionError" in ctx.cases[2]["error"]
    written = json.loads((tmp_path / "gpu_session.json").read_text())  # written after every case
    assert [c["status"] for c in written["stages"][0]["cases"]] == ["interrupted", "skipped", "failed", "ok"]
    md = (tmp_path / "gpu_session.md").read_text()
    assert "| s | fine | ok | 3.00× | ≥ 2 | yes |" in md and "NOT FINISHED" in md


def test_data_pack_round_trip(session: ModuleType, shared_data: Path, tmp_path: Path) -> None:
    files = ("MNIST/raw/t10k-labels-idx1-ubyte",)
    (packed,) = session.pack_data(shared_data, tmp_path / "pack", files)
    assert packed == tmp_path / "pack" / "MNIST/raw/t10k-labels-idx1-ubyte.xz"
    assert packed.stat().st_size < (shared_data / files[0]).stat().st_size
    assert session.unpack_data(tmp_path / "pack", tmp_path / "data") == list(files)
    assert (tmp_path / "data" / files[0]).read_bytes() == (shared_data / files[0]).read_bytes()


def test_help_and_bad_values(session: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        session.parse_args(["--help"])
    assert done.value.code == 0 and "--presets" in capsys.readouterr().out
    for args, says in (
        (["--budget", "-1"], "allowed: seconds > 0"),
        (["--stages", "train_throughput,bogus"], "allowed: distinct stages of train_throughput"),
        (["--presets", "zipit"], "allowed: distinct experiments of benko, ito, singh, width"),
        (["--presets", "width,width"], "allowed: distinct experiments"),
    ):
        with pytest.raises(SystemExit) as done:
            session.parse_args(args)
        assert done.value.code == 2 and says in capsys.readouterr().err.strip().splitlines()[-1]
    assert session.parse_args(["--stages", "none", "--presets", "width"]).stages == []
