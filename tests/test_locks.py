"""Store locks: exclusive between processes, freed when the holder dies (taken over), re-entrant in a thread;
two identical trainings at once train once; a training killed while another waits is resumed by it."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmclab.cli import build_parser
from lmclab.config import DataConfig, ModelConfig, RunConfig, SeedConfig, TrainConfig, config_from_args
from lmclab.experiments import lmc
from lmclab.experiments.graph import LocalExecutor, Step, step_kind
from lmclab.store import ArtifactLock, LockTimeout, RunStore, artifact_lock, lock_path
from lmclab.training import RunOptions, get_preset, train

SRC = Path(__file__).resolve().parents[1] / "src"


def python(code: str, *args: str, **kw: object) -> subprocess.Popen[str]:
    """A Python subprocess running `code` (lmclab importable), stdout and stderr as text pipes."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        text=True,
        stdout=kw.pop("stdout", subprocess.PIPE),  # type: ignore[arg-type]
        stderr=kw.pop("stderr", subprocess.PIPE),  # type: ignore[arg-type]
    )


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


HOLD = """
    import importlib.util, sys, time
    # the lock module alone (it imports nothing of lmclab), so that this process starts in a blink
    spec = importlib.util.spec_from_file_location("locks", sys.argv[5])
    locks = sys.modules["locks"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(locks)
    ArtifactLock = locks.ArtifactLock
    lock = ArtifactLock(sys.argv[1], "the test artifact", timeout=float(sys.argv[2]))
    try:
        lock.acquire()
    except TimeoutError as exc:
        print("timeout:", exc, flush=True)
        sys.exit(3)
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
    if sys.argv[4] == "release":
        lock.release()
"""


def hold(path: Path, timeout: float, seconds: float, release: bool = False) -> subprocess.Popen[str]:
    """A process that takes the lock at `path` (or prints "timeout: …" and exits 3), prints "locked",
    holds it `seconds`, then exits, releasing it first if `release`."""
    module = SRC / "lmclab" / "store" / "locks.py"
    return python(HOLD, str(path), str(timeout), str(seconds), "release" if release else "exit", str(module))


def test_lock_path_is_outside_the_artifact(tmp_path: Path) -> None:
    assert lock_path(tmp_path / "train_abc", tmp_path) == tmp_path / ".locks" / "train_abc.lock"
    assert lock_path(tmp_path / "steps" / "align_k", tmp_path) == tmp_path / ".locks" / "steps" / "align_k.lock"
    assert (
        lock_path(tmp_path / "elsewhere" / "out", tmp_path / "store") == tmp_path / "elsewhere" / ".locks" / "out.lock"
    )
    with artifact_lock(tmp_path / "train_abc", root=tmp_path):
        assert not (tmp_path / "train_abc").exists()


