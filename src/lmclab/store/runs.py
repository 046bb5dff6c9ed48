"""Content-addressed run store: `<root>/<kind>_<hash>/` holds one run's config, metadata and checkpoints.

  config.json                    normalised RunConfig (its hash is the directory name)
  meta.json                      status, library versions, git commit, device, history, final metrics
                                 (read and written as a `RunMeta`, lmclab.store.meta)
  checkpoints/step_<N>.safetensors   scheduled checkpoints and the final state (full training state)
  resume.safetensors             latest epoch-end state of an unfinished run

Root: the `runs_dir` argument, else $LMCLAB_RUNS_DIR, else ./runs.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmclab import __version__
from lmclab.config import RunConfig
from lmclab.store.atomic import atomic_write_json
from lmclab.store.checkpoint import MODEL_PREFIX, CheckpointError, load_checkpoint, split_prefix
from lmclab.store.meta import DataInfo, RunMeta

RUNS_ENV = "LMCLAB_RUNS_DIR"


class RunNotFound(LookupError):
    pass


def runs_root(runs_dir: str | os.PathLike | None = None) -> Path:
    return Path(runs_dir or os.environ.get(RUNS_ENV) or "runs")


@dataclass(frozen=True)
class Run:
    """A handle on one run's directory. Cheap: reads files on demand."""

    path: Path

    @property
    def hash(self) -> str:
        return self.path.name.rsplit("_", 1)[-1]

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(json.loads((self.path / "config.json").read_text()))

    @property
    def meta(self) -> RunMeta:
        """meta.json, read now (an empty RunMeta while the file does not exist)."""
        p = self.path / "meta.json"
        return RunMeta.from_json(json.loads(p.read_text()) if p.is_file() else {})

    def update_meta(self, **fields: Any) -> RunMeta:
        """Set `fields` in meta.json (every other key is kept as it is); returns the new metadata."""
        meta = self.meta.updated(**fields)
        atomic_write_json(self.path / "meta.json", meta.to_json())
        return meta

    @property
    def data_info(self) -> DataInfo:
        """The training data the run saw (meta.json's data_info); CheckpointError before training started."""
        info = self.meta.data_info
        if info is None:
            raise CheckpointError(f"run {self.path} has not started training (no data_info in meta.json)")
        return info

    @property
    def parent(self) -> Run | None:
        """A forked child's parent run (stored beside the child); None for a run trained from its initialisation."""
        fork = self.meta.fork
        return None if fork is None else Run(self.path.parent / fork.parent_run)

    @property
    def complete(self) -> bool:
        return self.meta.status == "complete" and self.final_checkpoint() is not None

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def resume_path(self) -> Path:
        return self.path / "resume.safetensors"

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoint_dir / f"step_{step:08d}.safetensors"

    def checkpoint_steps(self) -> list[int]:
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(int(p.stem.split("_")[1]) for p in self.checkpoint_dir.glob("step_*.safetensors"))

    def final_checkpoint(self) -> Path | None:
        step = self.meta.total_steps
        if step is None:
            return None
        path = self.checkpoint_path(int(step))
        return path if path.is_file() else None

    def load_state(self, step: int | None = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Model parameters and buffers at `step` (default: the final state)."""
        if step is None:
            path = self.final_checkpoint()
            if path is None:
                raise CheckpointError(
                    f"run {self.path} has no final checkpoint (status: {self.meta.status or 'unknown'})"
                )
        else:
            path = self.checkpoint_path(step)
            if not path.is_file():
                raise CheckpointError(
                    f"run {self.path} has no checkpoint at step {step}; it has steps {self.checkpoint_steps()}"
                )
        tensors, _ = load_checkpoint(path, device)
        return split_prefix(tensors, MODEL_PREFIX)

    def summary(self) -> dict[str, Any]:
        cfg, meta = self.config, self.meta
        return {
            "run": self.path.name,
            "path": str(self.path),
            "dataset": cfg.data.dataset,
            "model": cfg.model.model,
            "width": cfg.model.width,
            "norm": cfg.model.norm,
            "seeds": [cfg.seeds.seed_init, cfg.seeds.seed_data, cfg.seeds.seed_augment],
            "preset": meta.preset,
            "status": meta.status,
            "epochs_done": len(meta.history),
            "final": meta.final_metrics,
            "fork": (
                {"parent": meta.fork.parent_run, "epoch": meta.fork.epoch, "step": meta.fork.step}
                if meta.fork
                else None
            ),
        }


class RunStore:
    """Find or create runs by config hash under one root directory."""

    def __init__(self, runs_dir: str | os.PathLike | None = None, kind: str = "train") -> None:
        self.root = runs_root(runs_dir)
        self.kind = kind

    def path_for(self, config: RunConfig) -> Path:
        return self.run(config.run_hash()).path

    def run(self, run_hash: str) -> Run:
        """The handle of the run with hash `run_hash` (`<root>/<kind>_<hash>`), stored or not."""
        return Run(self.root / f"{self.kind}_{run_hash}")

    def open(self, config: RunConfig, **meta: Any) -> Run:
        """The run for `config`, created (config.json + meta.json) if new."""
        run = Run(self.path_for(config))
        if not (run.path / "config.json").is_file():
            atomic_write_json(run.path / "config.json", config.normalised().to_dict())
        if not (run.path / "meta.json").is_file():
            created = RunMeta.from_json({"status": "created", "hash": config.run_hash(), **meta})
            atomic_write_json(run.path / "meta.json", created.to_json())
        return run

    def find(self, config: RunConfig) -> Run | None:
        run = Run(self.path_for(config))
        return run if (run.path / "config.json").is_file() else None

    def runs(self) -> list[Run]:
        if not self.root.is_dir():
            return []
        return [Run(p) for p in sorted(self.root.iterdir()) if (p / "config.json").is_file()]

    def get(self, ref: str | os.PathLike) -> Run:
        """A run by path, directory name, or unique hash prefix."""
        p = Path(ref)
        if (p / "config.json").is_file():
            return Run(p)
        matches = [r for r in self.runs() if r.path.name == str(ref) or r.hash.startswith(str(ref))]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise RunNotFound(
                f"no run {str(ref)!r} in {self.root.resolve()} "
                f"(runs there: {len(self.runs())}; `lmclab runs` lists them)"
            )
        raise RunNotFound(f"{str(ref)!r} is ambiguous in {self.root}: " + ", ".join(r.path.name for r in matches))


def environment_record() -> dict[str, Any]:
    """Library versions and git commit, saved with every run."""
    import numpy
    import safetensors

    record: dict[str, Any] = {
        "lmclab": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        record["git_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        record["git_commit"] = None
    return record
