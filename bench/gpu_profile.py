"""What bounds each GPU workload of issue 13: torch.profiler over a few calls of each, on one device.

Issue 13 asks, for every speed target a GPU session misses, what bounds it (profiled) and what would move it.
A device lease is short, so the profiles are taken in the same session as the ratios (stage `profile` of
bench/gpu_session.py), not in a later one. For each workload (a solo training step, HVPs, the all-logit
Taylor pass, a batched path evaluation, packed steps when a pack builder is given) it measures

  wall ms      per call, synchronized, outside the profiler (median of --calls)
  device ms    per call, the kernels' own time summed (the profiler's self device time of CUDA events)
  busy         device ms / wall ms: near 1 the kernels bound the call (make them cheaper or fewer FLOPs);
               far below 1 the host does (Python, dispatch, launches: fuse, batch, CUDA graphs, compile)
  launches     device events (kernels, copies, memsets) per call
  host ms      the profiler's self CPU time per call (every op's host side, profiler overhead included)

and the profiler's table of the top ops by self device time (self CPU time on a CPU), all written to
`--out`/gpu_profile.txt (one file: a device lease returns at most 8). On a CPU there is no device time: busy
and launches are reported as absent, the tables sort by self CPU time (the dry run,
tests/test_gpu_session.py).

    python bench/gpu_profile.py --device cuda --out /tmp/prof
    python bench/gpu_profile.py --device cpu --tiny --out /tmp/prof     # seconds: the dry run

Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pack_candidates  # noqa: E402
from lmclab.align import weight_matching  # noqa: E402
from lmclab.curvature.derivatives import logit_derivatives  # noqa: E402
from lmclab.curvature.hessian import hvp_many  # noqa: E402
from lmclab.models import build_model  # noqa: E402
from lmclab.paths.batched import evaluate_points  # noqa: E402
from lmclab.permutation import derive_spec  # noqa: E402
from lmclab.points import lerp, parameter_names  # noqa: E402
from lmclab.training.loop import train_step  # noqa: E402
from logit_derivatives import random_dataset  # noqa: E402


@dataclass(frozen=True)
class Workload:
    """A name and a factory: `make(device, tiny)` builds the inputs once and returns the call to profile."""

    name: str
    make: Callable[[torch.device, bool], Callable[[], object]]


def _model(name: str, device: torch.device, seed: int = 0, **options: Any) -> torch.nn.Module:
    shape = (1, 28, 28) if name == "mlp" else (3, 32, 32)
    torch.manual_seed(seed)
    return build_model(name, input_shape=shape, num_classes=10, **options).to(device)


def _size(tiny: bool, full: int, small: int) -> int:
    return small if tiny else full


def train_step_workload(norm: str) -> Workload:
    """lmclab's solo optimizer step (`training.loop.train_step`: bf16 autocast and channels_last on CUDA),
    ResNet-20 ×1, batch 128, SGD with momentum."""

    def make(device: torch.device, tiny: bool) -> Callable[[], object]:
        model = _model("resnet20", device, width=1, norm=norm).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        b = _size(tiny, 128, 4)
        x, y = torch.randn(b, 3, 32, 32, device=device), torch.randint(0, 10, (b,), device=device)
        return lambda: train_step(model, optimizer, x, y)

    return Workload(f"train_step ResNet-20 ×1 {norm}, batch 128", make)


def pack_step_workload(k: int, norm: str) -> Workload:
    """lmclab's packed step (`training.packed.Pack.step`, as bench/pack_candidates.py's `vmap` candidate): `k`
    ResNet-20 ×1 members, batch 128 each, on random images."""

    def make(device: torch.device, tiny: bool) -> Callable[[], object]:
        argv = ["--device", str(device), "--k", str(_size(tiny, k, 2)), "--norm", norm, "--pool", "1"]
        argv += ["--batch-size", str(_size(tiny, 128, 4)), "--subset", str(_size(tiny, 128, 4))]
        ns = pack_candidates.parse_args(argv)
        data = random_dataset(ns.batch_size, (3, 32, 32), 10, device)
        x, y = data.batch(torch.arange(ns.batch_size))
        xs, ys = x.expand(1, ns.k, *x.shape).contiguous(), y.expand(1, ns.k, *y.shape).contiguous()
        setup = pack_candidates.Setup(ns, device, pack_candidates.configs(ns), data, xs, ys, [])
        stepper = pack_candidates.pack_stepper(setup)
        return lambda: stepper.step(0, False)

    return Workload(f"Pack.step {k} × ResNet-20 ×1 {norm}, batch 128", make)


def hvp_workload(model_name: str, probes: int, batch: int) -> Workload:
    """`curvature.hessian.hvp_many`: `probes` Hessian-vector products on one batch of random inputs (the
    Hessian trace's inner loop), products batched (`vectorize=True`)."""

    def make(device: torch.device, tiny: bool) -> Callable[[], object]:
        options = {} if model_name == "mlp" else {"width": 1, "norm": "layernorm"}
        model = _model(model_name, device, **options).eval()
        shape = (1, 28, 28) if model_name == "mlp" else (3, 32, 32)
        n = _size(tiny, batch, 8)
        data = random_dataset(n, shape, 10, device)
        gen = torch.Generator(device="cpu").manual_seed(0)
        names = parameter_names(model)
        params = dict(model.named_parameters())
        vectors = [
            {k: torch.randn(params[k].shape, generator=gen).to(device) for k in names}
            for _ in range(_size(tiny, probes, 2))
        ]
        return lambda: hvp_many(model, None, vectors, data, batch_size=n, max_examples=n, vectorize=True)

    return Workload(f"hvp_many {model_name}, {probes} probes, batch {batch}", make)


def taylor_workload(inputs: int) -> Workload:
    """`curvature.derivatives.logit_derivatives` to order 2 along a direction, ResNet-20 ×1 LN, `inputs`
    random images (the all-logit Taylor pass)."""

    def make(device: torch.device, tiny: bool) -> Callable[[], object]:
        model = _model("resnet20", device, width=1, norm="layernorm").eval()
        other = _model("resnet20", device, seed=1, width=1, norm="layernorm")
        theta = model.state_dict()
        names = parameter_names(model)
        d = {k: 0.1 * (other.state_dict()[k] - theta[k]) for k in names}
        n = _size(tiny, inputs, 4)
        data = random_dataset(n, (3, 32, 32), 10, device)
        return lambda: logit_derivatives(model, theta, d, data, order=2, batch_size=min(n, 50), max_examples=n)

    return Workload(f"logit_derivatives order 2, ResNet-20 ×1 LN, {inputs} inputs", make)


def path_workload(points: int, examples: int) -> Workload:
    """`paths.batched.evaluate_points`: `points` points of the segment between two MLPs on `examples` random
    images, stacked (the path evaluation)."""

    def make(device: torch.device, tiny: bool) -> Callable[[], object]:
        a, b = _model("mlp", device).eval(), _model("mlp", device, seed=1)
        k = _size(tiny, points, 3)
        pts = [lerp(a.state_dict(), b.state_dict(), i / (k - 1)) for i in range(k)]
        data = random_dataset(_size(tiny, examples, 64), (1, 28, 28), 10, device)
        return lambda: evaluate_points(a, pts, {"test": data})

    return Workload(f"evaluate_points MLP, {points} points, {examples} images", make)


def weight_matching_workload(width: int) -> Workload:
    """`align.weight_matching` of two random ResNet-20 ×`width` LN inits on the device (its assignments are
    solved by scipy on the host: low busy says they bound it)."""

    def make(device: torch.device, tiny: bool) -> Callable[[], object]:
        w = _size(tiny, width, 1)
        cpu = torch.device("cpu")  # the spec is traced on the CPU, as bench/weight_matching.py does
        a, b = (_model("resnet20", cpu, seed=s, width=w, norm="layernorm") for s in (0, 1))
        spec = derive_spec(a, torch.randn(2, 3, 32, 32))
        pa, pb = ({k: v.to(device) for k, v in m.state_dict().items()} for m in (a, b))
        return lambda: weight_matching(pa, pb, spec, seed=0)

    return Workload(f"weight_matching ResNet-20 ×{width} LN, random inits", make)


WORKLOADS = (
    train_step_workload("batchnorm"),
    train_step_workload("layernorm"),
    pack_step_workload(8, "batchnorm"),
    hvp_workload("mlp", 8, 2000),
    hvp_workload("resnet20", 8, 500),
    taylor_workload(100),
    path_workload(25, 10_000),
    weight_matching_workload(8),
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_device_event(evt: Any) -> bool:
    return str(getattr(evt, "device_type", "")).endswith("CUDA") and not getattr(evt, "is_user_annotation", False)


def profile_call(fn: Callable[[], object], device: torch.device, calls: int, rows: int = 12) -> dict[str, Any]:
    """Wall time per call (median of `calls`, synchronized, unprofiled), then the profiler over `calls` calls:
    device time, launches and host time per call, busy = device / wall, and the top-`rows` table."""
    fn()  # warm-up: kernels, caches, autotuning
    _sync(device)
    walls = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        walls.append(time.perf_counter() - t0)
    wall_ms = 1e3 * statistics.median(walls)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    averages = prof.key_averages()
    host_ms = sum(e.self_cpu_time_total for e in averages) / 1e3 / calls
    out: dict[str, Any] = {"wall_ms": wall_ms, "host_ms": host_ms, "calls": calls}
    if cuda:
        device_events = [e for e in prof.events() if _is_device_event(e)]
        # as the profiler's own table totals them: self device time of the kineto events on the device
        device_ms = sum(e.self_device_time_total for e in device_events) / 1e3 / calls
        out.update(
            device_ms=device_ms,
            busy=device_ms / wall_ms if wall_ms > 0 else float("nan"),
            launches=len(device_events) / calls,
        )
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    out["table"] = averages.table(sort_by=sort, row_limit=rows, max_name_column_width=60)
    return out


def verdict(rec: dict[str, Any]) -> str:
    """One line on what bounds the call, from busy (the kernels' share of the wall time)."""
    busy = rec.get("busy")
    if busy is None:
        return "no device (CPU run): see the table"
    if busy >= 0.8:
        return f"kernel-bound (busy {busy:.0%}): fewer FLOPs or faster kernels move it"
    if busy >= 0.5:
        return f"mixed (busy {busy:.0%})"
    return (
        f"host-bound (busy {busy:.0%}, {rec['launches']:.0f} launches per call): fewer, larger kernels "
        "(batching, fusion, CUDA graphs, torch.compile) move it"
    )


def profile_workload(w: Workload, device: torch.device, tiny: bool, calls: int) -> dict[str, Any]:
    """{"workload": its name, profile_call's numbers and table, "verdict"} of one workload."""
    rec: dict[str, Any] = {"workload": w.name, **profile_call(w.make(device, tiny), device, calls)}
    rec["verdict"] = verdict(rec)
    return rec


def run(
    device: torch.device,
    tiny: bool,
    out: Path | None,
    workloads: tuple[Workload, ...] = WORKLOADS,
    calls: int | None = None,
) -> list[dict[str, Any]]:
    """Profile every workload (a failing one records its error; the others still run); write gpu_profile.txt
    to `out` after each, so an interrupted session keeps what it measured."""
    n = calls if calls is not None else (1 if tiny else 5)
    records: list[dict[str, Any]] = []
    for w in workloads:
        print(f"-- profile: {w.name}", flush=True)
        try:
            rec = profile_workload(w, device, tiny, n)
            print(f"   wall {rec['wall_ms']:.2f} ms per call; {rec['verdict']}", flush=True)
        except Exception as err:  # noqa: BLE001 (a workload that fails must not end the session)
            rec = {"workload": w.name, "error": f"{type(err).__name__}: {err}"}
            print(f"   failed: {rec['error']}", flush=True)
        records.append(rec)
        if out is not None:
            write_text(out / "gpu_profile.txt", device, records)
    return records


def write_text(path: Path, device: torch.device, records: list[dict[str, Any]]) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"# torch.profiler per workload on {name}, torch {torch.__version__}", ""]
    for rec in records:
        lines.append(f"## {rec['workload']}")
        if "error" in rec:
            lines += [f"failed: {rec['error']}", ""]
            continue
        numbers = f"wall {rec['wall_ms']:.3f} ms/call, host {rec['host_ms']:.3f} ms/call"
        if "device_ms" in rec:
            numbers += f", device {rec['device_ms']:.3f} ms/call, busy {rec['busy']:.2f}"
            numbers += f", launches {rec['launches']:.0f}"
        lines += [numbers, rec["verdict"], rec["table"], ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="every workload at a tiny size (seconds on a CPU)")
    p.add_argument("--calls", type=int, default=None, help="profiled calls per workload (default 5; tiny 1)")
    p.add_argument("--out", type=Path, default=None, help="write gpu_profile.txt here")
    args = p.parse_args(argv)
    if args.calls is not None and args.calls < 1:
        p.error("--calls must be at least 1")
    run(torch.device(args.device), args.tiny, args.out, calls=args.calls)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
