"""Populations of aligned models (Ito et al.): merged metrics, all-pairs barriers, and the `ito` experiment
end to end on the tiny preset (real MNIST)."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from figures import check_barriers_vs_k, check_heatmaps, check_merged_vs_k, check_trace_vs_k, drawn
from lmclab.align.population import align_population
from lmclab.data import DatasetInfo, DeviceDataset
from lmclab.models import build_model
from lmclab.paths import barriers, evaluate_path
from lmclab.paths.population import (
    PAIR_FIELDS,
    SYMMETRIC,
    all_pairs_barriers,
    barrier_matrix,
    merged_metrics,
    merged_point,
    summarize_barriers,
)
from lmclab.permutation import Permutation, derive_spec

SHAPE = (1, 6, 6)


def toy_dataset(n: int = 96, seed: int = 0) -> DeviceDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)
    info = DatasetInfo("toy", 3, SHAPE, (0.5,), (0.25,), False, ("a", "b", "c"), "test")
    return DeviceDataset(images, torch.arange(n) % 3, info)


def fit(model: nn.Module, data: DeviceDataset, steps: int = 150) -> nn.Module:
    """Full-batch Adam on the toy data, so that the endpoints sit in a minimum (naive paths then rise)."""
    x, y = next(data.batches(len(data)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def manual_loss_accuracy(model: nn.Module, theta: dict[str, torch.Tensor], data: DeviceDataset) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `theta` over the whole split, one forward pass, by hand."""
    m = copy.deepcopy(model)
    m.load_state_dict(theta)
    x, y = next(data.batches(len(data)))
    with torch.no_grad():
        logits = m.eval()(x)
    return float(F.cross_entropy(logits.double(), y)), float((logits.argmax(1) == y).double().mean())


@pytest.fixture(scope="module")
def population():  # type: ignore[no-untyped-def]
    """K = 4 random permutations of one trained MLP: the same function, four far-apart points."""
    data = toy_dataset()
    torch.manual_seed(0)
    model = fit(build_model("mlp", input_shape=SHAPE, num_classes=3, hidden=(24, 24)), data)
    spec = derive_spec(model)
    theta = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    perms = [Permutation.identity(spec)] + [Permutation.random(spec, g) for _ in range(3)]
    return model, spec, [p.apply(theta, spec) for p in perms], {"train": data, "test": toy_dataset(60, seed=1)}


def test_all_pairs_table_and_symmetry(population) -> None:  # type: ignore[no-untyped-def]
    model, _, points, datasets = population
    k = len(points)
    result = all_pairs_barriers(model, points, datasets, lambdas=[i / 8 for i in range(9)], progress=False)
    for split in datasets:
        for metric in ("loss", "error"):
            rows = [r for r in result.pairs if r["split"] == split and r["metric"] == metric]
            assert sorted((r["i"], r["j"]) for r in rows) == [(i, j) for i in range(k) for j in range(i + 1, k)]
            assert len([r for r in result.to_merged if r["split"] == split and r["metric"] == metric]) == k
    # symmetric definitions: the reversed path, evaluated independently, gives the same numbers; argmax → 1 − λ*
    # (on the training split, where the fitted endpoints give every naive path an interior peak)
    lam = [i / 8 for i in range(9)]
    reverse = evaluate_path(model, points[2], points[0], {"train": datasets["train"]}, lambdas=lam, progress=False)
    rev = barriers(lam, [r["value"] for r in reverse if r["metric"] == "loss"])
    for definition in PAIR_FIELDS:
        m = result.matrix("train", "loss", definition)
        assert m[2, 0] == pytest.approx(rev[definition], abs=1e-6)
        if SYMMETRIC[definition]:
            np.testing.assert_array_equal(m, m.T)
            assert np.all(np.diag(m) == 0.0)
        else:
            np.testing.assert_allclose(m + m.T, 1.0 - np.eye(k) + np.where(np.eye(k) == 1, np.nan, 0), equal_nan=True)
    summary = {(r["kind"], r["split"], r["metric"], r["definition"]): r for r in result.summary()}
    values = [r["barrier"] for r in result.pairs if r["split"] == "test" and r["metric"] == "loss"]
    s = summary[("pairs", "test", "loss", "barrier")]
    assert (s["n"], s["max"], s["mean"], s["std"]) == (
        6,
        pytest.approx(max(values)),
        pytest.approx(np.mean(values)),
        pytest.approx(np.std(values)),
    )


