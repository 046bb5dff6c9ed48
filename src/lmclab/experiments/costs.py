"""What a step of an experiment graph costs: its work (device-independent sizes) and the seconds that work
takes on a device profile, for `lmclab run X --preset P --plan --on PROFILE`.

`step_work(step)` reads a step's config (and the `train` steps among its inputs) into a :class:`Work`: optimizer
steps × batch of training, examples through a forward pass only (evaluation, BN reset), forward+backward
equivalents outside training (Hessian-vector products ≈ 2.2, an order-k nested-forward derivative
≈ 5.5 · 2^(k−2) gradients per example), linear assignment problems (weight matching) and models loaded. A
kind without a cost model here, or a step whose model or data it cannot size, gives the reason instead:
listed as unknown by the plan, never counted as zero.

`DeviceProfile.seconds(work)` turns work into seconds with one model of a training step,

    t(batch) = floor · layers/43 + batch · c,   c = 3 · forward FLOPs / R   (seconds per example),

a launch-bound floor per optimizer step (scaled by the model's parameter-holding layers, ResNet-20 has 43) plus
compute at an effective rate R. A model with a measured row in the profile's table (`Throughput`) uses its
measured per-example time instead of the FLOP rate. Each number says where it comes from
(`Throughput.source`, `DeviceProfile.notes`): measured, fitted to measurements, or assumed.

Profiles: `h100` (DESIGN.md's "Measured facts": a plain ResNet-20 BN loop on one H100, bf16, batch 256; the
floor and R fitted to its five widths) and `cpu` (this machine: DESIGN.md's ≈ 300 img/s for ResNet-20 ×1 on
the 2-core CPU, and per model the end-to-end throughput of `train` steps this host stored, when there are any).
lmclab's own trainer has not been timed on a GPU yet (issue 13 item 3), so `h100` estimates what a plain loop
at DESIGN.md's speed would take. A packed run (`--pack`) is estimated as the sum of its members: no pack
speed-up has been measured yet.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Protocol

import torch
from torch.utils.flop_counter import FlopCounterMode

from lmclab.config import RunConfig
from lmclab.data.registry import STATIC_INFO, normalise_name
from lmclab.store import Store
from lmclab.training import init_model


class StepLike(Protocol):
    """What the cost model reads of a step (`lmclab.experiments.graph.Step`)."""

    @property
    def kind(self) -> str: ...
    @property
    def config(self) -> Mapping[str, Any]: ...
    @property
    def inputs(self) -> Mapping[str, Any]: ...


#: Examples per split of the registered datasets (their published sizes).
SPLIT_SIZES: dict[str, dict[str, int]] = {
    "mnist": {"train": 60_000, "test": 10_000},
    "fashion_mnist": {"train": 60_000, "test": 10_000},
    "cifar10": {"train": 50_000, "test": 10_000},
    "cifar100": {"train": 50_000, "test": 10_000},
}

#: Parameter-holding layers of ResNet-20 (the model the launch-bound floor was measured on).
REFERENCE_LAYERS = 43
#: An order-k nested-forward derivative of the loss (or of all logits) per example, in gradients: 5.5 at
#: order 2 (DESIGN.md, ResNet-20 ×1, the upper end; 2.8 at ×32), doubling per order (assumed: one more
#: nesting level doubles the work); order 1 ≈ one gradient (assumed).
DERIVATIVE_ORDER2_GRADIENTS = 5.5
#: A Hessian-vector product per example, in gradients (DESIGN.md: double backward 2.2× at ×1–×4).
HVP_GRADIENTS = 2.2
#: Weight matching: sweeps over the permutation groups (assumed; the solver stops earlier once no group
#: changes), one linear assignment problem per group and sweep.
MATCHING_SWEEPS = 20


#: Examples per forward batch of evaluation (`RunOptions.eval_batch_size`; assumed for path evaluation too).
EVAL_BATCH = 1000


def forward_floors(examples: float, batch: int = EVAL_BATCH) -> float:
    """Launch-bound floors of `examples` forward passes in batches of `batch`: a third of a step each (assumed)."""
    return math.ceil(examples / batch) / 3


def derivative_gradients(order: int) -> float:
    """Gradients per example of an order-`order` nested-forward derivative (see DERIVATIVE_ORDER2_GRADIENTS)."""
    return 1.0 if order <= 1 else DERIVATIVE_ORDER2_GRADIENTS * 2.0 ** (order - 2)


# ------------------------------------------------------------------------------------------ model sizes


@dataclass(frozen=True)
class ModelCost:
    """The size of a model on its data: `forward_flops` of one example's forward pass (torch's FLOP counter
    on the meta device: 2 per multiply-add, convolutions and matrix products), `layers` (modules holding
    parameters: kernels launched per step grow with them) and the widths of its hidden layers (`groups`:
    out-features / out-channels of every linear and convolution but the last; weight matching permutes
    at most these)."""

    name: str
    image: str
    forward_flops: float
    layers: int
    groups: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.name} on {self.image}"


def model_name(run: RunConfig) -> str:
    """`resnet20 ×4 layernorm`, `mlp 512-512-512`: the model's name and size options."""
    m = run.normalised().model
    parts = [m.model]
    if m.hidden is not None:
        parts.append("-".join(map(str, m.hidden)))
    if m.width is not None:
        parts.append(f"×{m.width}")
    for name in ("dim", "depth", "heads", "patch"):
        if getattr(m, name) is not None:
            parts.append(f"{name} {getattr(m, name)}")
    if m.norm not in (None, "none"):
        parts.append(str(m.norm))
    return " ".join(parts)


