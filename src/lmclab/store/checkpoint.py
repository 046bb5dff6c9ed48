"""Checkpoints as safetensors: tensors by prefixed name, everything else as JSON in the header.

Layout of one file:
  model.<name>            model parameters and buffers (the point θ plus BN statistics)
  optim.<param>.<key>     optimizer per-parameter state tensors
  <other prefix>.<name>   any further tensors (generator states, the epoch's data order, …)
  header "lmclab"         JSON: format version, step, optimizer param groups, extra fields

Nothing is ever unpickled: safetensors holds raw tensors and a JSON header only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmclab.store.atomic import atomic_write

FORMAT_VERSION = 1
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."


class CheckpointError(Exception):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> Path:
    """Atomically write tensors (made contiguous, moved to CPU) and a JSON header."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"lmclab": json.dumps({"format": FORMAT_VERSION, **header}, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=meta))


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint; a missing, truncated or foreign file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path), device=str(device))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a safetensors file): {exc}") from exc
    if "lmclab" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not an lmclab checkpoint (no 'lmclab' header)")
    header = json.loads(meta["lmclab"])
    if header.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {header.get('format')}, this lmclab reads {FORMAT_VERSION}"
        )
    return tensors, header


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix`, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


def check_compatible(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{k}: model {tuple(expected[k].shape)} vs checkpoint {tuple(found[k].shape)}"
        for k in set(expected) & set(found)
        if expected[k].shape != found[k].shape
    )
    if missing or unexpected or shapes:
        lines = [f"checkpoint {source} does not fit this architecture:"]
        for title, items in (
            ("missing in checkpoint", missing),
            ("not in model", unexpected),
            ("shape mismatch", shapes),
        ):
            if items:
                shown = items[:20] + ([f"… and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise CheckpointError("\n".join(lines))


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "<state>") -> None:
    """Load parameters and buffers after checking names and shapes (strict, clear errors)."""
    check_compatible(model.state_dict(), state, source)
    model.load_state_dict(state, strict=True)


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as (tensors, JSON-able header) — the inverse of `optimizer_from_flat`."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM_PREFIX}{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], header: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in split_prefix(tensors, OPTIM_PREFIX).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in header.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
