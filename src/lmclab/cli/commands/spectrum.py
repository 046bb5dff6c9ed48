"""`lmclab spectrum RUN`: the Hessian's top eigenvalues, spectral density (SLQ), per-block curvature, and
curvature along the straight paths to another run (naive and aligned) and along a stored curve (`--curve`, a
``curve_<hash>`` of `lmclab curve`). See :mod:`lmclab.curvature.spectrum`.

Results are stored content-hashed in the run store (`spectrum_<hash>/spectrum.json`, keyed by the runs, the
alignment and every setting that changes a number): the same command again reuses them and only redraws the
figures.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lmclab.cli.commands import Command
from lmclab.cli.common import (
    NON_NEGATIVE,
    POINTS,
    POSITIVE,
    _align_as_flagged,
    _allow_different_data,
    _common_io,
    _float_flag,
    _int_flag,
    _no_progress,
    _out,
    _pair_method,
    _progress,
    _say,
    _split,
    _subset,
)
from lmclab.config import SEED, UsageError, number
from lmclab.curvature.spectrum import (
    PathSpectra,
    Spectrum,
    block_partition,
    curve_spectra,
    hessian_spectrum,
    path_spectra,
    spectrum_units,
)
from lmclab.experiments.curve import INFO_FILE, load_curve
from lmclab.experiments.lmc import check_same_architecture
from lmclab.paths import default_lambdas, has_batchnorm
from lmclab.report import write_csv
from lmclab.report.spectrum import plot_density, plot_path_curvature
from lmclab.store import Run, RunStore, Store, artifact_lock, check_same_data, read_sealed_json, write_sealed_json
from lmclab.training import load_run_model, load_run_split, resolve_device

#: Bumped when what is stored changes meaning: part of every result's identity.
VERSION = 1
#: Examples per batch of each Hessian-vector product pass.
BATCH_SIZE = 500
#: Memory for the Lanczos bases of the density's starts run side by side (each holds steps × parameters values).
LANCZOS_MEMORY = 1 << 30


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory, name, or hash prefix")
    _int_flag(p, "--top", NON_NEGATIVE, 5, "largest eigenvalues by Lanczos (eigsh on the HVP; 0: none)")
    p.add_argument("--density", action="store_true", help="the spectral density by stochastic Lanczos quadrature")
    p.add_argument(
        "--blocks",
        action="store_true",
        help="per-block traces (95%% CI) and top eigenvalues: per layer, and per residual block where the model "
        "has them",
    )
    _split(p, "train")
    _subset(p, "stratified subset of the split", 1000)
    _int_flag(p, "--probes", POINTS, 100, "Hutchinson probes for tr ∇²L")
    _int_flag(p, "--block-probes", POINTS, 50, "Hutchinson probes per block (--blocks)")
    _int_flag(p, "--starts", POSITIVE, 10, "random Rademacher starts of the density (--density)")
    _int_flag(p, "--steps", POSITIVE, 60, "Lanczos steps per start of the density (--density)")
    sigma = number(0, strict=True)
    shown = "0.003 × the spectrum's range"
    _float_flag(p, "--sigma", sigma, None, "Gaussian smoothing width of the density", shown_default=shown)
    p.add_argument(
        "--path-to",
        metavar="RUN_B",
        default=None,
        help="also compute the curvature at --points λ on the straight path(s) from RUN to RUN_B",
    )
    _pair_method(p, "weight", "with --path-to: also the path to RUN_B aligned to RUN")
    p.add_argument(
        "--curve",
        metavar="CURVE",
        default=None,
        help="also compute the curvature at --points t along a curve stored by `lmclab curve RUN RUN_B` (its "
        "curve_<hash> directory, or that name in the run store); with --path-to RUN_B the straight paths too",
    )
    _int_flag(p, "--points", POINTS, 5, "evenly spaced λ (t) on each path (--path-to, --curve), both ends included")
    _int_flag(p, "--seed", SEED, 0, "probe and start seed")
    _out(p, "figures and tables", "spectrum_<hash> in the run store")
    _no_progress(p)
    _allow_different_data(p)
    _common_io(p)


def _options(args: argparse.Namespace, model_blocks: tuple[str, ...]) -> dict[str, Any]:
    """`hessian_spectrum`'s options from the flags (everything that changes a number)."""
    return {
        "top": args.top,
        "trace_probes": args.probes,
        "density": args.density,
        "starts": args.starts,
        "steps": args.steps,
        "sigma": args.sigma,
        "blocks": model_blocks if args.blocks else (),
        "block_probes": args.block_probes,
        "seed": args.seed,
        "batch_size": BATCH_SIZE,
    }


