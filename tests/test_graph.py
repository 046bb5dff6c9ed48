"""The experiment graph: keys, dependency order, caching in the store, NaN handling, presets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lmclab.experiments.benko import BenkoOptions
from lmclab.experiments.graph import LocalExecutor, Step, finite_or_none, step_kind, topological_order
from lmclab.experiments.settings import load_preset, preset_names
from lmclab.store import Store

CALLS: list[str] = []


@step_kind("test_number")
def _number(ctx, config, inputs):  # type: ignore[no-untyped-def]
    CALLS.append(f"number:{config['value']}")
    return {"value": config["value"]}


@step_kind("test_sum")
def _sum(ctx, config, inputs):  # type: ignore[no-untyped-def]
    CALLS.append("sum")
    (ctx.directory / "note.txt").write_text("steps may write files into their directory")
    return {"value": sum(r["value"] for r in inputs.values()), "nan": math.nan}


def test_keys_order_and_caching(tmp_path: Path) -> None:
    CALLS.clear()
    one, two = Step("test_number", {"value": 1}), Step("test_number", {"value": 2})
    total = Step("test_sum", {}, {"x": one, "y": two})
    assert Step("test_number", {"value": 1}).key == one.key != two.key
    assert Step("test_sum", {}, {"x": two, "y": one}).key != total.key  # inputs are part of the identity
    order = topological_order([total])
    assert order[-1] == total and {s.key for s in order[:2]} == {one.key, two.key}

    executor = LocalExecutor(tmp_path, progress=False)
    results = executor.run([total])
    assert results[total.key]["value"] == 3 and results[total.key]["nan"] is None
    assert sorted(CALLS) == ["number:1", "number:2", "sum"]
    assert (tmp_path / "steps" / total.name / "note.txt").is_file()

    CALLS.clear()
    again = LocalExecutor(tmp_path, progress=False)
    assert again.run([total])[total.key]["value"] == 3 and CALLS == [] and again.ran == []
    three = Step("test_sum", {}, {"x": one, "y": Step("test_number", {"value": 5})})
    assert again.run([three])[three.key]["value"] == 6 and sorted(CALLS) == ["number:5", "sum"]


def test_unknown_kind_and_duplicate_registration(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="no step kind 'nope'"):
        LocalExecutor(tmp_path, progress=False).run([Step("nope", {})])
    with pytest.raises(ValueError, match="registered twice"):
        step_kind("test_number")(lambda ctx, c, i: {})


def test_finite_or_none() -> None:
    assert finite_or_none({"a": [1.0, math.inf, {"b": math.nan}], "c": "x"}) == {
        "a": [1.0, None, {"b": None}],
        "c": "x",
    }


def test_benko_presets_load() -> None:
    assert {"smoke", "paper"} <= set(preset_names("benko"))
    smoke = load_preset("benko", "smoke", BenkoOptions)
    assert [s.name for s in smoke.settings] == ["mlp_mnist", "resnet20x1_cifar10"]
    r20 = smoke.setting("resnet20x1_cifar10")
    a, b = r20.member_config(0, 0), r20.member_config(0, 1)
    assert a.train.epochs == 4 and a.data.train_subset == 5000 and a.model.norm == "layernorm"
    assert a.seeds != b.seeds and a.run_hash() != b.run_hash()
    paper = load_preset("benko", "paper", BenkoOptions)
    assert len(paper.settings) == 9 and all(s.pairs == 10 for s in paper.settings)
    assert paper.setting("resnet20x32_cifar10").base_config().train.epochs == 250
    with pytest.raises(ValueError, match="presets: smoke, paper"):
        load_preset("benko", "huge", BenkoOptions)
    with pytest.raises(ValueError, match="experiments: benko"):
        load_preset("nope", "smoke", BenkoOptions)


def test_step_keys_are_pinned_and_results_live_in_the_stores_step_directory(tmp_path: Path) -> None:
    """Regression pins: a change here renames every stored step result. Update only on purpose."""
    simple = Step("x", {"a": 1, "b": [1, 2.5, None], "c": (1, 2)})
    assert simple.key == "bc8b1ca06a336e51" and simple.name == f"x_{simple.key}"
    assert Step("y", {"p": "q"}, {"z": Step("x", {"a": 1}), "a": Step("x", {"a": 2})}).key == "da3485de417c9d0c"
    assert Step("x", {"p": Path("/a")}).key == Step("x", {"p": "/a"}).key  # values JSON cannot hold: str()
    assert (
        LocalExecutor(tmp_path, progress=False).directory(simple)
        == Store(tmp_path).step_dir("x", simple.key)
        == tmp_path / "steps" / simple.name
    )
