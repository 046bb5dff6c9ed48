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

Against PyHessian itself (``--vs-pyhessian``; install it into the project venv WITHOUT its dependencies,
which would pull another torch: ``.venv/bin/pip install --no-deps pyhessian==0.1``; it is not a project
dependency): the same trained MLP weights and the same `--pyhessian-examples` MNIST test images, each side
at its best CPU settings, measured in one run:
- PyHessian: single-batch mode (``hessian(model, CrossEntropyLoss(), data=(x, y))``: its gradient graph is
  built once and reused by every product); trace from its own Hutchinson loop (``trace(maxIter=1)`` per
  probe, Rademacher probes from torch's global RNG), stopped when the Student-t 95% relative half-width is
  ≤ `--mlp-target` (checked after each probe, at least `--min-probes`); top eigenvalue by its power
  iteration (``eigenvalues(tol=--power-tol)``).
- lmclab: `HessianOperator` with all images in one batch (its graph kept across products,
  ``reuse_graph``): `hessian_trace` Hutchinson (`--block` probes per pass) and adaptive Hutch++
  (`--sketch` columns) to the same target; `top_eigenvalue` (Lanczos) at `--lanczos-tol`.
- lmclab with the GGN control variate (``hessian_trace(control_variate="ggn")``): tr H = tr G exactly (per-sample
  norms of C back-propagated vectors) + Hutchinson on R = H − G (one double backward per probe on the kept
  graph); its "HVPs" are R products, its time includes tr G.
Matched accuracy: both eigenvalues are compared with a tight Lanczos reference (tol 1e-10). Then, over
`--seeds` seeds with each tolerance fixed in advance at `--power-tol`: PyHessian's power iteration vs
`top_eigenvalue(error_tol=...)` (Lanczos stopping on its estimated eigenvalue error) from a random start
and from the gradient (read off the kept graph).

    .venv/bin/python bench/hessian_trace.py --vs-pyhessian --threads 1
    python3 bench/hessian_trace.py --vs-pyhessian --device cuda   # on a GPU (PyHessian with cuda=True; each side
                                                                  # warmed up once first); bench/gpu_session.py's
                                                                  # pyhessian stage runs the same functions

`vs_pyhessian` returns what it prints: {"trace": pyhessian_trace(...), "top_eigenvalue": pyhessian_eigen(...)},
each with "ratio" (PyHessian's time / lmclab's: the fastest lmclab trace method; the eigenvalue over the seeds from
the start whose errors are within PyHessian's, else the one-run matched tolerance).

Models: Git Re-Basin's MLP (784-512-512-512-10) on MNIST test (`--mlp-examples`, trained first for
one pass over `--mlp-train` MNIST training examples so the point is not a random init), and ResNet-20
×1 (LayerNorm) on CIFAR-10 test (`--resnet-examples`, random init unless `--resnet-train-steps`).
Not a test: no thresholds; prints the measured numbers and ratios of this one run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmclab.curvature.hessian import HessianOperator
from lmclab.curvature.trace import (
    TraceEstimate,
    hessian_trace,
    hutchinson_trace,
    lanczos_top,
    random_probe,
    t_interval,
    top_eigenvalue,
)
from lmclab.data import DeviceDataset
from lmclab.models import build_model, count_parameters
from lmclab.points import flatten, inner, unflatten
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


def vs_pyhessian(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """PyHessian 0.1 itself vs lmclab on the same weights and images: trace to a CI width, top eigenvalue.

    Prints as it goes and returns {"trace": pyhessian_trace(...), "top_eigenvalue": pyhessian_eigen(...)}."""
    return {
        "trace": pyhessian_trace(model, args, device),
        "top_eigenvalue": pyhessian_eigen(model, args, device),
    }


def _pyhessian_setup(
    model: nn.Module, args: argparse.Namespace, device: torch.device
) -> tuple[Any, nn.Module, DeviceDataset, torch.Tensor, torch.Tensor]:
    """(pyhessian.hessian module, model float32 in eval mode, the `--pyhessian-examples` MNIST test images on
    `device`, and those images and labels as one batch)."""
    module = importlib.import_module("pyhessian.hessian")  # optional: see the module docstring
    n = args.pyhessian_examples
    data = DeviceDataset.load("mnist", "test", data_dir=args.data_dir, device=device, subset=n, progress=False)
    x, y = next(iter(data.batches(n)))
    return module, model.float().eval(), data, x, y


def pyhessian_trace(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Trace to a relative CI half-width of `--mlp-target` over `--seeds` seeds (interleaved, times summed):
    PyHessian's Hutchinson vs lmclab's Hutchinson, Hutch++ and GGN control variate. On a GPU each side is
    warmed up once first. ratio: PyHessian's time / the fastest lmclab method's."""
    module, model, data, x, y = _pyhessian_setup(model, args, device)
    PyHessian, cuda = module.hessian, device.type == "cuda"
    n, target = args.pyhessian_examples, args.mlp_target
    print(
        f"\n== vs PyHessian 0.1 on {device}: MLP, {n} MNIST test images in one batch, "
        f"target relative half-width {target}"
    )

    def py_trace(seed: int, max_probes: int) -> tuple[list[float], float]:
        torch.manual_seed(seed)
        sync(device)
        start = time.perf_counter()
        h = PyHessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=cuda)
        samples: list[float] = []
        while len(samples) < max_probes:
            samples += h.trace(maxIter=1, tol=-1.0)
            if len(samples) >= args.min_probes:
                mean, half = t_interval(samples, 0.95)
                if half <= target * abs(mean):
                    break
        sync(device)
        dt = time.perf_counter() - start
        model.zero_grad(set_to_none=True)  # PyHessian leaves create_graph gradients in .grad
        return samples, dt

    def lm_trace(name: str, seed: int, max_probes: int) -> tuple[TraceEstimate, float]:
        method = "hutchinson" if name == "hutchinson-ggn" else name
        sync(device)
        start = time.perf_counter()
        est = hessian_trace(
            model,
            None,
            data,
            method=method,
            control_variate="ggn" if name == "hutchinson-ggn" else None,
            sketch=args.sketch if method == "hutchpp" else None,
            probes=2 * args.sketch + args.min_probes if method == "hutchpp" else args.min_probes,
            target_ci_width=target,
            max_probes=max(max_probes, 2 * args.sketch + args.min_probes if method == "hutchpp" else 0),
            probes_per_pass=args.block,
            batch_size=n,
            max_examples=n,
            seed=seed,
        )
        sync(device)
        return est, time.perf_counter() - start

    seeds = range(args.seed, args.seed + args.seeds)
    names = ("hutchinson", "hutchpp", "hutchinson-ggn") if args.sketch else ("hutchinson", "hutchinson-ggn")
    if cuda:  # kernels, cuBLAS handles and the caching allocator: a one-time cost neither side should pay
        py_trace(args.seed, args.min_probes)
        for method in names:
            lm_trace(method, args.seed, args.min_probes)
    totals = {"pyhessian": [0.0, 0], **{m: [0.0, 0] for m in names}}
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:  # interleaved, so drifting load hits all sides alike
        samples, t_py = py_trace(seed, args.max_probes)
        mean, half = t_interval(samples, 0.95)
        totals["pyhessian"][0] += t_py
        totals["pyhessian"][1] += len(samples)
        per_seed.append({"seed": seed, "pyhessian": {"hvps": len(samples), "s": t_py, "trace": mean, "half": half}})
        print(
            f"seed {seed} PyHessian trace    : {len(samples):4d} HVPs, {t_py:7.2f} s, trace {mean:.6g} ± {half:.3g} "
            f"(relative {half / abs(mean):.3f})"
        )
        for method in names:
            est, dt = lm_trace(method, seed, args.max_probes)
            totals[method][0] += dt
            totals[method][1] += est.n_matvecs
            per_seed[-1][method] = {"hvps": est.n_matvecs, "s": dt, "trace": est.estimate, "half": est.half_width}
            print(
                f"seed {seed} lmclab {method:14s}: {est.n_matvecs:4d} HVPs, {dt:7.2f} s, trace {est.estimate:.6g} ± "
                f"{est.half_width:.3g} (relative {est.relative_half_width:.3f})"
            )
    t_py, k_py = totals["pyhessian"]
    ratios = {}
    for method in names:
        t_lm, k_lm = totals[method]
        ratios[method] = t_py / t_lm
        print(
            f"trace over {args.seeds} seeds: PyHessian {k_py} HVPs {t_py:.2f} s ({t_py / k_py:.3f} s/HVP), "
            f"lmclab {method} {k_lm} HVPs {t_lm:.2f} s ({t_lm / k_lm:.3f} s/HVP): "
            f"PyHessian / lmclab = {ratios[method]:.2f}×"
        )
    best = max(ratios, key=ratios.__getitem__)
    return {
        "model": "mlp",
        "examples": n,
        "target_half_width": target,
        "seeds": args.seeds,
        "times_s": {k: t for k, (t, _) in totals.items()},
        "hvps": {k: c for k, (_, c) in totals.items()},
        "ratios": ratios,
        "best": best,
        "ratio": ratios[best],
        "per_seed": per_seed,
    }


def pyhessian_eigen(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Top eigenvalue: PyHessian's power iteration vs lmclab's Lanczos at matched accuracy (one run, against a
    tight Lanczos reference), then `eigen_seeds`. ratio: PyHessian / lmclab over the seeds, from the start whose
    largest error is within PyHessian's smallest (the faster if both are; else the one-run matched ratio)."""
    module, model, data, x, y = _pyhessian_setup(model, args, device)
    n, cuda = args.pyhessian_examples, device.type == "cuda"
    ref = top_eigenvalue(model, None, data, batch_size=n, max_examples=n, tol=1e-10)
    print(f"top eigenvalue reference (Lanczos, tol 1e-10): {ref:.8g}")
    count = [0]
    original = module.hessian_vector_product

    def counted(*a: object) -> object:
        count[0] += 1
        return original(*a)

    module.hessian_vector_product = counted
    torch.manual_seed(args.seed)
    sync(device)
    start = time.perf_counter()
    h = module.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=cuda)
    py_top = h.eigenvalues(maxIter=args.power_iterations, tol=args.power_tol)[0][0]
    sync(device)
    t_py = time.perf_counter() - start
    module.hessian_vector_product = original
    del h
    model.zero_grad(set_to_none=True)
    err_py = abs(py_top - ref) / abs(ref)
    print(
        f"PyHessian power (tol {args.power_tol:g}): {py_top:.8g}, {count[0]} HVPs, "
        f"relative error {err_py:.2e}, {t_py:.2f} s"
    )
    one_run: dict[str, Any] = {
        "pyhessian": {"value": py_top, "hvps": count[0], "error": err_py, "seconds": t_py},
        "lanczos": [],
    }
    matched = None
    for tol in args.lanczos_tols:
        sync(device)
        start = time.perf_counter()
        op = HessianOperator(model, None, data, batch_size=n, max_examples=n)
        like = op.params

        def mv(v: torch.Tensor, op: HessianOperator = op, like: dict = like) -> torch.Tensor:
            return flatten(op.matvec(unflatten(v, like))).detach().cpu().double()  # basis on the CPU, as top_eigenvalue

        v0 = torch.from_numpy(np.random.default_rng(args.seed).standard_normal(op.num_parameters))
        lm_top, k = lanczos_top(mv, v0, tol, 1000)
        sync(device)
        t_lm = time.perf_counter() - start
        err = abs(lm_top - ref) / abs(ref)
        if err <= err_py and matched is None:
            matched = (tol, t_lm)
        one_run["lanczos"].append({"tol": tol, "value": lm_top, "hvps": k, "error": err, "seconds": t_lm})
        print(
            f"lmclab Lanczos (tol {tol:g}): {lm_top:.8g}, {k} HVPs, relative error {err:.2e}, {t_lm:.2f} s; "
            f"PyHessian / lmclab = {t_py / t_lm:.2f}×"
        )
    if matched:
        one_run["matched"] = {"tol": matched[0], "ratio": t_py / matched[1]}
        print(
            f"top eigenvalue at matched accuracy (loosest Lanczos tol {matched[0]:g} with error ≤ PyHessian's "
            f"{err_py:.1e}): PyHessian / lmclab = {t_py / matched[1]:.2f}×"
        )
    seeds = eigen_seeds(model, module, x, y, data, ref, args, device)
    fair = {how: s["ratio"] for how, s in seeds.items() if how != "pyhessian" and s["matched"]}
    if fair:
        basis = max(fair, key=fair.__getitem__)
        ratio, why = fair[basis], f"{args.seeds} seeds, tol fixed in advance, {basis} start"
    else:
        ratio = one_run["matched"]["ratio"] if matched else None
        why = "one run, loosest Lanczos tol matching PyHessian's error" if matched else "accuracy never matched"
    return {
        "model": "mlp",
        "examples": n,
        "reference": ref,
        "one_run": one_run,
        "seeds": seeds,
        "ratio": ratio,
        "ratio_basis": why,
    }


def eigen_seeds(
    model: nn.Module,
    module: object,
    x: torch.Tensor,
    y: torch.Tensor,
    data: DeviceDataset,
    ref: float,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """Top eigenvalue over `--seeds` seeds, interleaved, each side's tolerance fixed in advance at
    `--power-tol`: PyHessian's power iteration (stops on the relative change of the eigenvalue) vs
    `top_eigenvalue(error_tol=--power-tol)` (Lanczos stopping on its estimated relative eigenvalue error),
    from a random start and from the gradient. Times include building each side's gradient graph.
    Returns per side {seconds, hvps, errors} (lmclab's starts also ratio = PyHessian / lmclab and matched:
    its largest error ≤ PyHessian's smallest)."""
    n = args.pyhessian_examples
    count = [0]
    original_hvp = module.hessian_vector_product  # type: ignore[attr-defined]
    original_matmat = HessianOperator.matmat

    def counted_hvp(*a: object) -> object:
        count[0] += 1
        return original_hvp(*a)

    def counted_matmat(self: HessianOperator, vs: list) -> list:
        count[0] += len(vs)
        return original_matmat(self, vs)

    rows: dict[str, list[tuple[float, int, float]]] = {"pyhessian": [], "random": [], "gradient": []}
    for seed in range(args.seed, args.seed + args.seeds):
        count[0] = 0
        module.hessian_vector_product = counted_hvp  # type: ignore[attr-defined]
        torch.manual_seed(seed)
        sync(device)
        start = time.perf_counter()
        h = module.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=device.type == "cuda")  # type: ignore[attr-defined]
        lam = h.eigenvalues(maxIter=args.power_iterations, tol=args.power_tol)[0][0]
        sync(device)
        rows["pyhessian"].append((time.perf_counter() - start, count[0], abs(lam - ref) / abs(ref)))
        module.hessian_vector_product = original_hvp  # type: ignore[attr-defined]
        del h
        model.zero_grad(set_to_none=True)
        for how in ("random", "gradient"):
            count[0] = 0
            HessianOperator.matmat = counted_matmat  # type: ignore[method-assign]
            sync(device)
            start = time.perf_counter()
            lam = top_eigenvalue(
                model, None, data, batch_size=n, max_examples=n, seed=seed, start=how, error_tol=args.power_tol
            )
            sync(device)
            rows[how].append((time.perf_counter() - start, count[0], abs(lam - ref) / abs(ref)))
            HessianOperator.matmat = original_matmat  # type: ignore[method-assign]
        print(
            f"seed {seed} top eigenvalue: "
            + ", ".join(f"{k} {r[-1][1]} HVPs {r[-1][0]:.2f} s error {r[-1][2]:.1e}" for k, r in rows.items())
        )
    out: dict[str, dict[str, Any]] = {
        k: {"seconds": sum(r[0] for r in v), "hvps": sum(r[1] for r in v), "errors": [r[2] for r in v]}
        for k, v in rows.items()
    }
    t_py = out["pyhessian"]["seconds"]
    best_py = min(r[2] for r in rows["pyhessian"])
    for how in ("random", "gradient"):
        t_lm = out[how]["seconds"]
        worst = max(r[2] for r in rows[how])
        out[how].update(ratio=t_py / t_lm, matched=worst <= best_py)
        print(
            f"top eigenvalue over {args.seeds} seeds, tol {args.power_tol:g} both: PyHessian power "
            f"{sum(r[1] for r in rows['pyhessian'])} HVPs {t_py:.2f} s, lmclab Lanczos ({how} start, error_tol) "
            f"{sum(r[1] for r in rows[how])} HVPs {t_lm:.2f} s: PyHessian / lmclab = {t_py / t_lm:.2f}×; "
            f"lmclab's largest error {worst:.1e} {'≤' if worst <= best_py else '>'} "
            f"PyHessian's smallest {best_py:.1e}"
        )
    return out


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


def setup_model(
    name: str, args: argparse.Namespace, device: torch.device
) -> tuple[nn.Module, DeviceDataset, int, float, str]:
    """(model in eval mode, its test data, examples, target relative half-width, where the point is) for
    "mlp" (MNIST test, after one Adam pass over `--mlp-train`) or "resnet20" (×1 LN, CIFAR-10 test)."""
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
    return model.eval(), data, examples, target, point


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
    ap.add_argument("--vs-pyhessian", action="store_true", help="only the comparison with PyHessian 0.1 (MLP)")
    ap.add_argument("--pyhessian-examples", type=int, default=2000)
    ap.add_argument("--power-tol", type=float, default=1e-3, help="PyHessian power iteration tol (its default)")
    ap.add_argument("--power-iterations", type=int, default=1000)
    ap.add_argument("--lanczos-tols", type=float, nargs="+", default=[0.3, 0.1, 0.03, 0.01, 1e-3])
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the trace comparison (times summed)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    if args.vs_pyhessian:
        load = os.getloadavg()
        print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
        torch.manual_seed(0)
        model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10).to(device)
        if args.mlp_train:
            train_mlp(model, device, args.mlp_train, args.data_dir)
        vs_pyhessian(model, args, device)
        return
    for name in args.models:
        model, data, examples, target, point = setup_model(name, args, device)
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
