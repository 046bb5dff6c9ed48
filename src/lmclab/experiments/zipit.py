"""ZipIt! (Stoica et al., ICLR 2024) on disjoint tasks: two models trained on disjoint halves of the classes,
merged, and evaluated on the joint task.

For each setting and pair p: model A is trained on the classes `tasks[0]` only, model B on `tasks[1]`
(``data.classes``; both keep a logit for every class of the dataset, the other task's logits are simply never
the target), from seeds `SeedConfig.from_seed(2p)` and `from_seed(2p + 1)`. Then, on `zip_examples` training
images of the joint task (the union of the tasks' classes; stratified), the step `zipit_eval` builds

- ``model_a``, ``model_b``: each model alone;
- ``ensemble``: both full models, their logits combined (= zipping nothing: two heads on an empty trunk);
- ``average``: ½(θ_A + θ_B) without alignment; ``weight_matching`` / ``activation_matching``: B permuted
  to A (:func:`lmclab.align.align`), then averaged (every tensor, the last layer too);
- ``zipit``: :func:`lmclab.align.zipit.apply_zip` of the first k groups of the spec for every level k in
  `levels` (default 1 … G, G = every group: the full zip; a level whose group set ZipIt refuses, e.g. half
  of a residual stream, is left out and the result says so); the trunk feeds both models' heads;
  pairs within one model allowed up to the budget ``alpha`` (:func:`lmclab.align.zipit.greedy_pairs`; 1: free);
- ``zipit_across``: the full zip with pairs only across models (α = 0): a greedy permutation, then averaging.

BatchNorm models get their statistics reset on the correlation images after merging (``bn``).

Every method yields one or two heads' logits (one per class of the dataset) on `eval_examples` test images of
the joint task (stratified), combined into one joint prediction by each rule of
:data:`lmclab.align.zipit.COMBINE_RULES` — ``mean`` (the heads' logits averaged: the paper's heads share an
output space; for a single merged model it is its own logits) and ``concat`` (each class scored by the head of
its task). Metrics per rule (:func:`lmclab.align.zipit.joint_metrics`): ``joint_accuracy`` (argmax over the
joint task's classes), ``task_accuracy_<t>`` (test images of task t, argmax over task t's classes: the paper's
per-task accuracy), ``task_accuracy_mean``, ``joint_loss`` (cross-entropy of the joint logits over the joint
task's classes).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import lmclab.experiments.steps  # noqa: F401  (registers the train step)
from lmclab.align import align
from lmclab.align.zipit import (
    COMBINE_RULES,
    ZipError,
    apply_zip,
    joint_metrics,
    zip_correlations,
    zip_matches,
    zip_prefix,
)
from lmclab.config import RunConfig, SeedConfig
from lmclab.data import DeviceDataset
from lmclab.experiments.context import Experiment, ExperimentContext
from lmclab.experiments.graph import Step, StepContext, step_kind
from lmclab.experiments.lmc import check_same_architecture, example_input
from lmclab.experiments.settings import ExperimentOptions, Setting
from lmclab.experiments.steps import train_step
from lmclab.paths.barriers import spread
from lmclab.paths.normalization import has_batchnorm, reset_bn_stats
from lmclab.permutation import derive_spec
from lmclab.points import Point, mean
from lmclab.report import write_csv
from lmclab.report.zipit import plot_zipit
from lmclab.store import Run
from lmclab.training import load_run_model, load_run_split, resolve_device

#: Methods in table and figure order.
METHODS = (
    "model_a",
    "model_b",
    "ensemble",
    "average",
    "weight_matching",
    "activation_matching",
    "zipit",
    "zipit_across",
)
BN_MODES = ("auto", "reset", "none")


@dataclass(frozen=True, kw_only=True)
class ZipitSetting(Setting):
    """A setting of `pairs` pairs (A on task 0, B on task 1)."""

    pairs: int = 1

    def check(self) -> None:
        super().check()
        if self.pairs < 1:
            raise ValueError(f"setting {self.name}: pairs must be ≥ 1, got {self.pairs}")

    def member_config(self, pair: int, member: int, tasks: Sequence[Sequence[int]]) -> RunConfig:
        """Member `member` (0: A, 1: B) of pair `pair`: trained on `tasks[member]`, seeds from_seed(2·pair + member)."""
        base = self.base_config()
        data = dataclasses.replace(base.data, classes=tuple(tasks[member]))
        return dataclasses.replace(base, data=data, seeds=SeedConfig.from_seed(2 * pair + member))


@dataclass(frozen=True, kw_only=True)
class ZipitOptions(ExperimentOptions):
    """The study's options (a preset's keys)."""

    tasks: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
    levels: tuple[int, ...] = ()  # zip the first k groups for each k; () = every k from 1 to all groups
    zip_examples: int = 5000  # training images (all classes, stratified) to correlate features / match activations
    batch_size: int = 500
    combine: str = "mean"  # the rule the figure and the printed table show (the CSV has every rule)
    bn: str = "auto"  # reset BatchNorm statistics of merged models: auto (if the model has BN) | reset | none
    weight_seed: int = 0
    alpha: float = 1.0  # ZipIt's budget of same-model merges (lmclab.align.zipit.greedy_pairs); 1: unrestricted
    settings: tuple[ZipitSetting, ...] = ()

    def check(self, setting: Setting) -> None:
        if len(self.tasks) != 2 or not all(self.tasks):
            raise ValueError(f"tasks must be two non-empty class lists, got {self.tasks}")
        if set(self.tasks[0]) & set(self.tasks[1]):
            raise ValueError(f"tasks must be disjoint, got {self.tasks}")
        if self.combine not in COMBINE_RULES:
            raise ValueError(f"combine must be one of {', '.join(COMBINE_RULES)}, got {self.combine!r}")
        if self.bn not in BN_MODES:
            raise ValueError(f"bn must be one of {', '.join(BN_MODES)}, got {self.bn!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        if self.zip_examples < 1 or self.batch_size < 1 or any(k < 1 for k in self.levels):
            raise ValueError("zip_examples, batch_size and every level must be ≥ 1")


def build_graph(preset: ZipitOptions) -> dict[str, list[Step]]:
    """graph[setting] = its `zipit_eval` steps, one per pair (each with its two train steps as inputs)."""
    graph: dict[str, list[Step]] = {}
    for s in preset.settings:
        o = preset.at(s)
        evals = []
        for p in range(s.pairs):
            a, b = (train_step(f"{s.name}/pair{p}/{'ab'[m]}", s.member_config(p, m, o.tasks), s.preset) for m in (0, 1))
            config = {
                "tasks": [list(t) for t in o.tasks],
                "levels": list(o.levels),
                "zip_examples": o.zip_examples,
                "examples": s.eval_examples,
                "batch_size": o.batch_size,
                "bn": o.bn,
                "weight_seed": o.weight_seed,
                "alpha": o.alpha,
            }
            evals.append(Step("zipit_eval", config, {"a": a, "b": b}))
        graph[s.name] = evals
    return graph


# ------------------------------------------------------------------------------------------------ the step


def _logits(
    model: torch.nn.Module, theta: Point, data: DeviceDataset, bn_data: DeviceDataset | None, batch: int
) -> torch.Tensor:
    """Logits of the architecture `model` at θ on `data` (BN statistics first reset on `bn_data` if given)."""
    m = copy.deepcopy(model)
    m.load_state_dict(theta)
    if bn_data is not None:
        reset_bn_stats(m, bn_data, batch_size=batch)
    m.eval()
    with torch.no_grad():
        return torch.cat([m(x) for x, _ in data.batches(batch)])


@step_kind("zipit_eval")
def _zipit_eval(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    device = resolve_device(ctx.options.get("device", "auto"))
    run_a, run_b = Run(Path(inputs["a"]["run"])), Run(Path(inputs["b"]["run"]))
    check_same_architecture(run_a, run_b)
    model = load_run_model(run_a, device=device)
    theta_a, theta_b = run_a.load_state(device=device), run_b.load_state(device=device)
    model_b = load_run_model(run_b, device=device)
    spec = derive_spec(model, example_input(run_a).to(device))
    tasks = [tuple(t) for t in config["tasks"]]
    batch = int(config["batch_size"])
    union = tuple(sorted({c for t in tasks for c in t}))  # the joint task's classes

    def split(name: str, examples: int | None) -> DeviceDataset:
        """`examples` of split `name` (stratified) among the joint task's classes."""
        data_dir = ctx.options.get("data_dir")
        return load_run_split(
            run_a, name, subset=examples, classes=union, data_dir=data_dir, device=device, progress=False
        )

    train, test = split("train", config["zip_examples"]), split("test", config.get("examples"))
    xs = [x for x, _ in train.batches(batch)]
    bn = config["bn"]
    bn_data = train if bn == "reset" or (bn == "auto" and has_batchnorm(model)) else None

    def evaluate(heads: Sequence[Point], merged: bool = True) -> dict[str, dict[str, float]]:
        logits = [_logits(model, h, test, bn_data if merged else None, batch) for h in heads]
        return {rule: m.to_json() for rule, m in joint_metrics(logits, test.labels, tasks).items()}

    results: list[dict[str, Any]] = []

    def add(method: str, metrics: Mapping[str, Mapping[str, float]], zipped: int | None = None) -> None:
        results.append({"method": method, "zipped": zipped, "metrics": metrics})

    add("model_a", evaluate([theta_a], merged=False))
    add("model_b", evaluate([theta_b], merged=False))
    add("ensemble", evaluate([theta_a, theta_b], merged=False), zipped=0)
    add("average", evaluate([mean([theta_a, theta_b])]))
    weight = align(theta_a, theta_b, spec, method="weight", seed=config["weight_seed"])
    add("weight_matching", evaluate([mean([theta_a, weight.perm.apply(theta_b, spec)])]))
    act = align(theta_a, theta_b, spec, method="activation", model=model, batches=xs)
    add("activation_matching", evaluate([mean([theta_a, act.perm.apply(theta_b, spec)])]))

    groups = len(spec.groups)
    corr = zip_correlations(model, model_b, spec, xs)
    matches = {alpha: zip_matches(corr, spec, alpha=alpha) for alpha in (config["alpha"], 0.0)}
    levels = list(config["levels"]) or list(range(1, groups + 1))
    too_deep = [k for k in levels if k > groups]
    if too_deep:
        raise ZipError(f"levels {too_deep}: the model has {groups} groups")
    refused: dict[int, str] = {}
    for k in levels:
        try:
            zipped = apply_zip(theta_a, theta_b, spec, matches[config["alpha"]], zip_prefix(spec, k))
        except ZipError as exc:
            if config["levels"]:  # asked for by name: an error, never skipped
                raise
            refused[k] = str(exc).splitlines()[0]
            continue
        add("zipit", evaluate(zipped.heads), zipped=k)
    across = apply_zip(theta_a, theta_b, spec, matches[0.0], spec.names)
    add("zipit_across", evaluate(across.heads), zipped=groups)
    full = matches[config["alpha"]]
    return {
        "results": results,
        "groups": spec.names,
        "levels_refused": {str(k): v for k, v in refused.items()},
        "within_pairs": {g: full[g].within for g in spec.names},
        "group_sizes": {g.name: g.size for g in spec.groups},
        "n_test": len(test),
        "n_zip": len(train),
        "runs": [str(run_a.path), str(run_b.path)],
        "final_metrics": [run_a.meta.final_metrics, run_b.meta.final_metrics],
    }


