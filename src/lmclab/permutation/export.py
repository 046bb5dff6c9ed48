"""Capture a model with ``torch.export`` and translate its ATen graph into the torch-level fx graph that
:mod:`lmclab.permutation.derive` reads.

Some models cannot be traced symbolically by ``torch.fx``: their forward indexes or assigns into
tensors, branches on shapes or dtypes, or builds cache objects (the GPT-2 and BERT classes of the
``transformers`` package). ``torch.export.export(model, inputs, strict=False)`` runs the forward once on
fake tensors and records the ATen ops it dispatches (pre-dispatch IR: ``aten.linear``,
``aten.layer_norm``, ``aten.embedding``, ``aten.scaled_dot_product_attention``, views, …), so Python
control flow is resolved for the example input's shapes.

:func:`export_graph` rewrites that graph node by node into the functions the deriver knows, with the
same values:

* parameters and buffers become ``get_attr`` nodes named by the model's own qualified names, so the
  spec's tensor names are the model's state_dict keys (a tied parameter, which export lists once,
  takes its first state_dict name; the deriver gives every alias the same axes);
* ``aten.linear`` → ``F.linear``; ``aten.addmm(b, x, W)`` / ``aten.mm(x, W)`` with a parameter W
  (``transformers``' Conv1D, weight stored in×out) → ``F.linear(x, W.t(), b)``;
  ``aten.embedding(W, i)`` → ``F.embedding(i, W)``; ``aten.layer_norm`` / ``rms_norm`` /
  ``group_norm`` / ``batch_norm`` / ``convNd`` / pooling → their ``F`` functions;
  ``aten.scaled_dot_product_attention`` → ``F.scaled_dot_product_attention``; views, reshapes,
  transposes, splits, elementwise ops → the torch functions of the same name; ``aten.slice`` /
  ``aten.select`` → indexing; ``aten.expand`` / ``to`` / ``new_*`` → the tensor methods;
  ``alias`` / ``contiguous`` / ``clone`` / ``detach`` are dropped (identity);
* every other op (mask arithmetic: ``arange``, comparisons, ``index``, ``cumsum``, ``gather`` …) stays
  the ATen op itself. The deriver treats it as unknown: harmless on tensors without hidden units (a
  causal or padding mask built from the input's shape), a named error (op, node, source line of the
  model's code, copied from export's stack traces) where it touches hidden units.

``nn.MultiheadAttention`` is exported through PyTorch's ``F.multi_head_attention_forward``, whose
layout (heads merged into the batch axis, the fused projection unflattened to (3, E) and selected)
the deriver does not follow; during export each self-attention instance (query, key and value one
tensor, no bias_k/bias_v, no add_zero_attn) runs :func:`_self_attention` instead: the same function
written with one fused ``F.linear``, ``chunk``, a (N, h, L, d) head layout, its masks as one additive
mask broadcast over the heads, and ``F.scaled_dot_product_attention`` (or softmax(q kᵀ/√d) v when the
weights are asked for). Other uses keep PyTorch's forward (and the deriver names what it refuses).

The translated graph is run on the example input and must reproduce the outputs of the model, with
its own forwards, else :class:`SpecError` (a translation that changed the function would give a wrong
spec).
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.nn.modules.transformer as transformer_module
from torch import nn
from torch.utils._pytree import tree_leaves

from lmclab.permutation.spec import SpecError

__all__ = ["export_graph", "canonical_names", "eval_mode"]


def canonical_names(model: nn.Module) -> dict[str, str]:
    """state_dict key -> the first key holding the same tensor (tied weights share one name)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        out[name] = first.setdefault(id(t), name)
    return out


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily put every submodule in eval mode (no BN statistics updates); restore flags after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# ------------------------------------------------------------------------------ self-attention


