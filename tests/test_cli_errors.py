"""User errors on the command line: exit status 2, one line naming the flag, no traceback, and a run store
left byte for byte as it was. Help of the program and of every command. Internal errors keep their traceback.

Every bad invocation runs in-process against a store holding one small trained run (MLP on 10 MNIST
examples per class, 1 epoch), whose snapshot (every path, its mode, size, mtime and content hash) must not
change. The table covers every command and every flag that takes a value (a test checks that it does).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from invoke import invoke
from lmclab import cli
from lmclab.cli import build_parser, main
from lmclab.cli.commands import curve, plane, spectrum
from lmclab.config import ALLOWED, SECTIONS, DataConfig, ModelConfig, RunConfig, SeedConfig, TrainConfig, UsageError
from lmclab.experiments.registry import EXPERIMENTS
from lmclab.store import Run
from lmclab.training import PRESETS, RunOptions, train

PARENT = RunConfig(
    DataConfig("mnist", train_per_class=10),
    ModelConfig("mlp", hidden=(16,)),
    TrainConfig(optimizer="adam", lr=1e-3, batch_size=50, epochs=1),
    SeedConfig.from_seed(3),
)
#: flags of PARENT, so that `train … --fork-parent` names a child that could continue it
PARENT_FLAGS = ["--train-per-class", "10", "--hidden", "16", "--batch-size", "50", "--epochs", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Iterator[tuple[Path, Run]]:
    runs = tmp_path_factory.mktemp("cli_errors") / "runs"
    run = train(PARENT, RunOptions(runs_dir=str(runs), data_dir=str(shared_data), device="cpu", progress=False))
    yield runs, run


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path under `root` with its mode, size, mtime (ns) and content hash: equal snapshots = a store left
    byte for byte as it was."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


NO_CUDA = not torch.cuda.is_available()

#: (argv with R = the stored run, the flag or argument the one-line message must name)
BAD: list[tuple[str, str]] = [
    # train: every config value (issue 11's list first)
    ("train mlp_mnist --width 0", "--width"),
    ("train mlp_mnist --width -2", "--width"),
    ("train mlp_mnist --lr -0.1", "--lr"),
    ("train mlp_mnist --lr nan", "--lr"),
    ("train mlp_mnist --lr inf", "--lr"),
    ("train mlp_mnist --schedule cosin", "--schedule"),
    ("train mlp_mnist --epochs -1", "--epochs"),
    ("train mlp_mnist --train-subset 0", "--train-subset"),
    ("train mlp_mnist --train-per-class 0", "--train-per-class"),
    ("train mlp_mnist --train-subset 50 --train-per-class 3", "--train-per-class"),
    ("train mlp_mnist --device cuda:99", "--device"),
    *([("train mlp_mnist --device cuda", "--device")] if NO_CUDA else []),
    ("train mlp_mnist --device tpu", "--device"),
    ("train mlp_mnist --batch-size 0", "--batch-size"),
    ("train mlp_mnist --steps 0", "--steps"),
    ("train mlp_mnist --hidden 0", "--hidden"),
    ("train mlp_mnist --hidden ,", "--hidden"),
    ("train mlp_mnist --hidden 16,x", "--hidden"),
    ("train mlp_mnist --norm batchnorm", "--norm"),
    ("train resnet20_cifar10 --norm groupnorm", "--norm"),
    ("train mlp_mnist --model transformer", "--model"),
    ("train mlp_mnist --dim 32", "--dim"),
    ("train resnet20_cifar10 --heads 2", "--heads"),
    ("train vit_mnist --dim 0", "--dim"),
    ("train vit_mnist --depth 1.5", "--depth"),
    ("train vit_mnist --heads 3", "--heads"),
    ("train vit_mnist --mlp-ratio 0", "--mlp-ratio"),
    ("train vit_mnist --mlp-ratio 0.001", "--mlp-ratio"),
    ("train vit_mnist --patch -1", "--patch"),
    ("train vit_mnist --patch 5", "--patch"),
    ("train vit_mnist --model seq_transformer --patch 7", "--patch"),
    ("train mlp_mnist --dataset imagenet", "--dataset"),
    ("train mlp_mnist --dataset imagefolder:", "--dataset"),
    ("train mlp_mnist --optimizer lbfgs", "--optimizer"),
    ("train mlp_mnist --momentum 1.5", "--momentum"),
    ("train mlp_mnist --momentum -0.1", "--momentum"),
    ("train mlp_mnist --optimizer sgd --momentum 0 --nesterov true", "--nesterov"),
    ("train mlp_mnist --nesterov maybe", "--nesterov"),
    ("train mlp_mnist --augment 2", "--augment"),
    ("train mlp_mnist --weight-decay -1", "--weight-decay"),
    ("train mlp_mnist --gamma 0", "--gamma"),
    ("train mlp_mnist --warmup-epochs -1", "--warmup-epochs"),
    ("train mlp_mnist --milestones -1", "--milestones"),
    ("train mlp_mnist --seed -5", "--seed"),
    ("train mlp_mnist --seed x", "--seed"),
    ("train mlp_mnist --seed-init -1", "--seed-init"),
    ("train mlp_mnist --seed-data 1.5", "--seed-data"),
    ("train mlp_mnist --checkpoints every:0", "--checkpoints"),
    ("train mlp_mnist --checkpoints epochs:-1", "--checkpoints"),
    ("train mlp_mnist --checkpoints bogus", "--checkpoints"),
    ("train mlp_mnist --pack-seeds x", "--pack-seeds"),
    ("train mlp_mnist --pack-seeds 0,0", "--pack-seeds"),
    ("train mlp_mnist --pack-seeds 0,1 --seed 2", "--pack-seeds"),
    ("train mlp_mnist --eval-every -1", "--eval-every"),
    ("train mlp_mnist --fork-epoch -1", "--fork-epoch"),
    ("train mlp_mnist --fork-parent R --fork-epoch 1 --fork-step 1", "--fork-step"),
    ("train mlp_mnist --fork-parent R --fork-epoch 5 " + " ".join(PARENT_FLAGS), "--fork-epoch"),
    ("train mlp_mnist --fork-parent R --fork-epoch 0 --lr 0.5 " + " ".join(PARENT_FLAGS), "--fork-parent"),
    ("train mlp_mnist --runs-dir-typo x", "--runs-dir-typo"),
    ("train no_such_preset", "preset"),
    ("train mlp_mnist --classes -1", "--classes"),
    ("train mlp_mnist --classes 0,99", "--classes"),
    ("train mlp_mnist --seed-augment -1", "--seed-augment"),
    ("train mlp_mnist --patch -1", "--patch"),
    ("train mlp_mnist --dim 0", "--dim"),
    ("train mlp_mnist --depth 0", "--depth"),
    ("train mlp_mnist --heads 0", "--heads"),
    ("train mlp_mnist --mlp-ratio 0", "--mlp-ratio"),
    ("train mlp_mnist --fork-parent nope --fork-epoch 0", "nope"),
    # fork
    ("fork mlp_mnist --at -1", "--at"),
    ("fork mlp_mnist --at 0,x", "--at"),
    ("fork mlp_mnist --at 0 --children 0", "--children"),
    ("fork mlp_mnist --at 0 --lr 0", "--lr"),
    ("fork mlp_mnist --at 0 --width -1", "--width"),
    ("fork mlp_mnist --at 5 --epochs 2", "--at"),
    ("fork R --at 3", "--at"),
    ("fork R --at 0 --lr 0.1", "config flags"),
    ("fork R --at 0 --checkpoints every:-1", "--checkpoints"),
    ("fork R --at 0 --fork-parent R", "config flags"),
    ("fork mlp_mnist --at 0 --fork-step -1", "--fork-step"),
    ("fork nope --at 0", "nope"),
    # runs, eval
    ("runs --device cpu", "--device"),
    ("runs --runs-dir F", "--runs-dir"),
    ("eval R --data-dir F", "--data-dir"),
    ("eval R --step 99", "--step"),
    ("eval R --step -1", "--step"),
    ("eval R --split val", "--split"),
    ("eval R --device cuda:99", "--device"),
    ("eval nope", "nope"),
    # align
    ("align R R --examples 0", "--examples"),
    ("align R R --seed -1", "--seed"),
    ("align R R --ste-epochs 0", "--ste-epochs"),
    ("align R R --method nope", "--method"),
    ("align R", "run_b"),
    ("align nope R", "nope"),
    ("align R nope", "nope"),
    # merge
    ("merge R", "RUN"),
    ("merge R R --points 1", "--points"),
    ("merge R R --subset 0", "--subset"),
    ("merge R R --ste-examples 0", "--ste-examples"),
    ("merge R R --ste-epochs -3", "--ste-epochs"),
    ("merge R R --method nope", "--method"),
    ("merge R R --out F", "--out"),
    ("merge R nope", "nope"),
    ("merge R R --executor nope", "--executor"),
    ("merge R R --address nope", "--address"),
    ("merge R R --address 127.0.0.1:6379", "--address"),  # only with --executor ray
    # interpolate
    ("interpolate R R --subset 0", "--subset"),
    ("interpolate R R --points 1", "--points"),
    ("interpolate R R --points many", "--points"),
    ("interpolate R R R", "RUN_A RUN_B"),
    ("interpolate R R --layers nope", "--layers"),
    ("interpolate R R --layers cumulative:sideways", "--layers"),
    ("interpolate R R --perm /nonexistent/perm.safetensors", "--perm"),
    ("interpolate R R --bn maybe", "--bn"),
    ("interpolate R R --base c", "--base"),
    ("interpolate R R --out F", "--out"),
    ("interpolate R R --align nope", "--align"),
    ("interpolate R R --align weight --perm F", "--perm"),
    ("interpolate R R --split val", "--split"),
    ("interpolate R nope", "nope"),
    # predict
    ("predict R R --points 0", "--points"),
    ("predict R R --subset -1", "--subset"),
    ("predict R R --orders sideways", "--orders"),
    ("predict R R --split val", "--split"),
    ("predict R R --out F", "--out"),
    ("predict R R --align nope", "--align"),
    ("predict R R --perm /nonexistent/perm.safetensors", "--perm"),
    ("predict nope R", "nope"),
    # sharpness
    ("sharpness R --probes 0", "--probes"),
    ("sharpness R --probes 1", "--probes"),
    ("sharpness R --probes 3 --method hutchpp", "--probes"),
    ("sharpness R --subset -5", "--subset"),
    ("sharpness R --seed -1", "--seed"),
    ("sharpness R --split val", "--split"),
    ("sharpness R --method nope", "--method"),
    ("sharpness nope", "nope"),
    # run
    ("run benko --preset nope", "--preset"),
    ("run nope", "EXPERIMENT"),
    ("run benko --out F", "--out"),
    ("run benko --executor nope", "--executor"),
    ("run benko --address nope", "--address"),
    ("run benko --address 127.0.0.1:6379", "--address"),  # only with --executor ray
    ("run benko --plan --on nope", "--on"),
    ("run benko --on h100", "--on"),  # only with --plan
    *((f"run {name} --preset nope", "--preset") for name in EXPERIMENTS),
    # listings
    ("presets --width 3", "--width"),
    ("models --json --points 3", "--points"),
    ("datasets extra", "extra"),
    # demo
    ("demo --seeds a,b", "--seeds"),
    ("demo --seeds -1", "--seeds"),
    ("demo --seeds 0,1,0", "--seeds"),
    ("demo --epochs -1", "--epochs"),
    ("demo --points 1", "--points"),
    ("demo --preset nope", "--preset"),
    ("demo --align nope", "--align"),
    ("demo --out F", "--out"),
    # curve
    ("curve R", "run_b"),
    ("curve R nope", "nope"),
    ("curve R R --align nope", "--align"),
    ("curve R R --compare nope", "--compare"),
    ("curve R R --kind zigzag", "--kind"),
    ("curve R R --bends 0", "--bends"),
    ("curve R R --bends 99", "--bends"),
    ("curve R R --epochs 0", "--epochs"),
    ("curve R R --lr 0", "--lr"),
    ("curve R R --lr nan", "--lr"),
    ("curve R R --optimizer lbfgs", "--optimizer"),
    ("curve R R --batch-size 0", "--batch-size"),
    ("curve R R --train-subset 0", "--train-subset"),
    ("curve R R --seed -1", "--seed"),
    ("curve R R --points 1", "--points"),
    ("curve R R --split val", "--split"),
    ("curve R R --subset 0", "--subset"),
    ("curve R R --bn maybe", "--bn"),
    # plane
    ("plane R", "RUN"),
    ("plane R R R R", "RUN"),
    ("plane R R --align none", "--align"),
    ("plane R R --random-directions", "--random-directions"),
    ("plane R nope", "nope"),
    ("plane R R --align nope", "--align"),
    ("plane R R --seed -1", "--seed"),
    ("plane R R --grid 1", "--grid"),
    ("plane R R --margin -1", "--margin"),
    ("plane R R --margin inf", "--margin"),
    ("plane R R --radius 0", "--radius"),
    ("plane R R --split val", "--split"),
    ("plane R R --subset 0", "--subset"),
    ("plane R R --bn repair", "--bn"),
    ("plane R R --chunk 0", "--chunk"),
    # spectrum
    ("spectrum nope", "nope"),
    ("spectrum R --top -1", "--top"),
    ("spectrum R --top 100000000", "--top"),
    ("spectrum R --split val", "--split"),
    ("spectrum R --subset -1", "--subset"),
    ("spectrum R --probes 1", "--probes"),
    ("spectrum R --block-probes 1", "--block-probes"),
    ("spectrum R --starts 0", "--starts"),
    ("spectrum R --steps 0", "--steps"),
    ("spectrum R --sigma 0", "--sigma"),
    ("spectrum R --sigma nan", "--sigma"),
    ("spectrum R --path-to nope", "nope"),
    ("spectrum R --path-to R --align nope", "--align"),
    ("spectrum R --curve nope", "--curve"),
    ("spectrum R --points 1", "--points"),
    ("spectrum R --seed -1", "--seed"),
    # the program itself
    ("nope", "COMMAND"),
]
#: each command up to its flags (R: the stored run), for the rows every command gets
LEADS = {
    "train": "train mlp_mnist",
    "fork": "fork mlp_mnist --at 0",
    "eval": "eval R",
    "align": "align R R",
    "merge": "merge R R",
    "interpolate": "interpolate R R",
    "predict": "predict R R",
    "sharpness": "sharpness R",
    "run": "run benko",
    "demo": "demo",
    "curve": "curve R R",
    "plane": "plane R R",
    "spectrum": "spectrum R",
}


def _every_command_rows() -> list[tuple[str, str]]:
    """A file given as a directory, and a device this machine lacks, for every command that takes them; fork
    gets train's single-flag config rows (the same flags)."""
    commands = {name: p for name, p in _subparsers(build_parser()).items() if name in LEADS}
    rows: list[tuple[str, str]] = []
    for name, p in commands.items():
        flags = p._option_string_actions
        rows += [(f"{LEADS[name]} {flag} F", flag) for flag in ("--runs-dir", "--data-dir", "--out") if flag in flags]
        if "--device" in flags:
            rows += [(f"{LEADS[name]} --device tpu", "--device"), (f"{LEADS[name]} --device cuda:99", "--device")]
            rows += [(f"{LEADS[name]} --device cuda", "--device")] if NO_CUDA else []
    for text, flag in list(BAD):
        words = text.split()
        if (
            words[:2] == ["train", "mlp_mnist"]
            and len(words) == 4
            and words[2] in commands["fork"]._option_string_actions
        ):
            rows.append((f"{LEADS['fork']} {' '.join(words[2:])}", flag))
    return [row for row in rows if row not in BAD]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