# ------------------------------------------------------------------------------------------------ tables


def tidy_rows(graph: Mapping[str, Sequence[Step]], results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, pair, method, zipped groups, rule, metric)."""
    rows = []
    for setting, steps in graph.items():
        for pair, step in enumerate(steps):
            res = results[step.key]
            total = len(res["groups"])
            for r in res["results"]:
                for rule, metrics in r["metrics"].items():
                    for metric, value in metrics.items():
                        rows.append(
                            {
                                "setting": setting,
                                "pair": pair,
                                "method": r["method"],
                                "zipped_groups": "" if r["zipped"] is None else r["zipped"],
                                "groups": total,
                                "combine": rule,
                                "metric": metric,
                                "value": value,
                                "n_test": res["n_test"],
                            }
                        )
    return rows


def summary_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and SD over pairs of every (setting, method, zipped groups, rule, metric)."""
    keyed: dict[tuple[Any, ...], list[float]] = {}
    for r in rows:
        key = (r["setting"], r["method"], r["zipped_groups"], r["groups"], r["combine"], r["metric"])
        keyed.setdefault(key, []).append(float(r["value"]))
    out = []
    for (setting, method, zipped, groups, rule, metric), values in keyed.items():
        s = spread(values)
        out.append(
            {
                "setting": setting,
                "method": method,
                "zipped_groups": zipped,
                "groups": groups,
                "combine": rule,
                "metric": metric,
                "mean": s.mean,
                "sd": s.sd,
                "pairs": len(values),
            }
        )
    return out


