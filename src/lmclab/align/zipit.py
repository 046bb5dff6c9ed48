"""ZipIt! (Stoica et al., ICLR 2024): merge two models feature by feature, within as well as across models.

Per permutation group of size n, the 2n features of the two models are concatenated, f = [f_A; f_B], and
their correlation matrix C (2n × 2n, over the activations of the group's nodes on the same inputs, pooled
over rows as :mod:`lmclab.align.activation_matching` does) is computed. Greedily, the most correlated pair
(i, j), i ≠ j, of features not yet paired is paired, until all 2n features form n pairs; a pair may lie
within one model (ZipIt's defining choice) or across models. ``alpha`` ∈ [0, 1] caps the pairs within each
model at ⌊α n / 2⌋ (a budget of same-model merges, like the paper's α): α = 1 leaves them free, α = 0 pairs only
across models (a greedy permutation). The caps are equal for both models, so the greedy always completes.
Pair k = (i, j) (i < j; pairs ordered by i, so a pair holding an A feature sits at that feature's place) gives

    merge   M ∈ R^{n × 2n}:  M[k, i] = M[k, j] = ½        (merged feature k = mean of its pair)
    unmerge U ∈ R^{2n × n}:  U[i, k] = U[j, k] = 1        (each feature is read back from its pair)

so that M U = I_n. Writing M = [M_A M_B], U = [U_A; U_B], a layer W (out × in) whose output group is zipped
becomes W* = M_A W_A U_A' + M_B W_B U_B' (U' the unmerge of its input group; the identity where the input
is the network's input), a per-unit vector v* = M_A v_A + M_B v_B.

**Partial zipping.** Only the groups in `groups` are zipped (:func:`zip_prefix`: the spec's groups up to a
chosen one). A tensor whose output axis (axis 0; the only axis of a per-unit vector) carries a zipped group
belongs to the shared *trunk* and is zipped as above; every other tensor belongs to the models' own *heads*:
model m keeps it, with U_m applied on any input axis that carries a zipped group (the unmerge on the input
side of the first unzipped layer). The zipped network is the trunk feeding both heads; it is returned as two
points of the original architecture (:class:`ZipResult` ``heads``) that share the trunk tensors, so head m's
output is f(x; heads[m]) (the trunk computed once per head). Zipping everything leaves as heads only the
tensors with no group on their output axis (a classifier's last layer).

**Supported specs** (checked, a :class:`ZipError` otherwise; nothing is zipped partly): every axis of a
zipped group is axis 0 of its tensor (output axis, or a per-unit vector: bias, norm weights, BN statistics)
or axis 1 of a tensor of rank ≥ 2 (input axis of a Linear or Conv layer; `block` > 1 allowed there, as in a
conv → flatten → linear), covers the whole axis (no channel-concatenation slices, ``offset`` 0), and a trunk
tensor reads only zipped groups (the trunk is closed under its inputs: a residual stream can only be zipped
together with every block that writes to it). MLPs, plain conv nets (VGG) and fully zipped ResNets fit;
grouped / depthwise convolutions and transposed convolutions are not detectable from a spec and must not
be given. Norm statistics are averaged like every per-unit vector (reset BatchNorm statistics afterwards);
LayerNorm over zipped features and within-model merges are not exact (ZipIt is not function preserving).
Two models only: more are refused.

A model zipped with a permuted copy of itself pairs each feature with its copy and returns the model
exactly; see tests/test_zipit.py. Except dead units: a feature constant on the correlation data (a dead
ReLU) correlates 0 with every feature, so dead units are paired among themselves in index order (as
activation matching matches them arbitrarily); the zipped model then agrees on that data, not necessarily
elsewhere. Use enough data that live units are not mistaken for dead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmclab.align.activation_matching import ActivationStats, collect_activations, model_device
from lmclab.permutation.spec import PermutationSpec, SpecError
from lmclab.points import Point, PointLike

__all__ = [
    "COMBINE_RULES",
    "JointMetrics",
    "ZipError",
    "ZipMatch",
    "ZipResult",
    "apply_zip",
    "combine_heads",
    "greedy_pairs",
    "head_logits",
    "joint_metrics",
    "zip_correlations",
    "zip_matrices",
    "zip_matches",
    "zip_prefix",
    "zipit",
]

#: How the heads' logits make one joint prediction (:func:`combine_heads`).
COMBINE_RULES: tuple[str, ...] = ("mean", "concat")


class ZipError(SpecError):
    """A spec, a group choice or models that ZipIt does not support (said, never zipped partly)."""


@dataclass(frozen=True)
class ZipMatch:
    """One group's pairing of its 2n concatenated features ([A's n; B's n]) into n merged features.

    ``pairs[k] = (i, j)``, i < j, indices into the concatenation, ordered by i; ``merge`` (n × 2n) and
    ``unmerge`` (2n × n) as in the module docstring; ``within`` counts the pairs inside one model."""

    name: str
    size: int
    pairs: torch.Tensor
    merge: torch.Tensor
    unmerge: torch.Tensor
    within: int
    mean_correlation: float

    def merge_of(self, m: int) -> torch.Tensor:
        """M_m (n × n): the columns of M for model m's features."""
        return self.merge[:, m * self.size : (m + 1) * self.size]

    def unmerge_of(self, m: int) -> torch.Tensor:
        """U_m (n × n): the rows of U for model m's features."""
        return self.unmerge[m * self.size : (m + 1) * self.size]


