"""Two-model LMC from stored runs: align (weight or activation matching), verify, interpolate, report.

Alignments are cached in the run store as `align_<hash>/` (perm.safetensors + alignment.json),
keyed by the two runs, the method and its settings; path results go to `lmc_<hash>/` (tidy
paths.csv, barriers.csv, paths.png) or to a chosen output directory.

Runs trained on different data are refused (`lmclab.store.check_same_data`) unless
`allow_different_data=True`; then everything is evaluated on run A's data, and the tables (an
`evaluated_on` column), the figure's title and the summary (`data`) say so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmclab.align import align, get_pair_method
from lmclab.data import DeviceDataset
from lmclab.paths import (
    cumulative_layer_sets,
    default_bn_mode,
    default_lambdas,
    evaluate_path,
    layer_groups,
)
from lmclab.paths.barriers import curve_barrier_rows, spread
from lmclab.permutation import (
    Permutation,
    PermutationSpec,
    SpecError,
    check_invariance,
    derive_spec,
    verify_permutation,
)
from lmclab.permutation.spec import coverage
from lmclab.report import plot_paths, write_csv
from lmclab.store import (
    DataCheck,
    Run,
    RunStore,
    Store,
    artifact_lock,
    check_same_data,
    content_hash,
    read_sealed_json,
    write_sealed_json,
)
from lmclab.training import load_run_model, resolve_device


@dataclass
class Alignment:
    """A verified permutation of run B's units onto run A's."""

    perm: Permutation
    spec: PermutationSpec
    info: dict[str, Any]
    path: Path | None = None


def example_input(run: Run, n: int = 4, seed: int = 0) -> torch.Tensor:
    shape = tuple(run.data_info.input_shape)
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def check_same_architecture(run_a: Run, run_b: Run) -> None:
    a, b = run_a.config.normalised(), run_b.config.normalised()
    ia, ib = (
        (None, None) if i is None else (i.input_shape, i.num_classes)
        for i in (run_a.meta.data_info, run_b.meta.data_info)
    )
    if a.model != b.model or ia != ib:
        raise SpecError(
            f"runs {run_a.path.name} ({a.model}, input {ia[0]}) and {run_b.path.name} "
            f"({b.model}, input {ib[0]}) have different architectures: nothing to align"
        )
    for run in (run_a, run_b):
        if not run.trained:
            raise SpecError(f"run {run.path} is not trained to its end (status {run.status}); train it first")


def align_runs(
    run_a: Run,
    run_b: Run,
    *,
    method: str = "weight",
    seed: int = 0,
    store: RunStore | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    activation_examples: int = 5000,
    spec: PermutationSpec | None = None,
    progress: bool = True,
    ste_epochs: int = 10,
    allow_different_data: bool = False,
) -> Alignment:
    """Align B to A (cached in the store), verify f(π(θ_B)) == f(θ_B) in eval and train mode, save.

    `method`: a two-model method of :data:`lmclab.align.PAIR_METHODS`, given what its entry declares:
    ``model`` (run A's), ``batches`` (of a fixed stratified subset of `activation_examples` training
    examples), ``data`` (the training split), and the settings it accepts (`seed`, ``epochs`` =
    `ste_epochs`, ``device``, `progress`, ``val_data`` = that fixed subset, so the test split is never
    used to choose). "weight": weight matching; "activation": activation matching on the subset; "ste":
    Git Re-Basin's straight-through estimator (λ = ½), keeping the permutation with the lowest midpoint
    loss on the subset. One process computes a given alignment at a time (its lock, `lmclab.store.locks`);
    another asking for it waits and reuses it.

    Runs trained on different data raise `DataMismatch` unless `allow_different_data` (then run A's
    training data is used, and the alignment's info says so under "data").
    """
    entry = get_pair_method(method)  # a registered method (lmclab.align.PAIR_METHODS), else ValueError
    check_same_architecture(run_a, run_b)
    data_check = check_same_data([run_a, run_b], allow=allow_different_data)
    store = store or RunStore(run_a.path.parent)
    settings: dict[str, Any] = {
        "a": run_a.path.name,
        "b": run_b.path.name,
        **entry.identity(),
        "seed": seed,
        "spec_source": "derived" if spec is None else content_hash(spec.to_dict(), spaced=True),
    }
    if {"batches", "data"} & set(entry.needs):
        settings["examples"] = activation_examples
    if "epochs" in entry.accepts:
        settings["epochs"] = ste_epochs
    out = Store(store.root).alignment_dir(settings)
    cached = _stored_alignment(out, spec, data_check)
    if cached is not None:
        return cached
    with artifact_lock(out, root=store.root, what=f"alignment {out.name}"):  # one process computes it
        cached = _stored_alignment(out, spec, data_check)  # stored by another process while this one waited
        if cached is not None:
            return cached
        dev = resolve_device(device)
        model_a, model_b = load_run_model(run_a, device=dev), load_run_model(run_b, device=dev)
        x = example_input(run_a).to(dev)
        spec = spec or derive_spec(model_a, x)
        theta_a, theta_b = model_a.state_dict(), model_b.state_dict()
        kw = entry.settings(seed=seed, epochs=ste_epochs, device=dev, progress=progress)
        if "model" in entry.needs:
            kw["model"] = model_a
        if "examples" in settings:  # a fixed stratified subset of training examples
            examples = DeviceDataset.load(
                run_a.config.data.dataset,
                "train",
                data_dir=data_dir,
                device=dev,
                subset=activation_examples,
                augment=False,
                progress=progress,
            )
            if "batches" in entry.needs:
                kw["batches"] = (xb for xb, _ in examples.batches(500))
            if "val_data" in entry.accepts:
                kw["val_data"] = examples
        if "data" in entry.needs:
            kw["data"] = DeviceDataset.load(
                run_a.config.data.dataset, "train", data_dir=data_dir, device=dev, augment=False, progress=progress
            )
        result = align(theta_a, theta_b, spec, method, **kw)
        verify_permutation(model_b, result.perm, spec, example_input=x)  # raises SpecError if f(π(θ_B)) ≠ f(θ_B)
        invariance = check_invariance(model_b, spec, result.perm, x).to_json()
        info = {**settings, **result.to_json(), "invariance_max_abs_diff": invariance, "data": data_check.to_json()}
        info["coverage"] = coverage(spec, dict(model_a.named_parameters()))  # fraction of parameters permuted
        result.perm.save(out / "perm.safetensors", spec, **settings)
        write_sealed_json(out / "alignment.json", info)
        return Alignment(result.perm, spec, info, out)


def _stored_alignment(out: Path, spec: PermutationSpec | None, data_check: DataCheck) -> Alignment | None:
    """The alignment stored in `out`, if there is one."""
    if (out / "alignment.json").is_file() and (out / "perm.safetensors").is_file():
        perm, saved_spec, _ = Permutation.load(out / "perm.safetensors")
        cached_spec = saved_spec or spec
        if cached_spec is None:
            raise SpecError(f"{out / 'perm.safetensors'} holds no spec; save permutations with their spec")
        info = read_sealed_json(out / "alignment.json", kind="alignment")
        return Alignment(perm, cached_spec, {**info, "data": data_check.to_json()}, out)
    return None


def load_alignment(path: str | Path) -> Alignment:
    """A permutation file saved by `align_runs` (or `Permutation.save`) — directory or .safetensors."""
    path = Path(path)
    file = path / "perm.safetensors" if path.is_dir() else path
    perm, spec, meta = Permutation.load(file)
    if spec is None:
        raise SpecError(f"{file} holds no spec; save permutations with their spec")
    info_file = file.parent / "alignment.json"
    info = read_sealed_json(info_file, kind="alignment") if info_file.is_file() else meta
    return Alignment(perm, spec, info, file.parent)


def layer_selection(model: torch.nn.Module, layers: Sequence[str] | None) -> list[tuple[str, list[str] | None]]:
    """(label, tensor names) per evaluated path: the whole model, chosen layer groups, or cumulative sets.

    `layers`: None (whole model); module names (each interpolated alone); or ["cumulative:ORDER"]
    with ORDER shallow | deep | random (first k layer groups, k = 1 … all)."""
    if not layers:
        return [("all", None)]
    groups = layer_groups(model)
    if len(layers) == 1 and layers[0].startswith("cumulative:"):
        order = layers[0].split(":", 1)[1]
        return [
            (f"{order}:{len(s)}:{s[-1]}", [t for g in s for t in groups[g]])
            for s in cumulative_layer_sets(list(groups), order)
        ]
    unknown = [name for name in layers if name not in groups]
    if unknown:
        raise ValueError(f"unknown layer group(s) {unknown}; layer groups: {', '.join(groups)}")
    return [(name, groups[name]) for name in layers]


def interpolate_runs(
    run_a: Run,
    run_b: Run,
    *,
    alignment: Alignment | None = None,
    include_naive: bool = True,
    points: int = 25,
    splits: Sequence[str] = ("train", "test"),
    subset: int | None = None,
    bn: str | None = None,
    bn_examples: int | None = None,
    layers: Sequence[str] | None = None,
    base: str = "a",
    data_dir: str | None = None,
    device: str = "auto",
    pair: int = 0,
    progress: bool = True,
    allow_different_data: bool = False,
) -> list[dict[str, Any]]:
    """Tidy rows for the naive path θ_A → θ_B and (given an alignment) the permuted path θ_A → π(θ_B),
    evaluated on run A's data. Runs trained on different data raise `DataMismatch` unless
    `allow_different_data`; then every row names the data evaluated on (`evaluated_on`). Every row says
    how many examples of its split were evaluated (`examples`); layer-wise rows (`layers`) say which
    endpoint the other tensors come from (`base`)."""
    check_same_architecture(run_a, run_b)
    evaluated_on = check_same_data([run_a, run_b], allow=allow_different_data).column()
    dev = resolve_device(device)
    model = load_run_model(run_a, device=dev)
    bn = bn or default_bn_mode(model)
    dataset = run_a.config.data.dataset
    data = {
        s: DeviceDataset.load(
            dataset, s, data_dir=data_dir, device=dev, subset=subset, augment=False, progress=progress
        )
        for s in splits
    }
    bn_data = None  # statistics for BN reset / REPAIR come from (the chosen subset of) the training split
    if bn != "none":
        bn_data = (
            data["train"]
            if "train" in data
            else DeviceDataset.load(
                dataset, "train", data_dir=data_dir, device=dev, subset=subset, augment=False, progress=progress
            )
        )
    theta_a = run_a.load_state(device=dev)
    theta_b = run_b.load_state(device=dev)
    endpoints = [("naive", theta_b)] if include_naive or alignment is None else []
    if alignment is not None:
        endpoints.append(
            (f"{alignment.info.get('method', 'aligned')}-matched", alignment.perm.apply(theta_b, alignment.spec))
        )
    lambdas = default_lambdas(points)
    rows: list[dict[str, Any]] = []
    for path_name, end in endpoints:
        for label, only in layer_selection(model, layers):
            for r in evaluate_path(
                model,
                theta_a,
                end,
                data,
                lambdas=lambdas,
                bn=bn,
                bn_data=bn_data,
                bn_examples=bn_examples,
                only=only,
                base=base,
                progress=progress,
                desc=f"{path_name} {label}",
            ):
                rows.append(
                    {
                        "pair": pair,
                        "path": path_name,
                        "layers": label,
                        **({"base": base} if only is not None else {}),  # layer-wise: the others' endpoint
                        "bn": bn,
                        **evaluated_on,
                        **r,
                        "examples": len(data[r["split"]]),
                    }
                )
    return rows


def write_lmc_report(rows: list[dict[str, Any]], out: Path, title: str = "") -> dict[str, Path]:
    """paths.csv (tidy), barriers.csv (every definition per curve, with its `quantity`: "barrier" for the
    whole model, "layerwise_barrier" for ``--layers`` curves; an empty ``midpoint`` where λ = ½ was not
    evaluated) and paths.png."""
    out.mkdir(parents=True, exist_ok=True)
    report = curve_barrier_rows(rows, _curve_keys(rows))
    files = {"paths": write_csv(out / "paths.csv", rows), "barriers": write_csv(out / "barriers.csv", report)}
    whole = [r for r in rows if r.get("layers", "all") == "all"]
    if whole:
        files["figure"] = plot_paths(out / "paths.png", whole, title=title).path
    return files


def _curve_keys(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """What identifies a curve; rows of runs trained on different data also carry `evaluated_on`."""
    keys = ("path", "layers", "pair", "split", "metric")
    return (*keys, "evaluated_on") if any("evaluated_on" in r for r in rows) else keys


def lmc_pairs(
    pairs: Sequence[tuple[Run, Run]],
    *,
    method: str | None = "weight",
    perm_files: Sequence[str] | None = None,
    out: str | Path | None = None,
    say: Callable[[str], None] = print,
    allow_different_data: bool = False,
    **kw: Any,
) -> dict[str, Any]:
    """For each pair: align (or load its permutation), evaluate the naive and permuted paths. Then write
    the tidy table (a `pair` column), per-curve barriers and the figure (mean ± std over pairs), and
    print each barrier as mean ± std over pairs.

    Every pair is checked first: runs trained on different data raise `DataMismatch` unless
    `allow_different_data`; then each pair is evaluated on its run A's data, and the tables (an
    `evaluated_on` column), the figure's title and the summary's `data` say which."""
    if not pairs:
        raise ValueError("give at least one pair of runs")
    if perm_files is not None and len(perm_files) != len(pairs):
        raise ValueError(f"{len(perm_files)} permutation file(s) for {len(pairs)} pair(s): give one per pair")
    checks = [check_same_data([a, b], allow=allow_different_data) for a, b in pairs]
    for note in _data_notes(checks):
        say(f"note: {note}")
    progress = kw.get("progress", True)
    rows: list[dict[str, Any]] = []
    alignments: list[Alignment | None] = []
    for i, (run_a, run_b) in enumerate(pairs):
        alignment = None
        if perm_files is not None:
            alignment = load_alignment(perm_files[i])
        elif method:
            alignment = align_runs(
                run_a,
                run_b,
                method=method,
                data_dir=kw.get("data_dir"),
                device=kw.get("device", "auto"),
                progress=progress,
                allow_different_data=allow_different_data,
            )
        alignments.append(alignment)
        rows += interpolate_runs(
            run_a, run_b, alignment=alignment, pair=i, allow_different_data=allow_different_data, **kw
        )
    identity = dict(
        pairs=[[a.path.name, b.path.name] for a, b in pairs],
        align=[None if al is None else str(al.path) for al in alignments],
        **{k: v for k, v in kw.items() if k not in ("progress", "device", "data_dir")},
    )
    out_dir = Path(out) if out else Store(pairs[0][0].path.parent).result_dir("lmc", identity)
    title = (
        f"{pairs[0][0].path.name} ↔ {pairs[0][1].path.name}"
        if len(pairs) == 1
        else f"{len(pairs)} pairs ({pairs[0][0].config.model.model} on {pairs[0][0].config.data.dataset})"
    )
    title += "".join(f"\n{note}" for note in _data_notes(checks))
    files = write_lmc_report(rows, out_dir, title=title)
    per_curve = curve_barrier_rows(rows, _curve_keys(rows))
    summary = {
        "out": str(out_dir),
        **{k: str(v) for k, v in files.items()},
        "alignments": [None if al is None else {"path": str(al.path), **al.info} for al in alignments],
        "barriers": per_curve,
        "data": {
            "same": all(c.same for c in checks),
            "evaluated_on": sorted({c.evaluated_on.label() for c in checks}),
            "pairs": [c.to_json() for c in checks],
        },
    }
    _say_barriers(per_curve, len(pairs), say)
    say(
        f"tables: {files['paths']}, {files['barriers']}" + (f"\nfigure: {files['figure']}" if "figure" in files else "")
    )
    return summary


def _data_notes(checks: Sequence[DataCheck]) -> list[str]:
    """One line per distinct note of pairs whose runs were trained on different data."""
    return list(dict.fromkeys(note for c in checks if (note := c.note()) is not None))


def _say_barriers(per_curve: list[dict[str, Any]], n_pairs: int, say: Callable[[str], None]) -> None:
    """One line per (path, split, metric) of the whole-model curves: mean ± std over pairs."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in per_curve:
        if r.get("layers", "all") == "all":
            groups.setdefault((r["path"], r["split"], r["metric"]), []).append(r)
    for (path, split, metric), rs in groups.items():
        failed = [r["error"] for r in rs if "error" in r]
        if failed:
            say(f"{path:<18} {split:<5} {metric:<5} {failed[0]}")
            continue
        parts = []
        for name, label in (("barrier", "barrier"), ("rebasin", "Git Re-Basin"), ("midpoint", "midpoint")):
            if any(r[name] is None for r in rs):  # the midpoint where λ = ½ was not evaluated
                parts.append(f"{label} n/a (λ = ½ not evaluated)")
                continue
            s = spread(r[name] for r in rs)
            parts.append(f"{label} {s.mean:.4f}" + (f" ± {s.sd:.4f}" if n_pairs > 1 else ""))
        say(f"{path:<18} {split:<5} {metric:<5} {parts[0]}  ({', '.join(parts[1:])})")
