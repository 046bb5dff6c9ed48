"""Many models per device: the candidate ways of training K members of one architecture at once, step by step.

K members (own init seed, own batch at every step; SGD momentum 0.9, lr 0.05, cross-entropy, batch B) train
for W warm-up steps (not timed) and S timed steps on batches already on the device (drawn once from the real
training split, a pool of distinct batches per member cycled). Aggregate training images/s = K·S·B / wall,
CUDA synchronised around the timed span, for each candidate:

  sequential       eager, the members one after another, lmclab's `train_step` (the baseline: ratio 1)
  vmap             lmclab's packed step, `Pack.of(states, config).step(x[K, B, …], y[K, B])`
  compile          torch.compile of each member's model (default mode), members one after another
  vmap+compile     torch.compile of lmclab's packed step itself (`torch.compile(pack.step)`: the vmap'd
                   grad_and_value and the optimizer step over the stacked leaves in one compiled function)
  cudagraphs       torch.compile(mode="reduce-overhead") (CUDA graphs) of each member's model, one after another
  vmap+cudagraphs  torch.compile(pack.step, mode="reduce-overhead")
  processes        K processes (torch.multiprocessing, spawn) sharing the device, each the eager sequential loop
                   of its member, released together by a barrier; wall = last finish − first start

Each candidate reports images/s, its ratio to `sequential`, the time of its first step (where compilation
happens) and of the whole warm-up, kept apart from the timed steps (they matter for short runs); `processes`
also its start-up (spawn, imports, CUDA context, data) up to the barrier. The torch.compile candidates record
dynamo's counters (graphs, graph breaks, CUDA-graph skips). Check: every candidate starts from the same
initialisation (lmclab's `TrainingState.initial`) and takes its first step on the same batches as `sequential`;
its members' first-step losses and weights are compared with `sequential`'s: the largest |Δ loss| and the
largest ‖w − w_seq‖ / ‖w_seq − w_0‖ over the members (the relative error of the first update), against
TOLERANCES (float32 on the CPU; bf16 autocast and channels_last on CUDA, as lmclab's loop does). The winner is
the fastest candidate whose check agrees. A candidate that fails records its error; the others still run. On
the CPU the CUDA-graph candidates are skipped (saying so) and the K processes share the machine's cores.

    OMP_NUM_THREADS=1 python bench/pack_candidates.py --device cpu --model mlp --hidden 16 --k 2 \\
        --batch-size 32 --steps 10 --subset 512
    python bench/pack_candidates.py --device cuda --k 8 --model resnet20 --norm batchnorm   # name the card
    python bench/pack_candidates.py --device cuda --k 8 --norm layernorm --candidates vmap,vmap+compile --json r.json

`sequential` always runs first (the baseline), whatever --candidates says. bench/gpu_session.py calls
`measure`. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import queue as queue_module
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, cast

import torch
import torch.multiprocessing as torch_mp

from lmclab.config import DataConfig, ModelConfig, RunConfig, SeedConfig, TrainConfig, UsageError
from lmclab.data import DataError, DeviceDataset
from lmclab.training import TrainingState, train_step
from lmclab.training.packed import Pack

CANDIDATES = ("sequential", "vmap", "compile", "vmap+compile", "cudagraphs", "vmap+cudagraphs", "processes")
CUDA_ONLY = frozenset({"cudagraphs", "vmap+cudagraphs"})
#: (largest |Δ loss|, largest relative error of the first update) allowed against `sequential`, by precision
TOLERANCES = {"float32": (1e-4, 1e-3), "bfloat16 autocast": (5e-2, 1e-1)}
LR, MOMENTUM = 0.05, 0.9
PROCESS_TIMEOUT_S = 600.0  # how long the parent waits for the processes to get ready, and again to finish


# ------------------------------------------------------------------------------------------------ arguments


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _candidates(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in CANDIDATES]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: distinct names of {', '.join(CANDIDATES)}")
    return names


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: allowed: an integer >= {low}")
        return value

    return parse


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(h) for h in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: comma-separated positive integers, e.g. 512,512")
    return sizes


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pack_candidates.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--k", type=_at_least(1), default=8, help="members (default 8)")
    p.add_argument("--model", default="resnet20", help="a zoo model (default resnet20; mlp for a tiny CPU run)")
    p.add_argument("--width", type=_at_least(1), default=None, help="the model's width (default: the model's, ×1)")
    p.add_argument("--norm", default=None, help="layernorm or batchnorm for CNNs (default: the model's)")
    p.add_argument("--hidden", type=_hidden, default=None, help="the MLP's hidden sizes (e.g. 16)")
    p.add_argument("--dataset", default=None, help="default: mnist for the MLP, cifar10 otherwise")
    p.add_argument("--subset", type=_at_least(1), default=4096, help="training images loaded (stratified)")
    p.add_argument("--pool", type=_at_least(1), default=8, help="distinct batches per member, cycled (default 8)")
    p.add_argument("--batch-size", type=_at_least(1), default=128, help="per member (default 128)")
    p.add_argument("--steps", type=_at_least(1), default=40, help="timed steps (default 40)")
    p.add_argument("--warmup", type=_at_least(1), default=3, help="untimed steps first, the first checked (default 3)")
    p.add_argument(
        "--candidates",
        type=_candidates,
        default=list(CANDIDATES),
        help=f"comma-separated (default all: {','.join(CANDIDATES)}); sequential always runs, first",
    )
    p.add_argument("--seed", type=_at_least(0), default=0, help="member k's seeds: SeedConfig.from_seed(1000·seed + k)")
    p.add_argument("--data-dir", default=os.environ.get("LMCLAB_DATA_DIR"))
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON to PATH")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    ns = p.parse_args(argv)
    ns.dataset = ns.dataset or ("mnist" if ns.model == "mlp" else "cifar10")
    ns.candidates = ["sequential", *(c for c in ns.candidates if c != "sequential")]
    if ns.subset < ns.batch_size:
        p.error(f"--subset {ns.subset}: allowed: at least --batch-size ({ns.batch_size}) images")
    try:
        torch.device(ns.device)
    except RuntimeError as e:
        p.error(f"--device {ns.device}: {e}")
    try:
        configs(ns)[0].validate()
    except UsageError as e:
        p.error(str(e))
    return ns


def configs(ns: argparse.Namespace) -> list[RunConfig]:
    """The K members' run configs: equal but for their seeds (SeedConfig.from_seed(1000·seed + k))."""
    base = RunConfig(
        data=DataConfig(ns.dataset, train_subset=ns.subset),
        model=ModelConfig(ns.model, width=ns.width, norm=ns.norm, hidden=ns.hidden),
        train=TrainConfig(optimizer="sgd", lr=LR, momentum=MOMENTUM, batch_size=ns.batch_size, steps=ns.steps),
    )
    return [dataclasses.replace(base, seeds=SeedConfig.from_seed(1000 * ns.seed + k)) for k in range(ns.k)]


