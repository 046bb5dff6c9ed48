"""Derive a :class:`PermutationSpec` from a model's ``torch.fx`` graph.

The graph is traced (``LayerNorm2d`` and any ``leaf_modules`` stay single ``call_module`` nodes) and
run once on an example input with :class:`~torch.fx.passes.shape_prop.ShapeProp` to learn every
tensor's shape. Then *unit sets* flow along the unit axis of each tensor (dim 1 of N×C×H×W and of
N×F; another axis only after an explicit permute/transpose), merged with union-find:

* a Linear / Conv (module or ``F.linear``/``F.convNd`` on a parameter) OPENS a set of
  ``out_features`` units: weight axis 0 (axis 1 for ConvTranspose) and bias axis 0 join it; its
  input axis joins whatever set flows in. Depthwise convs (groups == in_channels) keep the set
  (weight/bias axis 0 join it, ``block`` × the channel multiplier). A conv with 1 < G < C_in groups
  splits input and output sets into G blocks moved by one shared σ; the output's within-block units
  permute freely, the input set keeps only whole-block moves (its within-block permutations would
  permute weight axis 1 differently per output block). Transposed grouped convs are errors.
  A Linear over another axis than the units' (token mixing) lets them pass, its outputs unpermuted;
* norms keep the set and add their per-unit tensors: BatchNorm/InstanceNorm (weight, bias,
  running_mean, running_var), LayerNorm2d, GroupNorm (with 1 < G < C groups it makes the set
  block-structured: G blocks of C/G channels), nn.LayerNorm / F.layer_norm
  over any trailing dims (the axis of weight/bias aligned with the unit axis; none if the unit axis
  is not normalised), PReLU with one weight per channel;
* elementwise ops (activations, dropout, softmax/normalize, dtype/device casts, ``*_like``), pooling,
  padding and interpolation over other axes, reductions over other axes keep the set; a reduction
  over the unit axis is permutation-invariant and carries no set;
* ``+``, ``*``, … of two tensors carrying sets UNITE them (a residual add ties both sides); a
  parameter broadcast along the unit axis (a layer-scale ``gamma[:, None, None]``) joins the set;
  a scalar or a tensor constant along the unit axis keeps it;
* reshapes (flatten, view, reshape, squeeze, unflatten) move whole units: flattening N×C×H×W to
  N×(C·H·W) gives ``block = H·W``; permute/transpose move the unit axis;
* ``torch.cat`` along the unit axis concatenates sets: each part keeps its own set at an ``offset``
  (:class:`AxisRef.offset`) of the consumer's input axis;
* the network inputs and outputs are never permuted: tensors derived from the input by unit-free
  ops are *fixed*, sets reaching the output are fixed, and so is every set united with a fixed one
  (a residual add onto the raw input); fixed sets produce no group. A layer used once on a fixed or
  constant tensor and once on hidden units (a shared layer) fixes those units too.

Each group's ``activations`` are the nodes read by its Linear/Conv consumers, taken at the latest
node that carries the group alone on dim 1 (block 1, offset 0): the 4-D tensor before a flatten, a
branch before a concatenation. Groups whose units only ever live on another axis (tokens × features
layouts) get none.

Attention (``nn.MultiheadAttention``, ``F.scaled_dot_product_attention``, or written out) has more
structure: a reshape that splits a unit axis into (heads, head_dim) makes the set *block-structured*
(a *split* flow: heads on one axis, units within a head on another; the set gets a *block set* of
h units whose permutation moves whole heads). ``q @ kᵀ`` contracting the within-head axes of two
split flows whose heads sit on one batch axis unites q's and k's sets (same head permutation, same
within-head permutation) and yields scores carrying the block set on the heads axis (softmax,
scaling, masking with a head-independent mask keep it); ``scores @ v`` unites that block set with
v's, so v's heads move with q's while v's within-head units have their own permutation, which the
merge back (N, L, h, d) → (N, L, h·d) carries into the output projection's input axis.
``F.scaled_dot_product_attention`` is the same rule in one op; single-head attention (no split)
unites q and k and lets v's units pass. ``nn.MultiheadAttention`` opens the two structured sets
itself (in_proj rows [0, 2E) for q/k, [2E, 3E) and out_proj's columns for v) and out_proj opens
the output's set. ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` (without masks) are
traced through. A structured set becomes a group with ``blocks`` and ``block_perm`` (see
:mod:`lmclab.permutation.spec`); a block set with tensors of its own becomes a group of whole blocks.

Masks: an attention mask (causal, padding) is added to the scores, not to hidden units. It is allowed
when it carries no units (built from the input or from shapes: a fixed or constant tensor, however it
was computed) and is the same for every head (size 1 on the heads' axis); a mask carrying units, or
one that differs between heads (which a permutation of heads would move), is an error.

Tracers: ``torch.fx`` symbolic tracing by default; models it cannot trace (control flow on values or
shapes, item assignment, cache objects: the ``transformers`` package's GPT-2 and BERT) are captured
with ``torch.export`` and translated into the same torch-level graph
(:mod:`lmclab.permutation.export`); ``derive_spec(..., tracer=...)`` chooses. A tied parameter (one
tensor under several state_dict names) gets the same axes under every name, so it stays tied.

Never silently partial: anything else that touches hidden units (indexing the unit axis, an unknown
module, a grouped conv or GroupNorm over a concatenation, …) raises :class:`SpecError` naming the fx node,
its target and its source line, also when its result only flows into a residual stream: a set that
is fixed only because it meets such an op's (opaque) result counts as touched. With
``leave_unknown_fixed=True`` those sets stay unpermuted and the spec's meta says which.
Groups are named ``P_<module that opened the set>``; a union takes
the name of its earliest opener (``P_stem.conv`` for ResNet-20's stage-1 residual stream).
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import math
import operator
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from lmclab.models.norms import LayerNorm2d
from lmclab.permutation.export import canonical_names, eval_mode, export_graph
from lmclab.permutation.spec import AxisRef, PermGroup, PermutationSpec, SpecError, coverage

__all__ = ["PermTracer", "trace_model", "example_input_for", "derive_spec", "spec_for"]

ExampleInput = torch.Tensor | tuple[torch.Tensor, ...]


# ----------------------------------------------------------------------------------- tracing


class PermTracer(fx.Tracer):
    """fx tracer that keeps ``LayerNorm2d`` and ``leaf_modules`` (besides torch.nn's) as leaves."""

    def __init__(self, leaf_modules: Sequence[type] = ()) -> None:
        super().__init__()
        self.record_stack_traces = True
        self.extra_leaves: tuple[type, ...] = (LayerNorm2d, *leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.extra_leaves):
            return True
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder)):
            return False  # traced through: attention, linears, norms
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """nn.TransformerEncoder without masks is its layers in sequence, then its norm (its forward
        branches on the input, which fx cannot trace)."""
        if isinstance(m, nn.TransformerEncoder) and not isinstance(m, self.extra_leaves):
            extra = list(args[1:]) + [v for k, v in kwargs.items() if k != "src"]
            if any(v is not None and v is not False for v in extra):
                raise SpecError("nn.TransformerEncoder is traced only when called without masks")
            x = args[0] if args else kwargs["src"]
            for layer in cast(Iterable[nn.Module], m.layers):
                x = self.call_module(layer, layer.forward, (x,), {})
            if m.norm is not None:
                x = self.call_module(m.norm, m.norm.forward, (x,), {})
            return x
        return super().call_module(m, forward, args, kwargs)


