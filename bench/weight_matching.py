"""Weight matching speed: lmclab's incremental torch implementation vs. a straightforward reference.

Reference (written here, from the published algorithm's description): for every group step, apply
the whole current permutation to a float64 NumPy copy of θ_B, undo the group's own permutation on
its axes, and build S_P = Σ_{(t, a) ∈ P} A_t^(a) (B̃_t^(a))ᵀ from that copy; scipy's assignment
solver; same group order (the same seeded torch.Generator) and the same acceptance rule.
lmclab: `lmclab.align.weight_matching` (float32 torch on the device, per-tensor caches of θ_B
permuted on the other axes, updated incrementally).

Pairs are two independent random inits (seeds 0 and 1) of ResNet-20 (LayerNorm by default) on
CIFAR-shaped inputs; the spec comes from `lmclab.permutation.derive_spec`.

    python bench/weight_matching.py                    # CPU: widths ×1, ×4, ×8
    python bench/weight_matching.py --widths 1 4       # fewer widths
    python bench/weight_matching.py --device cuda      # lmclab on the GPU, widths ×1 … ×32
                                                       # (the reference always runs on the CPU)

Prints one line per width: seconds for each (fastest of --repeat runs), their ratio, sweeps, and whether both
found the same permutation (objectives Σ_t ⟨θ_A[t], π(θ_B)[t]⟩ in float64 otherwise). Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

import lmclab.permutation as lp
from lmclab.align import weight_matching
from lmclab.models import build_model, count_parameters
from lmclab.permutation import Permutation, PermutationSpec


def _index(length: int, perm: np.ndarray, block: int, offset: int) -> np.ndarray:
    """Index vector along an axis of `length` entries moving the units [offset, offset + n·block)."""
    idx = np.arange(length)
    idx[offset : offset + len(perm) * block] = (perm[:, None] * block + np.arange(block)).reshape(-1) + offset
    return idx


def _apply_all(
    b: Mapping[str, np.ndarray], spec: PermutationSpec, perm: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    out = dict(b)
    for g in spec.groups:
        for ax in g.axes:
            if ax.tensor in out:
                t = out[ax.tensor]
                out[ax.tensor] = np.take(
                    t, _index(t.shape[ax.axis], perm[g.name], ax.block, getattr(ax, "offset", 0)), axis=ax.axis
                )
    return out


def reference_weight_matching(
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    *,
    seed: int = 0,
    max_sweeps: int = 100,
) -> tuple[Permutation, int]:
    """Coordinate descent with every cost matrix rebuilt from a fully permuted float64 copy of θ_B."""
    names = [t for t in spec.axes_by_tensor() if params_a[t].is_floating_point()]
    a = {t: params_a[t].detach().cpu().double().numpy() for t in names}
    b = {t: params_b[t].detach().cpu().double().numpy() for t in names}
    perm = {g.name: np.arange(g.size) for g in spec.groups}
    gen = torch.Generator().manual_seed(seed)
    sweeps = 0  # sweeps run (returned)
    for _ in range(max_sweeps):
        sweeps += 1
        changed = False
        for i in torch.randperm(len(spec.groups), generator=gen).tolist():
            g = spec.groups[i]
            if g.size < 2:
                continue
            pb = _apply_all(b, spec, perm)  # π(θ_B), the whole model
            undo = np.argsort(perm[g.name])
            s = np.zeros((g.size, g.size))
            for ax in g.axes:
                if ax.tensor not in a:
                    continue
                off, rows = getattr(ax, "offset", 0), g.size * ax.block
                w_b = pb[ax.tensor]
                w_b = np.take(
                    w_b, _index(w_b.shape[ax.axis], undo, ax.block, off), axis=ax.axis
                )  # P's own axis unpermuted
                w_a = np.moveaxis(a[ax.tensor], ax.axis, 0)[off : off + rows].reshape(g.size, -1)
                s += w_a @ np.moveaxis(w_b, ax.axis, 0)[off : off + rows].reshape(g.size, -1).T
            rows, cols = linear_sum_assignment(s, maximize=True)
            new = np.empty(g.size, dtype=np.int64)
            new[rows] = cols
            old_val = s[np.arange(g.size), perm[g.name]].sum()
            new_val = s[np.arange(g.size), new].sum()
            if new_val > old_val + 1e-12 * abs(old_val):
                perm[g.name] = new
                changed = True
        if not changed:
            break
    return Permutation({k: torch.from_numpy(v) for k, v in perm.items()}), sweeps


def objective(
    params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor], spec: PermutationSpec, perm: Permutation
) -> float:
    pb = perm.apply(params_b, spec)
    return float(
        sum(
            (params_a[t].double() * pb[t].double()).sum()
            for t in spec.axes_by_tensor()
            if params_a[t].is_floating_point()
        )
    )


def _best_of(repeat: int, fn, sync: bool = False):  # type: ignore[no-untyped-def]
    """(result of the last call, fastest wall time in seconds) over `repeat` calls."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def bench_width(width: int, norm: str, device: torch.device, reference: bool, max_sweeps: int, repeat: int) -> None:
    shape = (3, 32, 32)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model("resnet20", input_shape=shape, num_classes=10, width=width, norm=norm))
    spec = lp.derive_spec(models[0], torch.randn(2, *shape))
    pa, pb = ({k: v.detach().to(device) for k, v in m.state_dict().items()} for m in models)
    nparams = count_parameters(models[0])

    if device.type == "cuda":  # warm up kernels and the allocator
        weight_matching(pa, pb, spec, max_sweeps=1)
        torch.cuda.synchronize()
    res, t_lmc = _best_of(
        repeat, lambda: weight_matching(pa, pb, spec, seed=0, max_sweeps=max_sweeps), sync=device.type == "cuda"
    )
    line = (
        f"resnet20-{norm} x{width:<2} ({nparams / 1e6:6.2f}M params, {len(spec.groups)} groups) "
        f"lmclab[{device.type}]: {t_lmc:8.2f} s, {res.sweeps} sweeps"
    )
    if not reference:
        print(line + "   reference: skipped", flush=True)
        return
    ca, cb = ({k: v.cpu() for k, v in p.items()} for p in (pa, pb))
    (ref_perm, ref_sweeps), t_ref = _best_of(
        repeat, lambda: reference_weight_matching(ca, cb, spec, seed=0, max_sweeps=max_sweeps)
    )
    same = ref_perm == res.perm
    line += (
        f"   reference[cpu f64]: {t_ref:8.2f} s, {ref_sweeps} sweeps   ratio {t_ref / t_lmc:6.1f}x   "
        f"same permutation: {same}"
    )
    if not same:
        line += (
            f" (objective lmclab {objective(ca, cb, spec, res.perm):.10g}, "
            f"reference {objective(ca, cb, spec, ref_perm):.10g})"
        )
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=None,
        help="width multipliers (default 1 4 8 on cpu; 1 4 8 16 32 on cuda)",
    )
    parser.add_argument("--norm", default="layernorm", choices=("layernorm", "batchnorm"))
    parser.add_argument("--max-sweeps", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2, help="time the fastest of this many runs of each")
    parser.add_argument(
        "--reference-max-width", type=int, default=32, help="skip the (slow) reference above this width"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    widths = args.widths or ([1, 4, 8, 16, 32] if device.type == "cuda" else [1, 4, 8])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        flush=True,
    )
    for w in widths:
        bench_width(w, args.norm, device, w <= args.reference_max_width, args.max_sweeps, args.repeat)


if __name__ == "__main__":
    main()
