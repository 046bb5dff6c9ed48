"""The Ray executor on a Ray instance on this machine (2 CPUs): the same results as the local executor,
each step computed exactly once across two drivers, a killed worker retried, a killed driver's rerun
recomputing nothing finished, a failing step's descendants skipped, and the CLI's --plan / --json /
--executor. Skipped where Ray is not installed (it is the optional extra lmclab[ray])."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

ray = pytest.importorskip("ray")

# Light imports only: Ray workers import this module (for its step kinds); the CLI is imported in the
# tests that use it.
from lmclab.data import DataError  # noqa: E402
from lmclab.experiments.graph import (  # noqa: E402
    LocalExecutor,
    Resources,
    Step,
    StepsFailed,
    check_resources,
    resources_for,
    step_kind,
)
from lmclab.experiments.ray_executor import RayExecutor, parse_address  # noqa: E402
from lmclab.store.locks import is_locked  # noqa: E402

TESTS = Path(__file__).resolve().parent


def _record(config: dict[str, Any]) -> None:
    """Append this computation to the log named in the config (one line per computation)."""
    with open(config["log"], "a") as fh:
        fh.write(f"{config['name']} {os.getpid()}\n")


@step_kind("test_ray_value")
def _value(ctx, config, inputs):  # type: ignore[no-untyped-def]
    """A small deterministic torch computation (bit-identical wherever it runs on one CPU thread)."""
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(config["seed"]))
    value = (x @ x.T).tanh().sum().item() + sum(r["value"] for r in inputs.values())
    time.sleep(config.get("sleep", 0.0))
    while config.get("hold") and Path(config["hold"]).exists():
        time.sleep(0.05)
    _record(config)
    return {"value": value, "seed": config["seed"]}


@step_kind("test_ray_fail")
def _fail(ctx, config, inputs):  # type: ignore[no-untyped-def]
    raise ValueError("broken on purpose")


@step_kind("test_ray_die_once")
def _die_once(ctx, config, inputs):  # type: ignore[no-untyped-def]
    """Kills its own worker process the first time (a marker file remembers), completes the second."""
    marker = Path(config["marker"])
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    _record(config)
    return {"value": 1.0, "seed": 0}


def value(name: str, log: Path, seed: int, **extra: Any) -> Step:
    inputs = extra.pop("inputs", {})
    return Step("test_ray_value", {"name": name, "log": str(log), "seed": seed, **extra}, inputs)


def computations(log: Path) -> list[str]:
    return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


def graph(name: str, tmp: Path) -> list[Step]:
    """The graphs the tests and their driver processes run."""
    log = tmp / "log.txt"
    if name == "diamond":
        a, b = value("a", log, 1), value("b", log, 2)
        return [value("c", log, 3, inputs={"x": a, "y": b}), value("d", log, 4)]
    if name == "four":
        parts = [value(f"p{i}", log, i, sleep=0.5) for i in range(4)]
        return [value("sum", log, 9, inputs={f"x{i}": p for i, p in enumerate(parts)})]
    if name == "held":
        return [value("fast1", log, 1), value("fast2", log, 2), value("slow", log, 3, hold=str(tmp / "hold"))]
    if name == "failing":
        a = value("a", log, 1)
        broken = Step("test_ray_fail", {"name": "broken"}, {"a": a})
        return [value("after", log, 5, inputs={"b": broken}), value("independent", log, 6)]
    raise KeyError(name)


def drive(root: str, address: str, name: str) -> None:
    """A driver process: runs graph `name` on the cluster at `address`, prints its report as JSON."""
    executor = RayExecutor(Path(root) / "runs", progress=False, address=address)
    executor.run(graph(name, Path(root)))
    print(json.dumps(executor.report.to_json()))


def start_driver(tmp: Path, address: str, name: str) -> subprocess.Popen[str]:
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_ray_executor as t; t.drive(*sys.argv[1:])"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, str(tmp), address, name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """One Ray instance for the module (its workers import this module: the tests directory on their path)."""
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_local_and_ray_give_identical_results_and_stores(cluster: str, tmp_path: Path) -> None:
    steps = graph("diamond", tmp_path)
    local = LocalExecutor(tmp_path / "local", progress=False).run(steps)
    executor = RayExecutor(tmp_path / "ray", progress=False)
    results = executor.run(steps)
    assert results == local and len(results) == 4  # bit-identical floats (one CPU thread each)
    assert executor.report.counts() == {"computed": 4, "reused": 0, "failed": 0, "skipped": 0}
    for step in steps:
        docs = [json.loads((tmp_path / s / "steps" / step.name / "result.json").read_text()) for s in ("local", "ray")]
        assert docs[0]["result"] == docs[1]["result"] and docs[1]["seconds"] >= 0
    again = RayExecutor(tmp_path / "ray", progress=False)
    assert again.run(steps) == local and again.report.counts()["reused"] == 4 and again.ran == []


def test_two_drivers_at_once_compute_each_step_once(cluster: str, tmp_path: Path) -> None:
    drivers = [start_driver(tmp_path, cluster, "four") for _ in range(2)]
    outputs = [d.communicate(timeout=240) for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0], [err[-2000:] for _, err in outputs]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(computations(tmp_path / "log.txt")) == ["p0", "p1", "p2", "p3", "sum"]  # each exactly once
    assert sum(r["computed"] for r in reports) == 5 and all(r["computed"] + r["reused"] == 5 for r in reports)


def test_a_killed_worker_is_retried_and_the_step_completes(cluster: str, tmp_path: Path) -> None:
    log, marker = tmp_path / "log.txt", tmp_path / "marker"
    die = Step("test_ray_die_once", {"name": "die", "log": str(log), "marker": str(marker)})
    after = value("after", log, 7, inputs={"d": die})
    executor = RayExecutor(tmp_path / "runs", progress=False, max_retries=2)
    results = executor.run([after])
    assert marker.exists() and results[die.key] == {"value": 1.0, "seed": 0}
    assert computations(log) == ["die", "after"] and executor.report.counts()["computed"] == 2
    lock = tmp_path / "runs" / ".locks" / "steps" / f"{die.name}.lock"
    assert lock.is_file() and lock.read_text() == ""  # the retry took the dead worker's claim over, then released it


def test_a_killed_driver_loses_nothing_finished(cluster: str, tmp_path: Path) -> None:
    (tmp_path / "hold").write_text("the slow step waits while this file exists")
    driver = start_driver(tmp_path, cluster, "held")
    steps = graph("held", tmp_path)
    stored = [tmp_path / "runs" / "steps" / s.name / "result.json" for s in steps[:2]]
    deadline = time.monotonic() + 120
    while not all(p.is_file() for p in stored) and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.1)
    assert all(p.is_file() for p in stored), driver.communicate()[1][-2000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # Ray kills the dead driver's tasks asynchronously: wait until the slow step's claim is free (its worker
    # gone), so that it cannot finish its computation after the hold is lifted and die before storing it.
    slow = tmp_path / "runs" / "steps" / steps[2].name
    deadline = time.monotonic() + 120
    while is_locked(slow, tmp_path / "runs") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not is_locked(slow, tmp_path / "runs"), "the killed driver's slow step still holds its claim"
    (tmp_path / "hold").unlink()
    executor = RayExecutor(tmp_path / "runs", progress=False)
    results = executor.run(steps)
    assert len(results) == 3 and {steps[0].name, steps[1].name} <= set(executor.report.reused)
    assert sorted(computations(tmp_path / "log.txt")) == ["fast1", "fast2", "slow"]  # nothing computed twice


def test_a_failing_step_skips_its_descendants_only(cluster: str, tmp_path: Path) -> None:
    steps = graph("failing", tmp_path)
    executor = RayExecutor(tmp_path / "runs", progress=False)
    with pytest.raises(StepsFailed) as info:
        executor.run(steps)
    report = info.value.report
    broken = steps[0].inputs["b"]
    assert report.failed == {broken.name: "ValueError: broken on purpose"}
    assert report.skipped == [steps[0].name] and report.counts() == {
        "computed": 2,
        "reused": 0,
        "failed": 1,
        "skipped": 1,
    }
    assert sorted(computations(tmp_path / "log.txt")) == ["a", "independent"]
    local = LocalExecutor(tmp_path / "local", progress=False)
    with pytest.raises(StepsFailed, match="broken on purpose") as local_info:
        local.run(steps)
    assert local_info.value.report.counts() == report.counts()  # one loop, one failure policy
    assert isinstance(local_info.value.__cause__, ValueError)  # the failure's traceback rides along


def fake_singh(steps: list[Step]) -> Any:
    """The singh experiment (its presets) with a run that runs `steps` and writes nothing."""
    from lmclab.experiments.singh import EXPERIMENT as SINGH

    def run(options: Any, ctx: Any) -> dict[str, Any]:
        _, ran = ctx.run_steps(steps)
        return {"out": str(ctx.out), "files": {}, "steps_run": ran}

    return dataclasses.replace(SINGH, run=run)


def test_cli_plan_json_and_failure_summary(
    cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmclab.cli import main
    from lmclab.experiments import registry

    runs = ["--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no-progress"]
    steps = graph("diamond", tmp_path)
    monkeypatch.setitem(registry.EXPERIMENTS, "singh", fake_singh(steps))
    assert main(["run", "singh", "--plan", *runs]) == 0
    text = capsys.readouterr().out
    assert "test_ray_value" in text and "nothing is run" in text and "4 to run" in text
    assert main(["run", "singh", "--executor", "ray", "--json", *runs]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["computed"], summary["reused"], summary["failed"], summary["skipped"]) == (4, 0, 0, 0)
    assert summary["out"] == str(tmp_path / "out") and summary["executor"] == "ray"
    assert main(["run", "singh", "--plan", "--json", *runs]) == 0
    (plan,) = json.loads(capsys.readouterr().out)["plan"]
    assert (plan["steps"], plan["stored"], plan["to_run"], plan["measured_steps"]) == (4, 4, 0, 4)
    assert plan["mean_seconds"] >= 0 and plan["estimated_seconds"] == 0
    assert main(["run", "singh", "--json", *runs]) == 0  # the local executor reuses what Ray stored
    assert json.loads(capsys.readouterr().out)["reused"] == 4

    failing = graph("failing", tmp_path)
    monkeypatch.setitem(registry.EXPERIMENTS, "singh", fake_singh(failing))
    with pytest.raises(ValueError, match="broken on purpose"):  # a bug in a step: its traceback, after the summary
        main(["run", "singh", "--executor", "ray", "--json", *runs])
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    broken = failing[0].inputs["b"]
    assert summary["failed_steps"] == [{"step": broken.name, "error": "ValueError: broken on purpose"}]
    assert (summary["computed"], summary["failed"], summary["skipped"]) == (1, 1, 1)  # "a" was stored before
    assert f"step {broken.name} failed: ValueError: broken on purpose" in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "singh", "--executor", "slurm"], "--executor: invalid choice: 'slurm'"),
        (["run", "singh", "--executor", "ray", "--address", "nohost"], "--address: 'nohost' is not allowed"),
        (["run", "singh", "--address", "head:6379"], "--address head:6379: allowed only with --executor ray"),
        (["merge", "a", "b", "--executor", "dask"], "--executor: invalid choice: 'dask'"),
    ],
)
def test_bad_executor_flags_exit_2_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmclab.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_help_lists_the_executors(capsys: pytest.CaptureFixture[str]) -> None:
    from lmclab.cli import main

    for command in ("run", "merge"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "--executor" in out and "ray" in out and "--address" in out
    assert parse_address("auto") == "auto" and parse_address("10.0.0.1:6379") == "10.0.0.1:6379"
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("10.0.0.1:99999")


def test_resources_per_step_kind_and_preset_overrides() -> None:
    from lmclab.experiments.settings import PresetError, parse_preset
    from lmclab.experiments.singh import SinghOptions

    assert resources_for("train") == Resources(cpus=1, gpus=1)
    assert resources_for("align") == Resources(cpus=1, gpus=0)
    assert resources_for("path") == Resources(cpus=1, gpus=0.25)
    overrides = {"training": {"gpus": 0.25}, "train": {"cpus": 2}}
    assert resources_for("train", overrides) == Resources(cpus=2, gpus=0.25)  # the class, then the kind
    with pytest.raises(ValueError, match="not a resource class or step kind"):
        check_resources({"trainig": {"gpus": 1}})
    with pytest.raises(ValueError, match="unknown key"):
        check_resources({"training": {"gpu": 1}})
    with pytest.raises(ValueError, match="a fraction in"):
        check_resources({"evaluation": {"gpus": 1.5}})
    preset = parse_preset(
        SinghOptions, {"description": "x", "resources": {"training": {"gpus": 0.5}}}, name="toy", where="toy"
    )
    assert resources_for("train", preset.resources).gpus == 0.5
    with pytest.raises(PresetError, match="resources.training.gpus must be a number"):
        parse_preset(
            SinghOptions, {"description": "x", "resources": {"training": {"gpus": "all"}}}, name="t", where="t"
        )


def test_the_live_view_counts_by_kind_and_estimates_what_is_left() -> None:
    from lmclab.experiments.graph import LiveView

    steps = [Step("a", {"i": i}) for i in range(5)] + [Step("b", {})]
    view = LiveView(steps, {"a": [2.0, 4.0]}, enabled=False, slots=lambda kind: 2.0 if kind == "a" else 1.0)
    assert view.eta() is None  # kind b was never measured
    for _ in range(3):
        view.start("a")
    assert (view.running("a"), view.pending("a"), view.pending("b")) == (2, 3, 1)  # 2 slots: one submitted step queued
    view.finish("a", 6.0)
    view.finish("b", None, ok=False, started=False)  # skipped
    assert (view.done["a"], view.running("a"), view.pending("a"), view.failed["b"]) == (1, 2, 2, 1)
    assert view.eta() == pytest.approx((2 + 2 / 2) * 4.0 / 2)  # (pending + running / 2) × mean ÷ slots


@step_kind("test_user_error")
def _user_error(ctx, config, inputs):  # type: ignore[no-untyped-def]
    raise DataError("no mnist under /nowhere; get it with `lmclab datasets`")


def test_a_user_error_in_a_step_exits_2_without_traceback_local_executor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Failures that are all user errors: exit 2 after the summary; independent steps still finish."""
    from lmclab.cli import main
    from lmclab.experiments import registry

    log = tmp_path / "log.txt"
    steps = [Step("test_user_error", {"name": "missing"}), value("independent", log, 6)]
    monkeypatch.setitem(registry.EXPERIMENTS, "singh", fake_singh(steps))
    runs = ["--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "singh", *runs])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "DataError: no mnist under /nowhere" in err and "Traceback" not in err
    assert computations(log) == ["independent"]
