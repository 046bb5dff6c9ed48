"""The width ablation of Git Re-Basin (Ainsworth et al. 2023, Fig. 4) and REPAIR (Jordan et al. 2022):
barrier against width, per alignment method and normalisation correction.

For each setting (a training preset: ResNet-20 with LayerNorm, with BatchNorm, or an MLP) and each width
multiplier w of `widths`, `pairs` independently seeded pairs are trained at width w (pair i: seeds 2i and
2i + 1 at every width). Each pair's straight path θ_A → θ_B (method "naive") and θ_A → π(θ_B) for each
alignment method (`weight`, `activation`, any registered pair method) is evaluated at `points` evenly
spaced λ on every split of `splits`, once per correction of `corrections`:

- ``none``: the interpolated weights and (BN) statistics as they are;
- ``reset``: BatchNorm statistics recomputed at every λ (BN reset; only for models with BatchNorm: a model
  without BatchNorm is refused, since the reset would silently change nothing);
- ``repair``: REPAIR (`lmclab.paths.normalization.repair`): every affine norm layer's output (BN or LN;
  for a model without norm layers, every biased hidden Linear/Conv output) is rescaled per channel to the
  interpolation of the endpoints' statistics.

BN reset and REPAIR estimate their statistics on `correction_examples` training images (default: the
setting's `eval_examples`). The barrier of a curve is max_λ [L(θ_λ) − ((1−λ)L(θ_A) + λL(θ_B))]
(:func:`lmclab.paths.barriers`), for loss and error. Tables (tidy CSV): ``width_barriers.csv`` (width, norm,
pair, method, correction, split, metric, barrier, …), ``width_summary.csv`` (mean ± SD over pairs) and
``width_curves.csv`` (every evaluated λ); one figure per setting, barrier against width (log2 axis).
Every step (training, alignment, path) is cached in the run store; a rerun reuses all of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lmclab.experiments.steps  # noqa: F401  (registers the train and align step kinds)
from lmclab.align import PAIR_METHODS
from lmclab.config import RunConfig
from lmclab.experiments.context import Experiment, ExperimentContext
from lmclab.experiments.graph import Step, StepContext, step_kind
from lmclab.experiments.settings import ExperimentOptions, PairSetting, Setting
from lmclab.experiments.steps import align_step, dataset_for, endpoints, train_step
from lmclab.paths import BN_MODES, barriers, default_lambdas, evaluate_path, path_values, spread
from lmclab.report import write_csv
from lmclab.report.width import plot_barrier_vs_width

NAIVE = "naive"
SPLITS = ("train", "test")
METRICS = ("loss", "error")
#: Corrections by the norm layers a model needs for them (REPAIR applies to every model).
NEEDS_BATCHNORM = frozenset({"reset"})


def norm_of(config: RunConfig) -> str:
    """The model's normalisation layers: "batchnorm", "layernorm" or "none" (the MLP has none)."""
    return config.normalised().model.norm or "none"


@dataclass(frozen=True, kw_only=True)
class WidthOptions(ExperimentOptions):
    """A preset of presets/width.toml (its header says what each option means)."""

    widths: tuple[int, ...]
    methods: tuple[str, ...] = (NAIVE, "weight", "activation")
    corrections: tuple[str, ...] = ("none",)
    splits: tuple[str, ...] = SPLITS
    points: int = 25
    correction_examples: int | None = None
    settings: tuple[PairSetting, ...] = ()

    def check(self, setting: Setting) -> None:
        where = f"setting {setting.name}"
        if not self.widths or min(self.widths) < 1 or len(set(self.widths)) != len(self.widths):
            raise ValueError(f"{where}: widths must be distinct multipliers ≥ 1, got {list(self.widths)}")
        if "width" in setting.overrides.get("model", {}):
            raise ValueError(f"{where}: model.width is the experiment's axis (widths); leave it out of overrides")
        if isinstance(setting, PairSetting) and setting.pairs < 1:
            raise ValueError(f"{where}: pairs must be ≥ 1, got {setting.pairs}")
        if self.points < 3:
            raise ValueError(f"{where}: points must be ≥ 3 (a barrier needs an inner λ), got {self.points}")
        bad_splits = [s for s in self.splits if s not in SPLITS]
        if not self.splits or bad_splits:
            raise ValueError(f"{where}: splits must be some of {', '.join(SPLITS)}, got {list(self.splits)}")
        valid = [NAIVE, *PAIR_METHODS]
        unknown = [m for m in self.methods if m not in valid]
        if not self.methods or unknown or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"{where}: methods must be distinct names of {', '.join(valid)}, got {list(self.methods)}")
        unknown = [c for c in self.corrections if c not in BN_MODES]
        if not self.corrections or unknown or len(set(self.corrections)) != len(self.corrections):
            raise ValueError(
                f"{where}: corrections must be distinct names of {', '.join(BN_MODES)}, got {list(self.corrections)}"
            )
        norm = norm_of(setting.base_config())
        refused = [c for c in self.corrections if c in NEEDS_BATCHNORM and norm != "batchnorm"]
        if refused:
            raise ValueError(
                f"{where}: correction {refused[0]!r} recomputes BatchNorm statistics, but the model "
                f"({setting.base_config().model.model}, norm {norm}) has no BatchNorm, so it would change nothing; "
                "for this model use corrections none and repair"
            )
        if self.correction_examples is not None and self.correction_examples < 1:
            raise ValueError(f"{where}: correction_examples must be ≥ 1, got {self.correction_examples}")


