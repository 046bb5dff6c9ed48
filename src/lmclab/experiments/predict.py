"""Hessian-based barrier predictions next to measured barriers, and sharpness, for stored runs.

Whole model: Singh Prop. 1's predicted curve B(α) ≈ α(1−α)/2 · dᵀ(αH_1 + (1−α)H_2)d next to the
measured B(α) = L(θ_α) − [(1−α)L_1 + αL_2]. Per layer ℓ (one block per module with parameters):
Prop. 2's prediction next to Singh's measured layer barrier
  B_ℓ(α) = (1−α)L(θ_{2→1}) + αL(θ_{1→2}) − [(1−α)L_1 + αL_2],
θ_{2→1} = model 1 with only layer ℓ interpolated, θ_{1→2} = model 2 with only ℓ interpolated.
Sets of layers: eq. 21's B*_P = Σ_{ℓ,ℓ'∈P} B*_{ℓ,ℓ'} (eq. 20, Hessian at θ_1) next to the measured
set barrier at α = ½ (the same definition with all layers of P interpolated), for cumulative sets in
shallow / deep / random order.

The measured per-layer and per-set quantity is Singh's two-sided layer-set barrier, column
``layer_set_barrier_half`` (:data:`lmclab.paths.barriers.LAYER_SET_BARRIER`). It is not the one-sided
``layerwise_barrier`` of ``lmclab interpolate --layers`` (chosen layers interpolated, the others from one
endpoint, barriers relative to that curve's own ends); the two coincide only when every tensor is in P.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lmclab.curvature.functional import parameter_blocks
from lmclab.curvature.predictions import barrier_prediction, predicted_set_barrier
from lmclab.curvature.trace import hessian_trace, top_eigenvalue, trace_json
from lmclab.experiments.lmc import Alignment, check_same_architecture
from lmclab.paths import (
    barrier_curve,
    cumulative_layer_sets,
    default_lambdas,
    endpoint_losses,
    layer_set_barrier,
    path_losses,
)
from lmclab.points import direction, norm, parameter_names
from lmclab.report import write_csv
from lmclab.report.predict import plot_predictions
from lmclab.store import Run, check_same_data
from lmclab.training import load_run_model, load_run_split, resolve_device


def predict_vs_measure(
    run_1: Run,
    run_2: Run,
    *,
    alignment: Alignment | None = None,
    split: str = "test",
    examples: int | None = 1000,
    points: int = 25,
    orders: Sequence[str] = ("shallow", "deep"),
    out: str | Path = "out/predict",
    data_dir: str | None = None,
    device: str = "auto",
    say: Callable[[str], None] = print,
    allow_different_data: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Measured vs predicted barriers (whole model, per layer, cumulative sets); tables and one figure.

    BN models are evaluated in eval mode with interpolated statistics on both sides (the Hessian is
    taken in eval mode too), so measured and predicted quantities refer to the same function.
    Runs trained on different data raise `DataMismatch` unless `allow_different_data`; then all is
    evaluated on run 1's data, and the tables (an `evaluated_on` column), the figure's title and the
    summary's `data` say so."""
    check_same_architecture(run_1, run_2)
    data_check = check_same_data([run_1, run_2], allow=allow_different_data)
    data_note = data_check.note()
    if data_note is not None:
        say(f"note: {data_note}")
    dev = resolve_device(device)
    model = load_run_model(run_1, device=dev)
    data = load_run_split(run_1, split, subset=examples, data_dir=data_dir, device=dev, progress=progress)
    theta_1, theta_2 = run_1.load_state(device=dev), run_2.load_state(device=dev)
    if alignment is not None:
        theta_2 = alignment.perm.apply(theta_2, alignment.spec)
    blocks = parameter_blocks(model)
    lambdas = default_lambdas(points)

    stages = 2 + len(blocks) * (1 + len(orders))  # prediction, measured path, each layer, each cumulative set
    bar = tqdm(total=stages, desc="predict: Hessian", unit="stage", disable=not progress, leave=False)
    pred = barrier_prediction(model, theta_1, theta_2, data, alphas=lambdas, layers=blocks)
    bar.update()
    bar.set_description("predict: measured path")
    measured = barrier_curve(lambdas, path_losses(model, theta_1, theta_2, data, lambdas))
    bar.update()
    bar.set_description("predict: layers")
    curve_rows = [{"alpha": a, "measured": m, "predicted": p} for a, m, p in zip(lambdas, measured, pred.curve)]

    half = [0.0, 0.5, 1.0]
    ends = endpoint_losses(model, theta_1, theta_2, data)
    layer_rows = []
    for name, tensors in blocks.items():
        b = layer_set_barrier(model, theta_1, theta_2, data, half, tensors, ends)[1]
        bar.update()
        layer_rows.append(
            {
                "layer": name,
                "layer_set_barrier_half": float(b),
                "predicted_half": pred.layers[name].at(0.5),
                "predicted_max": pred.layers[name].max,
            }
        )
    names, matrix = pred.cross_blocks.names, pred.cross_blocks.theta_1
    cumulative_rows = []
    for order in orders:
        bar.set_description(f"predict: {order} layer sets")
        for layer_set in cumulative_layer_sets(list(blocks), order):
            tensors = [t for layer in layer_set for t in blocks[layer]]
            b = layer_set_barrier(model, theta_1, theta_2, data, half, tensors, ends)[1]
            bar.update()
            cumulative_rows.append(
                {
                    "order": order,
                    "k": len(layer_set),
                    "last_layer": layer_set[-1],
                    "layer_set_barrier_half": float(b),
                    "predicted_eq21": predicted_set_barrier(matrix, names, layer_set),
                }
            )
    bar.close()
    out = Path(out)
    column = data_check.column()  # {} unless the runs' data differ
    files = {
        "curve": write_csv(out / "barrier_curve.csv", [{**r, **column} for r in curve_rows]),
        "layers": write_csv(out / "layer_barriers.csv", [{**r, **column} for r in layer_rows]),
        "cumulative": write_csv(out / "cumulative_barriers.csv", [{**r, **column} for r in cumulative_rows]),
        "cross_blocks": write_csv(
            out / "cross_blocks.csv",
            [
                {"row": names[i], "col": names[j], "value": matrix[i, j], **column}
                for i in range(len(names))
                for j in range(len(names))
            ],
        ),
    }
    files["figure"] = plot_predictions(
        out / "predictions.png",
        curve_rows,
        layer_rows,
        cumulative_rows,
        names,
        matrix,
        split=split,
        examples=len(data),
        title=f"{run_1.path.name} ↔ {run_2.path.name}"
        + (" (aligned)" if alignment is not None else "")
        + (f"\n{data_note}" if data_note else ""),
    ).path
    distance = norm(direction(theta_1, theta_2, keys=parameter_names(model)))  # d in θ_1's dtype, ‖d‖ in float64
    summary = {
        "q1": pred.q1,
        "q2": pred.q2,
        "predicted_max": pred.max,
        "measured_max": float(np.max(measured)),
        "distance": distance,
        "files": {k: str(v) for k, v in files.items()},
        "data": {**data_check.to_json(), "split": split, "examples": len(data)},
    }
    say(
        f"whole model: measured barrier {summary['measured_max']:.4f}, Prop. 1 predicts {summary['predicted_max']:.4f} "
        f"(dᵀH₁d = {pred.q1:.4g}, dᵀH₂d = {pred.q2:.4g}, ‖d‖ = {summary['distance']:.4g})"
    )
    say(f"figure: {files['figure']}\ntables: {', '.join(str(v) for k, v in files.items() if k != 'figure')}")
    return summary


