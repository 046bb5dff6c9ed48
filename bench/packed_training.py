"""Packed training (lmclab.training.train_pack) vs the solo trainer, K runs one after another: images/s.

Both sides train the same K configs (equal but for their seeds) for the same steps on the same device,
each into a fresh store of its own, in one process: first a short warm-up of both, then the K solo
runs one after another (`lmclab.training.train`), then the pack (`train_pack`), `--repeats` times.
Two ratios, pack / solo:

  steps      aggregate training images/s between each side's first and last optimizer step (step
             callbacks; the first step of every run, which builds kernels and caches, is left out)
  end to end the whole calls, opening runs, checkpoints and the final evaluations included

    nice -n 10 env OMP_NUM_THREADS=1 python bench/packed_training.py --k 4 --model mlp
    python bench/packed_training.py --device cuda --k 8 --model resnet20 --dataset cifar10   # name the card

Not a test: no thresholds. Prints one line per repeat and the medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lmclab.config import DataConfig, ModelConfig, RunConfig, SeedConfig, TrainConfig
from lmclab.training import RunOptions, TrainState, train, train_pack


def configs(args: argparse.Namespace) -> list[RunConfig]:
    model = (
        ModelConfig(args.model, hidden=tuple(int(h) for h in args.hidden.split(",")))
        if args.model == "mlp"
        else ModelConfig(args.model)
    )
    base = RunConfig(
        data=DataConfig(args.dataset, train_subset=args.train_subset),
        model=model,
        train=TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=args.batch_size, steps=args.steps),
    )
    return [dataclasses.replace(base, seeds=SeedConfig.from_seed(1000 * args.seed + s)) for s in range(args.k)]


def run_side(packed: bool, cfgs: list[RunConfig], args: argparse.Namespace, root: Path) -> tuple[float, float]:
    """(seconds between the first and last step callbacks summed over the runs, seconds end to end)."""
    opts = RunOptions(
        runs_dir=str(root),
        data_dir=args.data_dir,
        device=args.device,
        progress=False,
        download=False,
        eval_every=0,
    )
    marks: dict[int, list[float]] = {}

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def mark(member: int, state: TrainState) -> None:
        if state.step in (1, args.steps):
            sync()
            marks.setdefault(member, []).append(time.perf_counter())

    start = time.perf_counter()
    if packed:
        train_pack(cfgs, opts, callback=mark)
    else:
        for i, c in enumerate(cfgs):
            train(c, opts, callback=lambda state, i=i: mark(i, state))
    sync()
    total = time.perf_counter() - start
    if packed:  # one span: from the pack's first step to its last
        firsts = [m[0] for m in marks.values()]
        lasts = [m[-1] for m in marks.values()]
        steps_time = max(lasts) - min(firsts)
    else:
        steps_time = sum(m[-1] - m[0] for m in marks.values())
    return steps_time, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", type=int, default=4, help="members (runs) per pack")
    p.add_argument("--model", default="mlp", help="mlp (784-[hidden]-10), resnet20 (LayerNorm), vit, vgg11 …")
    p.add_argument("--hidden", default="512,512", help="the MLP's hidden sizes")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--train-subset", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=os.environ.get("LMCLAB_DATA_DIR"))
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap fallbacks: counted in the time
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"{args.k} × {args.model} on {args.dataset} ({args.train_subset} images, batch {args.batch_size}, "
        f"{args.steps} steps) on {where}, torch {torch.__version__}"
    )
    images = args.k * args.batch_size * (args.steps - 1)  # images between the first and last step of every run
    with tempfile.TemporaryDirectory() as tmp:
        warm = argparse.Namespace(**{**vars(args), "steps": 3, "seed": args.seed + 1})
        run_side(False, configs(warm)[:1], warm, Path(tmp) / "warm_solo")
        run_side(True, configs(warm), warm, Path(tmp) / "warm_pack")
        ratios, ends = [], []
        for r in range(args.repeats):
            cfgs = configs(argparse.Namespace(**{**vars(args), "seed": args.seed + 10 + r}))
            solo_steps, solo_total = run_side(False, cfgs, args, Path(tmp) / f"solo{r}")
            pack_steps, pack_total = run_side(True, cfgs, args, Path(tmp) / f"pack{r}")
            ratios.append(solo_steps / pack_steps)
            ends.append(solo_total / pack_total)
            print(
                f"repeat {r}: steps: solo {images / solo_steps:,.0f} img/s, pack {images / pack_steps:,.0f} img/s, "
                f"ratio {ratios[-1]:.2f}×;  end to end: solo {solo_total:.2f} s, pack {pack_total:.2f} s, "
                f"ratio {ends[-1]:.2f}×"
            )
    print(f"median ratio pack/solo: steps {statistics.median(ratios):.2f}×, end to end {statistics.median(ends):.2f}×")


if __name__ == "__main__":
    main()
