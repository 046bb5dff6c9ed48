"""One prepared GPU session: every GPU measurement of issue 13 item 3 (and item 2's weight matching), in one command.

Runs the bench scripts' own functions in priority order, each stage under its own time budget (a stage that
runs out skips its remaining cases, and an overrunning case is interrupted, each recorded as such), the whole
within `--budget` seconds (default 480, so the command ends well inside the device tool's 600 s per command):

  1 train_throughput   trainer vs a plain DataLoader loop, ResNet-20 ×1 BN and LN, CIFAR-10 (target ≥ 2×)
  2 packed             8 ResNet-20 ×1 trained as one pack vs one after another, LN then BN (target ≥ 4×)
  3 pack_candidates    the ways of training 8 ResNet-20 ×1 at once, step by step (bench/pack_candidates.py):
                       one after another (the baseline), lmclab's vmap pack, K processes, torch.compile and CUDA
                       graphs of both; the eager ones of LN and BN first, then the compiled ones (target ≥ 4×: the
                       winner vs one after another)
  4 hessian_trace      time to a 10 % relative CI half-width vs one double-backward probe per batch,
                       MLP and ResNet-20 (target ≥ 5×)
  5 pyhessian          issue 13 item 2 on the GPU: PyHessian 0.1 itself vs lmclab (hessian_trace.py's vs_pyhessian),
                       MLP, 2,000 MNIST images in one batch: trace to a 10 % CI half-width, then the top eigenvalue
                       at matched accuracy (target ≥ 2×); skipped, saying why, where PyHessian cannot be imported
  6 logit_derivatives  all logits' Taylor coefficients to order 2 in one pass vs per-(input, class) HVPs,
                       MLP and ResNet-20 (target ≥ 100×)
  7 second_order       (25-point path + order 2 at both ends) / the path alone, MLP and ResNet-20 (target ≤ 1.5×)
  8 weight_matching    lmclab vs a float32 port of Git Re-Basin on the same device, ResNet-20 ×8/×16/×32
                       random and a trained ×8 pair, the MLP (target ≥ 5× for ×8 and wider)
  9 profile            what bounds each workload behind those targets (bench/gpu_profile.py): torch.profiler's
                       device, host and wall ms per call, busy = device / wall, launches, and the top ops
                       (no target; the tables go to gpu_profile.txt)

Writes `gpu_session.json` (every number, the card, torch/CUDA versions; rewritten after every case),
`gpu_session.md` (the ratios against their targets), `gpu_profile.txt` (stage 9's tables) and
`gpu_session.log` (everything printed) to `--out`
(default $OUT, else ./gpu_out). `--presets benko,ito,singh,width` adds one stage per preset:
`lmclab run X --preset gpu` (≈ 8 min each: one preset per command, with `--stages none`), its tables and
figures packed into `preset_X.tar.gz`. `--device cpu --tiny` runs every stage at a tiny size in seconds
(the presets as `--plan`), which tests/test_gpu_session.py does.

The device machine has its own python3 with torch (the project's .venv is a CPU build for another Python,
1.9 GB, and does not travel); lmclab's other needs (numpy, scipy, safetensors, tqdm, matplotlib, pillow) are
there, and this script puts src/ on the path itself. PyHessian 0.1 is not there: `--pack-data` also puts its
wheel (pure Python, no dependencies) in .cache/gpu_data/wheels, and with `--data-pack` the script pip-installs
every wheel there offline into /tmp/site and puts that first on sys.path (a failure is recorded in the meta's
"wheels", and the pyhessian stage is then skipped with the reason). The data travels compressed (only the checkout and
carried ignored paths travel, 64 MiB at most; cifar10-jpeg.zip alone is 62 MiB, ≈ 18 MiB as xz) in
.cache/gpu_data (ignored by .gitignore), unpacked there before the first stage and checked by lmclab's
loaders against the checksums its registry records. What the GPU session types:

  here, once (≈ 2 min on one core; writes .cache/gpu_data, ≈ 27 MiB: the data and wheels/PyHessian-0.1-*.whl):
      .venv/bin/python bench/gpu_session.py --pack-data
  device tool `run`, timeout_s 600, carry [".cache/gpu_data"], command:
      PYTHONUNBUFFERED=1 python3 bench/gpu_session.py --data-pack .cache/gpu_data --out $OUT
  a 15-minute device session holds the machine's start (minutes) and this command (≈ 8.5 min) only; each preset
  takes a command of its own, in a later session (same carry, timeout_s 600):
      PYTHONUNBUFFERED=1 python3 bench/gpu_session.py --data-pack .cache/gpu_data --out $OUT \\
          --stages none --presets width --budget 540
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import io
import json
import lzma
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "src")]  # the bench scripts, and lmclab without installing it

import torch  # noqa: E402

import gpu_profile  # noqa: E402
import hessian_trace  # noqa: E402
import logit_derivatives  # noqa: E402
import pack_candidates  # noqa: E402
import packed_training  # noqa: E402
import second_order_cost  # noqa: E402
import train_throughput  # noqa: E402
import weight_matching  # noqa: E402
from lmclab.cli import main as lmclab_main  # noqa: E402
from lmclab.config import DataConfig, ModelConfig, RunConfig, SeedConfig, TrainConfig  # noqa: E402
from lmclab.data import load_split  # noqa: E402
from lmclab.models import build_model  # noqa: E402
from lmclab.permutation import derive_spec  # noqa: E402
from lmclab.training import RunOptions, train  # noqa: E402

#: The files the data pack holds, relative to a data directory (lmclab's loaders verify each after unpacking).
PACKED_FILES = (
    "cifar10-jpeg.zip",
    "MNIST/raw/train-images-idx3-ubyte",
    "MNIST/raw/train-labels-idx1-ubyte",
    "MNIST/raw/t10k-images-idx3-ubyte",
    "MNIST/raw/t10k-labels-idx1-ubyte",
)
DEFAULT_PACK = ROOT / ".cache" / "gpu_data"
PRESETS = ("benko", "ito", "singh", "width")
#: Python packages the device machine lacks, carried as wheels in <pack>/wheels (pure Python, no dependencies).
WHEELS = ("pyhessian==0.1",)
SITE = Path("/tmp/site")  # where the device installs them (put on sys.path)
PRESET_SECONDS = 480.0  # a preset's nominal share of the budget (each is sized to about 8 minutes)


# ------------------------------------------------------------------------------------------------ data pack


def pack_data(source: Path, dest: Path, files: tuple[str, ...] = PACKED_FILES) -> list[Path]:
    """xz-compress each of `files` (relative to `source`) to dest/<file>.xz; existing ones are kept."""
    written = []
    for rel in files:
        src, out = source / rel, dest / f"{rel}.xz"
        if not src.is_file():
            raise SystemExit(f"--pack-data: {src} not found (give --data-dir, the folder holding {rel})")
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            with open(src, "rb") as fin, lzma.open(tmp, "wb", preset=9 | lzma.PRESET_EXTREME) as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
            tmp.replace(out)
        written.append(out)
    return written


def pack_wheels(dest: Path, requirements: tuple[str, ...] = WHEELS) -> list[Path]:
    """Download each requirement's wheel (no dependencies) into `dest` with this Python's pip, or build it from the
    sdist (`pip wheel`) where the registry has no wheel; a requirement whose wheel is already there is kept."""
    dest.mkdir(parents=True, exist_ok=True)
    for req in requirements:
        name, version = req.split("==")
        if any(w.name.lower().startswith(f"{name.lower()}-{version}-") for w in dest.glob("*.whl")):
            continue
        pip = [sys.executable, "-m", "pip"]
        got = subprocess.run([*pip, "download", req, "--no-deps", "--only-binary=:all:", "-d", str(dest)], check=False)
        if got.returncode != 0:
            subprocess.run([*pip, "wheel", req, "--no-deps", "-w", str(dest)], check=True)
    return sorted(dest.glob("*.whl"))


def install_wheels(folder: Path, target: Path = SITE) -> dict[str, Any]:
    """pip-install every wheel in `folder` into `target` (offline, no dependencies) and put `target` first on
    sys.path. Never raises: the record says what was installed, or the error (a stage needing it then skips)."""
    wheels = sorted(folder.glob("*.whl"))
    rec: dict[str, Any] = {"wheels": [w.name for w in wheels], "target": str(target)}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--upgrade", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir"]
    try:
        done = subprocess.run(
            [*cmd, "--target", str(target), *map(str, wheels)], capture_output=True, text=True, timeout=300
        )
        rec["ok"] = done.returncode == 0
        if not rec["ok"]:
            rec["error"] = (done.stderr or done.stdout)[-2000:]
    except Exception as e:  # noqa: BLE001 - recorded; the session goes on without the package
        rec.update(ok=False, error=f"{type(e).__name__}: {e}")
    if rec["ok"] and str(target) not in sys.path:
        sys.path.insert(0, str(target))
        importlib.invalidate_caches()
    return rec


def unpack_data(pack: Path, dest: Path) -> list[str]:
    """Decompress every pack/<file>.xz to dest/<file> (kept if already there); the files' relative paths."""
    names = []
    for xz in sorted(pack.rglob("*.xz")):
        rel = xz.relative_to(pack).as_posix()[: -len(".xz")]
        out = dest / rel
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            with lzma.open(xz, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
            tmp.replace(out)
        names.append(rel)
    if not names:
        raise SystemExit(f"--data-pack: no .xz files under {pack} (make them here with --pack-data)")
    return names


# ------------------------------------------------------------------------------------------------ budgets


class StageTimeout(BaseException):
    """Raised by SIGALRM when a stage's budget is spent (a BaseException: no `except Exception` swallows it)."""


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise StageTimeout in this (main) thread after `seconds`."""

    def fire(signum: int, frame: object) -> None:
        raise StageTimeout

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Tee(io.TextIOBase):
    """A text stream writing to every one of `streams`."""

    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for stream in self.streams:
            stream.write(s)
        return len(s)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@dataclasses.dataclass
class Context:
    """What a stage needs: where and how big it runs, and `case` to run one measurement under the budget."""

    device: torch.device
    tiny: bool
    data_dir: str
    scratch: Path
    out: Path
    record: dict[str, Any]
    deadline: float = math.inf
    cases: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def size(self, full: Any, tiny: Any) -> Any:
        return tiny if self.tiny else full

    def skip(self, label: str, why: str) -> None:
        """Record `label` as skipped for `why` (a need of the case is missing)."""
        print(f"-- {label}: skipped ({why})", flush=True)
        self.cases.append({"case": label, "status": "skipped", "why": why})
        write_outputs(self.out, self.record)

    def case(self, label: str, fn: Callable[[], dict[str, Any]]) -> None:
        """Run `fn` unless the stage's budget is spent (then: skipped); interrupted when it runs past it;
        failed (with the error) when it raises. The record is written to disk after every case."""
        left = self.deadline - time.monotonic()
        rec: dict[str, Any] = {"case": label}
        if left <= 0:
            rec.update(status="skipped", why="stage budget spent")
            print(f"-- {label}: skipped (stage budget spent)", flush=True)
        else:
            print(f"-- {label} ({left:.0f} s of the stage's budget left)", flush=True)
            start = time.monotonic()
            try:
                with alarm(left):
                    result = fn()
                rec.update(status="ok", **{("name" if k == "case" else k): v for k, v in result.items()})
            except StageTimeout:
                rec.update(status="interrupted", why=f"stage budget spent after {time.monotonic() - start:.0f} s")
                print(f"-- {label}: interrupted (stage budget spent)", flush=True)
            except Exception as e:  # noqa: BLE001 - one case failing must not cost the others
                rec.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
                print(f"-- {label}: FAILED {type(e).__name__}: {e}", flush=True)
            rec["seconds"] = round(time.monotonic() - start, 2)
            if self.device.type == "cuda":
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
        self.cases.append(rec)
        write_outputs(self.out, self.record)


# ------------------------------------------------------------------------------------------------ stages


def stage_train_throughput(ctx: Context) -> None:
    """bench/train_throughput.py's bench_case: ResNet-20 ×1 (BN, LN) on CIFAR-10, batch 128, DataLoader
    baselines with 0 and 8 workers (the target is against the faster)."""
    s = ctx.size
    workers = (0, min(8, os.cpu_count() or 1)) if not ctx.tiny else (0, 1)
    for norm in ("batchnorm", "layernorm"):
        for w in workers:
            name = f"ResNet-20 ×1 {norm} / CIFAR-10, batch {s(128, 8)}"
            case = functools.partial(
                train_throughput.bench_case,
                name,
                "cifar10",
                "resnet20",
                {"width": 1, "norm": norm},
                s(128, 8),
                s(60, 2),
                s(20000, 256),
                ctx.device,
                ctx.data_dir,
                w,
                s(3, 1),
            )
            ctx.case(f"{name}, DataLoader workers {w}", case)


def _packed_case(ns: argparse.Namespace) -> dict[str, Any]:
    result = packed_training.measure(ns)
    return {**result, "ratio": result["steps_ratio"]}  # the target: aggregate images/s between first and last step


def stage_packed(ctx: Context) -> None:
    """bench/packed_training.py's measure: K = 8 ResNet-20 ×1 (LN, then BN) on 10,000 CIFAR-10 images, 60 steps
    of batch 128, pack vs one after another (tiny: 2 MLPs on MNIST; a CPU evaluation of ResNets is too slow)."""
    cases = [("mlp", None, "mnist")] if ctx.tiny else [("resnet20", n, "cifar10") for n in ("layernorm", "batchnorm")]
    for model, norm, dataset in cases:
        ns = argparse.Namespace(
            device=str(ctx.device),
            k=ctx.size(8, 2),
            model=model,
            hidden="16",
            norm=norm,
            dataset=dataset,
            train_subset=ctx.size(10000, 256),
            batch_size=ctx.size(128, 32),
            steps=ctx.size(60, 4),
            repeats=1,
            seed=0,
            data_dir=ctx.data_dir,
        )
        ctx.case(f"{ns.k} × {model} {norm or ''} / {dataset}", functools.partial(_packed_case, ns))


def _pack_candidates_case(argv: list[str]) -> dict[str, Any]:
    """bench/pack_candidates.py's measure; a spent stage budget ends it with the candidates measured so far."""
    result = pack_candidates.measure(pack_candidates.parse_args(argv), stop_on=(StageTimeout,))
    keep = ("winner", "ratio", "fastest", "img_s", "vs_sequential", "statuses", "precision")
    return {**{k: result[k] for k in keep}, "detail": result}


def stage_pack_candidates(ctx: Context) -> None:
    """bench/pack_candidates.py's measure, at the step level: K = 8 ResNet-20 ×1 on CIFAR-10 batches already on
    the device, batch 128, 5 warm-up and 40 timed steps. The eager candidates (sequential, vmap, processes) of LN
    and of BN first, then the compiled ones (vmap+cudagraphs, vmap+compile, cudagraphs, compile: tens of seconds
    of compilation each), LN first; each case has its own sequential baseline (tiny: 2 MLPs on MNIST, every
    candidate in one case, the CUDA-graph ones skipped)."""
    if ctx.tiny:
        argv = ["--model", "mlp", "--hidden", "16", "--k", "2", "--batch-size", "32", "--steps", "4", "--warmup", "2"]
        argv += ["--subset", "256", "--pool", "2"]
        cases = [("2 × MLP / MNIST, every candidate", argv)]
    else:
        argv = ["--model", "resnet20", "--width", "1", "--k", "8", "--batch-size", "128", "--steps", "40"]
        argv += ["--warmup", "5", "--subset", "4096", "--pool", "8"]
        groups = (
            ("eager", "sequential,vmap,processes"),
            ("compiled", "vmap+cudagraphs,vmap+compile,cudagraphs,compile"),
        )
        cases = [
            (f"8 × ResNet-20 ×1 {norm} / CIFAR-10, {what}", [*argv, "--norm", norm, "--candidates", names])
            for what, names in groups
            for norm in ("layernorm", "batchnorm")
        ]
    for label, args in cases:
        where = ["--device", str(ctx.device), "--data-dir", ctx.data_dir]
        ctx.case(label, functools.partial(_pack_candidates_case, [*args, *where]))


def _trace_case(ctx: Context, name: str, ns: argparse.Namespace) -> dict[str, Any]:
    """bench/hessian_trace.py: calibrate the HVP method, then lmclab and PyHessian's way in lockstep."""
    model, data, examples, target, point = hessian_trace.setup_model(name, ns, ctx.device)
    cal = hessian_trace.calibrate(model, data, ns.block, ns.batch_size, ctx.device, hessian_trace.CANDIDATES)
    method, vectorize, _ = min(cal, key=lambda c: c[2])
    res = hessian_trace.lockstep(model, data, ns, target, examples, method, vectorize, ctx.device)
    sides = {
        k: {
            "probes": len(v["samples"]),
            "passes": v["passes"],
            "seconds": v["time"],
            "trace": v["mean"],
            "half": v["half"],
        }
        for k, v in res.items()
    }
    ratio = res["pyhessian"]["time"] / res["lmclab"]["time"]
    print(f"{name}: time to relative half-width ≤ {target}: PyHessian's way / lmclab = {ratio:.2f}×", flush=True)
    return {
        "model": name,
        "point": point,
        "examples": examples,
        "target_half_width": target,
        "hvp": f"{method}, vectorize={vectorize}",
        "calibration_s_per_hvp": {f"{m}/{v}": t for m, v, t in cal},
        "lmclab": sides["lmclab"],
        "pyhessian_way": sides["pyhessian"],
        "ratio": ratio,
    }


def stage_hessian_trace(ctx: Context) -> None:
    s = ctx.size
    ns = argparse.Namespace(
        data_dir=ctx.data_dir,
        mlp_examples=s(1000, 100),
        mlp_train=s(20000, 256),
        mlp_target=s(0.1, 0.5),
        resnet_examples=s(500, 10),
        resnet_train_steps=0,
        resnet_target=s(0.1, 0.5),
        batch_size=s(50, 5),
        block=s(10, 2),
        min_probes=s(10, 2),
        max_probes=s(2000, 4),
        seed=0,
    )
    for name in ("mlp", "resnet20"):
        ctx.case(f"Hessian trace, {name}", functools.partial(_trace_case, ctx, name, ns))


def stage_pyhessian(ctx: Context) -> None:
    """bench/hessian_trace.py's vs_pyhessian on this device: PyHessian 0.1 itself (carried as a wheel, see
    --pack-data) vs lmclab, MLP 784-512³-10 after one Adam pass, MNIST test images in one batch (both sides at
    their best settings: one gradient graph reused by every product): trace to a 10 % relative CI half-width,
    then the top eigenvalue at matched accuracy (target ≥ 2×). Skipped, with the reason, without PyHessian."""
    s = ctx.size
    labels = ("PyHessian 0.1 vs lmclab, trace", "PyHessian 0.1 vs lmclab, top eigenvalue")
    try:
        where = importlib.import_module("pyhessian.hessian").__file__
    except Exception as e:  # noqa: BLE001 - any failure to import it means: skip, saying why
        for label in labels:
            ctx.skip(label, f"pyhessian not importable: {type(e).__name__}: {e}")
        return
    ns = argparse.Namespace(
        data_dir=ctx.data_dir,
        pyhessian_examples=s(2000, 100),
        mlp_target=s(0.1, 0.5),
        min_probes=s(10, 2),
        max_probes=s(2000, 6),
        block=s(10, 2),
        sketch=s(10, 2),
        seed=0,
        seeds=s(3, 1),
        power_tol=1e-3,
        power_iterations=s(1000, 30),
        lanczos_tols=s([0.3, 0.1, 0.03, 0.01, 1e-3], [0.1, 1e-3]),
    )
    trained: list[torch.nn.Module] = []

    def model() -> torch.nn.Module:  # trained once, by whichever case runs first
        if not trained:
            torch.manual_seed(0)
            net = build_model("mlp", input_shape=(1, 28, 28), num_classes=10).to(ctx.device)
            hessian_trace.train_mlp(net, ctx.device, s(20000, 256), ctx.data_dir)
            trained.append(net)
        return trained[0]

    def trace() -> dict[str, Any]:
        r = hessian_trace.pyhessian_trace(model(), ns, ctx.device)
        return {**{k: v for k, v in r.items() if k != "per_seed"}, "pyhessian_file": where, "detail": r["per_seed"]}

    def eigen() -> dict[str, Any]:
        r = hessian_trace.pyhessian_eigen(model(), ns, ctx.device)
        one = r["one_run"]
        return {
            "ratio": r["ratio"],
            "ratio_basis": r["ratio_basis"],
            "reference": r["reference"],
            "pyhessian_power": one["pyhessian"],
            "matched_one_run": one.get("matched"),
            "seeds_seconds": {k: v["seconds"] for k, v in r["seeds"].items()},
            "seeds_hvps": {k: v["hvps"] for k, v in r["seeds"].items()},
            "detail": r,
        }

    ctx.case(labels[0], trace)
    ctx.case(labels[1], eigen)


def stage_logit_derivatives(ctx: Context) -> None:
    """bench/logit_derivatives.py's bench_logits: MLP (MNIST test), ResNet-20 ×1 LN and BN (random images)."""
    s = ctx.size
    ns = argparse.Namespace(
        data_dir=Path(ctx.data_dir),
        batch_size=s(50, 5),
        pair_inputs=s(20, 2),
        pass_inputs=s(1000, 10),
        resnet_pass_inputs=s(500, 4),
        full=10_000,
    )
    for name in ("mlp", "resnet20-layernorm", "resnet20-batchnorm"):
        ctx.case(f"logit derivatives, {name}", functools.partial(logit_derivatives.bench_logits, name, ns, ctx.device))


def stage_second_order(ctx: Context) -> None:
    """bench/second_order_cost.py's case: MLP on the MNIST test set, ResNet-20 ×1 LN on the CIFAR-10 test set."""
    cases = [
        ("MLP 784-512³-10 / MNIST test", "mnist", "mlp", {}, ctx.size(None, 64)),
        ("ResNet-20 ×1 LN / CIFAR-10 test", "cifar10", "resnet20", {"width": 1}, ctx.size(None, 8)),
    ]
    for name, dataset, model, options, examples in cases:
        fn = functools.partial(
            second_order_cost.case, name, dataset, model, options, examples, ctx.device, ctx.data_dir, 2
        )
        ctx.case(name, fn)


def _trained_pair(ctx: Context, model: ModelConfig, data: DataConfig, train_config: TrainConfig) -> tuple:
    """(label, θ_A, θ_B, spec) of two runs of one recipe (seeds 0 and 1) trained on this device."""
    opts = RunOptions(
        runs_dir=str(ctx.scratch / "wm_runs"),
        data_dir=ctx.data_dir,
        device=str(ctx.device),
        progress=False,
        download=False,
    )
    base = RunConfig(data=data, model=model, train=train_config)
    runs = [train(dataclasses.replace(base, seeds=SeedConfig.from_seed(s)), opts) for s in (0, 1)]
    shape = (1, 28, 28) if data.dataset == "mnist" else (3, 32, 32)
    options = {k: v for k, v in (("width", model.width), ("norm", model.norm), ("hidden", model.hidden)) if v}
    spec = derive_spec(build_model(model.model, input_shape=shape, num_classes=10, **options), torch.randn(2, *shape))
    label = f"{model.model} {options} trained {train_config.epochs} epochs"
    return label, runs[0].load_state(), runs[1].load_state(), spec


def _wm_case(ctx: Context, make: Callable[[], tuple], repeat: int, wide: bool) -> dict[str, Any]:
    label, pa, pb, spec = make()
    result = weight_matching.compare(label, pa, pb, spec, ctx.device, 100, repeat)
    return {**result, "target_applies": wide}


def stage_weight_matching(ctx: Context) -> None:
    """bench/weight_matching.py's compare: ResNet-20 LN random ×8, a trained ×8 pair (2 epochs), ×16, the MLP,
    ×32 (tiny: ×1, a trained small MLP pair, the MLP)."""
    if ctx.tiny:
        trained = (ModelConfig("mlp", hidden=(32, 32)), DataConfig("mnist", train_subset=256))
        schedule = TrainConfig(optimizer="adam", lr=1e-3, batch_size=64, epochs=1)
        widths: tuple[int, ...] = (1,)
    else:
        trained = (ModelConfig("resnet20", width=8, norm="layernorm"), DataConfig("cifar10"))
        schedule = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=256, epochs=2)
        widths = (8, 16, 32)
    cases: list[tuple[str, Callable[[], tuple], int, bool]] = [
        (f"ResNet-20 ×{widths[0]} random", functools.partial(weight_matching.resnet_pair, widths[0]), 2, True),
        ("trained pair", functools.partial(_trained_pair, ctx, *trained, schedule), 2, True),
        *((f"ResNet-20 ×{w} random", functools.partial(weight_matching.resnet_pair, w), 1, True) for w in widths[1:2]),
        ("MLP 784-512×3-10 random", functools.partial(weight_matching.mlp_pair, None), 2, False),
        *((f"ResNet-20 ×{w} random", functools.partial(weight_matching.resnet_pair, w), 1, True) for w in widths[2:]),
    ]
    for label, make, repeat, wide in cases:
        ctx.case(f"weight matching, {label}", functools.partial(_wm_case, ctx, make, ctx.size(repeat, 1), wide))


