"""``sorter adapt``: fine-tune the current model on the archive's own header labels, cross-fitted,
and rank the instances whose header the rest of the archive contradicts (:mod:`sorter.adaptation`)."""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import numpy as np

from sorter.commands.common import check_output_folder, database, database_option, device_option, write_rows
from sorter.errors import SorterError

log = logging.getLogger(__name__)


@click.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    callback=check_output_folder,
    default=Path("sorter-adapt"),
    show_default=True,
    help="Work folder: the sample, embeddings, finished folds, then model.pt and MODEL_CARD.md. "
    "Run again with the same folder to resume.",
)
@click.option(
    "--model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Model to adapt (default: the database's active model, else the bundled one).",
)
@click.option(
    "--per-label",
    type=click.IntRange(min=10),
    default=2000,
    show_default=True,
    help="At most this many sampled instances per header label.",
)
@click.option(
    "--per-series",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="At most this many sampled instances per series.",
)
@click.option(
    "--folds",
    type=click.IntRange(min=2, max=20),
    default=5,
    show_default=True,
    help="Cross-fitting folds (dealt by study).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--frames",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Frames embedded per multi-frame instance.",
)
@click.option("--workers", type=click.IntRange(min=1), help="Decode processes (default: one per core).")
@device_option
@click.option(
    "--manifest",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Adapt on a manifest (`sorter-train manifest`) instead of the database; writes "
    "OUT/label_issues.csv and nothing to the database.",
)
@click.option(
    "--reclassify",
    "then_reclassify",
    is_flag=True,
    help="Then classify the whole archive with the adapted model (`sorter reclassify`).",
)
@click.option("--restart", is_flag=True, help="Start OUT over instead of resuming it.")
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal)."
)
@database_option
@click.pass_context
def adapt(
    ctx: click.Context,
    out: Path,
    model: Path | None,
    per_label: int,
    per_series: int,
    folds: int,
    seed: int,
    frames: int,
    workers: int | None,
    device: str | None,
    manifest: Path | None,
    then_reclassify: bool,
    restart: bool,
    progress: bool | None,
    database_url: str | None,
) -> None:
    """Adapt the current model to this archive, cross-fitted by study, and score label issues.

    Samples instances balanced by header label, then source (institution / station / calling
    AE), then study, at most --per-series per series; fine-tunes the model's head on --folds - 1
    folds and predicts the held-out one, so every sampled instance is judged by a model that
    never saw its study; flags the headers the archive contradicts by confident learning
    (cleanlab); fits the adapted model on the whole sample and registers it (not active:
    `sorter models use` or --reclassify). Views: adapted_instances, adapted_series, adapted_studies.
    """
    try:  # the training extra: a lean (serving) install has neither
        import cleanlab  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(
            f"sorter adapt trains, so it needs PyTorch and cleanlab ({exc}): "
            "pip install 'dicom-sorter[train]'"
        ) from exc
    from sorter.adaptation.runner import AdaptError, Options

    options = Options(per_label=per_label, per_series=per_series, folds=folds, seed=seed, frames=frames)
    started = time.monotonic()
    try:
        if manifest is not None:
            _adapt_manifest(manifest, out, model, options, workers, device, restart, progress)
            return
        with database(database_url) as (_engine, sessions):
            adapted_path = _adapt_database(
                sessions, database_url, out, model, options, workers, device, restart, progress
            )
    except (AdaptError, SorterError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"adapted in {time.monotonic() - started:.0f} s", err=True)
    if then_reclassify:
        from sorter.commands.reclassify import reclassify

        ctx.invoke(
            reclassify,
            model=adapted_path,
            database_url=database_url,
            device=device,
            workers=workers,
            progress=progress,
        )


def _base_model(sessions: Any, model: Path | None) -> Path:
    """``--model``, else the active model's artefact when its file is still there, else the bundled one."""
    from sorter.db import catalogue
    from sorter.model.artefact import DEFAULT_MODEL_PATH

    if model is not None:
        return model
    with sessions() as session:
        active = next((r for r in catalogue.list_models(session) if r.active), None)
    if active is not None and active.path and Path(active.path).is_file():
        return Path(active.path)
    return DEFAULT_MODEL_PATH


