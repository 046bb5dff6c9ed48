"""Singh et al., "Landscaping linear mode connectivity", in one command.

For each setting (a training preset: the paper's ResNet-20 + BN recipe, its lr 0.01 and no-weight-decay
variants, ResNet-18 without BN) one parent run is forked at each fork epoch into two children that
differ only in their data order (`vary_augment` also varies augmentation). Per fork:

- **segments** (Figs 1, 8–12): at every common child checkpoint t, train loss and error at `points`
  evenly spaced α on the segment θ_1^t → θ_2^t, on a fixed training subset; the tables add the
  barrier curve (endpoint-subtracted) of each.
- **geometry** (Figs 2, 4b, 13, 14b): sibling angles ∠(θ_1^t − θ_base, θ_2^t − θ_base) with base = the
  origin and base = the fork point, solution-plane determination cos(θ_1^t − θ_2^t, θ_1* − θ_2*) and the
  sibling distance ‖θ_1^t − θ_2^t‖, over all common checkpoints (model parameters only, no BN buffers).
- **prediction** (Figs 4a, 14a): Prop. 1's predicted barrier curve at the final siblings next to the
  measured one.
- **layer-wise** (Figs 5, 15–20), for the forks a setting names in `layerwise_forks`: over child epochs,
  Singh's measured layer-set barrier B_ℓ(½) (one layer interpolated, both bases averaged; column
  ``layer_set_barrier_half``, not the one-sided ``layerwise_barrier`` of ``interpolate --layers``) next to
  Prop. 2's prediction, the layer distance ‖d[ℓ]‖, and eq. 20's cross-block matrices at θ_1^t and θ_2^t
  with their sums (all blocks = Prop. 1 at α = ½; the diagonal = Σ_ℓ Prop. 2; the off-diagonal rest).

Normalisation statistics. The segments of BN models are evaluated with option `bn`. Default
"reset": at every point the BN statistics are recomputed from the first `bn_examples` (default: all)
evaluation images, so the curve is the loss of the network the interpolated weights define, not of a
network that carries the average of two other networks' statistics. "none" evaluates the interpolated
statistics as stored (an interpolated BN net evaluated as is). The Hessians are taken in eval mode with
each endpoint's own statistics, so the prediction step reports the measured barrier with interpolated
statistics ("measured": the function the Taylor model describes) and, for BN models, with reset
statistics too ("measured_bn_reset"); the layer-wise barriers use interpolated statistics.

Every step is cached in the run store; tidy CSV tables sit beside the PNG figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lmclab.curvature.functional import parameter_blocks
from lmclab.curvature.predictions import barrier_prediction
from lmclab.data import DeviceDataset
from lmclab.experiments.context import Experiment, ExperimentContext
from lmclab.experiments.graph import Step, StepContext, step_kind
from lmclab.experiments.settings import ExperimentOptions, PairSetting, Setting
from lmclab.experiments.steps import dataset_for, fork_step, train_step
from lmclab.geometry import ToyLandscape, sibling_geometry
from lmclab.geometry.toy import FOUR_MINIMA, TWO_MINIMA
from lmclab.paths import (
    BN_MODES,
    barrier_curve,
    default_lambdas,
    endpoint_losses,
    evaluate_path,
    has_batchnorm,
    layer_set_barrier,
    path_values,
)
from lmclab.points import distance, parameter_names
from lmclab.report import write_csv
from lmclab.report.singh import (
    plot_barrier_predictions,
    plot_geometry,
    plot_layerwise,
    plot_segments,
    plot_toy_landscapes,
)
from lmclab.store import Run
from lmclab.training import load_run_model, resolve_device

# ------------------------------------------------------------------------------------------- graph


@dataclass(frozen=True, kw_only=True)
class SinghOptions(ExperimentOptions):
    """A preset of presets/singh.toml (its header comment says what each option means). The Hessian steps
    (prediction, layer-wise) use `prediction_examples` training images, by default `examples`."""

    fork_epochs: tuple[int, ...] = ()
    points: int = 25
    examples: int | None = None
    every: int = 1
    bn: str = "reset"
    bn_examples: int | None = None
    prediction_examples: int | None = None
    hvp_batch_size: int = 100
    layerwise_forks: tuple[int, ...] = ()
    layerwise_every: int = 1
    gradient_terms: bool = False
    vary_augment: bool = False
    settings: tuple[PairSetting, ...] = ()

    @property
    def hessian_examples(self) -> int | None:
        return self.prediction_examples if self.prediction_examples is not None else self.examples

    def check(self, setting: Setting) -> None:
        if self.bn not in BN_MODES:
            raise ValueError(f"setting {setting.name}: bn must be one of {', '.join(BN_MODES)}, got {self.bn!r}")
        forks = fork_epochs(self, setting)
        unknown = sorted(set(self.layerwise_forks) - set(forks))
        if unknown:
            raise ValueError(f"setting {setting.name}: layerwise_forks {unknown} are not fork epochs {forks}")


def fork_epochs(preset: SinghOptions, s: Setting) -> list[int]:
    """The fork epochs of setting `s` (`preset`: the options at that setting), checked and sorted."""
    epochs = list(preset.fork_epochs)
    if not epochs or any(e < 0 for e in epochs) or len(set(epochs)) != len(epochs):
        raise ValueError(f"setting {s.name}: fork_epochs must be distinct non-negative epochs, got {epochs}")
    last = s.base_config().train.epochs
    if max(epochs) >= last:
        raise ValueError(f"setting {s.name}: fork epoch {max(epochs)} leaves no child training ({last} epochs)")
    return sorted(epochs)


@dataclass(frozen=True, kw_only=True)
class SiblingSteps:
    """One pair of children forked at one epoch: their training and the analyses of the pair."""

    a: Step
    b: Step
    segments: Step
    geometry: Step
    prediction: Step
    layerwise: Step | None = None

    def steps(self) -> list[Step]:
        return [
            self.a,
            self.b,
            self.segments,
            self.geometry,
            self.prediction,
            *([self.layerwise] if self.layerwise is not None else []),
        ]


def build_graph(preset: SinghOptions) -> dict[str, dict[int, list[SiblingSteps]]]:
    """graph[setting][fork epoch][pair] = the pair's :class:`SiblingSteps`."""
    graph: dict[str, dict[int, list[SiblingSteps]]] = {}
    for s in preset.settings:
        o = preset.at(s)
        o.check(s)
        forks = fork_epochs(o, s)
        parent_config = s.base_config()
        parent = train_step(
            f"{s.name}/parent", parent_config, s.preset, checkpoints="epochs:" + ",".join(str(e) for e in forks)
        )
        common = {"examples": o.examples, "every": o.every}
        graph[s.name] = {}
        for epoch in forks:
            graph[s.name][epoch] = []
            for pair in range(s.pairs):
                a, b = (
                    fork_step(
                        parent,
                        parent_config,
                        epoch=epoch,
                        child=2 * pair + m,
                        vary_augment=o.vary_augment,
                        checkpoints="every:1",
                        preset=s.preset,
                    )
                    for m in (0, 1)
                )
                ins = {"a": a, "b": b}
                layerwise = None
                if epoch in o.layerwise_forks:
                    layerwise = Step(
                        "singh_layerwise",
                        {
                            "examples": o.hessian_examples,
                            "every": o.layerwise_every,
                            "batch_size": o.hvp_batch_size,
                            "gradient_terms": o.gradient_terms,
                        },
                        ins,
                    )
                graph[s.name][epoch].append(
                    SiblingSteps(
                        a=a,
                        b=b,
                        segments=Step(
                            "singh_segments",
                            {**common, "points": o.points, "bn": o.bn, "bn_examples": o.bn_examples},
                            ins,
                        ),
                        geometry=Step("singh_geometry", {}, ins),
                        prediction=Step(
                            "singh_prediction",
                            {
                                "points": o.points,
                                "examples": o.hessian_examples,
                                "batch_size": o.hvp_batch_size,
                                "bn_examples": o.bn_examples,
                            },
                            ins,
                        ),
                        layerwise=layerwise,
                    )
                )
    return graph


