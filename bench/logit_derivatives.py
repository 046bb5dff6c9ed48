"""Directional derivatives: one nested-jvp pass for all logits vs. the per-(input, class) HVP procedure.

(1) Logit Taylor coefficients, orders 0–2, for every test input and every class.
    one pass  — ``lmclab.curvature.derivatives.logit_derivatives``: per batch of 50, one nested
                forward-mode pass over a scalar t gives z, dz/dt, d²z/dt² of all N×C logits;
    per-(n,c) — the procedure the paper describes: for each input n one forward pass, then for each
                class c the gradient ∇z_c (backward, create_graph) and its directional second
                derivative dᵀ(∇²z_c d) by double backward (written here as the baseline).
    The per-(n,c) procedure is timed on ``--pair-inputs`` inputs, the one-pass method on
    ``--pass-inputs``; both are extrapolated linearly to ``--full`` inputs (the 10,000-image test set).
    Both are checked to agree on the common inputs (max |difference| relative to max |coefficient|).
(2) Loss derivatives of order 2, ``method="jvp"`` vs ``"hvp"`` (batches of 50): the measurement behind
    ``derivatives.AUTO_ORDER2``; the two alternate ``--repeat`` times after a warm-up, fastest run reported
    (robust to other processes on a shared CPU).

Models (random init; a direction d = θ_B − θ_A between two random inits, scaled by 0.1 so the
logits move but do not explode): MLP 784-512-512-512-10 on real MNIST test images
(../shared/data) and ResNet-20 ×1 (LayerNorm; BatchNorm in eval mode too) on random 3×32×32 inputs.

    python bench/logit_derivatives.py                 # everything (a few minutes on 2 CPU cores)
    python bench/logit_derivatives.py --only-loss     # just (2)
    python bench/logit_derivatives.py --device cuda

Not a test: no thresholds; prints ratios measured in this one run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lmclab.curvature.derivatives import ieee_fp32, logit_derivatives, loss_derivatives
from lmclab.curvature.functional import functional_model
from lmclab.data import DatasetInfo, DeviceDataset
from lmclab.models import build_model, count_parameters
from lmclab.points import direction, parameter_names

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Wall seconds of one call of ``fn`` and its result."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def per_input_class_hvp(
    model: nn.Module, theta: dict[str, torch.Tensor], d: dict[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """(N, C, 3) by the per-(input, class) procedure: ∇z_c·d, then dᵀ(∇²z_c d) by double backward."""
    fm = functional_model(model, theta)
    names = list(fm.params)
    leaves = [fm.params[k].detach().requires_grad_(True) for k in names]
    dirs = [d[k].to(leaves[0].device) for k in names]
    rows = []
    for n in range(len(x)):
        z = fm.logits(dict(zip(names, leaves)), x[n : n + 1])[0]
        per_class = []
        for c in range(z.numel()):
            g = torch.autograd.grad(z[c], leaves, create_graph=True, retain_graph=True, allow_unused=True)
            gd = sum((gi * v).sum() for gi, v in zip(g, dirs) if gi is not None)
            h = torch.autograd.grad(gd, leaves, retain_graph=True, allow_unused=True)
            hdd = sum((hi * v).sum() for hi, v in zip(h, dirs) if hi is not None)
            per_class.append(torch.stack([z[c].detach(), gd.detach(), hdd.detach()]))
        rows.append(torch.stack(per_class))
    return torch.stack(rows)


def random_dataset(n: int, shape: tuple[int, int, int], classes: int, device: torch.device) -> DeviceDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,), generator=g)
    info = DatasetInfo(
        "random",
        classes,
        shape,
        (0.5,) * shape[0],
        (0.25,) * shape[0],
        False,
        tuple(str(i) for i in range(classes)),
        "test",
    )
    return DeviceDataset(images.to(device), labels.to(device), info)


def setup(
    name: str, device: torch.device, n_data: int, data_dir: Path = DATA
) -> tuple[str, nn.Module, dict, dict, DeviceDataset]:
    if name == "mlp":
        shape, kw, label = (1, 28, 28), {}, "MLP 784-512-512-512-10, MNIST test"
        try:
            data = DeviceDataset.load("mnist", "test", data_dir=data_dir, device=device, download=False, progress=False)
        except Exception as err:  # e.g. a machine without ../shared/data
            print(f"(MNIST not found in {data_dir}: {type(err).__name__}; using random 1x28x28 images)")
            data, label = random_dataset(10_000, shape, 10, device), "MLP 784-512-512-512-10, random 1x28x28"
    else:
        norm = name.split("-")[1]
        data = random_dataset(n_data, (3, 32, 32), 10, device)
        shape, kw, label = (3, 32, 32), {"norm": norm}, f"ResNet-20 x1 {norm}, random 3x32x32"
        name = "resnet20"
    torch.manual_seed(0)
    model_a = build_model(name, input_shape=shape, num_classes=10, **kw).to(device).eval()
    torch.manual_seed(1)
    model_b = build_model(name, input_shape=shape, num_classes=10, **kw).to(device).eval()
    theta_a = model_a.state_dict()
    d = {k: 0.1 * v for k, v in direction(theta_a, model_b.state_dict(), parameter_names(model_a)).items()}
    return f"{label} ({count_parameters(model_a):,} params)", model_a, theta_a, d, data


def bench_logits(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Time both procedures, check they agree; prints the lines and returns the numbers."""
    pass_inputs = args.pass_inputs if name == "mlp" else args.resnet_pass_inputs
    label, model, theta, d, data = setup(name, device, max(pass_inputs, args.pair_inputs), args.data_dir)
    classes = data.info.num_classes
    x_pair = data.normalize(data.images[: args.pair_inputs])
    logit_derivatives(model, theta, d, data, order=2, max_examples=args.batch_size)  # warm-up
    t_pass, coeffs = timed(
        lambda: logit_derivatives(model, theta, d, data, order=2, batch_size=args.batch_size, max_examples=pass_inputs),
        device,
    )
    with ieee_fp32(device):  # as logit_derivatives does: no TF32 on CUDA
        t_pair, ref = timed(lambda: per_input_class_hvp(model, theta, d, x_pair), device)
    common: torch.Tensor = coeffs[: args.pair_inputs]  # type: ignore[index]
    scale = ref.abs().amax(dim=(0, 1)).clamp_min(1e-30)  # type: ignore[union-attr]
    err = ((common - ref).abs().amax(dim=(0, 1)) / scale).tolist()
    full_pass = t_pass / pass_inputs * args.full
    full_pair = t_pair / (args.pair_inputs * classes) * args.full * classes
    print(f"\n[logits, orders 0-2] {label}")
    print(
        f"  one nested-jvp pass : {t_pass:8.2f} s for {pass_inputs} inputs x {classes} classes "
        f"-> {full_pass:10.1f} s for {args.full:,}"
    )
    print(
        f"  per-(input,class)   : {t_pair:8.2f} s for {args.pair_inputs} inputs x {classes} classes "
        f"-> {full_pair:10.1f} s for {args.full:,} ({full_pair / 3600:.2f} h)"
    )
    print(
        f"  ratio per-(n,c) / one pass: {full_pair / full_pass:8.1f}x   "
        f"agreement (max rel. diff, orders 0,1,2): {', '.join(f'{e:.1e}' for e in err)}"
    )
    return {
        "model": label,
        "one_pass_s": t_pass,
        "pass_inputs": pass_inputs,
        "per_pair_s": t_pair,
        "pair_inputs": args.pair_inputs,
        "extrapolated_to": args.full,
        "ratio": full_pair / full_pass,
        "max_rel_diff_orders_0_1_2": err,
    }


