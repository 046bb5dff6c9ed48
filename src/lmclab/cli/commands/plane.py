"""`lmclab plane`: loss and error on a grid over the plane through θ_A, θ_B and π(θ_B) (or three runs, or
one run and two filter-normalised random directions), a contour figure and tidy tables."""

from __future__ import annotations

import argparse
from typing import Any

from lmclab.cli.commands import Command
from lmclab.cli.common import (
    POINTS,
    POSITIVE,
    SPLITS,
    _allow_different_data,
    _bn,
    _common_io,
    _float_flag,
    _int_flag,
    _no_progress,
    _out,
    _pair_method,
    _progress,
    _say,
    _split,
    _subset,
)
from lmclab.config import SEED, number
from lmclab.experiments.plane import PlaneRequest, plane_runs
from lmclab.store import RunStore

MARGIN = number(0.0)
RADIUS = number(0.0, strict=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="RUN_A RUN_B (points A, B, π(B)); RUN_A RUN_B RUN_C (A and the others, aligned to A unless "
        "--align none); or RUN_A with --random-directions (directory, name, or hash prefix each)",
    )
    _pair_method(p, "weight", "align every run after the first to it")
    p.add_argument(
        "--random-directions",
        action="store_true",
        help="one run: the plane through it along two filter-normalised random directions (Li et al. 2018)",
    )
    _int_flag(p, "--seed", SEED, 0, "seed of the random directions")
    _int_flag(p, "--grid", POINTS, 21, "evenly spaced values per axis (plus the marked points' coordinates)")
    margin = "space around the points, as a fraction of their bounding box's longer side"
    _float_flag(p, "--margin", MARGIN, 0.2, margin, metavar="M")
    radius = "--random-directions: the grid spans ±R × each direction's norm"
    _float_flag(p, "--radius", RADIUS, 1.0, radius, metavar="R")
    _split(p, "test", both=True)
    _subset(p, "stratified subset of each split (quick runs)")
    _bn(p, ("none", "reset"), "BatchNorm statistics at each grid point")
    _int_flag(
        p,
        "--chunk",
        POSITIVE,
        None,
        "grid points evaluated per pass over the data",
        shown_default="1 on the CPU; on a GPU as many as half its free memory allows, at most 64",
    )
    _out(p, "tables and figure", "plane_<hash> in the run store")
    _no_progress(p)
    _allow_different_data(p)
    _common_io(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    request = PlaneRequest(
        align=None if args.align == "none" else args.align,
        random_directions=args.random_directions,
        seed=args.seed,
        grid=args.grid,
        margin=args.margin,
        radius=args.radius,
        splits=SPLITS if args.split == "both" else (args.split,),
        subset=args.subset,
        bn=args.bn,
    )
    request.check(len(args.runs))
    store = RunStore(args.runs_dir)
    return plane_runs(
        [store.get(r) for r in args.runs],
        request,
        chunk=args.chunk,
        out=args.out,
        data_dir=args.data_dir,
        device=args.device,
        download=not args.offline,
        progress=_progress(args),
        say=lambda t: _say(args, t),
        allow_different_data=args.allow_different_data,
    )


COMMAND = Command(
    "plane",
    "loss contours over the plane through θ_A, θ_B and π(θ_B) (or 3 runs, or random directions)",
    add_arguments,
    run,
)
