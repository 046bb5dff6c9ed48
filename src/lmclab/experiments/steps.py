"""The step kinds experiments are built from: train a member (or a forked child), align a pair,
evaluate a path, directional derivatives of the loss at an endpoint, logit trajectories and their
approximations.

Every step takes its runs from its inputs (`train` results) and its options (runs_dir, data_dir,
device, progress) from the executor, so the same graph runs anywhere.

`train` steps also run as packs (`GraphExecutor(pack=True)`, `lmclab run --pack`): steps ready together
whose runs differ only in their seeds (`training.packed.check_packable`; the same preset label and kept
checkpoints) train in one `train_pack` call, each giving the result its step gives alone. Fork children
of one parent at one fork point pack too (BatchNorm models included); a model that packed training refuses
(dropout: `check_model_packable`) or whose layers cannot be built before its data is read (image folders) trains
one step at a time, and the executor says so.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from lmclab.align import get_pair_method
from lmclab.config import RunConfig, UsageError
from lmclab.curvature.derivatives import loss_derivatives
from lmclab.curvature.taylor import (
    centred_at,
    interpolated_logits,
    interpolated_outputs,
    logit_rmse,
    path_approximations,
    path_coefficients,
    path_direction,
)
from lmclab.data import DeviceDataset
from lmclab.data.registry import STATIC_INFO, normalise_name
from lmclab.experiments.graph import PACK_KINDS, PackKind, Step, StepContext, step_kind
from lmclab.experiments.lmc import align_runs, load_alignment
from lmclab.paths import default_lambdas, evaluate_path, path_values
from lmclab.store import Run
from lmclab.training import CheckpointSchedule, RunOptions, init_model, load_run_model, resolve_device, train
from lmclab.training.forks import child_config
from lmclab.training.loop import TrainingDiverged
from lmclab.training.packed import PackDiverged, check_model_packable, check_packable, train_pack


@lru_cache(maxsize=8)
def _dataset(name: str, split: str, examples: int | None, data_dir: str | None, device: str) -> DeviceDataset:
    return DeviceDataset.load(
        name, split, data_dir=data_dir, device=device, subset=examples, augment=False, progress=False
    )


def dataset_for(ctx: StepContext, run: Run, split: str, examples: int | None) -> DeviceDataset:
    """A (stratified subset of a) split of the run's dataset, kept in memory across steps."""
    device = str(resolve_device(ctx.options.get("device", "auto")))
    return _dataset(run.config.data.dataset, split, examples, ctx.options.get("data_dir"), device)


def train_step(name: str, config: RunConfig, preset: str | None = None, checkpoints: str | None = None) -> Step:
    """Train `config`; `checkpoints`: a CheckpointSchedule spec (`epochs:0,1,2+every:5`, …), not part of the
    run hash."""
    if checkpoints:
        CheckpointSchedule.parse(checkpoints)  # fail while building the graph, not while running it
    step_config = {"run": config.normalised().to_dict(), "preset": preset, "label": name}
    if checkpoints:  # only when given, so that the keys of existing train steps stay the same
        step_config["checkpoints"] = checkpoints
    return Step("train", step_config)


def fork_step(
    parent: Step,
    parent_config: RunConfig,
    *,
    epoch: int,
    child: int,
    vary_augment: bool = False,
    checkpoints: str = "every:1",
    preset: str | None = None,
) -> Step:
    """A `train` step for child `child` of `parent_config` forked at `epoch` (`forks.child_config`), with
    the parent's train step as input, so that an executor trains the parent first."""
    if parent.kind != "train" or parent.config.get("run") != parent_config.normalised().to_dict():
        raise ValueError(
            f"fork_step: parent step {parent.name} does not train parent_config "
            f"(run {parent_config.run_hash()}); pass the train step of that config"
        )
    config = child_config(parent_config, epoch=epoch, child=child, vary_augment=vary_augment)
    step = train_step(
        f"{parent.config.get('label')}/fork{epoch}/child{child}",
        config,
        preset if preset is not None else parent.config.get("preset"),
        checkpoints=checkpoints,
    )
    return Step("train", step.config, inputs={"parent": parent})


