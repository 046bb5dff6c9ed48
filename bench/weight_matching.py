"""Weight matching speed: lmclab vs. a faithful float32 torch port of Git Re-Basin's weight matching.

Port (written here from Ainsworth et al. 2023, "Git Re-Basin", Algorithm 1, the way public PyTorch
ports implement it): each sweep visits the permutation groups in a random order; for each group P it
builds  S_P = Σ_{(t, a) ∈ P} A_t^(a) (B̃_t^(a))ᵀ  from scratch, B̃_t^(a) being θ_B[t] with the current
permutations of *all* groups applied on every axis of t but a (float32 torch on the device), solves
max_p Σ_i S_P[i, p[i]] with scipy's ``linear_sum_assignment`` and sets P to the solution; it stops after
a sweep in which no group improved ⟨S_P, P⟩ (by more than 1e-12 relative, the same rule as lmclab).
Both sides draw the group order from the same seeded ``torch.Generator`` so they walk the same path.
lmclab: ``lmclab.align.weight_matching``: cost terms cached per group and touched only when a
neighbouring permutation changed, then by a rank-k correction when few units moved (a full product
otherwise); groups none of whose neighbours changed are not re-solved; each LAP solved by scipy on the
cost matrix reduced by the group's previous column potentials and by row/column maxima; the per-sweep
objective read off up-to-date cost terms.

Pairs: random inits (seeds 0 and 1) of ResNet-20 ×2/×4/×8 (LayerNorm) on CIFAR-shaped inputs and of
the MLP 784-512×3-10, and the trained MNIST MLPs of the demo store (seeds 0 and 1 of ``--runs-dir``).

    python bench/weight_matching.py                         # CPU, all pairs
    python bench/weight_matching.py --only resnet --widths 8
    python bench/weight_matching.py --device cuda --widths 8 16 32

One line per pair: wall seconds of each (fastest of --repeat, the sides alternating), the ratio
port/lmclab of wall time and, on CPU, of this process's CPU time (less sensitive to other processes on
a shared machine), sweeps, whether both found the same permutation, and the objective
Σ_t ⟨θ_A[t], π(θ_B)[t]⟩ (float64; both when they differ). The load average is printed before and after.
Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Mapping

import torch
from scipy.optimize import linear_sum_assignment

import lmclab.permutation as lp
from lmclab.align import weight_matching
from lmclab.models import build_model, count_parameters
from lmclab.permutation import Permutation, PermutationSpec
from lmclab.store import RunStore


def _axis_index(length: int, perm: torch.Tensor, block: int, offset: int) -> torch.Tensor:
    """Index vector along an axis of `length` entries moving the units [offset, offset + n·block)."""
    idx = torch.arange(length, device=perm.device)
    idx[offset : offset + len(perm) * block] = (
        perm[:, None] * block + torch.arange(block, device=perm.device)
    ).reshape(-1) + offset
    return idx


def rebasin_port(
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    *,
    seed: int = 0,
    max_sweeps: int = 100,
) -> tuple[Permutation, int]:
    """Git Re-Basin weight matching, every cost matrix rebuilt from the permuted θ_B at each group step."""
    names = [t for t in spec.axes_by_tensor() if t in params_a and params_a[t].is_floating_point()]
    a = {t: params_a[t].detach().float() for t in names}
    b = {t: params_b[t].detach().float() for t in names}
    axes_of = spec.axes_by_tensor()
    device = a[names[0]].device
    perm = {g.name: torch.arange(g.size, device=device) for g in spec.groups}
    size = {g.name: g.size for g in spec.groups}

    def permuted_b(t: str, except_axis: int) -> torch.Tensor:
        """θ_B[t] with every group's current permutation applied on every axis but `except_axis`."""
        w = b[t]
        for g, ax in axes_of[t]:
            if ax.axis != except_axis:
                w = w.index_select(ax.axis, _axis_index(w.shape[ax.axis], perm[g], ax.block, ax.offset))
        return w

    gen = torch.Generator().manual_seed(seed)
    sweeps = 0
    while sweeps < max_sweeps:
        sweeps += 1
        progress = False
        for i in torch.randperm(len(spec.groups), generator=gen).tolist():
            g = spec.groups[i]
            n = size[g.name]
            if n < 2:
                continue
            s = torch.zeros(n, n, device=device)
            for ax in g.axes:
                if ax.tensor not in a:
                    continue
                rows = slice(ax.offset, ax.offset + n * ax.block)
                w_a = a[ax.tensor].movedim(ax.axis, 0)[rows].reshape(n, -1)
                w_b = permuted_b(ax.tensor, ax.axis).movedim(ax.axis, 0)[rows].reshape(n, -1)
                s += w_a @ w_b.T
            s_np = s.cpu().numpy()
            _, cols = linear_sum_assignment(s_np, maximize=True)
            new = torch.from_numpy(cols).to(device)
            r = torch.arange(n, device=device)
            old_val = float(s[r, perm[g.name]].double().sum())
            new_val = float(s[r, new].double().sum())
            progress = progress or new_val > old_val + 1e-12 * abs(old_val)
            perm[g.name] = new
        if not progress:
            break
    return Permutation({k: v.cpu() for k, v in perm.items()}), sweeps


def objective(
    params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor], spec: PermutationSpec, perm: Permutation
) -> float:
    """Σ_t ⟨θ_A[t], π(θ_B)[t]⟩ over the spec's floating-point tensors, in float64."""
    pb = perm.apply({k: v.cpu() for k, v in params_b.items()}, spec)
    return float(
        sum(
            (params_a[t].cpu().double() * pb[t].double()).sum()
            for t in spec.axes_by_tensor()
            if t in params_a and params_a[t].is_floating_point()
        )
    )


