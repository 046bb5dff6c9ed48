"""Training with controlled randomness: recipes, schedules, the trainer, forks, evaluation."""
from lmclab.training.evaluate import evaluate
from lmclab.training.forks import child_config, fork
from lmclab.training.recipes import PRESETS, Preset, UnknownPreset, get_preset
from lmclab.training.schedules import SCHEDULES, CheckpointSchedule, learning_rate
from lmclab.training.trainer import (
    OPTIMIZERS,
    RunOptions,
    TrainingDiverged,
    TrainState,
    init_model,
    load_run_model,
    make_optimizer,
    resolve_device,
    train,
    train_step,
)

__all__ = [
    "OPTIMIZERS", "PRESETS", "SCHEDULES", "CheckpointSchedule", "Preset", "RunOptions", "TrainState",
    "TrainingDiverged", "UnknownPreset", "child_config", "evaluate", "fork", "get_preset", "init_model", "learning_rate",
    "load_run_model", "make_optimizer", "resolve_device", "train", "train_step",
]