def bench_loss(name: str, args: argparse.Namespace, device: torch.device) -> None:
    n = args.loss_batches * args.batch_size
    label, model, theta, d, data = setup(name, device, n, args.data_dir)
    runs: dict[str, list[float]] = {"jvp": [], "hvp": []}
    values = {}
    for i in range(args.repeat + 1):  # interleaved, so both see the same machine load; call 0 is a warm-up
        for method in runs:
            t, r = timed(
                lambda m=method: loss_derivatives(
                    model, theta, d, data, order=2, method=m, batch_size=args.batch_size, max_examples=n
                ),
                device,
            )
            values[method] = r.coefficients  # type: ignore[union-attr]
            if i:
                runs[method].append(t / args.loss_batches)
    times = {m: min(ts) for m, ts in runs.items()}
    agree = (values["jvp"] - values["hvp"]).abs().max().item()
    print(
        f"[loss, order 2] {label}: per batch of {args.batch_size} (fastest of {args.repeat}): "
        f"jvp {1e3 * times['jvp']:7.1f} ms, hvp {1e3 * times['hvp']:7.1f} ms "
        f"(hvp/jvp = {times['hvp'] / times['jvp']:.2f}; max |coef diff| {agree:.1e})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", type=Path, default=DATA, help="where MNIST lives (random images if absent)")
    p.add_argument(
        "--models", nargs="+", default=["mlp", "resnet20-layernorm"], help="mlp, resnet20-layernorm, resnet20-batchnorm"
    )
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--pair-inputs", type=int, default=20, help="inputs for the per-(input, class) procedure")
    p.add_argument("--pass-inputs", type=int, default=1000, help="inputs for the one-pass method (MLP)")
    p.add_argument("--resnet-pass-inputs", type=int, default=500, help="inputs for the one-pass method (ResNet)")
    p.add_argument("--full", type=int, default=10_000, help="extrapolate to this many inputs")
    p.add_argument("--loss-batches", type=int, default=4, help="batches per timed loss_derivatives call")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--only-loss", action="store_true")
    p.add_argument("--only-logits", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    if not args.only_logits:
        models = args.models if args.only_loss else [*args.models, "resnet20-batchnorm"]
        for name in dict.fromkeys(models):
            bench_loss(name, args, device)
    if not args.only_loss:
        for name in args.models:
            bench_logits(name, args, device)


if __name__ == "__main__":
    main()
