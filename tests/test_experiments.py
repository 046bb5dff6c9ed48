"""Experiments end to end on the tiny Benkő preset (real MNIST): graph, caching, tables, figures,
predictions and sharpness on the same runs."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import runpy
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from figures import check_logit_example, check_logit_rmse, check_loss_approximations, drawn
from lmclab.cli import main
from lmclab.experiments import settings
from lmclab.experiments.benko import BenkoOptions, run_benko
from lmclab.experiments.context import ExperimentContext
from lmclab.experiments.ito import ItoOptions
from lmclab.experiments.predict import predict_vs_measure, sharpness
from lmclab.experiments.registry import EXPERIMENTS
from lmclab.experiments.settings import PresetError, parse_preset, read_presets
from lmclab.store import RunStore


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, quiet_run):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("benko")
    return root, run_benko("tiny", **quiet_run(root))


def read(path: str | Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_benko_tables_and_figures(tiny) -> None:  # type: ignore[no-untyped-def]
    root, summary = tiny
    files = summary["files"]
    rows = read(files["loss_table"])
    check_loss_approximations(drawn(files["loss_mlp_tiny"]), [r for r in rows if r["setting"] == "mlp_tiny"])
    check_logit_example(drawn(files["fig7"]), read(files["example_table"]))
    check_logit_rmse(drawn(files["fig8"]), read(files["rmse_table"]))
    # 2 pairs × 2 paths × 2 splits × 5 λ × (true + 2 centres × 4 orders)
    assert len(rows) == 2 * 2 * 2 * 5 * 9
    for pair in ("0", "1"):
        for path in ("naive", "aligned"):
            sel = [r for r in rows if r["pair"] == pair and r["path"] == path and r["split"] == "test"]
            true = {float(r["lambda"]): float(r["value"]) for r in sel if r["curve"] == "true"}
            at_a = {float(r["lambda"]): float(r["value"]) for r in sel if r["center"] == "a" and r["order"] == "1"}
            at_b = {float(r["lambda"]): float(r["value"]) for r in sel if r["center"] == "b" and r["order"] == "1"}
            # every approximation passes through the true loss at its own centre
            assert at_a[0.0] == pytest.approx(true[0.0], rel=1e-5)
            assert at_b[1.0] == pytest.approx(true[1.0], rel=1e-5)
    rmse = read(files["rmse_table"])
    assert {r["approximation"] for r in rmse} == {"a1", "a2", "b1", "b2", "direct"}
    zero = [float(r["rmse"]) for r in rmse if r["approximation"] == "a1" and float(r["lambda"]) == 0.0]
    assert max(zero) < 1e-4  # the approximation centred at A is exact at A


def test_benko_rerun_recomputes_nothing(tiny, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    root, _ = tiny
    again = run_benko(
        "tiny",
        out=root / "out2",
        runs_dir=str(root / "runs"),
        data_dir=str(shared_data),
        device="cpu",
        progress=False,
        say=lambda _: None,
    )
    assert {name.split("_")[0] for name in again["steps_run"]} <= {"train", "align"}  # stores of their own


def test_predictions_and_sharpness_on_a_pair(tiny, shared_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, _ = tiny
    runs = RunStore(root / "runs").runs()
    summary = predict_vs_measure(
        runs[0],
        runs[1],
        split="test",
        examples=200,
        points=5,
        out=tmp_path,
        data_dir=str(shared_data),
        device="cpu",
        say=lambda _: None,
    )
    blocks = read(summary["files"]["cross_blocks"])
    total = sum(float(r["value"]) for r in blocks)
    assert total == pytest.approx(summary["q1"] / 8, rel=1e-4)  # eq. 20 blocks sum to ⅛ dᵀH₁d
    curve = read(summary["files"]["curve"])
    assert float(curve[0]["measured"]) == 0.0 and float(curve[-1]["predicted"]) == 0.0
    result = sharpness(runs[0], examples=200, probes=30, data_dir=str(shared_data), device="cpu")
    for key in ("trace", "scale_aware_trace"):
        t = result[key]
        assert t["ci_low"] <= t["estimate"] <= t["ci_high"] and np.isfinite(t["estimate"])
    assert result["top_eigenvalue"] > 0


def test_cli_run_and_sharpness(tiny, shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    root, _ = tiny
    io = ["--runs-dir", str(root / "runs"), "--data-dir", str(shared_data), "--offline", "--device", "cpu"]
    assert main(["run", "benko", "--preset", "tiny", "--out", str(root / "cli"), "--no-progress", *io, "--json"]) == 0
    assert "fig8" in json.loads(capsys.readouterr().out)["files"]
    run = RunStore(root / "runs").runs()[0]
    assert main(["sharpness", run.hash[:8], "--subset", "100", "--probes", "10", "--no-eigenvalue", *io]) == 0
    assert "trace" in capsys.readouterr().out
    assert main(["run", "benko", "--preset", "nope", *io]) == 2
    assert "presets: smoke, paper, tiny" in capsys.readouterr().err


def test_layer_set_barrier_against_hand_made_layer_interpolation(shared_data: Path) -> None:
    """(1−α)L(θ_{2→1}) + αL(θ_{1→2}) − [(1−α)L_1 + αL_2], θ_{2→1} = θ_1 with only the set interpolated."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    from lmclab.data import DeviceDataset
    from lmclab.models import build_model
    from lmclab.paths import endpoint_losses, layer_set_barrier

    data = DeviceDataset.load("mnist", "test", data_dir=shared_data, subset=200, progress=False)
    model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=[16, 16]).eval()
    torch.manual_seed(1)
    theta_1 = dict(model.state_dict())
    theta_2 = {k: v + 0.3 * torch.randn_like(v) for k, v in theta_1.items()}
    tensors = ["layers.1.linear.weight", "layers.1.linear.bias"]
    x, y = next(iter(data.batches(1000)))

    def loss(theta: dict) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(functional_call(model, theta, (x,)), y))

    def only(base: dict, a: float) -> dict:
        return {k: ((1 - a) * theta_1[k] + a * theta_2[k]) if k in tensors else base[k] for k in base}

    lambdas = [0.0, 0.25, 0.5, 1.0]
    expected = [
        (1 - a) * loss(only(theta_1, a)) + a * loss(only(theta_2, a)) - ((1 - a) * loss(theta_1) + a * loss(theta_2))
        for a in lambdas
    ]
    got = layer_set_barrier(model, theta_1, theta_2, data, lambdas, tensors)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    ends = endpoint_losses(model, theta_1, theta_2, data)
    np.testing.assert_allclose(ends, (loss(theta_1), loss(theta_2)), rtol=1e-6)
    np.testing.assert_allclose(layer_set_barrier(model, theta_1, theta_2, data, lambdas, tensors, ends), got)