BAD += _every_command_rows()
#: what every command with a store gets (listings take none of these)
IO = ("--offline", "--no-progress")
LISTINGS = ("presets", "models", "datasets")


class Ran(BaseException):
    """A bad invocation got past the checks to a function that does the work (and could write)."""


#: the functions that do a command's work (of lmclab.cli, and of the command modules): a bad invocation must be
#: refused before any of them
WORK = (
    "train",
    "fork",
    "align_runs",
    "lmc_pairs",
    "merge_runs",
    "predict_vs_measure",
    "sharpness",
    "run_pair_demo",
    "load_run_model",
)


@pytest.fixture
def nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in WORK:

        def refuse(*args: object, _name: str = name, **kwargs: object) -> None:
            raise Ran(f"{_name} was called: the invocation was not refused before the work")

        monkeypatch.setattr(cli, name, refuse)
    for module, names in PLUGIN_WORK:
        for name in names:
            monkeypatch.setattr(module, name, lambda *a, _name=name, **k: _refused(_name))


#: the same for the commands in modules of their own (spectrum loads the model to check --top: reading is fine)
PLUGIN_WORK = (
    (curve, ("curve_between_runs",)),
    (plane, ("plane_runs",)),
    (spectrum, ("_compute", "_align_as_flagged", "artifact_lock", "write_sealed_json")),
)


