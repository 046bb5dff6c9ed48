"""Ito, Yamada, Kumagai (ICML 2025), "LMC between multiple models modulo permutation symmetries", in one command.

For each setting (model, dataset): train K_max members (member i with `SeedConfig.from_seed(i)`); for
each alignment method (naive, pairwise weight matching to model 0, MergeMany, STE-MM) and each
K = 2 … K_max, align the first K members into one frame (:func:`lmclab.align.align_population`;
permutations stored as files in the step's directory) and evaluate:

- the merged model θ̄ = (1/K) Σ_i π_i(θ_i) (BN models: statistics reset on training data): loss and
  accuracy on train and test, next to the members' own;
- barriers on all K(K−1)/2 permuted pairs and on each model's path to θ̄ (every definition of
  :mod:`lmclab.paths.barriers`, loss and error, train and test), with max / mean / SD over pairs;
- the Hessian trace at θ̄, plain tr ∇²L and scale-aware tr(D∇²L D), D = diag|θ̄|, with a confidence
  interval (Hutchinson), on a fixed subset of one split;
- cycle consistency (:mod:`lmclab.align.cycle`): for every triple of members, the fraction of units
  not mapped back by π_ij ∘ π_jk ∘ π_ki, per group and overall, for each method's pairwise maps
  π_i⁻¹ ∘ π_j (0 by construction: every method maps all members into one frame, a reference or
  C2M3's universe) and, beside them, for the direct pairwise maps (weight matching of each pair alone).

Figures per setting: merged loss/accuracy vs K, all-pairs barrier vs K, model→merged barrier vs K,
trace vs K (one line per method), and the K_max × K_max pair-barrier heat map per method. Tidy CSV
tables sit beside them. Every step is cached in the run store; a second run recomputes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

import lmclab.experiments.steps  # noqa: F401  (registers the train step)
from lmclab.align import POPULATION_METHODS, PopulationAlignment, align_population, get_population_method
from lmclab.align.cycle import CycleConsistency, alignment_cycle_consistency, cycle_consistency, direct_pairwise_maps
from lmclab.config import RunConfig, SeedConfig
from lmclab.curvature.trace import TraceEstimate, hessian_trace
from lmclab.data import DeviceDataset
from lmclab.experiments.context import Experiment, ExperimentContext
from lmclab.experiments.graph import Step, StepContext, step_kind
from lmclab.experiments.lmc import check_same_architecture, example_input
from lmclab.experiments.settings import ExperimentOptions, Setting, load_preset
from lmclab.experiments.steps import dataset_for, train_step
from lmclab.paths import default_bn_mode, default_lambdas
from lmclab.paths.population import all_pairs_barriers, merged_metrics, merged_point
from lmclab.permutation import Permutation, PermutationSpec, check_invariance, derive_spec
from lmclab.points import Point, distance, mean
from lmclab.report import write_csv
from lmclab.report.ito import plot_barriers_vs_k, plot_heatmaps, plot_merged_vs_k, plot_trace_vs_k
from lmclab.store import Run, check_same_data
from lmclab.training import load_run_model, resolve_device

#: The methods the paper compares, in the order they are drawn.
METHODS = ("naive", "pairwise", "merge_many", "ste_mm")
#: Metrics of the merged model and of the members, in table order.
MERGED_METRICS = ("loss", "accuracy", "error")


@dataclass(frozen=True, kw_only=True)
class MethodKeywords:
    """A method's keyword table in a preset (``pairwise = { seed = 0 }``): a key left out is the method's
    own default (and is not part of the alignment step's config)."""

    def keywords(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True, kw_only=True)
class PairwiseKeywords(MethodKeywords):
    """``pairwise``: weight matching of each member to member 0."""

    seed: int | None = None
    max_sweeps: int | None = None


@dataclass(frozen=True, kw_only=True)
class MergeManyKeywords(MethodKeywords):
    """``merge_many``: MergeMany rounds of weight matching to the mean of the others."""

    seed: int | None = None
    max_rounds: int | None = None
    max_sweeps: int | None = None


@dataclass(frozen=True, kw_only=True)
class SteMMKeywords(MethodKeywords):
    """``ste_mm``: STE-MM; `train_examples`: a stratified training subset (default: the members' split)."""

    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    mixing: str | None = None
    dirichlet_alpha: float | None = None
    seed: int | None = None
    train_examples: int | None = None


@dataclass(frozen=True, kw_only=True)
class C2M3Keywords(MethodKeywords):
    """``c2m3``: C2M3's Frank–Wolfe start (pairwise | identity), iterations, gap tolerance, seed."""

    init: str | None = None
    max_iter: int | None = None
    tol: float | None = None
    seed: int | None = None


@dataclass(frozen=True, kw_only=True)
class TraceOptions:
    """The Hessian trace at the merged model: on `examples` of `split`, `probes` probes of `method`
    (hutchinson | hutchpp), a `confidence` interval."""

    split: str = "train"
    examples: int = 1000
    probes: int = 100
    method: str = "hutchinson"
    batch_size: int = 100
    seed: int = 0
    confidence: float = 0.95


@dataclass(frozen=True, kw_only=True)
class HeatmapOptions:
    """Which pair matrix the heat map shows: `split`, `metric` (loss | error), barrier `definition`."""

    split: str = "test"
    metric: str = "loss"
    definition: str = "barrier"


#: Options of the trace step, with their defaults (a preset or a setting may override each).
TRACE_DEFAULTS: dict[str, Any] = dataclasses.asdict(TraceOptions())


@dataclass(frozen=True, kw_only=True)
class PopulationSetting(Setting):
    """A setting of a population experiment: `models` = K_max members."""

    models: int = 2

    def population_member(self, i: int) -> RunConfig:
        """Member i of the population: the setting's config with seeds `SeedConfig.from_seed(i)`."""
        return dataclasses.replace(self.base_config(), seeds=SeedConfig.from_seed(i))

    def check(self) -> None:
        super().check()
        if self.models < 2:
            raise ValueError(f"setting {self.name}: models (K_max) must be ≥ 2, got {self.models}")


@dataclass(frozen=True, kw_only=True)
class ItoOptions(ExperimentOptions):
    """A preset of presets/ito.toml (its header comment says what each option means). `k_values`: the K
    evaluated (none: 2 … models); `bn`: "reset" | "none" (none given: reset for BatchNorm models)."""

    methods: tuple[str, ...] = METHODS
    points: int = 25
    splits: tuple[str, ...] = ("train", "test")
    bn: str | None = None
    bn_examples: int | None = None
    k_values: tuple[int, ...] = ()
    pairwise: PairwiseKeywords = field(default_factory=PairwiseKeywords)
    merge_many: MergeManyKeywords = field(default_factory=MergeManyKeywords)
    ste_mm: SteMMKeywords = field(default_factory=SteMMKeywords)
    c2m3: C2M3Keywords = field(default_factory=C2M3Keywords)
    trace: TraceOptions = field(default_factory=TraceOptions)
    heatmap: HeatmapOptions = field(default_factory=HeatmapOptions)
    settings: tuple[PopulationSetting, ...] = ()

    def method_keywords(self, method: str) -> dict[str, Any]:
        """Keywords for `method` (its table; none for a method without one)."""
        tables: dict[str, MethodKeywords] = {
            "pairwise": self.pairwise,
            "merge_many": self.merge_many,
            "ste_mm": self.ste_mm,
            "c2m3": self.c2m3,
        }
        return tables[method].keywords() if method in tables else {}

    def check(self, setting: Setting) -> None:
        assert isinstance(setting, PopulationSetting)
        k_values(self, setting)


def load_ito_preset(name: str) -> ItoOptions:
    """The preset `name` of presets/ito.toml."""
    return load_preset("ito", name, ItoOptions)


def available_methods() -> list[str]:
    """The K-model alignment methods registered right now (:data:`lmclab.align.POPULATION_METHODS`)."""
    return sorted(POPULATION_METHODS)


def k_values(preset: ItoOptions, setting: PopulationSetting) -> list[int]:
    """The K evaluated for `setting` (`preset`: the options at that setting)."""
    ks = preset.k_values or list(range(2, setting.models + 1))
    bad = [k for k in ks if not 2 <= k <= setting.models]
    if bad:
        raise ValueError(f"setting {setting.name}: K values {bad} outside 2 … models = {setting.models}")
    return sorted(set(ks))


@dataclass(frozen=True, kw_only=True)
class MethodSteps:
    """One method on the first `k` members: the alignment, its evaluation, the merged model's trace."""

    method: str
    k: int
    align: Step
    evaluation: Step
    trace: Step | None = None


@dataclass(frozen=True)
class PopulationSteps:
    """One population's steps: the members' training, then each (method, K)'s :class:`MethodSteps`, and
    `cycle`: the direct pairwise maps of all members and their cycle errors (:func:`cycle_step`)."""

    members: tuple[Step, ...]
    methods: tuple[MethodSteps, ...]
    cycle: Step | None = None

    def steps(self) -> list[Step]:
        return [
            *self.members,
            *(s for m in self.methods for s in (m.align, m.evaluation, m.trace) if s is not None),
            *([self.cycle] if self.cycle is not None else []),
        ]


def cycle_step(members: Sequence[Step], seed: int = 0) -> Step:
    """Weight matching of every pair of `members` on its own (`seed`) and the cycle error of every triple."""
    return Step("pairwise_cycle", {"seed": seed}, member_inputs(members))


def member_inputs(members: Sequence[Step]) -> dict[str, Step]:
    """The members as step inputs m0, m1, … (these names are part of the steps' keys; :func:`member_runs`
    reads them back)."""
    return {f"m{i}": m for i, m in enumerate(members)}


def method_steps(
    method: str,
    members: Sequence[Step],
    keywords: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    trace: Mapping[str, Any] | None,
) -> MethodSteps:
    """Align `members` with `method` (`keywords`), evaluate (`evaluation`: the eval step's config) and,
    unless `trace` is None, the merged model's trace (the trace step's config)."""
    ins = member_inputs(members)
    identity = get_population_method(method).identity()  # with its revision: a revised method is recomputed
    align = Step("population_align", {**identity, "k": len(members), "options": dict(keywords)}, ins)
    return MethodSteps(
        method=method,
        k=len(members),
        align=align,
        evaluation=Step("population_eval", dict(evaluation), {"align": align, **ins}),
        trace=None if trace is None else Step("merged_trace", dict(trace), {"align": align, **ins}),
    )


def build_graph(preset: ItoOptions) -> dict[str, PopulationSteps]:
    """graph[setting] = its :class:`PopulationSteps` (methods in the preset's order, K ascending)."""
    graph: dict[str, PopulationSteps] = {}
    for s in preset.settings:
        o = preset.at(s)
        methods = list(o.methods)
        unknown = [m for m in methods if m not in available_methods()]
        if unknown:
            raise ValueError(
                f"preset ito/{preset.name} names alignment method(s) {unknown} that lmclab does not "
                f"provide (yet); available: {', '.join(available_methods())}"
            )
        members = [train_step(f"{s.name}/model{i}", s.population_member(i), s.preset) for i in range(s.models)]
        evaluation = {
            "splits": list(o.splits),
            "examples": s.eval_examples,
            "points": o.points,
            "bn": o.bn,
            "bn_examples": o.bn_examples,
        }
        trace = {**dataclasses.asdict(o.trace), "bn": o.bn, "bn_examples": o.bn_examples}
        graph[s.name] = PopulationSteps(
            tuple(members),
            tuple(
                method_steps(method, members[:k], o.method_keywords(method), evaluation, trace)
                for method in methods
                for k in k_values(o, s)
            ),
            cycle_step(members),
        )
    return graph


# ------------------------------------------------------------------------------------------------ steps


def member_runs(inputs: Mapping[str, Any]) -> list[Run]:
    """The runs of inputs m0, m1, … in member order."""
    names = sorted((n for n in inputs if n.startswith("m") and n[1:].isdigit()), key=lambda n: int(n[1:]))
    return [Run(Path(inputs[n]["run"])) for n in names]


def load_members(ctx: StepContext, inputs: Mapping[str, Any]) -> tuple[list[Run], torch.nn.Module, list[Point]]:
    """(runs, model of member 0, member states) on the step's device; same architecture checked."""
    device = resolve_device(ctx.options.get("device", "auto"))
    runs = member_runs(inputs)
    for run in runs[1:]:
        check_same_architecture(runs[0], run)
    model = load_run_model(runs[0], device=device)
    return runs, model, [run.load_state(device=device) for run in runs]


def load_aligned(ctx: StepContext, inputs: Mapping[str, Any]) -> tuple[list[Run], torch.nn.Module, list[Point]]:
    """(runs, model, [π_i(θ_i)]) with the permutations stored by the `align` input."""
    runs, model, points = load_members(ctx, inputs)
    perms, spec = PopulationAlignResult.from_json(inputs["align"]).load_perms()
    if len(perms) != len(points):
        raise ValueError(f"alignment holds {len(perms)} permutations for {len(points)} members")
    return runs, model, [p.apply(theta, spec) for p, theta in zip(perms, points)]


@dataclass(frozen=True)
class PopulationAlignResult:
    """What a ``population_align`` step stores (its JSON, key for key): the members' runs, their permutation
    files (perm_i), whether each is the identity, the invariance check max |f(π_i(θ_i)) − f(θ_i)|, each
    aligned member's distance to the merged model, and the method's `info` (JSON-safe)."""

    method: str
    k: int
    runs: Sequence[str]
    perms: Sequence[str]
    identity: Sequence[bool]
    invariance_max_abs_diff: Sequence[float | None]
    distance_to_merged: Sequence[float | None]
    info: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PopulationAlignResult:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})

    def load_perms(self) -> tuple[list[Permutation], PermutationSpec]:
        """The K permutations and their spec, from the stored files."""
        perms, spec = [], None
        for file in self.perms:
            perm, spec, _ = Permutation.load(file)
            perms.append(perm)
        if spec is None:
            raise ValueError(f"permutation files {self.perms} hold no spec")
        return perms, spec