def _additive(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """nn.MultiheadAttention's mask convention (bool True = not attended, float = added) as a float."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)


def _self_attention(
    self: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.MultiheadAttention.forward for self-attention on batched inputs, in ops the deriver follows:
    softmax((x W_q)(x W_k)ᵀ/√d + M) (x W_v) per head, then out_proj; M = attn_mask + key_padding_mask
    (additive, broadcast over heads). `is_causal` is only a hint that attn_mask is causal."""
    x = query if self.batch_first else query.transpose(0, 1)
    n, length, e = x.shape
    h = self.num_heads
    d = e // h
    q, k, v = (
        t.view(n, length, h, d).transpose(1, 2)
        for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, -1)
    )
    mask = _additive(attn_mask, x)
    if mask is not None and mask.dim() == 3:  # (N·h, L, S)
        mask = mask.view(n, h, length, length)
    pad = _additive(key_padding_mask, x)
    if pad is not None:
        pad = pad.view(n, 1, 1, length)
        mask = pad if mask is None else mask + pad
    p = self.dropout if self.training else 0.0
    weights: torch.Tensor | None = None
    if need_weights:
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
        w = (scores if mask is None else scores + mask).softmax(dim=-1)
        y = F.dropout(w, p, self.training) @ v
        weights = w.mean(dim=1) if average_attn_weights else w
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    out = F.linear(y.transpose(1, 2).reshape(n, length, e), self.out_proj.weight, self.out_proj.bias)
    return (out if self.batch_first else out.transpose(0, 1)), weights


def _plain_self_attention(m: nn.MultiheadAttention) -> Callable[..., Any]:
    original = m.forward

    def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if query is key and key is value and query.dim() == 3:
            return _self_attention(m, query, key, value, *args, **kwargs)
        return original(query, key, value, *args, **kwargs)

    return forward


def _no_causal_detection(mask: torch.Tensor | None, is_causal: bool | None = None, size: int | None = None) -> bool:
    """nn.Transformer*'s ``_detect_is_causal_mask`` without comparing the mask's values (data-dependent
    control flow, which export cannot capture): the flag is only a hint passed to the attention, which
    :func:`_self_attention` ignores (it always applies the mask)."""
    return bool(is_causal)


@contextlib.contextmanager
def _exportable(model: nn.Module) -> Iterator[None]:
    """nn.MultiheadAttention self-attention runs :func:`_self_attention` (module docstring); PyTorch's
    fused fast path is off; nn.Transformer* do not inspect mask values (:func:`_no_causal_detection`)."""

    patched = [
        m
        for m in model.modules()
        if isinstance(m, nn.MultiheadAttention)
        and m._qkv_same_embed_dim
        and m.bias_k is None
        and not m.add_zero_attn
        and "forward" not in vars(m)
    ]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    detect = transformer_module._detect_is_causal_mask
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        if patched:
            transformer_module._detect_is_causal_mask = _no_causal_detection
        for m in patched:
            m.forward = _plain_self_attention(m)  # type: ignore[method-assign]
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        transformer_module._detect_is_causal_mask = detect
        for m in patched:
            del m.forward


# ------------------------------------------------------------------------------ the op table

Call = tuple[str, Any, tuple[Any, ...], dict[str, Any]]  # (fx op, target, args, kwargs)
_IDENTITY = object()  # the node's value is its first argument
_DROP = object()  # an assertion without users


def _fn(target: Callable[..., Any], *names: str, kw: tuple[str, ...] = ()) -> Callable[[dict[str, Any]], Call]:
    """call_function target(*a[names], **{k: a[k] for k in kw}) (absent names end the positional list)."""

    def make(a: dict[str, Any]) -> Call:
        args = []
        for n in names:
            if n not in a:
                break
            args.append(a[n])
        return "call_function", target, tuple(args), {k: a[k] for k in kw if k in a}

    return make


def _method(name: str, *names: str, kw: tuple[str, ...] = ()) -> Callable[[dict[str, Any]], Call]:
    def make(a: dict[str, Any]) -> Call:
        return "call_method", name, tuple(a[n] for n in names if n in a), {k: a[k] for k in kw if k in a}

    return make