def _refused(name: str) -> None:
    raise Ran(f"{name} was called: the invocation was not refused before the work")


def command_line(text: str, runs: Path, run: Run, data: Path) -> list[str]:
    """`text` with R = the stored run and F = a file, plus the store, data and quiet flags it lacks."""
    words = {"R": run.path.name, "F": str(run.path / "config.json")}
    argv = [words.get(word, word) for word in text.split()]
    if argv[0] in LISTINGS or argv[0] == "nope":
        return argv
    extra: list[list[str]] = [["--runs-dir", str(runs)]]
    if argv[0] != "runs":
        extra += [["--data-dir", str(data)], *([flag] for flag in IO)]
    return argv + [word for flag in extra if flag[0] not in argv for word in flag]


@pytest.mark.parametrize(("text", "flag"), BAD, ids=[t for t, _ in BAD])
def test_bad_invocation_exits_2_with_one_line_and_leaves_the_store(
    store: tuple[Path, Run],
    shared_data: Path,
    capsys: pytest.CaptureFixture[str],
    nothing_runs: None,
    text: str,
    flag: str,
) -> None:
    runs, run = store
    argv = command_line(text, runs, run, shared_data)
    before = snapshot(runs)
    code, out, err = invoke(argv, capsys)
    assert code == 2, (argv, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert flag in lines[0], lines[0]
    assert lines[0].startswith("lmclab"), lines[0]
    assert snapshot(runs) == before, f"{argv} changed the store"


#: flags that take a value but no bad one: free text checked where it is used (rows above cover those uses)
FREE = {("run", "--preset"), ("interpolate", "--layers"), ("fork", "--fork-parent"), ("fork", "--fork-epoch")}


def test_the_table_covers_every_command_and_every_flag_that_takes_a_value() -> None:
    rows: dict[str, set[str]] = {}
    for text, flag in BAD:
        rows.setdefault(text.split()[0], set()).update([*text.split(), flag])
    no_such_run = {text.split()[0] for text, flag in BAD if flag == "nope"}
    commands = _subparsers(build_parser())
    assert set(commands) <= set(rows), f"commands without a bad invocation: {set(commands) - set(rows)}"
    missing = []
    for name, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.nargs == 0 or (name, action.dest) in FREE:
                continue
            if action.option_strings:
                if not set(action.option_strings) & rows[name] and (name, action.option_strings[-1]) not in FREE:
                    missing.append(f"{name} {action.option_strings[-1]}")
            elif name in LEADS and " R" in LEADS[name] and name not in no_such_run:
                missing.append(f"{name} {action.dest} (a run that does not exist)")
    assert not missing, f"flags with no bad value in the table: {missing}"


def test_the_issue_cases_as_a_user_types_them(store: tuple[Path, Run], shared_data: Path) -> None:
    """The real entry point in a fresh process: exit status 2, one line, no traceback, store unchanged."""
    runs, _ = store
    before = snapshot(runs)
    for bad in (["--lr", "nan"], ["--width", "0"], ["--device", "cuda:99"]):
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from lmclab.cli import main; sys.exit(main(sys.argv[1:]))",
                "train",
                "mlp_mnist",
                *bad,
                "--runs-dir",
                str(runs),
                "--data-dir",
                str(shared_data),
                "--offline",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and bad[0] in proc.stderr
    assert snapshot(runs) == before


def test_python_api_validates_before_the_store_is_touched(tmp_path: Path, shared_data: Path) -> None:
    bad = [
        dataclasses.replace(PARENT, train=dataclasses.replace(PARENT.train, lr=math.nan)),
        dataclasses.replace(PARENT, train=dataclasses.replace(PARENT.train, epochs=-1)),
        dataclasses.replace(PARENT, model=ModelConfig("mlp", width=0)),
        dataclasses.replace(PARENT, data=DataConfig("mnist", train_subset=0)),
        dataclasses.replace(PARENT, train=dataclasses.replace(PARENT.train, schedule="cosin")),
        dataclasses.replace(PARENT, train=dataclasses.replace(PARENT.train, batch_size=0)),
    ]
    for config in bad:
        with pytest.raises(UsageError) as err:
            train(config, RunOptions(runs_dir=str(tmp_path / "runs"), data_dir=str(shared_data), progress=False))
        assert "\n" not in str(err.value) and "allowed" in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_every_config_field_has_a_rule_and_every_preset_passes_it() -> None:
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert (section, f.name) in ALLOWED, f"{section}.{f.name} has no rule in lmclab.config.ALLOWED"
    for preset in PRESETS.values():
        preset.config.validate()
        preset.config.normalised().validate()


# ------------------------------------------------------------------------------------------ help


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_of_the_program_and_of_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    commands = subparsers(build_parser())
    assert set(commands) == set(cli.COMMANDS)
    for argv in (["--help"], ["-h"], *([name, "--help"] for name in commands)):
        code, out, err = invoke(argv, capsys)
        assert code == 0 and "Traceback" not in err, (argv, err)
        assert out.startswith(f"usage: lmclab{'' if argv[0].startswith('-') else ' ' + argv[0]}")
        assert "options:" in out and len(out.splitlines()) >= 6, out
    code, out, _ = invoke(["--help"], capsys)
    assert all(name in out for name in commands)


def test_every_flag_has_help_with_its_allowed_values() -> None:
    root = build_parser()
    for name, parser in {"lmclab": root, **subparsers(root)}.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            what = f"lmclab {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"{what} has no help"
            if isinstance(action, argparse._SubParsersAction):
                continue
            if action.choices is not None:
                missing = [c for c in action.choices if str(c) not in action.help]
                assert not missing, f"{what}: help does not list {missing}"
            elif action.type is not None:
                assert "allowed" in action.help, f"{what}: help does not say what is allowed"


def test_long_commands_take_no_progress() -> None:
    commands = subparsers(build_parser())
    long = set(commands) - {*LISTINGS, "runs"}
    assert long >= {"train", "fork", "eval", "align", "merge", "interpolate", "predict", "sharpness", "run", "demo"}
    assert long >= {"curve", "plane", "spectrum"}
    for name in long:
        assert any("--no-progress" in a.option_strings for a in commands[name]._actions), name


# ------------------------------------------------------------------------------- internal errors


@pytest.mark.parametrize("error", [RuntimeError("a bug"), ValueError("a bug"), ZeroDivisionError("a bug")])
def test_an_internal_error_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: Exception
) -> None:
    def broken(args: argparse.Namespace) -> None:
        raise error

    monkeypatch.setitem(cli.COMMANDS, "runs", broken)
    with pytest.raises(type(error), match="a bug"):
        main(["runs", "--runs-dir", str(tmp_path)])


def test_a_user_error_of_the_library_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    def refused(args: argparse.Namespace) -> None:
        raise UsageError("--thing 3: allowed: 1 or 2")

    monkeypatch.setitem(cli.COMMANDS, "runs", refused)
    code, _, err = invoke(["runs", "--runs-dir", str(tmp_path)], capsys)
    assert code == 2 and err == "lmclab runs: error: --thing 3: allowed: 1 or 2\n"


@pytest.mark.parametrize("width", ["100000000000000000000000000", "3000000"])
def test_a_model_too_large_to_build_is_one_line_and_leaves_no_run(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str], width: str
) -> None:
    """An integer overflow in a layer's size, or a model the allocator refuses (TB of weights)."""
    runs = tmp_path / "runs"
    argv = ["train", "mlp_mnist", "--width", width, "--runs-dir", str(runs), "--data-dir", str(shared_data)]
    code, out, err = invoke([*argv, "--no-progress"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "too large to build" in err and f"width={width}" in err
    assert not [p for p in runs.iterdir() if not p.name.startswith(".")]
