"""Ito, Yamada, Kumagai (ICML 2025), "LMC between multiple models modulo permutation symmetries", in one command.

For each setting (model, dataset): train K_max members (member i with `SeedConfig.from_seed(i)`); for
each alignment method (naive, pairwise weight matching to model 0, MergeMany, STE-MM) and each
K = 2 … K_max, align the first K members into one frame (:func:`lmclab.align.population.align_population`;
permutations stored as files in the step's directory) and evaluate:

- the merged model θ̄ = (1/K) Σ_i π_i(θ_i) (BN models: statistics reset on training data): loss and
  accuracy on train and test, next to the members' own;
- barriers on all K(K−1)/2 permuted pairs and on each model's path to θ̄ (every definition of
  :mod:`lmclab.paths.barriers`, loss and error, train and test), with max / mean / SD over pairs;
- the Hessian trace at θ̄, plain tr ∇²L and scale-aware tr(D∇²L D), D = diag|θ̄|, with a confidence
  interval (Hutchinson), on a fixed subset of one split.

Figures per setting: merged loss/accuracy vs K, all-pairs barrier vs K, model→merged barrier vs K,
trace vs K (one line per method), and the K_max × K_max pair-barrier heat map per method. Tidy CSV
tables sit beside them. Every step is cached in the run store; a second run recomputes nothing.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lmclab.experiments.steps  # noqa: F401  (registers the train step)
from lmclab.config import RunConfig, SeedConfig
from lmclab.experiments.graph import LocalExecutor, Step, StepContext, step_kind
from lmclab.experiments.lmc import check_same_architecture, example_input
from lmclab.experiments.settings import ExperimentPreset, Setting, load_preset
from lmclab.experiments.steps import dataset_for, train_step
from lmclab.paths import default_bn_mode, default_lambdas
from lmclab.paths.population import all_pairs_barriers, merged_metrics, merged_point
from lmclab.permutation import Params, Permutation, PermutationSpec, check_invariance, derive_spec, parameter_distance
from lmclab.report import write_csv
from lmclab.store import Run
from lmclab.training import load_run_model, resolve_device

#: The methods the paper compares, in the order they are drawn.
METHODS = ("naive", "pairwise", "merge_many", "ste_mm")
#: Metrics of the merged model and of the members, in table order.
MERGED_METRICS = ("loss", "accuracy", "error")
#: Options of the evaluation steps, with their defaults (a preset or a setting may override each).
TRACE_DEFAULTS: dict[str, Any] = {"split": "train", "examples": 1000, "probes": 100, "method": "hutchinson",
                                  "batch_size": 100, "seed": 0, "confidence": 0.95}


@dataclass(frozen=True)
class PopulationSetting(Setting):
    """A setting of a population experiment: `models` = K_max members (``pairs`` is not used)."""

    pairs: int = 0
    models: int = 2

    def population_member(self, i: int) -> RunConfig:
        """Member i of the population: the setting's config with seeds `SeedConfig.from_seed(i)`."""
        return dataclasses.replace(self.base_config(), seeds=SeedConfig.from_seed(i))

    def check(self) -> None:
        super().check()
        if self.models < 2:
            raise ValueError(f"setting {self.name}: models (K_max) must be ≥ 2, got {self.models}")


def load_ito_preset(name: str) -> ExperimentPreset:
    """The preset `name` of presets/ito.toml, settings as :class:`PopulationSetting`."""
    return load_preset("ito", name, PopulationSetting)


def available_methods() -> list[str]:
    """The K-model alignment methods registered with :mod:`lmclab.align.population` right now."""
    import lmclab.align.population_methods  # noqa: F401  (registers them)
    from lmclab.align.population import POPULATION_METHODS

    return sorted(POPULATION_METHODS)


def method_options(preset: ExperimentPreset, setting: Setting, method: str) -> dict[str, Any]:
    """Keywords for `method`: the preset's table ``[<preset>.<method>]`` updated by the setting's."""
    return {**preset.options.get(method, {}), **setting.options.get(method, {})}


def k_values(preset: ExperimentPreset, setting: PopulationSetting) -> list[int]:
    ks = setting.option(preset, "k_values") or list(range(2, setting.models + 1))
    bad = [k for k in ks if not 2 <= k <= setting.models]
    if bad:
        raise ValueError(f"setting {setting.name}: K values {bad} outside 2 … models = {setting.models}")
    return sorted(set(ks))


