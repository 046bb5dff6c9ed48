"""Record intermediate activations by fx node name (the names a spec's groups list)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from lmclab.permutation.derive import ExampleInput, trace_model
from lmclab.permutation.spec import SpecError

__all__ = ["capture_activations"]


class _Recorder(fx.Interpreter):
    """Interpreter that keeps the (detached) outputs of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.recorded: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.name in self.names:
            if not isinstance(result, torch.Tensor):
                raise SpecError(f"node {n.name!r} does not produce a tensor")
            self.recorded[n.name] = result.detach()
        return result


def capture_activations(
    model: nn.Module, x: ExampleInput, node_names: Iterable[str], *, leaf_modules: tuple[type, ...] = ()
) -> dict[str, torch.Tensor]:
    """Outputs of the fx nodes `node_names` when the model runs on `x` (no grad, the model's own
    train/eval mode; traced like :func:`derive_spec`, so the names match a derived spec's activations)."""
    gm = trace_model(model, leaf_modules)
    names = set(node_names)
    unknown = sorted(names - {n.name for n in gm.graph.nodes})
    if unknown:
        raise SpecError(f"no nodes {unknown} in the graph of {type(model).__name__}")
    rec = _Recorder(gm, names)
    inputs = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():
        rec.run(*inputs)
    return rec.recorded
