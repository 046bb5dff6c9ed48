"""`lmclab curve RUN_A RUN_B`: a low-loss curve between two runs (Garipov et al. 2018), stored, evaluated and
drawn with the straight naive and aligned paths (:mod:`lmclab.experiments.curve`)."""

from __future__ import annotations

import argparse
from typing import Any

from lmclab.cli.commands import Command
from lmclab.cli.common import (
    NON_NEGATIVE,
    POSITIVE,
    SPLITS,
    _bn,
    _common_io,
    _float_flag,
    _int_flag,
    _no_progress,
    _out,
    _pair_method,
    _points,
    _progress,
    _say,
    _split,
    _subset,
)
from lmclab.config import integer, number
from lmclab.experiments.curve import CurveSettings, curve_between_runs
from lmclab.paths.mode_curves import CURVE_BN_MODES, KINDS, MAX_BENDS, OPTIMIZERS
from lmclab.store import RunStore

DEFAULTS = CurveSettings()
LEARNING_RATE = number(0.0, strict=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", help="run A (directory, name, or hash prefix): the curve's start")
    p.add_argument("run_b", help="run B: the curve's end (after --align, its permuted copy)")
    _pair_method(p, "none", "align B to A before fitting the curve")
    compare = "the alignment of the straight aligned path drawn for comparison (none: the naive path only)"
    _pair_method(p, "weight", f"with --align none: {compare}", flag="--compare")
    p.add_argument(
        "--kind", choices=KINDS, default=DEFAULTS.kind, help=f"allowed: {', '.join(KINDS)} (default: {DEFAULTS.kind})"
    )
    _int_flag(
        p, "--bends", integer(1, MAX_BENDS), DEFAULTS.bends, "bend points (Bezier: degree − 1; polychain: corners)"
    )
    _int_flag(p, "--epochs", POSITIVE, DEFAULTS.epochs, "passes over the training data while fitting the bends")
    _float_flag(p, "--lr", LEARNING_RATE, DEFAULTS.lr, "learning rate (cosine decay to 0)", metavar="LR")
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=DEFAULTS.optimizer,
        help=f"allowed: {', '.join(OPTIMIZERS)} (SGD with momentum 0.9; default: {DEFAULTS.optimizer})",
    )
    _int_flag(p, "--batch-size", POSITIVE, DEFAULTS.batch_size, "examples per training step (one t per step)")
    _int_flag(
        p,
        "--train-subset",
        POSITIVE,
        None,
        "stratified subset of the training split to fit the bends on",
        shown_default="the whole split",
    )
    _int_flag(p, "--seed", NON_NEGATIVE, DEFAULTS.seed, "seed of the data order and the t drawn at each step")
    _points(p, "evenly spaced λ / t, both ends included, evaluated on each path")
    _split(p, "both", both=True)
    _subset(p, "stratified subset of each evaluated split")
    _bn(p, CURVE_BN_MODES, "normalisation statistics at each point")
    _out(p, "tables and figure", "curvepaths_<hash> in the run store")
    _no_progress(p)
    _common_io(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    store = RunStore(args.runs_dir)
    run_a, run_b = store.get(args.run_a), store.get(args.run_b)
    settings = CurveSettings(
        kind=args.kind,
        bends=args.bends,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        train_subset=args.train_subset,
        seed=args.seed,
    )
    return curve_between_runs(
        run_a,
        run_b,
        settings=settings,
        align=None if args.align == "none" else args.align,
        compare=None if args.compare == "none" else args.compare,
        points=args.points,
        splits=SPLITS if args.split == "both" else (args.split,),
        subset=args.subset,
        bn=args.bn,
        out=args.out,
        data_dir=args.data_dir,
        device=args.device,
        progress=_progress(args),
        say=lambda t: _say(args, t),
    )


COMMAND = Command(
    "curve",
    "a low-loss curve (Bezier or polygonal chain) between two runs, with the straight paths and barriers",
    add_arguments,
    run,
)