def _timed(fn: Callable[[], object], cuda: bool) -> tuple[object, float, float]:
    """(result, wall seconds, CPU seconds of this process) of one call."""
    if cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0, time.process_time() - c0


def compare(
    label: str,
    pa: dict[str, torch.Tensor],
    pb: dict[str, torch.Tensor],
    spec: PermutationSpec,
    device: torch.device,
    max_sweeps: int,
    repeat: int,
) -> dict:
    """Time both sides (fastest of `repeat`, alternating); prints one line and returns its numbers."""
    pa = {k: v.detach().to(device) for k, v in pa.items()}
    pb = {k: v.detach().to(device) for k, v in pb.items()}
    cuda = device.type == "cuda"
    if cuda:  # warm up kernels and the allocator on both sides
        weight_matching(pa, pb, spec, max_sweeps=1)
        rebasin_port(pa, pb, spec, max_sweeps=1)
    sides: dict[str, Callable[[], object]] = {
        "port": lambda: rebasin_port(pa, pb, spec, seed=0, max_sweeps=max_sweeps),
        "lmclab": lambda: weight_matching(pa, pb, spec, seed=0, max_sweeps=max_sweeps),
    }
    wall = {k: float("inf") for k in sides}
    cpu = dict(wall)
    out: dict[str, object] = {}
    for _ in range(repeat):  # alternate the sides, so that both see the same background load
        for k, fn in sides.items():
            out[k], w, c = _timed(fn, cuda)
            wall[k], cpu[k] = min(wall[k], w), min(cpu[k], c)
    port_perm, port_sweeps = out["port"]  # type: ignore[misc]
    res = out["lmclab"]
    same = port_perm == res.perm  # type: ignore[attr-defined]
    j_l, j_p = objective(pa, pb, spec, res.perm), objective(pa, pb, spec, port_perm)  # type: ignore[attr-defined]
    line = (
        f"{label:<32} lmclab {wall['lmclab']:6.2f} s ({res.sweeps:>2} sweeps)   port {wall['port']:6.2f} s "  # type: ignore[attr-defined]
        f"({port_sweeps:>2} sweeps)   ratio {wall['port'] / wall['lmclab']:4.2f}x"
        + ("" if cuda else f" (CPU time {cpu['port'] / cpu['lmclab']:4.2f}x)")
        + f"   same permutation: {same}, "
        + (f"objective {j_l:.10g}" if j_l == j_p else f"objective lmclab {j_l:.10g} port {j_p:.10g}")
    )
    print(line, flush=True)
    return {
        "pair": label,
        "lmclab_s": wall["lmclab"],
        "port_s": wall["port"],
        "ratio": wall["port"] / wall["lmclab"],
        "sweeps": {"lmclab": res.sweeps, "port": port_sweeps},  # type: ignore[attr-defined]
        "same_permutation": bool(same),
        "objective": {"lmclab": j_l, "port": j_p},
    }


def resnet_pair(width: int) -> tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor], PermutationSpec]:
    shape = (3, 32, 32)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model("resnet20", input_shape=shape, num_classes=10, width=width, norm="layernorm"))
    spec = lp.derive_spec(models[0], torch.randn(2, *shape))
    label = f"resnet20-ln x{width} random ({count_parameters(models[0]) / 1e6:.2f}M)"
    return label, dict(models[0].state_dict()), dict(models[1].state_dict()), spec


def mlp_pair(runs_dir: str | None) -> tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor], PermutationSpec]:
    shape = (1, 28, 28)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model("mlp", input_shape=shape, num_classes=10, hidden=[512, 512, 512]))
    spec = lp.derive_spec(models[0], torch.randn(2, *shape))
    if runs_dir is None:
        return "mlp 784-512x3-10 random", dict(models[0].state_dict()), dict(models[1].state_dict()), spec
    runs = [r for r in RunStore(runs_dir).runs() if r.complete and r.config.model.model == "mlp"]
    chosen = sorted(runs, key=lambda r: r.meta.extra.get("seed", 0))[:2]
    if len(chosen) < 2:
        raise SystemExit(f"{runs_dir} holds fewer than two complete MLP runs")
    states = [r.load_state() for r in chosen]
    label = "mlp trained " + "/".join(f"seed {r.meta.extra.get('seed')}" for r in chosen)
    return label, states[0], states[1], spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu); both sides run there")
    parser.add_argument("--widths", type=int, nargs="+", default=[2, 4, 8], help="ResNet-20 widths (default 2 4 8)")
    parser.add_argument("--only", choices=("all", "resnet", "mlp"), default="all")
    parser.add_argument("--runs-dir", default="/work/runs_demo", help="store holding the trained MNIST MLPs")
    parser.add_argument("--max-sweeps", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2, help="time the fastest of this many runs of each")
    args = parser.parse_args()
    device = torch.device(args.device)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        flush=True,
    )
    pairs = []
    if args.only in ("all", "mlp"):
        pairs.append(lambda: mlp_pair(None))
        if os.path.isdir(args.runs_dir):
            pairs.append(lambda: mlp_pair(args.runs_dir))
        else:
            print(f"no store at {args.runs_dir}: trained pair skipped", flush=True)
    if args.only in ("all", "resnet"):
        pairs.extend((lambda w=w: resnet_pair(w)) for w in args.widths)
    for make in pairs:
        label, pa, pb, spec = make()
        compare(label, pa, pb, spec, device, args.max_sweeps, args.repeat)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)


if __name__ == "__main__":
    main()
