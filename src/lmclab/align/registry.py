"""The registries of alignment methods, one per kind, and the dispatch through them.

- **pair methods** (:data:`PAIR_METHODS`, :func:`align`): align model B to model A;
  ``fn(θ_A, θ_B, spec, **kw) -> MatchResult``.
- **population methods** (:data:`POPULATION_METHODS`, :func:`align_population`): align K models into
  model 0's frame; ``fn(points, spec, **kw) -> PopulationAlignment``.

Points reach ``fn`` as state dicts (``dict[str, Tensor]``; a module given to the dispatch stands for its
state dict). An entry declares what a caller must supply (``needs``: keywords of :data:`NEEDS`) and which
common settings it takes (``accepts``: keywords of :data:`SETTINGS`), so that generic callers (the CLI,
the experiments) build its keywords without knowing the method. A method registers itself with a
decorator in its own module::

    @register_pair_method("activation", "pair units whose activations over data correlate best",
                          needs=("model", "batches"))
    def _activation(theta_a, theta_b, spec, *, model, batches, **kw): ...

This module imports no method; importing :mod:`lmclab.align` imports them all, which fills the
registries (in the order the methods are listed everywhere: registration order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from lmclab.align.results import MatchResult, PopulationAlignment
from lmclab.permutation.spec import PermutationSpec
from lmclab.points import Point, PointLike

__all__ = [
    "NEEDS",
    "PAIR_METHODS",
    "POPULATION_METHODS",
    "SETTINGS",
    "MethodEntry",
    "PairMethod",
    "PopulationMethod",
    "align",
    "align_population",
    "as_point",
    "get_pair_method",
    "get_population_method",
    "register_pair_method",
    "register_population_method",
]

#: What a method may need from its caller (keyword -> what to pass).
NEEDS: dict[str, str] = {
    "model": "an instance of the architecture (a template: copied, never modified)",
    "data": "the training split, a lmclab.data.DeviceDataset",
    "batches": "an iterable of input batches",
}
#: Common settings a method may accept (keyword -> meaning); method-specific options are its own keywords.
SETTINGS: dict[str, str] = {
    "seed": "the method's random seed",
    "device": "where a method that learns from data trains (default: where its data lives)",
    "progress": "report progress on stderr",
    "epochs": "passes over the training data",
    "val_data": "a held-out DeviceDataset to choose the result by",
}

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its name, function, one-line description, what it needs and what it accepts.

    ``title`` names the method in messages (default: the name). ``revision`` counts changes to what the
    method computes for the same inputs; stored results record it (when above 1), so a changed method is
    recomputed rather than read back from a cache of the old one."""

    name: str
    fn: Callable[..., Any]
    description: str
    needs: tuple[str, ...] = ()
    accepts: tuple[str, ...] = ()
    title: str = ""
    revision: int = 1

    def __post_init__(self) -> None:
        unknown = [n for n in self.needs if n not in NEEDS] + [s for s in self.accepts if s not in SETTINGS]
        if unknown:
            raise ValueError(
                f"method {self.name!r} declares unknown needs/settings {unknown}; needs are "
                f"{', '.join(NEEDS)}, settings {', '.join(SETTINGS)}"
            )
        if not self.title:
            object.__setattr__(self, "title", self.name)

    def require(self, kw: Mapping[str, Any]) -> None:
        """Raise ValueError naming every need of the method when one is missing (absent or None) from `kw`."""
        missing = [n for n in self.needs if kw.get(n) is None]
        if missing:
            wanted = " and ".join(f"{n}=<{NEEDS[n]}>" for n in self.needs)
            raise ValueError(f"{self.title} needs {wanted}; missing: {', '.join(missing)}")

    def identity(self) -> dict[str, Any]:
        """What a stored result of this method is keyed by: {"method": name}, plus "revision" when above 1
        (so the keys of methods never revised stay as they were)."""
        return {"method": self.name, **({"revision": self.revision} if self.revision > 1 else {})}

    def summary(self) -> str:
        """ "name (title): description", the line listings and ``--help`` show."""
        return f"{self.name}{f' ({self.title})' if self.title != self.name else ''}: {self.description}"

    def settings(self, **available: Any) -> dict[str, Any]:
        """The `available` common settings this method accepts."""
        return {k: v for k, v in available.items() if k in self.accepts}


@dataclass(frozen=True)
class PairMethod(MethodEntry):
    """A two-model method: ``fn(θ_A, θ_B, spec, **kw) -> MatchResult`` (B aligned to A)."""

    fn: Callable[..., MatchResult]


