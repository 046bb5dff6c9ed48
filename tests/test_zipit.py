"""ZipIt!: merge/unmerge algebra, greedy pairing, exactness on (permuted) copies, partial zipping, refusals,
the `classes` data option and a tiny run of the disjoint-task study."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from figures import check_zipit, drawn
from lmclab.align.zipit import (
    ZipError,
    apply_zip,
    combine_heads,
    greedy_pairs,
    head_logits,
    zip_matches,
    zip_matrices,
    zip_prefix,
    zipit,
)
from lmclab.config import DataConfig, RunConfig, UsageError
from lmclab.models import build_model
from lmclab.permutation import Permutation, derive_spec


def _mlp(seed: int, hidden: tuple[int, ...] = (12, 10, 8)) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", input_shape=(1, 4, 4), num_classes=5, hidden=hidden).eval()


def _batches(seed: int = 0, n: int = 4, shape: tuple[int, ...] = (1, 4, 4)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, *shape, generator=g) for _ in range(n)]


def _loaded(model: nn.Module, theta: dict) -> nn.Module:
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(theta)
    return m.eval()


def test_merge_unmerge_algebra() -> None:
    n = 7
    pairs = torch.randperm(2 * n, generator=torch.Generator().manual_seed(3)).reshape(n, 2).sort(dim=1).values
    merge, unmerge = zip_matrices(pairs, n, torch.float64)
    assert torch.equal(merge @ unmerge, torch.eye(n, dtype=torch.float64))  # M U = I on merged features
    proj = unmerge @ merge  # U M: a projection of the 2n features onto pair means
    assert torch.allclose(proj @ proj, proj)
    f = torch.randn(2 * n, dtype=torch.float64)
    for i, j in pairs.tolist():
        assert torch.isclose((proj @ f)[i], (f[i] + f[j]) / 2)
    with pytest.raises(ZipError):
        zip_matrices(torch.tensor([[0, 1], [1, 2]]), 2)


def _naive_greedy(corr: torch.Tensor, alpha: float) -> list[tuple[int, int]]:
    """Independent reference: repeatedly the argmax of the masked matrix; a half's block is masked once it
    holds ⌊α n / 2⌋ pairs."""
    c = corr.clone().double()
    total = c.shape[0]
    n = total // 2
    cap = int(alpha * n / 2)
    c.fill_diagonal_(-torch.inf)
    inside = [0, 0]
    pairs = []
    for _ in range(n):
        for half in (0, 1):
            if inside[half] >= cap:
                c[half * n : (half + 1) * n, half * n : (half + 1) * n] = -torch.inf
        k = int(torch.argmax(c))
        i, j = divmod(k, total)
        if (i < n) == (j < n):
            inside[int(i >= n)] += 1
        pairs.append((min(i, j), max(i, j)))
        c[[i, j], :] = -torch.inf
        c[:, [i, j]] = -torch.inf
    return sorted(pairs)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_greedy_pairs_matches_a_naive_greedy(alpha: float) -> None:
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    x[:, :8] += x[:, [1, 0, 3, 2, 5, 4, 7, 6]]  # correlated features within A
    corr = torch.corrcoef(x.T)
    pairs = greedy_pairs(corr, alpha=alpha)
    assert [tuple(p) for p in pairs.tolist()] == _naive_greedy(corr, alpha)
    within = int(((pairs[:, 0] < 8) == (pairs[:, 1] < 8)).sum())
    assert within <= 2 * int(alpha * 8 / 2)
    if alpha == 1.0:
        assert within > 0
    if alpha == 0.0:
        assert bool(((pairs[:, 0] < 8) & (pairs[:, 1] >= 8)).all())


def test_within_model_pairs_are_formed() -> None:
    """Two features of A that are copies of each other merge with each other."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 3, generator=g)
    noise = 0.05 * torch.randn(200, 3, generator=g)
    # A: [a0, 2 a0 + noise, a1]; B: [a2, a2 + noise, a1 + noise]
    feats = torch.stack(
        [a[:, 0], 2 * a[:, 0] + noise[:, 0], a[:, 1], a[:, 2], a[:, 2] + noise[:, 1], a[:, 1] + noise[:, 2]]
    )
    pairs = greedy_pairs(torch.corrcoef(feats))
    assert pairs.tolist() == [[0, 1], [2, 5], [3, 4]]
    merge, unmerge = zip_matrices(pairs, 3)
    assert torch.equal(merge @ unmerge, torch.eye(3))


