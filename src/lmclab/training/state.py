"""The full training state: what a checkpoint holds and what a resumed run continues from.

Randomness: the initialisation is drawn under `seed_init` (torch's global RNG, forked), the data
order from a CPU generator seeded with `seed_data` (one `randperm` per epoch), augmentation from a
generator on the training device seeded with `seed_augment`. The learning rate is a pure function
of the step (`schedules.learning_rate`), so there is no scheduler state to keep.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from lmclab.config import OPTIMIZERS, RunConfig, UsageError
from lmclab.data import DatasetInfo
from lmclab.models import build_model
from lmclab.store import load_checkpoint, load_model_state, save_checkpoint
from lmclab.store.checkpoint import MODEL_PREFIX, optimizer_from_flat, optimizer_to_flat, split_prefix, with_prefix


def init_model(config: RunConfig, info: DatasetInfo) -> torch.nn.Module:
    """The model at initialisation, drawn on CPU in fp32 under `seed_init` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seeds.seed_init)
        try:
            return build_model(
                config.model.model, input_shape=info.input_shape, num_classes=info.num_classes, **config.model_options()
            )
        except (OverflowError, MemoryError) as exc:
            raise _too_large(config, exc) from exc
        except (RuntimeError, TypeError) as exc:  # torch: "can't allocate memory …", "Overflow when unpacking …"
            if "allocate" not in str(exc) and "Overflow" not in str(exc):
                raise
            raise _too_large(config, exc) from exc


def _too_large(config: RunConfig, exc: BaseException) -> UsageError:
    return UsageError(f"{_model_text(config)} is too large to build on this machine ({_first_line(exc)})")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _model_text(config: RunConfig) -> str:
    options = ", ".join(f"{k}={v}" for k, v in config.model_options().items())
    return f"model {config.model.model}" + (f" ({options})" if options else "")


def make_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    return optimizer_over(config, list(model.parameters()))


def optimizer_over(config: RunConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The run's optimizer (`config.train`: optimizer, lr, momentum, nesterov, weight decay) over `params`."""
    t = config.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    raise ValueError(f"unknown optimizer {t.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")


def is_cnn(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


@dataclass
class TrainingState:
    """Model, optimizer, both generators, the current epoch's data order, its running sums, the step.

    `epoch_sums`: the current epoch's training loss·n, correct and seen (float64), saved so that a run
    resumed mid-epoch reports the same epoch. (Not to be confused with `TrainState`, the small view a
    step callback gets.)"""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data_gen: torch.Generator
    aug_gen: torch.Generator
    order: torch.Tensor | None
    epoch_sums: torch.Tensor
    step: int = 0

    @classmethod
    def initial(cls, config: RunConfig, info: DatasetInfo, device: torch.device) -> TrainingState:
        """The state at step 0: the initialisation, a fresh optimizer and freshly seeded generators."""
        model = init_model(config, info).to(device)
        if device.type == "cuda" and is_cnn(model):
            # torch stub: Module.to's overloads omit the documented to(memory_format=...) form.
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        optimizer = make_optimizer(config, model)
        return cls(
            model=model,
            optimizer=optimizer,
            data_gen=torch.Generator().manual_seed(config.seeds.seed_data),
            aug_gen=torch.Generator(device=device).manual_seed(config.seeds.seed_augment),
            order=None,
            epoch_sums=torch.zeros(3, dtype=torch.float64, device=device),
        )

    @classmethod
    def from_checkpoint(
        cls, config: RunConfig, info: DatasetInfo, device: torch.device, path: str | os.PathLike
    ) -> TrainingState:
        """The state stored at `path` (a checkpoint or resume file of a run of `config`)."""
        state = cls.initial(config, info, device)
        tensors, header = load_checkpoint(path)
        state.load(tensors, header, str(path))
        return state

    def load(self, tensors: dict[str, torch.Tensor], header: dict[str, Any], source: str) -> None:
        """Take every part of the state from a checkpoint's tensors and header (names checked)."""
        device = self.epoch_sums.device
        load_model_state(self.model, split_prefix(tensors, MODEL_PREFIX), source)
        optimizer_from_flat(self.optimizer, tensors, header["optimizer"])
        self.data_gen.set_state(tensors["rng.data"])
        self.aug_gen.set_state(tensors["rng.augment"])
        self.order = tensors["data.order"].to(device) if "data.order" in tensors else None
        self.epoch_sums = tensors["train.epoch_sums"].to(device)
        self.step = header["step"]

    def to_checkpoint(self, steps_per_epoch: int, run_name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, header) of a checkpoint of this state, written by run `run_name`."""
        opt_tensors, opt_header = optimizer_to_flat(self.optimizer)
        tensors = {
            **with_prefix(self.model.state_dict(), MODEL_PREFIX),
            **opt_tensors,
            "rng.data": self.data_gen.get_state(),
            "rng.augment": self.aug_gen.get_state(),
            "train.epoch_sums": self.epoch_sums,
        }
        if self.order is not None:
            tensors["data.order"] = self.order
        header = {"step": self.step, "epoch": self.step / steps_per_epoch, "run": run_name, "optimizer": opt_header}
        return tensors, header

    def save(self, path: str | os.PathLike, steps_per_epoch: int, run_name: str) -> None:
        tensors, header = self.to_checkpoint(steps_per_epoch, run_name)
        save_checkpoint(path, tensors, header)
