"""Permutation specs and permutations of hidden units over `dict[str, Tensor]` points.

A *spec* lists groups of (tensor, axis) that share one permutation: permuting the units of a hidden
layer permutes the output axis of the layer that produces it, every per-unit vector that follows
(biases, norm weights, BN running statistics) and the input axis of every layer that consumes it.
A residual addition ties the groups on both sides into one.

A *permutation* maps group name -> index vector p (a permutation of range(size)). Applied to a
point θ it gives π(θ) with  π(θ)[t] = θ[t].index_select(axis, p)  for each (t, axis) of the group;
unit i of the new network is unit p[i] of the old one. When an axis holds `block` consecutive
entries per unit (a conv's channels flattened with their H·W positions into a linear layer), unit i
owns entries [i·block, (i+1)·block) and whole blocks move. When an axis is shared by several groups
(a layer reading a channel-wise concatenation), each AxisRef has an `offset`: the group occupies
entries [offset, offset + size·block) of that axis and only that slice is permuted.

*Block-structured groups* (attention heads, grouped convolutions): a group with ``blocks = h > 1``
splits its ``size`` units into h consecutive blocks of ``block_size = size // h`` units. Its
permutations are exactly  p[i·d + k] = σ[i]·d + α_i[k]  (d = block_size): a permutation σ of whole
blocks and, within each block, its own permutation α_i. Groups with the same ``block_perm`` name share
σ (e.g. an attention layer's query/key group and its value/output group share the permutation of
heads) and each has its own α. The index vector stays a permutation of range(size), so applying,
inverting and composing are the flat operations; `Permutation.apply` refuses an index vector that
breaks a group's structure (`check_structure`). Flat groups (blocks = 1) are unchanged, also in
`to_dict`.

*Coverage* (:func:`coverage`): the fraction of the parameters' entries lying in tensors that some
group permutes. A derived spec records it in ``meta["coverage"]``, and in ``meta["left_fixed"]`` the
ops it was allowed to leave unpermuted (``derive_spec(..., leave_unknown_fixed=True)``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch

from lmclab.points import Point, PointLike
from lmclab.store import CheckpointError, load_checkpoint, save_checkpoint


class SpecError(ValueError):
    """A spec that cannot be derived, or that does not fit the parameters it is used with."""


@dataclass(frozen=True)
class AxisRef:
    """Axis `axis` of tensor `tensor` (a state_dict key) carries the group's units, `block` entries each.

    The group occupies entries [offset, offset + size·block) of the axis. A lone ref with offset 0
    covers the whole axis; refs at nonzero offsets (or several on one axis) cover slices of it.
    """

    tensor: str
    axis: int
    block: int = 1
    offset: int = 0


@dataclass(frozen=True)
class PermGroup:
    """One shared permutation of `size` units.

    `activations` names the fx nodes whose outputs carry this group on dim 1 (the channel / feature
    axis) at the points where the group is consumed: the inputs of the layers that read it.
    Activation matching correlates units there; they are never the network's input or output.
    """

    name: str
    size: int
    axes: tuple[AxisRef, ...]
    activations: tuple[str, ...] = ()
    blocks: int = 1
    block_perm: str | None = None

    def __post_init__(self) -> None:
        if self.blocks < 1 or self.size % self.blocks:
            raise SpecError(f"group {self.name}: {self.size} units do not split into {self.blocks} blocks")
        if self.blocks > 1 and not self.block_perm:
            raise SpecError(f"group {self.name}: a block-structured group needs a block_perm name")

    @property
    def block_size(self) -> int:
        return self.size // self.blocks

    @property
    def structured(self) -> bool:
        return self.blocks > 1


@dataclass(frozen=True)
class PermutationSpec:
    groups: tuple[PermGroup, ...]
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise SpecError(f"duplicate group names in spec: {sorted(n for n in names if names.count(n) > 1)}")

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def group(self, name: str) -> PermGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise SpecError(f"no group {name!r} in spec; groups: {', '.join(self.names)}")

    def axes_by_tensor(self) -> dict[str, list[tuple[str, AxisRef]]]:
        """tensor name -> [(group name, axis ref)] for every permuted axis of that tensor."""
        out: dict[str, list[tuple[str, AxisRef]]] = {}
        for g in self.groups:
            for ax in g.axes:
                out.setdefault(ax.tensor, []).append((g.name, ax))
        return out

    def check(self, params: PointLike) -> None:
        """Every axis exists; a lone ref at offset 0 has axis size == group size × block, refs that share
        an axis or sit at an offset lie inside it; no entry of an axis is claimed twice; groups sharing a
        block permutation have the same number of blocks."""
        problems: list[str] = []
        on_axis: dict[tuple[str, int], list[tuple[str, AxisRef, int]]] = {}
        for g in self.groups:
            for ax in g.axes:
                if ax.tensor not in params:
                    problems.append(f"group {g.name}: tensor {ax.tensor!r} not in parameters")
                    continue
                if ax.axis >= params[ax.tensor].ndim or ax.block < 1 or ax.offset < 0:
                    problems.append(
                        f"group {g.name}: {ax.tensor} of shape {tuple(params[ax.tensor].shape)} "
                        f"has no axis {ax.axis} (block {ax.block}, offset {ax.offset})"
                    )
                    continue
                on_axis.setdefault((ax.tensor, ax.axis), []).append((g.name, ax, g.size))
        for (tensor, axis), refs in on_axis.items():
            shape = tuple(params[tensor].shape)
            if len(refs) == 1 and refs[0][1].offset == 0:
                name, ax, size = refs[0]
                if shape[axis] != size * ax.block:
                    problems.append(
                        f"group {name}: {tensor} axis {axis} of shape {shape} is not {size} units × {ax.block}"
                    )
                continue
            spans = sorted((ax.offset, ax.offset + size * ax.block, name) for name, ax, size in refs)
            for start, end, name in spans:
                if end > shape[axis]:
                    problems.append(
                        f"group {name}: {tensor} axis {axis} of shape {shape} has no entries [{start}, {end})"
                    )
            for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
                if s1 < e0:
                    problems.append(
                        f"{tensor} axis {axis} claimed by both {n0} and {n1}"
                        + (f" (entries [{s0}, {e0}) and [{s1}, {e1}))" if (s0, e0) != (s1, e1) else "")
                    )
        for name, members in self.block_classes().items():
            if len({g.blocks for g in members}) > 1:
                problems.append(
                    f"groups sharing block permutation {name} have different numbers of blocks: "
                    + ", ".join(f"{g.name} ({g.blocks})" for g in members)
                )
        if problems:
            raise SpecError("spec does not fit the parameters:\n  " + "\n  ".join(problems))

    def block_classes(self) -> dict[str, list[PermGroup]]:
        """block_perm name -> the structured groups sharing that permutation of whole blocks."""
        out: dict[str, list[PermGroup]] = {}
        for g in self.groups:
            if g.structured:
                out.setdefault(cast(str, g.block_perm), []).append(g)
        return out

    @property
    def structured(self) -> bool:
        """Whether any group is block-structured."""
        return any(g.structured for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": [
                {
                    "name": g.name,
                    "size": g.size,
                    "activations": list(g.activations),
                    "axes": [[a.tensor, a.axis, a.block] + ([a.offset] if a.offset else []) for a in g.axes],
                    **({"blocks": g.blocks, "block_perm": g.block_perm} if g.structured else {}),
                }
                for g in self.groups
            ]
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> PermutationSpec:
        return PermutationSpec(
            tuple(
                PermGroup(
                    g["name"],
                    int(g["size"]),
                    tuple(AxisRef(t, int(a), int(b), int(o[0]) if o else 0) for t, a, b, *o in g["axes"]),
                    tuple(g.get("activations", ())),
                    int(g.get("blocks", 1)),
                    g.get("block_perm"),
                )
                for g in d["groups"]
            )
        )

    def canonical(self) -> PermutationSpec:
        """Axes sorted within groups, groups sorted by name: for comparing specs built differently."""
        groups = (
            replace(g, axes=tuple(sorted(g.axes, key=lambda a: (a.tensor, a.axis, a.offset)))) for g in self.groups
        )
        return PermutationSpec(tuple(sorted(groups, key=lambda g: g.name)))


def coverage(spec: PermutationSpec, params: PointLike) -> float:
    """Σ numel(t) over the floating-point tensors t of `params` that the spec permutes on some axis,
    divided by Σ numel(t) over all floating-point tensors of `params` (1.0 when there are none)."""
    permuted = set(spec.axes_by_tensor())
    sizes = {k: v.numel() for k, v in params.items() if v.is_floating_point()}
    total = sum(sizes.values())
    return sum(n for k, n in sizes.items() if k in permuted) / total if total else 1.0


def block_structure(spec: PermutationSpec, perm: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """block_perm name -> σ (the permutation of whole blocks) read from `perm`; SpecError naming the group
    when a structured group's index vector is not of the form p[i·d + k] = σ[i]·d + α_i[k], or when two
    groups sharing a block_perm move the blocks differently."""
    sigmas: dict[str, torch.Tensor] = {}
    for g in spec.groups:
        if not g.structured or g.name not in perm:
            continue
        d = g.block_size
        p = torch.as_tensor(perm[g.name]).reshape(g.blocks, d)
        sigma = p[:, 0] // d
        if not torch.equal(p // d, sigma[:, None].expand_as(p)):
            raise SpecError(f"group {g.name}: permutation moves units between its {g.blocks} blocks of {d}")
        name = cast(str, g.block_perm)
        if name in sigmas and not torch.equal(sigmas[name], sigma):
            raise SpecError(f"group {g.name}: its blocks move differently from the other groups of {name}")
        sigmas[name] = sigma
    return sigmas


def structured_perm(sigma: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
    """Index vector p[i·d + k] = σ[i]·d + within[i, k] of a block-structured group (within: blocks × d)."""
    d = within.shape[1]
    return (sigma[:, None] * d + within).reshape(-1)


def expand_block(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Index vector over entries for a unit permutation with `block` consecutive entries per unit."""
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block, device=perm.device)).reshape(-1)


