"""Content-addressed run store: `<root>/<kind>_<hash>/` holds one run's config, metadata and checkpoints.

  config.json                    normalised RunConfig (its hash is the directory name)
  meta.json                      status, library versions, git commit, device, history, final metrics
                                 (read and written as a `RunMeta`, lmclab.store.meta)
  checkpoints/step_<N>.safetensors   scheduled checkpoints and the final state (full training state)
  resume.safetensors             latest epoch-end state of an unfinished run

Root: the `runs_dir` argument, else $LMCLAB_RUNS_DIR, else ./runs.

A run is what its files say. Its status (`Run.status`) is read from disk: a run whose final checkpoint
is stored is trained ("complete" once its final metrics are stored too, "unevaluated" until then: training
it again only evaluates it), "diverged" as meta.json records, otherwise what meta.json records (a
half-written run resumes). A run directory whose config.json is missing, unreadable, not a run config
or does not hash to the directory's name, or whose meta.json is unreadable or names another run, is
*damaged* (`Run.damage` says why): `RunStore.scan` lists it apart, `RunStore.runs` leaves it out, and
reading its config or metadata, finding, opening or getting it raises `RunDamaged` naming it.
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
from lmclab.config import RunConfig, content_hash
from lmclab.store.atomic import atomic_write_json, register_root
from lmclab.store.checkpoint import MODEL_PREFIX, CheckpointError, load_checkpoint, split_prefix
from lmclab.store.errors import RunDamaged
from lmclab.store.locks import is_locked
from lmclab.store.meta import DataInfo, RunMeta

RUNS_ENV = "LMCLAB_RUNS_DIR"
#: what `Run.status` can say (the statuses meta.json records, plus the ones read from the files)
RUN_STATUSES = ("created", "running", "interrupted", "diverged", "unevaluated", "complete", "damaged")


class RunNotFound(LookupError):
    pass


def runs_root(runs_dir: str | os.PathLike | None = None) -> Path:
    return Path(runs_dir or os.environ.get(RUNS_ENV) or "runs")


@dataclass(frozen=True)
class Run:
    """A handle on one run's directory. Cheap: reads files on demand."""

    path: Path

    def __post_init__(self) -> None:
        register_root(self.path.parent)  # the store it lies in: writes below it never follow links

    @property
    def hash(self) -> str:
        return self.path.name.rsplit("_", 1)[-1]

    @property
    def config(self) -> RunConfig:
        """config.json, checked: RunDamaged when it is unreadable, not a run config or does not hash to the
        directory's name; RunNotFound when there is no run here."""
        p = self.path / "config.json"
        if not os.path.lexists(p):
            if self.path.is_dir():
                raise RunDamaged(self.path, "config.json is missing")
            raise RunNotFound(f"no run at {self.path} (no such directory)")
        raw = _read_json(p, self.path, "config.json")
        try:
            config = RunConfig.from_dict(raw)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise RunDamaged(self.path, f"config.json is not a run config ({exc})") from exc
        stored = stored_config_hash(raw)
        if stored != self.hash:
            raise RunDamaged(
                self.path,
                f"config.json hashes to {stored}, not to {self.hash} (the directory's name): it was edited, "
                "or copied from another run",
            )
        return config

    @property
    def stored(self) -> bool:
        """Whether the run is in the store (its config.json exists)."""
        return (self.path / "config.json").is_file()

    @property
    def meta(self) -> RunMeta:
        """meta.json, read now (an empty RunMeta while the file does not exist); RunDamaged when it is
        unreadable or names another run."""
        p = self.path / "meta.json"
        if not os.path.lexists(p):
            return RunMeta.from_json({})
        raw = _read_json(p, self.path, "meta.json")
        try:
            meta = RunMeta.from_json(raw)
        except (TypeError, ValueError) as exc:
            raise RunDamaged(self.path, f"meta.json is not run metadata ({exc})") from exc
        if isinstance(meta.hash, str) and meta.hash != self.hash:
            raise RunDamaged(self.path, f"meta.json is that of run {meta.hash}, not of {self.hash}")
        return meta

    @property
    def damage(self) -> str | None:
        """Why the run directory is damaged (see the module docstring); None for a healthy run."""
        try:
            self.config  # noqa: B018 - read to check
            self.meta  # noqa: B018
        except RunDamaged as exc:
            return exc.reason
        except RunNotFound:
            return "the directory does not exist"
        return None

    @property
    def status(self) -> str:
        """What the run's files say it is (one of RUN_STATUSES; see the module docstring)."""
        if self.damage is not None:
            return "damaged"
        meta = self.meta
        final = meta.total_steps is not None and self.checkpoint_path(int(meta.total_steps)).is_file()
        if meta.status == "complete" and final:
            return "complete"
        if meta.status == "diverged":
            return "diverged"
        if final:
            return "unevaluated"  # (killed during the final evaluation: training again only evaluates)
        if meta.status == "complete":
            return "interrupted"  # (its final checkpoint is gone: training again resumes)
        if meta.status == "running" and not is_locked(self.path, self.path.parent):
            return "interrupted"  # (its trainer died without a word: nobody holds its lock; training again resumes)
        return meta.status or "created"

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
    def trained(self) -> bool:
        """Whether the run's final state is stored: complete, or "unevaluated" (killed during its final
        evaluation, which training it again computes). What commands that use the final state need."""
        return self.status in ("complete", "unevaluated")

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
        """One row of `lmclab runs`; a damaged run's row has its status "damaged", the reason under
        "damage" and no other fields but its name and path."""
        damage = self.damage
        if damage is not None:
            return {"run": self.path.name, "path": str(self.path), "status": "damaged", "damage": damage}
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
            "status": self.status,
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
        register_root(self.root)

    def path_for(self, config: RunConfig) -> Path:
        return self.run(config.run_hash()).path

    def run(self, run_hash: str) -> Run:
        """The handle of the run with hash `run_hash` (`<root>/<kind>_<hash>`), stored or not."""
        return Run(self.root / f"{self.kind}_{run_hash}")

    def open(self, config: RunConfig, **meta: Any) -> Run:
        """The run for `config`, created (config.json + meta.json) if new; RunDamaged if its directory is."""
        run = Run(self.path_for(config))
        if os.path.lexists(run.path / "config.json"):
            refuse_damaged(run)
        else:
            atomic_write_json(run.path / "config.json", config.normalised().to_dict())
        if not (run.path / "meta.json").is_file():
            created = RunMeta.from_json({"status": "created", "hash": config.run_hash(), **meta})
            atomic_write_json(run.path / "meta.json", created.to_json())
        return run

    def find(self, config: RunConfig) -> Run | None:
        """The stored run of `config`, None if there is none; RunDamaged if its directory is damaged."""
        run = Run(self.path_for(config))
        if not os.path.lexists(run.path / "config.json"):
            return None
        return refuse_damaged(run)

    def scan(self) -> RunScan:
        """Every run directory under the root, healthy and damaged apart: each directory holding a
        config.json, and each non-empty `<kind>_*` directory (one without config.json is damaged; an empty
        one is a run whose creation was cut short, which training it completes)."""
        if not self.root.is_dir():
            return RunScan([], [])
        healthy: list[Run] = []
        damaged: list[Run] = []
        for p in sorted(self.root.iterdir()):
            if not p.is_dir():
                continue
            if not os.path.lexists(p / "config.json") and not (p.name.startswith(f"{self.kind}_") and any(p.iterdir())):
                continue
            run = Run(p)
            (healthy if run.damage is None else damaged).append(run)
        return RunScan(healthy, damaged)

    def runs(self) -> list[Run]:
        """The healthy runs (`scan` also gives the damaged ones)."""
        return self.scan().healthy

    def get(self, ref: str | os.PathLike) -> Run:
        """A run by path, or by a unique prefix of its directory name or of its hash; RunDamaged (naming it
        and why) if the run it names is damaged."""
        if not os.fspath(ref).strip():
            raise RunNotFound(f"{os.fspath(ref)!r} names no run; allowed: a run directory, name, or hash prefix")
        p = Path(ref)
        if os.path.lexists(p / "config.json"):
            return refuse_damaged(Run(p))
        scan = self.scan()
        text = os.fspath(ref)
        matches = [r for r in scan.all() if r.path.name.startswith(text) or r.hash.startswith(text)]
        if len(matches) == 1:
            return refuse_damaged(matches[0])
        if not matches:
            raise RunNotFound(
                f"no run {str(ref)!r} in {self.root.resolve()} "
                f"(runs there: {len(scan.healthy)}; `lmclab runs` lists them)"
            )
        raise RunNotFound(f"{str(ref)!r} is ambiguous in {self.root}: " + ", ".join(r.path.name for r in matches))


