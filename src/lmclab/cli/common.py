"""Argument types and flag helpers shared by every `lmclab` command (one home for how a flag is checked).

A command module (the commands in `lmclab.cli`, or a plug-in in `lmclab.cli.commands`) builds its flags
from these, so every flag reports a bad value the same way: exit status 2, one line naming the flag,
the value and what is allowed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from lmclab.align import PAIR_METHODS, MethodEntry
from lmclab.config import Allowed, argument_type, integer, integers
from lmclab.experiments.lmc import Alignment, align_runs
from lmclab.store import Run, RunStore
from lmclab.store.data_identity import ALLOW_FLAG
from lmclab.training import CheckpointSchedule, RunOptions


class Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported in one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------ argument types

POSITIVE = integer(1)
NON_NEGATIVE = integer(0)
POINTS = integer(2)  # evenly spaced λ, both ends included
SPLITS = ("train", "test")
LAYER_ORDERS = ("shallow", "deep", "random")


def _int_list(text: str) -> tuple[int, ...]:
    """`0,1,2`: comma-separated integers; ValueError for an empty or non-integer item."""
    return tuple(int(t) for t in text.split(","))


def _epochs_type() -> Callable[[str], Any]:
    allowed = integers(0, nonempty=True, example="0,1,2,15")
    convert = argument_type(allowed, _int_list)
    return lambda text: sorted(set(convert(text)))


def _checkpoint_schedule(text: str) -> CheckpointSchedule:
    """`--checkpoints`: epochs:0,1,2 | every:N | log:K | steps:S,T joined by '+', every number checked."""
    words = "epochs:E,E,… | every:N | log:K | steps:S,S,… joined by '+' (E, S >= 0; N, K >= 1)"
    try:
        schedule = CheckpointSchedule.parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: {words}") from None
    if (
        any(v < 0 for v in (*schedule.epochs, *schedule.steps))
        or (schedule.every < 1 and "every:" in text)
        or (schedule.log_steps < 1 and "log:" in text)
    ):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: {words}")
    return schedule


DEVICES = "auto, cpu, cuda, cuda:N, mps"


def _device(text: str) -> str:
    """`--device`: auto, or a device this machine has (CUDA only with a CUDA build and a card)."""
    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: {DEVICES}") from None
    if dev.type == "cpu":
        return text
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise argparse.ArgumentTypeError(f"{text!r} is not available ({why}); allowed here: auto, cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not available ({count} CUDA device(s)); allowed here: auto, cpu, cuda, "
                + ", ".join(f"cuda:{i}" for i in range(count))
            )
        return text
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} is not available (no MPS device); allowed here: auto, cpu")
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: {DEVICES}")


def _existing_path(text: str) -> str:
    if not text or not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist; allowed: a file or directory written by lmclab")
    return text


def _typed(allowed: Allowed, parse: Callable[[str], Any] = int) -> Callable[[str], Any]:
    return argument_type(allowed, parse)


def _allowed(allowed: Allowed) -> str:
    return f"allowed: {allowed.describe()}"


def _methods_help(methods: Mapping[str, MethodEntry]) -> str:
    """The registered alignment methods, one "name (title): description" each, for ``--help``."""
    return "; ".join(e.summary() for e in methods.values())


def _help(text: str) -> str:
    """Help text as argparse wants it (a literal % doubled)."""
    return text.replace("%", "%%")


# ------------------------------------------------------------------------------------- parser


def _directory(text: str) -> str:
    """`--runs-dir`, `--data-dir`: a directory, or a path where none exists yet (not a file)."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a directory; allowed: a directory")
    return text


def _common_io(p: argparse.ArgumentParser, data: bool = True, device: bool = True) -> None:
    p.add_argument(
        "--runs-dir",
        default=None,
        metavar="DIR",
        type=_directory,
        help="run store; allowed: a directory, created if missing (default: $LMCLAB_RUNS_DIR or ./runs)",
    )
    if data:
        p.add_argument(
            "--data-dir",
            default=None,
            metavar="DIR",
            type=_directory,
            help="local datasets; allowed: a directory (also searched: $LMCLAB_DATA_DIR, the cache)",
        )
        p.add_argument("--offline", action="store_true", help="never download; fail if data is not local")
    if device:
        p.add_argument(
            "--device",
            default="auto",
            metavar="DEVICE",
            type=_device,
            help=f"where to compute; allowed: {DEVICES} (default auto: cuda if available, else cpu)",
        )
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout (messages on stderr)")