def _fit(
    out: Path,
    base_path: Path,
    candidates: Any,
    options: Any,
    workers: int | None,
    device: str | None,
    restart: bool,
    progress: bool | None,
) -> dict[str, Any]:
    """Steps 1-4 of :mod:`sorter.adaptation.runner`; returns what the callers store or print."""
    import os

    import torch

    from sorter.adaptation import core, runner
    from sorter.adaptation.embed import embed_files
    from sorter.commands.runs import progress_bar
    from sorter.model.artefact import load_artefact
    from sorter.model.classifier import pick_device

    loaded = load_artefact(base_path)
    plan = runner.plan(out, candidates, options, loaded.sha256, restart)
    network = loaded.network.to(torch.device(pick_device(device)))
    items = [(c.instance_id, plan.paths[c.instance_id]) for c in plan.chosen]
    bar = progress_bar(progress, "embed", len(items))
    tick = bar.update if bar is not None else None

    def embed(block: Sequence[tuple[int, str]]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        e = embed_files(
            block,
            network,
            loaded.spec.preprocess,
            frames=options.frames,
            workers=workers or os.cpu_count() or 1,
            on_progress=tick,
        )
        return e.ids, e.vectors, e.failures

    try:
        ids, vectors, failures = runner.embed_blocks(out, items, embed, on_skip=tick)
    finally:
        if bar is not None:
            bar.close()
    network = network.cpu()
    labels = [label.value for label in loaded.spec.labels]
    index = {label: i for i, label in enumerate(labels)}
    by_id = {c.instance_id: c for c in plan.chosen}
    # A header label the model cannot emit (a custom model with fewer labels) has nothing to learn.
    known = np.asarray([by_id[int(i)].header_label in index for i in ids], dtype=bool)
    ids, vectors = ids[known], vectors[known]
    chosen = [by_id[int(i)] for i in ids]
    y = np.asarray([index[c.header_label] for c in chosen], dtype=np.int64)
    fold = np.asarray([plan.fold_of[c.study] for c in chosen], dtype=np.int64)
    if len(set(y.tolist())) < 2:
        raise runner.AdaptError("fewer than two header labels decoded: nothing to contrast")
    done, save = runner.fold_store(out)
    result = core.adapt_arrays(vectors, y, fold, network, labels, options.recipe, done=done, save=save)
    sources = [c.source for c in chosen]
    metrics = {"cross_fitted": core.crossfit_metrics(y, result.oof_probs, labels, sources, result.issues)}
    return {
        "loaded": loaded,
        "plan": plan,
        "ids": ids,
        "chosen": chosen,
        "y": y,
        "folds": fold,
        "failures": failures,
        "result": result,
        "metrics": metrics,
        "labels": labels,
    }


def _training(fit: dict[str, Any], base_path: Path, archive: str, options: Any) -> dict[str, Any]:
    chosen = fit["chosen"]
    return {
        "adapted_from": {
            "path": str(base_path),
            "sha256": fit["loaded"].sha256,
            "arch": fit["loaded"].spec.arch,
        },
        "archive": archive,
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "method": f"the head fine-tuned on the archive's header labels, {options.folds}-fold cross-fitted "
        "by study; label issues by confident learning (cleanlab)",
        "options": options.key(),
        "sources": len({c.source for c in chosen}),
        "studies": len({c.study for c in chosen}),
        "series": len({c.series for c in chosen}),
        "decode_failures": len(fit["failures"]),
    }


def _save(fit: dict[str, Any], out: Path, training: dict[str, Any]) -> tuple[Path, str, Any]:
    from sorter.adaptation import core
    from sorter.adaptation.card import model_card
    from sorter.model.artefact import save_artefact

    spec = core.adapted_spec(fit["loaded"].spec, fit["result"], training, fit["metrics"])
    path = out / "model.pt"
    sha = save_artefact(core.adapted_network(fit["loaded"].network, fit["result"]), spec, path)
    (out / "MODEL_CARD.md").write_text(model_card(spec))
    return path, sha, spec


def _print_fit(fit: dict[str, Any]) -> None:
    m = fit["metrics"]["cross_fitted"]
    click.echo(
        f"sampled {m['n']} instances ({len(fit['failures'])} failed to decode); "
        f"cross-fitted accuracy against the headers {m['accuracy']:.3f} "
        f"(balanced {m['balanced_accuracy']:.3f}); "
        f"{m['label_issues']} label issues flagged"
    )
    for label, row in m["per_label"].items():
        click.echo(
            f"  {label}: {row['n']} sampled, accuracy {row['accuracy']:.3f}, {row['label_issues']} issues"
        )


def _adapt_database(
    sessions: Any,
    url: str | None,
    out: Path,
    model: Path | None,
    options: Any,
    workers: int | None,
    device: str | None,
    restart: bool,
    progress: bool | None,
) -> Path:
    from dataclasses import replace

    from sqlalchemy.engine import make_url

    from sorter import reports
    from sorter.adaptation import store
    from sorter.config import Settings

    base_path = _base_model(sessions, model)

    def candidates() -> Any:
        with sessions() as session:
            return store.candidates(session)

    fit = _fit(out, base_path, candidates, options, workers, device, restart, progress)
    archive = make_url(Settings.from_env(database_url=url).database_url).render_as_string()
    path, sha, spec = _save(fit, out, _training(fit, base_path, archive, options))
    _print_fit(fit)
    base_spec = fit["loaded"].spec
    oof_spec = replace(spec, training={**spec.training, "out_of_fold": True})
    with sessions() as session:
        model_ids = store.register_models(
            session, (fit["loaded"].sha256, str(base_path), base_spec), (sha, str(path), spec), oof_spec
        )
        adaptation_id = store.write_adaptation(
            session,
            ids=fit["ids"],
            headers=[c.header_label for c in fit["chosen"]],
            probs=fit["result"].oof_probs,
            folds=fit["folds"],
            issues=fit["result"].issues,
            spec=spec,
            model_ids=model_ids,
            work_dir=str(out),
            parameters=options.key(),
            summary=fit["metrics"]["cross_fitted"],
        )
        session.commit()
        top = list(reports.label_issues(session, "series", 10, by="joint_score"))
    click.echo(f"adaptation {adaptation_id}: adapted model {path} ({sha[:12]}), registered, not active")
    if top:
        click.echo(
            "\nseries to review first, both models doubting their header most"
            " (adapted_series.joint_score; `sorter discrepancies --by joint`):"
        )
        write_rows(top, reports.LABEL_ISSUE_FIELDS["series"], "table")
    click.echo(
        f"\nnext: `sorter reclassify --model {path}` classifies the rest of the archive with it, "
        # By sha256: every adaptation writes a model.pt, so the file name soon names several.
        f"`sorter models use {sha[:12]}` makes its verdicts the ones the views show",
        err=True,
    )
    return path


def _adapt_manifest(
    manifest: Path,
    out: Path,
    model: Path | None,
    options: Any,
    workers: int | None,
    device: str | None,
    restart: bool,
    progress: bool | None,
) -> None:
    from sorter.adaptation.sample import Candidate
    from sorter.model.artefact import DEFAULT_MODEL_PATH

    try:
        from train.manifest import read_manifest
    except ImportError as exc:  # the [train] extra
        raise click.ClickException(
            f"--manifest needs the training extra: pip install 'dicom-sorter[train]' ({exc})"
        ) from exc
    rows = read_manifest(manifest)

    def candidates() -> Any:
        pool = [Candidate(i, r.label.value, r.source, r.group, r.group) for i, r in enumerate(rows)]
        return pool, {i: str(r.path) for i, r in enumerate(rows)}

    base_path = model or DEFAULT_MODEL_PATH
    fit = _fit(out, base_path, candidates, options, workers, device, restart, progress)
    path, sha, _spec = _save(fit, out, _training(fit, base_path, str(manifest), options))
    _print_fit(fit)
    result, labels = fit["result"], fit["labels"]
    order = np.argsort(-result.issues.score, kind="stable")
    report = out / "label_issues.csv"
    with open(report, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "path",
                "label",
                "source",
                "group",
                "fold",
                "oof_label",
                "self_confidence",
                "label_issue_score",
                "is_label_issue",
            ]
        )
        for n in order.tolist():
            c = fit["chosen"][n]
            writer.writerow(
                [
                    fit["plan"].paths[c.instance_id],
                    c.header_label,
                    c.source,
                    c.study,
                    int(fit["folds"][n]),
                    labels[int(result.oof_probs[n].argmax())],
                    f"{result.issues.self_confidence[n]:.6f}",
                    f"{result.issues.score[n]:.6f}",
                    int(result.issues.is_issue[n]),
                ]
            )
    (out / "summary.json").write_text(json.dumps(fit["metrics"], indent=2))
    click.echo(f"adapted model {path} ({sha[:12]}); label issues ranked in {report}")
