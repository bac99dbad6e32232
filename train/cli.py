"""``sorter-train``: manifest, fit, evaluate, calibrate, loso, export."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from sorter import __version__
from sorter.commands.oneline import CONTEXT_SETTINGS, OneLineErrors
from sorter.dicom.quiet import quiet_pydicom
from sorter.model.artefact import load_artefact, save_artefact
from train.config import PRESETS, FitConfig, resolve_config, save_config


def _config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``fit`` and ``loso``; unset options keep the preset's value."""
    options = [
        click.option("--preset", type=click.Choice(sorted(PRESETS)), default="default", show_default=True),
        click.option(
            "--config",
            "config_file",
            type=click.Path(exists=True, path_type=Path),
            help="YAML file of FitConfig keys (applied after the preset).",
        ),
        click.option(
            "--arch", help="resnet18, resnet50, vgg16_bn, efficientnet_b0, mobilenet_v3_small/large ..."
        ),
        click.option("--input-size", type=int),
        click.option("--epochs", type=int),
        click.option("--epoch-size", type=int, help="Images drawn per epoch by the balanced sampler."),
        click.option("--batch-size", type=int),
        click.option("--lr", type=float),
        click.option("--seed", type=int),
        click.option("--limit-per-label", type=int, help="Smoke runs: at most N manifest rows per label."),
        click.option("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available)."),
        click.option("--workers", type=int, help="Decode processes."),
        click.option("--cache-dir", help="Where decoded images are cached."),
        click.option(
            "--dry-run", is_flag=True, help="One tiny epoch at 64 px on 6 files per label (CI smoke)."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _resolve(preset: str, config_file: Path | None, dry_run: bool, **overrides: Any) -> FitConfig:
    if dry_run:
        defaults = {
            "epochs": 1,
            "epoch_size": 96,
            "batch_size": 32,
            "input_size": 64,
            "limit_per_label": 6,
            "max_frames": 2,
            "axial_slices": 4,
            "reformat_slices": 0,
        }
        overrides = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return resolve_config(preset, config_file, **overrides)
    except ValueError as exc:  # a bad key or value in the config or options: one line, no traceback
        raise click.UsageError(str(exc)) from exc


def _manifest(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
    """Accept only readable manifests: a missing column or a bad row is one line, not a traceback.

    It reads each manifest once more than the command does; that costs well under a second for
    100 000 rows, against a run of minutes, and nothing is written before it is known to be good.
    """
    from train.manifest import read_manifest

    for path in value if isinstance(value, tuple) else (value,):
        try:
            rows = read_manifest(path)
        except (ValueError, UnicodeDecodeError) as exc:
            raise click.BadParameter(str(exc)) from exc
        if not rows:  # was a traceback from the sampler once the run had started
            raise click.BadParameter(f"{path} lists no images (a header line only)")
    return value


def _manifest_option(help: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--manifest FILE`` (as ``manifest_path``), checked by :func:`_manifest` when parsed."""
    return click.option(
        "--manifest",
        "manifest_path",
        required=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        callback=_manifest,
        help=help,
    )


def _loso_run(_ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    """Accept only a finished ``sorter-train loso`` run: one line instead of a traceback."""
    from train.runs import not_a_loso_run

    why = None if value is None else not_a_loso_run(value)
    if why:
        raise click.BadParameter(why)
    return value


def _loso_runs(ctx: click.Context, param: click.Parameter, value: tuple[Path, ...]) -> tuple[Path, ...]:
    """:func:`_loso_run` for each of several runs."""
    for run in value:
        _loso_run(ctx, param, run)
    return value


def _command_line() -> str:
    return "sorter-train " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@click.group(cls=OneLineErrors, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="sorter-train")
@click.option("-v", "--verbose", is_flag=True)
def main(verbose: bool) -> None:
    """Train, evaluate and export dicom-sorter models."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet_pydicom(verbose)


#: What to do about a skipped file, where the reason alone does not say.
_SKIP_HINTS = {"name_not_utf8": " (a manifest is UTF-8 text: rename them to train on them)"}


@main.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--source-from",
    default="top_folder",
    show_default=True,
    help="top_folder, InstitutionName, StationName, Manufacturer or another DICOM keyword.",
)
@click.option(
    "--limit-per-series",
    type=click.IntRange(min=1),
    help="Keep at most N evenly spaced instances per series.",
)
def manifest(root: Path, out: Path, source_from: str, limit_per_series: int | None) -> None:
    """Build a training manifest from a DICOM tree; labels come from the header Modality."""
    from train.manifest import build_manifest, source_problems

    summary = build_manifest(root, out, source_from=source_from, limit_per_series=limit_per_series)
    if summary.rows:
        click.echo(f"wrote {summary.rows} rows to {out}")
    for label, count in sorted(summary.labels.items()):
        sources = summary.sources_by_label.get(label, {})
        top = ", ".join(f"{s} {n}" for s, n in sorted(sources.items(), key=lambda kv: -kv[1])[:5])
        more = f", +{len(sources) - 5} more" if len(sources) > 5 else ""
        click.echo(f"  {label}: {count} files from {len(sources)} sources ({top}{more})")
    for reason, count in sorted(summary.skipped.items()):
        click.echo(f"  skipped {count}: {reason}{_SKIP_HINTS.get(reason, '')}")
    if not summary.rows:
        out.unlink(missing_ok=True)
        raise click.ClickException(f"no DICOM image with a Modality under {root}: no manifest written")
    for problem in source_problems(summary.sources_by_label):
        click.echo(f"warning: {problem}", err=True)


@main.command()
@click.option(
    "--manifest",
    "manifest_paths",
    required=True,
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    callback=_manifest,
    help="Manifest CSV; repeat to train on several (e.g. a corpus and `sorter export --reviewed`).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--val-fraction", type=float, help="Fraction of each label's sources held out for validation.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
@click.option("--force", is_flag=True, help="Overwrite a finished run in OUT.")
@_config_options
def fit(
    manifest_paths: tuple[Path, ...],
    out: Path,
    val_fraction: float | None,
    resume: bool,
    force: bool,
    preset: str,
    config_file: Path | None,
    dry_run: bool,
    **overrides: Any,
) -> None:
    """Train a model on a manifest (split by source, never by slice) and save OUT/model.pt."""
    from train.calibrate import fit_temperature
    from train.fit import evaluate_logits, predict_logits
    from train.fit import fit as fit_network
    from train.metrics import plot_curves
    from train.runs import images_for, label_indices, select_rows, training_summary, write_report
    from train.splits import validation_sources

    config = _resolve(preset, config_file, dry_run, val_fraction=val_fraction, **overrides)
    if (out / "model.pt").exists() and not (force or resume):
        raise click.UsageError(f"{out} already holds a finished run (model.pt); pass --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    manifest = ", ".join(map(str, manifest_paths))
    save_config(config, out / "config.yaml", manifest=manifest, command=_command_line())
    rows = select_rows(manifest_paths, config)
    held = set(config.val_sources) or validation_sources(rows, config.val_fraction, config.seed)
    images = images_for(rows, config)
    is_val = np.isin(images.sources, sorted(held))
    train_set, val_set = images.subset(~is_val), (images.subset(is_val) if is_val.any() else None)
    click.echo(
        f"{len(train_set)} training images, {len(val_set) if val_set else 0} validation images "
        f"from {len(held)} held-out sources; {len(images.failures)} files failed to decode"
    )
    network, history = fit_network(config, train_set, val_set, out, resume=resume)
    spec = config.spec(training=training_summary(train_set, config, manifest_paths))
    if val_set is not None:
        logits = predict_logits(network, val_set)
        temperature = fit_temperature(logits, label_indices(val_set, spec))
        labels = [label.value for label in spec.labels]
        metrics = evaluate_logits(logits, val_set, labels, temperature)
        metrics["temperature"] = temperature
        write_report(metrics, out, "val-metrics")
        spec = config.spec(training=spec.training, temperature=temperature, metrics={"validation": metrics})
    (out / "history.json").write_text(json.dumps(history, indent=1))
    plot_curves(history, out / "curves.png")
    digest = save_artefact(network, spec, out / "model.pt")
    (out / "checkpoint.pt").unlink(missing_ok=True)
    click.echo(f"saved {out / 'model.pt'} (sha256 {digest[:12]})")


@main.command()
@_manifest_option()
@click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Model artefact (default: the bundled model).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--cache-dir", default=None)
def evaluate(
    manifest_path: Path, model_path: Path | None, out: Path, workers: int, cache_dir: str | None
) -> None:
    """Evaluate a model on a manifest: OUT/metrics.json and OUT/confusion.png."""
    import torch

    from train.fit import evaluate_logits, predict_logits
    from train.metrics import format_metrics_table
    from train.runs import images_for, select_rows, write_report

    loaded = load_artefact(model_path)
    config = FitConfig(
        labels=tuple(label.value for label in loaded.spec.labels),
        workers=workers,
        cache_dir=cache_dir,
        input_size=loaded.spec.preprocess.input_size,
    )
    images = images_for(select_rows(manifest_path, config), config, params=loaded.spec.preprocess)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    logits = predict_logits(loaded.network, images)
    metrics = evaluate_logits(logits, images, list(config.labels), loaded.spec.temperature)
    metrics.update(model=str(loaded.path), model_sha256=loaded.sha256, decode_failures=len(images.failures))
    write_report(metrics, out)
    click.echo(format_metrics_table(metrics))


@main.command()
@click.option(
    "--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@_manifest_option("Held-out images (sources the model was not trained on).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
def calibrate(model_path: Path, manifest_path: Path, out: Path) -> None:
    """Fit the temperature on held-out sources and write a calibrated artefact."""
    from dataclasses import replace

    from train.calibrate import fit_temperature
    from train.fit import predict_logits
    from train.runs import images_for, label_indices, select_rows

    loaded = load_artefact(model_path)
    config = FitConfig(
        labels=tuple(label.value for label in loaded.spec.labels),
        input_size=loaded.spec.preprocess.input_size,
    )
    images = images_for(select_rows(manifest_path, config), config, params=loaded.spec.preprocess)
    temperature = fit_temperature(predict_logits(loaded.network, images), label_indices(images, loaded.spec))
    digest = save_artefact(loaded.network, replace(loaded.spec, temperature=temperature), out)
    click.echo(f"temperature {temperature:.3f}; saved {out} (sha256 {digest[:12]})")


@main.command()
@_manifest_option()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--folds",
    type=int,
    default=10,
    show_default=True,
    help="Source-disjoint folds; 0 = strict leave-one-source-out.",
)
@click.option("--only-fold", "only_folds", type=int, multiple=True, help="Run only these folds.")
@click.option(
    "--force", is_flag=True, help="Run even when a label has fewer than 3 sources or mostly unknown ones."
)
@_config_options
def loso(
    manifest_path: Path,
    out: Path,
    folds: int,
    only_folds: tuple[int, ...],
    force: bool,
    preset: str,
    config_file: Path | None,
    dry_run: bool,
    **overrides: Any,
) -> None:
    """Leave-sources-out cross-validation: every source is predicted by a model that never saw it."""
    from train.loso import run_loso
    from train.manifest import read_manifest, source_problems, sources_of
    from train.metrics import format_metrics_table

    config = _resolve(preset, config_file, dry_run, **overrides)
    problems = source_problems(sources_of(read_manifest(manifest_path)))
    for problem in problems:
        click.echo(f"{'warning' if force else 'error'}: {problem}", err=True)
    if problems and not force:
        raise click.UsageError(
            f"{len(problems)} labels cannot be measured on unseen sources (above); fix the sources "
            "(sorter-train manifest --source-from ...) or pass --force to run anyway"
        )
    metrics = run_loso(manifest_path, config, out, folds, list(only_folds) or None)
    click.echo(format_metrics_table(metrics))
    click.echo(
        f"temperature {metrics['temperature']:.3f}; ECE {metrics['ece']:.3f} "
        f"(uncalibrated {metrics['ece_uncalibrated']:.3f})"
    )


@main.command("operating-point")
@click.argument("loso_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), callback=_loso_run)
def operating_point_command(loso_dir: Path) -> None:
    """Choose the verdict's thresholds on a loso run's out-of-fold predictions and report them."""
    from train.operating_point import operating_point, shares_markdown

    point = operating_point(loso_dir)
    (loso_dir / "operating-point.json").write_text(json.dumps(point, indent=1))
    click.echo(shares_markdown(point))


@main.command()
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="OUT/model.pt of a fit run.",
)
@click.option(
    "--loso",
    "loso_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    callback=_loso_run,
    help="A loso run: its temperature, metrics and verdict thresholds go into the artefact.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Artefact to write (the bundled model is sorter/model/default/model.pt).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing artefact or card.")
@click.option(
    "--card", type=click.Path(dir_okay=False, path_type=Path), help="Write a markdown model card here."
)
@click.option(
    "--speed-json",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Benchmark JSON whose numbers go into the card.",
)
@click.option("--reproduce", default="", help="The command line that reproduces the artefact, for the card.")
@click.option(
    "--confirm",
    "confirm",
    type=click.FloatRange(0.0, 1.0),
    is_flag=False,
    flag_value=0.01,
    default=None,
    help="An ensemble only: let its partner confirm a header alone, skipping the main network, "
    "where at most this share more of the copies relabelled to a label are confirmed (default "
    "0.01; chosen on the --loso run that `sorter-train ensemble` wrote).",
)
def export(
    model_path: Path,
    loso_dir: Path | None,
    out: Path,
    force: bool,
    card: Path | None,
    speed_json: Path | None,
    reproduce: str,
    confirm: float | None,
) -> None:
    """Export a trained model as the artefact ``sorter`` loads (calibrated from a loso run)."""
    from train.export import export_model, model_card

    for path in (out, card):
        if path is not None and path.exists() and not force:
            raise click.UsageError(f"{path} exists; pass --force to overwrite it")
    bundled = _bundled_balanced_accuracy()  # before a bundled model is overwritten
    try:
        spec, digest = export_model(model_path, out, loso_dir, confirm=confirm)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"saved {out} (sha256 {digest[:12]}, temperature {spec.temperature:.3f})")
    held = spec.metrics.get("operating_point", {}).get("cross_fitted")
    if held:
        shares = held["images"]
        click.echo(
            f"disagree_at x {spec.metrics['operating_point']['shrink']:.2f}; on folds the thresholds never "
            f"saw (cross-fitted): right headers agree {shares['agree']:.3f}, refuted "
            f"{shares['false_disagree']:.3f}; relabelled copies caught {shares['caught']:.3f}, confirmed "
            f"{shares['false_agree']:.3f}"
        )
    found = spec.metrics.get("operating_point", {}).get("confirm")
    if found:
        shares, alone = found["images"], found["ensemble_images"]
        click.echo(
            f"the partner confirms {found['fast']:.1%} of right headers alone (cross-fitted): right headers "
            f"agree {alone['agree']:.3f} -> {shares['agree']:.3f}, relabelled copies caught "
            f"{alone['caught']:.3f} -> {shares['caught']:.3f}, confirmed {alone['false_agree']:.3f} -> "
            f"{shares['false_agree']:.3f}"
        )
    mine = spec.metrics.get("leave_sources_out", {}).get("balanced_accuracy")
    if mine is not None and bundled is not None and mine < bundled:
        click.echo(
            f"warning: this model's leave-sources-out balanced accuracy {mine:.3f} is below the bundled "
            f"model's {bundled:.3f} (each on its own manifest and folds: compare on the same ones with "
            "`sorter-train compare`)",
            err=True,
        )
    elif mine is None:
        click.echo("note: no --loso run: the artefact and its card carry no unseen-source accuracy", err=True)
    if card is not None:
        speed = json.loads(speed_json.read_text()) if speed_json else None
        name = "the bundled model" if out.resolve() == _bundled_path().resolve() else out.name
        card.write_text(model_card(spec, digest, reproduce or _command_line(), speed, name=name))
        click.echo(f"wrote {card}")


def _read_pair(main_loso: Path, other_loso: Path) -> tuple[Any, Any]:
    """Two loso runs' out-of-fold predictions, refused in one line unless they cover the same images."""
    from train.cascade import LosoRun, check_pair

    runs = LosoRun.read(main_loso), LosoRun.read(other_loso)
    try:
        check_pair(*runs)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    return runs


def _joined(join: Callable[[], str]) -> str:
    """Run an artefact join; artefacts that cannot be joined are refused in one line."""
    try:
        return join()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def _pair_options(role: str, role_help: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The options of a command that joins a main network and a ``role`` network (``cascade``,
    ``ensemble``): both artefacts, both loso runs, and where the joined run and artefact go."""
    artefact = click.Path(exists=True, dir_okay=False, path_type=Path)
    run = click.Path(exists=True, file_okay=False, path_type=Path)
    options = [
        click.option(
            "--model", "main_path", required=True, type=artefact, help="The main network's artefact."
        ),
        click.option(f"--{role}", f"{role}_path", required=True, type=artefact, help=role_help),
        click.option(
            "--loso",
            "main_loso",
            required=True,
            callback=_loso_run,
            type=run,
            help="The main network's recipe's loso run.",
        ),
        click.option(
            f"--{role}-loso",
            required=True,
            callback=_loso_run,
            type=run,
            help=f"The {role}'s recipe's loso run (same manifest, folds and seed).",
        ),
        click.option(
            "--out-run",
            required=True,
            type=click.Path(file_okay=False, path_type=Path),
            help="Where to write the joined networks' out-of-fold predictions, as a loso run.",
        ),
        click.option(
            "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Artefact to write."
        ),
    ]

    def apply(command: Callable[..., None]) -> Callable[..., None]:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


@main.command()
@_pair_options("screen", "The fast network's artefact (same inputs and labels).")
@click.option(
    "--tolerance",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="How much less often than the main network the screen may be right on the frames it keeps.",
)
def cascade(
    main_path: Path,
    screen_path: Path,
    main_loso: Path,
    screen_loso: Path,
    tolerance: float,
    out_run: Path,
    out: Path,
) -> None:
    """Join a fast screen and a main network: the screen answers where it is sure (see train/cascade.py)."""
    from train.cascade import assemble, write_cascade_run

    main_run, screen_run = _read_pair(main_loso, screen_loso)
    metrics = write_cascade_run(main_run, screen_run, tolerance, out_run)
    found = metrics["cascade"]
    click.echo(
        "header test cross-fitted (thresholds judged on folds they were not chosen on)\n"
        "| out of fold | to main network | balanced acc. | source-averaged | accuracy | right: agree "
        "| relabelled: disagree |"
    )
    click.echo("|---|---:|---:|---:|---:|---:|---:|")
    for name, share in (("main_alone", 1.0), ("screen_alone", 0.0), ("cascade", found["to_main"])):
        row = found[name]
        click.echo(
            f"| {name.replace('_', ' ')} | {share:.3f} | {row['balanced_accuracy']:.3f} | "
            f"{row['source_macro']:.3f} | {row['accuracy']:.3f} | {row['agree']:.3f} | {row['caught']:.3f} |"
        )
    click.echo(
        "\nIf the screen could only confirm a header (p_screen(header) >= c: agree; everything else the "
        "main network's verdict):\n| c | right headers the screen answers | right: agree | right: disagree "
        "| relabelled: disagree | relabelled: agree |\n|---:|---:|---:|---:|---:|---:|"
    )
    for row in found["confirming_screen"]:
        click.echo(
            f"| {row['confirm_at']:.2f} | {row['fast']:.3f} | {row['agree']:.3f} | "
            f"{row['false_disagree']:.3f} | {row['caught']:.3f} | {row['false_agree']:.3f} |"
        )
    shown = ", ".join(f"{label} {value:.3f}" for label, value in found["thresholds"].items())
    click.echo(f"screen thresholds (chosen on every fold): {shown}")
    temperatures = (main_run.temperature, screen_run.temperature)
    digest = _joined(lambda: assemble(main_path, screen_path, found["thresholds"], temperatures, out))
    click.echo(
        f"wrote {out_run} and {out} (sha256 {digest[:12]}); next: "
        f"sorter-train export --model {out} --loso {out_run} --out ..."
    )


@main.command()
@_pair_options("partner", "The second network's artefact (same inputs and labels).")
@click.option(
    "--weight",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    help="The partner's share of the average (default: chosen by balanced accuracy, cross-fitted over "
    "the folds).",
)
def ensemble(
    main_path: Path,
    partner_path: Path,
    main_loso: Path,
    partner_loso: Path,
    weight: float | None,
    out_run: Path,
    out: Path,
) -> None:
    """Average a main network and a partner on every frame (see train/cascade.py)."""
    from train.cascade import assemble_ensemble, write_ensemble_run

    main_run, partner_run = _read_pair(main_loso, partner_loso)
    found = write_ensemble_run(main_run, partner_run, weight, out_run)["ensemble"]
    weight = float(found["weight"])
    if found["weights_per_fold"]:
        chosen = ", ".join(f"fold {k}: {v:.1f}" for k, v in found["weights_per_fold"].items())
        click.echo(f"partner weight chosen on the other folds ({chosen}); on every fold: {weight:.1f}")
    click.echo(
        "header test cross-fitted (thresholds judged on folds they were not chosen on)\n"
        "| out of fold | balanced acc. | source-averaged | accuracy | right: agree | relabelled: disagree |"
    )
    click.echo("|---|---:|---:|---:|---:|---:|")
    for name in ("main_alone", "partner_alone", "ensemble"):
        row = found[name]
        click.echo(
            f"| {name.replace('_', ' ')} | {row['balanced_accuracy']:.3f} | {row['source_macro']:.3f} | "
            f"{row['accuracy']:.3f} | {row['agree']:.3f} | {row['caught']:.3f} |"
        )
    temperatures = (main_run.temperature, partner_run.temperature)
    digest = _joined(lambda: assemble_ensemble(main_path, partner_path, temperatures, weight, out))
    click.echo(
        f"wrote {out_run} and {out} (sha256 {digest[:12]}); next: "
        f"sorter-train export --model {out} --loso {out_run} --out ..."
    )


@main.command()
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def graph(model_path: Path) -> None:
    """Write MODEL's ONNX graph beside it, so that CPU nodes serve it without PyTorch."""
    from sorter.model.artefact import load_artefact
    from train.export import write_graph

    loaded = load_artefact(model_path)
    written = write_graph(loaded.network, loaded.spec, model_path, loaded.sha256)
    click.echo(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB) and its .json")


def _bundled_path() -> Path:
    from sorter.model.artefact import DEFAULT_MODEL_PATH

    return Path(DEFAULT_MODEL_PATH)


def _bundled_balanced_accuracy() -> float | None:
    """The bundled model's leave-sources-out balanced accuracy, from its spec (None if unknown)."""
    from sorter.model.artefact import load_artefact

    try:
        metrics = load_artefact(_bundled_path()).spec.metrics
    except Exception:  # a missing or older bundled artefact: nothing to compare with
        return None
    value = metrics.get("leave_sources_out", {}).get("balanced_accuracy")
    return float(value) if value is not None else None


@main.command()
@click.argument(
    "runs",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    callback=_loso_runs,
)
@click.option(
    "--speed-json",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="tests/bench/bench_inference.py output, for the CPU img/s column.",
)
@click.option(
    "--by-source",
    is_flag=True,
    help="Also list, per held-out source, the images each run got right and what it said instead "
    "(the sources where the runs differ or err).",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the table here.")
def compare(runs: tuple[Path, ...], speed_json: Path | None, by_source: bool, out: Path | None) -> None:
    """Compare loso runs (same manifest, folds and seed) on the folds they all evaluated."""
    from train.compare import compare_runs, compare_sources, comparison_markdown, load_runs, sources_markdown

    speed: dict[str, float] = {}
    if speed_json is not None:
        for row in json.loads(speed_json.read_text())["rows"]:
            speed[f"{row['arch']}@{row['input']}"] = row["images_per_s"]
    try:
        loaded = load_runs(list(runs))
    except ValueError as exc:  # runs of other folds: comparing them would mislead
        raise click.UsageError(str(exc)) from exc
    common, rows = compare_runs(loaded)
    table = comparison_markdown(common, rows, speed)
    if by_source:
        table += "\n" + sources_markdown(list(runs), compare_sources(loaded)[1])
    click.echo(table)
    if out is not None:
        out.write_text(table)
