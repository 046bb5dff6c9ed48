"""Packed training wired into the step graph (`GraphExecutor(pack=True)`, `lmclab run --pack`) and the
CLI (`lmclab train --pack-seeds`): the train steps that differ only in their seeds train in one
`train_pack` call and give the results, stored runs and step records of training them one at a time
(run hashes equal, numbers within test_packed's TOLERANCE); a rerun trains nothing; steps that cannot
pack (other configs) run alone; BatchNorm models pack; bad flags exit 2 with one line."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import lmclab.experiments.steps as steps_module
import lmclab.training.packed as packed
from lmclab.cli import main
from lmclab.config import DataConfig, ModelConfig, RunConfig, SeedConfig, TrainConfig
from lmclab.experiments.graph import LocalExecutor, Step, StepsFailed, pack_groups
from lmclab.experiments.steps import fork_step, train_step
from lmclab.store import Run, RunStore, read_sealed_json
from lmclab.training import TrainingDiverged

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-5  # tests/test_packed.py: a packed member is within this (relative) of its solo run
# Weights: Adam amplifies the summation-order difference in a few first-layer weights (measured here:
# 7.8e-5 of the layer's largest weight for one member of BASE, the others <= 7e-7); metrics stay within TOLERANCE.
STATE_TOLERANCE = 5e-4
# 512 images, batch 64: 8 steps per epoch; 12 steps = epoch 1 ends at step 8 (the fork point), epoch 2 at 12.
BASE = RunConfig(
    data=DataConfig("mnist", train_subset=512),
    model=ModelConfig("mlp", hidden=(16, 16)),
    train=TrainConfig(optimizer="adam", lr=3e-3, batch_size=64, steps=12),
)
OTHER = dataclasses.replace(BASE, model=ModelConfig("mlp", hidden=(8,)))  # differs beyond the seeds


def seeded(config: RunConfig, seed: int) -> RunConfig:
    return dataclasses.replace(config, seeds=SeedConfig.from_seed(seed))


def graph() -> tuple[list[Step], list[Step]]:
    """(train steps, every target): seeds 0, 1, 2 of BASE (a pack), OTHER (alone), two fork children of
    seed 0 at epoch 1 (a pack once seed 0 is trained), the path between seeds 0 and 1 after alignment."""
    members = [train_step(f"base/{s}", seeded(BASE, s), "mlp_mnist") for s in (0, 1, 2)]
    other = train_step("other", seeded(OTHER, 0), "mlp_mnist")
    children = [fork_step(members[0], seeded(BASE, 0), epoch=1, child=c) for c in (0, 1)]
    align = Step("align", {"method": "weight", "seed": 0}, {"a": members[0], "b": members[1]})
    ins = {"a": members[0], "b": members[1], "align": align}
    path = Step("path", {"split": "test", "examples": 200, "points": 3}, ins)
    trains = [*members, other, *children]
    return trains, [*trains, path]


class Calls:
    """Counts the calls of the step functions' `train` and `train_pack`, and of the pack's training loop."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.train: list[str] = []
        self.train_pack: list[list[str]] = []
        self.packs_trained: list[int] = []
        train, train_pack, train_members = steps_module.train, steps_module.train_pack, packed._train_members

        def counted_train(config: RunConfig, options: Any) -> Run:
            self.train.append(config.run_hash())
            return train(config, options)

        def counted_train_pack(configs: list[RunConfig], options: Any) -> list[Run]:
            self.train_pack.append([c.run_hash() for c in configs])
            return train_pack(configs, options)

        def counted_members(members: list[Any], *args: Any) -> Any:
            self.packs_trained.append(len(members))
            return train_members(members, *args)

        monkeypatch.setattr(steps_module, "train", counted_train)
        monkeypatch.setattr(steps_module, "train_pack", counted_train_pack)
        monkeypatch.setattr(packed, "_train_members", counted_members)