_UNARY = ("neg", "exp", "log", "tanh", "sigmoid", "relu", "rsqrt", "sqrt", "abs", "erf", "sin", "cos", "square")
_BINARY = ("add", "sub", "mul", "div", "maximum", "minimum")

_TABLE: dict[str, Callable[[dict[str, Any]], Call]] = {
    **{n: _fn(getattr(torch, n), "self") for n in _UNARY},
    **{n: _fn(getattr(torch, n), "self", "other", kw=("alpha", "rounding_mode")) for n in _BINARY},
    "pow": _fn(torch.pow, "self", "exponent"),
    "where": _fn(torch.where, "condition", "self", "other"),
    "clamp": _fn(torch.clamp, "self", "min", "max"),
    "linear": _fn(F.linear, "input", "weight", "bias"),
    "layer_norm": _fn(F.layer_norm, "input", "normalized_shape", "weight", "bias", "eps"),
    "rms_norm": _fn(F.rms_norm, "input", "normalized_shape", "weight", "eps"),
    "group_norm": _fn(F.group_norm, "input", "num_groups", "weight", "bias", "eps"),
    "batch_norm": _fn(
        F.batch_norm, "input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"
    ),
    "embedding": _fn(F.embedding, "indices", "weight"),
    "scaled_dot_product_attention": _fn(
        F.scaled_dot_product_attention,
        "query",
        "key",
        "value",
        kw=("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
    ),
    **{
        f"conv{k}d": _fn(getattr(F, f"conv{k}d"), "input", "weight", "bias", "stride", "padding", "dilation", "groups")
        for k in (1, 2, 3)
    },
    **{
        f"{kind}_pool{k}d": _fn(
            getattr(F, f"{kind}_pool{k}d"),
            "self",
            "kernel_size",
            "stride",
            "padding",
            *(("dilation", "ceil_mode") if kind == "max" else ("ceil_mode", "count_include_pad")),
        )
        for kind in ("max", "avg")
        for k in (1, 2, 3)
    },
    **{f"adaptive_avg_pool{k}d": _fn(getattr(F, f"adaptive_avg_pool{k}d"), "self", "output_size") for k in (1, 2, 3)},
    "gelu": _fn(F.gelu, "self", kw=("approximate",)),
    "silu": _fn(F.silu, "self"),
    "hardtanh": _fn(F.hardtanh, "self", "min_val", "max_val"),
    "leaky_relu": _fn(F.leaky_relu, "self", "negative_slope"),
    "softmax": _fn(torch.softmax, "self", "dim"),
    "_softmax": _fn(torch.softmax, "self", "dim"),
    "log_softmax": _fn(torch.log_softmax, "self", "dim"),
    "_log_softmax": _fn(torch.log_softmax, "self", "dim"),
    "dropout": _fn(F.dropout, "input", "p", "train"),
    "matmul": _fn(torch.matmul, "self", "other"),
    "bmm": _fn(torch.matmul, "self", "mat2"),
    **{n: _fn(getattr(torch, n), "self", "dim", kw=("keepdim",)) for n in ("mean", "sum", "amax", "amin")},
    "view": _fn(torch.reshape, "self", "size"),
    "_unsafe_view": _fn(torch.reshape, "self", "size"),
    "reshape": _fn(torch.reshape, "self", "shape"),
    "transpose": _fn(torch.transpose, "self", "dim0", "dim1"),
    "t": _fn(torch.t, "self"),
    "permute": _fn(torch.permute, "self", "dims"),
    "unsqueeze": _fn(torch.unsqueeze, "self", "dim"),
    "squeeze": _fn(torch.squeeze, "self", "dim"),
    "unflatten": _fn(torch.unflatten, "self", "dim", "sizes"),
    "flatten": _fn(torch.flatten, "self", "start_dim", "end_dim"),
    "split": _fn(torch.split, "self", "split_size", "dim"),
    "split_with_sizes": _fn(torch.split, "self", "split_sizes", "dim"),
    "chunk": _fn(torch.chunk, "self", "chunks", "dim"),
    "cat": _fn(torch.cat, "tensors", "dim"),
    "expand": _method("expand", "self", "size"),
    "masked_fill": _method("masked_fill", "self", "mask", "value"),
    "to": _method("to", "self", kw=("dtype", "device")),
    "_to_copy": _method("to", "self", kw=("dtype", "device")),
    **{n: _method(n, "self", "size", kw=("dtype", "device")) for n in ("new_ones", "new_zeros", "new_empty")},
    "new_full": _method("new_full", "self", "size", "fill_value", kw=("dtype", "device")),
    **{n: _fn(getattr(torch, n), "self", kw=("dtype", "device")) for n in ("zeros_like", "ones_like")},
}
_IDENTITY_OPS = {"alias", "contiguous", "clone", "detach", "lift_fresh_copy"}
_DROP_OPS = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}


