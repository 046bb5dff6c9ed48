"""Benkő, "A second-order perspective on LMC modulo permutations", in one command.

For each setting (model, dataset, width) and each of its pairs: train both members, weight-match
B to A, and on the naive path θ_A → θ_B and the aligned path θ_A → π(θ_B) evaluate the true loss at
25 λ on the train and test splits next to its Taylor approximations of orders 1…K (the paper: 1–2;
beyond it: 3–4) centred at A (t = λ) and at B (direction −d, t = 1 − λ). For one setting, the
logit-level analysis: Fig. 7 (one input's three largest logits along both paths with their
approximations and the direct interpolation) and Fig. 8 (RMSE of the argmax-z(θ_A) logit per λ).
Every step is cached in the run store; tables sit beside the figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lmclab.experiments.steps  # noqa: F401  (registers the step kinds)
from lmclab.curvature.taylor import taylor_rows
from lmclab.experiments.context import Experiment, ExperimentContext
from lmclab.experiments.graph import Step
from lmclab.experiments.settings import ExperimentOptions, PairSetting, Setting
from lmclab.experiments.steps import align_step, train_step
from lmclab.report import write_csv
from lmclab.report.benko import plot_logit_example, plot_logit_rmse, plot_loss_approximations

PATHS = ("naive", "aligned")
CENTERS = ("a", "b")


@dataclass(frozen=True, kw_only=True)
class BenkoOptions(ExperimentOptions):
    """A preset of presets/benko.toml. `points`: λ per path; `orders`: the Taylor orders drawn (≤ 2 is the
    paper, 3–4 go beyond it; derivatives are taken to the highest); `splits`: the splits evaluated;
    `logit_setting`: the setting whose logits get Figs 7–8 (on `logit_examples` test inputs; none: no
    logit analysis); `derivative_batch_size`: examples per nested-forward-mode pass (memory only)."""

    points: int
    orders: tuple[int, ...]
    splits: tuple[str, ...]
    logit_setting: str | None = None
    logit_examples: int | None = None
    derivative_batch_size: int = 50
    settings: tuple[PairSetting, ...] = ()

    def check(self, setting: Setting) -> None:
        if not self.orders or min(self.orders) < 1:
            raise ValueError(f"setting {setting.name}: orders must be Taylor orders ≥ 1, got {list(self.orders)}")
        if self.points < 2:
            raise ValueError(f"setting {setting.name}: points must be ≥ 2, got {self.points}")
        if self.logit_setting is not None and self.logit_setting not in [s.name for s in self.settings]:
            raise ValueError(
                f"logit_setting {self.logit_setting!r} is not a setting; settings: "
                f"{', '.join(s.name for s in self.settings)}"
            )


@dataclass(frozen=True)
class SplitSteps:
    """One path on one split: the true loss along it and the loss derivatives at each end (by centre)."""

    loss: Step
    derivatives: Mapping[str, Step]


@dataclass(frozen=True)
class PairSteps:
    """One pair's steps: the alignment; per path and split its :class:`SplitSteps`; per path the logit
    trajectories (the logit setting only)."""

    align: Step
    paths: Mapping[str, Mapping[str, SplitSteps]]
    logits: Mapping[str, Step]

    def steps(self) -> list[Step]:
        out = [self.align]
        for path, splits in self.paths.items():
            for split in splits.values():
                out += [split.loss, *split.derivatives.values()]
            if path in self.logits:
                out.append(self.logits[path])
        return out


def build_graph(preset: BenkoOptions) -> dict[str, list[PairSteps]]:
    """graph[setting] = one :class:`PairSteps` per pair."""
    graph: dict[str, list[PairSteps]] = {}
    for s in preset.settings:
        o = preset.at(s)
        order = max(o.orders)
        graph[s.name] = []
        for i in range(s.pairs):
            a = train_step(f"{s.name}/pair{i}/a", s.member_config(i, 0), s.preset)
            b = train_step(f"{s.name}/pair{i}/b", s.member_config(i, 1), s.preset)
            align = align_step(a, b, "weight")
            paths: dict[str, dict[str, SplitSteps]] = {}
            logits: dict[str, Step] = {}
            for path in PATHS:
                ins = {"a": a, "b": b, **({"align": align} if path == "aligned" else {})}
                paths[path] = {}
                for split in o.splits:
                    common = {"split": split, "examples": s.eval_examples}
                    paths[path][split] = SplitSteps(
                        loss=Step("path", {**common, "points": o.points}, ins),
                        derivatives={
                            center: Step(
                                "loss_derivatives",
                                {**common, "order": order, "center": center, "batch_size": o.derivative_batch_size},
                                ins,
                            )
                            for center in CENTERS
                        },
                    )
                if s.name == o.logit_setting:
                    logits[path] = Step(
                        "logits", {"split": "test", "examples": o.logit_examples, "points": o.points, "order": 2}, ins
                    )
            graph[s.name].append(PairSteps(align, paths, logits))
    return graph


def run(preset: BenkoOptions, ctx: ExperimentContext) -> dict[str, Any]:
    """Train (or reuse) every member, run the steps, write the figures and tables to `ctx.out`."""
    graph = build_graph(preset)
    ctx.announce(preset.description)
    results, ran = ctx.run_steps(step for pairs in graph.values() for steps in pairs for step in steps.steps())
    out = ctx.out
    loss_rows, rmse_rows, example_rows = tidy_tables(preset, graph, results)
    files: dict[str, str] = {
        "loss_table": str(write_csv(out / "loss_approximations.csv", loss_rows)),
    }
    for s in preset.settings:
        rows = [r for r in loss_rows if r["setting"] == s.name]
        files[f"loss_{s.name}"] = str(plot_loss_approximations(out / f"loss_{s.name}.png", rows, title=s.label))
    if rmse_rows and preset.logit_setting is not None:
        files["rmse_table"] = str(write_csv(out / "logit_rmse.csv", rmse_rows))
        files["example_table"] = str(write_csv(out / "logit_example.csv", example_rows))
        label = preset.setting(preset.logit_setting).label
        files["fig7"] = str(plot_logit_example(out / "fig7_logits.png", example_rows, title=f"{label}: one test input"))
        files["fig8"] = str(plot_logit_rmse(out / "fig8_logit_rmse.png", rmse_rows, title=f"{label}: logit RMSE"))
    return ctx.summary(files, ran)


EXPERIMENT = Experiment("benko", "Benkő, a second-order perspective on LMC", BenkoOptions, run)
#: ``run_benko("smoke", out=…, runs_dir=…, data_dir=…, device=…, progress=…, say=…)``: a preset by name.
run_benko = EXPERIMENT


def _series_order(name: str) -> tuple[int, int, str]:
    """Table order of logit series (stored results come back with sorted keys): the true logits, the direct
    interpolation, then each order's approximations centred at A and at B (a1, b1, a2, b2, …); RMSE tables
    put the direct interpolation last."""
    fixed = {"true": 0, "direct": 1}
    if name in fixed:
        return (fixed[name], 0, "")
    return (2, int(name[1:]), name[0]) if name[1:].isdigit() else (3, 0, name)


def tidy_tables(
    preset: BenkoOptions, graph: dict[str, list[PairSteps]], results: dict[str, dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Loss rows {setting, pair, path, split, examples, lambda, curve, center, order, value}; RMSE rows
    {setting, pair, path, approximation, lambda, rmse, examples} and Fig. 7 rows (`examples`: the number
    of examples of the split evaluated)."""
    loss_rows: list[dict[str, Any]] = []
    rmse_rows: list[dict[str, Any]] = []
    example_rows: list[dict[str, Any]] = []
    for s in preset.settings:
        orders = preset.at(s).orders
        for pair, steps in enumerate(graph[s.name]):
            for path, splits in steps.paths.items():
                for split, split_steps in splits.items():
                    true = results[split_steps.loss.key]
                    lambdas = true["lambdas"]
                    base = {
                        "setting": s.name,
                        "pair": pair,
                        "path": path,
                        "split": split,
                        "examples": true.get("n_examples"),
                    }
                    loss_rows += [
                        {**base, "lambda": x, "curve": "true", "center": "", "order": "", "value": v}
                        for x, v in zip(lambdas, true["loss"])
                    ]
                    coeffs_a, coeffs_b = (results[split_steps.derivatives[c].key]["coefficients"] for c in CENTERS)
                    loss_rows += [
                        {
                            **base,
                            "lambda": r["lambda"],
                            "curve": "taylor",
                            "center": r["center"],
                            "order": r["order"],
                            "value": r["value"],
                        }
                        for r in taylor_rows(lambdas, coeffs_a, coeffs_b, orders=orders)
                    ]
                if path in steps.logits:
                    res = results[steps.logits[path].key]
                    for name in sorted(res["rmse"], key=lambda n: (n == "direct", _series_order(n))):
                        values = res["rmse"][name]
                        rmse_rows += [
                            {
                                "setting": s.name,
                                "pair": pair,
                                "path": path,
                                "approximation": name,
                                "lambda": x,
                                "rmse": v,
                                "examples": res.get("n_examples"),
                            }
                            for x, v in zip(res["lambdas"], values)
                        ]
                    if pair == 0:
                        ex = res["example"]
                        curves = sorted((k for k in ex if k not in ("index", "label", "classes")), key=_series_order)
                        for curve in curves:
                            for li, x in enumerate(res["lambdas"]):
                                for ci, c in enumerate(ex["classes"]):
                                    example_rows.append(
                                        {
                                            "path": path,
                                            "input": ex["index"],
                                            "label": ex["label"],
                                            "class": c,
                                            "curve": curve,
                                            "lambda": x,
                                            "value": ex[curve][li][ci],
                                        }
                                    )
    return loss_rows, rmse_rows, example_rows