# ------------------------------------------------------------------- the experiment contract (no training)


def raw_presets() -> list[tuple[str, str, dict]]:
    return [(e.name, p, read_presets(e.name)[p]) for e in EXPERIMENTS.values() for p in e.presets()]


def as_toml(value: object) -> object:
    """A loaded value as TOML wrote it: tuples as lists, option tables as dicts (only the keys given)."""
    if dataclasses.is_dataclass(value):
        return {f.name: as_toml(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [as_toml(v) for v in value]
    if isinstance(value, Mapping):
        return {k: as_toml(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize(
    ("experiment", "preset", "table"), raw_presets(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_every_shipped_preset_loads_with_the_values_it_holds(experiment: str, preset: str, table: dict) -> None:
    e = EXPERIMENTS[experiment]
    options = e.load(preset)
    assert type(options) is e.options_type and options.name == preset
    for key, value in table.items():
        if key == "settings":
            continue
        loaded = as_toml(getattr(options, key))
        if isinstance(value, dict):  # a table of options: the keys given, the rest the defaults
            assert {k: loaded[k] for k in value} == value, key
        else:
            assert loaded == value, key
    assert [s.name for s in options.settings] == [s["name"] for s in table["settings"]]
    for s, raw in zip(options.settings, table["settings"]):
        for key, value in raw.items():
            if key != "options":
                assert as_toml(getattr(s, key)) == value, (s.name, key)
        at = options.at(s)  # the setting's options override the preset's; the others are the preset's
        for key in options.option_names():
            given = raw.get("options", {}).get(key)
            if isinstance(given, dict):
                loaded = as_toml(getattr(at, key))
                assert {k: loaded[k] for k in given} == given
            elif given is not None:
                assert as_toml(getattr(at, key)) == given
            else:
                assert getattr(at, key) == getattr(options, key)


def test_defaults_are_the_ones_the_experiments_used() -> None:
    tiny = EXPERIMENTS["benko"].load("tiny")
    assert tiny.derivative_batch_size == 50 and tiny.orders == (1, 2, 3, 4)
    smoke = EXPERIMENTS["benko"].load("smoke")
    r20 = smoke.at(smoke.setting("resnet20x1_cifar10"))
    assert (r20.orders, r20.derivative_batch_size, r20.points) == ((1, 2, 3), 150, 25)
    ito = EXPERIMENTS["ito"].load("tiny")
    assert ito.trace.probes == 6 and ito.trace.method == "hutchinson" and ito.trace.confidence == 0.95
    assert ito.method_keywords("ste_mm") == {"epochs": 1, "batch_size": 100, "seed": 0}
    assert ito.method_keywords("pairwise") == {} and ito.method_keywords("naive") == {}
    assert dataclasses.asdict(ito.heatmap) == {"split": "test", "metric": "loss", "definition": "barrier"}
    assert ito.bn is None and ito.k_values == ()
    singh = EXPERIMENTS["singh"].load("tiny")
    assert (singh.bn, singh.every, singh.hvp_batch_size, singh.gradient_terms) == ("reset", 1, 300, False)
    assert singh.hessian_examples == 300 and singh.layerwise_every == 1


def test_a_misspelled_key_is_refused_naming_the_valid_keys() -> None:
    smoke = read_presets("benko")["smoke"]
    bad = {k: v for k, v in smoke.items() if k != "points"} | {"pionts": 25}
    with pytest.raises(PresetError, match="unknown key 'pionts'") as info:
        parse_preset(BenkoOptions, bad, name="smoke", where="preset 'smoke' of benko.toml")
    message = str(info.value)
    assert "preset 'smoke' of benko.toml" in message
    assert (
        "valid keys: derivative_batch_size, description, logit_examples, logit_setting, orders, points, resources, "
        "settings, splits" in message
    )
    with pytest.raises(PresetError, match=r"preset 'smoke' of .*benko\.toml: unknown key 'pionts'"):
        load_preset_from(bad, "benko", "smoke")

    settings = [dict(smoke["settings"][0]), smoke["settings"][1]]
    settings[0]["pair"] = settings[0].pop("pairs")
    with pytest.raises(PresetError, match=r"settings\[0\] \('mlp_mnist'\): unknown key 'pair'; valid keys: .*pairs"):
        parse_preset(BenkoOptions, {**smoke, "settings": settings})

    settings = [smoke["settings"][0], {**smoke["settings"][1], "options": {"order": [1, 2]}}]
    with pytest.raises(
        PresetError,
        match=r"settings\[1\] \('resnet20x1_cifar10'\), options: unknown key 'order'; "
        r"valid keys: derivative_batch_size, logit_examples, logit_setting, orders",
    ):
        parse_preset(BenkoOptions, {**smoke, "settings": settings})

    ito = read_presets("ito")["smoke"]
    with pytest.raises(
        PresetError,
        match=r"ste_mm: unknown key 'epoch'; valid keys: batch_size, dirichlet_alpha, "
        r"epochs, lr, mixing, seed, train_examples",
    ):
        parse_preset(ItoOptions, {**ito, "ste_mm": {"epoch": 2}})
    with pytest.raises(PresetError, match="missing key 'points'"):
        parse_preset(BenkoOptions, {k: v for k, v in smoke.items() if k != "points"})


def load_preset_from(table: dict, experiment: str, name: str) -> object:
    """load_preset on a preset file that holds `table` as preset `name` (the file read is replaced)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(settings, "read_presets", lambda e: {name: table} if e == experiment else {})
        return settings.load_preset(experiment, name, EXPERIMENTS[experiment].options_type)


@pytest.mark.parametrize(
    ("experiment", "change", "message"),
    [
        ("benko", {"points": "25"}, "points must be an integer, got '25'"),
        ("benko", {"points": 25.0}, "points must be an integer, got 25.0"),
        ("benko", {"orders": [1, "2"]}, r"orders\[1\] must be an integer, got '2'"),
        ("benko", {"splits": "test"}, "splits must be a list of strings, got 'test'"),
        ("singh", {"gradient_terms": 1}, "gradient_terms must be true or false, got 1"),
        ("singh", {"examples": True}, "examples must be an integer, got True"),
        ("ito", {"ste_mm": {"lr": "fast"}}, "ste_mm: lr must be a number, got 'fast'"),
        ("ito", {"trace": 5}, "trace must be a table, got 5"),
        (
            "ito",
            {"settings": [{"name": "x", "label": "x", "preset": "mlp_mnist", "models": "3"}]},
            r"settings\[0\] \('x'\): models must be an integer, got '3'",
        ),
    ],
)
def test_a_wrongly_typed_value_is_refused(experiment: str, change: dict, message: str) -> None:
    table = {**read_presets(experiment)["tiny"], **change}
    with pytest.raises(PresetError, match=message):
        load_preset_from(table, experiment, "tiny")
    assert issubclass(PresetError, ValueError)  # the CLI reports it as one clear message


def test_a_setting_overrides_a_nested_table_key_by_key() -> None:
    table = read_presets("ito")["tiny"]
    settings = [{**table["settings"][0], "options": {"trace": {"probes": 3}, "points": 3}}]
    preset = parse_preset(ItoOptions, {**table, "settings": settings}, name="tiny")
    at = preset.at(preset.settings[0])
    assert (at.trace.probes, at.trace.examples, at.trace.batch_size, at.points) == (3, 100, 100, 3)
    assert preset.trace.probes == 6 and preset.points == 5


def test_lmclab_run_lists_experiments_and_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 0
    out = capsys.readouterr().out
    for name, e in EXPERIMENTS.items():
        assert f"{name}: {e.description}" in out
        for preset in e.presets():
            assert f"--preset {preset}" in out
    assert "seconds on a CPU, for tests" in out  # the presets' descriptions
    assert main(["run", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {"benko", "ito", "singh", "zipit"} <= set(listing)
    assert list(listing["singh"]["presets"]) == ["smoke", "paper", "tiny", "gpu"]
    with pytest.raises(SystemExit):
        main(["run", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_the_context_sets_up_execution_in_one_place(tmp_path: Path) -> None:
    ctx = ExperimentContext.for_preset("benko", "tiny", runs_dir=str(tmp_path), device="cpu", progress=False)
    assert ctx.out == Path("out/benko-tiny")
    executor = ctx.executor()
    assert executor.options == {"runs_dir": str(tmp_path), "data_dir": None, "device": "cpu", "progress": False}
    assert executor.progress is False and executor.ran == []


def test_the_readme_example_of_a_new_experiment_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL) if "HelloOptions" in b)
    (tmp_path / "hello.py").write_text(block)
    runpy.run_path(str(tmp_path / "hello.py"), run_name="readme_hello")
    assert "hello --preset toy: hello" in capsys.readouterr().out