def trace_model(model: nn.Module, leaf_modules: Sequence[type] = ()) -> fx.GraphModule:
    """Symbolic trace with :class:`PermTracer`; the GraphModule shares the model's submodules.

    PyTorch's fused attention fast path is switched off while tracing (its eligibility checks branch on
    the input); the traced graph computes the same function."""
    tracer = PermTracer(leaf_modules)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        graph = tracer.trace(model)
    except Exception as err:  # noqa: BLE001 - fx raises many types
        raise SpecError(
            f"torch.fx cannot trace {type(model).__name__}: {err}. Mark the offending submodule "
            "as a leaf (leaf_modules=...) or pass an explicit spec."
        ) from err
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def example_input_for(model: nn.Module, gm: fx.GraphModule | None = None) -> torch.Tensor:
    """A random input guessed from the first Linear/Conv in graph order: (2, C, 32, 32) for a Conv2d,
    (2, C, 32) / (2, C, 16, 16, 16) for Conv1d/3d, (2, in_features) for a Linear (an MLP whose first
    op is a flatten accepts it too). Pass ``example_input`` explicitly for anything else."""
    gm = gm if gm is not None else trace_model(model)
    ref = next(iter(model.parameters()), None)
    kw: dict[str, Any] = {"dtype": ref.dtype, "device": ref.device} if ref is not None else {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        shape: tuple[int, ...] | None = None
        if isinstance(m, nn.Conv2d):
            shape = (2, m.in_channels, 32, 32)
        elif isinstance(m, nn.Conv1d):
            shape = (2, m.in_channels, 32)
        elif isinstance(m, nn.Conv3d):
            shape = (2, m.in_channels, 16, 16, 16)
        elif isinstance(m, nn.Linear):
            shape = (2, m.in_features)
        if shape is not None:
            g = torch.Generator().manual_seed(0)
            return torch.randn(shape, generator=g).to(**kw)
    raise SpecError(f"cannot guess an example input for {type(model).__name__}; pass example_input")


_SMALL = (int, float, bool, str, type(None), torch.dtype, torch.device, slice, type(Ellipsis))


def _is_small(v: Any) -> bool:
    if isinstance(v, (tuple, list)):
        return all(_is_small(x) for x in v)
    return isinstance(v, _SMALL)


class _Prop(ShapeProp):
    """ShapeProp that also keeps every tensor's shape and every small non-tensor result (sizes, dims)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.values: dict[fx.Node, Any] = {}
        self.tuple_shapes: dict[fx.Node, list[tuple[int, ...]]] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, (tuple, list)) and result and all(isinstance(t, torch.Tensor) for t in result):
            self.tuple_shapes[n] = [tuple(t.shape) for t in result]
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(result.shape)
        elif _is_small(result):
            self.values[n] = result
        return result


# ------------------------------------------------------------------------------- flow values


@dataclass(frozen=True)
class _Part:
    """One unit set laid along the unit axis: entries [offset, offset + size·block), `block` per unit.
    `src` is the latest node whose dim 1 carries exactly this set (block 1, offset 0): its activation."""

    set: int
    block: int
    offset: int
    src: str | None


@dataclass(frozen=True)
class _Flow:
    """A tensor whose axis `dim` carries the concatenation of `parts`.

    With `inner` set (a *split* flow: attention heads), there is one part, of a block-structured set
    of h blocks × d units: axis `dim` (length h) indexes the blocks and axis `inner` (length d) the
    unit within its block."""

    dim: int
    parts: tuple[_Part, ...]
    inner: int | None = None


@dataclass(frozen=True)
class _Attr:
    """A tensor read from the state_dict entry `target`; `axes` maps value axis -> parameter axis."""

    target: str
    axes: tuple[tuple[int, int], ...]

    def axis_map(self) -> dict[int, int]:
        return dict(self.axes)


class _ConstT:
    """A tensor without a unit axis: unchanged by any permutation (constants, invariant reductions)."""

    def __repr__(self) -> str:
        return "CONST"


class _FixedT:
    """A tensor derived from the network input by ops that move no units: never permuted along any
    axis. Sets combined with it elementwise along the unit axis become fixed."""

    def __repr__(self) -> str:
        return "FIXED"


class _OpaqueT(_FixedT):
    """The result of an op the rules do not cover, applied to hidden units: treated as fixed, but a set
    fixed through it is *tainted* (left fixed only because of that op, described by `origin`), which is
    an error unless the caller passes ``leave_unknown_fixed=True``."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def __repr__(self) -> str:
        return f"OPAQUE({self.origin})"


@dataclass(frozen=True)
class _Tuple:
    """A tuple result whose items are tracked (nn.MultiheadAttention's (output, weights))."""

    items: tuple[Any, ...]


_CONST = _ConstT()
_FIXED = _FixedT()
_UNKNOWN = object()
Val = _Flow | _Attr | _ConstT | _FixedT | _Tuple | None


def _plain(v: Val) -> Val:
    """Result kind of a unit-free op on a tensor without units: fixed (or opaque) stays so, else constant."""
    return v if isinstance(v, _FixedT) else _CONST


def _combine_fixed(vals: Iterable[Any]) -> Val:
    """Opaque if any value is, else fixed if any is, else constant."""
    vals = list(vals)
    for v in vals:
        if isinstance(v, _OpaqueT):
            return v
    return _FIXED if any(isinstance(v, _FixedT) for v in vals) else _CONST


class _Sets:
    """Union-find over unit sets: size, opener (module name) and fixed flag per root.

    `legit`: fixed for a reason of the network itself (reaches the output, meets the input, a shared
    layer); `tainted`: fixed through an op the rules do not cover. Block structure: `blocks` (1 =
    flat) and `bset`, the set (of `blocks` units) whose permutation moves the whole blocks."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.opener: list[str | None] = []
        self.fixed: list[bool] = []
        self.legit: list[bool] = []
        self.tainted: list[bool] = []
        self.blocks: list[int] = []
        self.bset: list[int | None] = []
        self.whole: list[bool] = []
        self.origins: dict[int, list[str]] = {}

    def new(self, size: int, opener: str | None = None, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.opener.append(opener)
        self.fixed.append(fixed)
        self.legit.append(fixed)
        self.tainted.append(False)
        self.blocks.append(1)
        self.bset.append(None)
        self.whole.append(False)
        return len(self.parent) - 1

    def structure(self, i: int, blocks: int, where: str) -> int:
        """Give set i a structure of `blocks` blocks (if flat); the root of its block set."""
        r = self.find(i)
        if self.blocks[r] == 1:
            if blocks < 1 or self.size[r] % blocks:
                raise SpecError(f"{where}: {self.size[r]} units do not split into {blocks} blocks")
            self.blocks[r] = blocks
            self.bset[r] = self.new(blocks, opener=self.opener[r])
        elif self.blocks[r] != blocks:
            raise SpecError(f"{where}: units already split into {self.blocks[r]} blocks, not {blocks}")
        return self.find(cast(int, self.bset[r]))

    def block_set(self, i: int) -> int | None:
        b = self.bset[self.find(i)]
        return None if b is None else self.find(b)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            raise SpecError(f"{where}: cannot tie unit sets of {self.size[ra]} and {self.size[rb]} units")
        if self.blocks[ra] > 1 and self.blocks[rb] > 1 and self.blocks[ra] != self.blocks[rb]:
            raise SpecError(f"{where}: cannot tie units in {self.blocks[ra]} blocks to units in {self.blocks[rb]}")
        lo, hi = min(ra, rb), max(ra, rb)  # the earliest set stays the root
        self.parent[hi] = lo
        self.fixed[lo] = self.fixed[lo] or self.fixed[hi]
        self.legit[lo] = self.legit[lo] or self.legit[hi]
        self.tainted[lo] = self.tainted[lo] or self.tainted[hi]
        self.whole[lo] = self.whole[lo] or self.whole[hi]
        self.origins.setdefault(lo, []).extend(self.origins.pop(hi, []))
        b_lo, b_hi = self.bset[lo], self.bset[hi]
        if b_lo is None and b_hi is not None:
            self.blocks[lo], self.bset[lo] = self.blocks[hi], b_hi
        elif b_lo is not None and b_hi is not None:
            self.union(b_lo, b_hi, where)
        return lo

    def fix(self, i: int, origin: str | None = None) -> None:
        """Fix set i: for a reason of the network itself (`origin` None), or only because of the op
        described by `origin` (tainted)."""
        r = self.find(i)
        self.fixed[r] = True
        if origin is None:
            self.legit[r] = True
        else:
            self.tainted[r] = True
            self.origins.setdefault(r, []).append(origin)

    def is_fixed(self, i: int) -> bool:
        return self.fixed[self.find(i)]


# ------------------------------------------------------------------------------ op tables


def _fns(*names: str, module: Any = F) -> list[Callable[..., Any]]:
    return [getattr(module, n) for n in names if hasattr(module, n)]


_ELEMENTWISE_FUNCS = set(
    _fns(
        "relu",
        "relu_",
        "relu6",
        "gelu",
        "silu",
        "elu",
        "selu",
        "celu",
        "leaky_relu",
        "softplus",
        "hardswish",
        "hardsigmoid",
        "hardtanh",
        "mish",
        "logsigmoid",
        "softsign",
        "tanhshrink",
        "softshrink",
        "hardshrink",
        "threshold",
        "tanh",
        "sigmoid",
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "alpha_dropout",
        "feature_alpha_dropout",
        "softmax",
        "softmin",
        "log_softmax",
        "normalize",
    )
    + _fns(
        "relu",
        "relu_",
        "tanh",
        "sigmoid",
        "exp",
        "log",
        "abs",
        "neg",
        "sqrt",
        "rsqrt",
        "square",
        "clamp",
        "clip",
        "erf",
        "sin",
        "cos",
        "softmax",
        "log_softmax",
        "zeros_like",
        "ones_like",
        "full_like",
        "empty_like",
        "nan_to_num",
        "add",
        "sub",
        "subtract",
        "mul",
        "multiply",
        "div",
        "divide",
        "true_divide",
        "maximum",
        "minimum",
        "pow",
        "where",
        module=torch,
    )
    + [
        operator.neg,
        operator.pos,
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.floordiv,
        operator.pow,
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
    ]
)
_ELEMENTWISE_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "exp",
    "exp_",
    "log",
    "abs",
    "abs_",
    "neg",
    "sqrt",
    "rsqrt",
    "square",
    "clamp",
    "clamp_",
    "clip",
    "clip_",
    "erf",
    "sin",
    "cos",
    "add",
    "add_",
    "sub",
    "sub_",
    "mul",
    "mul_",
    "div",
    "div_",
    "pow",
    "pow_",
    "maximum",
    "minimum",
    "softmax",
    "log_softmax",
    "contiguous",
    "clone",
    "detach",
    "float",
    "double",
    "half",
    "bfloat16",
    "requires_grad_",
    "expand",
    "expand_as",
    "masked_fill",
    "masked_fill_",
}
_CAST_METHODS = {"to", "type", "type_as", "cpu", "cuda"}  # only `self` matters
_SHAPE_ONLY_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "get_device", "is_contiguous"}
_RESHAPE_FUNCS = set(_fns("flatten", "reshape", "squeeze", "unsqueeze", "unflatten", module=torch))
_RESHAPE_METHODS = {
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "view_as",
    "reshape_as",
    "squeeze_",
    "unsqueeze_",
}
_PERMUTE_FUNCS = {
    f: f.__name__
    for f in _fns("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", module=torch)
}
_PERMUTE_METHODS = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"}
_REDUCE_FUNCS = set(_fns("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "nansum", "nanmean", module=torch))
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "nansum", "nanmean"}
_CAT_FUNCS = set(_fns("cat", "concat", "concatenate", module=torch))
_SPLIT_FUNCS = set(_fns("split", "chunk", "tensor_split", module=torch))
_SPLIT_METHODS = {"split", "chunk", "tensor_split"}
_SPATIAL_FUNCS: dict[Callable[..., Any], int] = {
    **{f: 1 for f in _fns("max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d", "lp_pool1d")},
    **{f: 2 for f in _fns("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "lp_pool2d")},
    **{f: 3 for f in _fns("max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "adaptive_max_pool3d", "lp_pool3d")},
    **{f: -2 for f in _fns("interpolate", "upsample", "upsample_nearest", "upsample_bilinear")},  # ndim-2
}
_CONV_FUNCS = set(_fns("conv1d", "conv2d", "conv3d"))
_MATMUL_FUNCS = {operator.matmul, *_fns("matmul", "bmm", module=torch)}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
_SDPA_FUNCS = set(_fns("scaled_dot_product_attention"))

_ELEMENTWISE_MODULES: tuple[type, ...] = tuple(
    getattr(nn, n)
    for n in (
        "ReLU",
        "ReLU6",
        "GELU",
        "SiLU",
        "Tanh",
        "Sigmoid",
        "LeakyReLU",
        "ELU",
        "SELU",
        "CELU",
        "Softplus",
        "Softsign",
        "Hardswish",
        "Hardsigmoid",
        "Hardtanh",
        "Mish",
        "LogSigmoid",
        "Tanhshrink",
        "Softshrink",
        "Hardshrink",
        "Threshold",
        "Softmax",
        "Softmax2d",
        "Softmin",
        "LogSoftmax",
        "Identity",
        "Dropout",
        "Dropout1d",
        "Dropout2d",
        "Dropout3d",
        "AlphaDropout",
        "FeatureAlphaDropout",
    )
    if hasattr(nn, n)
)
_POOL_MODULES: tuple[type, ...] = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)
_PAD_MODULES: tuple[type, ...] = tuple(
    getattr(nn.modules.padding, n)
    for n in ("_ConstantPadNd", "_ReflectionPadNd", "_ReplicationPadNd", "_CircularPadNd")
    if hasattr(nn.modules.padding, n)
)


def _is_in(fn: Any, table: Any) -> bool:
    try:
        return fn in table
    except TypeError:  # unhashable target
        return False


def _prod(xs: Iterable[int]) -> int:
    return math.prod(int(x) for x in xs)


def _spatial_rank(m: nn.Module) -> int:
    match = re.search(r"(\d)d$", type(m).__name__)
    return int(match.group(1)) if match else 2


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _target_str(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    t = node.target
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", str(t))
    return f"{mod}.{name}" if mod and mod not in ("_operator", "builtins") else name


_TORCH_DIR = os.path.dirname(torch.__file__)
_HERE = os.path.dirname(os.path.abspath(__file__))


def _source_line(node: fx.Node, model: nn.Module) -> str:
    """'file:line' of the op: the innermost stack-trace frame outside torch, else the module's class."""
    for path, line in reversed(re.findall(r'File "([^"]+)", line (\d+)', node.stack_trace or "")):
        if not path.startswith(_TORCH_DIR) and not os.path.abspath(path).startswith(_HERE):
            return f"{path}:{line}"
    cls: type = type(model)
    if node.op == "call_module":
        with contextlib.suppress(AttributeError):
            cls = type(model.get_submodule(str(node.target)))
    try:
        return f"{inspect.getsourcefile(cls)}:{inspect.getsourcelines(cls)[1]} (class {cls.__qualname__})"
    except (OSError, TypeError):
        return "<source unknown>"


# ------------------------------------------------------------------------------- the deriver


class _Deriver:
    def __init__(self, model: nn.Module, gm: fx.GraphModule, prop: _Prop, leave_unknown_fixed: bool = False) -> None:
        self.model, self.gm = model, gm
        self.leave_unknown_fixed = leave_unknown_fixed
        self.shapes, self.values, self.tuple_shapes = prop.shapes, prop.values, prop.tuple_shapes
        self.state = set(model.state_dict().keys())
        self.sets = _Sets()
        self.val: dict[fx.Node, Val] = {}
        self.refs: list[tuple[int, AxisRef]] = []
        self.acts: list[tuple[int, str]] = []
        self.hazards: list[tuple[fx.Node, str, list[int]]] = []
        self.opaque: list[tuple[fx.Node, str, str]] = []
        self.pinned: set[tuple[str, int]] = set()
        self.opened: dict[str, int] = {}
        self.order = {n.name: i for i, n in enumerate(gm.graph.nodes)}

    # ---- bookkeeping

    def _ref(self, s: int, ref: AxisRef) -> None:
        self.refs.append((s, ref))

    def _pin(self, tensors: Iterable[tuple[str, int]]) -> None:
        """These axes are used unpermuted (a layer applied to a constant, or along another axis): any
        set that also claims them is fixed (a layer shared between both uses)."""
        self.pinned.update((t, a) for t, a in tensors if t in self.state)

    def _hazard(self, node: fx.Node, why: str, flow: _Flow) -> None:
        self.hazards.append((node, why, [p.set for p in flow.parts]))

    def _opaque_use(self, node: fx.Node, v: Val, why: str) -> None:
        if isinstance(v, _Attr):
            self.opaque.append((node, v.target, why))

    def _concrete(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.values.get(a, _UNKNOWN)
        if isinstance(a, (tuple, list)):
            return type(a)(self._concrete(x) for x in a)
        if isinstance(a, slice):
            return slice(self._concrete(a.start), self._concrete(a.stop), self._concrete(a.step))
        return a

    def _tensor_args(self, node: fx.Node) -> list[fx.Node]:
        seen: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: seen.append(n))
        return [n for n in dict.fromkeys(seen) if n in self.shapes]

    def _fresh(self, node: fx.Node, from_input: bool) -> Val:
        """Value of an untracked result: fixed (never permuted) when it derives from the input or from
        tensors that carry units, a constant otherwise."""
        if node not in self.shapes:
            return None
        return _FIXED if from_input else _CONST

    def _unknown(self, node: fx.Node, why: str) -> Val:
        """An op the rules do not cover: an error if it touches a set that ends up permuted or that is
        fixed only through this op's (opaque) result; that result is opaque when it derives from units."""
        touched, vals = False, []
        seen: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: seen.append(n))
        for a in dict.fromkeys(seen):
            v = self.val.get(a)
            if isinstance(v, _Tuple):
                for x in v.items:
                    if isinstance(x, _Flow):
                        self._hazard(node, why, x)
                        touched = True
                v = _combine_fixed(v.items)
            if isinstance(v, _Flow):
                self._hazard(node, why, v)
                touched = True
            vals.append(v)
            self._opaque_use(node, v, why)
        if touched:
            return _OpaqueT(self._describe(node, why))
        if any(isinstance(v, _OpaqueT) for v in vals) or node not in self.shapes:
            return None
        return _combine_fixed(vals)

    def _keep(self, node: fx.Node, flow: _Flow) -> _Flow:
        """The same sets on `flow.dim`; this node becomes the activation source of a lone plain set."""
        if (
            flow.dim == 1
            and flow.inner is None
            and len(flow.parts) == 1
            and flow.parts[0].block == 1
            and flow.parts[0].offset == 0
        ):
            return _Flow(1, (replace(flow.parts[0], src=node.name),))
        return flow

    def _same_layout(self, a: _Flow, b: _Flow) -> bool:
        return (
            a.inner is None
            and b.inner is None
            and len(a.parts) == len(b.parts)
            and all(
                p.offset == q.offset
                and p.block == q.block
                and self.sets.size[self.sets.find(p.set)] == self.sets.size[self.sets.find(q.set)]
                for p, q in zip(a.parts, b.parts)
            )
        )

    # ---- generic rules

    def elementwise(self, node: fx.Node, operands: list[fx.Node] | None = None) -> Val:
        """Broadcasting elementwise op: sets of all operands united; parameters along the unit axis join."""
        out = self.shapes.get(node)
        if out is None:
            return self._unknown(node, "elementwise op with a non-tensor result")
        ops = self._tensor_args(node) if operands is None else [a for a in operands if a in self.shapes]
        flows: list[tuple[int, _Flow]] = []
        others: list[tuple[fx.Node, Val, tuple[int, ...], int]] = []
        broadcast_flow = False
        for a in ops:
            v, shape = self.val.get(a), self.shapes[a]
            lead = len(out) - len(shape)
            if isinstance(v, _Flow):
                if lead < 0:
                    return self._unknown(node, "operand has more dims than the result")
                if shape[v.dim] != out[v.dim + lead]:
                    broadcast_flow = True  # a 1-unit set broadcast: only the identity permutes it
                    continue
                flows.append((v.dim + lead, v))
            else:
                others.append((a, v, shape, lead))
        if not flows:
            for _, v, _, _ in others:
                self._opaque_use(node, v, "used in an elementwise op")
            vals = [v for _, v, _, _ in others]
            return _combine_fixed(vals + ([_FIXED] if broadcast_flow else []))
        if any(f.inner is not None for _, f in flows):
            return self._elementwise_split(node, out, flows, others)
        if len({d for d, _ in flows}) > 1:
            return self._unknown(node, "operands carry units on different axes")
        d, first = flows[0]
        for _, f in flows[1:]:
            if not self._same_layout(first, f):
                return self._unknown(
                    node,
                    "operands carry different unit layouts (e.g. a concatenation "
                    "combined with a single layer's output)",
                )
        where = f"node {node.name}"
        for _, f in flows[1:]:
            for p, q in zip(first.parts, f.parts):
                self.sets.union(p.set, q.set, where)
        for a, v, shape, lead in others:
            ax = d - lead
            if ax < 0 or shape[ax] == 1:
                self._opaque_use(node, v, "used in an elementwise op, not along the unit axis")
                continue
            if isinstance(v, _FixedT):  # varies along the unit axis and is never permuted: the sets are fixed
                for p in first.parts:
                    self.sets.fix(p.set, origin=v.origin if isinstance(v, _OpaqueT) else None)
                continue
            amap = v.axis_map() if isinstance(v, _Attr) else {}
            if isinstance(v, _Attr) and ax in amap and shape[ax] == out[d]:
                for p in first.parts:
                    self._ref(p.set, AxisRef(v.target, amap[ax], p.block, p.offset))
                continue
            self._hazard(
                node,
                f"operand {a.name!r} varies along the unit axis but is not a parameter the spec can permute",
                first,
            )
            self._opaque_use(node, v, "used in an elementwise op")
        return self._keep(node, _Flow(d, first.parts))

    def _elementwise_split(
        self,
        node: fx.Node,
        out: tuple[int, ...],
        flows: list[tuple[int, _Flow]],
        others: list[tuple[fx.Node, Val, tuple[int, ...], int]],
    ) -> Val:
        """Elementwise op on split (head) flows: all flows on the same (block, inner) axes, united; every
        other operand constant along both (size 1 there, or absent)."""
        lead_of = {id(f): d - f.dim for d, f in flows}
        layouts = {(d, None if f.inner is None else f.inner + lead_of[id(f)]) for d, f in flows}
        if len(layouts) > 1:
            return self._unknown(node, "operands carry attention heads on different axes")
        d, inner = next(iter(layouts))
        first = flows[0][1]
        for _, f in flows[1:]:
            self.sets.union(first.parts[0].set, f.parts[0].set, f"node {node.name}")
        for _, v, shape, lead in others:
            for ax in (d, cast(int, inner)):
                if ax - lead >= 0 and shape[ax - lead] != 1:
                    self._hazard(node, "operand varies along the attention heads' axes", first)
                    self._opaque_use(node, v, "used in an elementwise op")
                    return _OpaqueT(self._describe(node, "operand varies along the attention heads' axes"))
        return _Flow(d, first.parts, inner)

    def reshape(self, node: fx.Node, x: fx.Node) -> Val:
        """Reshape that keeps each unit's entries contiguous: dim d (P_in trailing entries) becomes dim d'
        (P_out trailing entries) with block·P_in/P_out entries per unit."""
        v, ins, out = self.val.get(x), self.shapes.get(x), self.shapes.get(node)
        if ins is None or out is None:
            return self._unknown(node, "reshape of a non-tensor")
        if ins == out and isinstance(v, (_Flow, _Attr)):
            return v  # a reshape that changes nothing (export's reshape(x, x.shape))
        if isinstance(v, _Attr):
            return self._attr_reshape(node, v, ins, out)
        if not isinstance(v, _Flow):
            return _plain(v)
        if v.inner is not None:
            return self._split_reshape(node, v, ins, out)
        d = v.dim
        outer, p_in = _prod(ins[:d]), _prod(ins[d + 1 :])
        for d2 in range(len(out)):
            if _prod(out[:d2]) != outer:
                continue
            p_out = _prod(out[d2 + 1 :])
            if p_out == 0 or out[d2] * p_out != ins[d] * p_in:
                continue
            if all((p.block * p_in) % p_out == 0 and (p.offset * p_in) % p_out == 0 for p in v.parts):
                return _Flow(
                    d2,
                    tuple(replace(p, block=p.block * p_in // p_out, offset=p.offset * p_in // p_out) for p in v.parts),
                )
        if len(v.parts) == 1 and v.parts[0].block == 1 and v.parts[0].offset == 0 and p_in == 1:
            # the unit axis split into (blocks, within): attention heads (N, L, E) -> (N, L, h, d)
            for d2 in range(len(out) - 1):
                if _prod(out[:d2]) == outer and out[d2] * out[d2 + 1] == ins[d] and _prod(out[d2 + 2 :]) == 1:
                    if out[d2] == 1 or out[d2 + 1] == 1:
                        break
                    try:
                        self.sets.structure(v.parts[0].set, out[d2], f"node {node.name}")
                    except SpecError as err:
                        return self._unknown(node, str(err))
                    return _Flow(d2, (replace(v.parts[0], src=None),), d2 + 1)
        return self._unknown(node, f"reshape {ins} -> {out} splits units or mixes them with other axes")

    def _split_reshape(self, node: fx.Node, v: _Flow, ins: tuple[int, ...], out: tuple[int, ...]) -> Val:
        """A split flow (blocks on axis h, units within on axis h + 1) merged back into one unit axis, or
        reshaped around those two axes without touching them."""
        h, i = v.dim, cast(int, v.inner)
        if i == h + 1:
            outer, tail = _prod(ins[:h]), _prod(ins[i + 1 :])
            for d2 in range(len(out)):
                if _prod(out[:d2]) != outer:
                    continue
                if out[d2] == ins[h] * ins[i] and _prod(out[d2 + 1 :]) == tail and tail == 1:
                    return _Flow(d2, v.parts)
                if d2 + 1 < len(out) and out[d2] == ins[h] and out[d2 + 1] == ins[i] and _prod(out[d2 + 2 :]) == tail:
                    return _Flow(d2, v.parts, d2 + 1)
        return self._unknown(node, f"reshape {ins} -> {out} of attention heads not understood")

    def _attr_reshape(self, node: fx.Node, v: _Attr, ins: tuple[int, ...], out: tuple[int, ...]) -> Val:
        """A per-unit vector viewed with singleton dims (gamma.view(1, -1, 1, 1)) stays a parameter axis."""
        big_in = [i for i, s in enumerate(ins) if s != 1]
        big_out = [i for i, s in enumerate(out) if s != 1]
        amap = v.axis_map()
        if len(big_in) == 1 and len(big_out) == 1 and big_in[0] in amap and ins[big_in[0]] == out[big_out[0]]:
            return _Attr(v.target, ((big_out[0], amap[big_in[0]]),))
        self._opaque_use(node, v, "reshaped")
        return _CONST

    def permute(self, node: fx.Node, x: fx.Node, order: list[int] | None) -> Val:
        """New axis i is old axis order[i]: the unit axis moves with it."""
        v = self.val.get(x)
        if order is None:
            return self._unknown(node, "permutation of axes not understood")
        if isinstance(v, _Flow):
            return _Flow(order.index(v.dim), v.parts, None if v.inner is None else order.index(v.inner))
        if isinstance(v, _Attr):
            return _Attr(v.target, tuple((order.index(a), p) for a, p in v.axes))
        return _plain(v) if node in self.shapes else None

    def reduce(self, node: fx.Node, x: fx.Node, dims: Any) -> Val:
        """Reductions over the unit axis are invariant; over other axes they keep the set."""
        v, ins, out = self.val.get(x), self.shapes.get(x), self.shapes.get(node)
        if out is None or ins is None:
            return self._unknown(node, "reduction with a non-tensor result")
        if not isinstance(v, _Flow):
            self._opaque_use(node, v, "reduced")
            return _plain(v)
        if dims is None or dims is _UNKNOWN or len(out) == 0:
            return _CONST if len(out) == 0 else self._unknown(node, "reduction over unknown dims")
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not dims:
            return _CONST
        dims = [r % len(ins) for r in dims]
        if v.dim in dims:
            return _CONST
        keepdim = len(out) == len(ins)
        return self._keep(node, _Flow(v.dim if keepdim else v.dim - sum(r < v.dim for r in dims), v.parts))

    def spatial(self, node: fx.Node, x: fx.Node, rank: int) -> Val:
        """Pooling / padding / interpolation over the last `rank` axes (rank < 0: all but the first -rank)."""
        v, ins = self.val.get(x), self.shapes.get(x)
        if node not in self.shapes or ins is None:
            return self._unknown(node, "pooling with a non-tensor result (return_indices?)")
        if not isinstance(v, _Flow):
            self._opaque_use(node, v, "pooled")
            return _plain(v)
        rank = len(ins) + rank if rank < 0 else rank
        if v.dim >= len(ins) - rank or len(self.shapes[node]) != len(ins):
            return self._unknown(node, "pools, pads or resizes the unit axis")
        return self._keep(node, v)

    def getitem(self, node: fx.Node) -> Val:
        base, idx = node.args[0], self._concrete(node.args[1])
        if node not in self.shapes:
            return None
        if isinstance(base, fx.Node) and isinstance(self.val.get(base), _Tuple) and isinstance(idx, int):
            items = cast(_Tuple, self.val[base]).items
            return cast(Val, items[idx]) if -len(items) <= idx < len(items) else None
        if not isinstance(base, fx.Node) or base not in self.shapes:
            # a tensor out of an untracked tuple: never permuted (opaque if that tuple came from units)
            bv = self.val.get(base) if isinstance(base, fx.Node) else None
            return bv if isinstance(bv, _OpaqueT) else _FIXED
        v, ndim = self.val.get(base), len(self.shapes[base])
        mapping = _index_map(idx, ndim, self.shapes[base])
        if mapping is None:
            return self._unknown(node, "advanced indexing")
        if isinstance(v, _Flow):
            new, full = mapping.get(v.dim, (None, False))
            if new is None or not full:
                return self._unknown(node, "indexes or slices the unit axis")
            if v.inner is not None:
                new_inner, full_inner = mapping.get(v.inner, (None, False))
                if new_inner is None or not full_inner:
                    return self._unknown(node, "indexes or slices the units within attention heads")
                return _Flow(new, v.parts, new_inner)
            return _Flow(new, v.parts)
        if isinstance(v, _Attr):
            axes = []
            for a, p in v.axes:
                new, full = mapping.get(a, (None, False))
                if new is None or not full:
                    self._opaque_use(node, v, "indexed")
                    return _CONST
                axes.append((new, p))
            return _Attr(v.target, tuple(axes))
        return _plain(v)

    def cat(self, node: fx.Node, tensors: Sequence[fx.Node], dim: int) -> Val:
        """Concatenation along the unit axis lays the inputs' sets side by side (constant inputs become
        fixed parts); along another axis it unites the sets like an elementwise op."""
        out = self.shapes.get(node)
        if out is None or not all(isinstance(t, fx.Node) and t in self.shapes for t in tensors):
            return self._unknown(node, "concatenation of non-tensors")
        d = dim % len(out)
        vals = [self.val.get(t) for t in tensors]
        flows = [v for v in vals if isinstance(v, _Flow)]
        if not flows:
            for v in vals:
                self._opaque_use(node, v, "concatenated")
            return _combine_fixed(vals)
        if any(f.inner is not None for f in flows):
            return self._unknown(node, "concatenation of attention heads")
        if all(f.dim == d for f in flows):
            parts: list[_Part] = []
            off = 0
            for t, v in zip(tensors, vals):
                if isinstance(v, _Flow):
                    parts += [replace(p, offset=p.offset + off) for p in v.parts]
                else:
                    self._opaque_use(node, v, "concatenated")
                    part = self.sets.new(self.shapes[t][d])
                    self.sets.fix(part, origin=v.origin if isinstance(v, _OpaqueT) else None)
                    parts.append(_Part(part, 1, off, None))
                off += self.shapes[t][d]
            return _Flow(d, tuple(parts))
        if all(f.dim != d for f in flows):
            return self.elementwise(node, list(tensors))
        return self._unknown(node, "concatenation mixing the unit axis with another axis")

    def split(self, node: fx.Node, x: fx.Node) -> Val:
        """split / chunk / tensor_split: pieces along another axis keep the units; pieces along the unit
        axis of a layer's fresh output (q, k, v = qkv(x).chunk(3, -1)) split its set into one set per
        piece (the layer's output rows at the pieces' offsets)."""
        shapes, ins = self.tuple_shapes.get(node), self.shapes.get(x)
        dim = self._concrete(_arg(node, 2, "dim", 0))
        if shapes is None or ins is None or not isinstance(dim, int):
            return self._unknown(node, "split into pieces not understood")
        d = dim % len(ins)
        v = self.val.get(x)
        if not isinstance(v, _Flow):
            self._opaque_use(node, v, "split")
            return _Tuple(tuple(_plain(v) for _ in shapes))
        if d != v.dim and d != v.inner:
            return _Tuple(tuple(v for _ in shapes))
        p = v.parts[0]
        s = self.sets.find(p.set)
        fresh = (
            v.inner is None
            and len(v.parts) == 1
            and p.block == 1
            and p.offset == 0
            and s == p.set
            and self.sets.blocks[s] == 1
            and not self.sets.fixed[s]
            and not any(self.sets.find(i) == s for i in range(len(self.sets.parent)) if i != s)
            and list(x.users) == [node]
        )
        if not fresh:
            return self._unknown(node, "splits units that are not one layer's own output")
        sizes = [shape[d] for shape in shapes]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        opener = self.sets.opener[s]
        new = [self.sets.new(n, opener=f"{opener}.{i}") for i, n in enumerate(sizes)]
        refs = []
        for t, ref in self.refs:
            if self.sets.find(t) != s:
                refs.append((t, ref))
                continue
            for piece, start in zip(new, starts):
                refs.append((piece, replace(ref, offset=ref.offset + start * ref.block)))
        self.refs = refs
        self.acts = [(t, a) for t, a in self.acts if self.sets.find(t) != s]
        self.opened = {k: t for k, t in self.opened.items() if t != s}
        self.sets.fix(s)  # the unsplit set has no tensors left
        return _Tuple(tuple(_Flow(v.dim, (_Part(piece, 1, 0, None),)) for piece in new))

    # ---- layers

    def _consume(self, node: fx.Node, v: Val, weight: str, axis: int) -> None:
        """The layer's input axis `axis` of `weight` joins the incoming sets (part by part)."""
        if isinstance(v, _Flow):
            for p in v.parts:
                self._ref(p.set, AxisRef(weight, axis, p.block, p.offset))
                if p.src is not None:
                    self.acts.append((p.set, p.src))
        else:  # a constant input: the layer's input axis stays as it is
            self._opaque_use(node, v, "fed to a layer")
            self._pin([(weight, axis)])

    def _open(
        self, node: fx.Node, key: str, opener: str, size: int, refs: list[tuple[str, int]], out_dim: int
    ) -> _Flow:
        s = self.opened.get(key)
        if s is None:
            s = self.opened[key] = self.sets.new(size, opener=opener)
        for tensor, axis in refs:
            if tensor in self.state:
                self._ref(s, AxisRef(tensor, axis))
        return _Flow(out_dim, (_Part(s, 1, 0, node.name if out_dim == 1 else None),))

    def embedding(self, node: fx.Node, x: fx.Node, weight: str, dim: int, opener: str) -> Val:
        """Rows of W (vocabulary × dim) looked up by indices: opens a set of `dim` units on W axis 1."""
        v = self.val.get(x)
        if isinstance(v, _Flow):
            self._hazard(node, "embedding indices carry units", v)
        out = self.shapes.get(node)
        if out is None:
            return self._unknown(node, "embedding with a non-tensor result")
        return self._open(node, f"{weight} axis 1", opener, dim, [(weight, 1)], len(out) - 1)

    def linear(
        self,
        node: fx.Node,
        x: fx.Node,
        weight: str,
        bias: str | None,
        out_features: int,
        opener: str,
        transposed: bool = False,
    ) -> Val:
        """y = x Wᵀ + b over the last axis: opens a set (W axis 0, b); W axis 1 joins the input's sets.
        `transposed`: W is stored in×out (y = x W + b, transformers' Conv1D): the axes swap."""
        v, ins, out = self.val.get(x), self.shapes.get(x), self.shapes.get(node)
        if ins is None or out is None or weight not in self.state:
            return self._unknown(node, "linear layer on a non-tensor or with a weight outside the state_dict")
        w_out, w_in = (1, 0) if transposed else (0, 1)
        if isinstance(v, _Flow) and v.dim != len(ins) - 1:
            # acts along another axis: units pass through; its own outputs are not permuted
            self._pin([(weight, 0), (weight, 1)] + ([(bias, 0)] if bias else []))
            return v
        self._consume(node, v, weight, w_in)
        key = f"{weight} axis 1" if transposed else weight  # a tied embedding opens W axis 1 too
        return self._open(
            node, key, opener, out_features, [(weight, w_out)] + ([(bias, 0)] if bias else []), len(out) - 1
        )

    def conv(
        self,
        node: fx.Node,
        x: fx.Node,
        weight: str,
        bias: str | None,
        in_ch: int,
        out_ch: int,
        groups: int,
        transposed: bool,
        opener: str,
    ) -> Val:
        """Conv over dim 1: opens a set (W axis 0; axis 1 if transposed) and W's input axis joins the
        input's sets. Depthwise (groups == in_channels): keeps the sets, W/b axis 0 join them with block
        × out/in."""
        v, ins = self.val.get(x), self.shapes.get(x)
        if ins is None or node not in self.shapes or weight not in self.state:
            return self._unknown(node, "convolution on a non-tensor or with a weight outside the state_dict")
        if isinstance(v, _Flow) and v.dim != 1:
            return self._unknown(node, "convolution whose channel axis is not the unit axis")
        if groups == 1:
            in_axis, out_axis = (0, 1) if transposed else (1, 0)
            self._consume(node, v, weight, in_axis)
            return self._open(node, weight, opener, out_ch, [(weight, out_axis)] + ([(bias, 0)] if bias else []), 1)
        if not transposed and groups == in_ch and out_ch % in_ch == 0:
            mult = out_ch // in_ch
            if not isinstance(v, _Flow):
                self._pin([(weight, 0)] + ([(bias, 0)] if bias else []))
                return _plain(v)
            parts = []
            for p in v.parts:
                for t in (weight, bias):
                    if t and t in self.state:
                        self._ref(p.set, AxisRef(t, 0, p.block * mult, p.offset * mult))
                if p.src is not None:
                    self.acts.append((p.set, p.src))
                parts.append(replace(p, block=p.block * mult, offset=p.offset * mult))
            return self._keep(node, _Flow(1, tuple(parts)))
        if not transposed and in_ch % groups == 0 and out_ch % groups == 0:
            return self._grouped_conv(node, v, weight, bias, out_ch, groups, opener)
        return self._unknown(
            node,
            f"grouped convolution (groups={groups}, {in_ch}->{out_ch} channels) is "
            "equivariant only under permutations that respect its groups",
        )

    def _grouped_conv(
        self, node: fx.Node, v: Val, weight: str, bias: str | None, out_ch: int, groups: int, opener: str
    ) -> Val:
        """Conv with 1 < G < in_channels groups: output group g reads input group g only, so input and
        output channels split into G blocks moved by one shared σ; the output's within-block units
        permute freely (W axis 0, b). The input's within-block permutations α_g would have to permute
        W axis 1 separately in each output block, which an AxisRef cannot say: the input set keeps
        only its whole-block permutations (`whole`, a group of G units) and W axis 1 stays put."""
        tensors = [(weight, 0)] + ([(bias, 0)] if bias else [])
        out = self._open(node, weight, opener, out_ch, tensors, 1)
        s_out = out.parts[0].set
        b_out = self.sets.structure(s_out, groups, f"node {node.name} (grouped convolution, {groups} groups)")
        self._pin([(weight, 1)])
        if not isinstance(v, _Flow):  # the network input (or a constant): its blocks cannot move
            self._opaque_use(node, v, "fed to a layer")
            self.sets.fix(b_out)
            return out
        p = v.parts[0] if len(v.parts) == 1 else None
        if v.inner is not None or p is None or p.block != 1 or p.offset != 0:
            return self._unknown(
                node,
                f"grouped convolution ({groups} groups) on a concatenation or flattened units (only one "
                "unit set on the channel axis can be split into groups)",
            )
        b_in = self.sets.structure(p.set, groups, f"node {node.name} (grouped convolution, {groups} groups)")
        self.sets.whole[self.sets.find(p.set)] = True
        self.sets.union(b_in, b_out, f"node {node.name}")
        return out

    def per_unit(
        self, node: fx.Node, x: fx.Node, tensors: Sequence[tuple[str, int]], dim: int | None, what: str
    ) -> Val:
        """Per-unit op (norm): keeps the sets; axis `a` of each (tensor, a) joins them."""
        v = self.val.get(x)
        if not isinstance(v, _Flow):
            self._pin(tensors)
            return _plain(v) if node in self.shapes else None
        if dim is not None and v.dim != dim:
            return self._unknown(node, f"{what} over an axis other than the unit axis")
        for t, a in tensors:
            if t in self.state:
                for p in v.parts:
                    self._ref(p.set, AxisRef(t, a, p.block, p.offset))
        return self._keep(node, v)

    def layer_norm(self, node: fx.Node, x: fx.Node, k: int, tensors: Sequence[str]) -> Val:
        """LayerNorm over the last k axes: its statistics are invariant; weight/bias axis aligned with the
        unit axis joins the set (none if the unit axis is not normalised)."""
        v, ins = self.val.get(x), self.shapes.get(x)
        if not isinstance(v, _Flow) or ins is None:
            self._pin((t, a) for t in tensors for a in range(k))
            return _plain(v) if node in self.shapes else None
        if v.dim < len(ins) - k:
            self._pin((t, a) for t in tensors for a in range(k))
            return self._keep(node, v)
        return self.per_unit(node, x, [(t, v.dim - (len(ins) - k)) for t in tensors], None, "layer norm")

    def group_norm(self, node: fx.Node, x: fx.Node, groups: int, channels: int, tensors: Sequence[str]) -> Val:
        """GroupNorm: per-unit weight/bias. With 1 < G < C groups the statistics pool each group's C/G
        consecutive channels, so the channels' set becomes block-structured (G blocks: permute whole
        groups, and channels within each group)."""
        if groups not in (1, channels):
            v = self.val.get(x)
            if isinstance(v, _Flow):
                p = v.parts[0] if len(v.parts) == 1 else None
                if v.inner is not None or v.dim != 1 or p is None or p.block != 1 or p.offset != 0:
                    return self._unknown(
                        node,
                        f"GroupNorm with {groups} groups of {channels} channels on a concatenation or "
                        "flattened units (only one unit set on the channel axis can be split into groups)",
                    )
                self.sets.structure(p.set, groups, f"node {node.name} (GroupNorm with {groups} groups)")
        return self.per_unit(node, x, [(t, 0) for t in tensors], 1, "GroupNorm")

    # ---- attention

    def _split_set(self, f: _Flow) -> int:
        return f.parts[0].set

    def _bset(self, f: _Flow) -> int:
        b = self.sets.block_set(self._split_set(f))
        if b is None:  # pragma: no cover - a split flow's set is always structured
            raise SpecError("internal error: attention heads without a block structure")
        return b

    def matmul(self, node: fx.Node, a: Any, b: Any) -> Val:
        """Batched a @ b (contracting a's last axis with b's second-to-last; leading axes broadcast).

        Understood layouts: q·kᵀ contracting the units of both (united; per head when both are split
        flows with their heads on one batch axis: the result carries the heads' block set); a batch axis
        carrying units on one side (scores per head) against heads split on the other (@ v: the block
        sets are united); a unit-free left operand mixing tokens of a right operand's units (or the
        mirror image). Anything else is unknown."""
        out = self.shapes.get(node)
        sa = self.shapes.get(a) if isinstance(a, fx.Node) else None
        sb = self.shapes.get(b) if isinstance(b, fx.Node) else None
        if out is None or sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
            return self._unknown(node, "matmul of vectors or non-tensors")
        va, vb = self.val.get(a), self.val.get(b)
        na, nb, no = len(sa), len(sb), len(out)
        fa = va if isinstance(va, _Flow) else None
        fb = vb if isinstance(vb, _Flow) else None
        where = f"node {node.name}"
        if fa is None and fb is None:
            self._opaque_use(node, va, "multiplied")
            self._opaque_use(node, vb, "multiplied")
            return _combine_fixed([va, vb])

        def pos(ax: int, n: int) -> int | None:  # batch axis of an n-dim operand -> output axis
            return ax + (no - n) if ax < n - 2 else None

        def flat_single(f: _Flow) -> bool:
            return f.inner is None

        def unit_free_at(shape: tuple[int, ...], n: int, out_ax: int | None) -> bool:
            """The other operand is constant along output batch axis `out_ax` (size 1 or absent)."""
            if out_ax is None:
                return True
            ax = out_ax - (no - n)
            return ax < 0 or shape[ax] == 1

        # q·kᵀ: units contracted on both sides
        if fa is not None and fb is not None:
            if flat_single(fa) and flat_single(fb) and fa.dim == na - 1 and fb.dim == nb - 2:
                if not self._same_layout(fa, fb):
                    return self._unknown(node, "matmul contracting different unit layouts")
                for p, q in zip(fa.parts, fb.parts):
                    self.sets.union(p.set, q.set, where)
                return _CONST
            if fa.inner == na - 1 and fb.inner == nb - 2:
                ha, hb = pos(fa.dim, na), pos(fb.dim, nb)
                if ha is None or ha != hb or sa[fa.dim] != sb[fb.dim]:
                    return self._unknown(node, "attention scores whose heads are not on one batch axis")
                self.sets.union(self._split_set(fa), self._split_set(fb), where)
                return _Flow(ha, (_Part(self._bset(fa), 1, 0, None),))
            # scores per head (a batch axis of a) @ values split into heads (b)
            if flat_single(fa) and fb.inner == nb - 1 and len(fa.parts) == 1:
                ha, hb = pos(fa.dim, na), pos(fb.dim, nb)
                if ha is not None and ha == hb and sa[fa.dim] == sb[fb.dim]:
                    self.sets.union(fa.parts[0].set, self._bset(fb), where)
                    return _Flow(ha, fb.parts, no - 1)
            if flat_single(fb) and fa.inner == na - 2 and len(fb.parts) == 1:
                ha, hb = pos(fa.dim, na), pos(fb.dim, nb)
                if hb is not None and ha == hb and sa[fa.dim] == sb[fb.dim]:
                    self.sets.union(fb.parts[0].set, self._bset(fa), where)
                    return _Flow(hb, fa.parts, no - 2)
            if flat_single(fa) and flat_single(fb):
                ha, hb = pos(fa.dim, na), pos(fb.dim, nb)
                if ha is not None and ha == hb and self._same_layout(fa, fb):
                    for p, q in zip(fa.parts, fb.parts):
                        self.sets.union(p.set, q.set, where)
                    return _Flow(ha, fa.parts)
            return self._unknown(node, "matmul of two operands carrying units in a layout not understood")
        if fb is not None:  # unit-free a mixes b's rows (tokens): b's units pass through
            self._opaque_use(node, va, "multiplied")
            if fb.inner is None and fb.dim == nb - 1:
                return _Flow(no - 1, fb.parts)
            if fb.inner == nb - 1 and unit_free_at(sa, na, pos(fb.dim, nb)) and pos(fb.dim, nb) is not None:
                return _Flow(cast(int, pos(fb.dim, nb)), fb.parts, no - 1)
            if fb.inner is None and pos(fb.dim, nb) is not None and unit_free_at(sa, na, pos(fb.dim, nb)):
                return _Flow(cast(int, pos(fb.dim, nb)), fb.parts)
            return self._unknown(node, "matmul contracting units with a tensor that is not permuted with them")
        assert fa is not None
        self._opaque_use(node, vb, "multiplied")
        if fa.inner is None and fa.dim == na - 2:
            return _Flow(no - 2, fa.parts)
        if fa.inner == na - 2 and pos(fa.dim, na) is not None and unit_free_at(sb, nb, pos(fa.dim, na)):
            return _Flow(cast(int, pos(fa.dim, na)), fa.parts, no - 2)
        if fa.inner is None and pos(fa.dim, na) is not None and unit_free_at(sb, nb, pos(fa.dim, na)):
            return _Flow(cast(int, pos(fa.dim, na)), fa.parts)
        return self._unknown(node, "matmul contracting units with a tensor that is not permuted with them")

    def sdpa(self, node: fx.Node) -> Val:
        """F.scaled_dot_product_attention(q, k, v, attn_mask, …): softmax(q kᵀ·scale + mask) v per head.

        q and k share their units (per head: heads and within-head units), v's heads follow q's, the
        output carries v's units. A mask must be constant along the heads' axis."""
        q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
        mask = _arg(node, 3, "attn_mask")
        out = self.shapes.get(node)
        if out is None or not all(isinstance(t, fx.Node) and t in self.shapes for t in (q, k, v)):
            return self._unknown(node, "attention on non-tensors")
        fq, fk, fv = (self.val.get(t) for t in (q, k, v))
        no = len(out)
        if not all(isinstance(f, _Flow) for f in (fq, fk, fv)):
            if any(isinstance(f, _Flow) for f in (fq, fk, fv)):
                return self._unknown(node, "attention with some of q, k, v unpermuted")
            return _combine_fixed([fq, fk, fv])
        fq, fk, fv = cast(_Flow, fq), cast(_Flow, fk), cast(_Flow, fv)
        where = f"node {node.name}"
        mask_v = self.val.get(mask) if isinstance(mask, fx.Node) else None
        if isinstance(mask_v, _Flow):
            return self._unknown(node, "attention mask carrying units")
        if fq.inner is None and fk.inner is None and fv.inner is None:
            nq, nk, nv = (len(self.shapes[t]) for t in (q, k, v))
            if fq.dim == nq - 1 and fk.dim == nk - 1 and fv.dim == nv - 1 and self._same_layout(fq, fk):
                for p, r in zip(fq.parts, fk.parts):
                    self.sets.union(p.set, r.set, where)
                return _Flow(no - 1, fv.parts)
            return self._unknown(node, "single-head attention with units off the feature axis")
        if any(f.inner is None for f in (fq, fk, fv)):
            return self._unknown(node, "attention with heads split on only some of q, k, v")
        layouts = {
            (f.dim - len(self.shapes[t]), cast(int, f.inner) - len(self.shapes[t]))
            for f, t in ((fq, q), (fk, k), (fv, v))
        }
        h, inner = next(iter(layouts))
        if len(layouts) != 1 or inner != -1 or h >= -2:
            return self._unknown(node, "attention whose q, k, v heads are not on one batch axis")
        if isinstance(mask, fx.Node) and mask in self.shapes:
            ms = self.shapes[mask]
            if len(ms) >= -h and ms[h] != 1:
                return self._unknown(node, "attention mask that differs between heads")
        self.sets.union(self._split_set(fq), self._split_set(fk), where)
        self.sets.union(self._bset(fq), self._bset(fv), where)
        return _Flow(no + h, fv.parts, no - 1)

    def multihead_attention(self, node: fx.Node, name: str, m: nn.MultiheadAttention) -> Val:
        """nn.MultiheadAttention: heads of the q/k projections share one block-structured set (opened
        here, heads × head_dim), those of the v projection and out_proj's input another, with the same
        permutation of heads; out_proj opens the output's units. Returns (output, weights)."""
        args = [_arg(node, i, n) for i, n in enumerate(("query", "key", "value"))]
        if not all(isinstance(a, fx.Node) and a in self.shapes for a in args):
            return self._unknown(node, "attention on non-tensors")
        q, k, v = cast(list[fx.Node], args)
        for t in (q, k, v):
            f = self.val.get(t)
            if isinstance(f, _Flow) and (f.inner is not None or f.dim != len(self.shapes[t]) - 1):
                return self._unknown(node, "MultiheadAttention input whose units are not on the feature axis")
        for i, n in ((3, "key_padding_mask"), (5, "attn_mask")):
            mk = _arg(node, i, n)
            if isinstance(mk, fx.Node) and isinstance(self.val.get(mk), _Flow):
                return self._unknown(node, f"{n} carrying units")
        p = f"{name}."
        e, h = m.embed_dim, m.num_heads
        if m._qkv_same_embed_dim:
            for t in (q, k, v):
                self._consume(node, self.val.get(t), p + "in_proj_weight", 1)
            qk_refs = [(p + "in_proj_weight", 0, 0), (p + "in_proj_weight", 0, e)]
            vo_refs = [(p + "in_proj_weight", 0, 2 * e)]
        else:
            for t, w in ((q, "q_proj_weight"), (k, "k_proj_weight"), (v, "v_proj_weight")):
                self._consume(node, self.val.get(t), p + w, 1)
            qk_refs = [(p + "q_proj_weight", 0, 0), (p + "k_proj_weight", 0, 0)]
            vo_refs = [(p + "v_proj_weight", 0, 0)]
        if m.in_proj_bias is not None:
            qk_refs += [(p + "in_proj_bias", 0, 0), (p + "in_proj_bias", 0, e)]
            vo_refs += [(p + "in_proj_bias", 0, 2 * e)]
        if m.bias_k is not None and m.bias_v is not None:
            qk_refs.append((p + "bias_k", 2, 0))
            vo_refs.append((p + "bias_v", 2, 0))
        vo_refs.append((p + "out_proj.weight", 1, 0))
        where = f"node {node.name}"
        qk = self.opened.get(p + "qk")
        if qk is None:
            qk = self.opened[p + "qk"] = self.sets.new(e, opener=f"{name}.qk")
            vo = self.opened[p + "vo"] = self.sets.new(e, opener=f"{name}.vo")
            self.sets.union(self.sets.structure(qk, h, where), self.sets.structure(vo, h, where), where)
            for s_, refs in ((qk, qk_refs), (vo, vo_refs)):
                for tensor, a, off in refs:
                    if tensor in self.state:
                        self._ref(s_, AxisRef(tensor, a, 1, off))
        out_dim = len(self.shapes[q]) - 1
        flow = self._open(
            node,
            p + "out_proj.weight",
            f"{name}.out_proj",
            e,
            [(p + "out_proj.weight", 0)] + ([(p + "out_proj.bias", 0)] if m.out_proj.bias is not None else []),
            out_dim,
        )
        flow = _Flow(out_dim, (replace(flow.parts[0], src=None),))
        need = self._concrete(_arg(node, 4, "need_weights", True))
        average = self._concrete(_arg(node, 6, "average_attn_weights", True))
        weights: Val = None
        if need is not False:
            if average is False:
                bset = self.sets.block_set(qk)
                weights = _Flow(0 if out_dim == 1 else 1, (_Part(cast(int, bset), 1, 0, None),))
            else:
                weights = _CONST
        return _Tuple((flow, weights))

    def _split_arg(self, node: fx.Node) -> bool:
        """Whether an argument of `node` carries attention heads split over two axes."""
        found = False

        def look(n: fx.Node) -> None:
            nonlocal found
            v = self.val.get(n)
            found = found or (isinstance(v, _Flow) and v.inner is not None)

        fx.node.map_arg((node.args, node.kwargs), look)
        return found

    def _split_ok(self, node: fx.Node) -> bool:
        """Ops that understand split (head) flows."""
        t = node.target
        if node.op == "call_method":
            return (
                t in (_ELEMENTWISE_METHODS | _CAST_METHODS | _SHAPE_ONLY_METHODS | _RESHAPE_METHODS | _PERMUTE_METHODS)
                or t in _MATMUL_METHODS
            )
        if node.op == "call_module":
            return isinstance(self.gm.get_submodule(str(t)), _ELEMENTWISE_MODULES)
        return t in (operator.getitem, builtins.getattr) or any(
            _is_in(t, table)
            for table in (_MATMUL_FUNCS, _SDPA_FUNCS, _ELEMENTWISE_FUNCS, _RESHAPE_FUNCS, _PERMUTE_FUNCS)
        )

    # ---- dispatch

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.val[node] = self.visit(node)

    def visit(self, node: fx.Node) -> Val:
        if node.op == "placeholder":
            return self._fresh(node, True)  # the network input: never permuted
        if node.op == "get_attr":
            shape = self.shapes.get(node)
            if shape is None:
                return None
            if node.target in self.state:
                return _Attr(str(node.target), tuple((i, i) for i in range(len(shape))))
            return _CONST
        if node.op == "output":
            for a in self._flat_nodes(node.args):
                v = self.val.get(a)
                for item in v.items if isinstance(v, _Tuple) else (v,):
                    if isinstance(item, _Flow):
                        for p in item.parts:
                            self.sets.fix(p.set)
                    self._opaque_use(node, item, "returned")
            return None
        if self._split_arg(node) and not self._split_ok(node):
            return self._unknown(node, f"{_target_str(node)} on attention heads split over two axes")
        if node.op == "call_module":
            return self.visit_module(node, self.gm.get_submodule(str(node.target)))
        if node.op == "call_method":
            return self.visit_method(node, str(node.target))
        return self.visit_function(node, node.target)

    def _flat_nodes(self, args: Any) -> list[fx.Node]:
        seen: list[fx.Node] = []
        fx.node.map_arg(args, lambda n: seen.append(n))
        return seen

    def visit_module(self, node: fx.Node, m: nn.Module) -> Val:
        name = str(node.target)
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node):
            return self._unknown(node, "module called without a tensor input")
        p = f"{name}."
        if isinstance(m, nn.MultiheadAttention):
            return self.multihead_attention(node, name, m)
        if isinstance(m, nn.Linear):
            return self.linear(node, x, p + "weight", p + "bias" if m.bias is not None else None, m.out_features, name)
        if isinstance(m, nn.modules.conv._ConvNd):
            transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
            return self.conv(
                node,
                x,
                p + "weight",
                p + "bias" if m.bias is not None else None,
                m.in_channels,
                m.out_channels,
                m.groups,
                transposed,
                name,
            )
        if isinstance(m, nn.Embedding):
            return self.embedding(node, x, p + "weight", m.embedding_dim, name)
        if isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm*, SyncBatchNorm, InstanceNorm*
            return self.per_unit(
                node, x, [(p + t, 0) for t in ("weight", "bias", "running_mean", "running_var")], 1, type(m).__name__
            )
        if isinstance(m, LayerNorm2d):
            if len(self.shapes.get(x, ())) != 4:
                return self._unknown(node, "LayerNorm2d on a tensor that is not N×C×H×W")
            return self.per_unit(node, x, [(p + "weight", 0), (p + "bias", 0)], 1, "LayerNorm2d")
        if isinstance(m, nn.LayerNorm):
            return self.layer_norm(node, x, len(m.normalized_shape), [p + "weight", p + "bias"])
        if hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
            return self.layer_norm(node, x, len(m.normalized_shape), [p + "weight"])
        if isinstance(m, nn.GroupNorm):
            return self.group_norm(node, x, m.num_groups, m.num_channels, [p + "weight", p + "bias"])
        if isinstance(m, nn.PReLU):
            if m.num_parameters == 1:
                return self.elementwise(node, [x])
            return self.per_unit(node, x, [(p + "weight", 0)], 1, "PReLU")
        if isinstance(m, _ELEMENTWISE_MODULES):
            return self.elementwise(node, [x])
        if isinstance(m, _POOL_MODULES):
            if getattr(m, "return_indices", False):
                return self._unknown(node, "pooling that returns indices")
            return self.spatial(node, x, _spatial_rank(m))
        if isinstance(m, _PAD_MODULES):
            padding = cast(Sequence[int], m.padding)  # every _PAD_MODULES class declares `padding: Sequence[int]`
            return self.spatial(node, x, len(padding) // 2)
        if isinstance(m, nn.Upsample):
            return self.spatial(node, x, -2)
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return self.reshape(node, x)
        return self._unknown(
            node, f"module {type(m).__name__} is not known to be permutation-equivariant (pass an explicit spec)"
        )

    def visit_method(self, node: fx.Node, name: str) -> Val:
        x = node.args[0]
        if not isinstance(x, fx.Node) or x not in self.shapes:
            return self._unknown(node, "method of a non-tensor") if node in self.shapes else None
        if name in _SHAPE_ONLY_METHODS:
            return None
        if name in ("expand", "expand_as") and isinstance(self.val.get(x), _Attr) and node in self.shapes:
            v, lead = self.val[x], len(self.shapes[node]) - len(self.shapes[x])
            return _Attr(v.target, tuple((a + lead, p) for a, p in v.axes))  # type: ignore[union-attr]
        if name in _ELEMENTWISE_METHODS:
            return self.elementwise(node)
        if name in _CAST_METHODS:
            return self.elementwise(node, [x])
        if name in _RESHAPE_METHODS:
            return self.reshape(node, x)
        if name in _PERMUTE_METHODS:
            return self.permute(node, x, self._order(node, name, len(self.shapes[x])))
        if name in _REDUCE_METHODS:
            return self.reduce(node, x, self._concrete(_arg(node, 1, "dim")))
        if name in _MATMUL_METHODS:
            return self.matmul(node, x, _arg(node, 1, "other"))
        if name in _SPLIT_METHODS:
            return self.split(node, x)
        if name in ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor"):
            return _CONST  # a fresh tensor: only the dtype and device of `self` are used
        return self._unknown(node, f"method .{name}() is not known to be permutation-equivariant")

    def visit_function(self, node: fx.Node, fn: Any) -> Val:
        if fn is operator.getitem:
            return self.getitem(node)
        if fn is builtins.getattr:
            attr = node.args[1]
            if attr in ("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"):
                return None
            if attr in ("T", "mT") and isinstance(node.args[0], fx.Node) and node.args[0] in self.shapes:
                n = len(self.shapes[node.args[0]])
                order = list(range(n))[::-1] if attr == "T" else list(range(n - 2)) + [n - 1, n - 2]
                return self.permute(node, node.args[0], order)
            return self._unknown(node, f"attribute {attr!r}")
        x = node.args[0] if node.args else None
        if _is_in(fn, _CAT_FUNCS):
            tensors = _arg(node, 0, "tensors")
            dim = self._concrete(_arg(node, 1, "dim", 0))
            if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
                return self._unknown(node, "concatenation not understood")
            return self.cat(node, tensors, dim)
        if _is_in(fn, _ELEMENTWISE_FUNCS):  # may start with a scalar: 2 * x
            return self.elementwise(node)
        if _is_in(fn, _MATMUL_FUNCS):
            return self.matmul(node, x, node.args[1] if len(node.args) > 1 else node.kwargs.get("other"))
        if _is_in(fn, _SDPA_FUNCS):
            return self.sdpa(node)
        if _is_in(fn, _SPLIT_FUNCS) and isinstance(x, fx.Node):
            return self.split(node, x)
        if not isinstance(x, fx.Node) or x not in self.shapes:
            if self._tensor_args(node):
                return self._unknown(node, f"{_target_str(node)} is not known to be permutation-equivariant")
            return self._fresh(node, False)  # creation op: a constant
        if _is_in(fn, _RESHAPE_FUNCS):
            return self.reshape(node, x)
        if _is_in(fn, _PERMUTE_FUNCS):
            return self.permute(node, x, self._order(node, _PERMUTE_FUNCS[fn], len(self.shapes[x])))
        if _is_in(fn, _REDUCE_FUNCS):
            return self.reduce(node, x, self._concrete(_arg(node, 1, "dim")))
        if _is_in(fn, _SPATIAL_FUNCS):
            return self.spatial(node, x, _SPATIAL_FUNCS[fn])
        if fn is F.pad:
            pad = self._concrete(_arg(node, 1, "pad"))
            if not isinstance(pad, (list, tuple)):
                return self._unknown(node, "padding not understood")
            return self.spatial(node, x, len(pad) // 2)
        if fn is F.linear or _is_in(fn, _CONV_FUNCS):
            return self._functional_layer(node, fn, x)
        if fn is F.embedding:
            w = _arg(node, 1, "weight")
            wv = self.val.get(w) if isinstance(w, fx.Node) else None
            if not isinstance(wv, _Attr) or wv.axes != ((0, 0), (1, 1)):
                return self._unknown(node, "embedding with a weight that is not a plain parameter")
            return self.embedding(node, x, wv.target, self.shapes[w][1], wv.target.removesuffix(".weight"))
        if fn is F.layer_norm or fn is getattr(F, "rms_norm", None):
            shape = self._concrete(_arg(node, 1, "normalized_shape"))
            k = 1 if isinstance(shape, int) else len(shape) if isinstance(shape, (list, tuple)) else None
            slots = [(2, "weight"), (3, "bias")] if fn is F.layer_norm else [(2, "weight")]
            tensors = self._direct_attrs(node, slots)
            if k is None or tensors is None:
                return self._unknown(node, "layer_norm with untracked weight/bias or shape")
            return self.layer_norm(node, x, k, tensors)
        if fn in (F.batch_norm, F.instance_norm):
            names = [(1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")]
            tensors = self._direct_attrs(node, names)
            if tensors is None:
                return self._unknown(node, f"{fn.__name__} with untracked statistics or affine tensors")
            return self.per_unit(node, x, [(t, 0) for t in tensors], 1, fn.__name__)
        if fn is F.group_norm:
            groups = self._concrete(_arg(node, 1, "num_groups"))
            tensors = self._direct_attrs(node, [(2, "weight"), (3, "bias")])
            if not isinstance(groups, int) or tensors is None:
                return self._unknown(node, "group_norm with untracked weight/bias")
            return self.group_norm(node, x, groups, self.shapes[x][1], tensors)
        return self._unknown(node, f"{_target_str(node)} is not known to be permutation-equivariant")

    def _direct_attrs(self, node: fx.Node, slots: Sequence[tuple[int, str]]) -> list[str] | None:
        """State-dict names of 1-D parameter arguments (None arguments skipped); None if any is untracked."""
        out = []
        for i, name in slots:
            a = _arg(node, i, name)
            if a is None:
                continue
            v = self.val.get(a) if isinstance(a, fx.Node) else None
            if not isinstance(v, _Attr) or v.axes != ((0, 0),):
                return None
            out.append(v.target)
        return out

    def _functional_layer(self, node: fx.Node, fn: Any, x: fx.Node) -> Val:
        w_node, b_node = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        wv = self.val.get(w_node) if isinstance(w_node, fx.Node) else None
        bv = self.val.get(b_node) if isinstance(b_node, fx.Node) else None
        w_shape = self.shapes.get(w_node) if isinstance(w_node, fx.Node) else None
        transposed = fn is F.linear and isinstance(wv, _Attr) and wv.axis_map() == {0: 1, 1: 0}  # F.linear(x, W.t())
        if (
            not isinstance(wv, _Attr)
            or w_shape is None
            or (wv.axes != tuple((i, i) for i in range(len(w_shape))) and not transposed)
            or (b_node is not None and (not isinstance(bv, _Attr) or bv.axes != ((0, 0),)))
        ):
            return self._unknown(node, f"{_target_str(node)} with a weight that is not a plain parameter")
        opener = wv.target[: -len(".weight")] if wv.target.endswith(".weight") else wv.target
        bias = bv.target if isinstance(bv, _Attr) else None
        if fn is F.linear:
            return self.linear(node, x, wv.target, bias, w_shape[0], opener, transposed)
        groups = self._concrete(_arg(node, 6, "groups", 1))
        if not isinstance(groups, int):
            return self._unknown(node, "convolution with unknown groups")
        return self.conv(node, x, wv.target, bias, w_shape[1] * groups, w_shape[0], groups, False, opener)

    def _order(self, node: fx.Node, name: str, ndim: int) -> list[int] | None:
        """New-axis -> old-axis list for permute/transpose/movedim/t."""
        args = [self._concrete(a) for a in node.args[1:]]
        try:
            if name == "permute":
                dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
                dims = dims or list(self._concrete(node.kwargs.get("dims", ())))
                return [int(d) % ndim for d in dims]
            if name in ("transpose", "swapaxes", "swapdims"):
                a = args[0] if args else self._concrete(node.kwargs.get("dim0", node.kwargs.get("axis0")))
                b = args[1] if len(args) > 1 else self._concrete(node.kwargs.get("dim1", node.kwargs.get("axis1")))
                order = list(range(ndim))
                a, b = int(a) % ndim, int(b) % ndim
                order[a], order[b] = order[b], order[a]
                return order
            if name in ("movedim", "moveaxis"):
                src = args[0] if args else self._concrete(node.kwargs.get("source"))
                dst = args[1] if len(args) > 1 else self._concrete(node.kwargs.get("destination"))
                src = [src] if isinstance(src, int) else list(src)
                dst = [dst] if isinstance(dst, int) else list(dst)
                src, dst = [s % ndim for s in src], [d % ndim for d in dst]
                order = [i for i in range(ndim) if i not in src]
                for d_, s_ in sorted(zip(dst, src)):
                    order.insert(d_, s_)
                return order
            if name == "t":
                return [1, 0] if ndim == 2 else list(range(ndim))
        except (TypeError, ValueError, IndexError):
            return None
        return None

    # ---- result

    def _tie_aliases(self) -> None:
        """A tied parameter (one tensor under several state_dict names, e.g. GPT-2's wte and lm_head)
        gets every axis claim, pin and opaque use under all its names, so it stays tied."""
        tied: dict[str, list[str]] = {}
        for name, first in canonical_names(self.model).items():
            tied.setdefault(first, []).append(name)
        names = {n: group for group in tied.values() if len(group) > 1 for n in group}
        if names:
            self.refs = [(s, replace(r, tensor=n)) for s, r in self.refs for n in names.get(r.tensor, [r.tensor])]
            self.pinned = {(n, a) for t, a in self.pinned for n in names.get(t, [t])}
            self.opaque = [(node, n, why) for node, t, why in self.opaque for n in names.get(t, [t])]

    def spec(self, meta: dict[str, Any]) -> PermutationSpec:
        self._tie_aliases()
        sets = self.sets
        # tensors claimed at the same (axis, offset) by two sets tie them (shared modules / parameters)
        claims: dict[tuple[str, int, int], tuple[int, int]] = {}
        for s, ref in self.refs:
            key = (ref.tensor, ref.axis, ref.offset)
            if key in claims:
                s0, block0 = claims[key]
                if block0 != ref.block:
                    raise SpecError(
                        f"{ref.tensor} axis {ref.axis} is used with {block0} and {ref.block} entries per unit"
                    )
                sets.union(s0, s, f"{ref.tensor} axis {ref.axis}")
            else:
                claims[key] = (s, ref.block)
            if (ref.tensor, ref.axis) in self.pinned:
                sets.fix(s)
        self._propagate_blocks()
        errors: list[str] = []
        for node, why, ids in self.hazards:
            bad = [i for i in ids if not sets.legit[sets.find(i)]]
            if bad:
                desc = self._describe(node, why)
                errors.append(desc)
                if self.leave_unknown_fixed:
                    for i in bad:
                        sets.fix(i, origin=desc)
        while True:
            self._propagate_blocks()
            permuted = {ref.tensor for s, ref in self.refs if not sets.is_fixed(s)}
            changed = False
            for node, target, why in self.opaque:
                if target in permuted:
                    desc = self._describe(
                        node, f"parameter {target!r} is permuted but also {why} in a way the rules do not cover"
                    )
                    errors.append(desc)
                    if self.leave_unknown_fixed:
                        changed = True
                        for s, ref in self.refs:
                            if ref.tensor == target:
                                sets.fix(s, origin=desc)
            if not changed:
                break
        for r in range(len(sets.parent)):
            if sets.find(r) == r and sets.tainted[r] and not sets.legit[r]:
                errors.extend(sets.origins.get(r, []))
        errors = list(dict.fromkeys(errors))
        if errors and not self.leave_unknown_fixed:
            raise SpecError(
                "cannot derive a permutation spec: an op touches hidden units and is not known to be "
                "permutation-equivariant, so they would be left unpermuted (pass leaf_modules, an explicit "
                "spec, or leave_unknown_fixed=True to leave them fixed and say so):\n  " + "\n  ".join(errors)
            )
        meta["left_fixed"] = errors
        left = [(s, ref) for s, ref in self.refs if sets.tainted[sets.find(s)] and not sets.legit[sets.find(s)]]
        meta["left_fixed_units"] = sorted(
            {f"{sets.opener[sets.find(s)] or 'concatenated input'} ({sets.size[sets.find(s)]} units)" for s, _ in left}
        )
        meta["left_fixed_axes"] = sorted({f"{ref.tensor} axis {ref.axis}" for _, ref in left})
        roots: dict[int, list[AxisRef]] = {}
        acts: dict[int, list[str]] = {}
        for s, ref in self.refs:
            r = sets.find(s)
            if not sets.fixed[r] and ref not in roots.setdefault(r, []):
                roots[r].append(ref)
        for s, name in self.acts:
            r = sets.find(s)
            if r in roots and name not in acts.setdefault(r, []):
                acts[r].append(name)
        groups = []
        heads = {sets.block_set(r) for r in roots if sets.blocks[sets.find(r)] > 1}
        for r in sorted(roots):  # roots are the earliest set of their class: graph order of openers
            opener = sets.opener[r]
            if opener is None:  # pragma: no cover - only openers create non-fixed sets
                raise SpecError("internal error: a permuted unit set without an opening layer")
            b = sets.block_set(r)
            size, refs = sets.size[r], tuple(roots[r])
            if b is not None and sets.whole[r]:  # read by a grouped conv: only whole blocks move
                d = size // sets.blocks[r]
                size, refs = sets.blocks[r], tuple(replace(a, block=a.block * d) for a in refs)
                name, blocks, block_perm = f"P_{opener}", size, f"H_{sets.opener[b]}"
            elif b is not None:  # structured: blocks moved by the permutation of set b
                name, blocks, block_perm = f"P_{opener}", sets.blocks[r], f"H_{sets.opener[b]}"
            elif r in heads:  # a set of whole blocks with tensors of its own (one entry per head)
                name, blocks, block_perm = f"P_{opener}.heads", sets.size[r], f"H_{opener}"
            else:
                name, blocks, block_perm = f"P_{opener}", 1, None
            groups.append(
                PermGroup(
                    name,
                    size,
                    refs,
                    tuple(sorted(acts.get(r, []), key=self.order.__getitem__)) if blocks == 1 else (),
                    blocks,
                    block_perm,
                )
            )
        return PermutationSpec(tuple(groups), meta=meta)

    def _propagate_blocks(self) -> None:
        """A structured set and its block set are fixed together (if the blocks cannot move, fixing the
        structured set is the conservative choice; if it is fixed, σ must be the identity)."""
        sets = self.sets
        changed = True
        while changed:
            changed = False
            for i in range(len(sets.parent)):
                r = sets.find(i)
                b = sets.block_set(r)
                if r != i or b is None or sets.fixed[r] == sets.fixed[b]:
                    continue
                src, dst = (r, b) if sets.fixed[r] else (b, r)
                sets.fixed[dst] = True
                sets.legit[dst] = sets.legit[dst] or sets.legit[src]
                sets.tainted[dst] = sets.tainted[dst] or sets.tainted[src]
                sets.origins.setdefault(dst, []).extend(sets.origins.get(src, []))
                changed = True

    def _describe(self, node: fx.Node, why: str) -> str:
        return f"node {node.name!r} ({node.op} {_target_str(node)}) at {_source_line(node, self.model)}: {why}"


def _index_map(idx: Any, ndim: int, shape: tuple[int, ...]) -> dict[int, tuple[int | None, bool]] | None:
    """Basic indexing: old axis -> (new axis or None if removed, whether the axis is taken whole)."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(not (it is None or it is Ellipsis or isinstance(it, (int, slice))) or isinstance(it, bool) for it in items):
        return None
    consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
    expanded: list[Any] = []
    for it in items:
        if it is Ellipsis:
            expanded += [slice(None)] * (ndim - consuming)
        else:
            expanded.append(it)
    expanded += [slice(None)] * (ndim - sum(1 for it in expanded if it is not None))
    mapping: dict[int, tuple[int | None, bool]] = {}
    old = new = 0
    for it in expanded:
        if it is None:
            new += 1
            continue
        if old >= ndim:
            return None
        if isinstance(it, int):
            mapping[old] = (None, False)
        else:
            if any(v is _UNKNOWN for v in (it.start, it.stop, it.step)):
                full = False
            else:
                full = it.indices(shape[old]) == (0, shape[old], 1)
            mapping[old] = (new, full)
            new += 1
        old += 1
    return mapping


# ------------------------------------------------------------------------------------ API


def derive_spec(
    model: nn.Module,
    example_input: ExampleInput | None = None,
    *,
    leaf_modules: tuple[type, ...] = (),
    leave_unknown_fixed: bool = False,
    tracer: str = "auto",
) -> PermutationSpec:
    """The permutation spec of `model`, derived from its fx graph (see the module docstring).

    Never silently partial: an op the rules do not cover that touches hidden units raises SpecError
    naming it, its node and source line, also when its result only feeds a residual stream (which it
    would otherwise fix). With ``leave_unknown_fixed=True`` those units are left unpermuted instead,
    and ``spec.meta["left_fixed"]`` lists the ops, ``spec.meta["left_fixed_units"]`` the unit sets and
    ``spec.meta["left_fixed_axes"]`` the tensor axes that stay unpermuted because of them.
    ``spec.meta["coverage"]`` is the fraction of the model's parameter entries in tensors the spec
    permutes (:func:`lmclab.permutation.spec.coverage`).

    `example_input` (a tensor, or a tuple for several inputs) fixes the shapes, e.g. H·W of a
    conv→flatten→linear; by default :func:`example_input_for` guesses one (a 32×32 image for a first
    Conv2d, a feature vector for a first Linear). The model's modules run once in eval mode under
    no_grad; training flags and BN statistics are left as they were.

    `tracer`: ``"fx"`` (symbolic tracing, :func:`trace_model`), ``"export"`` (``torch.export`` on
    `example_input`, translated by :func:`lmclab.permutation.export.export_graph`: for models fx cannot
    trace, e.g. the ``transformers`` package's GPT-2 and BERT; needs an example input, no leaf_modules),
    or ``"auto"`` (fx, and export when fx cannot trace the model and an example input is given).
    ``spec.meta["tracer"]`` says which was used. Export-derived specs list no activations (their node
    names are not those of :func:`trace_model`, which activation capture uses).
    """
    if tracer not in ("auto", "fx", "export"):
        raise ValueError(f"unknown tracer {tracer!r}; valid: 'auto', 'fx', 'export'")
    gm: fx.GraphModule | None = None
    fx_error: SpecError | None = None
    if tracer != "export":
        try:
            gm = trace_model(model, leaf_modules)
        except SpecError as err:
            if tracer == "fx" or example_input is None:
                raise SpecError(f"{err} (with an example_input, tracer='export' may capture it)") from err
            fx_error = err
    if gm is None:
        if example_input is None:
            raise SpecError("tracer='export' needs an example_input")
        if leaf_modules:
            raise SpecError("leaf_modules apply to the fx tracer only, not to tracer='export'")
        try:
            gm = export_graph(model, example_input if isinstance(example_input, tuple) else (example_input,))
        except SpecError as err:
            raise SpecError(f"{fx_error}; and {err}" if fx_error is not None else str(err)) from err
        tracer = "export"
    if example_input is None:
        example_input = example_input_for(model, gm)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    prop = _Prop(gm)
    try:
        with eval_mode(model), torch.no_grad():
            prop.propagate(*inputs)
    except Exception as err:  # noqa: BLE001
        shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
        raise SpecError(
            f"running {type(model).__name__} on an example input of shape {shapes} failed: {err}; "
            "pass a fitting example_input"
        ) from err
    d = _Deriver(model, gm, prop, leave_unknown_fixed)
    d.run()
    if tracer == "export":
        d.acts = []  # node names of the translated graph: not capturable by lmclab.permutation.activations
    spec = d.spec(
        {
            "derived_from": type(model).__name__,
            "example_input_shape": [list(t.shape) for t in inputs if isinstance(t, torch.Tensor)],
            "tracer": "export" if tracer == "export" else "fx",
        }
    )
    try:
        spec.check(model.state_dict())
    except SpecError as err:
        raise SpecError(
            f"derived spec of {type(model).__name__} is inconsistent (a layer reading a "
            f"concatenation whose only permuted part is at offset 0 cannot be expressed): {err}"
        ) from err
    cast(dict[str, Any], spec.meta)["coverage"] = coverage(spec, dict(model.named_parameters()))
    return spec


def spec_for(
    model: nn.Module,
    spec: PermutationSpec | None = None,
    example_input: ExampleInput | None = None,
    *,
    leaf_modules: tuple[type, ...] = (),
    leave_unknown_fixed: bool = False,
    tracer: str = "auto",
) -> PermutationSpec:
    """`spec` after ``spec.check(model.state_dict())`` if given, else :func:`derive_spec` of `model`."""
    if spec is not None:
        spec.check(model.state_dict())
        return spec
    return derive_spec(
        model, example_input, leaf_modules=leaf_modules, leave_unknown_fixed=leave_unknown_fixed, tracer=tracer
    )
