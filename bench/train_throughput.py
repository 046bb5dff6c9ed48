"""Training throughput (images/s): lmclab's on-device pipeline vs. a plain DataLoader + eager loop.

Both sides train the same model (same init, optimizer, batch size) on the same data for the same
number of steps, in the same process, alternating, after a warm-up. lmclab: the split resident on
the device as uint8, batches indexed, normalised and augmented there (`DeviceDataset.batch`), and
the trainer's own `train_step`. Baseline: a `torch.utils.data.Dataset` that normalises (and, for
CIFAR, pads/crops/flips) each sample in Python, a shuffling `DataLoader`, and the same eager step.

    python bench/train_throughput.py                 # CPU cases: MLP/MNIST, ResNet-20 ×1/CIFAR-10
    python bench/train_throughput.py --device cuda   # adds ResNet-20 ×1, ×4, ×16 (report the card)

Prints one line per case with both throughputs and their ratio. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lmclab.data import DeviceDataset
from lmclab.models import build_model
from lmclab.training import train_step


class PerSampleDataset(Dataset):
    """What a torchvision-style pipeline does: one sample at a time, transforms in Python."""

    def __init__(self, data: DeviceDataset, augment: bool, seed: int = 0) -> None:
        self.images, self.labels = data.images.cpu(), data.labels.cpu()
        self.mean = torch.tensor(data.info.mean).view(-1, 1, 1)
        self.std = torch.tensor(data.info.std).view(-1, 1, 1)
        self.augment = augment
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].float().div(255)
        if self.augment:
            h, w = x.shape[-2:]
            x = F.pad(x, (4, 4, 4, 4))
            dy, dx = torch.randint(0, 9, (2,), generator=self.gen).tolist()
            x = x[:, dy : dy + h, dx : dx + w]
            if torch.rand((), generator=self.gen) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std, self.labels[i]


def time_steps(model: torch.nn.Module, batches, steps: int, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    it = iter(batches)
    for _ in range(3):  # warm-up
        x, y = next(it)
        train_step(model, optimizer, x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
        train_step(model, optimizer, x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def device_batches(data: DeviceDataset, batch_size: int, seed: int = 0):  # type: ignore[no-untyped-def]
    order_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=data.images.device).manual_seed(seed)
    while True:
        order = torch.randperm(len(data), generator=order_gen).to(data.images.device)
        for i in range(0, len(data) - batch_size + 1, batch_size):
            yield data.batch(order[i : i + batch_size], aug_gen)


def loader_batches(data: DeviceDataset, batch_size: int, workers: int):  # type: ignore[no-untyped-def]
    loader = DataLoader(
        PerSampleDataset(data, data.augment),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=data.images.is_cuda,
        persistent_workers=workers > 0,
    )
    while True:
        yield from loader


def bench_case(
    name: str,
    dataset: str,
    model_name: str,
    options: dict,
    batch_size: int,
    steps: int,
    subset: int | None,
    device: torch.device,
    data_dir: str | None,
    workers: int,
    repeats: int,
) -> dict:
    """Time both sides (best of `repeats`, alternating); prints one line and returns its numbers."""
    data = DeviceDataset.load(dataset, "train", data_dir=data_dir, device=device, subset=subset, progress=False)
    torch.manual_seed(0)
    model = build_model(model_name, input_shape=data.info.input_shape, num_classes=data.info.num_classes, **options)
    model = model.to(device)
    if device.type == "cuda" and model_name != "mlp":
        model = model.to(memory_format=torch.channels_last)
    ours, base = [], []
    for _ in range(repeats):  # alternate so drift on a shared machine hits both sides alike
        ours.append(time_steps(model, device_batches(data, batch_size), steps, device))
        base.append(time_steps(model, loader_batches(data, batch_size, workers), steps, device))
    images = steps * batch_size
    ours_ips, base_ips = images / min(ours), images / min(base)
    print(
        f"{name:<34} lmclab {ours_ips:9.0f} img/s   DataLoader(workers={workers}) {base_ips:9.0f} img/s   "
        f"ratio {ours_ips / base_ips:5.2f}x   ({steps} steps × {batch_size}, best of {repeats})",
        flush=True,
    )
    return {
        "case": name,
        "lmclab_img_s": ours_ips,
        "dataloader_img_s": base_ips,
        "workers": workers,
        "ratio": ours_ips / base_ips,
        "steps": steps,
        "batch_size": batch_size,
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for the baseline")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
        f"threads {torch.get_num_threads()}"
    )
    cases = [
        ("MLP 784-512³-10 / MNIST, batch 500", "mnist", "mlp", {}, 500, 40, None),
        (
            "ResNet-20 ×1 LN / CIFAR-10, batch 128",
            "cifar10",
            "resnet20",
            {"width": 1},
            128,
            8 if device.type == "cpu" else 60,
            5000,
        ),
    ]
    if device.type == "cuda":
        cases += [
            (f"ResNet-20 ×{w} LN / CIFAR-10, batch 128", "cifar10", "resnet20", {"width": w}, 128, 60, 20000)
            for w in (4, 16)
        ]
    for name, dataset, model_name, options, bs, steps, subset in cases:
        bench_case(
            name, dataset, model_name, options, bs, steps, subset, device, args.data_dir, args.workers, args.repeats
        )


if __name__ == "__main__":
    main()