def build_graph(preset: ExperimentPreset) -> dict[str, dict[Any, Step]]:
    """graph[setting] = {("member", i): train, ("align"|"eval"|"trace", method, K): step}."""
    methods = list(preset.options.get("methods", METHODS))
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise ValueError(f"preset ito/{preset.name} names alignment method(s) {unknown} that lmclab does not "
                         f"provide (yet); available: {', '.join(available_methods())}")
    graph: dict[str, dict[Any, Step]] = {}
    for s in preset.settings:
        assert isinstance(s, PopulationSetting)
        members = [train_step(f"{s.name}/model{i}", s.population_member(i), s.preset) for i in range(s.models)]
        steps: dict[Any, Step] = {("member", i): m for i, m in enumerate(members)}
        evaluation = {"splits": list(s.option(preset, "splits", ["train", "test"])), "examples": s.eval_examples,
                      "points": s.option(preset, "points", 25), "bn": s.option(preset, "bn"),
                      "bn_examples": s.option(preset, "bn_examples")}
        trace = {**TRACE_DEFAULTS, **preset.options.get("trace", {}), **s.options.get("trace", {}),
                 "bn": evaluation["bn"], "bn_examples": evaluation["bn_examples"]}
        for method in methods:
            for k in k_values(preset, s):
                ins = {f"m{i}": members[i] for i in range(k)}
                align = Step("population_align", {"method": method, "k": k, "options": method_options(preset, s, method)},
                             ins)
                steps[("align", method, k)] = align
                steps[("eval", method, k)] = Step("population_eval", evaluation, {"align": align, **ins})
                steps[("trace", method, k)] = Step("merged_trace", trace, {"align": align, **ins})
        graph[s.name] = steps
    return graph


# ------------------------------------------------------------------------------------------------ steps


def member_runs(inputs: Mapping[str, Any]) -> list[Run]:
    """The runs of inputs m0, m1, … in member order."""
    names = sorted((n for n in inputs if n.startswith("m") and n[1:].isdigit()), key=lambda n: int(n[1:]))
    return [Run(Path(inputs[n]["run"])) for n in names]


def load_members(ctx: StepContext, inputs: Mapping[str, Any]) -> tuple[list[Run], torch.nn.Module, list[Params]]:
    """(runs, model of member 0, member states) on the step's device; same architecture checked."""
    device = resolve_device(ctx.options.get("device", "auto"))
    runs = member_runs(inputs)
    for run in runs[1:]:
        check_same_architecture(runs[0], run)
    model = load_run_model(runs[0], device=device)
    return runs, model, [run.load_state(device=device) for run in runs]


def load_aligned(ctx: StepContext, inputs: Mapping[str, Any]) -> tuple[list[Run], torch.nn.Module, list[Params]]:
    """(runs, model, [π_i(θ_i)]) with the permutations stored by the `align` input."""
    runs, model, points = load_members(ctx, inputs)
    perms, spec = load_population_perms(inputs["align"])
    if len(perms) != len(points):
        raise ValueError(f"alignment holds {len(perms)} permutations for {len(points)} members")
    return runs, model, [p.apply(theta, spec) for p, theta in zip(perms, points)]


def load_population_perms(result: Mapping[str, Any]) -> tuple[list[Permutation], PermutationSpec]:
    perms, spec = [], None
    for file in result["perms"]:
        perm, spec, _ = Permutation.load(file)
        perms.append(perm)
    if spec is None:
        raise ValueError(f"permutation files {result['perms']} hold no spec")
    return perms, spec