# ------------------------------------------------------------------------------------------------ setup


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_data(ns: argparse.Namespace, device: torch.device) -> DeviceDataset:
    return DeviceDataset.load(
        ns.dataset, "train", data_dir=ns.data_dir, device=device, subset=ns.subset, download=False, progress=False
    )


def member_batches(data: DeviceDataset, ns: argparse.Namespace, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Member k's pool of batches on the data's device: x [pool, B, …], y [pool, B] (no augmentation; the
    indices from a CPU generator seeded with (seed, k), so every process draws the same)."""
    gen = torch.Generator().manual_seed(1_000_003 * ns.seed + k)
    xs, ys = [], []
    for _ in range(ns.pool):
        x, y = data.batch(torch.randperm(len(data), generator=gen)[: ns.batch_size])
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


@dataclasses.dataclass
class Setup:
    """What every candidate shares: the members' configs, the data's info, the batches, the initial weights."""

    ns: argparse.Namespace
    device: torch.device
    configs: list[RunConfig]
    data: DeviceDataset
    xs: torch.Tensor  # [pool, K, B, …]
    ys: torch.Tensor  # [pool, K, B]
    initial: list[torch.Tensor]  # member k's parameters at initialisation, flat float64 on the CPU

    @property
    def k(self) -> int:
        return len(self.configs)

    def states(self) -> list[TrainingState]:
        """Fresh members (lmclab's initialisation under each seed_init, channels_last CNNs on CUDA, SGD)."""
        return [TrainingState.initial(c, self.data.info, self.device) for c in self.configs]


def prepare(ns: argparse.Namespace) -> Setup:
    device = torch.device(ns.device)
    cfgs = configs(ns)
    data = load_data(ns, device)
    pools = [member_batches(data, ns, k) for k in range(ns.k)]
    xs = torch.stack([p[0] for p in pools], 1).contiguous()
    ys = torch.stack([p[1] for p in pools], 1).contiguous()
    setup = Setup(ns, device, cfgs, data, xs, ys, [])
    setup.initial = [flat(s.model.parameters()) for s in setup.states()]
    return setup


def flat(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> torch.Tensor:
    """The tensors' values, in logical order (whatever their memory format), as one float64 CPU vector."""
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])


# ------------------------------------------------------------------------------------------------ candidates


@dataclasses.dataclass
class Stepper:
    """A candidate, ready: `step(s, keep)` takes step s of every member (returning the members' losses [K] when
    `keep`), `weights()` gives the members' parameters (flat)."""

    step: Callable[[int, bool], torch.Tensor | None]
    weights: Callable[[], list[torch.Tensor]]


def _step_begin(compile_mode: str | None) -> Callable[[], None]:
    """Under CUDA graphs (mode "reduce-overhead"): `torch.compiler.cudagraph_mark_step_begin`, called before each
    compiled call (each member's, or the pack's), which tells the CUDA-graph trees that a new iteration begins
    (the previous call's outputs are no longer needed), so every member's graphs are recorded once and replayed."""
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
    if compile_mode != "reduce-overhead" or mark is None:
        return lambda: None
    return mark


def sequential_stepper(setup: Setup, compile_mode: str | None = None, compiled: bool = False) -> Stepper:
    """The members one after another with lmclab's `train_step` (each member's model torch.compiled if asked)."""
    states = setup.states()
    models = [s.model for s in states]
    run = [cast(torch.nn.Module, torch.compile(m, mode=compile_mode)) if compiled else m for m in models]
    pool, begin = setup.xs.shape[0], _step_begin(compile_mode)

    def step(s: int, keep: bool) -> torch.Tensor | None:
        i = s % pool
        losses = []
        for k in range(setup.k):
            begin()
            losses.append(train_step(run[k], states[k].optimizer, setup.xs[i, k], setup.ys[i, k])[0])
        return torch.stack(losses).float() if keep else None

    return Stepper(step, lambda: [flat(m.parameters()) for m in models])


def pack_stepper(setup: Setup, compile_mode: str | None = None, compiled: bool = False) -> Stepper:
    """lmclab's packed step (`Pack.step`), as it is or torch.compiled as one function."""
    states = setup.states()
    pack = Pack.of(states, setup.configs[0])
    names = [n for n, _ in states[0].model.named_parameters()]
    fn = torch.compile(pack.step, mode=compile_mode) if compiled else pack.step
    pool, begin = setup.xs.shape[0], _step_begin(compile_mode)

    def step(s: int, keep: bool) -> torch.Tensor | None:
        i = s % pool
        begin()
        loss, _ = fn(setup.xs[i], setup.ys[i])
        return loss.float().clone() if keep else None  # (a CUDA graph's outputs are overwritten by its next replay)

    def weights() -> list[torch.Tensor]:
        return [flat([pack.params[n][k] for n in names]) for k in range(setup.k)]

    return Stepper(step, weights)


def run_stepper(setup: Setup, stepper: Stepper, started: float) -> dict[str, Any]:
    """First step (kept for the check), the rest of the warm-up, then the timed steps."""
    ns, device = setup.ns, setup.device
    first = stepper.step(0, True)
    assert first is not None
    losses, weights = first.cpu().double(), stepper.weights()
    sync(device)
    first_done = time.perf_counter()
    for s in range(1, ns.warmup):
        stepper.step(s, False)
    sync(device)
    start = time.perf_counter()
    for s in range(ns.warmup, ns.warmup + ns.steps):
        stepper.step(s, False)
    sync(device)
    timed = time.perf_counter() - start
    return {
        "img_s": setup.k * ns.steps * ns.batch_size / timed,
        "ms_per_step": 1e3 * timed / ns.steps,
        "first_step_s": first_done - started,
        "warmup_s": start - started,
        "timed_s": timed,
        "_losses": losses,
        "_weights": weights,
    }


@contextlib.contextmanager
def compile_context(k: int) -> Iterator[Callable[[], dict[str, Any]]]:
    """Dynamo reset (no earlier candidate's cache entries count against the recompile limit), the limit raised
    to allow one compilation per member (torch versions that do not share one graph between modules of the same
    class), and a function giving dynamo's counters since entry (and the first new graph-break reasons)."""
    import torch._dynamo  # torch.compile's own module: imported only where a candidate compiles
    from torch._dynamo.utils import counters

    def snapshot() -> dict[str, int]:
        return {
            "graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0)),
        }

    def since() -> dict[str, Any]:
        now = snapshot()
        reasons = [str(r)[:300] for r in counters["graph_break"] if r not in breaks_before]
        return {**{key: value - before[key] for key, value in now.items()}, "graph_break_reasons": reasons[:3]}

    torch._dynamo.reset()
    config = torch._dynamo.config
    limit = config.cache_size_limit
    config.cache_size_limit = max(limit, 4 * k + 8)
    before, breaks_before = snapshot(), set(counters["graph_break"])
    try:
        yield since
    finally:
        config.cache_size_limit = limit
        torch._dynamo.reset()  # the compiled code and any CUDA-graph memory pools go with the candidate


def stepped_candidate(setup: Setup, name: str) -> dict[str, Any]:
    """One in-process candidate, from a fresh initialisation to its timed steps."""
    packed = name.startswith("vmap")
    make = pack_stepper if packed else sequential_stepper
    if name in ("sequential", "vmap"):
        started = time.perf_counter()
        return run_stepper(setup, make(setup), started)
    mode = "reduce-overhead" if name.endswith("cudagraphs") else None
    with compile_context(setup.k) as counts:
        started = time.perf_counter()
        rec = run_stepper(setup, make(setup, mode, compiled=True), started)
        rec["dynamo"] = counts()
    rec["compile_mode"] = mode or "default"
    return rec


# ------------------------------------------------------------------------------------------------ processes


def _member_process(k: int, spec: dict[str, Any], barrier: Any, results: Any) -> None:
    """Member k alone in its own process: the eager sequential loop (lmclab's `train_step`) on its own batches;
    reports its first step, waits at the barrier, then times its steps."""
    try:
        torch.set_num_threads(spec["threads"])
        warnings.filterwarnings("ignore", message="There is a performance drop")
        ns = argparse.Namespace(**spec["ns"])
        device = torch.device(ns.device)
        data = load_data(ns, device)
        xs, ys = member_batches(data, ns, k)
        state = TrainingState.initial(configs(ns)[k], data.info, device)
        pool = xs.shape[0]
        started = time.perf_counter()
        loss, _ = train_step(state.model, state.optimizer, xs[0], ys[0])
        first = {"loss": float(loss), "weights": flat(state.model.parameters()).numpy()}
        sync(device)
        first_s = time.perf_counter() - started
        for s in range(1, ns.warmup):
            train_step(state.model, state.optimizer, xs[s % pool], ys[s % pool])
        sync(device)
        results.put(("ready", k, {**first, "first_step_s": first_s, "warmup_s": time.perf_counter() - started}))
        barrier.wait(PROCESS_TIMEOUT_S)
        start = time.monotonic()
        for s in range(ns.warmup, ns.warmup + ns.steps):
            train_step(state.model, state.optimizer, xs[s % pool], ys[s % pool])
        sync(device)
        results.put(("done", k, {"start": start, "end": time.monotonic()}))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the candidate
        results.put(("error", k, f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))
        with contextlib.suppress(Exception):
            barrier.abort()


def _collect(results: Any, kind: str, k: int, procs: list[Any], timeout: float) -> dict[int, dict[str, Any]]:
    """One `kind` message from each of the k members; RuntimeError on a member's error or death, or a timeout."""
    got: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(got) < k:
        try:
            what, member, payload = results.get(timeout=1.0)
        except queue_module.Empty:
            dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"member process {dead[0]} exited with code {procs[dead[0]].exitcode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"member processes not {kind} after {timeout:.0f} s") from None
            continue
        if what == "error":
            raise RuntimeError(f"member process {member}: {payload}")
        if what == kind:
            got[member] = payload
    return got


def processes_candidate(setup: Setup) -> dict[str, Any]:
    """K spawned processes, one member each, released together; aggregate images/s from the barrier to the last
    finish. Start-up (spawn, imports, CUDA context, data, warm-up) up to the barrier is reported apart."""
    ns, k = setup.ns, setup.k
    threads = max(1, torch.get_num_threads() // k) if setup.device.type == "cpu" else torch.get_num_threads()
    spec = {"ns": {key: v for key, v in vars(ns).items() if key != "json"}, "threads": threads}
    mp = torch_mp.get_context("spawn")
    barrier, results = mp.Barrier(k + 1), mp.Queue()
    procs = [mp.Process(target=_member_process, args=(i, spec, barrier, results), daemon=True) for i in range(k)]
    started = time.perf_counter()
    try:
        for p in procs:
            p.start()
        ready = _collect(results, "ready", k, procs, PROCESS_TIMEOUT_S)
        startup = time.perf_counter() - started
        barrier.wait(PROCESS_TIMEOUT_S)
        done = _collect(results, "done", k, procs, PROCESS_TIMEOUT_S)
        for p in procs:
            p.join(60)
    finally:
        with contextlib.suppress(Exception):
            barrier.abort()
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(10)
    wall = max(d["end"] for d in done.values()) - min(d["start"] for d in done.values())
    rec: dict[str, Any] = {
        "img_s": k * ns.steps * ns.batch_size / wall,
        "ms_per_step": 1e3 * wall / ns.steps,
        "first_step_s": max(r["first_step_s"] for r in ready.values()),
        "warmup_s": max(r["warmup_s"] for r in ready.values()),
        "startup_s": startup,
        "timed_s": wall,
        "threads_per_process": threads,
        "_losses": torch.tensor([ready[i]["loss"] for i in range(k)], dtype=torch.float64),
        "_weights": [torch.from_numpy(ready[i]["weights"]).double() for i in range(k)],
    }
    if setup.device.type == "cpu":
        rec["note"] = f"{k} processes share this machine's {os.cpu_count()} cores ({threads} torch thread(s) each)"
    else:
        rec["note"] = f"{k} processes time-share the device (no MPS server started)"
    return rec


# ------------------------------------------------------------------------------------------------ measure


def precision(device: torch.device) -> str:
    return "bfloat16 autocast" if device.type == "cuda" else "float32"


def check(setup: Setup, rec: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """The candidate's first step against sequential's: largest |Δ loss| and largest ‖w − w_seq‖ / ‖w_seq − w_0‖
    over the members, and whether both are within TOLERANCES."""
    loss_tol, update_tol = TOLERANCES[precision(setup.device)]
    loss_diff = (rec["_losses"] - reference["_losses"]).abs().max().item()
    update = max(
        ((w - ref).norm() / (ref - w0).norm()).item()
        for w, ref, w0 in zip(rec["_weights"], reference["_weights"], setup.initial, strict=True)
    )
    ok = loss_diff <= loss_tol and update <= update_tol and math.isfinite(loss_diff) and math.isfinite(update)
    return {"loss_max_abs_diff": loss_diff, "update_max_rel_diff": update, "agrees": ok}


def run_candidate(setup: Setup, name: str) -> dict[str, Any]:
    if name in CUDA_ONLY and setup.device.type != "cuda":
        return {"status": "skipped", "why": "CUDA graphs need CUDA"}
    rec = processes_candidate(setup) if name == "processes" else stepped_candidate(setup, name)
    return {"status": "ok", **rec}


def describe(setup: Setup) -> str:
    ns, device = setup.ns, setup.device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    options = setup.configs[0].model_options()
    return (
        f"{ns.k} × {ns.model} {options} on {ns.dataset} (batch {ns.batch_size} per member, {ns.warmup} warm-up + "
        f"{ns.steps} timed steps, a pool of {ns.pool} batches per member) on {where}, torch {torch.__version__}, "
        f"{precision(device)}"
    )


def _line(name: str, rec: dict[str, Any]) -> str:
    if rec["status"] != "ok":
        return f"{name:<16} {rec['status']}: {rec.get('why') or rec.get('error')}"
    c = rec.get("check", {})
    ratio = f"{rec['ratio']:5.2f}×" if "ratio" in rec else "  n/a"
    extra = f", start-up {rec['startup_s']:.1f} s" if "startup_s" in rec else ""
    if "dynamo" in rec:
        extra += ", dynamo " + ", ".join(f"{k} {v}" for k, v in rec["dynamo"].items() if k != "graph_break_reasons")
    return (
        f"{name:<16} {rec['img_s']:>10,.0f} img/s  {ratio}  first step {rec['first_step_s']:6.2f} s, "
        f"warm-up {rec['warmup_s']:6.2f} s{extra};  check: |Δ loss| {c.get('loss_max_abs_diff', math.nan):.1e}, "
        f"update Δ {c.get('update_max_rel_diff', math.nan):.1e} {'ok' if c.get('agrees') else 'DISAGREES'}"
    )


def measure(ns: argparse.Namespace, stop_on: tuple[type[BaseException], ...] = ()) -> dict[str, Any]:
    """Every candidate of `ns.candidates` (sequential first); prints a line each and the winner; returns
    {"candidates": {name: record}, "winner" (the fastest whose check agrees), "ratio" (winner / sequential),
    "fastest", "img_s", "vs_sequential" and "statuses" by candidate, …}. An exception of a `stop_on` type (a
    caller's time budget) marks the running candidate interrupted and the rest skipped; the numbers so far are
    returned."""
    warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap fallbacks: counted in the time
    setup = prepare(ns)
    loss_tol, update_tol = TOLERANCES[precision(setup.device)]
    print(describe(setup), flush=True)
    results: dict[str, dict[str, Any]] = {}
    reference: dict[str, Any] | None = None
    for i, name in enumerate(ns.candidates):
        started = time.perf_counter()
        try:
            rec = run_candidate(setup, name)
        except stop_on:
            results[name] = {
                "status": "interrupted",
                "why": f"time budget spent after {time.perf_counter() - started:.0f} s",
            }
            for rest in ns.candidates[i + 1 :]:
                results[rest] = {"status": "skipped", "why": "time budget spent"}
            print(
                f"{name:<16} interrupted (time budget spent); skipped: {', '.join(ns.candidates[i + 1 :])}", flush=True
            )
            break
        except Exception as e:  # noqa: BLE001 - a failing candidate is a result; the others still run
            rec = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        if name == "sequential":
            reference = rec if rec["status"] == "ok" else None
        if rec["status"] == "ok" and reference is not None:
            rec["ratio"] = rec["img_s"] / reference["img_s"]
            rec["check"] = check(setup, rec, reference)
        results[name] = {key: v for key, v in rec.items() if not key.startswith("_")}
        print(_line(name, results[name]), flush=True)
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()
    timed = {n: r for n, r in results.items() if "ratio" in r}
    fine = {n: r for n, r in timed.items() if r["check"]["agrees"]}
    winner = max(fine, key=lambda n: fine[n]["img_s"]) if fine else None
    fastest = max(timed, key=lambda n: timed[n]["img_s"]) if timed else None
    if winner is None:
        print("winner: none (sequential failed, or no candidate agrees with it)", flush=True)
    else:
        print(
            f"winner: {winner}, {fine[winner]['ratio']:.2f}× sequential ({fine[winner]['img_s']:,.0f} img/s)",
            flush=True,
        )
    if fastest != winner:
        print(f"fastest: {fastest}, but its first step disagrees with sequential's (see its check)", flush=True)
    return {
        "setup": describe(setup),
        "k": ns.k,
        "model": ns.model,
        "model_options": setup.configs[0].model_options(),
        "dataset": ns.dataset,
        "batch_size": ns.batch_size,
        "steps": ns.steps,
        "warmup": ns.warmup,
        "precision": precision(setup.device),
        "tolerance": {"loss_max_abs_diff": loss_tol, "update_max_rel_diff": update_tol},
        "winner": winner,
        "ratio": fine[winner]["ratio"] if winner else None,
        "fastest": fastest,
        "img_s": {n: r["img_s"] for n, r in results.items() if r["status"] == "ok"},
        "vs_sequential": {n: r["ratio"] for n, r in results.items() if "ratio" in r},
        "statuses": {n: r["status"] for n, r in results.items()},
        "candidates": results,
    }


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        result = measure(ns)
    except (UsageError, DataError) as e:
        print(f"pack_candidates.py: error: {e}", file=sys.stderr)
        return 2
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
