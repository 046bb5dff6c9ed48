"""STE-MM and MergeMany cost for K = 2, 4, 8 on the paper's MLP (784-512-512-512-10, MNIST), and the
speed-up of warm-started weight matching on the re-match sequences STE-MM produces.

Members: K_max MLPs, member i initialised with seed i and trained briefly (`--train-steps` Adam steps,
lr 1e-3, batch 256, data order seeded with i) on MNIST — independent models, not permuted copies, so
the matchings are real ones.

1. STE-MM (paper settings: Adam lr 1e-3, batch 256, rescaled-uniform mixing): `--batches` mini-batches
   of :class:`lmclab.align.ste.STELoop` are timed after one warm-up batch, and the time per epoch is
   *extrapolated* to ⌈60000 / 256⌉ = 235 batches (the first batch's cold matchings are excluded).
2. MergeMany on the same members: one full run until convergence (timed, rounds reported).
3. Re-matching: an STE-MM run with K = 2 records its proxy θ̃_1 before each of the first `--window`
   batches ("early") and of `--window` batches from batch `--late` on ("late"); member B_1 is then
   re-matched to each sequence of targets three ways, each timed (CPU seconds of this process, which
   other processes on a shared machine disturb less than wall time) in total and in its assignment solves:
     cold      weight_matching from the identity, scipy LAPs (no warm start at all);
     init      started from the previous permutation, scipy LAPs (warm coordinate descent only);
     warm      WeightMatchingState: previous permutation + LAP dual potentials kept per group.
   ("init" and "warm" solve the same problems exactly, so they find the same permutations unless a
   tie is broken differently; "cold" coordinate descent may end in a different local optimum.)

    python bench/ste_mm.py                       # defaults: K = 2 4 8, 6 timed batches, 50 training steps
    python bench/ste_mm.py --threads 1 --ks 2 4  # one torch thread (a busy shared machine), fewer K

Prints tables; not a test (no thresholds). The machine's load average is printed: other processes on
a small shared machine change the numbers.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmclab.align import WeightMatchingState, merge_many, weight_matching
from lmclab.align.ste import STELoop
from lmclab.align.ste_mm import mixing_draw
from lmclab.data import DeviceDataset
from lmclab.models import build_model
from lmclab.permutation import derive_spec

# the modules (``lmclab.align.weight_matching`` the attribute is the function of that name)
assignment = importlib.import_module("lmclab.align.assignment")
wm = importlib.import_module("lmclab.align.weight_matching")
DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
BATCH = 256


def train_members(k: int, steps: int, data: DeviceDataset) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    members = []
    for i in range(k):
        torch.manual_seed(i)
        model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(i)
        for _ in range(steps):
            x, y = data.batch(torch.randint(0, len(data), (BATCH,), generator=gen))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        members.append({n: v.detach().clone() for n, v in model.state_dict().items()})
    return model, members


class Timed:
    """Wraps a function, accumulating its CPU time (this process) and call count."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args: Any, **kw: Any) -> Any:
        t = time.process_time()
        try:
            return self.fn(*args, **kw)
        finally:
            self.seconds += time.process_time() - t
            self.calls += 1


def lap_timers() -> tuple[Timed, Timed]:
    """Install timers around the cold LAP (in weight matching) and the warm solver; returns (cold, warm)."""
    cold = Timed(assignment.solve_assignment)
    warm = Timed(assignment.WarmAssignment.solve)
    wm.solve_assignment = cold
    assignment.WarmAssignment.solve = lambda self, score: warm(self, score)  # type: ignore[method-assign]
    return cold, warm


def new_loop(model, members, spec) -> STELoop:
    return STELoop(
        members[0],
        members[1:],
        spec,
        model,
        draw=mixing_draw(len(members)),
        lr=1e-3,
        seed=0,
        device=torch.device("cpu"),
    )