def test_pair_barrier_against_a_hand_computed_curve(population) -> None:  # type: ignore[no-untyped-def]
    model, _, points, datasets = population
    lam = [i / 6 for i in range(7)]
    result = all_pairs_barriers(
        model, points[:3], {"test": datasets["test"]}, lambdas=lam, to_merged=False, progress=False
    )
    losses = [
        manual_loss_accuracy(
            model, {k: (1 - x) * points[1][k] + x * points[2][k] for k in points[1]}, datasets["test"]
        )[0]
        for x in lam
    ]
    curve = np.array(losses) - ((1 - np.array(lam)) * losses[0] + np.array(lam) * losses[-1])
    row = next(r for r in result.pairs if (r["i"], r["j"], r["metric"]) == (1, 2, "loss"))
    assert row["barrier"] == pytest.approx(curve.max(), abs=1e-5)
    assert row["midpoint"] == pytest.approx(curve[3], abs=1e-5)
    assert row["rebasin"] == pytest.approx(max(losses) - (losses[0] + losses[-1]) / 2, abs=1e-5)


def test_alignment_removes_the_barriers_of_a_permuted_population(population) -> None:  # type: ignore[no-untyped-def]
    model, spec, points, datasets = population
    lam = [0.0, 0.25, 0.5, 0.75, 1.0]
    found = {}
    for method in ("naive", "pairwise"):
        aligned = align_population(points, spec, method).aligned(points)
        found[method] = all_pairs_barriers(model, aligned, {"train": datasets["train"]}, lambdas=lam, progress=False)
    naive = [r["barrier"] for r in found["naive"].pairs if r["metric"] == "loss"]
    matched = [r["barrier"] for r in found["pairwise"].pairs + found["pairwise"].to_merged if r["metric"] == "loss"]
    assert max(abs(b) for b in matched) < 1e-5  # every π_i undoes the random permutation: one point
    assert min(naive) > 1e-2 and min(naive) > 1e3 * max(abs(b) for b in matched)


def test_merged_metrics_against_the_mean_loaded_by_hand(population) -> None:  # type: ignore[no-untyped-def]
    model, _, points, datasets = population
    got = merged_metrics(model, points[1:], datasets)
    mean = {k: torch.stack([p[k] for p in points[1:]]).mean(0) for k in points[0]}
    for split, data in datasets.items():
        loss, acc = manual_loss_accuracy(model, mean, data)
        assert got[split].loss == pytest.approx(loss, rel=1e-5)
        assert got[split].accuracy == pytest.approx(acc) and got[split].error == pytest.approx(1 - acc)
    # one mapping is taken as the merged point itself
    assert merged_metrics(model, mean, datasets)["test"].loss == pytest.approx(got["test"].loss, rel=1e-6)


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(36, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x.flatten(1)))))


def test_bn_statistics_are_reset_on_the_merged_model() -> None:
    train, test = toy_dataset(96), toy_dataset(60, seed=1)
    nets = []
    for seed in range(3):
        torch.manual_seed(seed)
        nets.append(fit(BNNet(), train, steps=40))
    points = [{k: v.detach().clone() for k, v in n.state_dict().items()} for n in nets]
    got = merged_metrics(nets[0], points, {"test": test}, bn_data=train)
    # by hand: mean of the weights; BN statistics of the merged net's pre-activations over the training data
    mean = {
        k: torch.stack([p[k].double() for p in points]).mean(0).to(points[0][k].dtype)
        if points[0][k].is_floating_point()
        else points[0][k]
        for k in points[0]
    }
    x, _ = next(train.batches(len(train)))
    h = x.flatten(1) @ mean["fc1.weight"].T + mean["fc1.bias"]
    mean["bn.running_mean"], mean["bn.running_var"] = h.mean(0), h.var(0, unbiased=True)
    loss, acc = manual_loss_accuracy(nets[0], mean, test)
    assert got["test"].loss == pytest.approx(loss, rel=1e-5) and got["test"].accuracy == pytest.approx(acc)
    merged = merged_point(nets[0], points, bn_data=train)
    torch.testing.assert_close(merged["bn.running_var"], mean["bn.running_var"], rtol=1e-5, atol=1e-6)
    # without the reset, the averaged statistics give another model
    plain = merged_metrics(nets[0], points, {"test": test}, bn="none")
    assert plain["test"].loss != pytest.approx(loss, rel=1e-4)
    with pytest.raises(ValueError, match="needs bn_data"):
        merged_metrics(nets[0], points, {"test": test})
    with pytest.raises(ValueError, match="not defined for a population"):
        all_pairs_barriers(nets[0], points, {"test": test}, bn="repair", bn_data=train)