def _preset_case(ctx: Context, name: str) -> dict[str, Any]:
    """`lmclab run NAME --preset gpu` (tiny: with --plan) into a scratch store; its out dir as a tarball."""
    out_dir = ctx.scratch / f"{name}-gpu"
    argv = ["run", name, "--preset", "gpu", "--out", str(out_dir), "--runs-dir", str(ctx.scratch / "preset_runs")]
    argv += ["--data-dir", ctx.data_dir, "--offline", "--no-progress", "--device", str(ctx.device), "--json"]
    argv += ["--plan"] if ctx.tiny else []
    print("lmclab " + " ".join(argv), flush=True)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(Tee(sys.stdout, captured)):
            code = lmclab_main(argv)
    finally:
        archive = None
        if out_dir.is_dir():
            archive = ctx.out / f"preset_{name}.tar.gz"
            with tarfile.open(archive, "w:gz") as tar:
                tar.add(out_dir, arcname=out_dir.name)
    text = captured.getvalue()
    try:
        summary: Any = json.loads(text)
    except ValueError:
        summary = text[-4000:]
    if code != 0:
        raise RuntimeError(f"lmclab run {name} exited {code}: {text[-500:]}")
    return {"exit_code": code, "archive": archive and archive.name, "summary": summary}


def _profile_case(ctx: Context, workload: gpu_profile.Workload, done: list[dict[str, Any]]) -> dict[str, Any]:
    """bench/gpu_profile.py's profile of one workload; gpu_profile.txt in `out` holds every table so far."""
    rec = gpu_profile.profile_workload(workload, ctx.device, ctx.tiny, ctx.size(5, 1))
    done.append(rec)
    gpu_profile.write_text(ctx.out / "gpu_profile.txt", ctx.device, done)
    return {k: v for k, v in rec.items() if k not in ("table", "workload")}


