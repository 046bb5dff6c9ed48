"""The README's main job: independently seeded runs of one preset, then LMC between the first two.

Trains one run per seed (reused from the store when present), writes their training curves, aligns
run 2 to run 1 by weight matching, and evaluates the naive and the permuted straight paths on the
train and test splits (25 points), with every barrier definition, a tidy table and a figure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lmclab.config import SeedConfig
from lmclab.experiments.lmc import lmc_pairs
from lmclab.report import plot_histories, write_csv
from lmclab.training import RunOptions, get_preset, train
from lmclab.training.trainer import DEFAULT_OPTIONS


def run_pair_demo(
    preset: str,
    seeds: Sequence[int] = (0, 1),
    epochs: int | None = None,
    out: str = "out/demo",
    options: RunOptions = DEFAULT_OPTIONS,
    say: Callable[[str], None] = print,
    align: str | None = "weight",
    points: int = 25,
) -> dict[str, Any]:
    """Train one run per seed (all three seed streams differ); curves, final metrics; LMC of the first two."""
    base = get_preset(preset).config
    if epochs is not None:
        base = dataclasses.replace(base, train=dataclasses.replace(base.train, epochs=epochs))
    runs = [train(dataclasses.replace(base, seeds=SeedConfig.from_seed(s)), options) for s in seeds]
    out_dir = Path(out)
    rows = [{"seed": s, "run": r.path.name, **(r.meta.final_metrics or {})} for s, r in zip(seeds, runs)]
    table = write_csv(out_dir / "final_metrics.csv", rows)
    history_rows = [{"seed": s, "run": r.path.name, **h} for s, r in zip(seeds, runs) for h in r.meta.history]
    history_table = write_csv(out_dir / "history.csv", history_rows)
    info = runs[0].meta.data_info  # the training subset and the test split every epoch's evaluation used
    figure = plot_histories(
        out_dir / "training_curves.png",
        {f"seed {s}": r.meta.history for s, r in zip(seeds, runs)},
        title=f"{preset}: {len(runs)} independently seeded runs",
        examples=None if info is None else {"train": info.train_size, "test": info.test_size},
    )
    for row in rows:
        say(
            f"seed {row['seed']}: test accuracy {row['test_accuracy']:.4f}  train accuracy "
            f"{row['train_accuracy']:.4f}  run {row['run']}"
        )
    say(f"training curves: {figure}\ntables: {table}, {history_table}")
    summary: dict[str, Any] = {"runs": rows, "figure": str(figure), "tables": [str(table), str(history_table)]}
    if len(runs) >= 2 and align:
        say(
            f"linear mode connectivity between seed {seeds[0]} and seed {seeds[1]} ({align} matching, {points} points):"
        )
        summary["lmc"] = lmc_pairs(
            [(runs[0], runs[1])],
            method=align,
            out=out_dir / "lmc",
            say=say,
            points=points,
            data_dir=options.data_dir,
            device=options.device,
            progress=options.progress,
        )
    return summary