def _int_flag(
    p: argparse.ArgumentParser, flag: str, rule: Allowed, default: Any, what: str, shown_default: str | None = None
) -> None:
    """An integer flag checked by `rule`; its help says what it is, what is allowed and the default."""
    shown = str(default) if shown_default is None else shown_default
    p.add_argument(
        flag, metavar="INT", type=_typed(rule), default=default, help=f"{what}; {_allowed(rule)} (default: {shown})"
    )


def _float_flag(
    p: argparse.ArgumentParser,
    flag: str,
    rule: Allowed,
    default: float | None,
    what: str,
    metavar: str = "FLOAT",
    shown_default: str | None = None,
) -> None:
    """A number flag checked by `rule`; its help says what it is, what is allowed and the default."""
    shown = f"{default:g}" if shown_default is None and default is not None else str(shown_default)
    text = f"{what}; {_allowed(rule)} (default: {shown})"
    p.add_argument(flag, metavar=metavar, type=_typed(rule, float), default=default, help=text)


def _no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (on stderr)")


def _allow_different_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        ALLOW_FLAG,
        action="store_true",
        help="compare runs trained on different data (refused otherwise); evaluation uses the first run's "
        "data, and the output says which",
    )


def _points(p: argparse.ArgumentParser, what: str = "evenly spaced λ, both ends included") -> None:
    _int_flag(p, "--points", POINTS, 25, what)


def _split(p: argparse.ArgumentParser, default: str, both: bool = False) -> None:
    """`--split`: train or test (`both`: also both)."""
    choices = (*SPLITS, "both") if both else SPLITS
    text = f"allowed: {', '.join(choices)} (default: {default})"
    p.add_argument("--split", choices=choices, default=default, help=text)


def _subset(p: argparse.ArgumentParser, what: str, default: int | None = None) -> None:
    """`--subset`: a stratified subset of each split; `default` None: the whole split unless given, else
    that many examples with 0 for the whole split."""
    if default is None:
        _int_flag(p, "--subset", POSITIVE, None, what, shown_default="the whole split")
    else:
        _int_flag(p, "--subset", NON_NEGATIVE, default, f"{what} (0: the whole split)")


def _pair_method(p: argparse.ArgumentParser, default: str, what: str = "", flag: str = "--align") -> None:
    """A flag choosing a registered pair alignment method, or `none`."""
    methods = (*PAIR_METHODS, "none")
    lead = f"{what}; " if what else ""
    text = f"{lead}allowed: {', '.join(methods)} (default: {default})"
    p.add_argument(flag, choices=methods, default=default, help=text)


def _bn(p: argparse.ArgumentParser, modes: Sequence[str], what: str) -> None:
    """`--bn`: how normalisation statistics are set at each evaluated point (default by the model)."""
    p.add_argument(
        "--bn",
        choices=tuple(modes),
        default=None,
        help=f"{what}; allowed: {', '.join(modes)} (default: reset for BatchNorm models, else none)",
    )


def _out(p: argparse.ArgumentParser, what: str, shown_default: str, default: str | None = None) -> None:
    """`--out`: the directory results go to (created if missing)."""
    p.add_argument(
        "--out",
        default=default,
        type=_directory,
        metavar="DIR",
        help=f"{what} (default: {shown_default}); allowed: a directory, created if missing",
    )


def _message(exc: BaseException) -> str:
    """An exception's message (a KeyError's without the quotes str() adds)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


def _say(args: argparse.Namespace, text: str) -> None:
    """Human-readable output: stdout normally, stderr when stdout carries JSON."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout)


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False)


def _options(args: argparse.Namespace, **extra: Any) -> Any:
    return RunOptions(
        runs_dir=args.runs_dir,
        data_dir=args.data_dir,
        device=args.device,
        checkpoints=getattr(args, "checkpoints", None) or CheckpointSchedule(),
        progress=_progress(args),
        download=not args.offline,
        **extra,
    )


def _align_as_flagged(args: argparse.Namespace, store: RunStore, run_a: Run, run_b: Run, method: str) -> Alignment:
    """B aligned to A by `method` (stored and reused), with the command's data, device, progress and
    ``--allow-different-data`` flags."""
    return align_runs(
        run_a,
        run_b,
        method=method,
        store=store,
        data_dir=args.data_dir,
        device=args.device,
        progress=_progress(args),
        allow_different_data=args.allow_different_data,
    )