@dataclass(frozen=True)
class TraceRecord:
    """One stored trace estimate with its confidence interval (None: not finite), without the samples."""

    estimate: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float
    probes: int
    method: str

    @classmethod
    def of(cls, est: TraceEstimate) -> TraceRecord:
        return cls(est.estimate, est.ci_low, est.ci_high, est.confidence, est.n_probes, est.method)


@dataclass(frozen=True)
class MergedTrace:
    """What a ``merged_trace`` step stores: tr ∇²L(θ̄) and the scale-aware tr(D ∇²L(θ̄) D) on `n_examples`
    examples of `split`."""

    split: str
    n_examples: int
    trace: TraceRecord
    scale_aware_trace: TraceRecord

    KINDS: ClassVar[tuple[str, str]] = ("trace", "scale_aware_trace")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MergedTrace:
        return cls(
            split=data["split"],
            n_examples=data["n_examples"],
            **{kind: TraceRecord(**data[kind]) for kind in cls.KINDS},
        )


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
    """The ``data`` of a method that needs it (STE-MM): the members' training split (with their subset and
    augmentation), or a stratified subset of `train_examples` of the full split."""
    d = run.config.data
    subset, per_class = (train_examples, None) if train_examples else (d.train_subset, d.train_per_class)
    return DeviceDataset.load(
        d.dataset,
        "train",
        data_dir=ctx.options.get("data_dir"),
        device=resolve_device(ctx.options.get("device", "auto")),
        subset=subset,
        per_class=per_class,
        augment=d.augment,
        progress=False,
    )