@dataclass(frozen=True)
class ZipResult:
    """Two models zipped over `zipped` groups: `heads[m]` is model m's path through the network (trunk shared,
    then its own head) as a point of the original architecture. `trunk` / `head_tensors` name the tensors
    of each part; `matches` the pairing of each zipped group."""

    zipped: tuple[str, ...]
    heads: tuple[Point, Point]
    trunk: tuple[str, ...]
    head_tensors: tuple[str, ...]
    matches: Mapping[str, ZipMatch]
    info: Mapping[str, Any] = field(default_factory=dict)


def zip_matrices(
    pairs: torch.Tensor, size: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, U) of n = `size` pairs over 2n features: M[k, i] = M[k, j] = ½, U[i, k] = U[j, k] = 1 for pair k."""
    if pairs.shape != (size, 2):
        raise ZipError(f"pairs must have shape ({size}, 2), got {tuple(pairs.shape)}")
    flat = pairs.reshape(-1)
    if not torch.equal(flat.sort().values, torch.arange(2 * size)):
        raise ZipError(f"pairs must use each of the {2 * size} features exactly once")
    rows = torch.arange(size).repeat_interleave(2)
    merge = torch.zeros(size, 2 * size, dtype=dtype)
    merge[rows, flat] = 0.5
    unmerge = torch.zeros(2 * size, size, dtype=dtype)
    unmerge[flat, rows] = 1.0
    return merge, unmerge


def greedy_pairs(corr: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """Pair the 2n features greedily by correlation: repeatedly the most correlated pair (i, j), i ≠ j, of
        features both unpaired (ties: the lower (i, j)), skipping a pair within one half once that half has
    ⌊α n / 2⌋ pairs (α = 0: only pairs across the halves).
        Returns (n, 2) int64, each row (i, j) with i < j, rows sorted by i."""
    total = corr.shape[0]
    if corr.ndim != 2 or corr.shape[1] != total or total % 2:
        raise ZipError(f"the correlation matrix must be square of even size, got {tuple(corr.shape)}")
    n = total // 2
    i, j = torch.triu_indices(total, total, offset=1)
    if not 0.0 <= alpha <= 1.0:
        raise ZipError(f"alpha must lie in [0, 1], got {alpha}")
    cap = int(alpha * n / 2)
    if cap == 0:
        cross = (i < n) & (j >= n)
        i, j = i[cross], j[cross]
    values = corr.detach().double().cpu()[i, j]
    values = torch.nan_to_num(values, nan=-torch.inf)
    order = torch.sort(-values, stable=True).indices  # descending, ties in (i, j) order
    used = [False] * total
    inside = [0, 0]  # pairs within A, within B
    pairs: list[tuple[int, int]] = []
    for a, b in zip(i[order].tolist(), j[order].tolist()):
        if used[a] or used[b]:
            continue
        half = int(a >= n)
        if half == int(b >= n):
            if inside[half] >= cap:
                continue
            inside[half] += 1
        used[a] = used[b] = True
        pairs.append((a, b))
        if len(pairs) == n:
            break
    return torch.tensor(sorted(pairs), dtype=torch.int64).reshape(n, 2)


def zip_correlations(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    batches: Iterable[Any],
    *,
    groups: Sequence[str] | None = None,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per group, the 2n × 2n correlation matrix of [f_A; f_B] (float64, :func:`_correlation`) over the rows of
    its activation nodes (both models in eval mode, no gradients, on the same inputs; `batches` as for
    activation matching)."""
    names = list(groups) if groups is not None else spec.names
    chosen = [spec.group(g) for g in names]
    missing = [g.name for g in chosen if not g.activations]
    if missing:
        raise ZipError(f"groups without activation nodes cannot be zipped: {missing}")
    nodes = sorted({n for g in chosen for n in g.activations})
    stats = {g.name: ActivationStats(2 * g.size, model_device(model_a)) for g in chosen}

    def update(acts_a: Mapping[str, torch.Tensor], acts_b: Mapping[str, torch.Tensor]) -> None:
        for g in chosen:
            for node in g.activations:
                both = torch.cat([acts_a[node], acts_b[node]], dim=1)
                stats[g.name].update(both, both)

    used = collect_activations(model_a, model_b, batches, nodes, update, max_batches=max_batches)
    if used == 0:
        raise ZipError("ZipIt got no batches to correlate features on")
    return {name: _correlation(s) for name, s in stats.items()}


