"""Packed against solo training steps, as the packing tests compare them."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch

from lmclab.config import RunConfig
from lmclab.training import TrainingState, train_step
from lmclab.training.packed import Pack


def step_pack_and_solo(
    states: list[TrainingState],
    config: RunConfig,
    draw: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    steps: int = 3,
) -> tuple[Pack, list[TrainingState], list[dict[str, torch.Tensor]]]:
    """(pack, solo copies, initial state dicts) after `steps` steps of a pack of `states` and of a solo copy of
    each, on the same batches: `draw()` gives x (K, B, …) and y (K, B), member k training on x[k], y[k].
    Asserts that no op fell back to a loop over the members (torch's vmap "performance drop" warning)."""
    solo = copy.deepcopy(states)
    initial = [copy.deepcopy(s.model.state_dict()) for s in states]
    pack = Pack.of(states, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            x, y = draw()
            pack.step(x, y)
            for k, member in enumerate(solo):
                train_step(member.model, member.optimizer, x[k], y[k])
    assert not [w for w in caught if "performance drop" in str(w.message)]
    return pack, solo, initial
