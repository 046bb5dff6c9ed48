"""A low-loss curve between two stored runs (Garipov et al. 2018), stored like any result, evaluated and
drawn with the straight naive and aligned paths.

The trained curve lives in ``curve_<hash>/`` of the run store, the hash over what determines it (the two
runs, the alignment of B's endpoint, the kind, the number of bends and every training setting):
``curve.safetensors`` (the bends, checksummed) and ``curve.json`` (settings and training history),
written last. Training checkpoints the bends and the optimizer at every epoch end (``resume.safetensors``):
a killed run resumes where it stopped and ends as an uninterrupted one (CPU); a finished curve is reused.
The evaluation (paths.csv, barriers.csv, curves.png) goes to ``--out`` or ``curvepaths_<hash>/``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmclab.config import UsageError
from lmclab.data import DeviceDataset
from lmclab.experiments.lmc import Alignment, align_runs, check_same_architecture, interpolate_runs, load_alignment
from lmclab.paths import default_bn_mode, default_lambdas
from lmclab.paths.barriers import curve_barrier_rows
from lmclab.paths.mode_curves import Curve, evaluate_curve, straight_curve, train_curve
from lmclab.points import PointLike, parameter_names
from lmclab.report import write_csv
from lmclab.report.curves import plot_mode_curves
from lmclab.store import (
    Run,
    Store,
    artifact_lock,
    check_same_data,
    load_checkpoint,
    read_sealed_json,
    save_checkpoint,
    write_sealed_json,
)
from lmclab.store.checkpoint import optimizer_from_flat, optimizer_to_flat, split_prefix
from lmclab.training import load_run_model, load_run_split, resolve_device

CURVE_KIND = "curve"
REPORT_KIND = "curvepaths"
BEND_PREFIX = "bend."
CURVE_FILE, INFO_FILE, RESUME_FILE = "curve.safetensors", "curve.json", "resume.safetensors"
KEYS = ("path", "layers", "pair", "split", "metric")


@dataclass(frozen=True)
class CurveSettings:
    """What a curve is and how its bends are trained (every field is part of its identity)."""

    kind: str = "bezier"
    bends: int = 1
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 128
    optimizer: str = "adam"
    schedule: str = "cosine"
    train_subset: int | None = None
    seed: int = 0


@dataclass
class StoredCurve:
    """A trained curve, where it is stored, its info (settings, history) and whether it was reused."""

    curve: Curve
    info: dict[str, Any]
    path: Path
    reused: bool


def curve_identity(run_a: Run, run_b: Run, alignment: Alignment | None, settings: CurveSettings) -> dict[str, Any]:
    """The inputs that determine a trained curve (its directory is named by their content hash)."""
    return {
        "a": run_a.path.name,
        "b": run_b.path.name,
        "align": None if alignment is None else (alignment.path.name if alignment.path else alignment.info),
        **dataclasses.asdict(settings),
    }


def _bend_tensors(curve: Curve) -> dict[str, torch.Tensor]:
    return {f"{BEND_PREFIX}{i}.{k}": v for i, bend in enumerate(curve.bends) for k, v in bend.items()}


def _bends_from(tensors: dict[str, torch.Tensor], start: PointLike, count: int, source: Path) -> tuple[dict, ...]:
    bends = []
    for i in range(count):
        found = split_prefix(tensors, f"{BEND_PREFIX}{i}.")
        if found.keys() != start.keys() or any(found[k].shape != start[k].shape for k in start):
            raise ValueError(f"{source} holds bends that do not fit run A's tensors")
        bends.append({k: found[k].to(start[k].device) for k in start})
    return tuple(bends)


#: Why a curve compares only runs trained on the same data (`check_same_data`'s message).
DIFFERENT_DATA = "a curve is fitted on run A's training data and evaluated on its splits"


def fit_curve(
    run_a: Run,
    run_b: Run,
    *,
    settings: CurveSettings = CurveSettings(),
    alignment: Alignment | None = None,
    store: Store | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> StoredCurve:
    """The curve of `settings` from θ_A to θ_B (or π(θ_B) with an `alignment`), trained on run A's training
    data (or its stratified ``train_subset``), stored in ``curve_<hash>/``; reused when stored, resumed
    from its last epoch when a previous training was interrupted. One process trains a curve at a time."""
    check_same_architecture(run_a, run_b)
    check_same_data([run_a, run_b], unsupported=DIFFERENT_DATA)
    store = store or Store(run_a.path.parent)
    identity = curve_identity(run_a, run_b, alignment, settings)
    out = store.result_dir(CURVE_KIND, identity)
    dev = resolve_device(device)
    model = load_run_model(run_a, device=dev)
    theta_a = run_a.load_state(device=dev)
    theta_b = run_b.load_state(device=dev)
    if alignment is not None:
        theta_b = alignment.perm.apply(theta_b, alignment.spec)
    start = straight_curve(settings.kind, theta_a, theta_b, settings.bends)
    stored = _stored_curve(out, start)
    if stored is not None:
        return stored
    with artifact_lock(out, root=store.root, what=f"curve {out.name}"):
        stored = _stored_curve(out, start)  # trained by another process while this one waited
        if stored is not None:
            return stored
        out.mkdir(parents=True, exist_ok=True)
        curve, first_epoch, history, optim_state = start, 0, [], None
        if (out / RESUME_FILE).is_file():
            tensors, header = load_checkpoint(out / RESUME_FILE)
            curve = Curve(
                start.kind, start.start, _bends_from(tensors, start.start, settings.bends, out / RESUME_FILE), start.end
            )
            first_epoch, history = int(header["epoch"]), list(header["history"])
            optim_state = (tensors, header["optimizer"])
            say(f"resuming curve {out.name} at epoch {first_epoch} of {settings.epochs}")
        data = load_run_split(
            run_a, "train", subset=settings.train_subset, data_dir=data_dir, device=dev, progress=progress
        )

        def checkpoint(epoch: int, current: Curve, opt: torch.optim.Optimizer, new: list[dict[str, float]]) -> None:
            tensors, header = optimizer_to_flat(opt)
            save_checkpoint(
                out / RESUME_FILE,
                {**_bend_tensors(current), **tensors},  # the optimizer's tensors are named optim.*
                {"epoch": epoch, "history": history + new, "optimizer": header, "identity": identity},
            )

        def load_optimizer(opt: torch.optim.Optimizer) -> None:
            if optim_state is not None:
                optimizer_from_flat(opt, optim_state[0], optim_state[1])

        names = parameter_names(model)
        trained, record = train_curve(
            model,
            curve,
            data,
            epochs=settings.epochs,
            lr=settings.lr,
            batch_size=settings.batch_size,
            optimizer=settings.optimizer,
            schedule=settings.schedule,
            seed=settings.seed,
            start_epoch=first_epoch,
            optimizer_state=load_optimizer,
            on_epoch=checkpoint,
            progress=progress,
        )
        info = {
            **identity,
            "trained_parameters": sum(trained.start[k].numel() for k in names) * settings.bends,
            "train_examples": len(data),
            "history": history + record.history,
        }
        save_checkpoint(out / CURVE_FILE, _bend_tensors(trained), {"curve": identity})
        write_sealed_json(out / INFO_FILE, info)
        (out / RESUME_FILE).unlink(missing_ok=True)
        return StoredCurve(trained, info, out, reused=False)


def _stored_curve(out: Path, start: Curve) -> StoredCurve | None:
    if not ((out / INFO_FILE).is_file() and (out / CURVE_FILE).is_file()):
        return None
    tensors, _ = load_checkpoint(out / CURVE_FILE)
    bends = _bends_from(tensors, start.start, start.n_bends, out / CURVE_FILE)
    info = read_sealed_json(out / INFO_FILE, kind="stored curve")
    return StoredCurve(Curve(start.kind, start.start, bends, start.end), info, out, reused=True)


def load_curve(path: str | Path, store: Store, device: str = "auto") -> StoredCurve:
    """The trained curve stored in `path` (a ``curve_<hash>`` directory), its runs (and the alignment of its
    end, where it was fitted to π(θ_B)) looked up in `store`, on `device`."""
    path = Path(path)
    if not ((path / INFO_FILE).is_file() and (path / CURVE_FILE).is_file()):
        raise UsageError(f"{path}: not a stored curve (no {INFO_FILE} and {CURVE_FILE}); fit one with `lmclab curve`")
    info = read_sealed_json(path / INFO_FILE, kind="stored curve")
    dev = resolve_device(device)
    theta_a = store.runs.get(info["a"]).load_state(device=dev)
    theta_b = store.runs.get(info["b"]).load_state(device=dev)
    if info["align"] is not None:
        if not isinstance(info["align"], str) or not (store.root / info["align"]).is_dir():
            raise UsageError(f"{path}: the alignment of its end, {info['align']}, is not in the store {store.root}")
        alignment = load_alignment(store.root / info["align"])
        theta_b = alignment.perm.apply(theta_b, alignment.spec)
    found = _stored_curve(path, straight_curve(info["kind"], theta_a, theta_b, int(info["bends"])))
    assert found is not None
    return found


def curve_between_runs(
    run_a: Run,
    run_b: Run,
    *,
    settings: CurveSettings = CurveSettings(),
    align: str | None = None,
    compare: str | None = "weight",
    points: int = 25,
    splits: Sequence[str] = ("train", "test"),
    subset: int | None = None,
    bn: str | None = None,
    out: str | Path | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fit (or reuse) the curve from θ_A to θ_B (π(θ_B) after `align`), evaluate it and the straight naive
    and aligned paths (aligned by `align`, else by `compare`; None: the naive path only) at `points` points
    on `splits` (stratified `subset` of each), and write paths.csv, barriers.csv and curves.png. Returns
    the summary `lmclab curve --json` prints (``barriers`` in `lmclab interpolate --json`'s rows)."""
    check_same_data([run_a, run_b], unsupported=DIFFERENT_DATA)  # before any alignment is computed
    store = Store(run_a.path.parent)
    method = align or compare
    alignment = (
        align_runs(run_a, run_b, method=method, store=store.runs, data_dir=data_dir, device=device, progress=progress)
        if method
        else None
    )
    fitted = fit_curve(
        run_a,
        run_b,
        settings=settings,
        alignment=alignment if align else None,
        store=store,
        data_dir=data_dir,
        device=device,
        progress=progress,
        say=say,
    )
    say(
        f"curve: {fitted.path} ({'reused' if fitted.reused else 'trained'}; {settings.kind}, {settings.bends} "
        f"bend(s), {settings.epochs} epoch(s), endpoints A and {'π(B) by ' + align if align else 'B, not aligned'})"
    )
    rows = interpolate_runs(
        run_a,
        run_b,
        alignment=alignment,
        points=points,
        splits=splits,
        subset=subset,
        bn=bn,
        data_dir=data_dir,
        device=device,
        progress=progress,
    )
    dev = resolve_device(device)
    model = load_run_model(run_a, device=dev)
    bn = bn or default_bn_mode(model)

    def load(split: str) -> DeviceDataset:
        return load_run_split(run_a, split, subset=subset, data_dir=data_dir, device=dev, progress=progress)

    data = {s: load(s) for s in splits}
    bn_data = None if bn == "none" else data["train"] if "train" in data else load("train")
    for r in evaluate_curve(
        model, fitted.curve, data, ts=default_lambdas(points), bn=bn, bn_data=bn_data, progress=progress
    ):
        rows.append(
            {"pair": 0, "path": settings.kind, "layers": "all", "bn": bn, **r, "examples": len(data[r["split"]])}
        )
    identity = {
        "curve": fitted.path.name,
        "straight": None if alignment is None else alignment.path.name if alignment.path else None,
        "points": points,
        "splits": list(splits),
        "subset": subset,
        "bn": bn,
    }
    out_dir = Path(out) if out else store.result_dir(REPORT_KIND, identity)
    out_dir.mkdir(parents=True, exist_ok=True)
    barriers = curve_barrier_rows(rows, KEYS)
    files = {
        "paths": str(write_csv(out_dir / "paths.csv", rows)),
        "barriers": str(write_csv(out_dir / "barriers.csv", barriers)),
        "figure": str(
            plot_mode_curves(
                out_dir / "curves.png",
                rows,
                curves=[settings.kind],
                title=f"{run_a.path.name} ↔ {run_b.path.name}: {settings.kind} curve "
                f"({settings.bends} bend{'s' if settings.bends > 1 else ''}"
                f"{', endpoints aligned by ' + align if align else ', not aligned'})",
            ).path
        ),
    }
    endpoints = _endpoint_summary(rows, settings.kind)
    for b in barriers:
        if b["metric"] in ("loss", "error") and "error" not in b:
            say(
                f"{b['path']:<16} {b['split']:<5} {b['metric']:<5} barrier {b['barrier']:.4f}  "
                f"(max − endpoints' mean {b['rebasin']:.4f})"
            )
    for split, e in endpoints.items():
        inside = (
            ""
            if e["interior_max_loss"] is None
            else (f" (inside, 0 < t < 1: {e['interior_max_loss']:.4f} at t = {e['interior_argmax_t']:.3f})")
        )
        say(
            f"{settings.kind} {split}: max loss along the curve {e['max_loss']:.4f} at t = {e['argmax_t']:.3f}"
            f"{inside}; endpoints' mean {e['endpoints_mean_loss']:.4f}"
        )
    say(f"tables: {files['paths']}, {files['barriers']}\nfigure: {files['figure']}")
    return {
        "out": str(out_dir),
        **files,
        "curve": {"path": str(fitted.path), "reused": fitted.reused, **fitted.info},
        "alignment": None if alignment is None else {"path": str(alignment.path), **alignment.info},
        "barriers": barriers,
        "along_curve": endpoints,
    }


def _endpoint_summary(rows: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """Per split: the curve's maximum loss (over every t, and over 0 < t < 1), where, and the endpoints' mean."""
    out: dict[str, dict[str, Any]] = {}
    for split in dict.fromkeys(r["split"] for r in rows):
        pts = sorted(
            (r["lambda"], r["value"])
            for r in rows
            if r["path"] == kind and r["split"] == split and r["metric"] == "loss"
        )
        if not pts:
            continue
        t, v = max(pts, key=lambda p: p[1])
        inside = max(pts[1:-1], key=lambda p: p[1], default=(None, None))
        out[split] = {
            "max_loss": v,
            "argmax_t": t,
            "interior_max_loss": inside[1],
            "interior_argmax_t": inside[0],
            "endpoints_mean_loss": 0.5 * (pts[0][1] + pts[-1][1]),
        }
    return out
