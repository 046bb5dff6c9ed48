"""The `lmclab` command line. Every command that prints results accepts `--json`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from lmclab.align import PAIR_METHODS, POPULATION_METHODS, MethodEntry
from lmclab.config import add_config_flags, config_from_args
from lmclab.data import DATASET_NAMES, DataError, DeviceDataset
from lmclab.experiments.ito import merge_runs
from lmclab.experiments.lmc import align_runs, lmc_pairs, load_alignment
from lmclab.experiments.pair import run_pair_demo
from lmclab.experiments.predict import predict_vs_measure, sharpness
from lmclab.experiments.registry import EXPERIMENTS, catalogue, get_experiment
from lmclab.models import MODEL_NAMES, ModelError, model_defaults
from lmclab.permutation import SpecError
from lmclab.store import CheckpointError, RunNotFound, RunStore
from lmclab.training import (
    PRESETS,
    CheckpointSchedule,
    RunOptions,
    TrainingDiverged,
    UnknownPreset,
    evaluate,
    fork,
    get_preset,
    load_run_model,
    resolve_device,
    train,
)


def _methods_help(methods: Mapping[str, MethodEntry]) -> str:
    """The registered alignment methods, one "name (title): description" each, for ``--help``."""
    return "; ".join(e.summary() for e in methods.values()).replace("%", "%%")


def _common_io(p: argparse.ArgumentParser, data: bool = True, device: bool = True) -> None:
    p.add_argument("--runs-dir", default=None, help="run store (default: $LMCLAB_RUNS_DIR or ./runs)")
    if data:
        p.add_argument("--data-dir", default=None, help="local datasets (also searched: $LMCLAB_DATA_DIR, the cache)")
        p.add_argument("--offline", action="store_true", help="never download; fail if data is not local")
    if device:
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, … (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmclab", description=__import__("lmclab").__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a preset (reuses or resumes a stored run with the same config)")
    p.add_argument("preset", help="recipe name; `lmclab presets` lists them")
    add_config_flags(p)
    p.add_argument(
        "--checkpoints",
        default="",
        metavar="SPEC",
        help="extra kept checkpoints: epochs:0,1,2 | every:N | log:K | steps:S,T, joined by '+'",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between test evaluations (0: only at the end)")
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
        type=_epoch_list,
        metavar="E,E,…",
        help="parent epochs to fork at, e.g. 0,1,2,15 (0: the initialisation)",
    )
    p.add_argument("--children", type=int, default=2, help="children per fork epoch (default: 2)")
    p.add_argument("--vary-augment", action="store_true", help="children also get their own augmentation seed")
    p.add_argument(
        "--checkpoints",
        default="",
        metavar="SPEC",
        help="children's kept checkpoints (default: every epoch): epochs:… | every:N | log:K | steps:…",
    )
    add_config_flags(p)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between test evaluations (0: only at the end)")
    _common_io(p)

    p = sub.add_parser("runs", help="list stored runs with their key config and final metrics")
    _common_io(p, data=False, device=False)

    p = sub.add_parser("eval", help="evaluate a run's checkpoint on a split")
    p.add_argument("run", help="run directory, name, or hash prefix")
    p.add_argument("--split", choices=("train", "test", "both"), default="test")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: final)")
    _common_io(p)

    p = sub.add_parser("align", help="align run B's hidden units to run A's (verified, cached in the store)")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--method", choices=tuple(PAIR_METHODS), default="weight", help=_methods_help(PAIR_METHODS))
    p.add_argument("--ste-epochs", type=int, default=10, help="epochs of STE over the training split")
    p.add_argument("--seed", type=int, default=0, help="group order of weight matching")
    p.add_argument(
        "--examples",
        type=int,
        default=5000,
        help="training examples for activation matching (STE: for choosing the best permutation)",
    )
    p.add_argument("--no-progress", action="store_true")
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
        help="one or more: " + _methods_help(POPULATION_METHODS),
    )
    p.add_argument("--ste-epochs", type=int, default=10, help="STE-MM epochs (the paper: 10, lr 1e-3, batch 256)")
    p.add_argument("--ste-examples", type=int, default=None, help="STE-MM on a stratified training subset")
    p.add_argument("--points", type=int, default=25, help="evenly spaced λ per pair, both ends included")
    p.add_argument("--subset", type=int, default=None, help="stratified subset of each split for evaluation")
    p.add_argument("--trace", action="store_true", help="also the merged model's Hessian trace (plain, scale-aware)")
    p.add_argument("--out", default="out/merge", help="tables and heat maps")
    p.add_argument("--no-progress", action="store_true")
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
        help="align first (naive path too), by a method of `lmclab align --help`",
    )
    how.add_argument(
        "--perm", nargs="+", default=None, metavar="FILE", help="saved permutation(s) from `lmclab align`, one per pair"
    )
    p.add_argument("--points", type=int, default=25, help="evenly spaced λ, both ends included")
    p.add_argument("--split", choices=("train", "test", "both"), default="both")
    p.add_argument("--subset", type=int, default=None, help="stratified subset of each split (quick runs)")
    p.add_argument(
        "--bn",
        choices=("none", "reset", "repair"),
        default=None,
        help="normalisation statistics at each λ (default: reset for BatchNorm models, else none)",
    )
    p.add_argument(
        "--layers",
        nargs="+",
        default=None,
        help="interpolate only these layer groups (module names; others from --base), "
        "or cumulative:shallow|deep|random",
    )
    p.add_argument("--base", choices=("a", "b"), default="a", help="where non-interpolated layers come from")
    p.add_argument("--out", default=None, help="output directory (default: lmc_<hash> in the run store)")
    p.add_argument("--no-progress", action="store_true")
    _common_io(p)

    p = sub.add_parser("predict", help="Hessian-predicted vs measured barriers (Singh Prop. 1, Prop. 2, eq. 20–21)")
    p.add_argument("run_a")
    p.add_argument("run_b")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--align",
        choices=tuple(PAIR_METHODS),
        default=None,
        help="align B to A first, by a method of `lmclab align --help`",
    )
    how.add_argument("--perm", default=None, metavar="FILE", help="a saved permutation (from `lmclab align`)")
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--subset", type=int, default=1000, help="examples used (0: the whole split)")
    p.add_argument("--points", type=int, default=25)
    p.add_argument("--orders", nargs="+", default=["shallow", "deep"], choices=("shallow", "deep", "random"))
    p.add_argument("--out", default="out/predict")
    _common_io(p)

    p = sub.add_parser("sharpness", help="Hessian trace (95%% CI), scale-aware trace and top eigenvalue of a run")
    p.add_argument("run")
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--subset", type=int, default=1000, help="examples used (0: the whole split)")
    p.add_argument("--probes", type=int, default=100)
    p.add_argument("--method", choices=("hutchinson", "hutchpp"), default="hutchinson")
    p.add_argument("--no-eigenvalue", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    _common_io(p)

    p = sub.add_parser(
        "run",
        help="reproduce a paper's figures in one command ("
        + ", ".join(EXPERIMENTS)
        + "; `lmclab run` lists them and their presets)",
    )
    p.add_argument(
        "experiment",
        nargs="?",
        choices=tuple(EXPERIMENTS),
        metavar="EXPERIMENT",
        help=(
            "; ".join(f"{name}: {e.description}" for name, e in EXPERIMENTS.items())
            + " (leave out: list the experiments and their presets)"
        ).replace("%", "%%"),
    )
    p.add_argument(
        "--preset",
        default="smoke",
        help="smoke (CPU, minutes) or paper (the paper's settings, GPU); `lmclab run` lists every preset",
    )
    p.add_argument("--out", default=None, help="figures and tables (default: out/EXPERIMENT-PRESET)")
    p.add_argument("--no-progress", action="store_true")
    _common_io(p)

    for name, text in (
        ("presets", "list training presets"),
        ("models", "list models and their options"),
        ("datasets", "list dataset names"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="the README's main job: train two MLPs, align them, measure LMC")
    p.add_argument("--preset", default="mlp_mnist")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds, one model each")
    p.add_argument("--out", default="out/demo", help="where figures and tables go")
    p.add_argument("--align", choices=(*PAIR_METHODS, "none"), default="weight")
    p.add_argument("--points", type=int, default=25)
    p.add_argument("--no-progress", action="store_true")
    _common_io(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors: one clear message, no traceback
        if not isinstance(exc, _user_errors()):
            raise
        print(f"lmclab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:

    return (DataError, ModelError, CheckpointError, RunNotFound, UnknownPreset, TrainingDiverged, SpecError, ValueError)


def _say(args: argparse.Namespace, text: str) -> None:
    """Human-readable output: stdout normally, stderr when stdout carries JSON."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout)