def model_cost(run: RunConfig) -> ModelCost:
    """The size of `run`'s model on its dataset (built on the meta device: no memory, no data read).
    ValueError if its dataset is not a registered one (an image folder's shape is known only once read)."""
    if normalise_name(run.data.dataset) not in STATIC_INFO:  # before normalising: that reads an image folder
        raise ValueError(
            f"dataset {run.data.dataset}: not a registered dataset, its image size is unknown before it is read"
        )
    model = {k: v for k, v in run.normalised().to_dict()["model"].items() if v is not None}
    return _model_cost(json.dumps(model, sort_keys=True), run.data.dataset)


@lru_cache(maxsize=256)
def _model_cost(model_json: str, dataset: str) -> ModelCost:
    info = STATIC_INFO.get(normalise_name(dataset))
    if info is None:
        raise ValueError(f"dataset {dataset}: not a registered dataset, its image size is unknown before it is read")
    run = RunConfig.from_dict({"data": {"dataset": dataset}, "model": json.loads(model_json)})
    with torch.device("meta"):
        net = init_model(run, info)
        x = torch.zeros(1, *info.input_shape)
        with FlopCounterMode(display=False) as counter:
            net(x)
    layers = sum(1 for m in net.modules() if any(True for _ in m.parameters(recurse=False)))
    widths = [
        int(m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels)
        for m in net.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    image = "×".join(map(str, info.input_shape))
    return ModelCost(model_name(run), image, float(counter.get_total_flops()), layers, tuple(widths[:-1]))


def split_examples(run: RunConfig, split: str, examples: int | None = None) -> int:
    """Examples a step evaluates on `split` of `run`'s dataset: `examples` (a stratified subset) or the split."""
    sizes = SPLIT_SIZES.get(normalise_name(run.data.dataset))
    if sizes is None:
        raise ValueError(f"dataset {run.data.dataset}: its split sizes are unknown")
    return sizes[split] if examples is None else min(int(examples), sizes[split])


def training_examples(run: RunConfig) -> int:
    """The size of `run`'s training set: the train split, its `classes`, then `train_subset` / `train_per_class`."""
    d = run.data
    sizes = SPLIT_SIZES.get(normalise_name(d.dataset))
    info = STATIC_INFO.get(normalise_name(d.dataset))
    if sizes is None or info is None:
        raise ValueError(f"dataset {d.dataset}: its split sizes are unknown")
    classes = len(d.classes) if d.classes is not None else info.num_classes
    n = sizes["train"] * classes // info.num_classes
    if d.train_subset is not None:
        n = min(n, d.train_subset)
    if d.train_per_class is not None:
        n = min(n, d.train_per_class * classes)
    return n


def test_set_size(run: RunConfig) -> int:
    """The test set a run is evaluated on (its `classes` only)."""
    d = run.data
    sizes, info = SPLIT_SIZES[normalise_name(d.dataset)], STATIC_INFO[normalise_name(d.dataset)]
    classes = len(d.classes) if d.classes is not None else info.num_classes
    return sizes["test"] * classes // info.num_classes


# ------------------------------------------------------------------------------------------ work of a step


@dataclass(frozen=True)
class Work:
    """What one step computes, whatever the device: `train_steps` optimizer steps of `batch_size`, examples
    through a forward pass only (`forward_examples`: evaluation, BN reset), forward+backward equivalents
    outside training (`gradient_examples`: HVPs, derivatives), launch-bound floors outside training (`floors`,
    in training steps: a forward batch is a third of one, an order-2 derivative batch 5.5), linear assignment
    problems (`assignments`: (size n, how many)), `starts` trainings started (data loaded, model built) and
    `runs` stored models loaded."""

    model: ModelCost
    train_steps: int = 0
    batch_size: int = 0
    forward_examples: float = 0.0
    gradient_examples: float = 0.0
    floors: float = 0.0
    assignments: tuple[tuple[int, int], ...] = ()
    starts: int = 0
    runs: int = 0

    @property
    def train_examples(self) -> int:
        return self.train_steps * self.batch_size


def run_of(step: StepLike) -> RunConfig:
    """The run config of the first `train` step among `step`'s inputs (inputs in name order, depth first)."""
    if step.kind == "train":
        return RunConfig.from_dict(step.config["run"])
    for name in sorted(step.inputs):
        try:
            return run_of(step.inputs[name])
        except LookupError:
            continue
    raise LookupError(f"step {step.kind}: no train step among its inputs, its model is unknown")


def steps_per_epoch(run: RunConfig) -> int:
    """Optimizer steps in one epoch of `run`: ⌈training examples / batch size⌉."""
    return math.ceil(training_examples(run) / run.train.batch_size)


def train_steps(run: RunConfig) -> int:
    """Optimizer steps `train` takes for `run` (a forked child: from its fork point on)."""
    spe = steps_per_epoch(run)
    total = run.train.steps if run.train.steps is not None else run.train.epochs * spe
    fork = run.fork
    start = 0 if not fork.is_set else (fork.step if fork.step is not None else int(fork.epoch or 0) * spe)
    return max(0, total - start)


def _train(step: StepLike) -> Work:
    """Training, then the final evaluation (test, then train and test: `training.loop`)."""
    run = run_of(step)
    return Work(
        model_cost(run),
        train_steps=train_steps(run),
        batch_size=run.train.batch_size,
        forward_examples=training_examples(run) + 2 * test_set_size(run),
        floors=forward_floors(training_examples(run)) + 2 * forward_floors(test_set_size(run)),
        starts=1,
    )


def _align(step: StepLike) -> Work | str:
    if step.config.get("method") != "weight":
        return f"align method {step.config.get('method')}: no cost model (only weight matching has one)"
    cost = model_cost(run_of(step))
    return Work(cost, assignments=_lap_sweeps(cost), runs=2)


def _population_align(step: StepLike) -> Work | str:
    """naive: the K members loaded; pairwise: K − 1 weight matchings to the first. Other methods (MergeMany's
    rounds, STE-MM's training, C2M3's Frank–Wolfe iterations) have no cost model yet."""
    method, k = step.config.get("method"), _members(step)
    if method not in ("naive", "pairwise"):
        return f"population_align method {method}: no cost model (naive and pairwise have one)"
    cost = model_cost(run_of(step))
    return Work(cost, assignments=_lap_sweeps(cost, pairs=k - 1) if method == "pairwise" else (), runs=k)


def _pairwise_cycle(step: StepLike) -> Work:
    """Weight matching of every pair of the K members (the cycle errors themselves are cheap)."""
    k, cost = _members(step), model_cost(run_of(step))
    return Work(cost, assignments=_lap_sweeps(cost, pairs=k * (k - 1) // 2), runs=k)


def _lap_sweeps(cost: ModelCost, pairs: int = 1) -> tuple[tuple[int, int], ...]:
    """MATCHING_SWEEPS × one assignment per hidden layer (an upper bound on the groups), for `pairs` pairs."""
    counts: dict[int, int] = {}
    for n in cost.groups:
        counts[n] = counts.get(n, 0) + MATCHING_SWEEPS * pairs
    return tuple(sorted(counts.items()))


def _path(step: StepLike) -> Work:
    """`points` λ on one split; BN reset adds a pass over as many training examples per point."""
    run, c = run_of(step), step.config
    n = split_examples(run, c["split"], c.get("examples"))
    bn = split_examples(run, "train", c.get("examples")) if c.get("bn", "none") not in (None, "none") else 0
    return Work(
        model_cost(run), forward_examples=c["points"] * (n + bn), floors=c["points"] * forward_floors(n + bn), runs=2
    )


def _width_path(step: StepLike) -> Work:
    run, c = run_of(step), step.config
    n = sum(split_examples(run, s, c.get("examples")) for s in c["splits"])
    corr = split_examples(run, "train", c.get("correction_examples")) if c.get("correction", "none") != "none" else 0
    return Work(
        model_cost(run),
        forward_examples=c["points"] * (n + corr),
        floors=c["points"] * forward_floors(n + corr),
        runs=2,
    )


def _loss_derivatives(step: StepLike) -> Work:
    run, c = run_of(step), step.config
    n, g = split_examples(run, c["split"], c.get("examples")), derivative_gradients(int(c["order"]))
    batches = math.ceil(n / int(c.get("batch_size", 50)))
    return Work(model_cost(run), gradient_examples=n * g, floors=batches * g, runs=2)


def _logits(step: StepLike) -> Work:
    """All logits' coefficients at both ends (order `order`) and the true logits at `points` λ."""
    run, c = run_of(step), step.config
    n, g = split_examples(run, c["split"], c.get("examples")), derivative_gradients(int(c["order"]))
    return Work(
        model_cost(run),
        gradient_examples=2 * n * g,
        forward_examples=c["points"] * n,
        floors=2 * math.ceil(n / EVAL_BATCH) * g + c["points"] * forward_floors(n),
        runs=2,
    )


def _members(step: StepLike) -> int:
    return sum(1 for name in step.inputs if name.startswith("m"))


def _bn_examples(run: RunConfig, cost: ModelCost, config: Mapping[str, Any]) -> int:
    """Training examples of a BN reset at each evaluated point (BN models by default, or `bn: reset`)."""
    bn = config.get("bn") or ("reset" if "batchnorm" in cost.name else "none")
    return split_examples(run, "train", config.get("bn_examples")) if bn == "reset" else 0


def _population_eval(step: StepLike) -> Work:
    """The merged model and K members on each split, and K(K−1)/2 + K paths (pairs, member → merged)."""
    run, c = run_of(step), step.config
    cost, k = model_cost(run), _members(step)
    n = sum(split_examples(run, s, c.get("examples")) for s in c["splits"])
    points = (k + 1) + (k * (k - 1) // 2 + k) * c["points"]
    m = n + _bn_examples(run, cost, c)
    return Work(cost, forward_examples=points * m, floors=points * forward_floors(m), runs=k)


def _merged_trace(step: StepLike) -> Work:
    """Plain and scale-aware Hutchinson traces: 2 × probes HVPs over the examples."""
    run, c = run_of(step), step.config
    cost = model_cost(run)
    n, bn = split_examples(run, c["split"], c.get("examples")), _bn_examples(run, cost, c)
    batches = math.ceil(n / int(c.get("batch_size", 50)))
    return Work(
        cost,
        gradient_examples=2 * c["probes"] * n * HVP_GRADIENTS,
        forward_examples=bn,
        floors=2 * c["probes"] * batches * HVP_GRADIENTS + forward_floors(bn),
        runs=_members(step),
    )


def _singh_segments(step: StepLike) -> Work:
    """Segments between the siblings at every `every`-th child epoch (fork and end included), `points` each."""
    run, c = run_of(step), step.config
    cost = model_cost(run)
    segments = math.ceil(_child_epochs(run) / max(1, int(c.get("every", 1)))) + 1
    n = split_examples(run, "train", c.get("examples")) + _bn_examples(run, cost, c)
    return Work(
        cost,
        forward_examples=segments * c["points"] * n,
        floors=segments * c["points"] * forward_floors(n),
        runs=2 * segments,
    )


def _child_epochs(run: RunConfig) -> int:
    """Epochs a (forked) run trains: from its fork point to the end."""
    return math.ceil(train_steps(run) / steps_per_epoch(run))


def _singh_geometry(step: StepLike) -> Work:
    """Both siblings' checkpoints at every child epoch (fork and end included) loaded; distances and angles."""
    return Work(model_cost(run_of(step)), runs=2 * (_child_epochs(run_of(step)) + 1))


def _singh_prediction(step: StepLike) -> Work:
    """Prop. 1: dᵀHd at both final siblings (one HVP pass over the examples each, assumed) and the measured
    curve at `points` (BN models: again with BN reset)."""
    run, c = run_of(step), step.config
    cost = model_cost(run)
    n = split_examples(run, "train", c.get("examples"))
    forward = c["points"] * n + (c["points"] * (n + _bn_examples(run, cost, c)) if "batchnorm" in cost.name else 0)
    batches = math.ceil(n / int(c.get("batch_size", 100)))
    return Work(
        cost,
        gradient_examples=2 * n * HVP_GRADIENTS,
        forward_examples=forward,
        floors=2 * batches * HVP_GRADIENTS + forward_floors(forward),
        runs=2,
    )


def _singh_layerwise(step: StepLike) -> Work:
    """At every `every`-th child epoch (the fork left out): one HVP pass per parameter block at both ends
    (blocks ≈ the model's linear and convolution layers, assumed) and a layer-set barrier at λ = ½ per block."""
    run, c = run_of(step), step.config
    cost = model_cost(run)
    steps = math.ceil(_child_epochs(run) / max(1, int(c.get("every", 1))))
    blocks = len(cost.groups) + 1
    n = split_examples(run, "train", c.get("examples"))
    batches = math.ceil(n / int(c.get("batch_size", 100)))
    forward = steps * (blocks + 3) * n
    return Work(
        cost,
        gradient_examples=steps * 2 * blocks * n * HVP_GRADIENTS,
        forward_examples=forward,
        floors=steps * 2 * blocks * batches * HVP_GRADIENTS + forward_floors(forward),
        runs=2 * steps,
    )


def _zipit_eval(step: StepLike) -> Work:
    """Every method's merged model (ZipIt! at every depth: two heads) on the test set of the tasks' classes;
    weight matching, activation matching and ZipIt!'s correlations (two passes of both models each over the
    zip examples). Depths ≈ the model's hidden layers (assumed)."""
    run, c = run_of(step), step.config
    cost = model_cost(run)
    classes = len({k for task in c["tasks"] for k in task})
    num = STATIC_INFO[normalise_name(run.data.dataset)].num_classes
    sizes = SPLIT_SIZES[normalise_name(run.data.dataset)]
    n_test = min(c.get("examples") or sizes["test"], sizes["test"] * classes // num)
    n_zip = min(int(c["zip_examples"]), sizes["train"] * classes // num)
    levels = len(c["levels"]) or len(cost.groups)
    heads = 7 + 2 * levels + 2  # a, b, ensemble (2), average, weight, activation; zipit per depth; across
    merged = 3 + levels + 1
    bn = merged * n_zip if c.get("bn") == "reset" or (c.get("bn") == "auto" and "batchnorm" in cost.name) else 0
    forward = heads * n_test + bn + 4 * n_zip
    lap = _lap_sweeps(cost) + tuple((n, 1) for n in cost.groups)
    return Work(cost, forward_examples=forward, floors=forward_floors(forward), assignments=lap, runs=2)


#: Step kind -> its work (or why it is unknown). Kinds not here are unknown.
WORK_MODELS: dict[str, Callable[[StepLike], Work | str]] = {
    "train": _train,
    "align": _align,
    "population_align": _population_align,
    "pairwise_cycle": _pairwise_cycle,
    "path": _path,
    "width_path": _width_path,
    "loss_derivatives": _loss_derivatives,
    "logits": _logits,
    "population_eval": _population_eval,
    "merged_trace": _merged_trace,
    "singh_segments": _singh_segments,
    "singh_geometry": _singh_geometry,
    "singh_prediction": _singh_prediction,
    "singh_layerwise": _singh_layerwise,
    "zipit_eval": _zipit_eval,
}


def step_work(step: StepLike) -> Work | str:
    """The work of `step`, or why its cost is unknown (a kind without a cost model, a model or dataset that
    cannot be sized)."""
    model = WORK_MODELS.get(step.kind)
    if model is None:
        return f"no cost model for step kind {step.kind}"
    try:
        return model(step)
    except (LookupError, ValueError, TypeError) as exc:
        return f"{step.kind}: {exc}"


# ------------------------------------------------------------------------------------------ device profiles


@dataclass(frozen=True)
class Throughput:
    """Training images per second of one model at one batch size on a profile's device, and where the
    number comes from (`status`: measured, fitted, derived or assumed)."""

    model: str
    image: str
    images_per_second: float
    batch_size: int
    status: str
    source: str

    @property
    def key(self) -> str:
        return f"{self.model} on {self.image}"

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "image": self.image,
            "images_per_second": round(self.images_per_second, 1),
            "batch_size": self.batch_size,
            "status": self.status,
            "source": self.source,
        }


@dataclass(frozen=True)
class DeviceProfile:
    """One device: a launch-bound `floor_seconds` per optimizer step of a 43-layer model, an effective rate
    `flops_per_second` of training FLOPs (3 × forward), measured rows (`table`) that replace the rate for
    their model, forward-only examples `forward_speedup` × cheaper than training ones (a work's `floors`
    count the launch-bound part outside training), `startup_seconds` per training started and `load_seconds`
    per stored model loaded, and scipy's
    assignment solver (`lap_seconds_512` at n = 512, ∝ n^`lap_exponent`). `notes`: where each number
    comes from."""

    name: str
    description: str
    unit: str  # what one hour of this profile is called ("GPU-hours on one H100")
    floor_seconds: float
    flops_per_second: float
    table: tuple[Throughput, ...] = ()
    forward_speedup: float = 3.0
    startup_seconds: float = 3.0
    load_seconds: float = 0.5
    lap_seconds_512: float = 0.014
    lap_exponent: float = math.log(0.3 / 0.014) / math.log(4)
    notes: tuple[str, ...] = ()

    def row(self, cost: ModelCost) -> Throughput | None:
        return next((r for r in self.table if r.key == cost.key), None)

    def floor(self, cost: ModelCost) -> float:
        return self.floor_seconds * cost.layers / REFERENCE_LAYERS

    def per_example(self, cost: ModelCost) -> float:
        """Seconds of compute per training example: a measured row's (less the floor), else 3·FLOPs/rate."""
        row = self.row(cost)
        if row is not None:
            return max(0.0, (row.batch_size / row.images_per_second - self.floor(cost)) / row.batch_size)
        return 3.0 * cost.forward_flops / self.flops_per_second

    def throughput(self, cost: ModelCost, batch_size: int = 256) -> Throughput:
        """The training images/s this profile assumes for `cost`'s model at `batch_size`, with its source."""
        row = self.row(cost)
        if row is not None and row.batch_size == batch_size:
            return row
        ips = batch_size / (self.floor(cost) + batch_size * self.per_example(cost))
        if row is not None and self.floor(cost) == 0:  # no floor: the same per example at any batch
            return replace(row, images_per_second=ips, batch_size=batch_size)
        if row is not None:
            source = f"{row.status} at batch {row.batch_size} ({row.source}), rescaled to batch {batch_size}"
        else:
            source = (
                f"{3 * cost.forward_flops / 1e6:.4g} MFLOP/example at the profile's rate, + floor × "
                f"{cost.layers}/{REFERENCE_LAYERS} layers per step"
            )
        return Throughput(cost.name, cost.image, ips, batch_size, "derived", source)

    def lap_seconds(self, n: int) -> float:
        return self.lap_seconds_512 * (n / 512) ** self.lap_exponent

    def seconds(self, work: Work) -> float:
        """Seconds of `work` on this profile (see the module docstring)."""
        cost = work.model
        c, floor = self.per_example(cost), self.floor(cost)
        return (
            work.starts * self.startup_seconds
            + work.runs * self.load_seconds
            + work.train_steps * (floor + work.batch_size * c)
            + work.forward_examples * c / self.forward_speedup
            + work.gradient_examples * c
            + work.floors * floor
            + sum(count * self.lap_seconds(n) for n, count in work.assignments)
        )

    def with_rows(self, rows: Iterable[Throughput]) -> DeviceProfile:
        """This profile with `rows` added (a row for a model already in the table replaces it)."""
        rows = list(rows)
        keys = {r.key for r in rows}
        return replace(self, table=tuple(r for r in self.table if r.key not in keys) + tuple(rows))


#: DESIGN.md, "Measured facts to plan with": a plain training loop of ResNet-20 (BN) on one H100 (torch 2.11,
#: bf16 autocast, channels_last, eager, batch 256, synthetic data), images/s by width.
H100_RESNET20_BN = {1: 33_000.0, 4: 29_000.0, 8: 18_000.0, 16: 7_400.0, 32: 2_300.0}
H100_SOURCE = "DESIGN.md 'Measured facts': plain ResNet-20 BN loop, one H100, bf16, channels_last, batch 256"


def _resnet20_bn(width: int) -> ModelCost:
    return model_cost(
        RunConfig.from_dict(
            {"data": {"dataset": "cifar10"}, "model": {"model": "resnet20", "width": width, "norm": "batchnorm"}}
        )
    )


def fit_floor_and_rate(points: Iterable[tuple[ModelCost, float, int]]) -> tuple[float, float]:
    """(floor seconds per step of a 43-layer model, training FLOP/s) fitted to measured (model, images/s,
    batch) points: t = floor·layers/43 + batch·3·FLOPs/R, least squares in relative error, floor ≥ 0."""
    rows = [(c.layers / REFERENCE_LAYERS, b * 3 * c.forward_flops, b / ips) for c, ips, b in points]
    # minimise Σ ((t − F·l − K·x)/t)²  (K = 1/R): 2×2 normal equations
    s_ll = sum((lay / t) ** 2 for lay, _, t in rows)
    s_lx = sum(lay * x / t**2 for lay, x, t in rows)
    s_xx = sum((x / t) ** 2 for _, x, t in rows)
    s_l1 = sum(lay / t for lay, _, t in rows)
    s_x1 = sum(x / t for _, x, t in rows)
    det = s_ll * s_xx - s_lx**2
    floor = (s_l1 * s_xx - s_x1 * s_lx) / det
    k = (s_ll * s_x1 - s_lx * s_l1) / det
    if floor < 0:  # the compute term alone
        floor, k = 0.0, s_x1 / s_xx
    return floor, 1.0 / k


@lru_cache(maxsize=1)
def h100() -> DeviceProfile:
    """The `h100` profile: DESIGN.md's five ResNet-20 BN widths as measured rows; floor and rate fitted to
    them (for every other model: derived from its FLOPs and layers)."""
    costs = {w: _resnet20_bn(w) for w in H100_RESNET20_BN}
    floor, rate = fit_floor_and_rate((costs[w], ips, 256) for w, ips in H100_RESNET20_BN.items())
    table = tuple(
        Throughput(costs[w].name, costs[w].image, ips, 256, "measured", H100_SOURCE)
        for w, ips in H100_RESNET20_BN.items()
    )
    return DeviceProfile(
        name="h100",
        description="one H100 (DESIGN.md's measured ResNet-20 loop; lmclab's own trainer not yet timed on a GPU)",
        unit="GPU-hours on one H100",
        floor_seconds=floor,
        flops_per_second=rate,
        table=table,
        notes=(
            f"floor {floor * 1e3:.2f} ms per step (43 layers) and rate {rate / 1e12:.0f} TFLOP/s of training FLOPs: "
            "fitted to the 5 measured ResNet-20 BN rows (least squares, relative error)",
            "other models: derived from their FLOPs (3 × forward) at that rate, floor × their layers/43 "
            "(assumed: launches ∝ layers); LayerNorm assumed to cost as BatchNorm (the FLOP counter counts neither)",
            "evaluation: forward-only examples 3× cheaper than training ones, batches of 1,000 at a third of a step's "
            "floor each (assumed); derivative and HVP batches at the step's floor × their gradients (assumed)",
            "start-up 3 s per training and 0.5 s per stored model loaded (assumed, as in the gpu presets' budgets)",
            f"derivatives: order 2 = {DERIVATIVE_ORDER2_GRADIENTS} gradients/example (DESIGN.md), ×2 per further order "
            f"(assumed); HVP = {HVP_GRADIENTS} gradients (DESIGN.md)",
            f"weight matching: scipy LAP 14 ms at n=512, 0.3 s at n=2048 (DESIGN.md, ∝ n^2.2 between), "
            f"{MATCHING_SWEEPS} sweeps × one LAP per hidden layer (assumed upper bound; cost matrices not counted)",
        ),
    )


#: DESIGN.md: "On the 2-core CPU, ResNet-20 ×1 trains at about 300 img/s" (norm and batch not stated).
CPU_RESNET20_IMAGES_PER_SECOND = 300.0


@lru_cache(maxsize=1)
def cpu() -> DeviceProfile:
    """The `cpu` profile (this machine): no launch floor; the FLOP rate of DESIGN.md's ≈ 300 img/s of
    ResNet-20 ×1 on the 2-core CPU. `store_rows` adds the throughput of train steps stored by this host."""
    rate = CPU_RESNET20_IMAGES_PER_SECOND * 3 * _resnet20_bn(1).forward_flops
    return DeviceProfile(
        name="cpu",
        description="this machine's CPUs (DESIGN.md's 2-core figure, and train steps this host stored)",
        unit="hours on this CPU",
        floor_seconds=0.0,
        flops_per_second=rate,
        startup_seconds=1.0,
        notes=(
            f"rate {rate / 1e9:.0f} GFLOP/s of training FLOPs: DESIGN.md's ≈ 300 img/s for ResNet-20 ×1 on the "
            "2-core CPU (measured; norm and batch not stated); no launch floor",
            "models with train steps stored by this host: their end-to-end throughput (measured, incl. start-up "
            "and evaluation)",
            "evaluation 3× cheaper than training per example; start-up 1 s per training, 0.5 s per stored model "
            "loaded (assumed)",
        ),
    )


#: How a pack (`--pack`) is estimated, said with every estimate of a packed run.
PACK_NOTE = "packed runs estimated as the sum of their members (no pack speed-up measured yet)"

#: The profiles `--on` accepts.
PROFILES: dict[str, Callable[[], DeviceProfile]] = {"h100": h100, "cpu": cpu}


def _record_of(path: Any) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@dataclass(frozen=True)
class _StoredStep:
    kind: str
    config: Mapping[str, Any]
    inputs: Mapping[str, Any] = field(default_factory=dict)


def store_rows(store: Store, host: str | None = None) -> list[Throughput]:
    """Throughput rows measured in `store`: per model, the mean end-to-end speed of the `train` steps that
    `host` (default: this machine) stored, in training-example equivalents per second (training examples
    + evaluation examples/3, over the step's wall time, start-up included)."""
    host = host or os.uname().nodename
    directory = store.step_dir("train", "*")
    speeds: dict[str, list[float]] = {}
    costs: dict[str, ModelCost] = {}
    batches: dict[str, int] = {}
    for path in sorted(directory.parent.glob(f"{directory.name}/result.json")) if directory.parent.is_dir() else []:
        record = _record_of(path)
        if record is None or record.get("kind") != "train" or record.get("host") != host:
            continue
        seconds, config = record.get("seconds"), record.get("config")
        if not isinstance(seconds, (int, float)) or seconds <= 0 or not isinstance(config, dict):
            continue
        work = step_work(_StoredStep("train", config))
        if isinstance(work, str) or work.train_examples == 0:
            continue
        speeds.setdefault(work.model.key, []).append((work.train_examples + work.forward_examples / 3) / seconds)
        costs[work.model.key] = work.model
        batches[work.model.key] = work.batch_size
    return [
        Throughput(
            costs[k].name,
            costs[k].image,
            sum(v) / len(v),
            batches[k],
            "measured",
            f"{len(v)} train step(s) stored by {host} in {store.root}, end to end",
        )
        for k, v in sorted(speeds.items())
    ]


def profile(name: str, store: Store | None = None) -> DeviceProfile:
    """Profile `name` (one of PROFILES); `cpu` with the rows `store` holds for this host."""
    if name not in PROFILES:
        raise ValueError(f"device profile {name!r}; allowed: {', '.join(PROFILES)}")
    chosen = PROFILES[name]()
    return chosen.with_rows(store_rows(store)) if name == "cpu" and store is not None else chosen


# ------------------------------------------------------------------------------------------ estimates


@dataclass(frozen=True)
class StepWork:
    """One step's work (or why it is unknown) and whether its result is stored."""

    work: Work | str
    stored: bool


@dataclass(frozen=True)
class Estimate:
    """Seconds of a kind's steps on a profile: `seconds` (all steps), `to_run_seconds` (those not stored),
    with `unknown` / `unknown_to_run` steps left out and the reasons why."""

    seconds: float
    to_run_seconds: float
    known: int
    known_to_run: int
    unknown: int
    unknown_to_run: int
    reasons: tuple[str, ...]
    models: tuple[ModelCost, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "model_seconds": self.seconds,
            "model_seconds_to_run": self.to_run_seconds,
            "modelled_steps": self.known,
            "unknown_steps": self.unknown,
            "unknown_steps_to_run": self.unknown_to_run,
            "unknown_reasons": list(self.reasons),
        }


def estimate(works: Iterable[StepWork], device: DeviceProfile) -> Estimate:
    """What `works` take on `device`; unknown steps counted and their reasons kept, never zero seconds."""
    seconds = to_run = 0.0
    known = known_to_run = unknown = unknown_to_run = 0
    reasons: dict[str, None] = {}
    models: dict[str, ModelCost] = {}
    for w in works:
        if isinstance(w.work, str):
            unknown += 1
            unknown_to_run += not w.stored
            reasons[w.work] = None
            continue
        s = device.seconds(w.work)
        seconds += s
        known += 1
        models[w.work.model.key] = w.work.model
        if not w.stored:
            to_run += s
            known_to_run += 1
    return Estimate(
        seconds, to_run, known, known_to_run, unknown, unknown_to_run, tuple(reasons), tuple(models.values())
    )