def json_safe(value: Any) -> Any:
    """A JSON-able copy of an alignment's `info`: tensors and arrays as lists (scalars as numbers)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def ste_mm_data(ctx: StepContext, run: Run, train_examples: int | None) -> Any:
    """STE-MM's training data: the members' training split (with their subset and augmentation), or a
    stratified subset of `train_examples` of the full split."""
    from lmclab.data import DeviceDataset

    d = run.config.data
    subset, per_class = (train_examples, None) if train_examples else (d.train_subset, d.train_per_class)
    return DeviceDataset.load(d.dataset, "train", data_dir=ctx.options.get("data_dir"),
                              device=resolve_device(ctx.options.get("device", "auto")), subset=subset,
                              per_class=per_class, augment=d.augment, progress=False)


@step_kind("population_align")
def _population_align(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Align the K members with `method`; every π_i verified (f(π_i(θ_i)) == f(θ_i)) and saved as perm_i."""
    from lmclab.align.population import align_population, mean_point

    runs, model, points = load_members(ctx, inputs)
    device = next(model.parameters()).device
    x = example_input(runs[0]).to(device)
    spec = derive_spec(model, x)
    kw = dict(config.get("options", {}))
    progress = ctx.options.get("progress", True)
    if config["method"] == "ste_mm":
        kw.update(model=model, data=ste_mm_data(ctx, runs[0], kw.pop("train_examples", None)), device=device,
                  progress=progress)
    elif config["method"] == "merge_many":
        kw.update(progress=progress)
    alignment = align_population(points, spec, config["method"], **kw)
    if alignment.k != len(points):
        raise ValueError(f"{config['method']} returned {alignment.k} permutations for {len(points)} models")
    files, invariance = [], []
    for i, (perm, run, theta) in enumerate(zip(alignment.perms, runs, points)):
        member = copy.deepcopy(model)
        member.load_state_dict(theta)
        invariance.append(max(check_invariance(member, spec, perm, x).values()))
        files.append(str(perm.save(ctx.directory / f"perm_{i}.safetensors", spec, method=config["method"],
                                   k=len(points), member=i, run=run.path.name)))
    aligned = alignment.aligned(points)
    merged = mean_point(aligned)
    return {"method": config["method"], "k": len(points), "runs": [r.path.name for r in runs], "perms": files,
            "identity": [p.is_identity() for p in alignment.perms],
            "invariance_max_abs_diff": invariance,
            "distance_to_merged": [parameter_distance(a, merged) for a in aligned],
            "info": json_safe(alignment.info)}


def _bn_setup(ctx: StepContext, config: Mapping[str, Any], model: torch.nn.Module, run: Run) -> tuple[str, Any]:
    bn = config.get("bn") or default_bn_mode(model)
    bn_data = dataset_for(ctx, run, "train", config.get("bn_examples")) if bn == "reset" else None
    return bn, bn_data