def sharpness(
    run: Run,
    *,
    split: str = "train",
    examples: int | None = 1000,
    probes: int = 100,
    method: str = "hutchinson",
    eigenvalue: bool = True,
    data_dir: str | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """tr ∇²L with a 95% interval, STE-MM's scale-aware tr(D∇²L D), and the top eigenvalue, at a run's final θ."""
    dev = resolve_device(device)
    model = load_run_model(run, device=dev)
    data = load_run_split(run, split, subset=examples, data_dir=data_dir, device=dev, progress=progress)
    theta = run.load_state(device=dev)
    result: dict[str, Any] = {"run": run.path.name, "split": split, "examples": len(data)}
    bar = tqdm(total=2 + eigenvalue, desc="sharpness: trace", unit="stage", disable=not progress, leave=False)
    for key, scaled in (("trace", False), ("scale_aware_trace", True)):
        bar.set_description(f"sharpness: {key.replace('_', ' ')} ({probes} probes)")
        est = hessian_trace(model, theta, data, method=method, scale_aware=scaled, probes=probes, seed=seed)
        bar.update()
        result[key] = trace_json(est)
    if eigenvalue:
        bar.set_description("sharpness: top eigenvalue")
        result["top_eigenvalue"] = top_eigenvalue(model, theta, data, seed=seed)
        bar.update()
    bar.close()
    return result
