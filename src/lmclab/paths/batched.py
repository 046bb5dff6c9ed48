"""Many points in parameter space evaluated on a dataset at once: the one home of "evaluate K points".

For a chunk of K points θ_1 … θ_K (each a state dict, or one stacked point whose tensors carry K along
dim 0) and each data batch (x, y), one ``torch.func.functional_call`` under ``torch.func.vmap`` computes
logits_k = f(x; θ_k) for all k; per point the cross-entropy sum (float32 per batch, accumulated in
float64) and the correct count accumulate as :func:`lmclab.training.evaluate` accumulates them for one
model (eval mode; NaN loss and accuracy for a point with non-finite logits). The results equal one point
at a time up to the rounding of the batched matmuls (≈1e-7 relative on the CPU; bf16 autocast on CUDA
as in :func:`~lmclab.training.evaluate`).

BatchNorm statistics per point:
- "none": every point is evaluated in eval mode with its own (stacked) running statistics;
- "reset": the statistics of every point are recomputed under the same vmap, in one pass over
  `bn_data` (batches of 500, or its first `bn_examples`) with the BN layers in train mode and momentum
  1/i at batch i: the cumulative average of :func:`lmclab.paths.reset_bn_stats`, operation for operation.
- REPAIR (per-point hooks whose corrections are folded into the weights) is not batched here: callers
  repair each point with the model itself and evaluate the repaired points here
  (:func:`lmclab.paths.evaluate_path` does).

Chunk size (:func:`default_chunk`): the largest K with K·(S + B·A) ≤ budget, S the bytes of one point,
A the bytes of one example's activations (the outputs of every leaf module, from a forward pass of one
example), B the batch size; the budget is half the free memory of a CUDA device, at most 64 points. On
the CPU the default is 1: there batching measured slower than the loop (bench/path_eval.py, process CPU
time, one thread: 0.7–0.98× for the MLP 784-512×3-10 at K = 2…25, 0.2× for ResNet-20 at K = 5, whose
convolutions become grouped ones with a larger working set). ``chunk=1`` evaluates one point at a time
with the model itself (load_state_dict, :func:`reset_bn_stats`, :func:`evaluate`), no vmap.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from lmclab.data import DeviceDataset
from lmclab.models.attention import exact_attention
from lmclab.paths.normalization import input_batches, reset_bn_stats
from lmclab.points import Point, PointLike
from lmclab.training.evaluate import autocast_for, evaluate
from lmclab.training.packed import vmap_friendly

__all__ = [
    "BATCHED_BN_MODES",
    "activation_bytes",
    "default_chunk",
    "evaluate_points",
    "evaluate_stacked",
    "metric_rows",
    "reset_bn_stats_stacked",
    "stack_points",
]

#: BatchNorm handling available for a batch of points (REPAIR: see the module docstring)
BATCHED_BN_MODES = ("none", "reset")
#: default memory budget of one chunk off CUDA
CPU_BUDGET = 256 * 2**20
#: most points per chunk by default: 1 (no batching) on the CPU, where batching measured slower (see the
#: module docstring)
MOST = {"cpu": 1, "other": 64}
#: examples per batch when recomputing BN statistics (as :func:`lmclab.paths.reset_bn_stats`)
BN_BATCH = 500


def stack_points(points: Sequence[PointLike], like: Mapping[str, torch.Tensor]) -> Point:
    """One stacked point: every tensor of `like` (a state dict) as ``torch.stack([θ_1[k] … θ_K[k]])`` on
    like[k]'s device and dtype (the casts load_state_dict makes). KeyError when a point's tensors are not
    exactly like's."""
    if not points:
        raise ValueError("no points to stack")
    for i, p in enumerate(points):
        if p.keys() != like.keys():
            missing, extra = sorted(set(like) - set(p)), sorted(set(p) - set(like))
            raise KeyError(f"point {i} does not match the model's state: missing {missing}, unexpected {extra}")
    return {k: torch.stack([p[k].detach().to(t.device, t.dtype) for p in points]) for k, t in like.items()}


def _count(stacked: Mapping[str, torch.Tensor]) -> int:
    sizes = {t.shape[0] if t.dim() else -1 for t in stacked.values()}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"a stacked point has one leading dimension K on every tensor, got sizes {sorted(sizes)}")
    return sizes.pop()


