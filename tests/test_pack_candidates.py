"""bench/pack_candidates.py on the CPU, tiny MLP, K = 2: every candidate that runs on a CPU takes the same first step
as an independent float64 SGD step from lmclab's initialisation (packed and compiled steps equal the eager one);
the CUDA-graph candidates are skipped saying why; a failing candidate is recorded and the rest run; a caller's
time budget ends the measurement with the numbers so far; bad flag values exit 2 with one line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from lmclab.training.state import init_model

BENCH = Path(__file__).resolve().parents[1] / "bench"
TINY = ["--device", "cpu", "--model", "mlp", "--hidden", "16", "--k", "2", "--batch-size", "32", "--steps", "2"]
TINY += ["--warmup", "2", "--subset", "256", "--pool", "2"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pc() -> Iterator[ModuleType]:
    """bench/pack_candidates.py imported by name (its member processes, spawned, import it the same way)."""
    sys.path.insert(0, str(BENCH))
    import pack_candidates

    yield pack_candidates
    sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def setup(pc: ModuleType, shared_data: Path) -> object:
    return pc.prepare(pc.parse_args([*TINY, "--data-dir", str(shared_data)]))


def sgd_first_step(setup: object, k: int) -> tuple[float, torch.Tensor]:
    """Member k's first-step loss and parameters, in float64, by hand: lmclab's initialisation under its
    seed_init, ℓ = CE(f(θ0, x0), y0), θ1 = θ0 − lr·∇ℓ (SGD's first step: the momentum buffer is the gradient)."""
    config = setup.configs[k]  # type: ignore[attr-defined]
    model = init_model(config, setup.data.info).double()  # type: ignore[attr-defined]
    params = list(model.parameters())
    loss = F.cross_entropy(model(setup.xs[0, k].double()), setup.ys[0, k])  # type: ignore[attr-defined]
    grads = torch.autograd.grad(loss, params)
    lr = config.train.lr
    return loss.item(), torch.cat([(p - lr * g).detach().reshape(-1) for p, g in zip(params, grads)])


CANDIDATES = ["sequential", "vmap", "compile", "vmap+compile", "processes", "cudagraphs", "vmap+cudagraphs"]


@pytest.mark.parametrize("name", CANDIDATES)
def test_first_step_equals_an_independent_sgd_step(pc: ModuleType, setup: object, name: str) -> None:
    """(The CUDA-graph candidates run their code here too, mode "reduce-overhead", where inductor skips the CUDA
    graphs of CPU tensors: `run_candidate` skips them on the CPU, `stepped_candidate` runs them.)"""
    rec = (
        {"status": "ok", **pc.stepped_candidate(setup, name)} if "cudagraphs" in name else pc.run_candidate(setup, name)
    )
    assert rec["status"] == "ok" and rec["img_s"] > 0 and rec["warmup_s"] >= rec["first_step_s"] >= 0
    for k in range(2):
        loss, expected = sgd_first_step(setup, k)
        w0 = setup.initial[k]  # type: ignore[attr-defined]
        assert rec["_losses"][k].item() == pytest.approx(loss, abs=1e-5)
        # the relative error of the update θ1 − θ0 (float32 against float64)
        assert ((rec["_weights"][k] - expected).norm() / (expected - w0).norm()).item() < 1e-4
    if name.endswith("compile"):
        assert rec["compile_mode"] == "default" and rec["dynamo"]["graphs"] >= 1
    if name.endswith("cudagraphs"):
        assert rec["compile_mode"] == "reduce-overhead" and rec["dynamo"]["cudagraph_skips"] >= 1  # CPU tensors
    if name == "processes":
        assert rec["startup_s"] > 0 and "share this machine's" in rec["note"]


def test_cuda_graphs_are_skipped_on_the_cpu(pc: ModuleType, setup: object) -> None:
    for name in ("cudagraphs", "vmap+cudagraphs"):
        assert pc.run_candidate(setup, name) == {"status": "skipped", "why": "CUDA graphs need CUDA"}


def test_cli_json_winner_and_skips(pc: ModuleType, shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    argv = [*TINY, "--data-dir", str(shared_data), "--candidates", "vmap,cudagraphs", "--json", str(out)]
    assert pc.main(argv) == 0
    r = json.loads(out.read_text())
    assert list(r["candidates"]) == ["sequential", "vmap", "cudagraphs"]  # sequential first, always
    assert r["candidates"]["cudagraphs"] == {"status": "skipped", "why": "CUDA graphs need CUDA"}
    assert r["vs_sequential"]["sequential"] == 1.0 and r["candidates"]["sequential"]["check"]["agrees"] is True
    vmap = r["candidates"]["vmap"]
    assert vmap["ratio"] == pytest.approx(vmap["img_s"] / r["img_s"]["sequential"])
    assert vmap["check"]["agrees"] is True and vmap["check"]["update_max_rel_diff"] < 1e-4
    assert r["winner"] in ("sequential", "vmap") and r["ratio"] == r["vs_sequential"][r["winner"]]
    assert r["precision"] == "float32" and r["tolerance"] == {"loss_max_abs_diff": 1e-4, "update_max_rel_diff": 1e-3}


class Budget(BaseException):
    """A caller's time budget running out (as bench/gpu_session.py's StageTimeout)."""


def test_failure_is_recorded_and_a_spent_budget_keeps_the_numbers(
    pc: ModuleType, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pc.run_candidate

    def run(setup: object, name: str) -> dict:
        if name == "vmap":
            raise ValueError("no batching rule")
        if name == "compile":
            raise Budget
        return real(setup, name)

    monkeypatch.setattr(pc, "run_candidate", run)
    ns = pc.parse_args([*TINY, "--data-dir", str(shared_data), "--candidates", "vmap,compile,processes"])
    r = pc.measure(ns, stop_on=(Budget,))
    assert r["statuses"] == {"sequential": "ok", "vmap": "failed", "compile": "interrupted", "processes": "skipped"}
    assert r["candidates"]["vmap"]["error"] == "ValueError: no batching rule"
    assert r["candidates"]["processes"]["why"] == "time budget spent"
    assert r["winner"] == "sequential" and r["ratio"] == 1.0
    with pytest.raises(Budget):  # without stop_on, the caller's exception goes through
        pc.measure(ns)


def test_help_and_bad_values(pc: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        pc.parse_args(["--help"])
    assert done.value.code == 0 and "--candidates" in capsys.readouterr().out
    for args, says in (
        (["--candidates", "vmap,bogus"], "allowed: distinct names of sequential, vmap, compile"),
        (["--candidates", "vmap,vmap"], "allowed: distinct names of"),
        (["--k", "0"], "allowed: an integer >= 1"),
        (["--hidden", "16,x"], "allowed: comma-separated positive integers"),
        (["--subset", "8", "--batch-size", "32"], "allowed: at least --batch-size (32) images"),
        (["--model", "mlp", "--norm", "batchnorm"], "model mlp takes no norm"),
    ):
        with pytest.raises(SystemExit) as done:
            pc.parse_args(args)
        err = capsys.readouterr().err
        assert done.value.code == 2 and len(err.strip().splitlines()) == 1 and says in err, (args, err)
    ns = pc.parse_args(["--candidates", "processes,sequential"])
    assert isinstance(ns, argparse.Namespace) and ns.candidates == ["sequential", "processes"]
    assert ns.dataset == "cifar10" and pc.parse_args(["--model", "mlp"]).dataset == "mnist"