def _ticker(bar: Any) -> Callable[[str, int], None]:
    def tick(stage: str, n: int) -> None:
        bar.set_description(f"spectrum: {stage}")
        bar.update(n)

    return tick


def run(args: argparse.Namespace) -> dict[str, Any]:
    store = RunStore(args.runs_dir)
    run_a = store.get(args.run)
    run_b: Run | None = store.get(args.path_to) if args.path_to is not None else None
    if not run_a.trained:
        raise UsageError(f"RUN {run_a.path.name}: not trained to its end (status {run_a.status}); train it first")
    curve_dir = _curve_dir(args, store.root, run_a, run_b) if args.curve is not None else None
    data_check = None
    if run_b is not None:
        check_same_architecture(run_a, run_b)
        data_check = check_same_data([run_a, run_b], allow=args.allow_different_data)
        if not data_check.same:
            _say(args, f"note: {data_check.note()}")
    progress = _progress(args)
    dev = resolve_device(args.device)
    model = load_run_model(run_a, device=dev)
    n_parameters = sum(p.numel() for p in model.parameters())
    if args.top > n_parameters:
        raise UsageError(f"--top {args.top}: the model has {n_parameters} parameters; allowed: at most {n_parameters}")
    kinds = (
        ("layer", "residual") if len(block_partition(model, "residual")) < len(block_partition(model)) else ("layer",)
    )
    options = _options(args, kinds)
    alignment = None
    if run_b is not None and args.align != "none":
        alignment = _align_as_flagged(args, store, run_a, run_b, args.align)
    identity = {
        "version": VERSION,
        "run": run_a.path.name,
        "split": args.split,
        "subset": args.subset or None,
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()},
        "path_to": None if run_b is None else run_b.path.name,
        "align": None if alignment is None else str(alignment.path.name if alignment.path else args.align),
        "points": args.points if run_b is not None or curve_dir is not None else None,
    }
    if curve_dir is not None:  # (absent otherwise: results stored before --curve keep their identity)
        identity["curve"] = curve_dir.name
    where = Store(store.root).result_dir("spectrum", identity)
    stored = where / "spectrum.json"
    reused = stored.is_file()
    if not reused:
        with artifact_lock(where, root=store.root, what=f"spectrum {where.name}"):
            reused = stored.is_file()  # computed by another process while this one waited
            if not reused:
                result = _compute(args, run_a, run_b, curve_dir, model, alignment, options, dev, progress)
                write_sealed_json(stored, {"identity": identity, **result}, root=store.root)
    saved = read_sealed_json(stored, kind="stored spectrum")
    if reused:
        _say(args, f"reusing the stored result {stored}")
    return _report(args, run_a, saved, where, stored, reused)


def _curve_dir(args: argparse.Namespace, root: Path, run_a: Run, run_b: Run | None) -> Path:
    """The stored curve `--curve` names (a directory, or a name in the run store); it must start at RUN and, with
    --path-to, end at RUN_B."""
    found = Path(args.curve) if Path(args.curve).is_dir() else root / args.curve
    if not (found / INFO_FILE).is_file():
        raise UsageError(
            f"--curve {args.curve}: no stored curve there or in {root}; allowed: a curve_<hash> directory of "
            "`lmclab curve`"
        )
    info = read_sealed_json(found / INFO_FILE, kind="stored curve")
    if info["a"] != run_a.path.name:
        raise UsageError(f"--curve {args.curve}: the curve starts at {info['a']}, not at RUN {run_a.path.name}")
    if run_b is not None and info["b"] != run_b.path.name:
        raise UsageError(
            f"--path-to {args.path_to}: the curve ends at {info['b']}, not at {run_b.path.name}; allowed: the "
            "curve's run B, or no --path-to"
        )
    return found


