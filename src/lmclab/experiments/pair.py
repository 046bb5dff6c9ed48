"""A pair (or more) of independently seeded runs of one preset: train, report accuracies, plot curves."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lmclab.config import SeedConfig
from lmclab.report import plot_histories, write_csv
from lmclab.training import RunOptions, get_preset, train


def run_pair_demo(
    preset: str,
    seeds: Sequence[int] = (0, 1),
    epochs: int | None = None,
    out: str = "out/demo",
    options: RunOptions = RunOptions(),
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one run per seed (all three seed streams differ), then write curves and a final-metrics table."""
    base = get_preset(preset).config
    if epochs is not None:
        base = dataclasses.replace(base, train=dataclasses.replace(base.train, epochs=epochs))
    runs = [train(dataclasses.replace(base, seeds=SeedConfig.from_seed(s)), options) for s in seeds]
    out_dir = Path(out)
    rows = [{"seed": s, "run": r.path.name, **r.meta["final_metrics"]} for s, r in zip(seeds, runs)]
    table = write_csv(out_dir / "final_metrics.csv", rows)
    history_rows = [{"seed": s, "run": r.path.name, **h} for s, r in zip(seeds, runs) for h in r.meta["history"]]
    history_table = write_csv(out_dir / "history.csv", history_rows)
    figure = plot_histories(out_dir / "training_curves.png",
                            {f"seed {s}": r.meta["history"] for s, r in zip(seeds, runs)},
                            title=f"{preset}: {len(runs)} independently seeded runs")
    for row in rows:
        say(f"seed {row['seed']}: test accuracy {row['test_accuracy']:.4f}  train accuracy "
            f"{row['train_accuracy']:.4f}  run {row['run']}")
    say(f"figure: {figure}\ntables: {table}, {history_table}")
    return {"runs": rows, "figure": str(figure), "tables": [str(table), str(history_table)]}
