"""Loss planes of stored runs: the plane through θ_A, θ_B and π(θ_B) (or three runs, or one run and two
filter-normalised random directions), loss and error on a grid over it, a contour figure.

Results are stored in the run store as `plane_<hash>/` (grid.csv: tidy rows u, v, split, metric, value,
examples; points.csv: the marked points' coordinates and values; plane.json; plane.png), named by
everything that determines the numbers (runs, alignments, mode, grid, margin or radius, seed, splits,
subset, BN handling); the same request again reuses them. `out` chooses where the tables and figure are
(also) written.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmclab.config import UsageError
from lmclab.data import DeviceDataset
from lmclab.experiments.lmc import align_runs, check_same_architecture
from lmclab.geometry.plane import (
    Plane,
    evaluate_plane,
    filter_normalized_direction,
    grid_axes,
    nearest_node,
    plane_from_directions,
    plane_through,
)
from lmclab.paths import default_bn_mode
from lmclab.points import Point, norm, parameter_names
from lmclab.report import write_csv
from lmclab.report.plane import plot_plane
from lmclab.store import Run, RunStore, Store, artifact_lock, check_same_data, read_sealed_json, write_sealed_json
from lmclab.training import load_run_model, load_run_split, resolve_device

__all__ = ["PlaneRequest", "plane_runs"]


@dataclass(frozen=True)
class PlaneRequest:
    """What a plane is and how its grid is evaluated (everything but `chunk` enters the result's hash).

    Three points: ``align`` (a pair method, or None) aligns every run after the first to it; two runs
    with ``align`` give the points θ_A, θ_B, π(θ_B); three runs give θ_A and the (aligned) others. One run
    with ``random_directions``: θ_A and two filter-normalised random directions drawn from ``seed``.
    The grid has ``grid`` evenly spaced values per axis (plus the marked points' coordinates) over the
    points' bounding box widened by ``margin`` × its longer side on every side, or (random directions)
    over ±``radius`` × each direction's norm."""

    align: str | None = "weight"
    random_directions: bool = False
    seed: int = 0
    grid: int = 21
    margin: float = 0.2
    radius: float = 1.0
    splits: tuple[str, ...] = ("test",)
    subset: int | None = None
    bn: str | None = None
    bn_examples: int | None = None

    def check(self, n_runs: int) -> None:
        """UsageError unless the runs and options define a plane."""
        if self.random_directions:
            if n_runs != 1:
                raise UsageError(f"--random-directions: {n_runs} runs given; allowed: exactly one run (the origin)")
        elif n_runs == 2 and self.align is None:
            raise UsageError(
                "RUN_A RUN_B with --align none: two points do not span a plane; allowed: --align METHOD "
                "(θ_A, θ_B, π(θ_B)), a third run, or one run with --random-directions"
            )
        elif n_runs not in (2, 3):
            raise UsageError(
                f"RUN: {n_runs} run(s) given; allowed: 2 runs (with --align), 3 runs, or 1 run with --random-directions"
            )
        if self.grid < 2:
            raise UsageError(f"--grid {self.grid}: allowed: an integer >= 2")


def _marked_points(
    runs: Sequence[Run], request: PlaneRequest, dev: torch.device, **align_kw: Any
) -> tuple[list[tuple[str, str, Point]], list[str | None]]:
    """(label, source, θ) of each point spanning the plane, and the alignment directories used."""
    store = RunStore(runs[0].path.parent)
    theta_a = runs[0].load_state(device=dev)
    marked = [("A", runs[0].path.name, theta_a)]
    used: list[str | None] = []
    names = "BCDEF"
    for i, run in enumerate(runs[1:]):
        theta = run.load_state(device=dev)
        if request.align is None:
            marked.append((names[i], run.path.name, theta))
            continue
        alignment = align_runs(runs[0], run, method=request.align, store=store, device=str(dev), **align_kw)
        used.append(str(alignment.path))
        if len(runs) == 2:
            marked.append((names[i], run.path.name, theta))
        marked.append(
            (
                f"π({names[i]})",
                f"{names[i]}{'' if len(runs) == 2 else f' ({run.path.name})'} permuted onto A by {request.align} "
                "matching",
                alignment.perm.apply(theta, alignment.spec),
            )
        )
    return marked, used


def _build_plane(
    model: torch.nn.Module, marked: list[tuple[str, str, Point]], request: PlaneRequest
) -> tuple[Plane, tuple[float, float], tuple[float, float], tuple[str, str]]:
    """The plane, the grid's lower and upper corners, and the axis labels."""
    names = parameter_names(model)
    if request.random_directions:
        theta = marked[0][2]
        generator = torch.Generator().manual_seed(request.seed)
        d1 = filter_normalized_direction(theta, model, generator)
        d2 = filter_normalized_direction(theta, model, generator)
        plane = plane_from_directions(theta, d1, d2)
        ru, rv = request.radius * norm(d1), request.radius * norm(d2)
        labels = (
            "u: filter-normalised random direction 1 (parameter distance)",
            "v: random direction 2, ⊥ u (parameter distance)",
        )
        return plane, (-ru, -rv), (ru, rv), labels
    try:
        plane = plane_through(marked[0][2], marked[1][2], marked[2][2], names=names)
    except ValueError as exc:
        raise UsageError(f"the points {', '.join(m[0] for m in marked)} do not span a plane: {exc}") from None
    coords = [plane.coordinates(p) for _, _, p in marked]
    us, vs = [c[0] for c in coords], [c[1] for c in coords]
    pad = request.margin * max(max(us) - min(us), max(vs) - min(vs))
    labels = (
        f"u: along θ_{marked[1][0]} − θ_{marked[0][0]} (parameter distance)",
        f"v: towards θ_{marked[2][0]}, ⊥ u (parameter distance)",
    )
    return plane, (min(us) - pad, min(vs) - pad), (max(us) + pad, max(vs) + pad), labels


def _read_grid(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as fh:
        rows: list[dict[str, Any]] = list(csv.DictReader(fh))
    for r in rows:
        for k in ("u", "v", "value"):
            r[k] = float(r[k]) if r[k] != "" else float("nan")
        r["examples"] = int(r["examples"])
    return rows


def plane_runs(
    runs: Sequence[Run],
    request: PlaneRequest = PlaneRequest(),
    *,
    chunk: int | None = None,
    out: str | Path | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    download: bool = True,
    progress: bool = True,
    say: Callable[[str], None] = print,
    allow_different_data: bool = False,
) -> dict[str, Any]:
    """Evaluate (or reuse) the loss plane of `runs` as `request` says; write grid.csv, points.csv,
    plane.json and plane.png to `out` (default: the stored result's directory); return the summary."""
    request.check(len(runs))
    for run in runs[1:]:
        check_same_architecture(runs[0], run)
    if not runs[0].trained:
        raise UsageError(f"run {runs[0].path.name} is not trained to its end (status {runs[0].status}); train it first")
    data_check = check_same_data(list(runs), allow=allow_different_data)
    if (note := data_check.note()) is not None:
        say(f"note: {note}")
    dev = resolve_device(device)
    model = load_run_model(runs[0], device=dev)
    bn = request.bn or default_bn_mode(model)
    marked, alignments = _marked_points(
        runs, request, dev, data_dir=data_dir, progress=progress, allow_different_data=allow_different_data
    )
    identity = {
        "runs": [r.path.name for r in runs],
        "alignments": alignments,
        "mode": "random_directions" if request.random_directions else "points",
        "grid": request.grid,
        **(
            {"radius": request.radius, "seed": request.seed}
            if request.random_directions
            else {"margin": request.margin}
        ),
        "splits": list(request.splits),
        "subset": request.subset,
        "bn": bn,
        "bn_examples": request.bn_examples,
    }
    store = Store(runs[0].path.parent)
    stored = store.result_dir("plane", identity)
    plane, low, high, axis_labels = _build_plane(model, marked, request)
    coords = {label: plane.coordinates(p) for label, _, p in marked}
    off_plane = {label: plane.distance_from(p) for label, _, p in marked}
    reused = (stored / "plane.json").is_file() and (stored / "grid.csv").is_file()
    if not reused:
        with artifact_lock(stored, root=store.root, what=f"plane {stored.name}"):
            reused = (stored / "plane.json").is_file() and (stored / "grid.csv").is_file()
            if not reused:
                rows = _evaluate(
                    model, plane, low, high, coords, request, bn, runs[0], data_dir, dev, chunk, download, progress
                )
                stored.mkdir(parents=True, exist_ok=True)
                write_csv(stored / "grid.csv", rows)
                write_sealed_json(
                    stored / "plane.json",
                    {"identity": identity, "rows": len(rows), "points": {k: list(c) for k, c in coords.items()}},
                    files=[("grid.csv", stored / "grid.csv")],
                )
    if reused:
        say(f"reusing the stored plane {stored}")
        saved = read_sealed_json(stored / "plane.json", kind="stored plane").get("points", {})  # grid.csv checked too
        coords = {k: (float(saved[k][0]), float(saved[k][1])) if k in saved else c for k, c in coords.items()}
    rows = _read_grid(stored / "grid.csv")
    values = {(r["u"], r["v"], r["split"], r["metric"]): r["value"] for r in rows}
    node_list = list(dict.fromkeys((r["u"], r["v"]) for r in rows))
    nodes = {label: nearest_node(node_list, *coords[label]) for label in coords}
    points_rows = [
        {
            "point": label,
            "source": source,
            "u": coords[label][0],
            "v": coords[label][1],
            "distance_from_plane": off_plane[label],
            "split": split,
            "metric": metric,
            "grid_u": nodes[label][0],
            "grid_v": nodes[label][1],
            "value": values[(*nodes[label], split, metric)],
        }
        for label, source, _ in marked
        for split in request.splits
        for metric in ("loss", "error")
    ]
    target = Path(out) if out else stored
    target.mkdir(parents=True, exist_ok=True)
    files = {"grid": write_csv(target / "grid.csv", rows), "points": write_csv(target / "points.csv", points_rows)}
    described = [f"{label} = {source}" for label, source, _ in marked]
    title = "   ".join(described[:2]) + "".join(f"\n{line}" for line in described[2:])
    if request.random_directions:
        title += f"\nfilter-normalised random directions (seed {request.seed})"
    if data_check.note():
        title += f"\n{data_check.note()}"
    files["figure"] = plot_plane(
        target / "plane.png", rows, coords, axis_labels=axis_labels, title=title, splits=request.splits
    ).path
    lowest = {
        split: min((r for r in rows if r["split"] == split and r["metric"] == "loss"), key=lambda r: r["value"])
        for split in request.splits
    }
    summary: dict[str, Any] = {
        "out": str(target),
        "stored": str(stored),
        "reused": reused,
        **{k: str(v) for k, v in files.items()},
        "identity": identity,
        "points": points_rows,
        "grid": {
            "u": [low[0], high[0]],
            "v": [low[1], high[1]],
            "nodes": len({(r["u"], r["v"]) for r in rows}),
            "lowest_loss": {s: {"u": r["u"], "v": r["v"], "loss": r["value"]} for s, r in lowest.items()},
        },
        "data": data_check.to_json(),
    }
    for label, source, _ in marked:
        u, v = coords[label]
        measured = "  ".join(
            f"{split} {metric} {values[(*nodes[label], split, metric)]:.4f}"
            for split in request.splits
            for metric in ("loss", "error")
        )
        say(f"{label:<5} ({u:9.3f}, {v:9.3f})  {measured}  [{source}]")
    for split, r in lowest.items():
        say(f"lowest {split} loss on the grid: {r['value']:.4f} at ({r['u']:.3f}, {r['v']:.3f})")
    say(f"tables: {files['grid']}, {files['points']}\nfigure: {files['figure']}")
    return summary


def _evaluate(
    model: torch.nn.Module,
    plane: Plane,
    low: tuple[float, float],
    high: tuple[float, float],
    coords: dict[str, tuple[float, float]],
    request: PlaneRequest,
    bn: str,
    run: Run,
    data_dir: str | None,
    dev: torch.device,
    chunk: int | None,
    download: bool,
    progress: bool,
) -> list[dict[str, Any]]:
    """The grid's tidy rows (u, v, split, metric, value, examples), v-major."""

    def load(split: str) -> DeviceDataset:
        return load_run_split(
            run, split, subset=request.subset, data_dir=data_dir, device=dev, download=download, progress=progress
        )

    data = {s: load(s) for s in request.splits}
    bn_data = None if bn == "none" else data["train"] if "train" in data else load("train")
    us, vs = grid_axes(low, high, request.grid, include=coords.values())
    nodes = [(float(u), float(v)) for v in vs for u in us]
    rows = evaluate_plane(
        model,
        plane,
        nodes,
        data,
        bn=bn,
        bn_data=bn_data,
        bn_examples=request.bn_examples,
        chunk=chunk,
        progress=progress,
        desc=f"plane {len(us)}×{len(vs)}",
    )
    return [{**r, "examples": len(data[r["split"]])} for r in rows]
