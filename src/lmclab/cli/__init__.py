"""The `lmclab` command line. Every command that prints results accepts `--json`.

User errors never show a traceback: every argument and every config value is checked before anything
runs or is written (argparse `type=` functions built from the allowed values of `lmclab.config`, then
each command's own checks, which raise `UsageError`); a bad one exits with status 2 and one line naming
the flag, the value and what is allowed. The library's user-facing errors (`USER_ERRORS`: a missing
run, a missing dataset, a damaged file, …) are reported the same way; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lmclab.align import PAIR_METHODS, POPULATION_METHODS
from lmclab.cli.commands import plugin_commands
from lmclab.cli.common import (
    LAYER_ORDERS,
    NON_NEGATIVE,
    POINTS,
    POSITIVE,
    SPLITS,
    Parser,
    _align_as_flagged,
    _allow_different_data,
    _bn,
    _checkpoint_schedule,
    _common_io,
    _epochs_type,
    _existing_path,
    _help,
    _int_flag,
    _int_list,
    _message,
    _methods_help,
    _no_progress,
    _options,
    _out,
    _pair_method,
    _points,
    _progress,
    _say,
    _split,
    _subset,
    _typed,
)
from lmclab.config import (
    SEED,
    RunConfig,
    SeedConfig,
    UsageError,
    add_config_flags,
    config_from_args,
    integers,
    one_of,
)
from lmclab.data import DATASET_NAMES, DataError
from lmclab.experiments.context import EXECUTORS, Execution, PlanReady, default_out, using_execution
from lmclab.experiments.costs import PROFILES, profile
from lmclab.experiments.graph import StepsFailed, describe_plan, plan_total
from lmclab.experiments.ito import merge_runs
from lmclab.experiments.lmc import align_runs, lmc_pairs, load_alignment
from lmclab.experiments.pair import run_pair_demo
from lmclab.experiments.predict import predict_vs_measure, sharpness
from lmclab.experiments.ray_executor import parse_address
from lmclab.experiments.registry import EXPERIMENTS, catalogue, get_experiment
from lmclab.experiments.settings import PresetError
from lmclab.models import MODEL_NAMES, ModelError, build_model, model_defaults
from lmclab.paths import layer_groups
from lmclab.permutation import SpecError, verify_permutation
from lmclab.store import CheckpointError, DataMismatch, LockTimeout, Run, RunNotFound, RunStore, Store
from lmclab.training import (
    PRESETS,
    CheckpointSchedule,
    TrainingDiverged,
    UnknownPreset,
    evaluate,
    fork,
    get_preset,
    load_run_model,
    load_run_split,
    resolve_device,
    train,
    train_pack,
)
from lmclab.training.forks import check_parent

#: The errors a user can cause and fix (a bad value, a missing run or dataset, a damaged file, a run that
#: diverged): reported in one line, exit status 2. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    DataError,
    DataMismatch,
    ModelError,
    CheckpointError,
    RunNotFound,
    UnknownPreset,
    PresetError,
    TrainingDiverged,
    SpecError,
    LockTimeout,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lmclab", description=__import__("lmclab").__doc__)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="one of the commands below; `lmclab COMMAND --help`"
    )

    p = sub.add_parser("train", help="train a preset (reuses or resumes a stored run with the same config)")
    p.add_argument(
        "preset",
        type=_typed(one_of(lambda: tuple(PRESETS)), str),
        help=f"training recipe; allowed: one of {', '.join(PRESETS)} (`lmclab presets`)",
    )
    add_config_flags(p)
    p.add_argument(
        "--checkpoints",
        default=CheckpointSchedule(),
        type=_checkpoint_schedule,
        metavar="SPEC",
        help="extra kept checkpoints; allowed: epochs:0,1,2 | every:N | log:K | steps:S,T, joined by '+' "
        "(the final state is always kept)",
    )
    pack_seeds = integers(0, nonempty=True, example="0,1,2")
    p.add_argument(
        "--pack-seeds",
        default=None,
        metavar="S,S,…",
        type=_typed(pack_seeds, _int_list),
        help=f"train one run per seed (each as --seed S makes it) together as one pack on one device (stacked "
        f"models, one vmap step; lmclab.training.train_pack): each a normal run with its own hash; its bits may "
        f"differ from training it alone by float summation order (~5e-7 relative; Adam can amplify it to ~1e-4 "
        f"in a few weights); BatchNorm models pack too (each member its own running statistics), dropout models "
        f"do not; allowed: {pack_seeds.describe()}, distinct",
    )
    _no_progress(p)
    _int_flag(p, "--eval-every", NON_NEGATIVE, 1, "epochs between test evaluations (0: only at the end)")
    _common_io(p)

    p = sub.add_parser(
        "fork", help="fork a run at chosen epochs into children with their own data order (Singh et al.)"
    )
    p.add_argument(
        "parent",
        help="a stored run (directory, name, or hash prefix), or a training preset (trained "
        "first; config flags apply to it)",
    )
    p.add_argument(
        "--at",
        required=True,
        type=_epochs_type(),
        metavar="E,E,…",
        help="parent epochs to fork at, e.g. 0,1,2,15 (0: the initialisation); allowed: integers >= 0 below the "
        "parent's epochs",
    )
    _int_flag(p, "--children", POSITIVE, 2, "children per fork epoch")
    p.add_argument("--vary-augment", action="store_true", help="children also get their own augmentation seed")
    p.add_argument(
        "--checkpoints",
        default=None,
        type=_checkpoint_schedule,
        metavar="SPEC",
        help="children's kept checkpoints; allowed: epochs:… | every:N | log:K | steps:…, joined by '+' "
        "(default: every epoch)",
    )
    add_config_flags(p)
    _no_progress(p)
    _int_flag(p, "--eval-every", NON_NEGATIVE, 1, "epochs between test evaluations (0: only at the end)")
    _common_io(p)

    p = sub.add_parser(
        "runs", help="list stored runs: status, seed, metrics, and the config fields that differ between them"
    )
    _common_io(p, data=False, device=False)

    p = sub.add_parser("eval", help="evaluate a run's checkpoint on a split")
    p.add_argument("run", help="run directory, name, or hash prefix")
    _split(p, "test", both=True)
    p.add_argument(
        "--step",
        metavar="INT",
        type=_typed(NON_NEGATIVE),
        default=None,
        help="checkpoint step (default: the final state); allowed: a step the run kept (`lmclab runs --json`)",
    )
    _no_progress(p)
    _common_io(p)

    p = sub.add_parser("align", help="align run B's hidden units to run A's (verified, cached in the store)")
    p.add_argument("run_a", help="the reference run (directory, name, or hash prefix)")
    p.add_argument("run_b", help="the run whose units are permuted onto run A's")
    p.add_argument(
        "--method",
        choices=tuple(PAIR_METHODS),
        default="weight",
        help=_help(f"allowed: {', '.join(PAIR_METHODS)} (default: weight). {_methods_help(PAIR_METHODS)}"),
    )
    _int_flag(p, "--ste-epochs", POSITIVE, 10, "epochs of STE over the training split")
    _int_flag(p, "--seed", SEED, 0, "group order of weight matching")
    _int_flag(
        p,
        "--examples",
        POSITIVE,
        5000,
        "training examples for activation matching (STE: for choosing the best permutation)",
    )
    _no_progress(p)
    _allow_different_data(p)
    _common_io(p)

    p = sub.add_parser("merge", help="align K stored runs jointly, merge them, barriers between all pairs (Ito et al.)")
    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="two or more runs of one architecture; the first is the reference"
    )
    p.add_argument(
        "--method",
        nargs="+",
        default=["merge_many"],
        choices=tuple(POPULATION_METHODS),
        help=_help(
            f"one or more of {', '.join(POPULATION_METHODS)} (default: merge_many). "
            + _methods_help(POPULATION_METHODS)
        ),
    )
    _int_flag(p, "--ste-epochs", POSITIVE, 10, "STE-MM epochs (the paper: 10, lr 1e-3, batch 256)")
    _int_flag(
        p,
        "--ste-examples",
        POSITIVE,
        None,
        "STE-MM on a stratified training subset of this size",
        shown_default="the whole split",
    )
    _points(p, "evenly spaced λ per pair, both ends included")
    _subset(p, "stratified subset of each split for evaluation")
    p.add_argument("--trace", action="store_true", help="also the merged model's Hessian trace (plain, scale-aware)")
    _out(p, "tables and heat maps", "out/merge", default="out/merge")
    _executor_flags(p)
    _no_progress(p)
    _allow_different_data(p)
    _common_io(p)

    p = sub.add_parser("interpolate", help="loss/accuracy on the straight path between two runs, with barriers")
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_A RUN_B",
        help="one pair of runs, or several pairs (A1 B1 A2 B2 …: curves become mean ± std)",
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--align",
        choices=tuple(PAIR_METHODS),
        default=None,
        help=f"align first (naive path too); allowed: {', '.join(PAIR_METHODS)} (`lmclab align --help`)",
    )
    how.add_argument(
        "--perm",
        nargs="+",
        default=None,
        metavar="FILE",
        type=_existing_path,
        help="saved permutation(s) from `lmclab align`, one per pair; allowed: existing perm.safetensors files "
        "or their directories",
    )
    _points(p)
    _split(p, "both", both=True)
    _subset(p, "stratified subset of each split (quick runs)")
    _bn(p, ("none", "reset", "repair"), "normalisation statistics at each λ")
    p.add_argument(
        "--layers",
        nargs="+",
        default=None,
        help="interpolate only these layer groups (module names with parameters; others from --base), "
        "or cumulative:shallow|deep|random",
    )
    p.add_argument(
        "--base", choices=("a", "b"), default="a", help="where non-interpolated layers come from; allowed: a, b"
    )
    _out(p, "output directory", "lmc_<hash> in the run store")
    _no_progress(p)
    _allow_different_data(p)
    _common_io(p)

    p = sub.add_parser("predict", help="Hessian-predicted vs measured barriers (Singh Prop. 1, Prop. 2, eq. 20–21)")
    p.add_argument("run_a", help="run 1 (directory, name, or hash prefix)")
    p.add_argument("run_b", help="run 2")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--align",
        choices=tuple(PAIR_METHODS),
        default=None,
        help=f"align B to A first; allowed: {', '.join(PAIR_METHODS)} (`lmclab align --help`)",
    )
    how.add_argument(
        "--perm",
        default=None,
        metavar="FILE",
        type=_existing_path,
        help="a saved permutation (from `lmclab align`); allowed: an existing file or its directory",
    )
    _split(p, "test")
    _subset(p, "examples used", 1000)
    _points(p, "evenly spaced α, both ends included")
    p.add_argument(
        "--orders",
        nargs="+",
        default=["shallow", "deep"],
        choices=LAYER_ORDERS,
        help="orders of the cumulative layer sets; allowed: shallow, deep, random (default: shallow deep)",
    )
    _out(p, "tables and figure", "out/predict", default="out/predict")
    _no_progress(p)
    _allow_different_data(p)
    _common_io(p)

    p = sub.add_parser("sharpness", help="Hessian trace (95%% CI), scale-aware trace and top eigenvalue of a run")
    p.add_argument("run", help="run directory, name, or hash prefix")
    _split(p, "train")
    _subset(p, "examples used", 1000)
    p.add_argument(
        "--probes",
        metavar="INT",
        type=_typed(POINTS),
        default=100,
        help="Hessian-vector products per trace; allowed: an integer >= 2 (hutchpp: >= 4) (default: 100)",
    )
    p.add_argument(
        "--method",
        choices=("hutchinson", "hutchpp"),
        default="hutchinson",
        help="trace estimator; allowed: hutchinson, hutchpp (default: hutchinson)",
    )
    p.add_argument("--no-eigenvalue", action="store_true", help="skip the top eigenvalue (power iteration)")
    _int_flag(p, "--seed", SEED, 0, "probe seed")
    _no_progress(p)
    _common_io(p)

    p = sub.add_parser(
        "run",
        help=_help(
            "reproduce a paper's figures in one command ("
            + ", ".join(EXPERIMENTS)
            + "; `lmclab run` lists them and their presets)"
        ),
    )
    p.add_argument(
        "experiment",
        nargs="?",
        choices=tuple(EXPERIMENTS),
        metavar="EXPERIMENT",
        help=_help(
            "; ".join(f"{name}: {e.description}" for name, e in EXPERIMENTS.items())
            + " (leave out: list the experiments and their presets)"
        ),
    )
    p.add_argument(
        "--preset",
        default="smoke",
        help="smoke (CPU, minutes) or paper (the paper's settings, GPU); allowed: a preset of the experiment "
        "(`lmclab run` lists every preset)",
    )
    _out(p, "figures and tables", "out/EXPERIMENT-PRESET")
    _executor_flags(p)
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the step graph (steps by kind, how many are stored, estimated cost from measured step "
        "times) and run nothing",
    )
    p.add_argument(
        "--on",
        choices=tuple(PROFILES),
        default=None,
        help="with --plan: also estimate each step's cost from its size on a device profile and total it in "
        "hours of one device (h100: GPU-hours on one H100 from DESIGN.md's measured ResNet-20 throughput; "
        "cpu: this machine); steps of unknown cost are listed; allowed: " + ", ".join(PROFILES),
    )
    p.add_argument(
        "--pack",
        action="store_true",
        help="train the training runs that are ready together and differ only in their seeds as one pack on "
        "one device (stacked models, one vmap step; lmclab.training.train_pack; one Ray task under --executor "
        "ray), each stored as its own run and step; bits may differ from training alone by float summation "
        "order (~5e-7 relative; Adam can amplify it to ~1e-4 in a few weights); BatchNorm models pack too (each "
        "member its own running statistics), dropout models train one at a time (said)",
    )
    _no_progress(p)
    _common_io(p)

    for name, text in (
        ("presets", "list training presets"),
        ("models", "list models and their options"),
        ("datasets", "list dataset names"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    p = sub.add_parser("demo", help="the README's main job: train two MLPs, align them, measure LMC")
    p.add_argument(
        "--preset",
        default="mlp_mnist",
        type=_typed(one_of(lambda: tuple(PRESETS)), str),
        help=f"training recipe; allowed: one of {', '.join(PRESETS)} (default: mlp_mnist)",
    )
    _int_flag(p, "--epochs", NON_NEGATIVE, 5, "training epochs of each model")
    seeds = integers(0, nonempty=True, example="0,1")
    p.add_argument(
        "--seeds",
        default=(0, 1),
        metavar="S,S,…",
        type=_typed(seeds, _int_list),
        help=f"one model per seed; allowed: {seeds.describe()}, distinct (default: 0,1)",
    )
    _out(p, "where figures and tables go", "out/demo", default="out/demo")
    _pair_method(p, "weight")
    _points(p)
    _no_progress(p)
    _common_io(p)
    for command in PLUGIN_COMMANDS:
        command.add_arguments(sub.add_parser(command.name, help=command.help))
    for choice in sub._choices_actions:  # each command's --help opens with its one-line description
        subparser = sub.choices[choice.dest]
        subparser.description = subparser.description or (choice.help or "").replace("%%", "%")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:  # user errors: one clear message, no traceback (anything else is a bug: it propagates)
        print(f"lmclab {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    return 0


# ------------------------------------------------------------------------------------ commands


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    preset = get_preset(args.preset)
    if args.pack_seeds is not None:
        return _train_packed(args, preset.config, preset.name)
    config = config_from_args(preset.config, args)
    config.validate()
    if config.fork.parent is not None:  # --fork-parent takes any run reference (name, path, hash prefix)
        parent = RunStore(args.runs_dir).get(config.fork.parent)
        config = dataclasses.replace(config, fork=dataclasses.replace(config.fork, parent=parent.hash))
        _check_fork_point(parent, config)
    config = config.normalised()
    run = train(config, _options(args, preset=preset.name, eval_every=args.eval_every))
    _record_seed(run, args.seed)
    final = run.meta.final_metrics or {}
    _say(args, f"run: {run.path}\n" + "  ".join(f"{k} {v:.4f}" for k, v in final.items()))
    return {"run": run.path.name, "path": str(run.path), "hash": run.hash, "final_metrics": final}


def _train_packed(args: argparse.Namespace, base: RunConfig, preset: str) -> dict[str, Any]:
    """`lmclab train PRESET --pack-seeds S,S,…`: the run of each seed (as `--seed S` makes it) trained in one pack."""
    seeds = ",".join(map(str, args.pack_seeds))
    if len(set(args.pack_seeds)) < len(args.pack_seeds):
        raise UsageError(f"--pack-seeds {seeds}: a seed given twice names one run twice; allowed: distinct seeds")
    for flag, value in (("--seed", args.seed), ("--fork-parent", args.cfg_fork_parent)):
        if value is not None:
            raise UsageError(f"{flag} {value} with --pack-seeds {seeds}: allowed: one of them")
    configs = [config_from_args(base, argparse.Namespace(**{**vars(args), "seed": s})) for s in args.pack_seeds]
    runs = train_pack(configs, _options(args, preset=preset, eval_every=args.eval_every))
    rows = []
    for seed, run in zip(args.pack_seeds, runs, strict=True):
        _record_seed(run, seed)
        final = run.meta.final_metrics or {}
        _say(args, f"run: {run.path} (seed {seed})\n" + "  ".join(f"{k} {v:.4f}" for k, v in final.items()))
        rows.append({"seed": seed, "run": run.path.name, "path": str(run.path), "hash": run.hash})
        rows[-1]["final_metrics"] = final
    return {"pack": len(runs), "runs": rows}


def _check_fork_point(parent: Run, child: RunConfig) -> None:
    """UsageError unless `child` continues `parent`'s training from a point the parent reaches."""
    try:
        check_parent(parent.config, child)
    except ValueError as exc:
        raise UsageError(f"--fork-parent {parent.path.name}: {exc}") from None
    fork, meta = child.fork, parent.meta
    if meta.total_steps is None or not meta.steps_per_epoch:
        return  # the parent has not started: training it decides
    step = fork.step if fork.step is not None else (fork.epoch or 0) * meta.steps_per_epoch
    flag, value = ("--fork-step", fork.step) if fork.step is not None else ("--fork-epoch", fork.epoch)
    if step >= meta.total_steps:
        raise UsageError(
            f"{flag} {value}: parent {parent.path.name} trains {meta.total_steps} steps "
            f"({meta.total_steps / meta.steps_per_epoch:g} epoch(s) of {meta.steps_per_epoch}); allowed: a fork point "
            "before its end"
        )
    if meta.fork is not None and step < meta.fork.step:
        raise UsageError(
            f"{flag} {value}: parent {parent.path.name} is itself forked at step {meta.fork.step} and holds no "
            f"state before it; allowed: a fork point at or after step {meta.fork.step}"
        )


