"""Packed training of BatchNorm models (lmclab.training.packed) against the solo trainer.

Exactness: `test_packed_bn_step_equals_solo_step` runs `Pack.step` against the solo `train_step` in float64
(ResNet-20 with BatchNorm; BatchNorm MLPs with momentum 0.1, with momentum None, without running
statistics): every weight and running statistic agrees to 1e-9 of its tensor's largest entry and
num_batches_tracked exactly, so the pack computes each member's solo update, batch statistics from the
member's own batch.

The store, in float32: `lmclab train resnet20_bn_cifar10 --pack-seeds 0,1` against `--seed 0` and `--seed 1`
(the preset's recipe: SGD 0.1, momentum 0.9, weight decay 1e-4, batch 128) on a real 256-image CIFAR-10
subset of classes 0 and 1 (so each evaluation of the test split is 2,000 images), one epoch = 2 steps, kept
at steps 1 and 2. Exact: checkpoint layout (names, shapes, dtypes), headers, num_batches_tracked, generator
states, data orders. Numbers: a packed member differs from its solo run by float summation order only
(convolutions and batch statistics on [K·C]-channel tensors under vmap), but a float32 ResNet-20's gradient
is ill-conditioned (test_packed's test_packed_step_equals_solo_step), and near-zero tensors such as
BatchNorm biases carry that in their largest entry (per tensor up to 3.5e-4 after one step, 1.3e-2 after
two, measured). So the tolerances are relative to a whole part's norm, ‖a − b‖ / ‖a‖ over all weights, all
running statistics, all optimizer state, as TOLERANCES says per step. Measured on this machine (either
seed): step 1: weights ≤ 1.4e-6, running statistics ≤ 3.3e-9, optimizer state ≤ 6.6e-5; step 2: ≤ 8.2e-5,
≤ 8.4e-7, ≤ 3.6e-3. For scale: the solo run itself moves further when only its summation order changes
(2 threads instead of 1: the largest per-tensor difference 4.3e-3 after two steps, the pack 8.2e-4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import lmclab.experiments.steps as steps_module
import lmclab.training.packed as packed_module
from lmclab.cli import main
from lmclab.config import DataConfig, ModelConfig, RunConfig, SeedConfig, TrainConfig, UsageError
from lmclab.experiments.graph import pack_groups
from lmclab.experiments.steps import train_step as train_step_of
from lmclab.models import build_model
from lmclab.store import Run, RunStore, load_checkpoint
from lmclab.training import RunOptions, TrainingState, load_run_model, make_optimizer, train_pack
from lmclab.training.packed import Pack, check_model_packable
from pack_steps import step_pack_and_solo

pytestmark = pytest.mark.usefixtures("one_thread")

#: step -> part -> largest allowed ‖packed − solo‖ / ‖solo‖ (see the module docstring)
TOLERANCES = {
    1: {"weights": 1e-5, "running statistics": 1e-6, "optimizer state": 1e-3},
    2: {"weights": 1e-3, "running statistics": 1e-5, "optimizer state": 5e-2},
}
FLAGS = ["--train-subset", "256", "--classes", "0,1", "--epochs", "1", "--checkpoints", "steps:1"]
MEASURED: dict[int, dict[str, float]] = {}  # filled by test_packed_bn_members_equal_solo_runs (printed with -s)


def _lmclab_json(args: list[str]) -> dict[str, object]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*args, "--json"]) == 0
    result: dict[str, object] = json.loads(out.getvalue())
    return result


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, cli_io: Callable[[str | Path], list[str]]
) -> tuple[list[Run], list[Run], dict[str, object]]:
    """(solo runs, packed runs, the pack's --json output) of seeds 0 and 1, trained by the CLI."""
    solo_root, pack_root = tmp_path_factory.mktemp("solo"), tmp_path_factory.mktemp("packed")
    packed = _lmclab_json(["train", "resnet20_bn_cifar10", "--pack-seeds", "0,1", *FLAGS, *cli_io(pack_root)])
    solo = [_lmclab_json(["train", "resnet20_bn_cifar10", "--seed", s, *FLAGS, *cli_io(solo_root)]) for s in "01"]
    rows = packed["runs"]
    assert isinstance(rows, list)
    return (
        [RunStore(solo_root).get(str(r["hash"])) for r in solo],
        [RunStore(pack_root).get(str(r["hash"])) for r in rows],
        packed,
    )


def part(name: str) -> str:
    """Which part of a checkpoint a float tensor belongs to."""
    if not name.startswith("model."):
        return "optimizer state" if name.startswith("optim.") else "other"
    return "running statistics" if name.endswith(("running_mean", "running_var")) else "weights"


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |a| (the reference tensor's largest entry)."""
    return (a - b).abs().max().item() / max(a.abs().max().item(), 1e-12)


def test_packed_bn_members_equal_solo_runs(runs: tuple[list[Run], list[Run], dict[str, object]]) -> None:
    solo_runs, packed_runs, _ = runs
    for solo, packed in zip(solo_runs, packed_runs, strict=True):
        assert packed.status == "complete" and packed.hash == solo.hash
        assert packed.meta["pack"][0]["size"] == 2 and "pack" not in solo.meta
        assert packed.checkpoint_steps() == solo.checkpoint_steps() == [1, 2]
        for step in solo.checkpoint_steps():
            a, header_a = load_checkpoint(solo.checkpoint_path(step))
            b, header_b = load_checkpoint(packed.checkpoint_path(step))
            assert header_b == header_a
            # the solo layout: the same names, shapes and dtypes
            assert {k: (v.shape, v.dtype) for k, v in b.items()} == {k: (v.shape, v.dtype) for k, v in a.items()}
            tracked = [k for k in a if k.endswith("num_batches_tracked")]
            assert len(tracked) == 21  # ResNet-20: stem, 2 per block × 9, 2 projection shortcuts
            for name in tracked:
                assert a[name].item() == step  # every step counted once, solo and packed
            squares: dict[str, list[float]] = {}
            for name in a:
                if not a[name].dtype.is_floating_point:
                    assert torch.equal(a[name], b[name]), (step, name)  # counts, generator states, data order
                    continue
                sums = squares.setdefault(part(name), [0.0, 0.0])
                sums[0] += (a[name] - b[name]).double().pow(2).sum().item()
                sums[1] += a[name].double().pow(2).sum().item()
            assert squares["other"][0] <= 1e-10 * squares["other"][1]  # the epoch sums
            for key, tolerance in TOLERANCES[step].items():
                diff = (squares[key][0] / squares[key][1]) ** 0.5
                assert diff <= tolerance, (step, key, diff)
                MEASURED.setdefault(step, {})[key] = max(MEASURED.get(step, {}).get(key, 0.0), diff)
            # the running statistics moved from their initial 0 and 1
            assert a["model.stem.norm.running_mean"].abs().max() > 1e-3
            assert max((a[k] - 1).abs().max().item() for k in a if k.endswith("running_var")) > 1e-2
        hist_a, hist_b = solo.meta.history, packed.meta.history
        assert [(h["epoch"], h["step"]) for h in hist_b] == [(h["epoch"], h["step"]) for h in hist_a] == [(1, 2)]
        for key in ("train_loss", "test_loss"):
            assert hist_b[0][key] == pytest.approx(hist_a[0][key], rel=1e-4), key
        final_a, final_b = solo.meta.final_metrics, packed.meta.final_metrics
        assert final_a is not None and final_b is not None
        assert final_b == pytest.approx(final_a, rel=1e-4)
    print(f"packed vs solo, ‖a − b‖ / ‖a‖ per step and part: {MEASURED}")


def test_packed_bn_checkpoints_load_into_a_solo_model(
    runs: tuple[list[Run], list[Run], dict[str, object]],
) -> None:
    """A member's stored model is a solo ResNet-20 with its own running statistics: its eval-mode outputs
    equal those of its solo run, and differ from the other member's (the statistics are not shared)."""
    solo_runs, packed_runs, _ = runs
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outputs = []
    for solo, packed in zip(solo_runs, packed_runs, strict=True):
        model, reference = load_run_model(packed), load_run_model(solo)
        stored, _ = load_checkpoint(packed.checkpoint_path(2))
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, stored[f"model.{name}"])
        with torch.no_grad():
            out, ref = model(x), reference(x)
        assert relative_difference(ref, out) <= 1e-3
        outputs.append(out)
    a, b = (load_run_model(r).state_dict() for r in packed_runs)
    assert not torch.allclose(a["layers.0.0.norm1.running_mean"], b["layers.0.0.norm1.running_mean"])
    assert not torch.allclose(outputs[0], outputs[1])


def test_cli_packs_the_batchnorm_preset(
    runs: tuple[list[Run], list[Run], dict[str, object]], capsys: pytest.CaptureFixture[str]
) -> None:
    _, packed_runs, out = runs
    assert out["pack"] == 2 and [r["seed"] for r in out["runs"]] == [0, 1]  # type: ignore[attr-defined]
    for seed, run in enumerate(packed_runs):
        assert run.config.model.norm == "batchnorm" and run.config.seeds == SeedConfig.from_seed(seed)
        assert run.meta.pack is not None and run.meta.pack[0]["members"] == [r.hash for r in packed_runs]
    for command in ("train", "run"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "BatchNorm" in text and "not for BatchNorm" not in text
        assert "BatchNorm and dropout models train one at a time" not in text


def _members(build: Callable[[], torch.nn.Module], config: RunConfig) -> list[TrainingState]:
    states = []
    for k in range(2):
        torch.manual_seed(k)
        net = build().double()
        sums = torch.zeros(3, dtype=torch.float64)
        states.append(TrainingState(net, make_optimizer(config, net), torch.Generator(), torch.Generator(), None, sums))
    return states


def _bn_mlp(momentum: float | None, track: bool = True) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(12, 8),
            torch.nn.BatchNorm1d(8, momentum=momentum, track_running_stats=track),
            torch.nn.ReLU(),
            torch.nn.Linear(8, 3),
        )

    return build


def _resnet20_bn() -> torch.nn.Module:
    return build_model("resnet20", input_shape=(3, 8, 8), num_classes=10, width=1, norm="batchnorm")


@pytest.mark.parametrize(
    "model",
    ["resnet20", "mlp momentum 0.1", "mlp momentum None", "mlp no running stats"],
)
def test_packed_bn_step_equals_solo_step(model: str) -> None:
    """Three SGD-momentum steps of two BatchNorm models, packed (`Pack.step`) vs solo `train_step`, in float64:
    weights and running statistics agree to 1e-9 of each tensor's largest entry, num_batches_tracked exactly,
    with no vmap fallback. momentum None is the cumulative average (factor 1/num_batches_tracked); a model
    without running statistics normalises with batch statistics in both modes."""
    build = {
        "resnet20": _resnet20_bn,
        "mlp momentum 0.1": _bn_mlp(0.1),
        "mlp momentum None": _bn_mlp(None),
        "mlp no running stats": _bn_mlp(0.1, track=False),
    }[model]
    shape = (3, 8, 8) if model == "resnet20" else (12,)
    classes = 10 if model == "resnet20" else 3
    config = RunConfig(train=TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9))
    states = _members(build, config)
    gen = torch.Generator().manual_seed(0)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(2, 16, *shape, generator=gen, dtype=torch.float64)
        return x, torch.randint(0, classes, (2, 16), generator=gen)

    pack, solo, initial = step_pack_and_solo(states, config, draw)
    for k in range(2):
        pack.write_back(k, states[k])
        expected, got = solo[k].model.state_dict(), states[k].model.state_dict()
        assert list(got) == list(expected)
        moved = 0.0
        for name, a in expected.items():
            b = got[name]
            if name.endswith("num_batches_tracked"):
                assert a.item() == b.item() == 3
                continue
            assert relative_difference(a, b) <= 1e-9, name
            if name.endswith(("running_mean", "running_var")):
                assert (a - initial[k][name]).abs().max() > 1e-3, name  # the statistics were updated
            else:
                moved = max(moved, (a - initial[k][name]).abs().max().item())
        assert moved > 1e-3  # the steps did move the weights
        x = torch.randn(4, *shape, generator=gen, dtype=torch.float64)
        solo[k].model.eval(), states[k].model.eval()
        with torch.no_grad():  # eval mode: the member's own running statistics
            assert relative_difference(solo[k].model(x), states[k].model(x)) <= 1e-9