def _options(args: argparse.Namespace, **extra: Any) -> Any:

    return RunOptions(
        runs_dir=args.runs_dir,
        data_dir=args.data_dir,
        device=args.device,
        checkpoints=CheckpointSchedule.parse(getattr(args, "checkpoints", "")),
        progress=not getattr(args, "no_progress", False),
        download=not args.offline,
        **extra,
    )


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:

    preset = get_preset(args.preset)
    config = config_from_args(preset.config, args)
    if config.fork.parent is not None:  # --fork-parent takes any run reference (name, path, hash prefix)
        parent = RunStore(args.runs_dir).get(config.fork.parent)
        config = dataclasses.replace(config, fork=dataclasses.replace(config.fork, parent=parent.hash))
    config = config.normalised()
    run = train(config, _options(args, preset=preset.name, eval_every=args.eval_every))
    final = run.meta.final_metrics or {}
    _say(args, f"run: {run.path}\n" + "  ".join(f"{k} {v:.4f}" for k, v in final.items()))
    return {"run": run.path.name, "path": str(run.path), "hash": run.hash, "final_metrics": final}


def _epoch_list(text: str) -> list[int]:
    try:
        epochs = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        epochs = []
    if not epochs or min(epochs) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs >= 0 like 0,1,2,15; got {text!r}")
    return epochs