def _correlation(stats: ActivationStats, rtol: float = 1e-10) -> torch.Tensor:
    """corr_ij = C_ij / (σ_i σ_j) from the covariance C of the pooled rows, σ² = diag C (one reduction for
    all entries, so that a feature and its exact copy correlate 1 to rounding, whatever its scale); a feature
    whose variance is below `rtol` × its mean square (constant: a dead unit) correlates 0 with every other."""
    n = stats.n
    mean = stats.sa / n
    cov = stats.sab / n - torch.outer(mean, mean)
    var = cov.diagonal().clamp_min(0)
    live = var > rtol * (stats.saa / n)
    sd = torch.where(live, var.sqrt(), torch.ones_like(var))
    corr = cov / torch.outer(sd, sd)
    return torch.where(torch.outer(live, live), corr, torch.zeros_like(corr))


def zip_matches(
    correlations: Mapping[str, torch.Tensor], spec: PermutationSpec, *, alpha: float = 1.0
) -> dict[str, ZipMatch]:
    """A :class:`ZipMatch` per group of `correlations` (:func:`greedy_pairs`, :func:`zip_matrices`)."""
    out: dict[str, ZipMatch] = {}
    for name, corr in correlations.items():
        size = spec.group(name).size
        if corr.shape != (2 * size, 2 * size):
            raise ZipError(f"group {name}: correlation matrix {tuple(corr.shape)} is not {2 * size} × {2 * size}")
        pairs = greedy_pairs(corr, alpha=alpha)
        merge, unmerge = zip_matrices(pairs, size)
        same = (pairs[:, 0] < size) == (pairs[:, 1] < size)
        matched = corr.detach().double().cpu()[pairs[:, 0], pairs[:, 1]]
        out[name] = ZipMatch(name, size, pairs, merge, unmerge, int(same.sum()), float(matched.mean()))
    return out


def zip_prefix(spec: PermutationSpec, stop: str | int | None = None) -> tuple[str, ...]:
    """The groups to zip: every group (``stop`` None), the first `stop` groups of the spec (an int ≥ 1), or
    the groups up to and including the one named `stop` (the spec lists groups in graph order)."""
    names = spec.names
    if stop is None:
        return tuple(names)
    if isinstance(stop, int):
        if not 1 <= stop <= len(names):
            raise ZipError(f"zip up to group number {stop}: the spec has groups 1…{len(names)}")
        return tuple(names[:stop])
    if stop not in names:
        raise ZipError(f"zip up to {stop!r}: no such group; groups: {', '.join(names)}")
    return tuple(names[: names.index(stop) + 1])


def _apply_axis(t: torch.Tensor, axis: int, mat: torch.Tensor, block: int) -> torch.Tensor:
    """`mat` (new × old units) applied to axis `axis` of `t`, whose units own `block` consecutive entries."""
    x = t.movedim(axis, 0)
    rest = x.shape[1:]
    y = mat.to(t.device, t.dtype) @ x.reshape(mat.shape[1], -1)
    return y.reshape(mat.shape[0] * block, *rest).movedim(0, axis)