@pytest.mark.parametrize("copy", ["itself", "permuted"])
def test_zipping_a_model_with_a_copy_returns_the_model(copy: str) -> None:
    model = _mlp(0)
    spec = derive_spec(model, torch.randn(2, 1, 4, 4))
    theta = model.state_dict()
    perm = (
        Permutation.random(spec, torch.Generator().manual_seed(5)) if copy == "permuted" else Permutation.identity(spec)
    )
    other = _loaded(model, perm.apply(theta, spec))
    result = zipit(model, other, spec, _batches())
    assert result.zipped == tuple(spec.names)
    assert result.head_tensors == ("head.weight", "head.bias")
    for head in result.heads:
        for k, v in theta.items():
            assert torch.allclose(head[k], v, atol=1e-6), k
    x = torch.randn(16, 1, 4, 4)
    for z in head_logits(model, result.heads, x):
        assert torch.allclose(z, model(x), atol=1e-5)
    assert all(m.within == 0 for m in result.matches.values())


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 5, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(5 * 4 * 4, 7)
        self.out = nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = self.pool(torch.relu(self.c2(x)))
        return self.out(torch.relu(self.fc(x.flatten(1))))


def test_conv_net_with_flatten_zips_a_permuted_copy_exactly() -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    spec = derive_spec(model, torch.randn(2, 3, 8, 8))
    assert any(ax.block > 1 for g in spec.groups for ax in g.axes)  # the flatten into fc
    perm = Permutation.random(spec, torch.Generator().manual_seed(2))
    other = _loaded(model, perm.apply(model.state_dict(), spec))
    result = zipit(model, other, spec, _batches(shape=(3, 8, 8), n=2))
    x = torch.randn(8, 3, 8, 8)
    for z in head_logits(model, result.heads, x):
        assert torch.allclose(z, model(x), atol=1e-5)


def _manual_zipped_logits(models: list[nn.Module], matches: dict, names: list[str], x: torch.Tensor) -> list:
    """Independent forward of the zipped MLP: merged layer k computes z* = M (blockdiag(W_A, W_B) U h* + b),
    with U h* = [U_A h*; U_B h*]; after the last zipped group each model continues from U_m h*."""
    sds = [m.state_dict() for m in models]
    layers = [f"layers.{i}.linear" for i in range(3)] + ["head"]  # the MLP of _mlp
    h = x.flatten(1)
    unmerge = None
    zipped = len(names)
    for i in range(zipped):
        ws = [sd[f"{layers[i]}.weight"] for sd in sds]
        bs = [sd[f"{layers[i]}.bias"] for sd in sds]
        inputs = [h, h] if unmerge is None else [h @ u.T for u in unmerge_split(unmerge)]
        z = torch.cat([inputs[m] @ ws[m].T + bs[m] for m in (0, 1)], 1)
        match = matches[names[i]]
        h = torch.relu(z @ match.merge.T)
        unmerge = match.unmerge
    outs = []
    for m in (0, 1):
        hm = h @ unmerge_split(unmerge)[m].T
        for layer in layers[zipped:]:
            hm = hm @ sds[m][f"{layer}.weight"].T + sds[m][f"{layer}.bias"]
            if layer != "head":
                hm = torch.relu(hm)
        outs.append(hm)
    return outs


def unmerge_split(unmerge: torch.Tensor) -> list[torch.Tensor]:
    n = unmerge.shape[0] // 2
    return [unmerge[:n], unmerge[n:]]