def _run_options(ctx: StepContext, config: dict[str, Any]) -> RunOptions:
    """The training options of a `train` step (its preset label and kept checkpoints, the executor's rest)."""
    o = ctx.options
    return RunOptions(
        runs_dir=o.get("runs_dir"),
        data_dir=o.get("data_dir"),
        device=o.get("device", "auto"),
        progress=o.get("progress", True),
        preset=config.get("preset"),
        eval_every=0,
        checkpoints=CheckpointSchedule.parse(config.get("checkpoints") or ""),
    )


def _train_result(run: Run) -> dict[str, Any]:
    return {"run": str(run.path), "final_metrics": run.meta.final_metrics}


@step_kind("train", self_caching=True, resources="training")
def _train(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    return _train_result(train(RunConfig.from_dict(config["run"]), _run_options(ctx, config)))


def _pack_joins(group: list[Step], step: Step) -> bool:
    """Whether train `step` may join the pack `group`: the same preset label and kept checkpoints, and
    runs that `check_packable` accepts together (equal except their seeds, distinct, elementwise optimizer)."""
    first = group[0].config
    if (step.config.get("preset"), step.config.get("checkpoints")) != (first.get("preset"), first.get("checkpoints")):
        return False
    try:
        check_packable([RunConfig.from_dict(s.config["run"]) for s in [*group, step]])
    except (UsageError, ValueError):
        return False
    return True


def _pack_refusal(group: list[Step]) -> str | None:
    """Why the runs of `group` cannot train as a pack: their model's layers (`check_model_packable`, the
    model built on the meta device from the dataset's registered shape), or a dataset whose shape is only
    known once read (image folders)."""
    config = RunConfig.from_dict(group[0].config["run"])
    info = STATIC_INFO.get(normalise_name(config.data.dataset))
    if info is None:
        return f"dataset {config.data.dataset}: the model's layers are checked for packing only on registered datasets"
    with torch.device("meta"):
        model = init_model(config, info)
    try:
        check_model_packable(model, config)
    except UsageError as exc:
        return str(exc)
    return None


def _train_packed(
    contexts: list[StepContext], configs: list[dict[str, Any]], inputs: list[dict[str, Any]]
) -> list[dict[str, Any] | Exception]:
    """The `train` steps of one pack: one `train_pack` call; a member that diverged gets the
    TrainingDiverged its step would raise alone (its run's recorded error), the others their results."""
    runs_configs = [RunConfig.from_dict(c["run"]) for c in configs]
    try:
        runs = train_pack(runs_configs, _run_options(contexts[0], configs[0]))
    except PackDiverged as exc:
        diverged = set(exc.diverged)
        return [
            TrainingDiverged(run.meta.error or str(exc)) if run.hash in diverged else _train_result(run)
            for run in exc.runs
        ]
    return [_train_result(run) for run in runs]


PACK_KINDS["train"] = PackKind(joins=_pack_joins, refusal=_pack_refusal, run=_train_packed)


def align_step(a: Step, b: Step, method: str, seed: int = 0) -> Step:
    """The step aligning run `b` to run `a` with two-model `method`; its config carries the method's
    revision (:meth:`lmclab.align.registry.MethodEntry.identity`), so the paths built on it are recomputed
    when the method changes."""
    return Step("align", {**get_pair_method(method).identity(), "seed": seed}, {"a": a, "b": b})


@step_kind("align", self_caching=True, resources="assignment")
def _align(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    alignment = align_runs(
        Run(Path(inputs["a"]["run"])),
        Run(Path(inputs["b"]["run"])),
        method=config["method"],
        seed=config.get("seed", 0),
        data_dir=ctx.options.get("data_dir"),
        device=ctx.options.get("device", "auto"),
        progress=ctx.options.get("progress", True),
    )
    return {
        "alignment": str(alignment.path),
        "distance_before": alignment.info.get("distance_before"),
        "distance_after": alignment.info.get("distance_after"),
    }


def endpoints(ctx: StepContext, inputs: dict[str, Any]) -> tuple[Run, torch.nn.Module, dict, dict]:
    """(run A, model, θ_A, θ_B or π(θ_B) when an `align` input is present), on the step's device."""
    device = resolve_device(ctx.options.get("device", "auto"))
    run_a, run_b = Run(Path(inputs["a"]["run"])), Run(Path(inputs["b"]["run"]))
    model = load_run_model(run_a, device=device)
    theta_a, theta_b = run_a.load_state(device=device), run_b.load_state(device=device)
    if "align" in inputs:
        alignment = load_alignment(inputs["align"]["alignment"])
        theta_b = alignment.perm.apply(theta_b, alignment.spec)
    return run_a, model, theta_a, theta_b


@step_kind("path")
def _path(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Loss, accuracy and error at `points` evenly spaced λ on one split."""
    run_a, model, theta_a, theta_b = endpoints(ctx, inputs)
    data = dataset_for(ctx, run_a, config["split"], config.get("examples"))
    bn_data = dataset_for(ctx, run_a, "train", config.get("examples")) if config.get("bn", "none") != "none" else None
    lambdas = default_lambdas(config["points"])
    rows = evaluate_path(
        model,
        theta_a,
        theta_b,
        {config["split"]: data},
        lambdas=lambdas,
        bn=config.get("bn"),
        bn_data=bn_data,
        progress=False,
    )
    out: dict[str, Any] = {"lambdas": lambdas, "n_examples": len(data)}
    for metric in ("loss", "accuracy", "error"):
        out[metric] = path_values(rows, metric)
    return out


@step_kind("loss_derivatives")
def _loss_derivatives(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """f^(k)(0), k = 0…order, of f(t) = L(θ_A + t d) (center "a") or L(θ_B − t d) (center "b"), d = θ_B − θ_A."""
    run_a, model, theta_a, theta_b = endpoints(ctx, inputs)
    data = dataset_for(ctx, run_a, config["split"], config.get("examples"))
    center, direction = centred_at(config["center"], theta_a, theta_b, path_direction(model, theta_a, theta_b))
    result = loss_derivatives(
        model,
        center,
        direction,
        data,
        order=config["order"],
        method=config.get("method", "auto"),
        batch_size=config.get("batch_size", 50),
    )
    return {"coefficients": result.coefficients.tolist(), "n_examples": result.n_examples, "method": result.method}


@step_kind("logits")
def _logits(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Benkő Figs 7–8: true logits z(θ_λ) of every input along the path, their Taylor approximations
    (orders 1…order, centred at A and at B), the RMSE of the argmax-z(θ_A) component per λ, and the
    trajectories of one input's three largest components next to the direct interpolation."""
    run_a, model, theta_a, theta_b = endpoints(ctx, inputs)
    data = dataset_for(ctx, run_a, config["split"], config.get("examples"))
    lambdas = default_lambdas(config["points"])
    order = config["order"]
    coeff_a, coeff_b = path_coefficients(model, theta_a, theta_b, data, order=order, kind="logits")
    true = interpolated_logits(model, theta_a, theta_b, data, lambdas).double()  # (L, N, C)
    z_a = true[0]
    approx = {
        series.name: series.values.permute(2, 0, 1)  # (L, N, C)
        for series in path_approximations(coeff_a, coeff_b, lambdas, range(1, order + 1))
    }
    direct = interpolated_outputs(true[0], true[-1], lambdas)
    rmse = {name: logit_rmse(true, a, z_a).tolist() for name, a in approx.items()}
    rmse["direct"] = logit_rmse(true, direct, z_a).tolist()
    n = int(config.get("example_index", 0))
    top = torch.topk(true[:, n, :].abs().amax(0), k=min(3, true.shape[-1])).indices.tolist()
    example = {
        "index": n,
        "label": int(data.labels[n]),
        "classes": top,
        "true": true[:, n, top].tolist(),
        "direct": direct[:, n, top].tolist(),
        **{name: a[:, n, top].tolist() for name, a in approx.items()},
    }
    return {"lambdas": lambdas, "n_examples": len(data), "rmse": rmse, "example": example}