def run(preset: SinghOptions, ctx: ExperimentContext) -> dict[str, Any]:
    """Train (or reuse) every parent and child of the preset, run the analyses, write tables and figures
    to `ctx.out`. Returns {"out", "files" (name -> path), "steps_run" (the steps not found in the store)}."""
    graph = build_graph(preset)
    ctx.announce(preset.description)
    results, ran = ctx.run_steps(
        step for forks in graph.values() for pairs in forks.values() for siblings in pairs for step in siblings.steps()
    )
    tables = tidy_tables(preset, graph, results)
    out = ctx.out
    files: dict[str, str] = {name: str(write_csv(out / f"{name}.csv", rows)) for name, rows in tables.items() if rows}
    for s in preset.settings:
        sel = {name: [r for r in rows if r.get("setting") == s.name] for name, rows in tables.items()}
        label = s.label
        for metric in ("error", "loss"):
            files[f"segments_{metric}_{s.name}"] = str(
                plot_segments(
                    out / f"segments_{metric}_{s.name}.png",
                    sel["segments"],
                    metric=metric,
                    title=f"{label}: train {metric} on the segment between siblings, over child training",
                )
            )
        files[f"geometry_{s.name}"] = str(
            plot_geometry(
                out / f"geometry_{s.name}.png", sel["angles"], sel["geometry"], title=f"{label}: sibling geometry"
            )
        )
        files[f"barriers_{s.name}"] = str(
            plot_barrier_predictions(
                out / f"barriers_{s.name}.png",
                sel["predictions"],
                sel["prediction_curves"],
                sel["geometry"],
                title=f"{label}: Prop. 1 against measured barriers; sibling distance",
            )
        )
        for epoch in sorted({int(r["fork_epoch"]) for r in sel["layerwise"]}):
            rows = [r for r in sel["layerwise"] if r["fork_epoch"] == epoch and r["pair"] == 0]
            sums = [r for r in sel["cross_block_sums"] if r["fork_epoch"] == epoch and r["pair"] == 0]
            files[f"layerwise_{s.name}_fork{epoch}"] = str(
                plot_layerwise(
                    out / f"layerwise_{s.name}_fork{epoch}.png",
                    rows,
                    sums,
                    title=f"{label}, forked at epoch {epoch}: layer-wise barriers over child training",
                )
            )
    toy_rows = toy_table()
    files["toy"] = str(write_csv(out / "toy.csv", toy_rows))
    files["fig6_toy"] = str(
        plot_toy_landscapes(out / "fig6_toy.png", toy_rows, title="Toy landscapes L(θ) = Π (θ − m_i)² (Singh Fig. 6)")
    )
    return ctx.summary(files, ran)


