"""Hessian trace: time to reach a confidence-interval width, lmclab vs. PyHessian's way.

Reference ("PyHessian's way", written here from its published description, no code taken): for each
Rademacher probe v, loop over the batches: forward, mean loss, gradient with create_graph, double
backward against v, accumulate H_b v · |b|; divide by N; sample vᵀHv. Stop when the Student-t 95% CI
half-width is ≤ `--target` · |mean| (checked after every probe, at least `--min-probes`).

lmclab: `hutchinson_trace` over `HessianOperator.matmat` (= `hessian_trace(..., probes=min_probes,
target_ci_width=target, probes_per_pass=block)`): up to `--block` probes share each data pass, the next
block sized to the predicted shortfall; the HVP method is the one a short calibration on this model and
device measures fastest. Same probes (same seed), same stopping rule. The two run in lockstep: PyHessian's
way is run inside lmclab's matmat on the probes lmclab just used (its time taken out of lmclab's), so
drifting machine load affects both alike. lmclab's time includes drawing the probes; PyHessian's not.

Also: lmclab's adaptive Hutch++ (`hessian_trace(method="hutchpp", sketch=k, target_ci_width=...)`) to
the same target, and the double-backward / forward-over-reverse HVP time ratio at batch 50 (one
vector, median of `--repeat` interleaved runs, each relative to one gradient).

    python bench/hessian_trace.py                          # CPU defaults (see --help)
    python bench/hessian_trace.py --models mlp             # MLP only
    python bench/hessian_trace.py --threads 1              # on a shared, oversubscribed CPU
    python bench/hessian_trace.py --device cuda --resnet-examples 500 --resnet-target 0.1

Models: Git Re-Basin's MLP (784-512-512-512-10) on MNIST test (`--mlp-examples`, trained first for
one pass over `--mlp-train` MNIST training examples so the point is not a random init), and ResNet-20
×1 (LayerNorm) on CIFAR-10 test (`--resnet-examples`, random init unless `--resnet-train-steps`).
Not a test: no thresholds; prints the measured numbers and ratios of this one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmclab.curvature.hessian import HessianOperator
from lmclab.curvature.trace import hessian_trace, hutchinson_trace, random_probe, t_interval
from lmclab.data import DeviceDataset
from lmclab.models import build_model, count_parameters
from lmclab.points import inner
from lmclab.training import train_step

DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data")  # ../shared/data beside the checkout
CANDIDATES = [
    ("double_backward", False),
    ("double_backward", True),
    ("forward_over_reverse", True),
    ("forward_over_reverse", False),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def pyhessian_probe(
    model: nn.Module,
    params: list[nn.Parameter],
    names: list[str],
    v: dict[str, torch.Tensor],
    data: DeviceDataset,
    batch_size: int,
    max_examples: int,
) -> float:
    """vᵀ H v, PyHessian's way: per batch build the graph, double backward, accumulate H_b v · |b|, ÷ N."""
    thv = [torch.zeros_like(p) for p in params]
    n = 0
    for x, y in data.batches(batch_size):
        if n >= max_examples:
            break
        x, y = x[: max_examples - n], y[: max_examples - n]
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=[v[k] for k in names])
        for acc, h in zip(thv, hv):
            acc.add_(h.detach(), alpha=len(y))
        n += len(y)
    return inner({k: h / n for k, h in zip(names, thv)}, v)


def calibrate(
    model: nn.Module,
    data: DeviceDataset,
    block: int,
    batch_size: int,
    device: torch.device,
    candidates: list[tuple[str, bool]],
) -> list[tuple[str, bool, float]]:
    """Seconds per HVP for each (method, vectorize) with `block` vectors over 2 batches (after a warm-up)."""
    sub = [next(data.batches(batch_size)) for _ in range(2)]
    out = []
    for method, vec in candidates:
        op = HessianOperator(model, None, sub, batch_size=batch_size, method=method, vectorize=vec)
        gen = torch.Generator().manual_seed(123)
        vs = [random_probe(op.params, gen, "rademacher") for _ in range(block)]
        HessianOperator(model, None, [(sub[0][0][:4], sub[0][1][:4])], method=method, vectorize=vec).matmat(vs[:2])
        dt, _ = timed(partial(op.matmat, vs), device)
        out.append((method, vec, dt / block))
    return out


