"""The cost model behind `lmclab run X --preset P --plan --on PROFILE` (lmclab.experiments.costs): a step's
work from its config, seconds on a device profile, the plan's totals, and the flag on the command line.
Nothing here trains: every check reads configs and builds models on the meta device only."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from invoke import invoke
from lmclab.config import RunConfig
from lmclab.experiments import costs
from lmclab.experiments.costs import DeviceProfile, StepWork, Work, estimate, model_cost, step_work
from lmclab.experiments.graph import KindPlan, Resources, Step, describe_plan, plan_total
from lmclab.experiments.steps import train_step
from lmclab.store import Store

#: a device with round numbers: 10 ms floor per 43-layer step, 1 GFLOP/s, no start-up
DEVICE = DeviceProfile("test", "test device", "hours on the test device", 0.01, 1e9, startup_seconds=0.0)


def mlp_run(epochs: int, examples: int, batch: int = 50, hidden: tuple[int, ...] = (32, 32)) -> RunConfig:
    return RunConfig.from_dict(
        {
            "data": {"dataset": "mnist", "train_subset": examples},
            "model": {"model": "mlp", "hidden": list(hidden)},
            "train": {"epochs": epochs, "batch_size": batch},
        }
    )


def test_the_flop_count_of_an_mlp_is_two_per_weight() -> None:
    cost = model_cost(mlp_run(1, 500))
    assert cost.forward_flops == 2 * (784 * 32 + 32 * 32 + 32 * 10)  # biases and ReLUs not counted
    assert cost.layers == 3 and cost.groups == (32, 32)


def test_a_train_step_costs_what_its_steps_and_evaluation_take_by_hand() -> None:
    epochs, n, batch = 3, 1000, 50
    work = step_work(train_step("m", mlp_run(epochs, n, batch)))
    assert isinstance(work, Work)
    assert (work.train_steps, work.batch_size) == (epochs * n // batch, batch)
    flops = 2 * (784 * 32 + 32 * 32 + 32 * 10)
    per_example = 3 * flops / 1e9  # forward + backward at the device's rate
    floor = 0.01 * 3 / 43  # 3 layers of ResNet-20's 43
    training = epochs * (n // batch) * (floor + batch * per_example)
    evaluation = (n + 2 * 10_000) * per_example / 3 + (1 / 3 + 2 * 10 / 3) * floor  # train, then test twice
    assert DEVICE.seconds(work) == pytest.approx(training + evaluation, rel=1e-12)


def test_a_train_step_scales_linearly_in_epochs_and_examples() -> None:
    def training(epochs: int, n: int) -> float:
        work = step_work(train_step("m", mlp_run(epochs, n)))
        assert isinstance(work, Work)
        return DEVICE.seconds(work) - DEVICE.seconds(
            Work(work.model, forward_examples=work.forward_examples, floors=work.floors)
        )

    one = training(1, 1000)
    assert one > 0
    for k in (2, 5, 40):
        assert training(k, 1000) == pytest.approx(k * one, rel=1e-12)
        assert training(1, k * 1000) == pytest.approx(k * one, rel=1e-12)
    assert training(3, 4000) == pytest.approx(12 * one, rel=1e-12)


def test_a_forked_child_costs_only_the_epochs_after_its_fork() -> None:
    parent = mlp_run(10, 1000)
    child = RunConfig.from_dict({**parent.normalised().to_dict(), "fork": {"parent": parent.run_hash(), "epoch": 4}})
    assert costs.train_steps(child) == 6 * 20 and costs.train_steps(parent) == 10 * 20


def test_a_step_without_a_cost_model_is_unknown_and_listed_never_zero() -> None:
    a, b = train_step("a", mlp_run(1, 500)), train_step("b", mlp_run(2, 500))
    mystery = Step("mystery_kind", {"x": 1}, {"a": a, "b": b})
    activation = Step("align", {"method": "activation", "seed": 0}, {"a": a, "b": b})
    folder = Step(
        "train",
        {"run": {"data": {"dataset": "imagefolder:/nowhere"}, "model": {"model": "mlp"}}, "preset": None, "label": "f"},
    )
    for step in (mystery, activation, folder):
        assert isinstance(step_work(step), str), step.kind
    plans = [
        KindPlan("mystery_kind", Resources(), 1, 0, 0, None, (StepWork(step_work(mystery), False),)),
        KindPlan(
            "train", Resources(), 2, 0, 0, None, (StepWork(step_work(a), False), StepWork(step_work(folder), False))
        ),
    ]
    e = estimate(plans[1].works, DEVICE)
    assert (e.known, e.unknown, e.unknown_to_run) == (1, 1, 1) and e.seconds > 0
    text = describe_plan(plans, DEVICE)
    assert "not in the total (cost unknown):" in text
    assert re.search(r"mystery_kind: 1 step\(s\) \(no cost model for step kind mystery_kind\)", text)
    assert re.search(r"train: 1 step\(s\) \(train: dataset imagefolder:/nowhere", text)
    assert (
        "no pack speed-up" not in text
        and "--pack: packed runs estimated as the sum of their members (no pack speed-up measured yet)"
        in describe_plan(plans, DEVICE, pack=True)
    )
    total = plan_total(plans, DEVICE)
    assert total["unknown"] == {
        "mystery_kind": {"steps": 1, "reasons": ["no cost model for step kind mystery_kind"]},
        "train": {"steps": 1, "reasons": [e.reasons[0]]},
    }
    assert total["seconds"] == pytest.approx(e.seconds)


def test_stored_steps_count_in_the_whole_graph_but_not_in_what_is_left() -> None:
    work = step_work(train_step("m", mlp_run(2, 1000)))
    e = estimate([StepWork(work, True), StepWork(work, False)], DEVICE)
    assert e.seconds == pytest.approx(2 * e.to_run_seconds) and e.known_to_run == 1


def test_the_fit_recovers_a_floor_and_a_rate_from_exact_points() -> None:
    floor, rate = 0.006, 4e14
    points = []
    for w in (1, 4, 8, 16, 32):
        cost = costs._resnet20_bn(w)
        t = floor * cost.layers / costs.REFERENCE_LAYERS + 256 * 3 * cost.forward_flops / rate
        points.append((cost, 256 / t, 256))
    fitted = costs.fit_floor_and_rate(points)
    assert fitted == pytest.approx((floor, rate), rel=1e-9)


def test_the_h100_profile_keeps_its_measured_rows_and_names_their_source() -> None:
    device = costs.profile("h100")
    for width, ips in costs.H100_RESNET20_BN.items():
        row = device.throughput(costs._resnet20_bn(width), 256)
        assert (row.images_per_second, row.status) == (ips, "measured") and "DESIGN.md" in row.source
    derived = device.throughput(model_cost(mlp_run(1, 500)))
    assert derived.status == "derived" and math.isfinite(derived.images_per_second)
    with pytest.raises(ValueError, match="allowed: h100, cpu"):
        costs.profile("tpu")


def test_plan_on_h100_prints_a_finite_gpu_hours_total_for_benko_paper(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    argv = ["run", "benko", "--preset", "paper", "--plan", "--on", "h100", "--runs-dir", str(runs)]
    code, out, err = invoke(argv, capsys)
    assert code == 0, err
    hours = re.search(r"model estimate on h100: ([0-9.e+]+) GPU-hours on one H100 for the whole graph", out)
    assert hours is not None, out
    assert math.isfinite(float(hours.group(1))) and float(hours.group(1)) > 1  # 180 CIFAR trainings
    assert "resnet20 ×32 layernorm on 3×32×32" in out and "[derived]" in out
    code, out, err = invoke([*argv, "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    on = summary["on"]
    assert on["profile"] == "h100" and math.isfinite(on["hours"])
    assert on["hours"] == pytest.approx(sum(p["model_seconds"] for p in summary["plan"]) / 3600)
    train = next(p for p in summary["plan"] if p["kind"] == "train")
    assert train["unknown_steps"] == 0 and train["modelled_steps"] == train["steps"] == 180
    assert not runs.exists() or not any(runs.rglob("*.safetensors"))  # nothing trained


def test_plan_without_on_is_the_measured_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = invoke(["run", "zipit", "--preset", "tiny", "--plan", "--runs-dir", str(tmp_path)], capsys)
    assert code == 0 and "s/step" in out and "model estimate" not in out


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "benko", "--plan", "--on", "tpu"],
        ["run", "benko", "--plan", "--on", ""],
        ["run", "benko", "--on", "h100"],  # only with --plan
    ],
)
def test_a_bad_on_exits_2_with_one_line(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = invoke([*argv, "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--on" in lines[0] and lines[0].startswith("lmclab"), err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_help_mentions_on(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = invoke(["run", "--help"], capsys)
    assert code == 0
    assert "--on {h100,cpu}" in out and "GPU-hours" in out


def test_the_cpu_profile_takes_a_models_speed_from_train_steps_this_host_stored(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs")
    step = train_step("m", mlp_run(2, 1000, batch=50))
    directory = store.step_dir("train", step.key)
    directory.mkdir(parents=True)
    record = {"kind": "train", "config": dict(step.config), "seconds": 4.0, "result": {}}
    (directory / "result.json").write_text(json.dumps({**record, "host": os.uname().nodename}))
    other = store.step_dir("train", "f" * 16)  # another machine's step: not this CPU's speed
    other.mkdir(parents=True)
    (other / "result.json").write_text(json.dumps({**record, "seconds": 1.0, "host": "elsewhere"}))
    (row,) = costs.store_rows(store)
    expected = (2 * 1000 + (1000 + 2 * 10_000) / 3) / 4.0  # training + evaluation/3 examples over its seconds
    assert row.images_per_second == pytest.approx(expected) and row.status == "measured"
    device = costs.profile("cpu", store)
    cost = model_cost(mlp_run(2, 1000))
    assert device.per_example(cost) == pytest.approx(1 / expected)
    assert device.throughput(cost).images_per_second == pytest.approx(expected)
    assert costs.profile("cpu").throughput(cost).status == "derived"  # without the store: from the FLOP rate
