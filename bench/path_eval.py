"""A 25-point straight path evaluated three ways: batched (lmclab.paths.evaluate_path, chunks of λ
under one vmap'd forward per data batch; the memory estimate's chunk, up to 8 on the CPU, or --chunk),
lmclab's loop (the same call with chunk=1: one λ at a time) and the plain loop a user writes
(load_state_dict per λ, then an eval loop over the pre-normalised split).

Cases: MLP 784-512×3-10 on the MNIST test set; ResNet-20 ×1 (LayerNorm) on a CIFAR-10 test subset;
with ``--cases ...,resnet20-bn`` also ResNet-20 ×1 BatchNorm with BN reset at every λ (statistics from a
training subset). Random inits (the cost does not depend on training). Every way's losses are checked
against the plain loop's (largest relative difference printed).

    python bench/path_eval.py [--device cuda] [--data-dir ../shared/data] [--cases mlp,resnet20,resnet20-bn]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lmclab.data import DeviceDataset
from lmclab.models import build_model
from lmclab.paths import default_lambdas, evaluate_path, path_values
from lmclab.paths.batched import default_chunk

CASES = {
    # name: (label, dataset, model, options, test examples on CPU / on a GPU (None: all), bn)
    "mlp": ("MLP 784-512x3-10 / MNIST test", "mnist", "mlp", {}, (None, None), "none"),
    "resnet20": ("ResNet-20 x1 LN / CIFAR-10 test", "cifar10", "resnet20", {"width": 1}, (500, None), "none"),
    "resnet20-bn": (
        "ResNet-20 x1 BN, BN reset / CIFAR-10",
        "cifar10",
        "resnet20",
        {"width": 1, "norm": "batchnorm"},
        (500, None),
        "reset",
    ),
}
BN_EXAMPLES = {"cpu": 500, "cuda": 5000}


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of `fn`: wall clock on a GPU (synchronised), this process's CPU time on the CPU (the
    machine may be shared; run with OMP_NUM_THREADS=1 there so that CPU time is the work done)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, out
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


@torch.no_grad()
def plain_loop(
    model: torch.nn.Module,
    theta_a: dict[str, torch.Tensor],
    theta_b: dict[str, torch.Tensor],
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    lambdas: list[float],
    batch_size: int,
    bn_x: torch.Tensor | None,
) -> list[float]:
    """Mean loss at each λ, as a user would compute it (bf16 autocast on CUDA, as lmclab evaluates)."""
    losses = []
    cuda = x_all.device.type == "cuda"
    for lam in lambdas:
        model.load_state_dict(
            {k: torch.lerp(a, theta_b[k], lam) if a.is_floating_point() else a for k, a in theta_a.items()}
        )
        if bn_x is not None:  # BN reset: cumulative running averages over one pass, batches of 500
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.reset_running_stats()
                    m.momentum = None
            model.train()
            for s in range(0, len(bn_x), 500):
                model(bn_x[s : s + 500])
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=x_all.device)
        for s in range(0, len(x_all), batch_size):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = model(x_all[s : s + batch_size])
            total += F.cross_entropy(logits.float(), y_all[s : s + batch_size], reduction="sum").double()
        losses.append(total.item() / len(x_all))
    return losses


def case(
    key: str, device: torch.device, data_dir: str | None, repeats: int, chunk: int | None, batch_size: int
) -> dict[str, Any]:
    label, dataset, model_name, options, examples, bn = CASES[key]
    gpu = device.type == "cuda"
    data = DeviceDataset.load(
        dataset, "test", data_dir=data_dir, device=device, subset=examples[gpu], augment=False, progress=False
    )
    bn_data = (
        DeviceDataset.load(
            dataset,
            "train",
            data_dir=data_dir,
            device=device,
            subset=BN_EXAMPLES["cuda" if gpu else "cpu"],
            augment=False,
            progress=False,
        )
        if bn == "reset"
        else None
    )
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = build_model(model_name, input_shape=data.info.input_shape, num_classes=data.info.num_classes, **options)
        models.append(net.to(device).eval())
    theta_a = {k: v.clone() for k, v in models[0].state_dict().items()}
    theta_b = {k: v.clone() for k, v in models[1].state_dict().items()}
    lambdas = default_lambdas(25)
    x_all, y_all = next(data.batches(len(data)))
    bn_x = next(bn_data.batches(len(bn_data)))[0] if bn_data is not None else None
    # the library's estimate; on the CPU (where its default is 1: no batching) with up to 8 points per pass
    used_chunk = chunk or default_chunk(
        models[0],
        x_all[:1],
        max(min(batch_size, len(data)), min(500, len(bn_data)) if bn_data is not None else 0),
        most=None if gpu else 8,
    )

    def lmclab(c: int | None) -> Callable[[], list[float]]:
        def run() -> list[float]:
            rows = evaluate_path(
                models[0],
                theta_a,
                theta_b,
                {"test": data},
                lambdas=lambdas,
                bn=bn,
                bn_data=bn_data,
                batch_size=batch_size,
                chunk=c,
                progress=False,
            )
            return path_values(rows, "loss")

        return run

    ways = {
        "batched": lmclab(used_chunk),
        "lmclab loop": lmclab(1),
        "plain loop": lambda: plain_loop(models[1], theta_a, theta_b, x_all, y_all, lambdas, batch_size, bn_x),
    }
    seconds: dict[str, float] = {}
    losses: dict[str, list[float]] = {}
    for name, fn in ways.items():
        if gpu:
            fn()  # warm-up (kernels, autotuning); the CPU needs none
        runs = [timed(fn, device) for _ in range(repeats)]
        seconds[name] = min(t for t, _ in runs)
        losses[name] = runs[0][1]
    ref = losses["plain loop"]
    rel = {n: max(abs(a - b) / abs(b) for a, b in zip(v, ref)) for n, v in losses.items()}
    print(
        f"{label:<38} ({len(data)} ex, chunk {used_chunk:2d}, batch {batch_size}) "
        f"batched {seconds['batched']:6.2f} s  lmclab loop {seconds['lmclab loop']:6.2f} s  "
        f"plain loop {seconds['plain loop']:6.2f} s   "
        f"plain/batched {seconds['plain loop'] / seconds['batched']:5.2f}x  "
        f"loop/batched {seconds['lmclab loop'] / seconds['batched']:5.2f}x  "
        f"max rel. loss diff {max(rel['batched'], rel['lmclab loop']):.1e}",
        flush=True,
    )
    return {
        "case": key,
        "label": label,
        "examples": len(data),
        "chunk": used_chunk,
        "batch_size": batch_size,
        "seconds": seconds,
        "plain_over_batched": seconds["plain loop"] / seconds["batched"],
        "loop_over_batched": seconds["lmclab loop"] / seconds["batched"],
        "max_rel_loss_diff": rel,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cases", default=None, help="comma-separated of " + ", ".join(CASES))
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per way, fastest kept")
    parser.add_argument("--chunk", type=int, default=None, help="λ per pass for the batched way (default: estimate)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--json", default=None, help="write the numbers to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    cases = args.cases.split(",") if args.cases else (list(CASES) if gpu else ["mlp", "resnet20"])
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; allowed: {', '.join(CASES)}")
    card = torch.cuda.get_device_name(device) if gpu else "cpu"
    clock = "wall clock" if gpu else "process CPU time"
    print(f"device: {card}; torch {torch.__version__}; threads {torch.get_num_threads()}; {clock}")
    repeats = args.repeats or (2 if gpu else 1)
    results = [case(c, device, args.data_dir, repeats, args.chunk, args.batch_size) for c in cases]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": card, "torch": torch.__version__, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
