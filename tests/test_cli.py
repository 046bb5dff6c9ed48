"""The command line end to end on a tiny real-MNIST run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmclab.cli import main

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
    code = main(list(argv))
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


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "no_such_preset"], "valid presets: mlp_mnist"),
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