def _bind(op: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Argument name -> value for the arguments given (positional ones named by the op's schema)."""
    names = [a.name for a in op._schema.arguments]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


# ------------------------------------------------------------------------------ translation


class _Translator:
    def __init__(self, model: nn.Module, ep: torch.export.ExportedProgram) -> None:
        self.model, self.ep = model, ep
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.attrs: dict[str, Any] = {}
        self.params: set[fx.Node] = set()  # new get_attr nodes of parameters/buffers
        self.canonical = canonical_names(model)

    def _get_attr(self, target: str, value: Any) -> fx.Node:
        self.attrs[target] = value
        return self.graph.get_attr(target)

    def placeholders(self) -> list[fx.Node]:
        """The new graph's placeholders, one per positional input (a None input's stays unused)."""
        sig = self.ep.graph_signature
        kinds = torch.export.graph_signature.InputKind
        user: list[fx.Node] = []
        olds = [n for n in self.ep.graph.nodes if n.op == "placeholder"]
        for node, spec in zip(olds, sig.input_specs):
            if spec.kind in (kinds.PARAMETER, kinds.BUFFER):
                target = self.canonical.get(str(spec.target), str(spec.target))
                value: torch.Tensor
                try:
                    value = self.model.get_parameter(target)
                except AttributeError:
                    value = self.model.get_buffer(target)
                new = self._get_attr(target, value)
                self.params.add(new)
            elif spec.kind == kinds.CONSTANT_TENSOR:
                name = f"_export_constant_{len(self.attrs)}"
                new = self._get_attr(name, self.ep.constants[str(spec.target)])
            elif spec.kind == kinds.USER_INPUT:
                arg = spec.arg
                none = isinstance(arg, torch.export.graph_signature.ConstantArgument) and arg.value is None
                if not isinstance(arg, torch.export.graph_signature.TensorArgument) and not none:
                    raise SpecError(f"torch.export: non-tensor input {arg} (pass tensors or None only)")
                new = self.graph.placeholder(node.name)
                user.append(new)
            else:
                raise SpecError(f"torch.export: input of kind {spec.kind.name} is not supported")
            new.meta["stack_trace"] = node.meta.get("stack_trace")
            self.env[node] = new
        return user

    def map(self, a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: self.env[n])

    def call(self, node: fx.Node) -> Any:
        op = node.target
        args, kwargs = self.map(node.args), self.map(node.kwargs)
        if op is operator.getitem:
            return self.graph.call_function(operator.getitem, args)
        if not isinstance(op, torch._ops.OpOverload) or op.namespace != "aten":
            if isinstance(op, torch._ops.HigherOrderOperator):
                raise SpecError(f"torch.export: higher-order op {op} in the graph is not supported")
            return self.graph.call_function(cast(Callable[..., Any], op), args, kwargs)
        name = op._opname
        a = _bind(op, args, kwargs)
        if name in _IDENTITY_OPS:
            return args[0]
        if name in _DROP_OPS:
            if node.users:
                raise SpecError(f"torch.export: {op} has users")
            return None
        if name in ("slice", "select"):
            ndim = node.args[0].meta["val"].dim() if isinstance(node.args[0], fx.Node) else None
            if ndim is not None:
                dim = int(a.get("dim", 0)) % ndim
                if name == "slice":
                    last: Any = slice(a.get("start"), a.get("end"), a.get("step", 1))
                else:
                    last = a["index"]
                return self.graph.call_function(operator.getitem, (a["self"], (slice(None),) * dim + (last,)))
        if name in ("mm", "addmm"):
            w = a["mat2"]
            bias = a.get("self") if name == "addmm" else None
            plain = a.get("beta", 1) == 1 and a.get("alpha", 1) == 1
            if plain and w in self.params and (bias is None or bias in self.params):
                wt = self.graph.call_function(torch.t, (w,))
                return self.graph.call_function(F.linear, (a["mat1"], wt) + ((bias,) if bias is not None else ()))
        make = _TABLE.get(name)
        if make is None:
            return self.graph.call_function(op, args, kwargs)  # unknown to the deriver
        kind, target, new_args, new_kwargs = make(a)
        return self.graph.create_node(kind, target, new_args, new_kwargs)

    def run(self) -> tuple[fx.GraphModule, list[fx.Node]]:
        user = self.placeholders()
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                sig = self.ep.graph_signature
                kinds = torch.export.graph_signature.OutputKind
                outs = []
                for value, spec in zip(cast(tuple[Any, ...], node.args[0]), sig.output_specs):
                    if spec.kind != kinds.USER_OUTPUT:
                        raise SpecError(f"torch.export: output of kind {spec.kind.name} (buffer mutation?)")
                    outs.append(self.map(value))
                self.graph.output(tuple(outs))
                continue
            if node.op != "call_function":
                raise SpecError(f"torch.export: {node.op} node {node.name} is not supported")
            new = self.call(node)
            if isinstance(new, fx.Node) and new.meta.get("stack_trace") is None:
                new.meta["stack_trace"] = node.meta.get("stack_trace")
            self.env[node] = new
        self.graph.eliminate_dead_code()
        gm = fx.GraphModule(self.attrs, self.graph, type(self.model).__name__)
        return gm, user


def export_graph(model: nn.Module, inputs: tuple[torch.Tensor | None, ...]) -> fx.GraphModule:
    """The torch-level fx graph of `model` on positional `inputs` (tensors or None), captured by
    ``torch.export`` (in eval mode) and translated (module docstring). Its placeholders are the inputs, in order; its
    ``get_attr`` targets are the model's parameter and buffer names; it returns the tuple of the model's
    output tensors. Raises SpecError if export fails or the translation does not reproduce the outputs."""
    if not all(t is None or isinstance(t, torch.Tensor) for t in inputs):
        raise SpecError("the export tracer takes tensor (or None) inputs only")
    with eval_mode(model):
        try:
            with _exportable(model):
                ep = torch.export.export(model, tuple(inputs), strict=False)
        except Exception as err:  # noqa: BLE001 - export raises many types
            raise SpecError(
                f"torch.export cannot capture {type(model).__name__}: {type(err).__name__}: {str(err)[:500]} "
                "(a transformers model must be built with use_cache=False)"
            ) from err
        gm, user = _Translator(model, ep).run()
        if len(user) != len(inputs):
            raise SpecError(f"torch.export: {len(user)} inputs in the graph, {len(inputs)} given")
        with torch.no_grad():
            expected = [t for t in tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor)]  # its own forwards
            got = [t for t in tree_leaves(gm(*inputs)) if isinstance(t, torch.Tensor)]
    if len(expected) != len(got) or not all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True) for a, b in zip(expected, got)
    ):
        raise SpecError(f"internal error: the translated export graph of {type(model).__name__} changes its outputs")
    return gm
