"""Ray executor vs local executor on independent CPU steps: speed ratio and Ray's overhead per step.

The graph: `--steps` independent steps (default 8), each a deterministic CPU computation of about
`--seconds` s (default 1.5; repeated float32 matmuls, calibrated on this machine first) on one torch
thread. The local executor runs them one after another in this process; the Ray executor runs them as
Ray tasks on a Ray instance on this machine with `--cpus` CPUs (default 2), one CPU per task.

Ray's start (`ray.init`) and its workers' first import of lmclab are paid once per session, before
the graph: a warm-up graph of tiny steps starts the workers; the timed Ray run is the second graph.
Both runs use fresh stores, so every step is computed.

Reported (all measured in this run):
  speed ratio           local wall time / Ray wall time (the target on 2 cores: ≥ 1.7×)
  overhead per step     (Ray wall time − the ideal makespan) × CPUs / steps, as a fraction of the mean
                        step time (the target for steps ≥ 1 s: ≤ 5%). The ideal makespan: the step
                        times measured inside the tasks, laid on CPUs greedily in submission order
                        with nothing in between — so the overhead is what the executor adds
                        (submission, scheduling, the claim, sealing, returning the result), not the
                        idle CPUs that steps of unequal length leave at the end, which are shown
                        apart ("imbalance": ideal makespan × CPUs − Σ step times, per step).

    python bench/ray_executor.py                 # 8 steps of ~1.5 s on 2 CPUs
    python bench/ray_executor.py --steps 16 --seconds 1

Prints a table; not a test. The machine's load average is printed: other processes on a small shared
machine slow some steps more than others, which shows up as overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # Ray workers import this module: see main()

from lmclab.experiments.graph import LocalExecutor, Step, StepContext, step_kind  # noqa: E402
from lmclab.experiments.ray_executor import RayExecutor  # noqa: E402

SIZE = 192


def work(repeats: int) -> float:
    """`repeats` products of a fixed SIZE × SIZE float32 matrix with a running one: a deterministic CPU load."""
    a = torch.randn(SIZE, SIZE, generator=torch.Generator().manual_seed(0)) / SIZE**0.5
    x = torch.eye(SIZE)
    for _ in range(repeats):
        x = torch.tanh(a @ x)
    return float(x.sum())


@step_kind("bench_ray_compute")
def _compute(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    return {"value": work(config["repeats"]), "index": config["index"]}


def calibrate(seconds: float) -> int:
    """Repeats of `work` that take about `seconds` on one thread here (median of three timings)."""
    work(50)
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        work(200)
        timings.append((time.perf_counter() - start) / 200)
    return max(1, round(seconds / sorted(timings)[1]))


def step_seconds(root: Path, steps: list[Step]) -> list[float]:
    """The wall time each step recorded in its stored result (measured inside the task)."""
    return [json.loads((root / "steps" / s.name / "result.json").read_text())["seconds"] for s in steps]


def ideal_makespan(seconds: list[float], cpus: int) -> float:
    """Wall time of `seconds` run on `cpus` workers, each step to the first free worker, no overhead."""
    free = [0.0] * cpus
    for s in seconds:
        i = free.index(min(free))
        free[i] += s
    return max(free)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.5, help="target seconds per step")
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import ray

    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; torch threads per step: 1")
    repeats = calibrate(args.seconds)
    steps = [Step("bench_ray_compute", {"repeats": repeats, "index": i}) for i in range(args.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        local = LocalExecutor(root / "local", progress=False).run(steps)
        local_wall = time.perf_counter() - start
        local_steps = step_seconds(root / "local", steps)

        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        warm = [Step("bench_ray_compute", {"repeats": 1, "index": -1 - i}) for i in range(args.cpus)]
        RayExecutor(root / "warm", progress=False).run(warm)
        startup = time.perf_counter() - start
        start = time.perf_counter()
        distributed = RayExecutor(root / "ray", progress=False).run(steps)
        ray_wall = time.perf_counter() - start
        ray_steps = step_seconds(root / "ray", steps)
        ray.shutdown()
    assert distributed == local, "the Ray executor's results differ from the local executor's"
    mean_step = sum(ray_steps) / len(ray_steps)
    ideal = ideal_makespan(ray_steps, args.cpus)
    overhead = (ray_wall - ideal) * args.cpus / len(steps)
    imbalance = (ideal * args.cpus - sum(ray_steps)) / len(steps)
    print(f"{args.steps} independent steps, {repeats} matmuls of {SIZE}×{SIZE} each; results identical: yes")
    print(f"{'executor':<8} {'wall s':>8} {'mean step s':>12} {'min step s':>11} {'max step s':>11}")
    for name, wall, seconds in (("local", local_wall, local_steps), ("ray", ray_wall, ray_steps)):
        print(
            f"{name:<8} {wall:>8.2f} {sum(seconds) / len(seconds):>12.3f} {min(seconds):>11.3f} {max(seconds):>11.3f}"
        )
    print(f"Ray start and worker warm-up (once per session, not in the Ray wall time): {startup:.1f} s")
    print(f"speed ratio local / ray: {local_wall / ray_wall:.2f}× (target ≥ 1.7× on 2 cores)")
    print(
        f"Ray overhead per step: {overhead:.3f} s = {overhead / mean_step:.1%} of a {mean_step:.2f} s step "
        "(target ≤ 5%)"
    )
    slowdown = mean_step / (sum(local_steps) / len(local_steps))
    print(
        f"a step inside a Ray task took {slowdown:.2f}× as long as the same step run locally (other processes "
        "on the machine: with 2 busy cores the load average should stay below 2 for the ratio to reach 2×)"
    )
    print(
        f"idle CPUs from unequal step times (not counted above): {imbalance:.3f} s per step; "
        f"ideal makespan {ideal:.2f} s"
    )


if __name__ == "__main__":
    main()