@pytest.mark.parametrize("stop", [1, 2, None])
def test_zipped_function_matches_an_independent_forward(stop: int | None) -> None:
    a, b = _mlp(0), _mlp(1)
    spec = derive_spec(a, torch.randn(2, 1, 4, 4))
    result = zipit(a, b, spec, _batches(), stop=stop)
    names = list(zip_prefix(spec, stop))
    assert result.zipped == tuple(names)
    x = torch.randn(16, 1, 4, 4)
    got = head_logits(a, result.heads, x)
    want = _manual_zipped_logits([a, b], dict(result.matches), names, x)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)
    # the trunk is shared, the heads are each model's own after the zipped groups
    for t in result.trunk:
        assert torch.equal(result.heads[0][t], result.heads[1][t])
    if stop == 1:
        assert "layers.2.linear.weight" in result.head_tensors
        assert torch.equal(result.heads[1]["layers.2.linear.weight"], b.state_dict()["layers.2.linear.weight"])
        assert not torch.equal(result.heads[0]["head.weight"], result.heads[1]["head.weight"])


def test_partial_zip_of_a_model_with_itself_is_exact_and_keeps_two_heads() -> None:
    model = _mlp(3)
    spec = derive_spec(model, torch.randn(2, 1, 4, 4))
    result = zipit(model, _loaded(model, model.state_dict()), spec, _batches(), stop="P_layers.0.linear")
    assert result.zipped == ("P_layers.0.linear",)
    assert set(result.trunk) == {"layers.0.linear.weight", "layers.0.linear.bias"}
    assert len(result.heads) == 2
    x = torch.randn(16, 1, 4, 4)
    for z in head_logits(model, result.heads, x):
        assert torch.allclose(z, model(x), atol=1e-6)


