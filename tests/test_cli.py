"""The command line end to end on a tiny real-MNIST run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmclab.cli import main
from lmclab.store import Run

TINY = [
    "--train-per-class",
    "20",
    "--hidden",
    "16",
    "--epochs",
    "1",
    "--batch-size",
    "50",
    "--no-progress",
    "--offline",
]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse refusing an argument
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_train_runs_eval_json(tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    io = ["--runs-dir", str(tmp_path), "--data-dir", str(shared_data)]
    code, out, _ = run_cli(capsys, "train", "mlp_mnist", *TINY, *io, "--device", "cpu", "--json")
    assert code == 0
    trained = json.loads(out)
    assert Path(trained["path"]).is_dir() and 0 < trained["final_metrics"]["test_accuracy"] <= 1

    code, out, _ = run_cli(capsys, "runs", "--runs-dir", str(tmp_path), "--json")
    rows = json.loads(out)
    assert code == 0 and [r["run"] for r in rows] == [trained["run"]]
    assert rows[0]["model"] == "mlp" and rows[0]["preset"] == "mlp_mnist" and rows[0]["status"] == "complete"

    code, out, _ = run_cli(capsys, "eval", trained["hash"][:8], "--split", "test", *io, "--offline", "--json")
    evaluated = json.loads(out)
    assert code == 0 and evaluated["test"]["accuracy"] == trained["final_metrics"]["test_accuracy"]

    code, out, _ = run_cli(capsys, "runs", "--runs-dir", str(tmp_path))
    assert trained["run"] in out and "mlp_mnist" in out


def test_runs_shows_seeds_and_the_fields_that_differ_and_align_says_how_it_verified(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    io = ["--runs-dir", str(tmp_path), "--data-dir", str(shared_data), "--device", "cpu"]
    made = {}
    for seed, extra in ((11, []), (12, ["--lr", "0.01"])):
        code, out, _ = run_cli(capsys, "train", "mlp_mnist", *TINY, *extra, "--seed", str(seed), *io, "--json")
        assert code == 0
        made[seed] = json.loads(out)["run"]
        assert Run(tmp_path / made[seed]).meta["seed"] == seed  # the --seed given, kept in meta.json

    code, out, _ = run_cli(capsys, "runs", "--runs-dir", str(tmp_path))
    header, *lines = out.splitlines()
    assert code == 0 and header.split()[:8] == ["run", "status", "preset", "model", "dataset", "seed", "epochs", "done"]
    assert "lr" in header.split() and "hidden" not in header.split()  # only the fields that differ
    for seed, lr in ((11, "0.001"), (12, "0.01")):
        line = next(line for line in lines if line.startswith(made[seed]))
        assert f" {seed} " in line and f" {lr} " in line and "complete" in line
    code, out, _ = run_cli(capsys, "runs", "--runs-dir", str(tmp_path), "--json")
    rows = {r["run"]: r for r in json.loads(out)}
    assert rows[made[12]]["seed"] == 12 and rows[made[12]]["differs"] == {"train.lr": 0.01}
    assert rows[made[11]]["config"]["model.hidden"] == [16]

    code, out, err = run_cli(capsys, "align", made[11], made[12], *io, "--no-progress")
    assert code == 0 and "Traceback" not in err
    assert "max |Δlogit|" in out and "(tolerance |Δ| <= 1e-05 + 0.0001·|logit|): pass" in out
    assert "in eval mode" in out and "in train mode" in out and "{" not in out  # words, not a dict


def test_sharpness_shows_progress_unless_told_not_to(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    io = ["--runs-dir", str(tmp_path), "--data-dir", str(shared_data), "--device", "cpu", "--offline"]
    code, out, _ = run_cli(capsys, "train", "mlp_mnist", *TINY, *io, "--json")
    run = json.loads(out)["run"]
    quick = ["sharpness", run, "--subset", "50", "--probes", "2", "--no-eigenvalue", *io]
    code, _, err = run_cli(capsys, *quick)
    assert code == 0 and "sharpness: trace" in err
    code, _, err = run_cli(capsys, *quick, "--no-progress")
    assert code == 0 and "sharpness:" not in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "no_such_preset"], "allowed: one of mlp_mnist"),
        (["train", "mlp_mnist", "--model", "transformer"], "mlp, resnet20"),
        (["train", "mlp_mnist", "--dataset", "imagenet"], "mnist"),
        (["train", "mlp_mnist", "--optimizer", "lbfgs"], "sgd, adam, adamw"),
        (["eval", "deadbeef"], "no run"),
    ],
)
def test_bad_input_is_one_clear_message(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    extra = ["--runs-dir", str(tmp_path), "--data-dir", str(shared_data), "--offline"]
    if argv[0] == "train":
        extra += ["--no-progress"]
    code, out, err = run_cli(capsys, *argv, *extra)
    assert code == 2 and expected in err and "Traceback" not in err


def test_listings(capsys: pytest.CaptureFixture[str]) -> None:
    for command, expected in (("presets", "resnet20_bn_cifar10"), ("models", "resnet18"), ("datasets", "cifar100")):
        code, out, _ = run_cli(capsys, command)
        assert code == 0 and expected in out
    code, out, _ = run_cli(capsys, "presets", "--json")
    assert json.loads(out)["resnet20_cifar10"]["config"]["train"]["epochs"] == 250
