"""Packed training (lmclab.training.packed) against the solo trainer on a real 512-image MNIST subset.

Tolerance. A packed member differs from its solo run only by float summation order (batched matmuls
under vmap): after 20 steps every stored float tensor (weights, optimizer state, epoch sums) of every
checkpoint is within TOLERANCE × its largest entry of the solo one (measured: ≤ 5e-7 for SGD, Adam and
AdamW on this MLP); generator states and data orders are identical; history and final losses agree to
TOLERANCE relative.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lmclab.config import DataConfig, ModelConfig, RunConfig, SeedConfig, TrainConfig, UsageError
from lmclab.models import build_model
from lmclab.store import Run, RunStore, load_checkpoint
from lmclab.training import (
    CheckpointSchedule,
    RunOptions,
    TrainingDiverged,
    TrainingState,
    child_config,
    load_run_model,
    make_optimizer,
    train,
    train_pack,
)
from lmclab.training.packed import PackDiverged
from pack_steps import step_pack_and_solo

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-5
# 512 images, batch 64: 8 steps per epoch; 20 steps = epochs ending at steps 8, 16, 20.
BASE = RunConfig(
    data=DataConfig("mnist", train_subset=512),
    model=ModelConfig("mlp", hidden=(32, 32)),
    train=TrainConfig(optimizer="adam", lr=3e-3, batch_size=64, steps=20),
)
RECIPES = {
    "sgd": TrainConfig(
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-4,
        schedule="cosine",
        warmup_epochs=0.5,
        batch_size=64,
        steps=20,
    ),
    "adam": BASE.train,
    "adamw": dataclasses.replace(BASE.train, optimizer="adamw", weight_decay=1e-2, schedule="linear"),
}


def seeded(config: RunConfig, *seeds: int) -> list[RunConfig]:
    return [dataclasses.replace(config, seeds=SeedConfig.from_seed(s)) for s in seeds]


def options(root: Path, **kw: object) -> RunOptions:
    return RunOptions(
        runs_dir=str(root),
        data_dir=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"),
        device="cpu",
        progress=False,
        download=False,
        checkpoints=CheckpointSchedule(every=1),
        **kw,  # type: ignore[arg-type]
    )


def assert_same_run(solo: Run, packed: Run, *, exact: bool = False, tolerance: float = TOLERANCE) -> None:
    """Every checkpoint, the history and the final metrics agree (to `tolerance`, or bit for bit)."""
    assert packed.path.name == solo.path.name
    assert packed.checkpoint_steps() == solo.checkpoint_steps()
    for step in solo.checkpoint_steps():
        a, header_a = load_checkpoint(solo.checkpoint_path(step))
        b, header_b = load_checkpoint(packed.checkpoint_path(step))
        for header in (header_a, header_b):  # a fork child's checkpoints name its parent's path (another store)
            header.get("fork", {}).pop("parent_path", None)
        assert header_b == header_a
        assert sorted(b) == sorted(a)
        for name in a:
            if exact or not a[name].dtype.is_floating_point:
                assert torch.equal(a[name], b[name]), (step, name)
            else:
                scale = a[name].abs().max().item()
                assert (a[name] - b[name]).abs().max().item() <= tolerance * max(scale, 1e-12), (step, name)
    hist_a, hist_b = solo.meta.history, packed.meta.history
    assert [(h["epoch"], h["step"], h["lr"]) for h in hist_b] == [(h["epoch"], h["step"], h["lr"]) for h in hist_a]
    for ha, hb in zip(hist_a, hist_b, strict=True):
        assert set(ha) == set(hb)
        for key in ("train_loss", "test_loss"):
            assert hb[key] == pytest.approx(ha[key], rel=0 if exact else tolerance)
    final_a, final_b = solo.meta.final_metrics, packed.meta.final_metrics
    assert final_a is not None and final_b is not None
    assert final_b == pytest.approx(final_a, rel=0 if exact else tolerance, abs=0 if exact else 2e-4)


@pytest.fixture(scope="module")
def solo_runs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, list[Run]]:
    root = tmp_path_factory.mktemp("solo")
    return {
        name: [train(c, options(root)) for c in seeded(dataclasses.replace(BASE, train=recipe), 0, 1, 2)]
        for name, recipe in RECIPES.items()
    }


@pytest.fixture(scope="module")
def packed_runs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, list[Run]]:
    root = tmp_path_factory.mktemp("packed")
    return {
        name: train_pack(seeded(dataclasses.replace(BASE, train=recipe), 0, 1, 2), options(root))
        for name, recipe in RECIPES.items()
    }


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_packed_members_equal_solo_runs(
    recipe: str, solo_runs: dict[str, list[Run]], packed_runs: dict[str, list[Run]]
) -> None:
    for solo, packed in zip(solo_runs[recipe], packed_runs[recipe], strict=True):
        assert packed.status == "complete"
        assert_same_run(solo, packed)
        segments = packed.meta["pack"]
        assert [(s["start_step"], s["size"]) for s in segments] == [(0, 3)]
        assert segments[0]["members"] == [r.hash for r in packed_runs[recipe]]
        assert "pack" not in solo.meta


def test_members_are_normal_runs(packed_runs: dict[str, list[Run]], shared_data: Path) -> None:
    configs = seeded(BASE, 0, 1, 2)
    for config, run in zip(configs, packed_runs["adam"], strict=True):
        assert run.hash == config.run_hash() and run.config == config.normalised()
        model = load_run_model(run)
        stored, _ = load_checkpoint(run.checkpoint_path(20))
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, stored[f"model.{name}"])
        assert any(name.startswith("optim.") for name in stored) and run.meta.total_steps == 20


def test_pack_reuses_complete_members(tmp_path: Path, shared_data: Path) -> None:
    configs = seeded(BASE, 0, 1)
    done = train(configs[0], options(tmp_path))
    before = {p: p.stat().st_mtime_ns for p in done.checkpoint_dir.iterdir()}
    runs = train_pack(configs, options(tmp_path))
    assert runs[0].path == done.path and "pack" not in runs[0].meta
    assert {p: p.stat().st_mtime_ns for p in done.checkpoint_dir.iterdir()} == before
    assert runs[1].status == "complete" and runs[1].meta["pack"][0]["members"] == [runs[1].hash]
    after = {p: p.stat().st_mtime_ns for r in runs for p in r.checkpoint_dir.iterdir()}
    assert train_pack(configs, options(tmp_path)) == runs  # everything stored: nothing is trained again
    assert {p: p.stat().st_mtime_ns for r in runs for p in r.checkpoint_dir.iterdir()} == after


def test_configs_that_differ_beyond_seeds_are_refused(tmp_path: Path) -> None:
    other = dataclasses.replace(
        BASE,
        seeds=SeedConfig.from_seed(1),
        train=dataclasses.replace(BASE.train, lr=1e-2),
        model=ModelConfig("mlp", hidden=(16, 16)),
    )
    with pytest.raises(UsageError, match=r"differ in model\.hidden, train\.lr;") as err:
        train_pack([BASE, other], options(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="more than once"):
        train_pack([BASE, BASE], options(tmp_path))
    with pytest.raises(UsageError, match="no configs"):
        train_pack([], options(tmp_path))
    assert list(tmp_path.iterdir()) == []  # refused before the store is touched


class Stop(Exception):
    pass


def test_interrupted_pack_resumes_bit_identical(
    tmp_path: Path, packed_runs: dict[str, list[Run]], shared_data: Path
) -> None:
    configs = seeded(BASE, 0, 1, 2)

    def stop_at_12(member: int, state: object) -> None:
        if getattr(state, "step", 0) == 12:
            raise Stop

    with pytest.raises(Stop):
        train_pack(configs, options(tmp_path), callback=stop_at_12)
    store = RunStore(tmp_path)
    halted = [store.find(c.normalised()) for c in configs]
    assert all(r is not None and r.status == "interrupted" and r.resume_path.is_file() for r in halted)
    runs = train_pack(configs, options(tmp_path))
    for uninterrupted, resumed in zip(packed_runs["adam"], runs, strict=True):
        assert_same_run(uninterrupted, resumed, exact=True)
        assert resumed.meta.resumed_from is not None and resumed.meta.resumed_from.step == 8
        assert [(s["start_step"], s["size"]) for s in resumed.meta["pack"]] == [(0, 3), (8, 3)]
        assert not resumed.resume_path.exists()


def test_pack_fills_missing_checkpoints_of_complete_runs(
    tmp_path: Path, packed_runs: dict[str, list[Run]], shared_data: Path
) -> None:
    configs = seeded(BASE, 0, 1, 2)
    final_only = dataclasses.replace(options(tmp_path), checkpoints=CheckpointSchedule())
    runs = train_pack(configs, final_only)
    assert [r.checkpoint_steps() for r in runs] == [[20]] * 3
    metas = [r.meta.to_json() for r in runs]
    assert train_pack(configs, options(tmp_path)) == runs  # every epoch now: steps 8 and 16 are filled in
    for reference, run, meta in zip(packed_runs["adam"], runs, metas, strict=True):
        assert run.meta.to_json() == meta  # a filled run's meta.json is left as it is
        assert_same_run(reference, run, exact=True)


def test_a_diverging_member_leaves_the_pack(tmp_path: Path, shared_data: Path) -> None:
    """SGD at lr 0.8: seed 0 diverges at step 16 alone, and so in a pack with seed 1, which trains on to step 24
    exactly as it does in a pack of its own (a member's bits do not depend on the other members; leaving the
    pack restacks the rest losslessly). lr 0.8 is at the edge of stability, where float differences grow fast,
    so the survivor is compared with a pack of one, bit for bit, not with its solo run."""
    hot = dataclasses.replace(BASE, train=TrainConfig(optimizer="sgd", lr=0.8, momentum=0.9, batch_size=64, steps=24))
    configs = seeded(hot, 0, 1)
    with pytest.raises(TrainingDiverged, match="at step 16 "):
        train(configs[0], options(tmp_path / "solo"))
    with pytest.raises(PackDiverged) as err:
        train_pack(configs, options(tmp_path / "pack"))
    diverged, finished = err.value.runs
    assert err.value.diverged == [diverged.hash]
    assert diverged.status == "diverged" and "at step 16 " in str(diverged.meta.error)
    assert finished.status == "complete" and finished.meta["pack"][0]["members"] == [diverged.hash, finished.hash]
    (alone,) = train_pack(configs[1:], options(tmp_path / "alone"))
    assert_same_run(alone, finished, exact=True)


def test_fork_children_train_as_a_pack(tmp_path: Path, shared_data: Path) -> None:
    parent = BASE
    children = [child_config(parent, epoch=1, child=i) for i in range(2)]
    for store in ("solo", "pack"):  # the parent without its epoch-1 state: the children's first step fills it
        train(parent, dataclasses.replace(options(tmp_path / store), checkpoints=CheckpointSchedule()))
    solo = [train(c, options(tmp_path / "solo")) for c in children]
    packed = train_pack(children, options(tmp_path / "pack"))
    for a, b in zip(solo, packed, strict=True):
        assert b.meta.fork is not None and b.meta.fork.step == 8
        assert_same_run(a, b)


@pytest.mark.parametrize("model", ["resnet20", "vit"])
def test_packed_step_equals_solo_step(model: str) -> None:
    """Three SGD-momentum steps of two LayerNorm ResNet-20s or ViTs, packed vs solo `train_step`, in float64,
    without any vmap fallback:
    the weights agree to 1e-9 of each tensor's largest entry (the loss is taken in float32 on both sides).
    (In float32 a ResNet-20's gradient here is ill-conditioned: the solo gradient computed one example at a
    time differs from the batched one by 3e-4 of its largest entry, and so does the packed one.)"""
    config = RunConfig(model=ModelConfig(model), train=TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9))
    states = []
    for k in range(2):
        torch.manual_seed(k)
        net = build_model(model, input_shape=(1, 28, 28), num_classes=10, **config.model_options()).double()
        sums = torch.zeros(3, dtype=torch.float64)
        states.append(TrainingState(net, make_optimizer(config, net), torch.Generator(), torch.Generator(), None, sums))
    gen = torch.Generator().manual_seed(0)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(2, 8, 1, 28, 28, generator=gen, dtype=torch.float64)
        return x, torch.randint(0, 10, (2, 8), generator=gen)

    # no op may fall back to a loop over the members (global pooling and attention are batched in a pack)
    pack, solo, initial = step_pack_and_solo(states, config, draw)
    for k in range(2):
        pack.write_back(k, states[k])
        moved = 0.0
        for (name, a), b in zip(solo[k].model.named_parameters(), states[k].model.parameters(), strict=True):
            assert (a - b).abs().max().item() <= 1e-9 * a.abs().max().item(), name
            moved = max(moved, (a - initial[k][name]).abs().max().item())
        assert moved > 1e-3  # the steps did move the weights