def _compute(
    args: argparse.Namespace,
    run_a: Run,
    run_b: Run | None,
    curve_dir: Path | None,
    model: Any,
    alignment: Any,
    options: dict[str, Any],
    dev: Any,
    progress: bool,
) -> dict[str, Any]:
    load = dict(subset=args.subset or None, data_dir=args.data_dir, device=dev, progress=progress)
    load["download"] = not args.offline
    data = load_run_split(run_a, args.split, **load)
    basis = options["steps"] * sum(p.numel() * p.element_size() for p in model.parameters())
    options = {**options, "parallel": max(1, min(options["starts"], LANCZOS_MEMORY // max(1, basis)))}
    units = spectrum_units(
        model,
        **{k: options[k] for k in ("top", "trace_probes", "density", "starts", "steps", "parallel")},
        blocks=options["blocks"],
    )
    theta = run_a.load_state(device=dev)
    with tqdm(total=units, desc="spectrum", unit="step", disable=not progress, leave=False) as bar:
        spectrum = hessian_spectrum(model, theta, data, progress=_ticker(bar), **options)
    out: dict[str, Any] = {"run": run_a.path.name, "split": args.split, "spectrum": spectrum.to_json()}
    if run_b is None and curve_dir is None:
        return out
    ends = {}
    if run_b is not None:
        theta_b = run_b.load_state(device=dev)
        ends["naive"] = theta_b
        if alignment is not None:
            ends[f"{alignment.info.get('method', args.align)}-matched"] = alignment.perm.apply(theta_b, alignment.spec)
    stored = None if curve_dir is None else load_curve(curve_dir, Store(run_a.path.parent), device=args.device)
    bn_data = None
    if has_batchnorm(model):  # statistics recomputed at each λ from the training split (as `interpolate --bn reset`)
        bn_data = data if args.split == "train" else load_run_split(run_a, "train", **load)
    lambdas = default_lambdas(args.points)
    paths = len(ends) + (stored is not None)
    outer = tqdm(total=paths * len(lambdas), desc="spectrum along the path", unit="point", disable=not progress)
    with outer, tqdm(total=units, desc="spectrum", unit="step", disable=not progress, leave=False) as bar:

        def done(path: str, lam: float) -> None:
            outer.set_postfix_str(f"{path} λ={lam:.3g}")
            outer.update()
            bar.reset()

        along = dict(bn_data=bn_data, on_point=done, at_a=spectrum, progress=_ticker(bar), **options)
        if run_b is not None:
            spectra = path_spectra(model, theta, ends, data, lambdas, **along)
            out["path"] = {
                "run_b": run_b.path.name,
                "alignment": None if alignment is None else str(alignment.path),
                **spectra.to_json(),
            }
        if stored is not None:
            name = f"{stored.curve.kind} curve" + ("" if stored.info["align"] is None else " (to π(B))")
            on_curve = curve_spectra(model, stored.curve, data, lambdas, name=name, **along)
            out["curve"] = {
                "curve": str(stored.path),
                "run_b": stored.info["b"],
                "kind": stored.curve.kind,
                "bends": stored.curve.n_bends,
                "align": stored.info["align"],
                **on_curve.to_json(),
            }
    return out


def _report(
    args: argparse.Namespace, run_a: Run, saved: dict[str, Any], where: Path, stored: Path, reused: bool
) -> dict[str, Any]:
    """Figures and tables (in --out or the result's directory), the printed summary, the --json dict."""
    out_dir = Path(args.out) if args.out else where
    out_dir.mkdir(parents=True, exist_ok=True)
    spectrum = Spectrum.from_json(saved["spectrum"])
    title = f"{run_a.path.name} ({run_a.config.model.model} on {run_a.config.data.dataset})"
    files: dict[str, str] = {"result": str(stored)}
    summary: dict[str, Any] = {
        "run": run_a.path.name,
        "split": saved["split"],
        "examples": spectrum.examples,
        "n_parameters": spectrum.n_parameters,
        "top_eigenvalues": spectrum.top_eigenvalues,
        "eigen_residuals": [] if spectrum.eigen is None else spectrum.eigen.residuals,
        "trace": saved["spectrum"]["trace"],
        "reused": reused,
    }
    lines = [
        f"{title}: Hessian of the mean loss on {saved['split']} ({spectrum.examples} examples), "
        f"{spectrum.n_parameters:,} parameters"
    ]
    if spectrum.top_eigenvalues:
        lines.append("top eigenvalues: " + "  ".join(f"{v:.6g}" for v in spectrum.top_eigenvalues))
    if spectrum.trace is not None:
        t = spectrum.trace
        lines.append(
            f"trace: {t.estimate:.6g}  ({t.confidence:.0%} CI {t.ci_low:.6g} … {t.ci_high:.6g}, {t.n_probes} probes)"
        )
    if spectrum.density is not None:
        d = spectrum.density
        slq = d.trace()
        files["density_figure"] = str(
            plot_density(
                out_dir / "density.png",
                d,
                spectrum.top_eigenvalues,
                title=title,
                split=saved["split"],
                examples=spectrum.examples,
            ).path
        )
        summary["density"] = {
            "starts": d.starts,
            "steps": d.steps,
            "sigma": d.sigma,
            "slq_trace": {"estimate": slq.estimate, "ci_low": slq.ci_low, "ci_high": slq.ci_high},
            "slq_trace_h2": d.n_parameters * d.moment(2),
            "smallest_node": min(min(t) for t in d.nodes),
            "largest_node": max(max(t) for t in d.nodes),
        }
        lines.append(
            f"density (SLQ, {d.starts} starts × {d.steps} steps, σ = {d.sigma:.3g}): nodes from "
            f"{summary['density']['smallest_node']:.4g} to {summary['density']['largest_node']:.4g}; "
            f"n·E[Σ τθ] = {slq.estimate:.6g} (CI {slq.ci_low:.6g} … {slq.ci_high:.6g})"
        )
    if spectrum.blocks:
        rows = [
            {
                "kind": b.kind,
                "block": b.name,
                "parameters": b.parameters,
                "trace": b.trace.estimate,
                "ci_low": b.trace.ci_low,
                "ci_high": b.trace.ci_high,
                "top_eigenvalue": b.top_eigenvalue,
            }
            for b in spectrum.blocks
        ]
        files["blocks"] = str(write_csv(out_dir / "blocks.csv", rows))
        summary["blocks"] = rows
        width = max(len(b.name) for b in spectrum.blocks)
        lines.append(f"{'kind':<8} {'block':<{width}} {'params':>9} {'trace (95% CI)':>34} {'top eigenvalue':>15}")
        for r in rows:
            ci = f"{r['trace']:.4g} ({r['ci_low']:.4g} … {r['ci_high']:.4g})"
            top = "" if r["top_eigenvalue"] is None else f"{r['top_eigenvalue']:.4g}"
            lines.append(f"{r['kind']:<8} {r['block']:<{width}} {r['parameters']:>9,} {ci:>34} {top:>15}")
    if "path" in saved or "curve" in saved:
        parts = [PathSpectra.from_json(saved[k]) for k in ("path", "curve") if k in saved]
        spectra = PathSpectra(parts[0].lambdas, {k: v for part in parts for k, v in part.spectra.items()})
        rows = spectra.rows()
        run_b = saved["path"]["run_b"] if "path" in saved else saved["curve"]["run_b"]
        files["path_table"] = str(write_csv(out_dir / "path_curvature.csv", rows))
        files["path_figure"] = str(
            plot_path_curvature(
                out_dir / "path_curvature.png",
                spectra,
                title=f"{run_a.path.name} → {run_b}",
                split=saved["split"],
                examples=spectrum.examples,
                xlabel={1: "λ", 2: "t (curve)", 3: "λ (straight paths) / t (curve)"}[
                    ("path" in saved) + 2 * ("curve" in saved)
                ],
            ).path
        )
        if "path" in saved:
            summary["path"] = {"run_b": run_b, "alignment": saved["path"]["alignment"]}
            summary["path"]["rows"] = [r for r in rows if r["path"] in parts[0].spectra]
        if "curve" in saved:
            summary["curve"] = {k: saved["curve"][k] for k in ("curve", "run_b", "kind", "bends", "align")}
            summary["curve"]["rows"] = [r for r in rows if r["path"] in parts[-1].spectra]
        width = max(18, *(len(str(r["path"])) for r in rows))
        x = "λ / t" if "curve" in saved else "λ"
        lines.append(f"{'path':<{width}} {x:>6} {'top eigenvalue':>15} {'trace (95% CI)':>34}")
        for r in rows:
            top = "" if r["top_eigenvalue"] is None else f"{r['top_eigenvalue']:.4g}"
            ci = f"{r['trace']:.4g} ({r['trace_ci_low']:.4g} … {r['trace_ci_high']:.4g})" if "trace" in r else ""
            lines.append(f"{r['path']:<{width}} {r['lambda']:>6.3f} {top:>15} {ci:>34}")
    summary["files"] = files
    lines.append("files: " + ", ".join(files.values()))
    _say(args, "\n".join(lines))
    return summary


COMMAND = Command(
    "spectrum",
    "Hessian spectrum of a run: top eigenvalues (Lanczos), density (SLQ), per-block curvature, along paths/curves",
    add_arguments,
    run,
)