def cmd_fork(args: argparse.Namespace) -> dict[str, Any]:

    flags = args.seed is not None or any(v is not None for k, v in vars(args).items() if k.startswith("cfg_"))
    store = RunStore(args.runs_dir)
    if args.parent in PRESETS:
        preset = get_preset(args.parent)
        parent: Any = config_from_args(preset.config, args).normalised()
        preset_name: str | None = preset.name
    else:
        if flags:
            raise ValueError(
                f"config flags apply only when PARENT is a training preset; {args.parent!r} is not one "
                "(a stored run's config is fixed)"
            )
        try:
            parent = store.get(args.parent)
        except RunNotFound as exc:
            raise RunNotFound(f"{exc}; nor is {args.parent!r} a training preset ({', '.join(PRESETS)})") from None
        preset_name = None
    options = dataclasses.replace(
        _options(args, preset=preset_name, eval_every=args.eval_every), checkpoints=CheckpointSchedule()
    )
    children = fork(
        parent,
        args.at,
        args.children,
        options,
        vary_augment=args.vary_augment,
        child_checkpoints=CheckpointSchedule.parse(args.checkpoints) if args.checkpoints else None,
    )
    first = next(iter(children.values()))[0]
    parent_run = first.parent  # children are stored beside their parent
    assert parent_run is not None
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


