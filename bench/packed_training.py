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
    python bench/packed_training.py --device cuda --k 8 --model resnet20 --norm batchnorm --dataset cifar10

ResNet-20 ×1 with BatchNorm on the CPU, small (3 minutes on one thread of the loaded 2-core machine, mostly
the final evaluations, which --classes 0,1 keeps to 2,000 test images; measured: steps ratio 0.97×, final
weights 9e-3 apart: float32 rounding amplified by 6 steps of SGD at lr 0.05 from the initialisation):

    nice -n 10 env OMP_NUM_THREADS=1 python bench/packed_training.py --k 2 --model resnet20 \
        --norm batchnorm --dataset cifar10 --classes 0,1 --train-subset 256 --batch-size 32 --steps 6

It also prints how far the pack's final checkpoints are from the solo runs' (last repeat): ‖a − b‖ / ‖a‖
over all weights and over all running statistics, and whether every num_batches_tracked agrees
(float summation order only; tests/test_packed.py and tests/test_packed_bn.py bound it on the CPU).

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
from lmclab.store import RunStore, load_checkpoint
from lmclab.training import RunOptions, TrainState, train, train_pack


def _classes(args: argparse.Namespace) -> tuple[int, ...] | None:
    classes = getattr(args, "classes", None)
    return None if not classes else tuple(int(c) for c in str(classes).split(","))


def pack_difference(solo_root: Path, pack_root: Path) -> dict[str, float | bool]:
    """The packed runs' final checkpoints against the solo runs': ‖a − b‖ / ‖a‖ over all weights and over all
    running statistics (every run), and whether every integer tensor (num_batches_tracked, generator states,
    data order) is equal."""
    squares = {"weights": [0.0, 0.0], "running statistics": [0.0, 0.0]}
    equal = True
    solo, pack = RunStore(solo_root), RunStore(pack_root)
    for run in solo.runs():
        a, _ = load_checkpoint(run.checkpoint_path(run.checkpoint_steps()[-1]))
        other = pack.get(run.hash)
        b, _ = load_checkpoint(other.checkpoint_path(other.checkpoint_steps()[-1]))
        for name, x in a.items():
            if not x.dtype.is_floating_point:
                equal = equal and torch.equal(x, b[name])
            elif name.startswith("model."):
                key = "running statistics" if name.endswith(("running_mean", "running_var")) else "weights"
                squares[key][0] += (x - b[name]).double().pow(2).sum().item()
                squares[key][1] += x.double().pow(2).sum().item()
    out: dict[str, float | bool] = {k: (d / n) ** 0.5 for k, (d, n) in squares.items() if n > 0}
    out["integers equal"] = equal
    return out


def configs(args: argparse.Namespace) -> list[RunConfig]:
    model = (
        ModelConfig(args.model, hidden=tuple(int(h) for h in args.hidden.split(",")))
        if args.model == "mlp"
        else ModelConfig(args.model, norm=getattr(args, "norm", None))
    )
    base = RunConfig(
        data=DataConfig(args.dataset, train_subset=args.train_subset, classes=_classes(args)),
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
    p.add_argument("--norm", default=None, help="the CNN's norm layers (layernorm, batchnorm; default: the model's)")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--train-subset", type=int, default=2048)
    p.add_argument("--classes", default=None, help="train and test on these classes only (e.g. 0,1; default all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=os.environ.get("LMCLAB_DATA_DIR"))
    measure(p.parse_args())


def measure(args: argparse.Namespace) -> dict:
    """Warm-up, then `args.repeats` × (K solo runs, the pack); prints each repeat and the medians, returns them."""
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
        difference = pack_difference(Path(tmp) / f"solo{args.repeats - 1}", Path(tmp) / f"pack{args.repeats - 1}")
    print(f"median ratio pack/solo: steps {statistics.median(ratios):.2f}×, end to end {statistics.median(ends):.2f}×")
    print(
        "pack vs solo, final checkpoints, ‖a − b‖ / ‖a‖: "
        + ", ".join(f"{k} {v:.1e}" for k, v in difference.items() if not isinstance(v, bool))
        + f"; num_batches_tracked, generator states and data orders equal: {difference['integers equal']}"
    )
    return {
        "difference": difference,
        "k": args.k,
        "steps_ratio": statistics.median(ratios),
        "end_to_end_ratio": statistics.median(ends),
        "last_repeat_img_s": {"solo": images / solo_steps, "pack": images / pack_steps},
        "repeats": args.repeats,
    }


if __name__ == "__main__":
    main()
