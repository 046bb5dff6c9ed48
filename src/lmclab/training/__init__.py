"""Training with controlled randomness: recipes, schedules, the trainer (plan, state, loop), forks, evaluation."""

from lmclab.training.evaluate import evaluate
from lmclab.training.forks import child_config
from lmclab.training.loop import TrainingDiverged, TrainState, train_step
from lmclab.training.options import RunOptions
from lmclab.training.packed import train_pack
from lmclab.training.plan import Schedule, plan_training
from lmclab.training.recipes import PRESETS, Preset, UnknownPreset, get_preset
from lmclab.training.schedules import SCHEDULES, CheckpointSchedule, learning_rate
from lmclab.training.state import OPTIMIZERS, TrainingState, init_model, make_optimizer
from lmclab.training.trainer import fork, load_run_model, load_run_split, resolve_device, train

__all__ = [
    "OPTIMIZERS",
    "PRESETS",
    "SCHEDULES",
    "CheckpointSchedule",
    "Preset",
    "RunOptions",
    "Schedule",
    "TrainState",
    "TrainingDiverged",
    "TrainingState",
    "UnknownPreset",
    "child_config",
    "evaluate",
    "fork",
    "get_preset",
    "init_model",
    "learning_rate",
    "load_run_model",
    "load_run_split",
    "make_optimizer",
    "plan_training",
    "resolve_device",
    "train",
    "train_pack",
    "train_step",
]