@dataclass(frozen=True)
class PopulationMethod(MethodEntry):
    """A K-model method: ``fn(points, spec, **kw) -> PopulationAlignment`` (perms[0] the identity)."""

    fn: Callable[..., PopulationAlignment]


#: Two-model alignment methods by name, in registration order.
PAIR_METHODS: dict[str, PairMethod] = {}
#: K-model alignment methods by name, in registration order.
POPULATION_METHODS: dict[str, PopulationMethod] = {}


def _registrar(
    registry: dict[str, Any], entry_type: type[MethodEntry], kind: str, name: str, description: str, **fields: Any
) -> Callable[[F], F]:
    """The decorator that registers its function as `entry_type(name, fn, description, **fields)` in `registry`
    (ValueError if `name` is taken)."""

    def register(fn: F) -> F:
        if name in registry:
            old = registry[name].fn
            raise ValueError(f"{kind} {name!r} is already registered ({old.__module__}.{old.__qualname__})")
        registry[name] = entry_type(name, fn, description, **fields)
        return fn

    return register


def register_pair_method(
    name: str,
    description: str,
    *,
    needs: Iterable[str] = (),
    accepts: Iterable[str] = (),
    title: str = "",
    revision: int = 1,
) -> Callable[[F], F]:
    """Decorator: register ``fn(θ_A, θ_B, spec, **kw) -> MatchResult`` as two-model method `name`."""
    fields = {"needs": tuple(needs), "accepts": tuple(accepts), "title": title, "revision": revision}
    return _registrar(PAIR_METHODS, PairMethod, "alignment method", name, description, **fields)


def register_population_method(
    name: str,
    description: str,
    *,
    needs: Iterable[str] = (),
    accepts: Iterable[str] = (),
    title: str = "",
    revision: int = 1,
) -> Callable[[F], F]:
    """Decorator: register ``fn(points, spec, **kw) -> PopulationAlignment`` as K-model method `name`."""
    fields = {"needs": tuple(needs), "accepts": tuple(accepts), "title": title, "revision": revision}
    return _registrar(POPULATION_METHODS, PopulationMethod, "population method", name, description, **fields)


def get_pair_method(name: str) -> PairMethod:
    """The two-model method `name`; ValueError listing the valid names if there is none."""
    if name not in PAIR_METHODS:
        raise ValueError(f"unknown alignment method {name!r}; valid methods: {', '.join(PAIR_METHODS)}")
    return PAIR_METHODS[name]


def get_population_method(name: str) -> PopulationMethod:
    """The K-model method `name`; ValueError listing the valid names if there is none."""
    if name not in POPULATION_METHODS:
        raise ValueError(f"unknown population method {name!r}; valid methods: {', '.join(POPULATION_METHODS)}")
    return POPULATION_METHODS[name]


def as_point(x: PointLike | nn.Module) -> Point:
    """A module's state dict, or the mapping itself as a dict (tensors shared, not copied)."""
    return dict(x.state_dict()) if isinstance(x, nn.Module) else dict(x)


def align(
    theta_a: PointLike | nn.Module,
    theta_b: PointLike | nn.Module,
    spec: PermutationSpec,
    method: str = "weight",
    **kw: Any,
) -> MatchResult:
    """Align B to A with the two-model `method` of :data:`PAIR_METHODS` ("weight", "activation", "ste", …).

    Points may be state dicts or modules; a module A also stands for ``model=`` when the method needs a
    model and none is given. The keywords go to the method: its needs (e.g. "activation": ``batches=``,
    "ste": ``data=``), settings and options. ``result.perm.apply(θ_B, spec)`` is the aligned B.
    """
    entry = get_pair_method(method)
    if isinstance(theta_a, nn.Module) and "model" in entry.needs and kw.get("model") is None:
        kw["model"] = theta_a
    entry.require(kw)
    return entry.fn(as_point(theta_a), as_point(theta_b), spec, **kw)


def align_population(
    thetas: Sequence[PointLike | nn.Module], spec: PermutationSpec, method: str, **kw: Any
) -> PopulationAlignment:
    """Align K points into model 0's frame with the K-model `method` of :data:`POPULATION_METHODS`
    ("naive", "pairwise", "merge_many", "ste_mm", …); the keywords go to the method (its needs first)."""
    entry = get_population_method(method)
    entry.require(kw)
    return entry.fn([as_point(t) for t in thetas], spec, **kw)