@dataclass(frozen=True)
class PairSteps:
    """One pair at one width: its members' training, an alignment per method, and a path step per
    (method, correction)."""

    a: Step
    b: Step
    aligns: dict[str, Step]
    paths: dict[tuple[str, str], Step]

    def steps(self) -> list[Step]:
        return [self.a, self.b, *self.aligns.values(), *self.paths.values()]


def member_config(setting: PairSetting, width: int, pair: int, member: int) -> RunConfig:
    """Pair `pair`'s member 0 or 1 (`PairSetting.member_config`) with the model at width multiplier `width`."""
    config = setting.member_config(pair, member)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, width=width)).normalised()


def path_step(
    a: Step,
    b: Step,
    align: Step | None,
    *,
    splits: Sequence[str],
    examples: int | None,
    points: int,
    correction: str,
    correction_examples: int | None,
) -> Step:
    """A `width_path` step: the path θ_A → θ_B (or → π(θ_B) with `align`) on every split, with `correction`."""
    config = {
        "splits": list(splits),
        "examples": examples,
        "points": points,
        "correction": correction,
        "correction_examples": None if correction == "none" else correction_examples,
    }
    return Step("width_path", config, {"a": a, "b": b, **({"align": align} if align is not None else {})})


def build_graph(preset: WidthOptions) -> dict[str, dict[int, list[PairSteps]]]:
    """graph[setting][width] = one :class:`PairSteps` per pair."""
    graph: dict[str, dict[int, list[PairSteps]]] = {}
    for s in preset.settings:
        o = preset.at(s)
        graph[s.name] = {}
        for width in o.widths:
            graph[s.name][width] = []
            for i in range(s.pairs):
                a, b = (
                    train_step(f"{s.name}/w{width}/pair{i}/{m}", member_config(s, width, i, k), s.preset)
                    for k, m in enumerate("ab")
                )
                aligns = {m: align_step(a, b, m) for m in o.methods if m != NAIVE}
                paths = {
                    (m, c): path_step(
                        a,
                        b,
                        aligns.get(m),
                        splits=o.splits,
                        examples=s.eval_examples,
                        points=o.points,
                        correction=c,
                        correction_examples=o.correction_examples or s.eval_examples,
                    )
                    for m in o.methods
                    for c in o.corrections
                }
                graph[s.name][width].append(PairSteps(a, b, aligns, paths))
    return graph