EXPERIMENT = Experiment("singh", "Singh et al., landscaping LMC (forks over training)", SinghOptions, run)
#: ``run_singh("smoke", out=…, runs_dir=…, data_dir=…, device=…, progress=…, say=…)``: a preset by name.
run_singh = EXPERIMENT


# ------------------------------------------------------------------------------------ step helpers


def sibling_runs(inputs: dict[str, Any]) -> tuple[Run, Run, int, int]:
    """(child 1, child 2, fork step, steps per epoch) of two children of one parent at one fork point."""
    run_a, run_b = Run(Path(inputs["a"]["run"])), Run(Path(inputs["b"]["run"]))
    fork_a, fork_b = run_a.config.fork, run_b.config.fork
    if not fork_a.is_set or fork_a != fork_b:
        raise ValueError(
            f"runs {run_a.path.name} (fork {fork_a}) and {run_b.path.name} (fork {fork_b}) are not "
            "siblings: both must be forked from one parent at one point"
        )
    spe = run_a.meta.steps_per_epoch
    if spe is None or run_b.meta.steps_per_epoch != spe:
        raise ValueError(f"siblings {run_a.path.name} and {run_b.path.name} differ in steps per epoch")
    fork = fork_a.step if fork_a.step is not None else int(fork_a.epoch) * spe  # type: ignore[arg-type]
    return run_a, run_b, fork, spe