def executor(root: Path, shared_data: Path, pack: bool, said: list[str] | None = None) -> LocalExecutor:
    options = {"runs_dir": str(root), "data_dir": str(shared_data), "device": "cpu", "progress": False}
    return LocalExecutor(root, options, progress=False, say=(said.append if said is not None else print), pack=pack)


def name(result: dict[str, Any]) -> str:
    return Path(result["run"]).name


def assert_close(a: Any, b: Any, where: str) -> None:
    """Nested JSON numbers equal within TOLERANCE relative to the largest of each list; the rest equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        scale = max((abs(x) for x in a if isinstance(x, float)), default=1.0) or 1.0
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if isinstance(x, float):
                assert abs(x - y) <= TOLERANCE * max(scale, abs(x)), f"{where}[{i}]: {x} vs {y}"
            else:
                assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert abs(a - b) <= TOLERANCE * max(1.0, abs(a)), f"{where}: {a} vs {b}"
    else:
        assert a == b, where


def assert_same_states(solo: Run, pack: Run) -> None:
    a, b = solo.load_state(), pack.load_state()
    assert a.keys() == b.keys()
    for k in a:
        scale = a[k].abs().max().item() or 1.0
        assert (a[k] - b[k]).abs().max().item() <= STATE_TOLERANCE * scale, k


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    """The graph run with pack off: (store root, results by step key)."""
    root = tmp_path_factory.mktemp("solo")
    return root, executor(root, shared_data, pack=False).run(graph()[1])


def test_packed_graph_equals_solo_graph_and_a_rerun_trains_nothing(
    solo: tuple[Path, dict[str, dict[str, Any]]], tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    solo_root, solo_results = solo
    trains, targets = graph()
    calls = Calls(monkeypatch)
    run = executor(tmp_path, shared_data, pack=True)
    results = run.run(targets)
    # one pack of the three seeds, one of the two fork children; OTHER alone
    members, children = [s.config["run"] for s in trains[:3]], [s.config["run"] for s in trains[4:]]
    assert calls.train_pack == [[RunConfig.from_dict(c).run_hash() for c in members]] + [
        [RunConfig.from_dict(c).run_hash() for c in children]
    ]
    assert calls.packs_trained == [3, 2]
    assert calls.train == [RunConfig.from_dict(trains[3].config["run"]).run_hash()]
    assert sorted(run.report.computed) == sorted(s.name for s in [*targets, targets[-1].inputs["align"]])
    # the same steps, runs (hashes) and numbers as one at a time; each step sealed in its own directory
    assert results.keys() == solo_results.keys()
    for key, result in results.items():
        expected = solo_results[key]
        if "run" in result:
            assert name(result) == name(expected)
            assert_close(result["final_metrics"], expected["final_metrics"], key)
        elif "alignment" not in result:
            assert_close(result, expected, key)
    store, solo_store = RunStore(tmp_path), RunStore(solo_root)
    for step in trains:
        record = read_sealed_json(run.directory(step) / "result.json", kind="step result")
        assert record["kind"] == "train" and record["result"] == results[step.key] and record["seconds"] > 0
        packed_run, solo_run = store.get(name(results[step.key])), solo_store.get(name(results[step.key]))
        assert_same_states(solo_run, packed_run)
        assert (packed_run.meta.pack is None) == (step is trains[3])  # meta.json records the pack
        assert solo_run.meta.pack is None
    # a rerun: everything reused, nothing trained
    calls.train_pack.clear()
    calls.packs_trained.clear()
    again = executor(tmp_path, shared_data, pack=True)
    assert again.run(targets) == results
    assert calls.packs_trained == [] and again.report.computed == []
    assert len(again.report.reused) == len(run.report.computed)


def test_a_mixed_run_reuses_the_solo_runs_and_gives_the_same_results(
    solo: tuple[Path, dict[str, dict[str, Any]]], tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, solo_results = solo
    trains, targets = graph()
    executor(tmp_path, shared_data, pack=False).run([trains[1]])  # seed 1 trained alone first
    calls = Calls(monkeypatch)
    results = executor(tmp_path, shared_data, pack=True).run(targets)
    assert calls.packs_trained == [2, 2]  # seeds 0 and 2, then the children: seed 1 is reused
    assert results[trains[1].key]["final_metrics"] == solo_results[trains[1].key]["final_metrics"]  # its bits
    for key, result in results.items():
        if "run" in result:
            assert name(result) == name(solo_results[key])
            assert_close(result["final_metrics"], solo_results[key]["final_metrics"], key)
        elif "alignment" not in result:
            assert_close(result, solo_results[key], key)


def test_a_diverging_member_fails_its_own_step_as_alone(tmp_path: Path, shared_data: Path) -> None:
    """test_packed's hot recipe (SGD at lr 0.8): seed 0 diverges at step 16, seed 1 finishes. In a packed
    graph only seed 0's step fails, with the error it fails with alone; seed 1's step is stored."""
    hot = RunConfig(
        data=DataConfig("mnist", train_subset=512),
        model=ModelConfig("mlp", hidden=(32, 32)),
        train=TrainConfig(optimizer="sgd", lr=0.8, momentum=0.9, batch_size=64, steps=24),
    )
    trains = [train_step(f"hot/{s}", seeded(hot, s)) for s in (0, 1)]
    errors = {}
    for pack in (False, True):
        run = executor(tmp_path / str(pack), shared_data, pack=pack)
        with pytest.raises(StepsFailed) as failed:
            run.run(trains)
        assert list(failed.value.report.failed) == [trains[0].name]
        assert failed.value.report.computed == [trains[1].name]
        (error,) = failed.value.errors.values()
        assert isinstance(error, TrainingDiverged) and "at step 16 " in str(error)
        errors[pack] = re.sub(r"\d+\.\d+", "x", str(error).replace(str(tmp_path / str(pack)), "STORE"))
    assert errors[True] == errors[False]  # the same message (the loss it reached differs: the edge of stability)


def test_steps_that_cannot_pack_run_alone_and_say_why() -> None:
    bn = RunConfig(data=DataConfig("cifar10"), model=ModelConfig("resnet20", norm="batchnorm"))
    ln = dataclasses.replace(bn, model=ModelConfig("resnet20", norm="layernorm"))
    steps = [
        train_step("bn/0", seeded(bn, 0)),
        train_step("ln/0", seeded(ln, 0)),
        train_step("bn/1", seeded(bn, 1)),
        train_step("ln/1", seeded(ln, 1)),
        train_step("ln/1 again", seeded(ln, 1)),  # the same run under another label: not twice in one pack
        train_step("ln/2 lr", dataclasses.replace(seeded(ln, 2), train=dataclasses.replace(ln.train, lr=0.5))),
        train_step("ln/3 kept", seeded(ln, 3), checkpoints="every:1"),  # other kept checkpoints
        train_step("ln/4 preset", seeded(ln, 4), preset="other"),  # another preset label
        Step("path", {"split": "test"}),
    ]
    said: list[str] = []
    groups = pack_groups(steps, said.append)
    labels = [[s.config.get("label", s.kind) for s in g] for g in groups]
    assert labels == [
        ["bn/0", "bn/1"],  # BatchNorm packs (tests/test_packed_bn.py; a refused model is said there)
        ["ln/0", "ln/1"],
        ["ln/1 again"],
        ["ln/2 lr"],
        ["ln/3 kept"],
        ["ln/4 preset"],
        ["path"],
    ]
    assert said == []


def test_run_help_and_train_pack_seeds(
    tmp_path: Path, cli_io: Callable[[str | Path], list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    io = cli_io(tmp_path)
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--pack train the training runs that are ready together and differ only in their seeds" in text
    assert "~5e-7 relative" in text and "BatchNorm" in text
    short = ["--train-subset", "512", "--steps", "6", "--batch-size", "64"]
    tiny = [*short, "--hidden", "16,16"]
    assert main(["train", "mlp_mnist", *tiny, "--seed", "1", *io, "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert main(["train", "mlp_mnist", *tiny, "--pack-seeds", "0,1,2", *io, "--json"]) == 0
    pack = json.loads(capsys.readouterr().out)
    assert pack["pack"] == 3 and [r["seed"] for r in pack["runs"]] == [0, 1, 2]
    assert pack["runs"][1]["hash"] == alone["hash"]  # seed 1 was stored: reused, the same run
    assert pack["runs"][1]["final_metrics"] == alone["final_metrics"]
    store = RunStore(tmp_path)
    for row in pack["runs"]:
        run = store.get(row["hash"])
        assert run.config.seeds == SeedConfig.from_seed(row["seed"])
        assert (run.meta.pack is None) == (row["seed"] == 1)
    for flags, message in [
        (["--pack-seeds", "0,0"], "--pack-seeds 0,0: a seed given twice names one run twice"),
        (["--pack-seeds", "0,1", "--seed", "2"], "--seed 2 with --pack-seeds 0,1: allowed: one of them"),
        (["--pack-seeds", "x"], "--pack-seeds"),
        (["--pack-seeds", "0,1", "--fork-parent", "x"], "--fork-parent x with --pack-seeds 0,1: allowed: one of them"),
    ]:
        try:
            status = main(["train", "mlp_mnist", *tiny, *flags, *io])
        except SystemExit as exc:  # a value argparse refuses
            status = exc.code
        assert status == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert len(list(store.root.glob("train_*"))) == 3  # nothing written by the refused commands


def test_run_pack_on_the_tiny_benko_preset(
    tmp_path: Path,
    cli_io: Callable[[str | Path], list[str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`lmclab run benko --preset tiny --pack`: its four runs (two pairs) train as one pack; a rerun
    computes nothing. (That the numbers equal training alone is the graph tests' part.)"""
    calls = Calls(monkeypatch)
    args = ["run", "benko", "--preset", "tiny", "--out", str(tmp_path / "out"), *cli_io(tmp_path / "runs")]
    assert main([*args, "--pack", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["failed"] == 0 and calls.packs_trained == [4] and calls.train == []
    for run in RunStore(tmp_path / "runs").runs():
        assert run.meta.pack is not None and run.meta.pack[0]["size"] == 4
    assert main([*args, "--pack", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["computed"] == 0 and again["reused"] == summary["computed"] and calls.packs_trained == [4]


def test_ray_runs_a_pack_as_one_task(tmp_path: Path, shared_data: Path) -> None:
    """Under RayExecutor(pack=True) the three seeds are one task (one pack in meta.json) and give the
    local executor's runs."""
    ray = pytest.importorskip("ray")
    from lmclab.experiments.ray_executor import RayExecutor

    trains = graph()[0][:4]
    options = {"runs_dir": str(tmp_path / "ray"), "data_dir": str(shared_data), "device": "cpu", "progress": False}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        executor_ = RayExecutor(tmp_path / "ray", options, progress=False, say=lambda _: None, pack=True)
        results = executor_.run(trains)
    finally:
        ray.shutdown()
    local = executor(tmp_path / "local", shared_data, pack=True, said=[]).run(trains)
    assert {k: name(r) for k, r in results.items()} == {k: name(r) for k, r in local.items()}
    store = RunStore(tmp_path / "ray")
    sizes = [store.get(name(results[s.key])).meta.pack for s in trains]
    assert [p[0]["size"] if p else None for p in sizes] == [3, 3, 3, None]
    for step in trains:  # one CPU thread on both sides: the same bits
        assert results[step.key]["final_metrics"] == local[step.key]["final_metrics"]