@step_kind("width_path", resources="evaluation")
def _width_path(ctx: StepContext, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Loss, accuracy and error at `points` λ on every split of the path (aligned when an `align` input is
    given), the correction (none / BN reset / REPAIR) applied once per λ and shared by the splits."""
    run_a, model, theta_a, theta_b = endpoints(ctx, inputs)
    data = {split: dataset_for(ctx, run_a, split, config.get("examples")) for split in config["splits"]}
    correction = config["correction"]
    bn_data = dataset_for(ctx, run_a, "train", config.get("correction_examples")) if correction != "none" else None
    lambdas = default_lambdas(config["points"])
    rows = evaluate_path(model, theta_a, theta_b, data, lambdas=lambdas, bn=correction, bn_data=bn_data, progress=False)
    return {
        "lambdas": lambdas,
        "correction": correction,
        "n_examples": {split: len(d) for split, d in data.items()},
        "correction_examples": None if bn_data is None else len(bn_data),
        "values": {
            split: {metric: path_values(rows, metric, split) for metric in ("loss", "accuracy", "error")}
            for split in data
        },
    }


def run(preset: WidthOptions, ctx: ExperimentContext) -> dict[str, Any]:
    """Train (or reuse) every member at every width, align, evaluate every path; tables and figures to `ctx.out`."""
    graph = build_graph(preset)
    ctx.announce(preset.description)
    results, ran = ctx.run_steps(
        step for widths in graph.values() for pairs in widths.values() for p in pairs for step in p.steps()
    )
    rows, curves = tidy_tables(preset, graph, results)
    summary = summarize(rows)
    out = ctx.out
    files: dict[str, str] = {
        "barriers": str(write_csv(out / "width_barriers.csv", rows)),
        "summary": str(write_csv(out / "width_summary.csv", summary)),
        "curves": str(write_csv(out / "width_curves.csv", curves)),
    }
    for s in preset.settings:
        mine = [r for r in rows if r["setting"] == s.name]
        files[f"barrier_vs_width_{s.name}"] = str(
            plot_barrier_vs_width(out / f"barrier_vs_width_{s.name}.png", mine, title=s.label)
        )
    for line in summary_lines(summary):
        ctx.say(line)
    return ctx.summary(files, ran)


EXPERIMENT = Experiment(
    "width", "Git Re-Basin / REPAIR width ablation: barrier vs width, per method and correction", WidthOptions, run
)
#: ``run_width("smoke", out=…, runs_dir=…, data_dir=…, device=…, progress=…, say=…)``: a preset by name.
run_width = EXPERIMENT


# ------------------------------------------------------------------------------------------ tables


def _iter_paths(
    preset: WidthOptions, graph: dict[str, dict[int, list[PairSteps]]]
) -> Iterator[tuple[PairSetting, int, int, str, str, Step]]:
    for s in preset.settings:
        for width, pairs in graph[s.name].items():
            for pair, steps in enumerate(pairs):
                for (method, correction), step in steps.paths.items():
                    yield s, width, pair, method, correction, step


def tidy_tables(
    preset: WidthOptions, graph: dict[str, dict[int, list[PairSteps]]], results: dict[str, dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(barrier rows, curve rows). Barrier rows: {setting, model, width, norm, pair, method, correction, split,
    metric, barrier, midpoint, endpoint_a, endpoint_b, examples}, metric loss or error, barrier = max_λ of the
    barrier curve (NaN where the path has a non-finite value). Curve rows: every evaluated λ."""
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    for s, width, pair, method, correction, step in _iter_paths(preset, graph):
        res = results[step.key]
        config = s.base_config()
        base = {
            "setting": s.name,
            "model": config.model.model,
            "width": width,
            "norm": norm_of(config),
            "pair": pair,
            "method": method,
            "correction": correction,
        }
        lambdas = res["lambdas"]
        for split in preset.at(s).splits:
            by_metric = res["values"][split]
            for metric in METRICS:
                values = [math.nan if v is None else float(v) for v in by_metric[metric]]
                finite = all(map(math.isfinite, values))
                b = barriers(lambdas, values) if finite else {"barrier": math.nan, "midpoint": math.nan}
                rows.append(
                    {
                        **base,
                        "split": split,
                        "metric": metric,
                        "barrier": b["barrier"],
                        "midpoint": math.nan if b["midpoint"] is None else b["midpoint"],
                        "endpoint_a": values[0],
                        "endpoint_b": values[-1],
                        "examples": res["n_examples"][split],
                    }
                )
                curves += [
                    {**base, "split": split, "metric": metric, "lambda": lam, "value": v}
                    for lam, v in zip(lambdas, values)
                ]
    return rows, curves


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and SD (:func:`lmclab.paths.barriers.spread`) of the barrier over pairs, per (setting, norm, width,
    method, correction, split, metric); `pairs`: how many finite barriers went in."""
    keys = ("setting", "norm", "width", "method", "correction", "split", "metric")
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(float(r["barrier"]))
    out = []
    for key, values in groups.items():
        s = spread(values)
        out.append({**dict(zip(keys, key)), "mean": s.mean, "sd": s.sd, "pairs": s.n})
    return out


def summary_lines(summary: Sequence[dict[str, Any]], split: str = "test") -> list[str]:
    """A plain-text table: test loss and error barrier (mean ± SD over pairs) per setting, method and
    correction (rows) and width (columns)."""
    lines: list[str] = []
    settings = list(dict.fromkeys(r["setting"] for r in summary))
    for setting in settings:
        mine = [r for r in summary if r["setting"] == setting and r["split"] == split]
        if not mine:
            continue
        widths = sorted({int(r["width"]) for r in mine})
        for metric in METRICS:
            lines.append(f"{setting}: {split} {metric} barrier, mean ± SD over pairs, by width multiplier")
            lines.append(f"{'method / correction':<26}" + "".join(f"{'×' + str(w):>16}" for w in widths))
            combos = list(dict.fromkeys((r["method"], r["correction"]) for r in mine))
            for method, correction in combos:
                cells = {
                    int(r["width"]): r
                    for r in mine
                    if r["metric"] == metric and r["method"] == method and r["correction"] == correction
                }
                text = "".join(
                    f"{cells[w]['mean']:>9.3f} ± {cells[w]['sd']:<4.2f}" if w in cells else f"{'':>16}" for w in widths
                )
                lines.append(f"{method + ' / ' + correction:<26}{text}")
    return lines