@step_kind("population_align")
def _population_align(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Align the K members with `method`; every π_i verified (f(π_i(θ_i)) == f(θ_i)) and saved as perm_i.

    The method gets its options, the settings it accepts (device, progress) and what it needs: the model,
    and `data` (:func:`ste_mm_data`, option ``train_examples``)."""
    entry = get_population_method(config["method"])
    runs, model, points = load_members(ctx, inputs)
    device = next(model.parameters()).device
    x = example_input(runs[0]).to(device)
    spec = derive_spec(model, x)
    kw = dict(config.get("options", {}))
    train_examples = kw.pop("train_examples", None) if "data" in entry.needs else None
    kw.update(entry.settings(device=device, progress=ctx.options.get("progress", True)))
    if "model" in entry.needs:
        kw["model"] = model
    if "data" in entry.needs:
        kw["data"] = ste_mm_data(ctx, runs[0], train_examples)
    alignment = align_population(points, spec, config["method"], **kw)
    if alignment.k != len(points):
        raise ValueError(f"{config['method']} returned {alignment.k} permutations for {len(points)} models")
    files, invariance = [], []
    for i, (perm, run, theta) in enumerate(zip(alignment.perms, runs, points)):
        member = copy.deepcopy(model)
        member.load_state_dict(theta)
        invariance.append(check_invariance(member, spec, perm, x).worst)
        files.append(
            str(
                perm.save(
                    ctx.directory / f"perm_{i}.safetensors",
                    spec,
                    method=config["method"],
                    k=len(points),
                    member=i,
                    run=run.path.name,
                )
            )
        )
    aligned = alignment.aligned(points)
    merged = mean(aligned)
    return PopulationAlignResult(
        method=config["method"],
        k=len(points),
        runs=[r.path.name for r in runs],
        perms=files,
        identity=[p.is_identity() for p in alignment.perms],
        invariance_max_abs_diff=invariance,
        distance_to_merged=[distance(a, merged) for a in aligned],
        info=json_safe(alignment.info),
    ).to_json()


@step_kind("pairwise_cycle")
def _pairwise_cycle(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """The direct pairwise maps (weight matching of each pair i < j alone, seed `seed`) and the cycle
    error of every triple (:meth:`CycleConsistency.to_json`)."""
    runs, model, points = load_members(ctx, inputs)
    spec = derive_spec(model, example_input(runs[0]).to(next(model.parameters()).device))
    maps = direct_pairwise_maps(points, spec, seed=config.get("seed", 0))
    return cycle_consistency(maps, len(points)).to_json()


def method_cycle(result: Mapping[str, Any]) -> CycleConsistency:
    """The cycle errors of a ``population_align`` result's pairwise maps π_i⁻¹ ∘ π_j (from its stored
    permutations; 0 by construction, computed)."""
    aligned = PopulationAlignResult.from_json(result)
    perms, spec = aligned.load_perms()
    return alignment_cycle_consistency(PopulationAlignment(perms, spec, aligned.method))


#: The `method` of the direct pairwise maps' rows in the cycle table.
DIRECT = "direct_pairwise"


def cycle_rows(base: Mapping[str, Any], maps: str, cc: CycleConsistency) -> list[dict[str, Any]]:
    """Tidy rows of one set of maps: group "all" (every unit) then each group; empty cells without triples."""
    groups = cc.per_group()
    return [
        {**base, "maps": maps, "group": g, "cycle_error": v, "triples": len(cc.triples)}
        for g, v in [("all", cc.overall), *((g, groups.get(g)) for g in cc.groups)]
    ]


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

    def metrics(points: Sequence[Point] | Point) -> dict[str, dict[str, float]]:
        return {split: m.to_json() for split, m in merged_metrics(model, points, datasets, **common).items()}

    merged, members = metrics(aligned), [metrics(theta) for theta in aligned]
    barriers = all_pairs_barriers(
        model,
        aligned,
        datasets,
        lambdas=default_lambdas(config["points"]),
        progress=ctx.options.get("progress", True),
        **common,
    )
    return {
        "merged": merged,
        "members": members,
        "bn": bn,
        "n_examples": {split: len(d) for split, d in datasets.items()},
        **barriers.to_json(),
    }


@step_kind("merged_trace")
def _merged_trace(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """tr ∇²L(θ̄) and tr(D ∇²L(θ̄) D), D = diag|θ̄|, with `confidence` intervals, on a fixed subset."""
    runs, model, aligned = load_aligned(ctx, inputs)
    bn, bn_data = _bn_setup(ctx, config, model, runs[0])
    theta = merged_point(model, aligned, bn=bn, bn_data=bn_data, bn_examples=config.get("bn_examples"))
    data = dataset_for(ctx, runs[0], config["split"], config.get("examples"))
    estimates = {}
    for key, scaled in zip(MergedTrace.KINDS, (False, True)):
        est = hessian_trace(
            model,
            theta,
            data,
            method=config["method"],
            scale_aware=scaled,
            probes=config["probes"],
            confidence=config["confidence"],
            batch_size=config["batch_size"],
            seed=config["seed"],
        )
        estimates[key] = TraceRecord.of(est)
    return MergedTrace(split=config["split"], n_examples=len(data), **estimates).to_json()


# ------------------------------------------------------------------------------------------------ tables


def tidy_tables(
    graph: Mapping[str, PopulationSteps], results: dict[str, dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """Tidy rows of every setting's steps: merged (merged model and members), barrier_summary,
    pair_barriers, merged_barriers, trace, alignment, cycle (cycle errors: each method's maps, and the
    direct pairwise maps among the first K members as method "direct_pairwise", maps "direct")."""
    tables: dict[str, list[dict[str, Any]]] = {
        n: [] for n in ("merged", "barrier_summary", "pair_barriers", "merged_barriers", "trace", "alignment", "cycle")
    }
    for setting, population in graph.items():
        if population.cycle is not None:
            direct = CycleConsistency.from_json(results[population.cycle.key])
            for k in sorted({ms.k for ms in population.methods}):
                tables["cycle"] += cycle_rows({"setting": setting, "method": DIRECT, "k": k}, "direct", direct.first(k))
        for ms in population.methods:
            base = {"setting": setting, "method": ms.method, "k": ms.k}
            tables["cycle"] += cycle_rows(base, "joint", method_cycle(results[ms.align.key]))
            aligned = PopulationAlignResult.from_json(results[ms.align.key])
            for i, (d, inv) in enumerate(zip(aligned.distance_to_merged, aligned.invariance_max_abs_diff)):
                tables["alignment"].append(
                    {
                        **base,
                        "member": i,
                        "run": aligned.runs[i],
                        "identity": aligned.identity[i],
                        "distance_to_merged": d,
                        "invariance_max_abs_diff": inv,
                    }
                )
            res = results[ms.evaluation.key]
            n_examples = res.get("n_examples", {})  # evaluated examples per split (written in tables, titles)
            by_model: list[tuple[str, list[tuple[str | int, Any]]]] = [
                ("merged", [("", res["merged"])]),
                ("member", list(enumerate(res["members"]))),
            ]
            for which, per_member in by_model:
                for member, metrics in per_member:  # the preset's split order (stored JSON sorts keys)
                    tables["merged"] += [
                        {
                            **base,
                            "model": which,
                            "member": member,
                            "split": split,
                            "metric": metric,
                            "value": metrics[split][metric],
                            "examples": n_examples.get(split),
                        }
                        for split in ms.evaluation.config["splits"]
                        for metric in MERGED_METRICS
                    ]
            tables["barrier_summary"] += [{**base, **r, "examples": n_examples.get(r["split"])} for r in res["summary"]]
            tables["pair_barriers"] += [{**base, **r, "examples": n_examples.get(r["split"])} for r in res["pairs"]]
            tables["merged_barriers"] += [
                {**base, **r, "examples": n_examples.get(r["split"])} for r in res["to_merged"]
            ]
            if ms.trace is not None:
                trace = MergedTrace.from_json(results[ms.trace.key])
                for kind in MergedTrace.KINDS:
                    t: TraceRecord = getattr(trace, kind)
                    tables["trace"].append(
                        {
                            **base,
                            "kind": kind,
                            "split": trace.split,
                            "examples": trace.n_examples,
                            "estimate": t.estimate,
                            "ci_low": t.ci_low,
                            "ci_high": t.ci_high,
                            "confidence": t.confidence,
                            "probes": t.probes,
                            "estimator": t.method,
                        }
                    )
    return tables


def run(preset: ItoOptions, ctx: ExperimentContext) -> dict[str, Any]:
    """Train (or reuse) every member, align, merge and measure; figures and tables to `ctx.out`."""
    graph = build_graph(preset)
    ctx.announce(preset.description)
    results, ran = ctx.run_steps(step for population in graph.values() for step in population.steps())
    out = ctx.out
    tables = tidy_tables(graph, results)
    files: dict[str, str] = {
        f"{name}_table": str(write_csv(out / f"{name}.csv", rows)) for name, rows in tables.items()
    }
    for s in preset.settings:
        o = preset.at(s)
        pick = {name: [r for r in rows if r["setting"] == s.name] for name, rows in tables.items()}
        files[f"merged_{s.name}"] = str(plot_merged_vs_k(out / f"merged_{s.name}.png", pick["merged"], title=s.label))
        for kind, label in (("pairs", "all pairs"), ("to_merged", "model → merged")):
            files[f"barriers_{kind}_{s.name}"] = str(
                plot_barriers_vs_k(
                    out / f"barriers_{kind}_{s.name}.png",
                    [r for r in pick["barrier_summary"] if r["kind"] == kind],
                    title=f"{s.label}: barriers, {label}",
                )
            )
        files[f"trace_{s.name}"] = str(
            plot_trace_vs_k(
                out / f"trace_{s.name}.png", pick["trace"], title=f"{s.label}: Hessian trace at the merged model"
            )
        )
        k_max = max(k_values(o, s))
        files[f"heatmap_{s.name}"] = str(
            plot_heatmaps(
                out / f"heatmap_{s.name}.png",
                [r for r in pick["pair_barriers"] if r["k"] == k_max],
                k_max,
                **dataclasses.asdict(o.heatmap),
                title=f"{s.label}: pair barriers, K = {k_max}",
            )
        )
    return ctx.summary(files, ran)


EXPERIMENT = Experiment("ito", "Ito et al., analysis of LMC among many models (STE-MM)", ItoOptions, run)
#: ``run_ito("smoke", out=…, runs_dir=…, data_dir=…, device=…, progress=…, say=…)``: a preset by name.
run_ito = EXPERIMENT


def merge_runs(
    runs: Sequence[Run],
    methods: Sequence[str] = ("merge_many",),
    *,
    out: str | Path,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    points: int = 25,
    examples: int | None = None,
    splits: Sequence[str] = ("train", "test"),
    bn: str | None = None,
    trace: Mapping[str, Any] | None = None,
    runs_dir: str | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    progress: bool = True,
    say: Callable[[str], None] = print,
    allow_different_data: bool = False,
) -> dict[str, Any]:
    """Align K stored runs (run 0 is the reference) with each method, merge, and measure: the same cached
    steps as :func:`run_ito` for one K (merged metrics, all-pairs and model → merged barriers, and with
    `trace` (keywords of the trace step, {} for the defaults) the merged model's Hessian trace). Tables
    and one K × K heat map per split go to `out`. `options[method]`: keywords of that method.
    ``cycle_error[method]``: the cycle error of the method's pairwise maps (:meth:`CycleConsistency.summary`;
    0: the methods are consistent through their reference or universe); ``direct_pairwise_cycle_error``:
    that of weight matching every pair alone.

    Runs trained on different data raise `DataMismatch` unless `allow_different_data`; then all is
    evaluated on run 0's data, and the tables (an `evaluated_on` column), the heat maps' titles and
    the summary's `data` say so."""
    if len(runs) < 2:
        raise ValueError(f"merging needs at least 2 runs, got {len(runs)}")
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(available_methods())}")
    for run in runs[1:]:
        check_same_architecture(runs[0], run)
    data_check = check_same_data(runs, allow=allow_different_data)
    data_note = data_check.note()
    if data_note is not None:
        say(f"note: {data_note}")
    ctx = ExperimentContext(
        out=Path(out), runs_dir=runs_dir, data_dir=data_dir, device=device, progress=progress, say=say
    )
    members = [train_step(f"member{i}", run.config) for i, run in enumerate(runs)]
    k = len(runs)
    evaluation = {"splits": list(splits), "examples": examples, "points": points, "bn": bn, "bn_examples": None}
    trace_config = None if trace is None else {**TRACE_DEFAULTS, **trace, "bn": bn, "bn_examples": None}
    population = PopulationSteps(
        tuple(members),
        tuple(
            method_steps(method, members, (options or {}).get(method, {}), evaluation, trace_config)
            for method in methods
        ),
        cycle_step(members),
    )
    results, ran = ctx.run_steps(population.steps())
    out = ctx.out
    tables = tidy_tables({"runs": population}, results)
    column = data_check.column()  # {} unless the runs' data differ
    files = {
        f"{name}_table": str(write_csv(out / f"{name}.csv", [{**r, **column} for r in rows]))
        for name, rows in tables.items()
        if rows
    }
    for split in splits:
        files[f"heatmap_{split}"] = str(
            plot_heatmaps(
                out / f"heatmap_{split}.png",
                tables["pair_barriers"],
                k,
                split=split,
                title=f"{k} runs: pair barriers ({split})" + (f"\n{data_note}" if data_note else ""),
            )
        )
    merged: dict[str, dict[str, dict[str, Any]]] = {m: {r["split"]: {} for r in tables["merged"]} for m in methods}
    for r in tables["merged"]:
        if r["model"] == "merged":
            merged[r["method"]][r["split"]][r["metric"]] = r["value"]
    summary = {
        (r["method"], r["kind"], r["split"], r["metric"]): r
        for r in tables["barrier_summary"]
        if r["definition"] == "barrier"
    }
    cycles = {ms.method: method_cycle(results[ms.align.key]).summary() for ms in population.methods}
    assert population.cycle is not None
    direct = CycleConsistency.from_json(results[population.cycle.key]).summary()
    for m in methods:
        say(
            f"{m}: merged "
            + "  ".join(
                f"{split} loss {merged[m][split].get('loss', float('nan')):.4f} "
                f"acc {merged[m][split].get('accuracy', float('nan')):.4f}"
                for split in splits
            )
        )
        for split in splits:
            row = summary.get((m, "pairs", split, "loss"))
            if row:
                say(
                    f"  {split} loss barrier over {row['n']} pairs: mean {_fmt(row['mean'])} ± {_fmt(row['std'])}, "
                    f"max {_fmt(row['max'])}"
                )
        say(f"  cycle error of its pairwise maps: {_cycle(cycles[m])}")
    say(f"direct pairwise weight matching (each pair alone): cycle error {_cycle(direct)}")
    say(f"tables and figures in {out}")
    return {
        "out": str(out),
        "files": files,
        "merged": merged,
        "steps_run": ran,
        "barrier_summary": [r for r in tables["barrier_summary"] if r["definition"] == "barrier"],
        "cycle_error": cycles,
        "direct_pairwise_cycle_error": direct,
        "data": data_check.to_json(),
    }


def _cycle(summary: Mapping[str, Any]) -> str:
    if summary["overall"] is None:
        return f"n/a (K = {summary['k']} < 3: no triples)"
    return f"{summary['overall']:.4f} over {summary['triples']} triples (fraction of units not mapped back)"


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4f}"
