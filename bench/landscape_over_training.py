"""Cost of Singh's landscape-over-training analysis for one fork relative to training its children.

One parent is forked at one epoch into two children (checkpoints every epoch). Timed on the same
machine, in this process:

- children: training both children from the fork to the end (the parent is trained beforehand and
  not counted);
- segments: loss and error at N points on the segment θ_1^t → θ_2^t at every common child checkpoint
  (the `singh_segments` step), for several N and for every 1st/2nd/4th child epoch (fewer checkpoints);
- geometry: sibling angles (two bases), plane determination and distance at every child checkpoint.

The cost of the segments is ≈ checkpoints × N × (forward pass over the evaluation examples [+ a BN
reset pass]); the last column divides the time by checkpoints × N to show it. On a shared CPU the
absolute numbers are inflated; the ratios are what this measures.

    python bench/landscape_over_training.py [--data-dir ../shared/data] [--preset mlp|resnet20]
        [--points 5,13,25,49] [--every 1,2,4] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from lmclab.config import DataConfig, ModelConfig, RunConfig, SeedConfig, TrainConfig
from lmclab.experiments.graph import STEP_KINDS, StepContext
from lmclab.experiments.singh import common_steps, sibling_runs
from lmclab.training import CheckpointSchedule, RunOptions, fork, train

SETUPS = {
    # the smoke preset's MLP: 10,000 Fashion-MNIST images, SGD, 8 epochs, forked at epoch 2 (6 child epochs)
    "mlp": (
        RunConfig(
            DataConfig("fashion_mnist", train_subset=10_000),
            ModelConfig("mlp", hidden=(128, 128)),
            TrainConfig(optimizer="sgd", lr=0.1, weight_decay=1e-4, batch_size=64, epochs=8),
            SeedConfig(),
        ),
        2,
        2000,
    ),
    # ResNet-20 ×1 + BN on 2,000 CIFAR-10 images, 6 epochs, forked at epoch 2 (BN reset at every point)
    "resnet20": (
        RunConfig(
            DataConfig("cifar10", train_subset=2000),
            ModelConfig("resnet20", width=1, norm="batchnorm"),
            TrainConfig(optimizer="sgd", lr=0.1, weight_decay=1e-4, batch_size=128, epochs=6),
            SeedConfig(),
        ),
        2,
        500,
    ),
}


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--preset", choices=sorted(SETUPS), default="mlp")
    parser.add_argument("--points", default="5,13,25,49", help="N values (comma-separated)")
    parser.add_argument("--every", default="1,2,4", help="child-epoch strides (fewer checkpoints)")
    parser.add_argument("--repeats", type=int, default=2, help="timings are the minimum over this many runs")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for training and analysis alike (1: steadier on a shared CPU)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parent, epoch, examples = SETUPS[args.preset]
    runs_dir = tempfile.mkdtemp(prefix="singh_bench_")  # fresh: the children must really be trained here
    options = RunOptions(runs_dir=runs_dir, data_dir=args.data_dir, device="cpu", progress=False, eval_every=0)

    train(parent, dataclasses.replace(options, checkpoints=CheckpointSchedule(epochs=(epoch,))))
    t_children, forks = timed(lambda: fork(parent, [epoch], 2, options))
    run_a, run_b = forks[epoch]
    inputs = {"a": {"run": str(run_a.path)}, "b": {"run": str(run_b.path)}}
    _, _, fork_step, spe = sibling_runs(inputs)
    ctx = StepContext(Path(runs_dir) / "bench", {"data_dir": args.data_dir, "device": "cpu", "progress": False})
    child_epochs = (int(run_a.meta["total_steps"]) - fork_step) // spe
    print(
        f"{args.preset} ({args.threads} thread(s)): {run_a.meta['parameters']:,} parameters, forked at epoch "
        f"{epoch}, {child_epochs} child epochs, {examples} evaluation examples; training both children took "
        f"{t_children:.1f} s",
        flush=True,
    )

    def segments(points: int, every: int) -> float:
        config = {"points": points, "examples": examples, "every": every, "bn": "reset", "bn_examples": None}
        return min(timed(lambda: STEP_KINDS["singh_segments"](ctx, config, inputs))[0] for _ in range(args.repeats))

    segments(2, 1)  # warm-up: data loading (cached across steps), every checkpoint read once from disk
    print(f"{'analysis':<28}{'checkpoints':>12}{'N':>5}{'seconds':>10}{'/ children':>12}{'ms per point':>14}")
    for every in (int(e) for e in args.every.split(",")):
        for points in (int(n) for n in args.points.split(",")):
            ckpts = len(common_steps(run_a, run_b, fork_step, every, spe))
            seconds = segments(points, every)
            print(
                f"{f'segments, every {every}':<28}{ckpts:>12}{points:>5}{seconds:>10.2f}{seconds / t_children:>12.3f}"
                f"{1000 * seconds / (ckpts * points):>14.1f}",
                flush=True,
            )
    seconds = timed(lambda: STEP_KINDS["singh_geometry"](ctx, {}, inputs))[0]
    ckpts = len(common_steps(run_a, run_b, fork_step, 1, spe))
    print(
        f"{'geometry (angles, planes)':<28}{ckpts:>12}{'':>5}{seconds:>10.2f}{seconds / t_children:>12.3f}", flush=True
    )
    print(f"runs in {runs_dir}")


if __name__ == "__main__":
    main()