def common_steps(run_a: Run, run_b: Run, fork: int, every: int = 1, spe: int = 1) -> list[int]:
    """Checkpoint steps both siblings hold from the fork on; with `every` > 1 only child epochs that are
    multiples of it (the fork and the final state are always kept)."""
    if every < 1:
        raise ValueError(f"every must be a positive number of child epochs, got {every}")
    steps = sorted(s for s in set(run_a.checkpoint_steps()) & set(run_b.checkpoint_steps()) if s >= fork)
    final = min(int(run_a.meta.total_steps or 0), int(run_b.meta.total_steps or 0))
    if not steps or steps[0] != fork or steps[-1] != final:
        raise ValueError(
            f"siblings {run_a.path.name}, {run_b.path.name} need common checkpoints at the fork "
            f"(step {fork}) and at the end (step {final}); they share {steps}"
        )
    return [s for s in steps if s in (fork, final) or ((s - fork) / spe) % every == 0]


def eval_data(ctx: StepContext, run: Run, examples: int | None) -> DeviceDataset:
    """The first `examples` (stratified) training images, un-augmented; capped at the run's own training
    subset so that "train" loss is measured on images the children trained on."""
    limit = run.config.data.train_subset
    if limit is not None:
        examples = limit if examples is None else min(int(examples), limit)
    return dataset_for(ctx, run, "train", examples)


def loss_curve(
    model: torch.nn.Module,
    theta_1: dict,
    theta_2: dict,
    data: DeviceDataset,
    lambdas: Sequence[float],
    bn: str = "none",
    bn_examples: int | None = None,
) -> dict[str, list[float]]:
    """Loss and error at each α on the segment θ_1 → θ_2."""
    rows = evaluate_path(
        model,
        theta_1,
        theta_2,
        {"train": data},
        lambdas=lambdas,
        bn=bn,
        bn_data=data if bn != "none" else None,
        bn_examples=bn_examples,
        progress=False,
    )
    return {m: path_values(rows, m) for m in ("loss", "error")}


def sibling_model_and_data(
    ctx: StepContext, inputs: dict[str, Any], examples: int | None
) -> tuple[Run, Run, int, int, torch.nn.Module, DeviceDataset]:
    """(child 1, child 2, fork step, steps per epoch, the model on the step's device, the evaluation data)."""
    run_a, run_b, fork, spe = sibling_runs(inputs)
    model = load_run_model(run_a, device=resolve_device(ctx.options.get("device", "auto")))
    return run_a, run_b, fork, spe, model, eval_data(ctx, run_a, examples)


def child_epoch(step: int, fork: int, spe: int) -> float:
    return (step - fork) / spe


# -------------------------------------------------------------------------------------- step kinds