def stage_profile(ctx: Context) -> None:
    """bench/gpu_profile.py: torch.profiler over each workload behind the targets above (a train step, HVPs,
    the all-logit Taylor pass, a batched path, weight matching), so that a missed target comes with what
    bounds it (busy = kernel time / wall time) from the same session; the tables go to gpu_profile.txt."""
    done: list[dict[str, Any]] = []
    for w in gpu_profile.WORKLOADS:
        ctx.case(w.name, functools.partial(_profile_case, ctx, w, done))


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    seconds: float  # nominal share of the budget (weights: a stage finishing early leaves its time to the rest)
    target: str  # the target, as "≥ 2" / "≤ 1.5"; "" for none
    run: Callable[[Context], None]


STAGES = {
    s.name: s
    for s in (
        Stage("train_throughput", 50, "≥ 2", stage_train_throughput),
        Stage("packed", 55, "≥ 4", stage_packed),
        # the winner vs one after another; its compiled candidates take tens of seconds of compilation each
        Stage("pack_candidates", 80, "≥ 4", stage_pack_candidates),
        Stage("hessian_trace", 70, "≥ 5", stage_hessian_trace),
        Stage("pyhessian", 20, "≥ 2", stage_pyhessian),
        Stage("logit_derivatives", 50, "≥ 100", stage_logit_derivatives),
        Stage("second_order", 30, "≤ 1.5", stage_second_order),
        Stage("weight_matching", 90, "≥ 5", stage_weight_matching),
        Stage("profile", 20, "", stage_profile),  # what bounds each workload: no target
    )
}