def _roles(
    spec: PermutationSpec, params: PointLike, zipped: Sequence[str]
) -> tuple[list[str], list[str], dict[str, list[tuple[str, int, int]]]]:
    """(trunk tensors, head tensors, tensor -> [(group, axis, block)] of its zipped axes); ZipError if the
    spec or the choice of groups is not supported (module docstring)."""
    chosen = set(zipped)
    by_tensor = spec.axes_by_tensor()
    problems: list[str] = []
    trunk, heads = [], []
    axes: dict[str, list[tuple[str, int, int]]] = {}
    for name in params:
        refs = by_tensor.get(name, [])
        ndim = params[name].ndim
        out_zipped = False
        for group, ax in refs:
            if group not in chosen:
                continue
            if ax.offset != 0:
                problems.append(f"{name}: group {group} covers a slice of axis {ax.axis} (a concatenation)")
            elif ndim == 1 and ax.axis == 0 or ax.axis == 0 and ax.block == 1:
                out_zipped = True
            elif ax.axis == 1 and ndim >= 2:
                pass
            else:
                problems.append(f"{name}: group {group} on axis {ax.axis} (block {ax.block}) of a rank-{ndim} tensor")
            axes.setdefault(name, []).append((group, ax.axis, ax.block))
        if out_zipped:
            unzipped = sorted({g for g, ax in refs if g not in chosen})
            if unzipped:
                problems.append(
                    f"{name}: its output group is zipped but it reads group(s) {', '.join(unzipped)}, which are not "
                    "(zip a prefix of the network: every group a zipped layer reads must be zipped too)"
                )
            trunk.append(name)
        else:
            heads.append(name)
    if problems:
        raise ZipError("cannot zip groups " + ", ".join(zipped) + ":\n  " + "\n  ".join(problems))
    return trunk, heads, axes


def apply_zip(
    theta_a: PointLike,
    theta_b: PointLike,
    spec: PermutationSpec,
    matches: Mapping[str, ZipMatch],
    groups: Sequence[str] | None = None,
) -> ZipResult:
    """Zip θ_A and θ_B over `groups` (default: every group of `matches`) with the pairings `matches`.

    Trunk tensor t* = Σ_m t_m ×_out M_m ×_in U_mᵀ (per-unit vectors: Σ_m M_m v_m); head tensor of model m:
    t_m ×_in U_mᵀ on its zipped input axes, else t_m unchanged (module docstring)."""
    zipped = tuple(groups) if groups is not None else tuple(matches)
    lacking = [g for g in zipped if g not in matches]
    if lacking:
        raise ZipError(f"no pairing for group(s) {lacking}")
    if set(theta_a) != set(theta_b):
        raise ZipError(f"the two points differ in tensors: {sorted(set(theta_a) ^ set(theta_b))}")
    spec.check(theta_a)
    spec.check(theta_b)
    trunk, head_names, axes = _roles(spec, theta_a, zipped)
    points = (theta_a, theta_b)

    def through(name: str, m: int) -> torch.Tensor:
        t = points[m][name]
        for group, axis, block in axes.get(name, []):
            match = matches[group]
            if axis == 0:
                t = _apply_axis(t, 0, match.merge_of(m), block)
            else:
                t = _apply_axis(t, axis, match.unmerge_of(m).T, block)
        return t

    shared = {name: through(name, 0) + through(name, 1) for name in trunk}
    heads = tuple({**shared, **{name: through(name, m) for name in head_names}} for m in (0, 1))
    info = {
        "within_pairs": {g: matches[g].within for g in zipped},
        "mean_correlation": {g: matches[g].mean_correlation for g in zipped},
    }
    return ZipResult(zipped, (heads[0], heads[1]), tuple(trunk), tuple(head_names), dict(matches), info)


def zipit(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    batches: Iterable[Any],
    *,
    stop: str | int | None = None,
    alpha: float = 1.0,
    max_batches: int | None = None,
) -> ZipResult:
    """ZipIt! of two models: correlate the features of the groups up to `stop` (:func:`zip_prefix`) on
    `batches`, pair them (:func:`zip_matches`) and zip the models (:func:`apply_zip`)."""
    groups = zip_prefix(spec, stop)
    _roles(spec, model_a.state_dict(), groups)  # refuse an unsupported choice before any data is read
    corr = zip_correlations(model_a, model_b, spec, batches, groups=groups, max_batches=max_batches)
    matches = zip_matches(corr, spec, alpha=alpha)
    return apply_zip(model_a.state_dict(), model_b.state_dict(), spec, matches, groups)


