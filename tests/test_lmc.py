"""Two-model LMC end to end on tiny real-MNIST runs: align, verify, interpolate, report, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from figures import check_paths, drawn
from lmclab.align.weight_matching import spec_tensor_names
from lmclab.cli import main
from lmclab.experiments import lmc as lmc_module
from lmclab.experiments.lmc import align_runs, interpolate_runs, layer_selection, lmc_pairs, load_alignment
from lmclab.permutation import Permutation
from lmclab.points import distance
from lmclab.store import RunStore
from lmclab.training import load_run_model


def read(path: str | Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def count_alignments(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each alignment `align_runs` computes (the dispatch it calls when nothing is stored)."""
    calls: list[str] = []
    real = lmc_module.align

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[3] if len(args) > 3 else kwargs.get("method", "?"))
        return real(*args, **kwargs)

    monkeypatch.setattr(lmc_module, "align", counting)
    return calls


def stored(directory: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each file an alignment stored: a rewrite changes them."""
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in sorted(directory.iterdir())}


def test_align_runs_is_verified_cached_and_reduces_distance(
    tiny_pair,
    shared_data: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, (run_a, run_b) = tiny_pair
    store = RunStore(tmp_path / "store")  # nothing aligned there yet
    calls = count_alignments(monkeypatch)
    alignment = align_runs(run_a, run_b, store=store, device="cpu", progress=False)
    assert calls == ["weight"] and alignment.path.parent == store.root
    files = stored(alignment.path)
    assert {"perm.safetensors", "alignment.json"} <= set(files)
    info = alignment.info
    assert info["distance_after"] < info["distance_before"]
    assert all(v < 1e-4 for v in info["invariance_max_abs_diff"].values())
    theta_a, theta_b = run_a.load_state(), run_b.load_state()
    aligned = alignment.perm.apply(theta_b, alignment.spec)
    permuted_tensors = spec_tensor_names(alignment.spec, theta_a)  # the distance is over the tensors π moves
    assert distance(theta_a, aligned, permuted_tensors) == pytest.approx(info["distance_after"], rel=1e-5)
    assert distance(theta_a, theta_b, permuted_tensors) == pytest.approx(info["distance_before"], rel=1e-5)
    again = align_runs(run_a, run_b, store=store, device="cpu", progress=False)
    assert calls == ["weight"] and stored(alignment.path) == files  # loaded: not recomputed, not rewritten
    assert again.perm == alignment.perm and again.path == alignment.path and again.info == alignment.info
    loaded = load_alignment(alignment.path / "perm.safetensors")
    assert loaded.perm == alignment.perm and loaded.spec.canonical() == alignment.spec.canonical()
    # the permuted model computes B's function
    model = load_run_model(run_b)
    x = torch.randn(5, 1, 28, 28)
    permuted = load_run_model(run_b)
    permuted.load_state_dict(aligned)
    torch.testing.assert_close(model(x), permuted(x), rtol=1e-5, atol=1e-5)


def test_interpolate_rows_and_report(tiny_pair, shared_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, (run_a, run_b) = tiny_pair
    summary = lmc_pairs(
        [(run_a, run_b)],
        method="weight",
        out=tmp_path / "lmc",
        say=lambda _: None,
        points=5,
        splits=("test",),
        subset=500,
        data_dir=str(shared_data),
        device="cpu",
        progress=False,
    )
    with open(summary["paths"]) as fh:
        rows = list(csv.DictReader(fh))
    assert {r["path"] for r in rows} == {"naive", "weight-matched"}
    assert len(rows) == 2 * 5 * 3  # paths × λ × (loss, accuracy, error)
    naive0 = [r for r in rows if r["path"] == "naive" and r["lambda"] == "0.0" and r["metric"] == "loss"]
    perm0 = [r for r in rows if r["path"] == "weight-matched" and r["lambda"] == "0.0" and r["metric"] == "loss"]
    assert naive0[0]["value"] == perm0[0]["value"]  # both paths start at θ_A
    naive1 = [r for r in rows if r["path"] == "naive" and r["lambda"] == "1.0" and r["metric"] == "loss"]
    perm1 = [r for r in rows if r["path"] == "weight-matched" and r["lambda"] == "1.0" and r["metric"] == "loss"]
    assert float(naive1[0]["value"]) == pytest.approx(float(perm1[0]["value"]), rel=1e-5)  # π(θ_B) ≡ θ_B
    barriers = {(b["path"], b["metric"]): float(b["barrier"]) for b in summary["barriers"]}
    assert set(barriers) == {
        ("naive", "loss"),
        ("naive", "error"),
        ("weight-matched", "loss"),
        ("weight-matched", "error"),
    }
    figure = drawn(summary["figure"])
    check_paths(figure, rows)  # the loss and accuracy of both paths at every λ, as in paths.csv
    assert figure.figure.get_suptitle() == f"{run_a.path.name} ↔ {run_b.path.name}"


def test_layerwise_selection(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    _, (run_a, _) = tiny_pair
    model = load_run_model(run_a)
    single = layer_selection(model, ["layers.1.linear"])
    assert single == [("layers.1.linear", ["layers.1.linear.weight", "layers.1.linear.bias"])]
    cumulative = layer_selection(model, ["cumulative:deep"])
    assert [label for label, _ in cumulative] == ["deep:1:head", "deep:2:layers.1.linear", "deep:3:layers.0.linear"]
    with pytest.raises(ValueError, match="layer groups: layers.0.linear, layers.1.linear, head"):
        layer_selection(model, ["conv9"])


def test_layerwise_path_only_moves_the_chosen_layer(tiny_pair, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    _, (run_a, run_b) = tiny_pair
    rows = interpolate_runs(
        run_a,
        run_b,
        points=3,
        splits=("test",),
        subset=300,
        layers=["head"],
        data_dir=str(shared_data),
        device="cpu",
        progress=False,
    )
    assert {r["layers"] for r in rows} == {"head"}
    full = interpolate_runs(
        run_a, run_b, points=3, splits=("test",), subset=300, data_dir=str(shared_data), device="cpu", progress=False
    )
    from lmclab.data import DeviceDataset
    from lmclab.training import evaluate

    def loss(rs: list[dict], lam: float) -> float:
        return next(r["value"] for r in rs if r["lambda"] == lam and r["metric"] == "loss")

    data = DeviceDataset.load("mnist", "test", data_dir=shared_data, subset=300, augment=False, progress=False)
    theta_a, theta_b = run_a.load_state(), run_b.load_state()
    hybrid = load_run_model(run_a)  # A's body with B's head: the layer-wise path's end
    hybrid.load_state_dict({**theta_a, **{k: v for k, v in theta_b.items() if k.startswith("head.")}})
    assert loss(rows, 0.0) == pytest.approx(loss(full, 0.0), rel=1e-6)  # both paths start at θ_A
    assert loss(rows, 0.0) == pytest.approx(evaluate(load_run_model(run_a), data)["loss"], rel=1e-6)
    assert loss(rows, 1.0) == pytest.approx(evaluate(hybrid, data)["loss"], rel=1e-6)
    assert loss(rows, 1.0) != pytest.approx(loss(full, 1.0), rel=1e-3)  # head from B on A's body is not model B


def test_cli_align_and_interpolate(tiny_pair, cli_io, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    store, (run_a, run_b) = tiny_pair
    io = cli_io(store.root)
    assert main(["align", run_a.hash[:8], run_b.hash[:8], *io, "--json"]) == 0
    aligned = json.loads(capsys.readouterr().out)
    perm, spec, _ = Permutation.load(aligned["perm"])
    assert spec is not None and not perm.is_identity()
    assert (
        main(
            [
                "interpolate",
                run_a.hash[:8],
                run_b.hash[:8],
                "--perm",
                aligned["perm"],
                "--points",
                "3",
                "--split",
                "test",
                "--subset",
                "200",
                "--out",
                str(tmp_path / "o"),
                *io,
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert len(result["barriers"]) == 4
    check_paths(drawn(tmp_path / "o" / "paths.png"), read(tmp_path / "o" / "paths.csv"))
    code = main(["interpolate", run_a.hash[:8], run_b.hash[:8], "--layers", "nope", *io])
    assert code == 2 and "layer groups" in capsys.readouterr().err


def test_cli_several_pairs_give_mean_and_std(
    tiny_pair,
    cli_io,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
) -> None:
    store, (run_a, run_b) = tiny_pair
    io = cli_io(store.root)
    assert (
        main(
            [
                "interpolate",
                run_a.hash,
                run_b.hash,
                run_b.hash,
                run_a.hash,
                "--align",
                "weight",
                "--points",
                "3",
                "--split",
                "test",
                "--subset",
                "200",
                "--out",
                str(tmp_path / "two"),
                *io,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "weight-matched     test  loss  barrier" in printed and " ± " in printed
    rows = read(tmp_path / "two" / "paths.csv")
    assert {r["pair"] for r in rows} == {"0", "1"}
    figure = drawn(tmp_path / "two" / "paths.png")
    check_paths(figure, rows)  # mean over the two pairs, labelled (n=2)
    assert "naive test (n=2)" in [t.get_text() for t in figure.figure.axes[0].get_legend().get_texts()]
    assert main(["interpolate", run_a.hash, run_b.hash, run_a.hash, *io]) == 2
    assert "runs come in pairs" in capsys.readouterr().err


def test_cli_align_ste_is_verified_cached_and_lowers_the_midpoint(
    tiny_pair,
    cli_io,
    shared_data: Path,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lmclab.data import DeviceDataset
    from lmclab.paths import evaluate_path

    store, (run_a, run_b) = tiny_pair
    io = cli_io(store.root)
    args = ["align", run_a.hash[:8], run_b.hash[:8], "--method", "ste", "--ste-epochs", "1", "--examples", "300", *io]
    calls = count_alignments(monkeypatch)
    assert main([*args, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "ste" and info["epochs"] == 1 and calls == ["ste"]
    files = stored(Path(info["perm"]).parent)
    alignment = load_alignment(info["perm"])
    weight = align_runs(run_a, run_b, store=store, device="cpu", progress=False)
    assert alignment.path != weight.path  # cached separately per method and settings
    model = load_run_model(run_a)
    data = DeviceDataset.load("mnist", "train", data_dir=shared_data, subset=300, progress=False)
    theta_a, theta_b = run_a.load_state(), run_b.load_state()

    def midpoint_loss(end: dict) -> float:
        rows = evaluate_path(model, theta_a, end, {"train": data}, lambdas=[0.5], progress=False)
        return next(r["value"] for r in rows if r["metric"] == "loss")

    assert midpoint_loss(alignment.perm.apply(theta_b, alignment.spec)) < midpoint_loss(theta_b)
    calls.clear()
    assert main([*args, "--json"]) == 0  # the stored alignment is reused: not trained again, not rewritten
    assert json.loads(capsys.readouterr().out)["perm"] == info["perm"]
    assert calls == [] and stored(Path(info["perm"]).parent) == files
