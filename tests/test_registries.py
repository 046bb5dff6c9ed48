"""The registries: alignment methods (two-model, K-model) dispatched by name with their declared needs, every
registered method verified on a tiny MLP (f(π(θ)) = f(θ)), a newly registered method reaching align() and
the CLI, the README's "adding an alignment method" example; the model and dataset registries."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmclab.align.registry as registry_module
from lmclab.align import (
    NEEDS,
    PAIR_METHODS,
    POPULATION_METHODS,
    SETTINGS,
    MatchResult,
    MethodEntry,
    PopulationAlignment,
    align,
    align_population,
    match_distances,
    register_pair_method,
    weight_matching,
)
from lmclab.cli import build_parser, main
from lmclab.data import DatasetInfo, DeviceDataset
from lmclab.data.registry import DATASET_NAMES, STATIC_INFO
from lmclab.models import MODEL_NAMES, build_model
from lmclab.models.registry import MODELS, register_model
from lmclab.permutation import Permutation, PermutationSpec, derive_spec, verify_permutation

README = Path(__file__).resolve().parents[1] / "README.md"
SHAPE = (1, 1, 6)
K = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup() -> tuple[list[torch.nn.Module], PermutationSpec, DeviceDataset]:
    """K tiny MLPs 6-8-6-3 (different seeds), their spec, and 64 random training examples."""
    models = []
    for seed in range(K):
        torch.manual_seed(seed)
        models.append(build_model("mlp", input_shape=SHAPE, num_classes=3, hidden=(8, 6)))
    spec = derive_spec(models[0], torch.zeros(2, *SHAPE))
    gen = torch.Generator().manual_seed(0)
    info = DatasetInfo("toy", 3, SHAPE, (0.5,), (0.25,), False, ("a", "b", "c"), "test")
    data = DeviceDataset(
        torch.randint(0, 256, (64, *SHAPE), generator=gen, dtype=torch.uint8),
        torch.randint(0, 3, (64,), generator=gen),
        info,
    )
    return models, spec, data


def supplied(entry: MethodEntry, model: torch.nn.Module, data: DeviceDataset) -> dict:
    """What a generic caller gives a method: its needs, and the settings it accepts (kept quick)."""
    available = {"model": model, "data": data, "batches": [x for x, _ in data.batches(32)]}
    return {**{n: available[n] for n in entry.needs}, **entry.settings(seed=0, epochs=1, progress=False)}


def example_input() -> torch.Tensor:
    return torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------- every method runs


@pytest.mark.parametrize("name", list(PAIR_METHODS))
def test_every_pair_method_runs_through_align_and_keeps_the_function(name: str, setup) -> None:
    models, spec, data = setup
    theta_a, theta_b = models[0].state_dict(), models[1].state_dict()
    result = align(theta_a, theta_b, spec, name, **supplied(PAIR_METHODS[name], models[0], data))
    assert isinstance(result, MatchResult) and result.method == name
    assert set(result.perm.perms) == {g.name for g in spec.groups}
    verify_permutation(models[1], result.perm, spec, example_input=example_input())  # f(π(θ_B)) = f(θ_B)


@pytest.mark.parametrize("name", list(POPULATION_METHODS))
def test_every_population_method_runs_through_align_population_and_keeps_the_function(name: str, setup) -> None:
    models, spec, data = setup
    thetas = [m.state_dict() for m in models]
    result = align_population(thetas, spec, name, **supplied(POPULATION_METHODS[name], models[0], data))
    assert isinstance(result, PopulationAlignment) and result.method == name
    assert result.k == K and result.perms[0].is_identity()
    for model, perm in zip(models, result.perms):
        verify_permutation(model, perm, spec, example_input=example_input())  # f(π_i(θ_i)) = f(θ_i)


def test_dispatch_gives_the_methods_own_result(setup) -> None:
    models, spec, data = setup
    theta_a, theta_b = models[0].state_dict(), models[1].state_dict()
    assert align(theta_a, theta_b, spec, "weight", seed=3).perm == weight_matching(theta_a, theta_b, spec, seed=3).perm
    batches = [x for x, _ in data.batches(32)]
    from_dicts = align(theta_a, theta_b, spec, "activation", model=models[2], batches=batches)
    from_modules = align(models[0], models[1], spec, "activation", batches=batches)  # module A stands for model=
    assert from_dicts.perm == from_modules.perm


# ------------------------------------------------------------------------------------ names, needs


def test_unknown_method_lists_the_valid_names(setup) -> None:
    models, spec, _ = setup
    thetas = [m.state_dict() for m in models]
    assert list(PAIR_METHODS)[:3] == ["weight", "activation", "ste"]
    assert list(POPULATION_METHODS)[:4] == ["naive", "pairwise", "merge_many", "ste_mm"]
    with pytest.raises(
        ValueError,
        match=re.escape(f"unknown alignment method 'no_such_method'; valid methods: {', '.join(PAIR_METHODS)}"),
    ):
        align(thetas[0], thetas[1], spec, "no_such_method")
    with pytest.raises(
        ValueError, match=re.escape(f"unknown population method 'mean'; valid methods: {', '.join(POPULATION_METHODS)}")
    ):
        align_population(thetas, spec, "mean")


def test_missing_needs_are_named(setup) -> None:
    models, spec, data = setup
    thetas = [m.state_dict() for m in models]
    with pytest.raises(
        ValueError,
        match=r"activation matching needs model=<.*> and batches=<.*>; missing: "
        r"model, batches$",
    ):
        align(thetas[0], thetas[1], spec, "activation")
    with pytest.raises(ValueError, match="missing: batches$"):
        align(models[0], models[1], spec, "activation")
    with pytest.raises(ValueError, match="STE needs model=.*; missing: data$"):
        align(thetas[0], thetas[1], spec, "ste", model=models[0])
    with pytest.raises(ValueError, match="STE-MM needs model=.*; missing: model, data$"):
        align_population(thetas, spec, "ste_mm", data=None)


def test_entries_declare_needs_settings_and_one_line(setup) -> None:
    for entry in [*PAIR_METHODS.values(), *POPULATION_METHODS.values()]:
        assert entry.description and "\n" not in entry.description
        assert set(entry.needs) <= set(NEEDS) and set(entry.accepts) <= set(SETTINGS)
        assert entry.summary().startswith(entry.name)
    with pytest.raises(ValueError, match="unknown needs/settings"):
        register_pair_method("x", "needs a GPU", needs=("gpu",))(lambda *a, **k: None)
    with pytest.raises(ValueError, match="already registered"):
        register_pair_method("weight", "again")(lambda *a, **k: None)
    assert "x" not in PAIR_METHODS and PAIR_METHODS["weight"].fn is weight_matching


def test_registry_module_imports_no_method_and_importing_the_package_fills_it() -> None:
    tree = ast.parse(Path(registry_module.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m.startswith("lmclab")} == {
        "lmclab.align.results",
        "lmclab.permutation.spec",
        "lmclab.points",
    }
    code = "import lmclab.align.registry as r; print(','.join(r.PAIR_METHODS), ','.join(r.POPULATION_METHODS))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["weight,activation,ste,sinkhorn", "naive,pairwise,merge_many,ste_mm,c2m3"]


# ------------------------------------------------------------------------- a new method, the CLI


@pytest.fixture
def identity_method():
    """A toy two-model method, registered for one test."""

    @register_pair_method("identity", "no permutation (a toy)")
    def identity(theta_a, theta_b, spec):
        perm = Permutation.identity(spec)
        before, after = match_distances(theta_a, theta_b, spec, perm)
        return MatchResult(
            perm, spec, sweeps=0, objective=[], distance_before=before, distance_after=after, method="identity"
        )

    yield PAIR_METHODS["identity"]
    del PAIR_METHODS["identity"]


def test_a_registered_method_is_dispatched_and_offered_by_the_cli(identity_method, setup, capsys) -> None:
    models, spec, _ = setup
    result = align(models[0], models[1], spec, "identity")
    assert result.perm.is_identity() and result.distance_before == result.distance_after
    parser = build_parser()
    assert parser.parse_args(["align", "A", "B", "--method", "identity"]).method == "identity"
    for command in (
        ["interpolate", "A", "B", "--align", "identity"],
        ["predict", "A", "B", "--align", "identity"],
        ["demo", "--align", "identity"],
    ):
        assert parser.parse_args(command).align == "identity"
    with pytest.raises(SystemExit):
        parser.parse_args(["align", "--help"])
    assert "identity: no permutation (a toy)" in " ".join(capsys.readouterr().out.split())


def test_cli_choices_come_from_the_registries(capsys) -> None:
    parser = build_parser()
    assert parser.parse_args(["merge", "A", "B", "--method", *POPULATION_METHODS]).method == list(POPULATION_METHODS)
    with pytest.raises(SystemExit):
        parser.parse_args(["align", "A", "B", "--method", "no_such_method"])
    assert f"choose from {', '.join(map(repr, PAIR_METHODS))}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["merge", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for entry in POPULATION_METHODS.values():
        assert " ".join(entry.summary().split()) in help_text


def test_readme_adding_an_alignment_method_example_runs(tmp_path: Path) -> None:
    blocks = [
        b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "register_pair_method" in b
    ]
    assert len(blocks) == 1, "README has no (or more than one) 'adding an alignment method' example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "random: a random permutation of every group (a toy)" in done.stdout


# ----------------------------------------------------------------------------- models, datasets


def test_models_and_datasets_are_listed_from_their_registries(capsys) -> None:
    assert MODEL_NAMES == tuple(MODELS) and DATASET_NAMES == tuple(STATIC_INFO)
    for entry in MODELS.values():
        assert entry.description and "width" in entry.defaults
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp", {"width": 1}, "again")(MODELS["mlp"].build)
    assert main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        name: json.loads(json.dumps(dict(e.defaults))) for name, e in MODELS.items()
    }
    assert main(["datasets", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[: len(DATASET_NAMES)] == list(DATASET_NAMES)
