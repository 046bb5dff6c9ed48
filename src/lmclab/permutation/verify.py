"""Check that a permutation is a symmetry: f(π(θ)) == f(θ) on example inputs, in eval and train mode.

θ and π(θ) (parameters AND buffers, i.e. state_dicts) are loaded into one float64 deep copy of the
model with ``torch.func.functional_call`` on cloned tensors, so the model itself — its weights and its
BatchNorm running statistics — is never touched. In train mode BatchNorm uses batch statistics, which
must agree as well; elementwise dropout (dropout modules and nn.MultiheadAttention's attention dropout)
is switched off there (rate 0 as well, for code that reads a dropout module's rate and passes it to an
attention kernel): its masks are drawn per element, and a permutation moves the elements. Every
other random layer (stochastic depth / DropPath, which scales whole samples and so commutes with every
permutation of units) sees the same random stream in both calls: each forward pass runs under a
fork of the RNG seeded with the same `seed`, so the comparison is exact.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

from lmclab.permutation.derive import ExampleInput, example_input_for
from lmclab.permutation.export import canonical_names
from lmclab.permutation.spec import Permutation, PermutationSpec, SpecError
from lmclab.points import PointLike

__all__ = ["Invariance", "check_invariance", "verify_permutation"]

_MODES = ("eval", "train")


def _as_inputs(model: nn.Module, example_input: ExampleInput | None, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    x = example_input if example_input is not None else example_input_for(model)
    inputs = x if isinstance(x, tuple) else (x,)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)


def _run(
    model: nn.Module, state: PointLike, inputs: tuple[torch.Tensor, ...], mode: str, seed: int = 0
) -> list[torch.Tensor]:
    model.train(mode == "train")
    if mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
                m.p = 0.0  # also for code that reads the rate (transformers' GPT-2 hands it to SDPA)
            if isinstance(m, nn.MultiheadAttention):
                m.dropout = 0.0  # `model` is verification's own deep copy
    buffers = {name for name, _ in model.named_buffers()}  # BN updates these in place in train mode
    devices = [t.device for t in inputs if isinstance(t, torch.Tensor) and t.device.type == "cuda"]
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = functional_call(model, {k: v.clone() if k in buffers else v for k, v in state.items()}, inputs)
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _differences(
    model: nn.Module,
    permuted: PointLike | Permutation,
    spec: PermutationSpec | None,
    example_input: ExampleInput | None,
    modes: Sequence[str],
    dtype: torch.dtype,
    atol: float,
    rtol: float,
) -> dict[str, tuple[float, bool]]:
    """mode -> (max |f(π(θ)) − f(θ)|, whether every output is within atol + rtol·|f(θ)|)."""
    bad = [m for m in modes if m not in _MODES]
    if bad:
        raise ValueError(f"unknown modes {bad}; valid: {_MODES}")
    ref = copy.deepcopy(model).to(dtype)
    theta = {k: v.detach() for k, v in ref.state_dict().items()}
    if isinstance(permuted, Permutation):
        if spec is None:
            raise SpecError("a Permutation needs its spec")
        spec.check(theta)
        pi_theta = permuted.apply(theta, spec)
    else:
        missing = sorted(set(theta) - set(permuted))
        if missing:
            raise SpecError(f"permuted parameters lack {missing[:5]}{' …' if len(missing) > 5 else ''}")
        pi_theta = {k: permuted[k].detach().to(device=theta[k].device, dtype=theta[k].dtype) for k in theta}
    # a tied tensor (several state_dict names, e.g. GPT-2's wte and lm_head) must stay tied; it is
    # loaded once, under its first name
    for name, first in canonical_names(ref).items():
        if name != first:
            if not torch.equal(pi_theta[name], pi_theta[first]):
                raise SpecError(f"the permutation unties the tied tensors {first!r} and {name!r}")
            del theta[name], pi_theta[name]
    inputs = _as_inputs(model, example_input, dtype)
    result: dict[str, tuple[float, bool]] = {}
    for mode in modes:
        a, b = _run(ref, theta, inputs, mode), _run(ref, pi_theta, inputs, mode)
        diff, ok = 0.0, True
        for ya, yb in zip(a, b):
            d = (ya.double() - yb.double()).abs()
            diff = max(diff, float(d.max()) if d.numel() else 0.0)
            ok = ok and bool((d <= atol + rtol * ya.double().abs()).all())
        result[mode] = (diff, ok)
    return result


@dataclass(frozen=True)
class Invariance:
    """max |f(π(θ)) − f(θ)| over all outputs in each mode checked (None: that mode was not checked)."""

    eval: float | None = None
    train: float | None = None

    @property
    def worst(self) -> float:
        """The largest difference over the modes checked."""
        return max(self.to_json().values())

    def to_json(self) -> dict[str, float]:
        """{"eval": …, "train": …}: mode -> max |Δ| for the modes checked (as alignment.json stores it)."""
        return {mode: d for mode in _MODES if (d := getattr(self, mode)) is not None}


def check_invariance(
    model: nn.Module,
    spec: PermutationSpec,
    perm: Permutation,
    example_input: ExampleInput | None = None,
    *,
    modes: Sequence[str] = _MODES,
    dtype: torch.dtype = torch.float64,
) -> Invariance:
    """max |f(π(θ)) − f(θ)| over all outputs, per mode ('eval', 'train'), θ = the model's state_dict."""
    diffs = _differences(model, perm, spec, example_input, modes, dtype, 0.0, 0.0)
    return Invariance(**{mode: d for mode, (d, _) in diffs.items()})


def verify_permutation(
    model: nn.Module,
    params_or_perm: PointLike | Permutation,
    spec: PermutationSpec | None,
    *,
    example_input: ExampleInput | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    modes: Sequence[str] = _MODES,
    dtype: torch.dtype = torch.float64,
) -> None:
    """Raise SpecError unless f(π(θ)) ≈ f(θ) (|Δ| ≤ atol + rtol·|f(θ)|) in every mode.

    `params_or_perm` is a Permutation of `spec` (π(θ) = perm.apply(θ, spec)) or a permuted state_dict
    (then `spec` may be None). θ is the model's own state_dict; the model is not modified.
    """
    for mode, (diff, ok) in _differences(model, params_or_perm, spec, example_input, modes, dtype, atol, rtol).items():
        if not ok:
            raise SpecError(
                f"permutation changes the function of {type(model).__name__} in {mode} mode: "
                f"max |f(π(θ)) − f(θ)| = {diff:.3g} (atol {atol:g}, rtol {rtol:g})"
            )