def test_within_model_merges_change_the_model_but_keep_the_shapes() -> None:
    a, b = _mlp(0), _mlp(1)
    spec = derive_spec(a, torch.randn(2, 1, 4, 4))
    result = zipit(a, b, spec, _batches())
    cross = zipit(a, b, spec, _batches(), alpha=0.0)
    assert all(m.within == 0 for m in cross.matches.values())
    assert all(m.within % 2 == 0 for m in result.matches.values())  # as many A–A pairs as B–B pairs
    for k, v in a.state_dict().items():
        assert result.heads[0][k].shape == v.shape


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.f1 = nn.Linear(8, 5)
        self.f2 = nn.Linear(5, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = h + self.f2(torch.relu(self.f1(h)))
        return self.out(torch.relu(h))


def test_refuses_a_zip_that_is_not_a_prefix() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    spec = derive_spec(model, torch.randn(2, 6))
    stream = next(g.name for g in spec.groups if any(ax.tensor == "f2.weight" and ax.axis == 0 for ax in g.axes))
    assert spec.names[0] == stream  # the residual stream comes first in graph order
    batches = [torch.randn(32, 6)]
    # zipping the stream alone: f2 writes to it but reads the inner group, left unzipped — refused, not done partly
    with pytest.raises(ZipError, match="f2.weight.*zip a prefix"):
        zipit(model, model, spec, batches, stop=stream)
    with pytest.raises(ZipError, match="f2.weight.*zip a prefix"):
        matches = zip_matches({stream: torch.eye(16).roll(8, 1)}, spec)
        apply_zip(model.state_dict(), model.state_dict(), spec, matches, groups=(stream,))
    full = zipit(model, model, spec, batches)
    x = torch.randn(4, 6)
    for z in head_logits(model, full.heads, x):
        assert torch.allclose(z, model(x), atol=1e-6)


def test_refusals() -> None:
    model = _mlp(0)
    spec = derive_spec(model, torch.randn(2, 1, 4, 4))
    with pytest.raises(ZipError, match="no such group"):
        zip_prefix(spec, "nope")
    with pytest.raises(ZipError, match="groups 1"):
        zip_prefix(spec, 9)
    with pytest.raises(ZipError, match="no batches"):
        zipit(model, model, spec, [])


def test_combine_heads() -> None:
    za = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    zb = torch.tensor([[3.0, 0.0, 1.0, 8.0]])
    assert torch.equal(combine_heads([za, zb], "mean"), torch.tensor([[2.0, 1.0, 2.0, 6.0]]))
    assert torch.equal(combine_heads([za, zb], "concat", [(0, 1), (2, 3)]), torch.tensor([[1.0, 2.0, 1.0, 8.0]]))
    with pytest.raises(ValueError):
        combine_heads([za, zb], "concat")


def test_matches_are_reusable_on_other_points() -> None:
    a = _mlp(0)
    spec = derive_spec(a, torch.randn(2, 1, 4, 4))
    corr = {g.name: torch.eye(2 * g.size).roll(g.size, 1) for g in spec.groups}  # A feature i ~ B feature i
    matches = zip_matches(corr, spec)
    result = apply_zip(a.state_dict(), a.state_dict(), spec, matches)
    for k, v in a.state_dict().items():
        assert torch.equal(result.heads[0][k], v)


def test_classes_option_keeps_existing_hashes() -> None:
    base = RunConfig()
    assert dataclasses.replace(base, data=DataConfig(classes=None)).run_hash() == base.run_hash()
    assert "classes" not in base.to_dict()["data"]
    varied = dataclasses.replace(base, data=DataConfig(classes=(0, 1, 2, 3, 4)))
    assert varied.run_hash() != base.run_hash()
    assert RunConfig.from_dict(varied.to_dict()) == varied
    with pytest.raises(UsageError, match="--classes"):
        dataclasses.replace(base, data=DataConfig(classes=(1, 1))).validate()


def test_presets_load() -> None:
    from lmclab.experiments.registry import get_experiment

    experiment = get_experiment("zipit")
    assert experiment.presets() == ["smoke", "paper", "tiny"]
    smoke = experiment.load("smoke")
    setting = smoke.settings[0]
    a, b = (setting.member_config(0, m, smoke.tasks) for m in (0, 1))
    assert a.data.classes == (0, 1, 2, 3, 4) and b.data.classes == (5, 6, 7, 8, 9)
    assert a.seeds != b.seeds


def test_tiny_study(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import csv

    from lmclab.data import DeviceDataset
    from lmclab.experiments.zipit import EXPERIMENT, METHODS
    from lmclab.store import Run
    from lmclab.training import load_run_model

    said: list[str] = []
    summary = EXPERIMENT("tiny", out=tmp_path / "out", runs_dir=str(tmp_path / "runs"), progress=False, say=said.append)
    rows = list(csv.DictReader(open(summary["files"]["table"])))
    assert {r["method"] for r in rows} == set(METHODS)
    assert {r["combine"] for r in rows} == {"mean", "concat"}
    assert all(0 <= float(r["value"]) <= 1 for r in rows if "accuracy" in r["metric"])
    levels = {r["zipped_groups"] for r in rows if r["method"] == "zipit"}
    assert levels == {"1", "2"}  # MLP 32-32: two groups, each level evaluated
    summary_rows = list(csv.DictReader(open(summary["files"]["summary"])))
    tiny = EXPERIMENT.load("tiny")
    check_zipit(
        drawn(summary["files"]["figure_mlp_tiny"]),
        [r for r in summary_rows if r["setting"] == "mlp_tiny" and r["combine"] == tiny.combine],
        tasks=tiny.tasks,
        n_test=int(rows[0]["n_test"]),
    )
    assert any("joint acc" in line for line in said)
    # model A's per-task accuracy, recomputed directly from its run
    run_a = next(
        Run(p)
        for p in sorted((tmp_path / "runs").iterdir())
        if (p / "config.json").is_file() and Run(p).config.data.classes == (0, 1, 2, 3, 4)
    )
    model = load_run_model(run_a)
    test = DeviceDataset.load("mnist", "test", subset=500, augment=False, progress=False)
    mask = test.labels < 5
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in test.batches(250)])
    direct = float((logits[mask][:, :5].argmax(1) == test.labels[mask]).double().mean())
    got = next(
        float(r["value"])
        for r in rows
        if r["method"] == "model_a" and r["metric"] == "task_accuracy_0" and r["combine"] == "mean"
    )
    assert got == pytest.approx(direct)