def _record_seed(run: Run, seed: int | None) -> None:
    """Keep the `--seed` a run was made with in its meta.json (key "seed"), when its seeds are that seed's."""
    if seed is None or run.config.seeds != SeedConfig.from_seed(seed):
        return
    if run.meta.seed != seed:
        run.update_meta(seed=seed)


def cmd_fork(args: argparse.Namespace) -> dict[str, Any]:
    flags = args.seed is not None or any(v is not None for k, v in vars(args).items() if k.startswith("cfg_"))
    store = RunStore(args.runs_dir)
    if args.parent in PRESETS:
        preset = get_preset(args.parent)
        config = config_from_args(preset.config, args)
        config.validate()
        parent: Any = config.normalised()
        preset_name: str | None = preset.name
        epochs = None if config.train.steps is not None else config.train.epochs
        fork_step = None
    else:
        if flags:
            raise UsageError(
                f"config flags apply only when PARENT is a training preset; {args.parent!r} is not one "
                f"(a stored run's config is fixed; presets: {', '.join(PRESETS)})"
            )
        try:
            parent = store.get(args.parent)
        except RunNotFound as exc:
            raise RunNotFound(f"{exc}; nor is {args.parent!r} a training preset ({', '.join(PRESETS)})") from None
        preset_name = None
        meta = parent.meta
        spe = meta.steps_per_epoch
        epochs = (
            parent.config.train.epochs
            if parent.config.train.steps is None
            else (meta.total_steps // spe if meta.total_steps is not None and spe else None)
        )
        fork_step = None if meta.fork is None or not spe else math.ceil(meta.fork.step / spe)
    late = [e for e in args.at if epochs is not None and e >= epochs]
    if late:
        raise UsageError(
            f"--at {','.join(map(str, args.at))}: the parent trains {epochs} epoch(s); allowed: epochs in [0, {epochs})"
        )
    early = [e for e in args.at if fork_step is not None and e < fork_step]
    if early:
        raise UsageError(
            f"--at {','.join(map(str, args.at))}: the parent is itself a fork child from epoch {fork_step} on; "
            f"allowed: epochs in [{fork_step}, {epochs})"
        )
    options = dataclasses.replace(
        _options(args, preset=preset_name, eval_every=args.eval_every), checkpoints=CheckpointSchedule()
    )
    children = fork(
        parent,
        args.at,
        args.children,
        options,
        vary_augment=args.vary_augment,
        child_checkpoints=args.checkpoints,
    )
    first = next(iter(children.values()))[0]
    parent_run = first.parent  # children are stored beside their parent
    assert parent_run is not None
    _record_seed(parent_run, args.seed)
    _say(args, f"parent: {parent_run.path}")
    out: dict[str, Any] = {
        "parent": {
            "run": parent_run.path.name,
            "path": str(parent_run.path),
            "hash": parent_run.hash,
            "final_metrics": parent_run.meta.final_metrics or {},
        },
        "forks": {},
    }
    for epoch, runs in children.items():
        _say(args, f"fork at epoch {epoch} (step {runs[0].meta.fork.step if runs[0].meta.fork else None}):")
        rows = []
        for i, run in enumerate(runs):
            final = run.meta.final_metrics or {}
            _say(args, f"  child {i}: {run.path.name}  " + "  ".join(f"{k} {v:.4f}" for k, v in final.items()))
            seeds = run.config.seeds
            rows.append(
                {
                    "child": i,
                    "run": run.path.name,
                    "path": str(run.path),
                    "hash": run.hash,
                    "seed_data": seeds.seed_data,
                    "seed_augment": seeds.seed_augment,
                    "final_metrics": final,
                }
            )
        out["forks"][str(epoch)] = rows
    return out


# ------------------------------------------------------------------------------------- runs

#: Config fields shown in their own column of `lmclab runs` (not among the differing fields).
_FIXED_FIELDS = ("data.dataset", "model.model")
_seed_table: dict[SeedConfig, int] = {}


def _seed_of(run: Run, seeds: SeedConfig) -> int | None:
    """The `--seed` a run was made with: recorded in meta.json, or recognised (seeds 0…999 are)."""
    recorded = run.meta.seed
    if isinstance(recorded, int):
        return recorded
    if not _seed_table:
        _seed_table.update({SeedConfig.from_seed(s): s for s in range(1000)})
    return _seed_table.get(seeds)


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return ",".join(map(_cell, value)) or "()"
    return str(value)


def _column(key: str) -> str:
    """A config field's column: its flag without dashes (`lr`, `train-per-class`, `hidden`)."""
    section, name = key.split(".", 1)
    return ("fork-" if section == "fork" else "") + name.replace("_", "-")


def cmd_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    store = RunStore(args.runs_dir)
    scan = store.scan()
    rows: list[dict[str, Any]] = []
    for run in scan.healthy:
        config = run.config
        flat = {k: v for k, v in _flat(config.to_dict()).items() if not k.startswith(("seeds.", "fork."))}
        seed = _seed_of(run, config.seeds)
        rows.append({**run.summary(), "seed": seed, "config": flat})
    keys = sorted({k for r in rows for k in r["config"]})
    differ = [
        k
        for k in keys
        if k not in _FIXED_FIELDS and len({json.dumps(r["config"].get(k), default=str) for r in rows}) > 1
    ]
    for r in rows:
        r["differs"] = {k: r["config"].get(k) for k in differ}
    damaged = [r.summary() for r in scan.damaged]
    if not args.json:
        _print_runs(store, rows, differ, damaged)
    return rows + damaged


def _print_runs(store: RunStore, rows: list[dict[str, Any]], differ: list[str], damaged: list[dict[str, Any]]) -> None:
    if not rows and not damaged:
        print(f"no runs in {store.root.resolve()}")
    if rows:
        header = ["run", "status", "preset", "model", "dataset", "seed", "epochs done"] + [_column(k) for k in differ]
        header += ["test acc", "test loss", ""]
        table = [header]
        for r in rows:
            f = r["final"] or {}
            config = r["config"]
            total = config.get("train.epochs") if config.get("train.steps") is None else f"{config['train.steps']} st"
            seed = r["seed"] if r["seed"] is not None else "/".join(_short(s) for s in r["seeds"])
            note = ""
            if r.get("fork"):
                note = f"fork of {r['fork']['parent']} at epoch {r['fork']['epoch']:g} (step {r['fork']['step']})"
            table.append(
                [
                    r["run"],
                    r["status"] or "?",
                    r["preset"] or "-",
                    r["model"],
                    r["dataset"],
                    _cell(seed),
                    f"{r['epochs_done']}/{total}",
                    *(_cell(config.get(k)) for k in differ),
                    _cell(f.get("test_accuracy")),
                    _cell(f.get("test_loss")),
                    note,
                ]
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        fixed_same = all(len({r["config"].get(k) for r in rows}) == 1 for k in _FIXED_FIELDS)
        if len(rows) > 1 and not differ and fixed_same:
            print("(the listed runs differ only in their seeds)")
        if any(r["status"] == "unevaluated" for r in rows):
            print(
                "(unevaluated: trained to the end, stopped during the final evaluation; commands use its final "
                "state, and its train command again only evaluates it)"
            )
    for r in damaged:
        print(f"{r['run']}  damaged: {r.get('damage')}")


def _short(seed: int) -> str:
    return str(seed) if seed < 10**6 else f"{str(seed)[:4]}…"


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    run = RunStore(args.runs_dir).get(args.run)
    if args.step is not None and args.step not in run.checkpoint_steps():
        raise UsageError(
            f"--step {args.step}: run {run.path.name} kept no checkpoint there; allowed: a kept step, "
            f"{', '.join(map(str, run.checkpoint_steps())) or 'none (the run has no checkpoints)'}"
        )
    device = resolve_device(args.device)
    model = load_run_model(run, args.step, device)
    result: dict[str, Any] = {
        "run": run.path.name,
        "step": args.step if args.step is not None else run.meta.total_steps,
    }
    splits = SPLITS if args.split == "both" else (args.split,)
    for split in tqdm(splits, desc="evaluating", unit="split", disable=not _progress(args), leave=False):
        data = load_run_split(  # the run's own task (all classes unless it was trained on some)
            run, split, data_dir=args.data_dir, device=device, download=not args.offline, progress=_progress(args)
        )
        metrics = evaluate(model, data)
        trained_on = run.meta.data_info
        recorded = None if trained_on is None or not trained_on.splits else trained_on.splits[split]["fingerprint"]
        result[split] = {
            **metrics,
            "split": split,
            "examples": len(data),
            "dataset": run.config.data.dataset,
            "fingerprint": data.info.fingerprint,
            "same_as_trained": None if recorded is None else recorded == data.info.fingerprint,
        }
        _say(
            args,
            f"{run.path.name} step {result['step']}, {split} split of {run.config.data.dataset} "
            f"({len(data)} examples): loss {metrics['loss']:.4f}  accuracy {metrics['accuracy']:.4f}"
            + ("" if result[split]["same_as_trained"] is not False else "  (not the data the run recorded)"),
        )
    return result


def cmd_align(args: argparse.Namespace) -> dict[str, Any]:
    store = RunStore(args.runs_dir)
    started = time.time_ns()
    alignment = align_runs(
        store.get(args.run_a),
        store.get(args.run_b),
        method=args.method,
        seed=args.seed,
        store=store,
        data_dir=args.data_dir,
        device=args.device,
        activation_examples=args.examples,
        ste_epochs=args.ste_epochs,
        progress=_progress(args),
        allow_different_data=args.allow_different_data,
    )
    info, path = alignment.info, alignment.path
    if not info["data"]["same"]:
        _say(args, f"note: {info['data']['note']}")
    assert path is not None, "align_runs stores every alignment in a directory"
    reused = (path / "alignment.json").stat().st_mtime_ns < started  # stored by an earlier command
    _say(args, _alignment_report(args.method, info, path / "perm.safetensors", reused=reused))
    return {"path": str(path), "perm": str(path / "perm.safetensors"), "reused": reused, **info}


def _alignment_report(method: str, info: Mapping[str, Any], perm_file: Path, *, reused: bool = False) -> str:
    """What `lmclab align` found and how it was verified, in words (`reused`: a stored alignment, verified
    when it was computed; its files' checksums were verified on reading)."""
    lines = [f"{method} matching of {info.get('b')} onto {info.get('a')}"]
    parts = []
    details = info.get("info")
    if isinstance(details, Mapping) and details.get("start") in ("anchored", "identity"):
        parts.append(f"from the {details['start']} start")  # weight matching's (lmclab.align.weight_matching)
    if info.get("sweeps") is not None:
        parts.append(f"{info['sweeps']} sweep(s)" + ("" if info.get("converged", True) else " (not converged)"))
    before, after = info.get("distance_before"), info.get("distance_after")
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        parts.append(f"weight distance ‖θ_A − θ_B‖ {before:.4g} → ‖θ_A − π(θ_B)‖ {after:.4g}")
    moved = info.get("units_moved")
    if isinstance(moved, Mapping) and moved:
        parts.append(f"{sum(moved.values())} units moved in {len(moved)} permutation group(s)")
    if parts:
        lines[0] += ": " + "; ".join(parts)
    signature = inspect.signature(verify_permutation).parameters
    atol, rtol = signature["atol"].default, signature["rtol"].default
    diffs = info.get("invariance_max_abs_diff")
    if isinstance(diffs, Mapping) and diffs:
        measured = ", ".join(f"{float(v):.2g} in {mode} mode" for mode, v in diffs.items())
        worst = max(float(v) for v in diffs.values())
    elif isinstance(diffs, (int, float)):
        measured, worst = f"{float(diffs):.2g}", float(diffs)
    else:
        measured, worst = "not recorded", None
    verdict = "pass" if worst is not None else "passed when stored"
    when = " when it was computed" if reused else ""
    lines.append(
        f"verified f(π(θ_B)) = f(θ_B) on random inputs{when}: max |Δlogit| {measured} "
        f"(tolerance |Δ| <= {atol:g} + {rtol:g}·|logit|): {verdict}"
    )
    cov = info.get("coverage")
    lines.append(
        f"coverage: {float(cov):.2%} of the parameters lie in permuted groups"
        if isinstance(cov, (int, float))
        else "coverage: not recorded"
    )
    lines.append(
        f"permutation: {perm_file}"
        + (" (stored earlier and reused; its checksums verified on reading)" if reused else "")
    )
    return "\n".join(lines)


def _address(text: str) -> str:
    """`--address`: auto or HOST:PORT."""
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _executor_flags(p: argparse.ArgumentParser) -> None:
    """`--executor local|ray` and `--address` of a command that runs a step graph."""
    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="who runs the step graph; allowed: local (this process, the default) or ray (Ray tasks on this "
        "machine's CPUs and GPUs, or on the cluster at --address; needs pip install 'lmclab[ray]')",
    )
    p.add_argument(
        "--address",
        type=_address,
        default=None,
        metavar="ADDR",
        help="the Ray cluster for --executor ray; allowed: auto or HOST:PORT (default: start Ray on this machine)",
    )


def _graph_run(args: argparse.Namespace, execution: Execution, run: Callable[[], dict[str, Any]], out: str) -> Any:
    """`run()` under `execution`; its summary with the counts computed / reused / failed / skipped. Failed
    steps: each named with its error on stderr and the summary printed (JSON with --json); then, if every
    failure is a user error, exit status 2, else the first internal error's traceback (exit status 1)."""
    if args.address is not None and args.executor != "ray":
        raise UsageError(f"--address {args.address}: allowed only with --executor ray")
    with using_execution(execution):
        try:
            result = run()
        except StepsFailed as exc:
            failed = True
            internal = [e for e in exc.errors.values() if not isinstance(e, USER_ERRORS)]
        else:
            failed = False
    reports = [r.to_json() for r in execution.reports]
    counts = {key: sum(r[key] for r in reports) for key in ("computed", "reused", "failed", "skipped")}
    summary = {
        "executor": args.executor,
        **counts,
        "failed_steps": [f for r in reports for f in r["failed_steps"]],
        "skipped_steps": [s for r in reports for s in r["skipped_steps"]],
    }
    _say(
        args,
        f"steps: {counts['computed']} computed, {counts['reused']} reused, {counts['failed']} failed, "
        f"{counts['skipped']} skipped ({args.executor} executor)",
    )
    if not failed:
        return {**result, **summary}
    for f in summary["failed_steps"]:
        print(f"lmclab {args.command}: step {f['step']} failed: {f['error']}", file=sys.stderr)
    print(
        f"lmclab {args.command}: {counts['failed']} step(s) failed, {counts['skipped']} skipped because they need "
        "them; every other step finished and is stored (rerun to retry the failed ones)",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps({"out": out, "files": {}, **summary}, indent=2, default=str))
    if internal:  # a bug inside a step: its traceback, after the summary of what did finish
        raise internal[0]
    raise SystemExit(2)  # every failure is a user error (a missing dataset, a diverged run, …): fixable


def cmd_merge(args: argparse.Namespace) -> dict[str, Any]:
    return _graph_run(args, Execution(args.executor, args.address), lambda: _merge(args), str(args.out))


def _merge(args: argparse.Namespace) -> dict[str, Any]:
    if len(args.runs) < 2:
        raise UsageError(f"RUN: {len(args.runs)} run given; allowed: at least 2 runs (the first is the reference)")
    store = RunStore(args.runs_dir)
    runs = [store.get(r) for r in args.runs]
    options: dict[str, dict[str, Any]] = {}  # --ste-*: methods that need training data
    for method in args.method:
        entry = POPULATION_METHODS[method]
        if "data" in entry.needs:
            options[method] = {
                **entry.settings(epochs=args.ste_epochs),
                **({"train_examples": args.ste_examples} if args.ste_examples else {}),
            }
    return merge_runs(
        runs,
        args.method,
        out=args.out,
        options=options,
        points=args.points,
        examples=args.subset,
        trace={} if args.trace else None,
        runs_dir=args.runs_dir,
        data_dir=args.data_dir,
        device=args.device,
        progress=_progress(args),
        say=lambda t: _say(args, t),
        allow_different_data=args.allow_different_data,
    )


def _check_layers(run: Run, layers: Sequence[str] | None) -> None:
    """UsageError unless `--layers` names layer groups of the run's model, or is one cumulative:ORDER."""
    if not layers:
        return
    cumulative = [name for name in layers if name.startswith("cumulative:")]
    if cumulative:
        order = cumulative[0].split(":", 1)[1]
        if len(layers) != 1 or order not in LAYER_ORDERS:
            raise UsageError(
                f"--layers {' '.join(layers)}: allowed: layer group names, or one of "
                + ", ".join(f"cumulative:{o}" for o in LAYER_ORDERS)
            )
        return
    info = run.data_info
    model = build_model(
        run.config.model.model,
        input_shape=tuple(info.input_shape),  # type: ignore[arg-type]
        num_classes=info.num_classes,
        **run.config.model_options(),
    )
    groups = layer_groups(model)
    unknown = [name for name in layers if name not in groups]
    if unknown:
        raise UsageError(
            f"--layers {' '.join(unknown)}: unknown layer group(s) of {run.config.model.model}; allowed: its layer "
            f"groups {', '.join(groups)}, or cumulative:{'|'.join(LAYER_ORDERS)}"
        )


def cmd_interpolate(args: argparse.Namespace) -> dict[str, Any]:
    if len(args.runs) % 2:
        raise UsageError(f"RUN_A RUN_B: {len(args.runs)} runs given; runs come in pairs (A B [A B …])")
    n_pairs = len(args.runs) // 2
    if args.perm is not None and len(args.perm) != n_pairs:
        raise UsageError(
            f"--perm: {len(args.perm)} permutation file(s) for {n_pairs} pair(s); allowed: one file per pair"
        )
    store = RunStore(args.runs_dir)
    runs = [store.get(r) for r in args.runs]
    _check_layers(runs[0], args.layers)
    splits = SPLITS if args.split == "both" else (args.split,)
    return lmc_pairs(
        list(zip(runs[::2], runs[1::2])),
        method=args.align,
        perm_files=args.perm,
        out=args.out,
        say=lambda t: _say(args, t),
        points=args.points,
        splits=splits,
        subset=args.subset,
        bn=args.bn,
        layers=args.layers,
        base=args.base,
        data_dir=args.data_dir,
        device=args.device,
        progress=_progress(args),
        allow_different_data=args.allow_different_data,
    )


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    store = RunStore(args.runs_dir)
    run_a, run_b = store.get(args.run_a), store.get(args.run_b)
    alignment = (
        load_alignment(args.perm)
        if args.perm
        else _align_as_flagged(args, store, run_a, run_b, args.align)
        if args.align
        else None
    )
    return predict_vs_measure(
        run_a,
        run_b,
        alignment=alignment,
        split=args.split,
        examples=args.subset or None,
        points=args.points,
        orders=args.orders,
        out=args.out,
        data_dir=args.data_dir,
        device=args.device,
        say=lambda t: _say(args, t),
        allow_different_data=args.allow_different_data,
        progress=_progress(args),
    )


def cmd_sharpness(args: argparse.Namespace) -> dict[str, Any]:
    if args.method == "hutchpp" and args.probes < 4:
        raise UsageError(f"--probes {args.probes}: Hutch++ needs a sketch and a remainder; allowed: an integer >= 4")
    result = sharpness(
        RunStore(args.runs_dir).get(args.run),
        split=args.split,
        examples=args.subset or None,
        probes=args.probes,
        method=args.method,
        eigenvalue=not args.no_eigenvalue,
        data_dir=args.data_dir,
        device=args.device,
        seed=args.seed,
        progress=_progress(args),
    )
    for key in ("trace", "scale_aware_trace"):
        t = result[key]
        _say(
            args,
            f"{key.replace('_', ' ')}: {t['estimate']:.6g}  ({t['confidence']:.0%} CI {t['ci_low']:.6g} … "
            f"{t['ci_high']:.6g}, {t['probes']} probes, {t['method']})",
        )
    if "top_eigenvalue" in result:
        _say(args, f"top eigenvalue: {result['top_eigenvalue']:.6g}")
    return result


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    """`lmclab run EXPERIMENT --preset P` (the registry's experiments); without EXPERIMENT, the list of
    experiments and their presets."""
    if args.experiment is None:
        listing = catalogue()
        if not args.json:
            for name, entry in listing.items():
                print(f"{name}: {entry['description']}")
                width = max(map(len, entry["presets"]), default=0)
                for preset, text in entry["presets"].items():
                    print(f"  --preset {preset:<{width}}  {text}")
            print(
                "run one: lmclab run EXPERIMENT --preset PRESET (default preset: smoke; figures and tables in "
                "out/EXPERIMENT-PRESET)"
            )
        return listing
    experiment = get_experiment(args.experiment)
    presets = experiment.presets()
    if args.preset not in presets:
        raise UsageError(
            f"--preset {args.preset}: not a preset of {args.experiment}; allowed: one of its presets: "
            f"{', '.join(presets)} (`lmclab run` lists them)"
        )
    if args.on is not None and not args.plan:
        raise UsageError(f"--on {args.on}: allowed only with --plan (it estimates, it runs nothing)")
    if args.plan:
        with using_execution(Execution(args.executor, args.address, plan=True)):
            try:
                experiment(
                    args.preset,
                    out=args.out,
                    runs_dir=args.runs_dir,
                    data_dir=args.data_dir,
                    progress=False,
                    say=lambda t: None,
                )
            except PlanReady as ready:
                plans = ready.plans
            else:
                raise UsageError(f"{args.experiment} ran no step graph: nothing to plan")
        device = None if args.on is None else profile(args.on, Store(args.runs_dir))
        if not args.json:
            print(f"{args.experiment} --preset {args.preset}: the step graph (nothing is run)")
            print(describe_plan(plans, device, pack=args.pack))
        summary = {"experiment": args.experiment, "preset": args.preset, "plan": [p.to_json(device) for p in plans]}
        if device is not None:
            summary["on"] = plan_total(plans, device)
        return summary
    out = str(args.out or default_out(args.experiment, args.preset))
    return _graph_run(
        args,
        Execution(args.executor, args.address, pack=args.pack),
        lambda: experiment(
            args.preset,
            out=args.out,
            runs_dir=args.runs_dir,
            data_dir=args.data_dir,
            device=args.device,
            progress=_progress(args),
            say=lambda t: _say(args, t),
        ),
        out,
    )


def cmd_presets(args: argparse.Namespace) -> dict[str, Any]:
    out = {name: {"source": p.source, "config": p.config.normalised().to_dict()} for name, p in PRESETS.items()}
    if not args.json:
        for name, p in PRESETS.items():
            print(f"{name:<24} {p.source}")
    return out


def cmd_models(args: argparse.Namespace) -> dict[str, Any]:
    out = {name: model_defaults(name) for name in MODEL_NAMES}
    if not args.json:
        pad = max(map(len, out), default=0)
        for name, opts in out.items():
            print(f"{name:<{pad}}  " + ", ".join(f"{k}={v}" for k, v in opts.items()))
    return out


def cmd_datasets(args: argparse.Namespace) -> list[str]:
    names = [*DATASET_NAMES, "imagefolder:<dir or zip with train/<class>/* and test/<class>/*>"]
    if not args.json:
        print("\n".join(names))
    return names


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    if len(set(args.seeds)) < len(args.seeds):
        seeds = ",".join(map(str, args.seeds))
        raise UsageError(f"--seeds {seeds}: a seed given twice names one run twice; allowed: distinct seeds")
    summary = run_pair_demo(
        args.preset,
        seeds=list(args.seeds),
        epochs=args.epochs,
        out=args.out,
        options=_options(args, preset=args.preset),
        say=lambda t: _say(args, t),
        align=None if args.align == "none" else args.align,
        points=args.points,
    )
    store = RunStore(args.runs_dir)
    for row in summary.get("runs", []):
        _record_seed(store.get(row["run"]), row["seed"])
    return summary


COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "train": cmd_train,
    "fork": cmd_fork,
    "runs": cmd_runs,
    "eval": cmd_eval,
    "align": cmd_align,
    "interpolate": cmd_interpolate,
    "merge": cmd_merge,
    "predict": cmd_predict,
    "sharpness": cmd_sharpness,
    "run": cmd_run,
    "presets": cmd_presets,
    "models": cmd_models,
    "datasets": cmd_datasets,
    "demo": cmd_demo,
}
PLUGIN_COMMANDS = plugin_commands()
COMMANDS.update({command.name: command.run for command in PLUGIN_COMMANDS})

if __name__ == "__main__":
    raise SystemExit(main())