def cmd_runs(args: argparse.Namespace) -> list[dict[str, Any]]:

    store = RunStore(args.runs_dir)
    rows = [r.summary() for r in store.runs()]
    if not args.json:
        if not rows:
            print(f"no runs in {store.root.resolve()}")
        for r in rows:
            f = r["final"] or {}
            acc = f"test acc {f['test_accuracy']:.4f}  test loss {f['test_loss']:.4f}" if f else ""
            if r.get("fork"):
                acc += f"  fork of {r['fork']['parent']} at epoch {r['fork']['epoch']} (step {r['fork']['step']})"
            print(
                f"{r['run']}  {r['status'] or '?':<11} {r['preset'] or '-':<20} {r['model']}×{r['width']} "
                f"{r['norm'] or ''} on {r['dataset']}  seeds {r['seeds']}  epochs {r['epochs_done']}  {acc}"
            )
    return rows


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:

    run = RunStore(args.runs_dir).get(args.run)
    device = resolve_device(args.device)
    model = load_run_model(run, args.step, device)
    result: dict[str, Any] = {
        "run": run.path.name,
        "step": args.step if args.step is not None else run.meta.total_steps,
    }
    for split in ("train", "test") if args.split == "both" else (args.split,):
        data = DeviceDataset.load(
            run.config.data.dataset,
            split,
            data_dir=args.data_dir,
            device=device,
            augment=False,
            download=not args.offline,
            progress=not args.json,
        )
        metrics = evaluate(model, data)
        result[split] = metrics
        _say(
            args,
            f"{run.path.name} step {result['step']} {split}: loss {metrics['loss']:.4f}  "
            f"accuracy {metrics['accuracy']:.4f}  ({len(data)} examples)",
        )
    return result


def cmd_align(args: argparse.Namespace) -> dict[str, Any]:

    store = RunStore(args.runs_dir)
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
        progress=not args.no_progress,
    )
    info, path = alignment.info, alignment.path
    assert path is not None, "align_runs stores every alignment in a directory"
    _say(
        args,
        f"{args.method} matching: {info.get('sweeps')} sweep(s), "
        f"distance {info.get('distance_before', float('nan')):.4f}"
        f" → {info.get('distance_after', float('nan')):.4f}; verified f(π(θ)) = f(θ) "
        f"(max |Δ| {info.get('invariance_max_abs_diff')})\npermutation: {path / 'perm.safetensors'}",
    )
    return {"path": str(path), "perm": str(path / "perm.safetensors"), **info}


def cmd_merge(args: argparse.Namespace) -> dict[str, Any]:

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
        progress=not args.no_progress,
        say=lambda t: _say(args, t),
    )


def cmd_interpolate(args: argparse.Namespace) -> dict[str, Any]:

    if len(args.runs) % 2:
        raise ValueError(f"runs come in pairs (A B [A B …]); got {len(args.runs)}")
    store = RunStore(args.runs_dir)
    runs = [store.get(r) for r in args.runs]
    splits = ("train", "test") if args.split == "both" else (args.split,)
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
        progress=not args.no_progress,
    )


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:

    store = RunStore(args.runs_dir)
    run_a, run_b = store.get(args.run_a), store.get(args.run_b)
    alignment = (
        load_alignment(args.perm)
        if args.perm
        else align_runs(
            run_a, run_b, method=args.align, store=store, data_dir=args.data_dir, device=args.device, progress=False
        )
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
    )


def cmd_sharpness(args: argparse.Namespace) -> dict[str, Any]:

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
    return get_experiment(args.experiment)(
        args.preset,
        out=args.out,
        runs_dir=args.runs_dir,
        data_dir=args.data_dir,
        device=args.device,
        progress=not args.no_progress,
        say=lambda t: _say(args, t),
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
        for name, opts in out.items():
            print(f"{name:<10} " + ", ".join(f"{k}={v}" for k, v in opts.items()))
    return out


def cmd_datasets(args: argparse.Namespace) -> list[str]:

    names = [*DATASET_NAMES, "imagefolder:<dir or zip with train/<class>/* and test/<class>/*>"]
    if not args.json:
        print("\n".join(names))
    return names


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    return run_pair_demo(
        args.preset,
        seeds=seeds,
        epochs=args.epochs,
        out=args.out,
        options=_options(args, preset=args.preset),
        say=lambda t: _say(args, t),
        align=None if args.align == "none" else args.align,
        points=args.points,
    )


COMMANDS = {
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

if __name__ == "__main__":
    raise SystemExit(main())