def test_classes_option_refuses_bad_values_and_filters_data() -> None:
    from lmclab.data import DeviceDataset

    with pytest.raises(UsageError, match="0 to 9"):
        RunConfig(data=DataConfig("mnist", classes=(3, 10))).validate()
    data = DeviceDataset.load("mnist", "test", classes=(2, 7), progress=False)
    assert set(data.labels.unique().tolist()) == {2, 7}
    full = DeviceDataset.load("mnist", "test", progress=False)
    assert len(data) == int(((full.labels == 2) | (full.labels == 7)).sum())


def test_cli_classes_flag_exits_2_with_one_line(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from lmclab.cli import main

    for value in ("1,x", "1,1", "0,12"):
        try:
            code = main(["train", "mlp_mnist", "--classes", value, "--runs-dir", str(tmp_path / "r")])
        except SystemExit as exc:
            code = exc.code
        assert code == 2, value
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--classes" in err, err
    assert not (tmp_path / "r").exists()


def test_run_zipit_help_and_bad_preset(capsys) -> None:  # type: ignore[no-untyped-def]
    from lmclab.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
    assert exit_info.value.code == 0
    assert "zipit" in capsys.readouterr().out
    try:
        code = main(["run", "zipit", "--preset", "nope"])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err and "smoke" in err, err


def test_joint_metrics_by_hand() -> None:
    from lmclab.align.zipit import joint_metrics

    # 5 logits, tasks {0, 1} and {3, 4}: class 2 belongs to neither and is never predicted
    za = torch.tensor([[3.0, 1.0, 9.0, 0.0, 0.0], [0.0, 2.0, 9.0, 1.0, 0.0], [1.0, 0.0, 9.0, 0.0, 5.0]])
    zb = torch.tensor([[0.0, 0.0, 9.0, 1.0, 2.0], [0.0, 0.0, 9.0, 3.0, 1.0], [0.0, 0.0, 9.0, 1.0, 2.0]])
    labels = torch.tensor([0, 1, 4])
    m = joint_metrics([za, zb], labels, [(0, 1), (3, 4)])
    # mean: [1.5, .5, _, .5, 1], [0, 1, _, 2, .5], [.5, 0, _, .5, 3.5] -> 0, 3, 4: two of three right
    assert m["mean"].joint_accuracy == pytest.approx(2 / 3)
    # concat: A's logits for 0, 1 and B's for 3, 4: [3, 1, 1, 2], [0, 2, 3, 1], [1, 0, 1, 2] -> 0, 3, 4
    assert m["concat"].joint_accuracy == pytest.approx(2 / 3)
    # per task: task 0 on examples 0, 1 (argmax over classes 0, 1): mean -> 0, 1 (both right)
    assert m["mean"].task_accuracy == (1.0, 1.0)
    assert m["mean"].task_accuracy_mean == 1.0
    logits = torch.tensor([[1.5, 0.5, 0.5, 1.0], [0.0, 1.0, 2.0, 0.5], [0.5, 0.0, 0.5, 3.5]], dtype=torch.float64)
    want = float(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 3])))
    assert m["mean"].joint_loss == pytest.approx(want)
    single = joint_metrics([za], labels, [(0, 1), (3, 4)])
    assert single["mean"] == single["concat"]
    assert single["mean"].joint_accuracy == 1.0  # za alone over {0, 1, 3, 4}: 0, 1, 4
    assert list(m["mean"].to_json()) == [
        "joint_accuracy",
        "joint_loss",
        "task_accuracy_0",
        "task_accuracy_1",
        "task_accuracy_mean",
    ]


def test_resnet_zips_whole_and_refuses_levels_that_cut_the_stream() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=(3, 16, 16), num_classes=10, width=1, norm="batchnorm").eval()
    spec = derive_spec(model, torch.randn(2, 3, 16, 16))
    perm = Permutation.random(spec, torch.Generator().manual_seed(1))
    other = _loaded(model, perm.apply(model.state_dict(), spec))
    result = zipit(model, other, spec, [torch.randn(32, 3, 16, 16)])
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
    for z in head_logits(model, result.heads, x):
        assert torch.allclose(z, want, atol=1e-5)
    with pytest.raises(ZipError, match="zip a prefix"):
        zipit(model, other, spec, [torch.randn(4, 3, 16, 16)], stop=1)
