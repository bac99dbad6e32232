"""A real (tiny) training run on the corpus, then evaluate, loso, calibrate and export through the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sorter.model.artefact import DEFAULT_MODEL_PATH, load_artefact
from train.cli import main

pytestmark = [pytest.mark.corpus, pytest.mark.slow]

METRIC_KEYS = {"n", "accuracy", "balanced_accuracy", "per_class", "per_source", "confusion", "ece"}


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def fitted(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    cache = tmp_path_factory.mktemp("cache")
    _run(
        [
            "fit",
            "--manifest",
            str(corpus / "manifest.csv"),
            "--out",
            str(out),
            "--dry-run",
            "--val-fraction",
            "0.3",
            "--cache-dir",
            str(cache),
            "--workers",
            "1",
        ]
    )
    return out, cache


def test_fit_writes_artefact_curves_and_resolved_config(fitted):
    out, _ = fitted
    for name in ("model.pt", "config.yaml", "history.json", "curves.png", "val-metrics.json"):
        assert (out / name).stat().st_size > 0, name
    loaded = load_artefact(out / "model.pt")
    assert loaded.spec.preprocess.input_size == 64
    assert loaded.spec.training["images_per_label"]
    assert "validation" in loaded.spec.metrics
    assert not (out / "checkpoint.pt").exists()


def test_fit_refuses_to_overwrite_a_finished_run(fitted, corpus):
    out, cache = fitted
    before = (out / "model.pt").stat().st_mtime_ns
    args = ["fit", "--manifest", str(corpus / "manifest.csv"), "--out", str(out), "--dry-run"]
    result = CliRunner().invoke(main, [*args, "--cache-dir", str(cache)])
    assert result.exit_code == 2 and "already holds a finished run" in result.output
    assert (out / "model.pt").stat().st_mtime_ns == before


def test_evaluate_writes_complete_metrics(fitted, corpus, tmp_path):
    out, cache = fitted
    # Every 25th row (all labels, several sources, decoded in seconds), paths made absolute
    # because manifest paths are relative to the manifest's folder.
    lines = (corpus / "manifest.csv").read_text().splitlines()
    rows = [lines[0]] + [f"{corpus / r.split(',', 1)[0]},{r.split(',', 1)[1]}" for r in lines[1::25]]
    subset = tmp_path / "manifest.csv"
    subset.write_text("\n".join(rows) + "\n")
    report = tmp_path / "eval"
    _run(
        [
            "evaluate",
            "--manifest",
            str(subset),
            "--model",
            str(out / "model.pt"),
            "--out",
            str(report),
            "--cache-dir",
            str(cache),
            "--workers",
            "1",
        ]
    )
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS
    assert metrics["n"] >= 25
    assert set(metrics["per_class"]) >= {"CT", "MR", "XR"}
    for row in metrics["per_class"].values():
        assert {"precision", "recall", "f1", "auroc", "support"} <= set(row)
    assert len(metrics["confusion"]["matrix"]) == len(metrics["confusion"]["labels"])
    assert 0 <= metrics["ece"] <= 1
    assert (report / "confusion.png").stat().st_size > 0


def test_loso_then_export_calibrated_artefact(fitted, corpus, tmp_path):
    out, cache = fitted
    loso = tmp_path / "loso"
    _run(
        [
            "loso",
            "--manifest",
            str(corpus / "manifest.csv"),
            "--out",
            str(loso),
            "--dry-run",
            "--folds",
            "3",
            "--only-fold",
            "0",
            "--only-fold",
            "1",
            "--cache-dir",
            str(cache),
            "--workers",
            "1",
        ]
    )
    metrics = json.loads((loso / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS and metrics["folds_evaluated"] == [0, 1]
    assert load_artefact(loso / "fold-0" / "model.pt").spec.preprocess.input_size == 64
    folds = json.loads((loso / "folds.json").read_text())
    held = {s for s, f in folds.items() if f in (0, 1)}
    assert set(metrics["per_source"]) <= held  # only held-out sources were predicted
    card = tmp_path / "card.md"
    exported = tmp_path / "model.pt"
    said = _run(
        [
            "export",
            "--model",
            str(out / "model.pt"),
            "--loso",
            str(loso),
            "--out",
            str(exported),
            "--card",
            str(card),
        ]
    )
    # A one-epoch network is worse on unseen sources than the bundled model, and export says so.
    assert "is below the bundled model's" in said
    assert card.read_text().startswith("# Model card: model.pt (sha256 ")
    # Two folds: the thresholds are also judged on the fold they were not chosen on, and shipped
    # with the factor that held the budget there.
    point = load_artefact(exported).spec.metrics["operating_point"]
    assert 0.0 <= point["shrink"] <= 1.0 and set(point["cross_fitted"]["shrink_per_fold"]) == {"0", "1"}
    assert "on folds the thresholds never saw (cross-fitted)" in said
    assert "| per image, cross-fitted |" in card.read_text()
    # A folder that is not a finished loso run is refused in one line.
    wrong = CliRunner().invoke(main, ["operating-point", str(out)])
    assert wrong.exit_code == 2 and "is not a finished `sorter-train loso` run" in wrong.output
    # An artefact or card is never overwritten by accident.
    again = ["export", "--model", str(out / "model.pt"), "--out", str(exported), "--card", str(card)]
    refused = CliRunner().invoke(main, again)
    assert refused.exit_code == 2 and "pass --force" in refused.output
    _run([*again, "--loso", str(loso), "--force"])
    loaded = load_artefact(exported)
    assert loaded.spec.temperature == pytest.approx(metrics["temperature"])
    assert loaded.spec.metrics["leave_sources_out"]["n"] == metrics["n"]
    assert "Accuracy on unseen sources" in card.read_text()
    # The verdict's operating point comes from the same out-of-fold predictions.
    point = loaded.spec.metrics["operating_point"]
    assert loaded.spec.thresholds.header_test
    assert (
        loaded.spec.thresholds.agree_at,
        loaded.spec.thresholds.disagree_at,
        loaded.spec.thresholds.emission_agree_at,
    ) == (point["agree_at"], point["disagree_at"], point["emission_agree_at"])
    assert point["n"] == metrics["n"] and "Operating point" in card.read_text()


def test_a_student_learns_from_the_teacher_of_its_own_fold(fitted, corpus, tmp_path):
    """Distillation under leave-sources-out: fold N's student learns from fold N's teacher."""
    _, cache = fitted
    common = ["--manifest", str(corpus / "manifest.csv"), "--dry-run", "--folds", "3", "--only-fold", "1"]
    common += ["--cache-dir", str(cache), "--workers", "1"]
    _run(["loso", *common, "--out", str(tmp_path / "teacher")])
    student = tmp_path / "student.yaml"
    student.write_text(f"teacher: {tmp_path / 'teacher'}\nshift_augment: 1.0\ndistill_weight: 0.7\n")
    _run(["loso", *common, "--out", str(tmp_path / "student"), "--config", str(student)])
    metrics = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert metrics["folds_evaluated"] == [1]
    # Another seed deals other folds: that teacher's networks saw the student's held-out sources.
    result = CliRunner().invoke(
        main, ["loso", *common, "--out", str(tmp_path / "other"), "--config", str(student), "--seed", "7"]
    )
    assert result.exit_code != 0 and "dealt other folds" in str(result.exception)


def test_cascade_of_two_loso_runs_then_export_serves_one_graph(fitted, corpus, tmp_path):
    """``cascade`` joins two artefacts on their loso runs' evidence; ``export`` calibrates the result,
    and the classifier serves it from one ONNX graph as torch runs it."""
    import numpy as np
    import torch

    from sorter.model.classifier import Classifier
    from sorter.model.network import CascadeNet

    out, cache = fitted
    common = ["--manifest", str(corpus / "manifest.csv"), "--dry-run", "--folds", "3", "--only-fold", "2"]
    common += ["--cache-dir", str(cache), "--workers", "1"]
    _run(["loso", *common, "--out", str(tmp_path / "main")])
    _run(["loso", *common, "--out", str(tmp_path / "screen"), "--lr", "0.01"])
    joined = tmp_path / "cascade.pt"
    args = [
        "cascade",
        "--model",
        str(out / "model.pt"),
        "--screen",
        str(tmp_path / "main" / "fold-2" / "model.pt"),
    ]
    args += ["--loso", str(tmp_path / "main"), "--screen-loso", str(tmp_path / "screen")]
    said = _run([*args, "--out-run", str(tmp_path / "run"), "--out", str(joined)])
    assert "| out of fold | to main network |" in said and "next: sorter-train export" in said
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    thresholds = metrics["cascade"]["thresholds"]
    assert all(0.0 < t <= 1.0 for t in thresholds.values()) and 0.0 <= metrics["cascade"]["to_main"] <= 1.0
    assert "screen thresholds cross-fitted" in metrics["protocol"]
    exported = tmp_path / "exported.pt"
    card = tmp_path / "card.md"
    _run(
        [
            "export",
            "--model",
            str(joined),
            "--loso",
            str(tmp_path / "run"),
            "--out",
            str(exported),
            "--card",
            str(card),
        ]
    )
    loaded = load_artefact(exported)
    assert isinstance(loaded.network, CascadeNet) and loaded.spec.screen is not None
    assert loaded.spec.screen.thresholds == thresholds
    assert loaded.spec.temperature == pytest.approx(metrics["temperature"])
    assert "- Screen: a `mobilenet_v3_small` answers first" in card.read_text()
    # The compare command reads the cascade's run like any other.
    _run(["compare", str(tmp_path / "main"), str(tmp_path / "run")])
    # Served from the ONNX graph written beside the artefact: the same probabilities as torch,
    # except where the screen's confidence sits on its threshold (a one-epoch screen's all do
    # nearly: there the two runtimes' last bits may route a frame either way).
    classifier = Classifier.load(exported, device="cpu", runtime="onnx", threads=1)
    gen = torch.Generator().manual_seed(0)
    images, features = torch.rand(64, 2, 64, 64, generator=gen), torch.rand(64, 1, generator=gen)
    with torch.no_grad():
        expected = classifier.calibrate(loaded.network(images, features).numpy())
        screen = torch.softmax(
            loaded.network.screen(images, features) / loaded.spec.screen.temperature, dim=1
        )
    confidence, label = screen.max(dim=1)
    clear = (confidence - loaded.network.thresholds[label]).abs().numpy() > 1e-5
    assert clear.any()
    got = classifier.predict_arrays(images.numpy(), features.numpy())
    np.testing.assert_allclose(got[clear], expected[clear], atol=1e-4)
    # The same two runs as an ensemble: one fold, so the weight is chosen on its own images, and said so.
    args = [
        "ensemble",
        "--model",
        str(out / "model.pt"),
        "--partner",
        str(tmp_path / "main" / "fold-2" / "model.pt"),
    ]
    args += ["--loso", str(tmp_path / "main"), "--partner-loso", str(tmp_path / "screen")]
    said = _run([*args, "--out-run", str(tmp_path / "ens-run"), "--out", str(tmp_path / "ens.pt")])
    assert "| ensemble |" in said
    written = json.loads((tmp_path / "ens-run" / "metrics.json").read_text())
    assert "partner weight chosen on these same images (one fold)" in written["protocol"]
    found = written["ensemble"]
    assert (
        0.0 < found["weight"] < 1.0
        and load_artefact(tmp_path / "ens.pt").spec.partner.weight == found["weight"]
    )
    # Exported with a confirming partner: chosen on the run, written into the spec and the card.
    confirmed, card = tmp_path / "confirmed.pt", tmp_path / "confirmed.md"
    export = ["export", "--model", str(tmp_path / "ens.pt"), "--loso", str(tmp_path / "ens-run")]
    said = _run([*export, "--confirm", "--out", str(confirmed), "--card", str(card)])
    assert "the partner confirms" in said and "right headers agree" in said
    spec = load_artefact(confirmed).spec
    point = spec.metrics["operating_point"]["confirm"]
    assert spec.confirms and spec.partner.confirm == point["confirm_at"] and point["tolerance"] == 0.01
    assert (
        "- Confirming partner:" in card.read_text()
        and "with the confirming partner, per image" in card.read_text()
    )
    classifier = Classifier.load(confirmed, device="cpu", runtime="onnx", threads=1)
    assert classifier.predict_arrays(images.numpy(), features.numpy()).shape == (64, len(spec.labels))
    # Only an ensemble's partner confirms: one line, no traceback.
    refused = CliRunner().invoke(
        main, ["export", "--model", str(joined), "--confirm", "--out", str(tmp_path / "x.pt")]
    )
    assert refused.exit_code == 2 and "needs an ensemble" in refused.output
    # A joined artefact is not joined again: one line, no traceback.
    again = ["ensemble", "--model", str(tmp_path / "ens.pt"), *args[3:], "--out-run", str(tmp_path / "r2")]
    refused = CliRunner().invoke(main, [*again, "--out", str(tmp_path / "no.pt")])
    assert refused.exit_code == 2 and "already has a screen or partner" in refused.output


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("arch: nonsense\n", "Error: unknown architecture 'nonsense'"),
        (
            "arch: efficientnet_lite3\npretrained: true\n",
            "Error: no pretrained weights for 'efficientnet_lite3'",
        ),
        ("labels: [CT, XX]\n", "Error: 'XX' is not a valid Label"),
        ("colour: 1\n", "unknown keys ['colour']"),
    ],
)
def test_a_bad_config_is_one_line_not_a_traceback(tmp_path, config, message):
    """Checked before anything is written or read (the manifest's one file does not exist)."""
    path = tmp_path / "bad.yaml"
    path.write_text(config)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,source,group\nmissing.dcm,CT,s,g\n")
    for command in ("fit", "loso"):
        args = [command, "--manifest", str(manifest), "--out", str(tmp_path / command)]
        result = CliRunner().invoke(main, [*args, "--config", str(path)])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not (tmp_path / command).exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "missing required column(s) ['path', 'label', 'source', 'group']"),
        ("path,label,source,group\na.dcm,XX,s,g\n", "unknown label"),
        ("path,label,source,group\n\xff\xfe\n", "can't decode"),
    ],
)
def test_a_bad_manifest_is_one_line_not_a_traceback(tmp_path, text, message):
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(text.encode("latin-1"))
    for command in ("fit", "loso", "evaluate"):
        args = [command, "--manifest", str(manifest), "--out", str(tmp_path / command)]
        if command == "evaluate":
            args += ["--model", str(DEFAULT_MODEL_PATH)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert "Invalid value for '--manifest'" in result.output and message in result.output
        assert "Traceback" not in result.output and not (tmp_path / command).exists()