def head_logits(model: nn.Module, heads: Sequence[PointLike], x: torch.Tensor) -> list[torch.Tensor]:
    """Each head's output f(x; heads[m]) with `model` (an instance of the architecture, left unchanged)."""
    out = []
    with torch.no_grad():
        for point in heads:
            out.append(torch.func.functional_call(model, dict(point), (x,)))
    return out


def combine_heads(
    logits: Sequence[torch.Tensor], rule: str = "mean", tasks: Sequence[Sequence[int]] | None = None
) -> torch.Tensor:
    """One joint prediction over all classes from the heads' logits (each of all classes):

    ``mean``: the mean of the heads' logits (the heads share the output space, as ZipIt's heads do; for a
    linear last layer this is the model whose last layer is the mean of the heads'); ``concat``: class c
    takes the logit of the head whose task (`tasks[m]`, disjoint class lists) holds c."""
    if rule not in COMBINE_RULES:
        raise ValueError(f"unknown rule {rule!r}; valid: {', '.join(COMBINE_RULES)}")
    if rule == "mean":
        return torch.stack(list(logits)).mean(0)
    if tasks is None or len(tasks) != len(logits):
        raise ValueError("rule 'concat' needs one class list per head (tasks)")
    joint = torch.full_like(logits[0], -torch.inf)
    for z, task in zip(logits, tasks):
        idx = torch.as_tensor(list(task), dtype=torch.int64, device=z.device)
        joint[:, idx] = z[:, idx]
    return joint


@dataclass(frozen=True)
class JointMetrics:
    """A joint prediction scored on the joint task and on each task (:func:`joint_metrics`).

    ``joint_accuracy`` / ``joint_loss``: argmax / cross-entropy over the joint task's classes (the union of
    the tasks) on every example; ``task_accuracy[t]``: on the examples of task t, argmax over task t's
    classes (ZipIt's per-task accuracy); ``task_accuracy_mean``: their mean."""

    joint_accuracy: float
    joint_loss: float
    task_accuracy: tuple[float, ...]
    task_accuracy_mean: float

    def to_json(self) -> dict[str, float]:
        """{joint_accuracy, joint_loss, task_accuracy_0, …, task_accuracy_mean}."""
        return {
            "joint_accuracy": self.joint_accuracy,
            "joint_loss": self.joint_loss,
            **{f"task_accuracy_{t}": a for t, a in enumerate(self.task_accuracy)},
            "task_accuracy_mean": self.task_accuracy_mean,
        }


def joint_metrics(
    heads: Sequence[torch.Tensor], labels: torch.Tensor, tasks: Sequence[Sequence[int]]
) -> dict[str, JointMetrics]:
    """{rule: :class:`JointMetrics`} of the heads' logits combined by each rule of :data:`COMBINE_RULES`
    (:func:`combine_heads`); one head: its own logits for every rule."""

    def restricted(
        joint: torch.Tensor, classes: Sequence[int], mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of `classes` on the examples `mask`, their labels as positions in `classes`)."""
        idx = torch.as_tensor(list(classes), dtype=torch.int64, device=labels.device)
        hit = labels[mask][:, None] == idx[None, :]
        return joint[mask][:, idx], torch.where(hit.any(1), hit.int().argmax(1), -1)

    union = sorted({c for t in tasks for c in t})
    out: dict[str, JointMetrics] = {}
    for rule in COMBINE_RULES:
        joint = heads[0] if len(heads) == 1 else combine_heads(heads, rule, tasks)
        logits, target = restricted(joint, union, torch.ones_like(labels, dtype=torch.bool))
        if bool((target < 0).any()):
            raise ValueError(f"labels outside the joint task's classes {union}")
        per_task = []
        for task in tasks:
            mask = torch.isin(labels, torch.as_tensor(list(task), dtype=torch.int64, device=labels.device))
            task_logits, task_target = restricted(joint, task, mask)
            per_task.append(float((task_logits.argmax(1) == task_target).double().mean()))
        out[rule] = JointMetrics(
            joint_accuracy=float((logits.argmax(1) == target).double().mean()),
            joint_loss=float(F.cross_entropy(logits.double(), target)),
            task_accuracy=tuple(per_task),
            task_accuracy_mean=sum(per_task) / len(per_task),
        )
    return out
