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

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmclab.experiments.steps  # noqa: F401  (registers the step kinds)
from lmclab.curvature.taylor import taylor_polynomial
from lmclab.experiments.graph import LocalExecutor, Step
from lmclab.experiments.settings import ExperimentPreset, load_preset
from lmclab.experiments.steps import train_step
from lmclab.report import write_csv
from lmclab.report.benko import plot_logit_example, plot_logit_rmse, plot_loss_approximations

PATHS = ("naive", "aligned")


def build_graph(preset: ExperimentPreset) -> dict[str, Any]:
    """Steps by role: graph[setting][pair] = {"align", ("path"|"deriv", path, split[, center])...}."""
    o = preset.options
    graph: dict[str, Any] = {}
    for s in preset.settings:
        order = max(s.option(preset, "orders"))
        batch_size = s.option(preset, "derivative_batch_size", 50)
        graph[s.name] = []
        for i in range(s.pairs):
            a = train_step(f"{s.name}/pair{i}/a", s.member_config(i, 0), s.preset)
            b = train_step(f"{s.name}/pair{i}/b", s.member_config(i, 1), s.preset)
            align = Step("align", {"method": "weight", "seed": 0}, {"a": a, "b": b})
            steps: dict[Any, Step] = {"align": align}
            for path in PATHS:
                ins = {"a": a, "b": b, **({"align": align} if path == "aligned" else {})}
                for split in o["splits"]:
                    common = {"split": split, "examples": s.eval_examples}
                    steps[("path", path, split)] = Step("path", {**common, "points": o["points"]}, ins)
                    for center in ("a", "b"):
                        steps[("deriv", path, split, center)] = Step(
                            "loss_derivatives", {**common, "order": order, "center": center, "batch_size": batch_size},
                            ins)
                if s.name == o.get("logit_setting"):
                    steps[("logits", path)] = Step("logits", {"split": "test", "examples": o.get("logit_examples"),
                                                              "points": o["points"], "order": 2}, ins)
            graph[s.name].append(steps)
    return graph


def run_benko(preset_name: str = "smoke", *, out: str | Path = "out/benko", runs_dir: str | None = None,
              data_dir: str | None = None, device: str = "auto", progress: bool = True,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    preset = load_preset("benko", preset_name)
    graph = build_graph(preset)
    executor = LocalExecutor(runs_dir, {"runs_dir": runs_dir, "data_dir": data_dir, "device": device,
                                        "progress": progress}, progress=progress, say=say)
    say(f"benko --preset {preset_name}: {preset.description}")
    results = executor.run([step for pairs in graph.values() for steps in pairs for step in steps.values()])
    out = Path(out)
    loss_rows, rmse_rows, example_rows = tidy_tables(preset, graph, results)
    files: dict[str, str] = {
        "loss_table": str(write_csv(out / "loss_approximations.csv", loss_rows)),
    }
    for s in preset.settings:
        rows = [r for r in loss_rows if r["setting"] == s.name]
        files[f"loss_{s.name}"] = str(plot_loss_approximations(out / f"loss_{s.name}.png", rows, title=s.label))
    if rmse_rows:
        files["rmse_table"] = str(write_csv(out / "logit_rmse.csv", rmse_rows))
        files["example_table"] = str(write_csv(out / "logit_example.csv", example_rows))
        label = preset.setting(preset.options["logit_setting"]).label
        files["fig7"] = str(plot_logit_example(out / "fig7_logits.png", example_rows, title=f"{label}: one test input"))
        files["fig8"] = str(plot_logit_rmse(out / "fig8_logit_rmse.png", rmse_rows, title=f"{label}: logit RMSE"))
    say(f"ran {len(executor.ran)} step(s), reused the rest; figures and tables in {out}")
    for name, path in files.items():
        say(f"  {name}: {path}")
    return {"out": str(out), "files": files, "steps_run": executor.ran}


def tidy_tables(preset: ExperimentPreset, graph: dict[str, Any], results: dict[str, dict[str, Any]]
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Loss rows {setting, pair, path, split, lambda, curve, center, order, value}; RMSE and Fig. 7 rows."""
    loss_rows: list[dict[str, Any]] = []
    rmse_rows: list[dict[str, Any]] = []
    example_rows: list[dict[str, Any]] = []
    for s in preset.settings:
        for pair, steps in enumerate(graph[s.name]):
            for path in PATHS:
                for split in preset.options["splits"]:
                    true = results[steps[("path", path, split)].key]
                    lambdas = true["lambdas"]
                    base = {"setting": s.name, "pair": pair, "path": path, "split": split}
                    loss_rows += [{**base, "lambda": x, "curve": "true", "center": "", "order": "", "value": v}
                                  for x, v in zip(lambdas, true["loss"])]
                    for center in ("a", "b"):
                        coeffs = results[steps[("deriv", path, split, center)].key]["coefficients"]
                        t = [x if center == "a" else 1 - x for x in lambdas]
                        for k in s.option(preset, "orders"):
                            values = taylor_polynomial(coeffs, t, k).tolist()
                            loss_rows += [{**base, "lambda": x, "curve": "taylor", "center": center, "order": k,
                                           "value": v} for x, v in zip(lambdas, values)]
                if ("logits", path) in steps:
                    res = results[steps[("logits", path)].key]
                    for name, values in res["rmse"].items():
                        rmse_rows += [{"setting": s.name, "pair": pair, "path": path, "approximation": name,
                                       "lambda": x, "rmse": v} for x, v in zip(res["lambdas"], values)]
                    if pair == 0:
                        ex = res["example"]
                        for curve in [k for k in ex if k not in ("index", "label", "classes")]:
                            for li, x in enumerate(res["lambdas"]):
                                for ci, c in enumerate(ex["classes"]):
                                    example_rows.append({"path": path, "input": ex["index"], "label": ex["label"],
                                                         "class": c, "curve": curve, "lambda": x,
                                                         "value": ex[curve][li][ci]})
    return loss_rows, rmse_rows, example_rows