def test_cumulative_bn_members_must_share_the_count() -> None:
    config = RunConfig(train=TrainConfig(optimizer="sgd", lr=0.05))
    states = _members(_bn_mlp(None), config)
    states[1].model[2].num_batches_tracked.fill_(5)
    with pytest.raises(UsageError, match="momentum None") as err:
        Pack.of(states, config)
    assert "\n" not in str(err.value)


def test_a_batchnorm_pack_refuses_nothing_and_dropout_is_refused_in_one_line() -> None:
    for name, norm in (("resnet20", "batchnorm"), ("resnet18", "batchnorm"), ("vgg11", "batchnorm")):
        config = RunConfig(data=DataConfig("cifar10"), model=ModelConfig(name, norm=norm))
        with torch.device("meta"):
            model = build_model(name, input_shape=(3, 32, 32), num_classes=10, norm=norm)
        check_model_packable(model, config)  # no UsageError
    config = RunConfig(model=ModelConfig("mlp"))
    dropout = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.1))
    with pytest.raises(UsageError, match="has dropout") as err:
        check_model_packable(dropout, config)
    assert "\n" not in str(err.value)
    check_model_packable(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.0)), config)  # p = 0: none


def test_train_pack_refuses_dropout_in_one_line_before_storing(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(No registered model has dropout: the pack is handed one.)"""

    def with_dropout(config: RunConfig, info: object) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.1), torch.nn.Linear(28 * 28, 10))

    monkeypatch.setattr(packed_module, "init_model", with_dropout)
    config = RunConfig(data=DataConfig("mnist", train_subset=100), model=ModelConfig("mlp", hidden=(8,)))
    options = RunOptions(
        runs_dir=str(tmp_path), data_dir=str(shared_data), device="cpu", progress=False, download=False
    )
    configs = [dataclasses.replace(config, seeds=SeedConfig.from_seed(s)) for s in (0, 1)]
    with pytest.raises(UsageError, match="has dropout; allowed: models without dropout") as err:
        train_pack(configs, options)
    assert "\n" not in str(err.value)
    assert RunStore(tmp_path).runs() == []


def test_a_refused_model_trains_alone_under_run_pack_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """`lmclab run --pack` (pack_groups): BatchNorm steps pack; steps of a model with dropout (handed in here:
    no registered model has dropout) run one at a time, and the executor says why in one line."""

    def with_dropout(config: RunConfig, info: object) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.1), torch.nn.Linear(28 * 28, 10))

    bn = RunConfig(data=DataConfig("cifar10"), model=ModelConfig("resnet20", norm="batchnorm"))
    mlp = RunConfig(data=DataConfig("mnist"), model=ModelConfig("mlp"))
    steps = [
        train_step_of(f"{name}/{s}", dataclasses.replace(c, seeds=SeedConfig.from_seed(s)))
        for name, c in (("bn", bn), ("mlp", mlp))
        for s in (0, 1)
    ]
    said: list[str] = []
    assert [[s.config["label"] for s in g] for g in pack_groups(steps, said.append)] == [
        ["bn/0", "bn/1"],
        ["mlp/0", "mlp/1"],
    ]
    assert said == []
    monkeypatch.setattr(steps_module, "init_model", with_dropout)
    groups = pack_groups(steps, said.append)
    assert [[s.config["label"] for s in g] for g in groups] == [["bn/0"], ["bn/1"], ["mlp/0"], ["mlp/1"]]
    assert len(said) == 2 and all(s.startswith("--pack: 2 train steps run one at a time: ") for s in said)
    assert all("has dropout" in s and "\n" not in s for s in said)