@step_kind("singh_segments")
def _segments(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Loss and error on the segment θ_1^t → θ_2^t at every (every-th) common child checkpoint t."""
    run_a, run_b, fork, spe, model, data = sibling_model_and_data(ctx, inputs, config.get("examples"))
    device = next(model.parameters()).device
    bn = config.get("bn", "reset") if has_batchnorm(model) else "none"
    lambdas = default_lambdas(config["points"])
    steps = common_steps(run_a, run_b, fork, config.get("every", 1), spe)
    loss, error = [], []
    for step in tqdm(steps, desc="segments", unit="ckpt", disable=not ctx.options.get("progress", True), leave=False):
        curve = loss_curve(
            model,
            run_a.load_state(step, device),
            run_b.load_state(step, device),
            data,
            lambdas,
            bn=bn,
            bn_examples=config.get("bn_examples"),
        )
        loss.append(curve["loss"])
        error.append(curve["error"])
    return {
        "fork_step": fork,
        "steps_per_epoch": spe,
        "steps": steps,
        "lambdas": lambdas,
        "loss": loss,
        "error": error,
        "bn": bn,
        "n_examples": len(data),
    }


@step_kind("singh_geometry")
def _geometry(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Sibling angles (bases: origin, fork point), plane determination and distance at every common t."""
    run_a, run_b, fork, spe = sibling_runs(inputs)
    keys = parameter_names(load_run_model(run_a))
    steps = common_steps(run_a, run_b, fork, 1, spe)
    base = run_a.load_state(fork)
    if distance(base, run_b.load_state(fork), keys) != 0.0:
        raise ValueError(f"siblings {run_a.path.name} and {run_b.path.name} differ at the fork step {fork}")
    bar = tqdm(steps, desc="geometry", unit="ckpt", disable=not ctx.options.get("progress", True), leave=False)
    geometry = sibling_geometry(
        (run_a.load_state(step) for step in bar),
        (run_b.load_state(step) for step in steps),
        run_a.load_state(steps[-1]),
        run_b.load_state(steps[-1]),
        base,
        keys,
    )
    out = {f: [getattr(g, f) for g in geometry] for f in ("distance", "plane_cos", "angle_origin", "angle_fork")}
    return {"fork_step": fork, "steps_per_epoch": spe, "steps": steps, **out}


@step_kind("singh_prediction")
def _prediction(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Prop. 1 (Hessians at both final siblings) against the measured barrier curve, on a training subset."""
    run_a, run_b, _, _, model, data = sibling_model_and_data(ctx, inputs, config.get("examples"))
    device = next(model.parameters()).device
    theta_1, theta_2 = run_a.load_state(device=device), run_b.load_state(device=device)
    lambdas = default_lambdas(config["points"])
    pred = barrier_prediction(model, theta_1, theta_2, data, alphas=lambdas, batch_size=config.get("batch_size", 100))
    measured = barrier_curve(lambdas, loss_curve(model, theta_1, theta_2, data, lambdas)["loss"])
    out = {
        "lambdas": lambdas,
        "predicted": pred.curve.tolist(),
        "predicted_max": pred.max,
        "q1": pred.q1,
        "q2": pred.q2,
        "measured": measured.tolist(),
        "measured_max": float(measured.max()),
        "distance": distance(theta_1, theta_2, parameter_names(model)),
        "n_examples": len(data),
    }
    if has_batchnorm(model):
        reset = barrier_curve(
            lambdas,
            loss_curve(model, theta_1, theta_2, data, lambdas, bn="reset", bn_examples=config.get("bn_examples"))[
                "loss"
            ],
        )
        out.update(measured_bn_reset=reset.tolist(), measured_bn_reset_max=float(reset.max()))
    return out


@step_kind("singh_layerwise")
def _layerwise(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Over child epochs (the fork itself, where d = 0, left out): per layer ℓ the measured B_ℓ(½), Prop. 2
    at α = ½ and ‖d[ℓ]‖; the measured barrier with all layers interpolated; eq. 20's cross-block
    matrices at θ_1^t and θ_2^t (one HVP pass per endpoint gives all of them)."""
    run_a, run_b, fork, spe, model, data = sibling_model_and_data(ctx, inputs, config.get("examples"))
    device = next(model.parameters()).device
    blocks = parameter_blocks(model)
    params = parameter_names(model)
    steps = [s for s in common_steps(run_a, run_b, fork, config.get("every", 1), spe) if s != fork]
    half = [0.0, 0.5, 1.0]
    rows: dict[str, list] = {
        "measured": [],
        "predicted": [],
        "layer_distance": [],
        "measured_all": [],
        "cross_blocks_theta_1": [],
        "cross_blocks_theta_2": [],
    }
    for step in tqdm(steps, desc="layer-wise", unit="ckpt", disable=not ctx.options.get("progress", True), leave=False):
        theta_1, theta_2 = run_a.load_state(step, device), run_b.load_state(step, device)
        pred = barrier_prediction(
            model,
            theta_1,
            theta_2,
            data,
            alphas=half,
            layers=blocks,
            gradient_terms=config.get("gradient_terms", False),
            batch_size=config.get("batch_size", 100),
        )
        ends = endpoint_losses(model, theta_1, theta_2, data)
        rows["measured"].append(
            [float(layer_set_barrier(model, theta_1, theta_2, data, half, t, ends)[1]) for t in blocks.values()]
        )
        rows["predicted"].append([pred.layers[name].at(0.5) for name in blocks])
        rows["layer_distance"].append([distance(theta_1, theta_2, t) for t in blocks.values()])
        rows["measured_all"].append(float(layer_set_barrier(model, theta_1, theta_2, data, half, params, ends)[1]))
        rows["cross_blocks_theta_1"].append(pred.cross_blocks.theta_1.tolist())
        rows["cross_blocks_theta_2"].append(pred.cross_blocks.theta_2.tolist())
    return {
        "fork_step": fork,
        "steps_per_epoch": spe,
        "steps": steps,
        "layers": list(blocks),
        "gradient_terms": bool(config.get("gradient_terms", False)),
        "n_examples": len(data),
        **rows,
    }


# ------------------------------------------------------------------------------------------ tables


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def tidy_tables(
    preset: SinghOptions, graph: dict[str, dict[int, list[SiblingSteps]]], results: dict[str, dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """Tidy rows by table: segments, geometry, angles, predictions, prediction_curves, layerwise,
    cross_block_sums, cross_blocks; undefined values (e.g. angles at the fork) are NaN."""
    tables: dict[str, list[dict[str, Any]]] = {
        k: []
        for k in (
            "segments",
            "geometry",
            "angles",
            "predictions",
            "prediction_curves",
            "layerwise",
            "cross_block_sums",
            "cross_blocks",
        )
    }
    for s in preset.settings:
        for epoch, pairs in graph[s.name].items():
            for pair, steps in enumerate(pairs):
                base = {"setting": s.name, "fork_epoch": epoch, "pair": pair}
                seg = results[steps.segments.key]
                for step, loss, error in zip(seg["steps"], seg["loss"], seg["error"]):
                    t = child_epoch(step, seg["fork_step"], seg["steps_per_epoch"])
                    for metric, values in (("loss", loss), ("error", error)):
                        vals = [_nan(v) for v in values]
                        curve = (
                            barrier_curve(seg["lambdas"], vals).tolist()
                            if all(map(math.isfinite, vals))
                            else [math.nan] * len(vals)
                        )
                        tables["segments"] += [
                            {
                                **base,
                                "child_epoch": t,
                                "step": step,
                                "metric": metric,
                                "lambda": lam,
                                "value": v,
                                "barrier": b,
                                "bn": seg["bn"],
                                "examples": seg.get("n_examples"),
                            }
                            for lam, v, b in zip(seg["lambdas"], vals, curve)
                        ]
                geo = results[steps.geometry.key]
                for i, step in enumerate(geo["steps"]):
                    tables["geometry"].append(
                        {
                            **base,
                            "child_epoch": child_epoch(step, geo["fork_step"], geo["steps_per_epoch"]),
                            "step": step,
                            **{k: _nan(geo[k][i]) for k in ("distance", "plane_cos", "angle_origin", "angle_fork")},
                        }
                    )
                tables["angles"] += [
                    {**base, "base": name, "angle_degrees": _nan(geo[f"angle_{name}"][-1])}
                    for name in ("origin", "fork")
                ]
                pred = results[steps.prediction.key]
                tables["predictions"].append(
                    {
                        **base,
                        **{
                            k: _nan(pred.get(k))
                            for k in ("measured_max", "predicted_max", "measured_bn_reset_max", "distance", "q1", "q2")
                        },
                        "examples": pred.get("n_examples"),
                    }
                )
                for i, alpha in enumerate(pred["lambdas"]):
                    row = {
                        **base,
                        "alpha": alpha,
                        "measured": _nan(pred["measured"][i]),
                        "predicted": _nan(pred["predicted"][i]),
                    }
                    if "measured_bn_reset" in pred:
                        row["measured_bn_reset"] = _nan(pred["measured_bn_reset"][i])
                    tables["prediction_curves"].append(row)
                if steps.layerwise is not None:
                    _layerwise_rows(tables, base, results[steps.layerwise.key])
    return tables


def _layerwise_rows(tables: dict[str, list[dict[str, Any]]], base: dict[str, Any], res: dict[str, Any]) -> None:
    names = res["layers"]
    for i, step in enumerate(res["steps"]):
        t = child_epoch(step, res["fork_step"], res["steps_per_epoch"])
        for j, layer in enumerate(names):
            tables["layerwise"].append(
                {
                    **base,
                    "child_epoch": t,
                    "layer_index": j,
                    "layer": layer,
                    "layer_set_barrier_half": _nan(res["measured"][i][j]),
                    "predicted_half": _nan(res["predicted"][i][j]),
                    "distance": _nan(res["layer_distance"][i][j]),
                    "examples": res.get("n_examples"),
                }
            )
        m1 = np.array(res["cross_blocks_theta_1"][i], dtype=float)
        m2 = np.array(res["cross_blocks_theta_2"][i], dtype=float)
        mean = (m1 + m2) / 2
        sums = {
            "measured: all layers interpolated": res["measured_all"][i],
            "measured: Σ_ℓ one-layer barriers": float(np.nansum([_nan(v) for v in res["measured"][i]])),
            "Prop. 1 at ½ = Σ all blocks, ½(H₁+H₂)": float(mean.sum()),
            "eq. 20: Σ all blocks, H₁": float(m1.sum()),
            "Σ diagonal blocks = Σ_ℓ Prop. 2": float(np.trace(mean)),
            "Σ off-diagonal blocks": float(mean.sum() - np.trace(mean)),
        }
        tables["cross_block_sums"] += [
            {**base, "child_epoch": t, "quantity": k, "value": _nan(v)} for k, v in sums.items()
        ]
        tables["cross_blocks"] += [
            {**base, "child_epoch": t, "row": names[r], "col": names[c], "theta_1": m1[r, c], "theta_2": m2[r, c]}
            for r in range(len(names))
            for c in range(len(names))
        ]


def toy_table(points: int = 101, grid: int = 401) -> list[dict[str, Any]]:
    """Fig. 6: each landscape on θ ∈ [−2, 2] ("landscape" rows) and, between each pair of adjacent
    minima, the exact barrier curve and Prop. 1's prediction at `points` α ("pair" rows)."""
    rows: list[dict[str, Any]] = []
    for name, minima in (("two minima", TWO_MINIMA), ("four minima", FOUR_MINIMA)):
        toy = ToyLandscape(minima)
        theta = np.linspace(-2, 2, grid)
        rows += [
            {"landscape": name, "kind": "landscape", "theta": float(x), "loss": float(v)}
            for x, v in zip(theta, toy.loss(theta))
        ]
        alphas = np.linspace(0, 1, points)
        for a, b in toy.adjacent_pairs():
            height, at = toy.barrier(a, b)
            for alpha, exact, predicted in zip(alphas, toy.barrier_curve(a, b, alphas), toy.prediction(a, b, alphas)):
                rows.append(
                    {
                        "landscape": name,
                        "kind": "pair",
                        "pair": f"{a:g} → {b:g}",
                        "alpha": float(alpha),
                        "theta": float((1 - alpha) * a + alpha * b),
                        "loss": float(exact),
                        "predicted": float(predicted),
                        "barrier": height,
                        "barrier_alpha": at,
                    }
                )
    return rows
