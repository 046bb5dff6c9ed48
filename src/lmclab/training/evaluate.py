"""Loss and accuracy of a model on a device-resident split (per-example averages, eval mode)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from lmclab.data import DeviceDataset


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on CUDA; fp32 (no autocast) elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: DeviceDataset, batch_size: int = 1000) -> dict[str, float]:
    """{"loss": mean cross-entropy, "accuracy": fraction correct} over the whole split, in eval mode.

    A model with non-finite logits gets NaN for both (argmax of NaN logits would be an arbitrary,
    meaningless class)."""
    was_training = model.training
    model.eval()
    device = dataset.images.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    try:
        for x, y in dataset.batches(batch_size):
            with autocast_for(device):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            finite &= torch.isfinite(logits).all()
    finally:
        model.train(was_training)
    n = len(dataset)
    if not bool(finite):
        return {"loss": float("nan"), "accuracy": float("nan")}
    return {"loss": loss_sum.item() / n, "accuracy": correct.item() / n}