@step_kind("population_eval")
def _population_eval(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Merged and member metrics, all-pairs and model → merged barriers on `splits`."""
    runs, model, aligned = load_aligned(ctx, inputs)
    datasets = {split: dataset_for(ctx, runs[0], split, config.get("examples")) for split in config["splits"]}
    bn, bn_data = _bn_setup(ctx, config, model, runs[0])
    common = {"bn": bn, "bn_data": bn_data, "bn_examples": config.get("bn_examples")}
    merged = merged_metrics(model, aligned, datasets, **common)
    members = [merged_metrics(model, theta, datasets, **common) for theta in aligned]
    barriers = all_pairs_barriers(model, aligned, datasets, lambdas=default_lambdas(config["points"]),
                                  progress=ctx.options.get("progress", True), **common)
    return {"merged": merged, "members": members, "bn": bn,
            "n_examples": {split: len(d) for split, d in datasets.items()}, **barriers.to_json()}


@step_kind("merged_trace")
def _merged_trace(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """tr ∇²L(θ̄) and tr(D ∇²L(θ̄) D), D = diag|θ̄|, with `confidence` intervals, on a fixed subset."""
    from lmclab.curvature.trace import hessian_trace

    runs, model, aligned = load_aligned(ctx, inputs)
    bn, bn_data = _bn_setup(ctx, config, model, runs[0])
    theta = merged_point(model, aligned, bn=bn, bn_data=bn_data, bn_examples=config.get("bn_examples"))
    data = dataset_for(ctx, runs[0], config["split"], config.get("examples"))
    out: dict[str, Any] = {"split": config["split"], "n_examples": len(data)}
    for key, scaled in (("trace", False), ("scale_aware_trace", True)):
        est = hessian_trace(model, theta, data, method=config["method"], scale_aware=scaled, probes=config["probes"],
                            confidence=config["confidence"], batch_size=config["batch_size"], seed=config["seed"])
        out[key] = {"estimate": est.estimate, "ci_low": est.ci_low, "ci_high": est.ci_high,
                    "confidence": est.confidence, "probes": est.n_probes, "method": est.method}
    return out


# ------------------------------------------------------------------------------------------------ tables


def tidy_tables(graph: dict[str, dict[Any, Step]], results: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Tidy rows of every setting's steps: merged (merged model and members), barrier_summary,
    pair_barriers, merged_barriers, trace, alignment."""
    tables: dict[str, list[dict[str, Any]]] = {n: [] for n in ("merged", "barrier_summary", "pair_barriers",
                                                                "merged_barriers", "trace", "alignment")}
    for setting, steps in graph.items():
        for key, step in steps.items():
            if key[0] == "member":
                continue
            _, method, k = key
            res, base = results[step.key], {"setting": setting, "method": method, "k": k}
            if key[0] == "align":
                for i, (d, inv) in enumerate(zip(res["distance_to_merged"], res["invariance_max_abs_diff"])):
                    tables["alignment"].append({**base, "member": i, "run": res["runs"][i],
                                                "identity": res["identity"][i], "distance_to_merged": d,
                                                "invariance_max_abs_diff": inv})
            elif key[0] == "eval":
                for which, per_member in [("merged", [("", res["merged"])]),
                                          ("member", list(enumerate(res["members"])))]:
                    for member, metrics in per_member:  # the preset's split order (stored JSON sorts keys)
                        tables["merged"] += [{**base, "model": which, "member": member, "split": split,
                                              "metric": metric, "value": metrics[split][metric]}
                                             for split in step.config["splits"] for metric in MERGED_METRICS]
                tables["barrier_summary"] += [{**base, **r} for r in res["summary"]]
                tables["pair_barriers"] += [{**base, **r} for r in res["pairs"]]
                tables["merged_barriers"] += [{**base, **r} for r in res["to_merged"]]
            elif key[0] == "trace":
                for kind in ("trace", "scale_aware_trace"):
                    t = res[kind]
                    tables["trace"].append({**base, "kind": kind, "split": res["split"], "examples": res["n_examples"],
                                            **{f: t[f] for f in ("estimate", "ci_low", "ci_high", "confidence",
                                                                 "probes")}, "estimator": t["method"]})
    return tables


def run_ito(preset_name: str = "smoke", *, out: str | Path = "out/ito", runs_dir: str | None = None,
            data_dir: str | None = None, device: str = "auto", progress: bool = True,
            say: Callable[[str], None] = print) -> dict[str, Any]:
    from lmclab.report.ito import plot_barriers_vs_k, plot_heatmaps, plot_merged_vs_k, plot_trace_vs_k

    preset = load_ito_preset(preset_name)
    graph = build_graph(preset)
    executor = LocalExecutor(runs_dir, {"runs_dir": runs_dir, "data_dir": data_dir, "device": device,
                                        "progress": progress}, progress=progress, say=say)
    say(f"ito --preset {preset_name}: {preset.description}")
    results = executor.run([step for steps in graph.values() for step in steps.values()])
    out = Path(out)
    tables = tidy_tables(graph, results)
    files: dict[str, str] = {f"{name}_table": str(write_csv(out / f"{name}.csv", rows)) for name, rows in tables.items()}
    heat = {"split": "test", "metric": "loss", "definition": "barrier", **preset.options.get("heatmap", {})}
    for s in preset.settings:
        assert isinstance(s, PopulationSetting)
        pick = {name: [r for r in rows if r["setting"] == s.name] for name, rows in tables.items()}
        files[f"merged_{s.name}"] = str(plot_merged_vs_k(out / f"merged_{s.name}.png", pick["merged"], title=s.label))
        for kind, label in (("pairs", "all pairs"), ("to_merged", "model → merged")):
            files[f"barriers_{kind}_{s.name}"] = str(plot_barriers_vs_k(
                out / f"barriers_{kind}_{s.name}.png", [r for r in pick["barrier_summary"] if r["kind"] == kind],
                title=f"{s.label}: barriers, {label}"))
        files[f"trace_{s.name}"] = str(plot_trace_vs_k(out / f"trace_{s.name}.png", pick["trace"],
                                                       title=f"{s.label}: Hessian trace at the merged model"))
        k_max = max(k_values(preset, s))
        files[f"heatmap_{s.name}"] = str(plot_heatmaps(
            out / f"heatmap_{s.name}.png", [r for r in pick["pair_barriers"] if r["k"] == k_max], k_max, **heat,
            title=f"{s.label}: pair barriers, K = {k_max}"))
    say(f"ran {len(executor.ran)} step(s), reused the rest; figures and tables in {out}")
    for name, path in files.items():
        say(f"  {name}: {path}")
    return {"out": str(out), "files": files, "steps_run": executor.ran}



def merge_runs(runs: Sequence[Run], methods: Sequence[str] = ("merge_many",), *, out: str | Path,
               options: Mapping[str, Mapping[str, Any]] | None = None, points: int = 25,
               examples: int | None = None, splits: Sequence[str] = ("train", "test"), bn: str | None = None,
               trace: Mapping[str, Any] | None = None, runs_dir: str | None = None, data_dir: str | None = None,
               device: str = "auto", progress: bool = True, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Align K stored runs (run 0 is the reference) with each method, merge, and measure: the same cached
    steps as :func:`run_ito` for one K (merged metrics, all-pairs and model → merged barriers, and with
    `trace` (keywords of the trace step, {} for the defaults) the merged model's Hessian trace). Tables
    and one K × K heat map per split go to `out`. `options[method]`: keywords of that method."""
    from lmclab.report.ito import plot_heatmaps

    if len(runs) < 2:
        raise ValueError(f"merging needs at least 2 runs, got {len(runs)}")
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(available_methods())}")
    for run in runs[1:]:
        check_same_architecture(runs[0], run)
    members = [train_step(f"member{i}", run.config) for i, run in enumerate(runs)]
    ins = {f"m{i}": m for i, m in enumerate(members)}
    k = len(runs)
    evaluation = {"splits": list(splits), "examples": examples, "points": points, "bn": bn, "bn_examples": None}
    steps: dict[Any, Step] = {("member", i): m for i, m in enumerate(members)}
    for method in methods:
        align = Step("population_align", {"method": method, "k": k, "options": dict((options or {}).get(method, {}))},
                     ins)
        steps[("align", method, k)] = align
        steps[("eval", method, k)] = Step("population_eval", evaluation, {"align": align, **ins})
        if trace is not None:
            steps[("trace", method, k)] = Step("merged_trace", {**TRACE_DEFAULTS, **trace, "bn": bn,
                                                                "bn_examples": None}, {"align": align, **ins})
    executor = LocalExecutor(runs_dir, {"runs_dir": runs_dir, "data_dir": data_dir, "device": device,
                                        "progress": progress}, progress=progress, say=say)
    results = executor.run(list(steps.values()))
    out = Path(out)
    tables = tidy_tables({"runs": steps}, results)
    files = {f"{name}_table": str(write_csv(out / f"{name}.csv", rows)) for name, rows in tables.items() if rows}
    for split in splits:
        files[f"heatmap_{split}"] = str(plot_heatmaps(out / f"heatmap_{split}.png", tables["pair_barriers"], k,
                                                      split=split, title=f"{k} runs: pair barriers ({split})"))
    merged = {m: {r["split"]: {} for r in tables["merged"]} for m in methods}
    for r in tables["merged"]:
        if r["model"] == "merged":
            merged[r["method"]][r["split"]][r["metric"]] = r["value"]
    summary = {(r["method"], r["kind"], r["split"], r["metric"]): r for r in tables["barrier_summary"]
               if r["definition"] == "barrier"}
    for m in methods:
        say(f"{m}: merged " + "  ".join(f"{split} loss {merged[m][split].get('loss', float('nan')):.4f} "
                                        f"acc {merged[m][split].get('accuracy', float('nan')):.4f}" for split in splits))
        for split in splits:
            r = summary.get((m, "pairs", split, "loss"))
            if r:
                say(f"  {split} loss barrier over {r['n']} pairs: mean {_fmt(r['mean'])} ± {_fmt(r['std'])}, "
                    f"max {_fmt(r['max'])}")
    say(f"tables and figures in {out}")
    return {"out": str(out), "files": files, "merged": merged, "steps_run": executor.ran,
            "barrier_summary": [r for r in tables["barrier_summary"] if r["definition"] == "barrier"]}


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4f}"