def batch(data: DeviceDataset, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mini-batch b of a fixed seeded order (wrapping around after an epoch)."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    b %= math.ceil(len(data) / BATCH)
    return data.batch(order[b * BATCH : (b + 1) * BATCH])


def ste_mm_timing(model, members, spec, data, batches: int):
    """(seconds per timed batch, matching share, mean sweeps, solver stats) over `batches` after one warm-up."""
    loop = new_loop(model, members, spec)
    seconds = match = 0.0
    for b in range(batches + 1):
        x, y = batch(data, b)
        m0, t0 = loop.match_seconds, time.perf_counter()
        loop.step(x, y)
        if b > 0:  # batch 0: first (cold) matchings, not timed
            seconds += time.perf_counter() - t0
            match += loop.match_seconds - m0
    sweeps = loop.sweeps[len(members) - 1 :]
    return seconds / batches, match / seconds, float(np.mean(sweeps)), loop.solver_stats()


def record_targets(model, members, spec, data, window: int, late: int) -> tuple[list, list, Callable[[str], float]]:
    """Targets {θ_A's buffers, θ̃_1} that B_1 is matched to before batches [0, window) and [late, late + window)."""
    loop = new_loop(model, members[:2], spec)
    early, late_targets = [], []
    for b in range(late + window):
        if b < window or b >= late:
            target = {**loop.reference, **{k: v.detach().clone() for k, v in loop.proxies[0].items()}}
            (early if b < window else late_targets).append(target)
        loop.step(*batch(data, b))
    return early, late_targets, loop.weights


def replay(targets, member, spec, weights, cold_lap: Timed, warm_lap: Timed) -> dict[str, dict[str, float]]:
    """Re-match `member` to every recorded target: cold / init-from-last / warm; total and LAP seconds."""
    out = {}
    for variant in ("cold", "init", "warm"):
        state = WeightMatchingState() if variant == "warm" else None
        last = None
        c0, w0, calls0 = cold_lap.seconds, warm_lap.seconds, cold_lap.calls + warm_lap.calls
        perms, sweeps = [], []
        t = time.process_time()
        for target in targets:
            res = weight_matching(
                target, member, spec, weights=weights, warm=state, init=last if variant == "init" else None
            )
            last = res.perm
            perms.append(res.perm)
            sweeps.append(res.sweeps)
        total = time.process_time() - t
        out[variant] = {
            "seconds": total,
            "lap_seconds": (cold_lap.seconds - c0) + (warm_lap.seconds - w0),
            "solves": cold_lap.calls + warm_lap.calls - calls0,
            "sweeps": float(np.mean(sweeps)),
            "perms": perms,
            "stats": state.stats() if state is not None else {},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batches", type=int, default=6, help="timed STE-MM batches per K (after 1 warm-up)")
    parser.add_argument("--train-steps", type=int, default=50, help="Adam steps per member")
    parser.add_argument("--window", type=int, default=10, help="re-matches replayed per window")
    parser.add_argument("--late", type=int, default=60, help="first batch of the late window")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--data-dir", default=DATA_DIR)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s), "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    data = DeviceDataset.load("mnist", "train", data_dir=args.data_dir, progress=False)
    steps_per_epoch = math.ceil(len(data) / BATCH)
    t = time.perf_counter()
    model, members = train_members(max(args.ks), args.train_steps, data)
    spec = derive_spec(model, torch.zeros(2, 1, 28, 28))
    print(
        f"{max(args.ks)} members (MLP 784-512-512-512-10, {args.train_steps} Adam steps each) trained in "
        f"{time.perf_counter() - t:.1f} s"
    )
    cold_lap, warm_lap = lap_timers()

    print(f"\nSTE-MM: {args.batches} timed batches of {BATCH} per K, extrapolated to {steps_per_epoch} batches/epoch")
    print(
        f"{'K':>3} {'s/batch':>8} {'s/epoch (extrap.)':>18} {'matching':>9} {'sweeps/match':>13} "
        f"{'warm LAPs':>10} {'cold LAPs':>10} {'rows freed/warm LAP':>20}"
    )
    for k in args.ks:
        per_batch, share, sweeps, stats = ste_mm_timing(model, members[:k], spec, data, args.batches)
        freed = stats.get("rows_freed", 0) / max(stats.get("warm", 0), 1)
        print(
            f"{k:>3} {per_batch:>8.3f} {per_batch * steps_per_epoch:>18.1f} {share:>8.0%} {sweeps:>13.2f} "
            f"{stats.get('warm', 0):>10} {stats.get('cold', 0):>10} {freed:>20.1f}"
        )

    print("\nMergeMany: one run to convergence")
    print(f"{'K':>3} {'seconds':>8} {'rounds':>7} {'converged':>10} {'s/matching':>11}")
    for k in args.ks:
        t = time.perf_counter()
        res = merge_many(members[:k], spec, seed=0)
        sec = time.perf_counter() - t
        print(
            f"{k:>3} {sec:>8.2f} {res.info['rounds']:>7} {str(res.info['converged']):>10} "
            f"{sec / (res.info['rounds'] * k):>11.3f}"
        )

    early, late, weights = record_targets(model, members, spec, data, args.window, args.late)
    for name, targets in (
        (f"batches 0-{args.window - 1}", early),
        (f"batches {args.late}-{args.late + args.window - 1}", late),
    ):
        print(f"\nRe-matching B_1 to the proxies θ̃_1 of STE-MM (K = 2) before {name}")
        out = replay(targets, members[1], spec, weights, cold_lap, warm_lap)
        base = out["cold"]
        print(
            f"{'variant':>8} {'CPU s':>8} {'LAP s':>7} {'LAP solves':>11} {'ms/LAP':>7} {'sweeps':>7} "
            f"{'speed-up total':>15} {'speed-up LAP':>13} {'same perms as init':>19}"
        )
        for variant, r in out.items():
            same = sum(p == q for p, q in zip(r["perms"], out["init"]["perms"]))
            lap_speedup = base["lap_seconds"] / max(r["lap_seconds"], 1e-12)
            print(
                f"{variant:>8} {r['seconds']:>8.2f} {r['lap_seconds']:>7.2f} {r['solves']:>11} "
                f"{1e3 * r['lap_seconds'] / max(r['solves'], 1):>7.2f} {r['sweeps']:>7.2f} "
                f"{base['seconds'] / r['seconds']:>14.2f}x {lap_speedup:>12.2f}x {same:>12}/{len(r['perms'])}"
            )
        s = out["warm"]["stats"]
        print(
            f"warm solver: {s.get('warm', 0)} warm / {s.get('cold', 0)} cold solves ({s.get('fallback', 0)} "
            f"fallbacks, {s.get('potentials', 0)} potential recoveries), "
            f"{s.get('rows_freed', 0) / max(s.get('warm', 0), 1):.1f} rows freed per warm solve (of 512)"
        )
    print(f"\ntotal bench time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