@dataclass(frozen=True)
class RunScan:
    """The run directories of a store: `healthy` ones and `damaged` ones (`Run.damage` says why)."""

    healthy: list[Run]
    damaged: list[Run]

    def all(self) -> list[Run]:
        """Every run directory, in name order."""
        return sorted(self.healthy + self.damaged, key=lambda r: r.path.name)


def refuse_damaged(run: Run) -> Run:
    """`run`, unless it is damaged: then RunDamaged naming it and why."""
    damage = run.damage
    if damage is not None:
        raise RunDamaged(run.path, damage)
    return run


def stored_config_hash(raw: dict[str, Any]) -> str:
    """The hash a stored config.json gives, as `RunConfig.run_hash` computes it from the config it was
    written from (fields that are None and sections left empty dropped), read from the file as it is, so
    that it does not depend on how this version of lmclab would normalise the config."""
    sections = {
        name: ({k: v for k, v in values.items() if v is not None} if isinstance(values, dict) else values)
        for name, values in raw.items()
    }
    return content_hash({name: values for name, values in sections.items() if values not in ({}, None)})


def _read_json(path: Path, run: Path, name: str) -> dict[str, Any]:
    """A run file's JSON object; RunDamaged naming `run` when it is unreadable, truncated or not an object."""
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise RunDamaged(run, f"{name} is unreadable ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise RunDamaged(run, f"{name} is not valid JSON (truncated or overwritten: {exc})") from exc
    if not isinstance(raw, dict):
        raise RunDamaged(run, f"{name} is not a JSON object")
    return raw


def environment_record(device: str | torch.device | None = None) -> dict[str, Any]:
    """Library versions, git commit and, under "determinism", what the run's bits depend on besides its
    config (see `determinism_record`); saved with every run. `device`: the device it trains on."""
    import numpy
    import safetensors

    record: dict[str, Any] = {
        "lmclab": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "determinism": determinism_record(device),
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


def determinism_record(device: str | torch.device | None = None) -> dict[str, Any]:
    """The settings a run's numbers depend on besides its config, read in this process now.

    The same config gives the same bits on the same device type with the same torch build, the same CPU
    instruction set (`cpu_capability`) and, on CPU, the same thread count (reductions are split by
    thread); on CUDA also the same card model, CUDA/cuDNN versions and these flags, and even then some
    kernels (atomics) are nondeterministic unless `deterministic_algorithms` is on (which needs
    CUBLAS_WORKSPACE_CONFIG set)."""
    import warnings

    def tf32(backend: Any, sub: str | None = None) -> Any:
        """TF32 use: the fp32_precision setting where torch has it, else the legacy allow_tf32 flag."""
        try:
            target = getattr(backend, sub) if sub and hasattr(backend, sub) else backend
            if hasattr(target, "fp32_precision"):
                return str(target.fp32_precision)
            return bool(backend.allow_tf32)
        except (AttributeError, RuntimeError):
            return None

    dev = None if device is None else torch.device(device)
    with warnings.catch_warnings():  # some builds deprecate the tf32 flags in favour of fp32_precision
        warnings.simplefilter("ignore")
        record: dict[str, Any] = {
            "torch": torch.__version__,
            "device_type": None if dev is None else dev.type,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cudnn_conv_tf32": tf32(torch.backends.cudnn, "conv"),
            "cuda_matmul_tf32": tf32(torch.backends.cuda.matmul),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        }
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        record["device_name"] = torch.cuda.get_device_name(dev)
        record["device_capability"] = list(torch.cuda.get_device_capability(dev))
    return record