def preset_stage(name: str) -> Stage:
    return Stage(
        f"preset_{name}", PRESET_SECONDS, "", lambda ctx: ctx.case(name, functools.partial(_preset_case, ctx, name))
    )


# ------------------------------------------------------------------------------------------------ outputs


def met(target: str, ratio: Any) -> str:
    if not target or not isinstance(ratio, int | float):
        return ""
    op, value = target.split()
    return "yes" if (ratio >= float(value) if op == "≥" else ratio <= float(value)) else "no"


def _brief(rec: dict[str, Any]) -> str:
    """The case's other numbers, compactly."""
    skip = {"case", "status", "ratio", "seconds", "traceback", "target_applies", "summary", "detail"}
    parts = []
    for k, v in rec.items():
        if k in skip:
            continue
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, dict):
            v = (
                "{"
                + ", ".join(f"{kk}: {vv:.4g}" if isinstance(vv, float) else f"{kk}: {vv}" for kk, vv in v.items())
                + "}"
            )
        parts.append(f"{k} {v}")
    return "; ".join(parts).replace("|", "/")


def markdown(record: dict[str, Any]) -> str:
    m = record["meta"]
    lines = [
        f"# GPU session (issue 13): {m['device_name']}",
        "",
        f"torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, Python {m['python']}; {m['mode']}; "
        f"started {m['started_utc']}, budget {m['budget_s']:.0f} s, elapsed {record.get('elapsed_s', 0):.0f} s"
        + ("" if record.get("finished") else " (NOT FINISHED: the record stops here)"),
        "",
        "| stage | case | status | ratio | target | met | s | numbers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for st in record["stages"]:
        for rec in st["cases"]:
            ratio = rec.get("ratio")
            target = st["target"] if rec.get("target_applies", True) else ""
            lines.append(
                f"| {st['name']} | {rec['case']} | {rec['status']} | "
                f"{f'{ratio:.2f}×' if isinstance(ratio, int | float) else ''} | {target} | {met(target, ratio)} | "
                f"{rec.get('seconds', '')} | {rec.get('why') or rec.get('error') or _brief(rec)} |"
            )
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, record: dict[str, Any]) -> None:
    """gpu_session.json and gpu_session.md, each replaced atomically."""
    record["elapsed_s"] = round(time.monotonic() - record["_t0"], 1)
    public = {k: v for k, v in record.items() if not k.startswith("_")}
    for name, text in (
        ("gpu_session.json", json.dumps(public, indent=1, default=str, ensure_ascii=False)),
        ("gpu_session.md", markdown(record)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def environment(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    cuda = device.type == "cuda"
    commit = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    props = torch.cuda.get_device_properties(device) if cuda else None
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or 'unknown'})",
        "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
        "memory_gib": round(props.total_memory / 2**30, 1) if props else None,
        "multiprocessors": props.multi_processor_count if props else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "commit": commit,
        "mode": "tiny (dry run)" if args.tiny else "full",
        "budget_s": args.budget,
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "argv": sys.argv[1:],
        "data_dir": args.data_dir,
    }