def test_lock_is_exclusive_between_processes_and_released_on_exit(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    said: list[str] = []
    with ArtifactLock(path, "the test artifact", say=said.append):
        other = hold(path, 0.5, 0)
        out, _ = other.communicate(timeout=60)
        assert other.returncode == 3 and "still held by pid" in out and str(os.getpid()) in out
    assert said == [] and path.read_text() == ""  # released cleanly: the holder record is cleared
    # another process takes it at once, then exits without releasing it: the exit frees it
    other = hold(path, 5, 0)
    out, _ = other.communicate(timeout=60)
    assert other.returncode == 0 and out.startswith("locked")
    lock = ArtifactLock(path, "the test artifact", timeout=0, say=said.append)
    with lock:
        assert not lock.waited and lock.took_over is not None and lock.took_over.pid == other.pid
    assert len(said) == 1 and "ended without releasing it; taking it over" in said[0]


def test_a_waiting_process_says_who_holds_the_lock_and_gets_it_when_released(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    holder = hold(path, 5, 1.5, release=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    said: list[str] = []
    lock = ArtifactLock(path, "run train_x", timeout=60, say=said.append, poll=0.1)
    with lock:
        assert lock.waited and lock.took_over is None
        assert lock.waited_for is not None and lock.waited_for.pid == holder.pid
    holder.wait(timeout=60)
    assert len(said) == 1 and said[0].startswith(f"waiting for run train_x held by pid {holder.pid} on ")
    assert " since " in said[0]


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    holder = hold(path, 5, 600)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    said: list[str] = []
    lock = ArtifactLock(path, "run train_x", timeout=5, say=said.append)
    with lock:
        assert not lock.waited
        assert lock.took_over is not None and lock.took_over.pid == holder.pid
    assert len(said) == 1 and f"left by pid {holder.pid}" in said[0] and "taking it over" in said[0]


def test_reentrant_in_a_thread_exclusive_between_threads(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    outcome: list[str] = []

    def other_thread() -> None:
        try:
            with ArtifactLock(path, "x", timeout=0.2, say=lambda _: None):
                outcome.append("locked")
        except LockTimeout:
            outcome.append("timeout")

    with ArtifactLock(path, "x"), ArtifactLock(path, "x"):  # nested in one thread: no deadlock
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert outcome == ["timeout"]
    other_thread()
    assert outcome == ["timeout", "locked"]


def test_the_timeout_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCLAB_LOCK_TIMEOUT", "0.1")
    assert ArtifactLock(tmp_path / "a.lock", "x").timeout == 0.1
    monkeypatch.setenv("LMCLAB_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="LMCLAB_LOCK_TIMEOUT"):
        ArtifactLock(tmp_path / "a.lock", "x")


CLI_TRAIN = [
    "train", "mlp_mnist", "--train-per-class", "10", "--epochs", "2", "--hidden", "16", "--seed", "0",
    "--no-progress", "--device", "cpu", "--offline",
]  # fmt: skip


def test_two_identical_trainings_at_once_train_once(tmp_path: Path, shared_data: Path) -> None:
    runs = tmp_path / "runs"
    argv = [*CLI_TRAIN, "--runs-dir", str(runs), "--data-dir", str(shared_data)]
    args = build_parser().parse_args(argv)
    config = config_from_args(get_preset(args.preset).config, args).normalised()
    run = RunStore(runs).run(config.run_hash())
    # Hold the run's lock while both start, so that both are certainly running at once: then let them race.
    held = artifact_lock(run.path, root=runs, what="test").acquire()
    logs = [tmp_path / f"stderr_{i}.txt" for i in range(2)]
    procs = []
    for log in logs:
        with open(log, "w") as err:
            procs.append(
                python("import sys; from lmclab.cli import main; sys.exit(main(sys.argv[1:]))", *argv, stderr=err)
            )
    wait_for(lambda: all("waiting for run " + run.path.name in log.read_text() for log in logs), "both to wait")
    held.release()
    outs = [p.communicate(timeout=600)[0] for p in procs]
    errs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert all(f"run: {run.path}" in out for out in outs)
    reused = [e for e in errs if f"reusing run {run.path.name}" in e]
    assert len(reused) == 1, errs  # one trained it; the other waited for it and reused it
    meta = run.meta
    assert meta.status == "complete" and meta.resumed_from is None
    assert [h["epoch"] for h in meta.history] == [1, 2]


KILLED_AT = """
    import os, signal, sys, time
    from pathlib import Path
    from lmclab.config import DataConfig, ModelConfig, RunConfig, SeedConfig, TrainConfig
    from lmclab.training import RunOptions, train

    runs, data, markers, kill_at = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    config = RunConfig(DataConfig("mnist", train_per_class=10), ModelConfig("mlp", hidden=(16,)),
                       TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=10, epochs=3),
                       SeedConfig(1, 2, 3))

    def die_at(state):
        if state.step == kill_at:  # tell the test, wait for its go, then die holding the lock
            (markers / "at_step").touch()
            while not (markers / "go").exists():
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)

    options = RunOptions(runs_dir=runs, data_dir=data, device="cpu", progress=False, download=False)
    run = train(config, options, callback=die_at if kill_at else None)
    print(run.path, flush=True)
"""

KILLED_CONFIG = RunConfig(
    DataConfig("mnist", train_per_class=10),
    ModelConfig("mlp", hidden=(16,)),
    TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=10, epochs=3),
    SeedConfig(1, 2, 3),
)


def test_a_training_killed_while_another_waits_is_resumed_by_it(tmp_path: Path, shared_data: Path) -> None:
    runs, markers = tmp_path / "runs", tmp_path / "markers"
    markers.mkdir()
    first = python(KILLED_AT, str(runs), str(shared_data), str(markers), "15")  # 10 steps per epoch
    wait_for(lambda: (markers / "at_step").exists() or first.poll() is not None, "the first to reach step 15")
    assert first.poll() is None, first.communicate()
    with open(tmp_path / "second.txt", "w") as err:
        second = python(KILLED_AT, str(runs), str(shared_data), str(markers), "0", stderr=err)
    wait_for(lambda: "waiting for run" in (tmp_path / "second.txt").read_text(), "the second to wait")
    (markers / "go").touch()
    assert first.wait(timeout=60) == -signal.SIGKILL
    out, _ = second.communicate(timeout=600)
    said = (tmp_path / "second.txt").read_text()
    assert second.returncode == 0, said
    assert f"left by pid {first.pid}" in said and "taking it over" in said and "resuming run" in said
    run = RunStore(runs).find(KILLED_CONFIG)
    assert run is not None and out.strip() == str(run.path)
    meta = run.meta
    assert meta.status == "complete" and meta.resumed_from is not None and meta.resumed_from.step == 10
    # … and ends as an uninterrupted training does
    fresh = train(KILLED_CONFIG, RunOptions(runs_dir=str(tmp_path / "fresh"), data_dir=str(shared_data),
                                            device="cpu", progress=False, download=False))  # fmt: skip
    a, b = run.load_state(), fresh.load_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SLOW_CALLS: list[str] = []


@step_kind("test_slow_once")
def _slow(ctx, config, inputs):  # type: ignore[no-untyped-def]
    SLOW_CALLS.append(config["name"])
    time.sleep(1.0)
    return {"name": config["name"]}


def test_one_executor_runs_a_step_the_other_waits_and_reuses_it(tmp_path: Path) -> None:
    SLOW_CALLS.clear()
    step = Step("test_slow_once", {"name": "x"})
    said: list[str] = []
    executors = [LocalExecutor(tmp_path, progress=False, say=said.append) for _ in range(2)]
    results: list[dict] = []
    threads = [threading.Thread(target=lambda e=e: results.append(e.run([step]))) for e in executors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert SLOW_CALLS == ["x"] and results[0] == results[1] == {step.key: {"name": "x"}}
    assert sorted(len(e.ran) for e in executors) == [0, 1]
    assert len(said) == 1 and said[0].startswith(f"waiting for step {step.name} held by pid {os.getpid()}")
    assert lock_path(tmp_path / "steps" / step.name, tmp_path).is_file()


def test_an_alignment_is_computed_once_by_concurrent_callers(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = RunOptions(
        runs_dir=str(tmp_path), data_dir=str(shared_data), device="cpu", progress=False, download=False
    )
    run_a, run_b = (train(dataclasses.replace(KILLED_CONFIG, seeds=SeedConfig.from_seed(s)), options) for s in (0, 1))
    calls: list[int] = []
    align = lmc.align

    def slow_align(*args, **kw):  # type: ignore[no-untyped-def]
        calls.append(1)
        time.sleep(1.0)
        return align(*args, **kw)

    monkeypatch.setattr(lmc, "align", slow_align)
    found: list[lmc.Alignment] = []
    threads = [
        threading.Thread(target=lambda: found.append(lmc.align_runs(run_a, run_b, device="cpu", progress=False)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(found) == 2 and found[0].path == found[1].path
    assert found[0].perm == found[1].perm


def test_a_running_run_whose_trainer_died_is_listed_as_interrupted(tmp_path: Path) -> None:
    """meta.json says "running" but nobody holds the run's lock: the trainer died; `lmclab runs` says so."""
    config = RunConfig(
        DataConfig("mnist", train_per_class=10), ModelConfig("mlp", hidden=(8,)), TrainConfig(epochs=1), SeedConfig()
    )
    store = RunStore(tmp_path)
    run = store.open(config)
    run.update_meta(status="running")
    assert run.status == "interrupted"
    with artifact_lock(run.path, root=store.root):  # a live trainer holds it (here: this process)
        assert run.status == "running"
    assert run.status == "interrupted"
