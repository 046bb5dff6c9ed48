"""Checkpoints as safetensors: tensors by prefixed name, everything else as JSON in the header.

Layout of one file:
  model.<name>            model parameters and buffers (the point θ plus BN statistics)
  optim.<param>.<key>     optimizer per-parameter state tensors
  <other prefix>.<name>   any further tensors (generator states, the epoch's data order, …)
  header "lmclab"         JSON: format version, step, optimizer param groups, extra fields
  header "lmclab.integrity"   the sha256 of every tensor (dtype, shape, data) and of the "lmclab" header,
                          recorded at write time and verified on every read (lmclab.store.integrity)

A file whose content differs from its record raises `IntegrityError` (a `CheckpointError`) naming the
file and the part that differs (model, optimizer state, generator state, …); it is never used. A file
written before lmclab recorded checksums is read unverified, with one warning per file and process
(`UnverifiedFileWarning`), so existing stores keep working.

Nothing is ever unpickled: safetensors holds raw tensors and a JSON header only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmclab.store.atomic import atomic_write
from lmclab.store.errors import CheckpointError
from lmclab.store.integrity import INTEGRITY_KEY, tensor_record, verify_tensors

FORMAT_VERSION = 1
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."
#: what each tensor-name prefix of a checkpoint holds, for messages
PARTS = {
    MODEL_PREFIX: "model",
    OPTIM_PREFIX: "optimizer state",
    "rng.": "generator state",
    "data.": "data order",
    "train.": "training sums",
    "perm.": "permutation",
}


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> Path:
    """Atomically write tensors (made contiguous, moved to CPU), a JSON header and their checksums."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"lmclab": json.dumps({"format": FORMAT_VERSION, **header}, sort_keys=True)}
    meta[INTEGRITY_KEY] = tensor_record(flat, meta)
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=meta))


def describe_tensors(names: list[str]) -> str:
    """Tensor names grouped by the checkpoint part they belong to: "model (a, b), generator state (rng.data)"."""
    groups: dict[str, list[str]] = {}
    for name in names:
        part = next((word for prefix, word in PARTS.items() if name.startswith(prefix)), "other")
        groups.setdefault(part, []).append(name)
    return ", ".join(
        f"{part} ({', '.join(found[:4])}{f', … {len(found)} in all' if len(found) > 4 else ''})"
        for part, found in groups.items()
    )


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint and verify it against the checksums recorded when it was written.

    A missing, truncated or foreign file raises CheckpointError naming it; one whose tensors or header
    differ from their checksums raises IntegrityError naming it and the differing part. A file written
    before lmclab recorded checksums is read unverified (one UnverifiedFileWarning per file and process)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 - a safetensors handle
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a safetensors file): {exc}") from exc
    if "lmclab" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not an lmclab checkpoint (no 'lmclab' header)")
    kind = "permutation file" if tensors and all(k.startswith("perm.") for k in tensors) else "checkpoint"
    verify_tensors(path, tensors, meta, kind=kind, describe=describe_tensors)
    header = json.loads(meta["lmclab"])
    if header.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {header.get('format')}, this lmclab reads {FORMAT_VERSION}"
        )
    if torch.device(device) != torch.device("cpu"):
        tensors = {name: t.to(device) for name, t in tensors.items()}
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