# ------------------------------------------------------------------------------------------------ main


def _names(allowed: tuple[str, ...], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [] if text.strip() == "none" else [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"{text!r}: allowed: distinct {what} of {', '.join(allowed)}, or none")
        return names

    return parse


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: seconds > 0")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: the dry run)")
    p.add_argument("--tiny", action="store_true", help="every stage at a tiny size (seconds on a CPU)")
    p.add_argument("--budget", type=_positive, default=480.0, help="seconds for the whole session (default 480)")
    p.add_argument(
        "--stages",
        type=_names(tuple(STAGES), "stages"),
        default=list(STAGES),
        help=f"comma-separated, run in this order (default all: {','.join(STAGES)}; none: only --presets)",
    )
    p.add_argument(
        "--presets",
        type=_names(PRESETS, "experiments"),
        default=[],
        help="comma-separated experiments to run as `lmclab run X --preset gpu` after the stages (≈ 8 min each)",
    )
    p.add_argument(
        "--out", default=os.environ.get("OUT") or "gpu_out", help="output folder (default $OUT or ./gpu_out)"
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="datasets (default: the unpacked --data-pack, else $LMCLAB_DATA_DIR's first entry, else ../shared/data)",
    )
    p.add_argument("--data-pack", type=Path, default=None, help="unpack this folder's .xz files first (the device)")
    p.add_argument("--unpack-to", type=Path, default=Path(tempfile.gettempdir()) / "lmclab_gpu_data")
    p.add_argument("--pack-data", action="store_true", help=f"only write the data pack to {DEFAULT_PACK} and exit")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    if args.pack_data:
        source = Path(
            args.data_dir
            or os.environ.get("LMCLAB_DATA_DIR", "").split(os.pathsep)[0]
            or ROOT.parent / "shared" / "data"
        )
        for path in pack_data(source, DEFAULT_PACK) + pack_wheels(DEFAULT_PACK / "wheels"):
            print(f"{path}  {path.stat().st_size / 2**20:.1f} MiB")
        return 0
    wheels = None
    if args.data_pack is not None:
        names = unpack_data(args.data_pack, args.unpack_to)
        print(f"unpacked {len(names)} files to {args.unpack_to} in {time.monotonic() - t0:.1f} s", flush=True)
        args.data_dir = args.data_dir or str(args.unpack_to)
        if (args.data_pack / "wheels").is_dir():
            wheels = install_wheels(args.data_pack / "wheels")
            print(f"wheels: {json.dumps(wheels)}", flush=True)
    args.data_dir = str(
        args.data_dir or os.environ.get("LMCLAB_DATA_DIR", "").split(os.pathsep)[0] or ROOT.parent / "shared" / "data"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu --tiny for the dry run", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "gpu_session.log", "a", buffering=1)  # noqa: SIM115 - open for the whole session
    sys.stdout, sys.stderr = Tee(sys.__stdout__, log), Tee(sys.__stderr__, log)
    stages = [STAGES[n] for n in args.stages] + [preset_stage(n) for n in args.presets]
    record: dict[str, Any] = {"_t0": t0, "meta": environment(device, args), "stages": [], "finished": False}
    record["meta"]["wheels"] = wheels
    print(json.dumps(record["meta"]), flush=True)
    try:
        # decode (and cache) the datasets before any stage's budget starts: on a fresh machine CIFAR-10's 60,000
        # JPEGs take tens of seconds, which would otherwise fall on the first stage
        for dataset in ("cifar10", "mnist"):
            for split in ("train", "test"):
                load_split(dataset, split, data_dir=args.data_dir, download=False, progress=False)
        record["meta"]["setup_s"] = round(time.monotonic() - t0, 1)
        print(f"data ready in {record['meta']['setup_s']} s", flush=True)
        with tempfile.TemporaryDirectory(prefix="gpu_session_") as scratch:
            # budgets: what is left after setup, less 3 % for the writing, shared by the stages' weights
            available = args.budget * 0.97 - (time.monotonic() - t0)
            total = sum(s.seconds for s in stages) or 1.0
            start, cumulative = time.monotonic(), 0.0
            for st in stages:
                cumulative += st.seconds
                ctx = Context(device, args.tiny, args.data_dir, Path(scratch), out, record)
                ctx.deadline = start + available * cumulative / total
                entry = {"name": st.name, "target": st.target, "budget_until_s": round(ctx.deadline - t0, 1)}
                record["stages"].append({**entry, "cases": ctx.cases})
                print(f"\n== stage {st.name} (until {ctx.deadline - t0:.0f} s of {args.budget:.0f})", flush=True)
                st.run(ctx)
        record["finished"] = True
    finally:
        write_outputs(out, record)
        print(f"\nwrote {out / 'gpu_session.json'} and {out / 'gpu_session.md'} ({time.monotonic() - t0:.0f} s)")
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        log.close()
        print((out / "gpu_session.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