def method_label(method: str, zipped: Any, groups: Any) -> str:
    if method != "zipit":
        return method
    return "zipit (full)" if zipped == groups else f"zipit {zipped}/{groups}"


def format_table(summary: Sequence[Mapping[str, Any]], setting: str, rule: str) -> str:
    """The printed table: one line per method, joint and per-task accuracy (mean over pairs)."""
    pick = [r for r in summary if r["setting"] == setting and r["combine"] == rule]
    metrics = ("joint_accuracy", "task_accuracy_0", "task_accuracy_1", "task_accuracy_mean")
    names: list[tuple[str, Any, Any]] = []
    for r in pick:
        key = (r["method"], r["zipped_groups"], r["groups"])
        if key not in names:
            names.append(key)
    lines = [f"{'method':<22}" + "".join(f"{m:>20}" for m in ("joint acc", "task A acc", "task B acc", "task avg"))]
    for method, zipped, groups in names:
        cells = []
        for metric in metrics:
            r = next(x for x in pick if (x["method"], x["zipped_groups"], x["metric"]) == (method, zipped, metric))
            cells.append(f"{100 * r['mean']:.2f}" + (f" ± {100 * r['sd']:.2f}" if r["pairs"] > 1 else ""))
        lines.append(f"{method_label(method, zipped, groups):<22}" + "".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)