def test_summary_and_matrix_report_missing_values() -> None:
    rows = [
        {
            "i": 0,
            "j": 1,
            "split": "test",
            "metric": "loss",
            "barrier": 0.5,
            "rebasin": 0.6,
            "midpoint": 0.4,
            "argmax_lambda": 0.25,
        },
        {
            "i": 0,
            "j": 2,
            "split": "test",
            "metric": "loss",
            "barrier": None,
            "rebasin": None,
            "midpoint": None,
            "argmax_lambda": None,
        },
        {
            "i": 1,
            "j": 2,
            "split": "test",
            "metric": "loss",
            "barrier": 1.5,
            "rebasin": 1.0,
            "midpoint": 1.0,
            "argmax_lambda": 0.5,
        },
    ]
    s = next(r for r in summarize_barriers(rows) if r["definition"] == "barrier")
    assert (s["n"], s["n_missing"], s["max"], s["mean"], s["std"]) == (3, 1, 1.5, 1.0, 0.5)
    m = barrier_matrix(rows, 3, "test", "loss", "argmax_lambda")
    assert m[1, 0] == 0.75 and np.isnan(m[0, 2]) and np.isnan(m[2, 0]) and np.isnan(m[1, 1])
    with pytest.raises(ValueError, match="unknown definition"):
        barrier_matrix(rows, 3, "test", "loss", "height")


# ------------------------------------------------------------------------------------- the experiment


def read(path: str | Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, quiet_run):  # type: ignore[no-untyped-def]
    from lmclab.experiments.ito import run_ito

    root = tmp_path_factory.mktemp("ito")
    return root, run_ito("tiny", **quiet_run(root))