def activation_bytes(model: torch.nn.Module, example: torch.Tensor) -> int:
    """Bytes of the outputs of every leaf module for one example (`example`: inputs, batch dim first; the
    first is used), from one forward pass in eval mode. Measured against the resident memory of a vmap'd
    pass without gradients (CPU, K = 4, 200 examples): 5.7× above it for ResNet-20 (the outputs are
    freed as the pass goes), 1.06× for a ViT (whose attention scores are no module's output), 2.2× for the
    MLP."""
    total = 0

    def count(_m: torch.nn.Module, _i: Any, out: Any) -> None:
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def default_chunk(
    model: torch.nn.Module,
    example: torch.Tensor,
    batch_size: int,
    *,
    budget_bytes: int | None = None,
    most: int | None = None,
) -> int:
    """Points per pass: the largest K with K·(S + B·A) ≤ `budget_bytes` (S: bytes of the model's state;
    A: :func:`activation_bytes` of one example; B: `batch_size`), from 1 to `most` (default 1 on the CPU,
    64 on an accelerator). Default budget: half the free memory of a CUDA device, 256 MiB elsewhere."""
    tensors = list(model.state_dict().values())
    device = tensors[0].device if tensors else example.device
    if most is None:
        most = MOST["cpu"] if device.type == "cpu" else MOST["other"]
    if most <= 1:  # nothing to size: skip the measuring forward pass
        return 1
    state = sum(t.numel() * t.element_size() for t in tensors)
    per_point = state + batch_size * activation_bytes(model, example)
    if budget_bytes is None:
        budget_bytes = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else CPU_BUDGET
    return max(1, min(most, budget_bytes // max(per_point, 1)))


def _functional(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` to call with stacked states (global average pools as means: see
    :func:`lmclab.training.packed.vmap_friendly`), in eval mode."""
    return vmap_friendly(copy.deepcopy(model)).eval()


def _batched_forward(base: torch.nn.Module) -> Any:
    def logits_of(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(base, state, (x,))

    return torch.func.vmap(logits_of, in_dims=(0, None))


@torch.no_grad()
def reset_bn_stats_stacked(
    model: torch.nn.Module,
    stacked: Point,
    dataset: DeviceDataset,
    batch_size: int = BN_BATCH,
    max_examples: int | None = None,
) -> None:
    """:func:`lmclab.paths.reset_bn_stats` for every point of `stacked` at once, in place: each BN's
    running mean and variance restart at 0 and 1, then batch i updates them with momentum 1/i (the
    cumulative average over batches) in one vmap'd pass with the BN layers in train mode."""
    _reset_stacked(_functional(model), stacked, dataset, batch_size, max_examples)


def _reset_stacked(
    base: torch.nn.Module, stacked: Point, dataset: DeviceDataset, batch_size: int, max_examples: int | None
) -> None:
    names = {n: m for n, m in base.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}
    if not names:
        return
    for n in names:
        prefix = f"{n}." if n else ""
        stacked[prefix + "running_mean"].zero_()
        stacked[prefix + "running_var"].fill_(1.0)
        stacked[prefix + "num_batches_tracked"].zero_()
    forward = _batched_forward(base)
    momenta = [m.momentum for m in names.values()]
    for m in names.values():
        m.train()
    try:
        with torch.no_grad(), exact_attention():
            for i, x in enumerate(input_batches(dataset, batch_size, max_examples), start=1):
                for m in names.values():
                    m.momentum = 1.0 / i
                forward(stacked, x)
    finally:
        for m, momentum in zip(names.values(), momenta):
            m.momentum = momentum
            m.eval()


@torch.no_grad()
def evaluate_stacked(
    model: torch.nn.Module,
    points: Sequence[PointLike] | Mapping[str, torch.Tensor],
    data: DeviceDataset,
    batch_size: int = 1000,
) -> list[dict[str, float]]:
    """{"loss", "accuracy"} of each of K points on `data` in one pass over it (see the module docstring):
    `points` a sequence of state dicts or one stacked point (K along dim 0 of every tensor)."""
    base = _functional(model)
    stacked = stack_points(points, base.state_dict()) if not isinstance(points, Mapping) else dict(points)
    return _evaluate(base, stacked, data, batch_size)


@torch.no_grad()
def _evaluate(base: torch.nn.Module, stacked: Point, data: DeviceDataset, batch_size: int) -> list[dict[str, float]]:
    k = _count(stacked)
    forward = _batched_forward(base)
    device = data.images.device
    loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
    correct = torch.zeros(k, dtype=torch.int64, device=device)
    finite = torch.ones(k, dtype=torch.bool, device=device)
    with exact_attention():
        for x, y in data.batches(batch_size):
            with autocast_for(device):
                logits = forward(stacked, x)
            for i in range(k):  # float32 sum per batch, as evaluate() takes it
                loss_sum[i] += F.cross_entropy(logits[i].float(), y, reduction="sum").double()
            correct += (logits.argmax(2) == y).sum(1)
            finite &= torch.isfinite(logits).flatten(1).all(1)
    total = len(data)
    return [
        {"loss": loss_sum[i].item() / total, "accuracy": correct[i].item() / total}
        if bool(finite[i])
        else {"loss": math.nan, "accuracy": math.nan}
        for i in range(k)
    ]


def _chunks(points: Iterable[PointLike], size: int) -> Iterator[list[PointLike]]:
    it = iter(points)
    while part := list(itertools.islice(it, size)):
        yield part


def evaluate_points(
    model: torch.nn.Module,
    points: Iterable[PointLike],
    datasets: Mapping[str, DeviceDataset],
    *,
    bn: str = "none",
    bn_data: DeviceDataset | None = None,
    bn_examples: int | None = None,
    chunk: int | None = None,
    budget_bytes: int | None = None,
    batch_size: int = 1000,
    total: int | None = None,
    progress: bool = False,
    desc: str = "points",
    unit: str = "pt",
) -> list[dict[str, dict[str, float]]]:
    """Per point (in order) {split: {"loss", "accuracy"}}: `chunk` points at a time (default
    :func:`default_chunk`, with `budget_bytes`) stacked and evaluated on every split with
    :func:`evaluate_stacked`; `bn` "none" or "reset" (statistics per point from `bn_data`,
    :func:`reset_bn_stats_stacked`). `points` is consumed lazily, one chunk at a time (a generator keeps
    only one chunk in memory; `total` sizes its progress bar). ``chunk=1``: one point at a time with the
    model itself. `model` is only a template: it is copied, never modified."""
    if bn not in BATCHED_BN_MODES:
        raise ValueError(f"bn mode {bn!r} cannot be batched; valid: {', '.join(BATCHED_BN_MODES)}")
    if bn == "reset" and bn_data is None:
        raise ValueError("bn='reset' needs bn_data (the training split) to estimate statistics")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of points, got {chunk}")
    if not datasets:
        raise ValueError("no datasets to evaluate on")
    scratch = copy.deepcopy(model).eval()
    if chunk is None:
        example = next(next(iter(datasets.values())).batches(1))[0]
        sizes = [min(batch_size, len(d)) for d in datasets.values()]  # the largest batch a pass will see
        if bn == "reset":
            sizes.append(min(BN_BATCH, len(bn_data), bn_examples or BN_BATCH))  # type: ignore[arg-type]
        chunk = default_chunk(scratch, example, max(sizes), budget_bytes=budget_bytes)
    if total is None and isinstance(points, Sequence):
        total = len(points)
    out: list[dict[str, dict[str, float]]] = []
    base = _functional(scratch) if chunk > 1 else scratch
    with tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False) as bar:
        for part in _chunks(points, chunk):
            if chunk == 1:
                scratch.load_state_dict(part[0])
                if bn == "reset":
                    reset_bn_stats(scratch, bn_data, max_examples=bn_examples)  # type: ignore[arg-type]
                out.append({s: evaluate(scratch, d, batch_size) for s, d in datasets.items()})
            else:
                stacked = stack_points(part, base.state_dict())
                if bn == "reset":
                    _reset_stacked(base, stacked, bn_data, BN_BATCH, bn_examples)  # type: ignore[arg-type]
                metrics = {s: _evaluate(base, stacked, d, batch_size) for s, d in datasets.items()}
                out += [{s: metrics[s][i] for s in datasets} for i in range(len(part))]
            bar.update(len(part))
    return out


def metric_rows(
    coords: Sequence[Mapping[str, float]], metrics: Sequence[Mapping[str, Mapping[str, float]]]
) -> list[dict[str, Any]]:
    """Tidy rows {**coordinates, split, metric, value} for loss, accuracy and error (= 1 − accuracy): one
    point's coordinates (e.g. {"lambda": λ}, {"u": u, "v": v}) per entry of :func:`evaluate_points`' output."""
    rows: list[dict[str, Any]] = []
    for at, m_at in zip(coords, metrics, strict=True):
        where = {k: float(v) for k, v in at.items()}
        for split, m in m_at.items():
            for metric, value in (("loss", m["loss"]), ("accuracy", m["accuracy"]), ("error", 1.0 - m["accuracy"])):
                rows.append({**where, "split": split, "metric": metric, "value": value})
    return rows