def permute_axis(tensor: torch.Tensor, ax: AxisRef, perm: torch.Tensor) -> torch.Tensor:
    """Permute the units of `ax` in `tensor`: entries [offset, offset + len(perm)·block) of the axis."""
    idx = expand_block(perm.to(tensor.device), ax.block)
    if ax.offset == 0 and len(idx) == tensor.shape[ax.axis]:
        return tensor.index_select(ax.axis, idx)
    full = torch.arange(tensor.shape[ax.axis], device=tensor.device)
    full[ax.offset : ax.offset + len(idx)] = idx + ax.offset
    return tensor.index_select(ax.axis, full)


class Permutation:
    """A permutation for every group of a spec: group name -> int64 index vector.

    `apply(θ)` is π(θ); `inverse()` is π⁻¹; `a.compose(b)` is π_a ∘ π_b (apply b first, then a).
    """

    def __init__(self, perms: Mapping[str, torch.Tensor]) -> None:
        self.perms = {k: torch.as_tensor(v, dtype=torch.int64).cpu() for k, v in perms.items()}
        for name, p in self.perms.items():
            if p.ndim != 1 or not torch.equal(p.sort().values, torch.arange(len(p))):
                raise SpecError(f"group {name}: not a permutation of range({len(p)})")

    @staticmethod
    def identity(spec: PermutationSpec) -> Permutation:
        return Permutation({g.name: torch.arange(g.size) for g in spec.groups})

    @staticmethod
    def random(spec: PermutationSpec, generator: torch.Generator | None = None) -> Permutation:
        """Uniform over the spec's symmetry: flat groups any permutation; structured groups one σ per
        block_perm name, and independent within-block permutations per group and block."""
        sigmas: dict[str, torch.Tensor] = {}
        out = {}
        for g in spec.groups:
            if not g.structured:
                out[g.name] = torch.randperm(g.size, generator=generator)
                continue
            name = cast(str, g.block_perm)
            if name not in sigmas:
                sigmas[name] = torch.randperm(g.blocks, generator=generator)
            within = torch.stack([torch.randperm(g.block_size, generator=generator) for _ in range(g.blocks)])
            out[g.name] = structured_perm(sigmas[name], within)
        return Permutation(out)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.perms[name]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Permutation)
            and self.perms.keys() == other.perms.keys()
            and all(torch.equal(p, other.perms[k]) for k, p in self.perms.items())
        )

    def __repr__(self) -> str:
        moved = {k: int((p != torch.arange(len(p))).sum()) for k, p in self.perms.items()}
        return f"Permutation({len(self.perms)} groups, units moved: {moved})"

    def is_identity(self) -> bool:
        return all(torch.equal(p, torch.arange(len(p))) for p in self.perms.values())

    def inverse(self) -> Permutation:
        return Permutation({k: torch.argsort(p) for k, p in self.perms.items()})

    def compose(self, first: Permutation) -> Permutation:
        """self ∘ first: apply(compose) == self.apply(first.apply(θ)). Index form: first[self]."""
        if self.perms.keys() != first.perms.keys():
            raise SpecError(
                f"cannot compose permutations over different groups: {sorted(self.perms)} vs {sorted(first.perms)}"
            )
        return Permutation({k: first.perms[k][p] for k, p in self.perms.items()})

    def apply(self, params: PointLike, spec: PermutationSpec) -> Point:
        """π(θ): every tensor of `params` with each of its spec axes permuted; others copied by reference."""
        missing = [g.name for g in spec.groups if g.name not in self.perms]
        if missing:
            raise SpecError(f"permutation lacks groups {missing}")
        block_structure(spec, self.perms)  # structured groups: refuse a permutation outside the symmetry
        out = dict(params)
        for tensor, axes in spec.axes_by_tensor().items():
            if tensor not in out:
                raise SpecError(f"spec names tensor {tensor!r}, which the parameters do not have")
            t = out[tensor]
            for group, ax in axes:
                t = permute_axis(t, ax, self.perms[group])
            out[tensor] = t
        return out

    def save(self, path: str | os.PathLike, spec: PermutationSpec | None = None, **meta: Any) -> Path:
        """safetensors: one int64 tensor per group; the spec and `meta` as JSON in the header; the checksums
        of both, verified by `load` (`lmclab.store.save_checkpoint`)."""
        header = {"kind": "permutation", "meta": meta, "spec": spec.to_dict() if spec is not None else None}
        return save_checkpoint(path, {f"perm.{k}": v for k, v in self.perms.items()}, header)

    @staticmethod
    def load(path: str | os.PathLike) -> tuple[Permutation, PermutationSpec | None, dict[str, Any]]:
        """(permutation, spec or None, meta) saved by `save`; a file whose content differs from its checksums
        raises IntegrityError naming it (a CheckpointError, as does one that is not a permutation file)."""
        tensors, header = load_checkpoint(path)
        if header.get("kind") != "permutation":
            raise CheckpointError(f"{path} is not a permutation file (kind: {header.get('kind')!r})")
        spec = PermutationSpec.from_dict(header["spec"]) if header.get("spec") else None
        perm = Permutation({k[len("perm.") :]: v for k, v in tensors.items() if k.startswith("perm.")})
        return perm, spec, header.get("meta", {})