def test_ito_tiny_tables_and_figures(tiny) -> None:  # type: ignore[no-untyped-def]
    from lmclab.experiments.ito import load_ito_preset

    root, summary = tiny
    files = summary["files"]
    preset = load_ito_preset("tiny")
    methods, ks = preset.methods, [2, 3]
    table = {
        name: [r for r in read(files[f"{name}_table"]) if r["setting"] == "mlp_tiny"]
        for name in ("merged", "barrier_summary", "trace", "pair_barriers")
    }
    check_merged_vs_k(drawn(files["merged_mlp_tiny"]), table["merged"])
    for kind in ("pairs", "to_merged"):
        check_barriers_vs_k(
            drawn(files[f"barriers_{kind}_mlp_tiny"]), [r for r in table["barrier_summary"] if r["kind"] == kind]
        )
    check_trace_vs_k(drawn(files["trace_mlp_tiny"]), table["trace"])
    check_heatmaps(
        drawn(files["heatmap_mlp_tiny"]),
        [r for r in table["pair_barriers"] if r["k"] == "3"],
        3,
        split="test",
        metric="loss",
        definition="barrier",
    )  # the tiny preset's heat map, K = 3
    n_pairs, n_models = sum(k * (k - 1) // 2 for k in ks), sum(ks)
    assert len(read(files["pair_barriers_table"])) == len(methods) * n_pairs * 2 * 2  # splits × (loss, error)
    assert len(read(files["merged_barriers_table"])) == len(methods) * n_models * 2 * 2
    assert len(read(files["merged_table"])) == len(methods) * (n_models + len(ks)) * 2 * 3
    trace = read(files["trace_table"])
    assert len(trace) == len(methods) * len(ks) * 2
    for r in trace:
        assert float(r["ci_low"]) <= float(r["estimate"]) <= float(r["ci_high"])
    summary_rows = read(files["barrier_summary_table"])
    assert len(summary_rows) == len(methods) * len(ks) * 2 * 2 * 2 * 3  # kinds × splits × metrics × definitions
    alignment = read(files["alignment_table"])
    assert all(float(r["invariance_max_abs_diff"]) < 1e-6 for r in alignment)
    assert all(r["identity"] == "True" for r in alignment if r["member"] == "0" or r["method"] == "naive")


def test_ito_tiny_merged_model_from_the_stored_permutations(tiny, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    """Wiring: the table's merged test loss = mean of π_i(θ_i) (permutation files) loaded and evaluated by hand."""
    from lmclab.store import Run
    from lmclab.training import load_run_model

    root, summary = tiny
    steps = root / "runs" / "steps"
    table = read(summary["files"]["merged_table"])
    test = DeviceDataset.load("mnist", "test", data_dir=shared_data, subset=300, augment=False, progress=False)
    for align_dir in steps.glob("population_align_*"):
        res = json.loads((align_dir / "result.json").read_text())["result"]
        runs = [Run(next((root / "runs").glob(f"**/{name}"))) for name in res["runs"]]
        perms = [Permutation.load(f) for f in res["perms"]]
        points = [p.apply(run.load_state(), spec) for (p, spec, _), run in zip(perms, runs)]
        mean = {k: torch.stack([p[k] for p in points]).mean(0) for k in points[0]}
        loss, acc = manual_loss_accuracy(load_run_model(runs[0]), mean, test)
        row = {
            r["metric"]: float(r["value"])
            for r in table
            if r["method"] == res["method"]
            and int(r["k"]) == res["k"]
            and r["model"] == "merged"
            and r["split"] == "test"
        }
        assert row["loss"] == pytest.approx(loss, rel=1e-5) and row["accuracy"] == pytest.approx(acc)
    # pairwise matching to model 0 does not depend on K: member 1's permutation is the same for K = 2 and 3
    pairwise = {}
    for align_dir in steps.glob("population_align_*"):
        res = json.loads((align_dir / "result.json").read_text())["result"]
        if res["method"] == "pairwise":
            pairwise[res["k"]] = Permutation.load(res["perms"][1])[0]
    assert pairwise[2] == pairwise[3]


def test_ito_rerun_reuses_every_step(tiny, shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from lmclab.cli import main

    root, first = tiny
    io = ["--runs-dir", str(root / "runs"), "--data-dir", str(shared_data), "--offline", "--device", "cpu"]
    assert main(["run", "ito", "--preset", "tiny", "--out", str(root / "out2"), "--no-progress", *io, "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert {name.split("_")[0] for name in second["steps_run"]} <= {"train"}  # the run store caches training
    for table in ("pair_barriers_table", "merged_table", "trace_table"):
        assert read(second["files"][table]) == read(first["files"][table])


def test_cli_merge_stored_runs(tiny, cli_io, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from lmclab.cli import main
    from lmclab.store import RunStore

    root, _ = tiny
    runs = RunStore(root / "runs").runs()[:3]
    io = cli_io(root / "runs")
    args = [
        "merge",
        *(r.hash[:8] for r in runs),
        "--method",
        "naive",
        "merge_many",
        "--points",
        "3",
        "--subset",
        "200",
        "--out",
        str(root / "merge"),
        *io,
    ]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    pairs = read(out["files"]["pair_barriers_table"])
    assert len(pairs) == 2 * 3 * 2 * 2  # methods × pairs × splits × (loss, error)
    assert {(r["i"], r["j"]) for r in pairs} == {("0", "1"), ("0", "2"), ("1", "2")}
    assert out["merged"]["merge_many"]["test"]["loss"] < out["merged"]["naive"]["test"]["loss"]
    for split in ("train", "test"):
        check_heatmaps(drawn(out["files"][f"heatmap_{split}"]), pairs, 3, split=split)
    assert main([*args, "--json"]) == 0  # every step reused (training is looked up in the run store)
    again = json.loads(capsys.readouterr().out)
    assert {name.split("_")[0] for name in again["steps_run"]} <= {"train"} and again["merged"] == out["merged"]
    assert main(["merge", runs[0].hash[:8], *io]) == 2
    assert "at least 2 runs" in capsys.readouterr().err


def test_ito_presets_load_and_bad_names_are_refused() -> None:
    from lmclab.experiments.ito import load_ito_preset

    for name in ("smoke", "paper", "tiny"):
        preset = load_ito_preset(name)
        assert all(s.models >= 2 for s in preset.settings)
    with pytest.raises(ValueError, match="presets: smoke, paper, tiny"):
        load_ito_preset("nope")


def test_a_diverged_member_gives_missing_barriers_not_numbers(population, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from lmclab.report.ito import plot_barriers_vs_k, plot_heatmaps

    model, _, points, datasets = population
    broken = dict(points[3])
    broken["layers.0.linear.weight"] = torch.full_like(broken["layers.0.linear.weight"], float("nan"))
    result = all_pairs_barriers(
        model, [*points[:3], broken], {"train": datasets["train"]}, lambdas=[0, 0.5, 1], to_merged=False, progress=False
    )
    for r in result.pairs:  # loss and error: NaN logits give NaN metrics, never an argmax of NaNs
        assert np.isnan(r["barrier"]) == (r["j"] == 3)
    s = next(r for r in result.summary() if (r["metric"], r["definition"]) == ("loss", "barrier"))
    assert (s["n"], s["n_missing"]) == (6, 3) and np.isfinite(s["max"])
    rows = [{"method": "naive", "k": 4, **r} for r in result.summary() if r["kind"] == "pairs"]
    check_barriers_vs_k(plot_barriers_vs_k(tmp_path / "b.png", rows), rows)
    pairs = [{"method": "naive", **r} for r in result.pairs]
    check_heatmaps(plot_heatmaps(tmp_path / "h.png", pairs, 4, split="train"), pairs, 4, split="train")  # n/a cells