def hvp_ratio(model: nn.Module, data: DeviceDataset, device: torch.device, repeat: int) -> dict[str, float]:
    """Median seconds of one gradient and one HVP per method on one batch of 50 (interleaved runs)."""
    x, y = next(data.batches(50))
    ops = {m: HessianOperator(model, None, [(x, y)], method=m) for m in ("double_backward", "forward_over_reverse")}
    v = random_probe(ops["double_backward"].params, torch.Generator().manual_seed(7), "rademacher")
    fm = ops["double_backward"].fm
    names = list(fm.params)

    def grad() -> object:
        leaves = [fm.params[k].detach().requires_grad_(True) for k in names]
        loss = F.cross_entropy(fm.logits(dict(zip(names, leaves)), x), y, reduction="sum")
        return torch.autograd.grad(loss, leaves)

    times: dict[str, list[float]] = {"gradient": [], "double_backward": [], "forward_over_reverse": []}
    for op in ops.values():  # warm-up
        op.matvec(v)
    grad()
    for _ in range(repeat):
        times["gradient"].append(timed(grad, device)[0])
        for m, op in ops.items():
            times[m].append(timed(partial(op.matvec, v), device)[0])
    return {k: statistics.median(t) for k, t in times.items()}


def lockstep(
    model: nn.Module,
    data: DeviceDataset,
    args: argparse.Namespace,
    target: float,
    examples: int,
    method: str,
    vectorize: bool,
    device: torch.device,
) -> dict[str, dict]:
    """lmclab's `hutchinson_trace` (block per pass) and PyHessian's way on the same probes, same rule.

    PyHessian's way runs inside lmclab's matmat on the very probes lmclab just used (its time is taken
    out of lmclab's), then goes on along the same seeded sequence if it needs more probes.
    """
    op = HessianOperator(
        model, None, data, batch_size=args.batch_size, max_examples=examples, method=method, vectorize=vectorize
    )
    ref = model.eval()
    names = [n for n, _ in ref.named_parameters()]
    params = [p for _, p in ref.named_parameters()]
    py = {"samples": [], "time": 0.0, "done": False}

    def py_step(v: dict[str, torch.Tensor]) -> None:
        if py["done"]:
            return
        dt, s = timed(lambda: pyhessian_probe(ref, params, names, v, data, args.batch_size, examples), device)
        py["time"] += dt
        py["samples"].append(s)
        n = len(py["samples"])
        mean, half = t_interval(py["samples"], 0.95)
        py["done"] = n >= args.max_probes or (n >= args.min_probes and half <= target * abs(mean))

    def matmat(vs: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        out = op.matmat(vs)
        for v in vs:
            py_step(v)
        return out

    before = py["time"]
    dt, est = timed(
        lambda: hutchinson_trace(
            None,
            op.params,
            matmat=matmat,
            block=args.block,
            probes=args.min_probes,
            target_ci_width=target,
            max_probes=args.max_probes,
            seed=args.seed,
        ),
        device,
    )
    lm = {"samples": est.samples, "time": dt - (py["time"] - before), "passes": op.passes}
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(est.n_probes):  # the probes lmclab drew, then PyHessian's way continues the sequence
        random_probe(op.params, gen, "rademacher")
    while not py["done"]:
        py_step(random_probe(op.params, gen, "rademacher"))
    py["passes"] = len(py["samples"])
    for r in (lm, py):
        r["mean"], r["half"] = t_interval(r["samples"], 0.95)
    return {"lmclab": lm, "pyhessian": py}


def _fit(model: nn.Module, data: DeviceDataset, optimizer: torch.optim.Optimizer) -> None:
    """One pass over `data` in batches of 128 with the trainer's own step."""
    model.train()
    for x, y in data.batches(128):
        train_step(model, optimizer, x, y)
    model.eval()


def train_mlp(model: nn.Module, device: torch.device, examples: int, data_dir: str) -> None:
    train = DeviceDataset.load("mnist", "train", data_dir=data_dir, device=device, subset=examples, progress=False)
    _fit(model, train, torch.optim.Adam(model.parameters(), 1e-3))


def train_resnet(model: nn.Module, device: torch.device, steps: int, data_dir: str) -> None:
    train = DeviceDataset.load("cifar10", "train", data_dir=data_dir, device=device, subset=steps * 128, progress=False)
    _fit(model, train, torch.optim.SGD(model.parameters(), 0.05, momentum=0.9))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "resnet20"], choices=["mlp", "resnet20"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-dir", default=DATA)
    ap.add_argument("--mlp-examples", type=int, default=1000)
    ap.add_argument("--mlp-train", type=int, default=20000, help="MNIST training examples for one Adam pass (0: init)")
    ap.add_argument("--mlp-target", type=float, default=0.1, help="relative CI half-width to reach")
    ap.add_argument("--resnet-examples", type=int, default=500)
    ap.add_argument("--resnet-train-steps", type=int, default=0)
    ap.add_argument("--resnet-target", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--block", type=int, default=10, help="lmclab probes per data pass")
    ap.add_argument("--min-probes", type=int, default=10)
    ap.add_argument("--max-probes", type=int, default=2000)
    ap.add_argument("--sketch", type=int, default=10, help="Hutch++ sketch columns (0: skip Hutch++)")
    ap.add_argument("--repeat", type=int, default=5, help="repeats of the batch-50 HVP timing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 avoids OpenMP stalls when other jobs share the cores)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    for name in args.models:
        torch.manual_seed(0)
        if name == "mlp":
            data = DeviceDataset.load(
                "mnist", "test", data_dir=args.data_dir, device=device, subset=args.mlp_examples, progress=False
            )
            model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10).to(device)
            if args.mlp_train:
                train_mlp(model, device, args.mlp_train, args.data_dir)
            examples, target, point = args.mlp_examples, args.mlp_target, f"after 1 Adam pass over {args.mlp_train}"
        else:
            data = DeviceDataset.load(
                "cifar10", "test", data_dir=args.data_dir, device=device, subset=args.resnet_examples, progress=False
            )
            model = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10, width=1).to(device)
            if args.resnet_train_steps:
                train_resnet(model, device, args.resnet_train_steps, args.data_dir)
            examples, target = args.resnet_examples, args.resnet_target
            point = f"after {args.resnet_train_steps} SGD steps" if args.resnet_train_steps else "random init"
        model.eval()
        print(
            f"\n== {name}: {count_parameters(model):,} parameters, {examples} examples, batch {args.batch_size}, "
            f"{point}"
        )

        r = hvp_ratio(model, data, device, args.repeat)
        print(
            f"batch 50, one vector (median of {args.repeat}): gradient {r['gradient'] * 1e3:.1f} ms, "
            f"double backward {r['double_backward'] * 1e3:.1f} ms "
            f"({r['double_backward'] / r['gradient']:.2f}× grad), "
            f"forward-over-reverse {r['forward_over_reverse'] * 1e3:.1f} ms "
            f"({r['forward_over_reverse'] / r['gradient']:.2f}× grad); "
            f"double-backward / forward-over-reverse = {r['double_backward'] / r['forward_over_reverse']:.2f}"
        )

        cal = calibrate(model, data, args.block, args.batch_size, device, CANDIDATES)
        for method, vec, t in cal:
            print(
                f"calibration ({args.block} vectors, 2 batches): {method:21s} vectorize={vec!s:5s} "
                f"{t * 1e3:8.1f} ms per HVP per 2 batches"
            )
        method, vec, _ = min(cal, key=lambda c: c[2])
        print(f"chosen: {method}, vectorize={vec}")

        res = lockstep(model, data, args, target, examples, method, vec, device)
        for k, v in res.items():
            n = len(v["samples"])
            print(
                f"{k:9s}: {n:4d} probes in {v['passes']:4d} data passes, {v['time']:8.2f} s "
                f"({v['time'] / n:.3f} s/probe), "
                f"trace {v['mean']:.6g} ± {v['half']:.3g} (relative half-width {v['half'] / abs(v['mean']):.3f})"
            )
        lm, ph = res["lmclab"], res["pyhessian"]
        print(
            f"time to relative half-width ≤ {target}: PyHessian's way / lmclab = {ph['time'] / lm['time']:.2f}× "
            f"(per probe {ph['time'] / len(ph['samples']) / (lm['time'] / len(lm['samples'])):.2f}×)"
        )

        if args.sketch:
            dt, est = timed(
                partial(
                    hessian_trace,
                    model,
                    None,
                    data,
                    method="hutchpp",
                    sketch=args.sketch,
                    probes=2 * args.sketch + args.min_probes,
                    target_ci_width=target,
                    max_probes=args.max_probes,
                    probes_per_pass=args.block,
                    batch_size=args.batch_size,
                    max_examples=examples,
                    hvp_method=method,
                    vectorize=vec,
                    seed=args.seed,
                ),
                device,
            )
            print(
                f"lmclab Hutch++ (sketch {args.sketch}, adaptive remainder): {est.n_matvecs} HVPs, {dt:.2f} s, "
                f"trace {est.estimate:.6g} ± {est.half_width:.3g} (relative {est.relative_half_width:.3f}); "
                f"PyHessian's way / Hutch++ = {ph['time'] / dt:.2f}×"
            )


if __name__ == "__main__":
    main()