def run(preset: ZipitOptions, ctx: ExperimentContext) -> dict[str, Any]:
    """Train (or reuse) the task models, merge them every way, evaluate on the joint task; tables and figures."""
    graph = build_graph(preset)
    ctx.announce(preset.description)
    results, ran = ctx.run_steps(step for steps in graph.values() for step in steps)
    rows = tidy_rows(graph, results)
    summary = summary_rows(rows)
    out = ctx.out
    files = {
        "table": str(write_csv(out / "zipit.csv", rows)),
        "summary": str(write_csv(out / "zipit_summary.csv", summary)),
    }
    tables = {}
    for s in preset.settings:
        o = preset.at(s)
        first = results[graph[s.name][0].key]
        for k, why in first["levels_refused"].items():
            ctx.say(f"{s.name}: zipping the first {k} group(s) is not supported and was left out: {why}")
        pick = [r for r in summary if r["setting"] == s.name and r["combine"] == o.combine]
        files[f"figure_{s.name}"] = str(
            plot_zipit(
                out / f"zipit_{s.name}.png",
                pick,
                tasks=o.tasks,
                n_test=first["n_test"],
                title=f"{s.label}: joint task, heads combined by {o.combine} ({s.pairs} pair{'s' * (s.pairs > 1)})",
            )
        )
        tables[s.name] = format_table(summary, s.name, o.combine)
        ctx.say(f"\n{s.label} — test accuracy (%) on {first['n_test']} examples, heads combined by {o.combine}:")
        ctx.say(tables[s.name])
        ctx.say(f"within-model pairs of the full zip (pair 0): {first['within_pairs']}\n")
    summary_out = ctx.summary(files, ran)
    return {**summary_out, "tables": tables}


EXPERIMENT = Experiment(
    "zipit", "Stoica et al., ZipIt! on disjoint tasks: merging models trained on different classes", ZipitOptions, run
)
