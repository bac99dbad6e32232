"""A fit configuration file's values are checked against each key's type when it is read; the
commands' other input errors are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from train.cli import main
from train.config import resolve_config


def _resolve(tmp_path: Path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return resolve_config("default", path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs: two\n", "epochs must be int, not 'two'"),
        ("probe_epochs: 1.5\n", "probe_epochs must be int, not 1.5"),
        ("lr: fast\n", "lr must be float, not 'fast'"),
        ("pretrained: 1\n", "pretrained must be bool, not 1"),
        ("epochs: true\n", "epochs must be int, not True"),
        ("channels: scaled\n", "channels must be a list, not 'scaled'"),
        ("teacher: 3\n", "teacher must be str or null, not 3"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_by_name(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _resolve(tmp_path, text)


def test_values_of_the_right_type_are_kept(tmp_path: Path) -> None:
    config = _resolve(
        tmp_path, "lr: 1e-3\nweight_decay: 0\nteacher: null\nlimit_per_label: 5\nlabels: [CT, MR]\n"
    )
    # PyYAML reads 1e-3 (no dot) as a string; a float key takes it as the number it means.
    assert config.lr == pytest.approx(1e-3) and isinstance(config.lr, float)
    assert config.weight_decay == 0 and config.teacher is None and config.limit_per_label == 5
    assert config.labels == ("CT", "MR")


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["graph", "{junk}"], "not a readable dicom-sorter model"),
        (["export", "--model", "{junk}", "--out", "{tmp}/x.pt"], "not a readable dicom-sorter model"),
        (["fit", "--manifest", "{manifest}", "--out", "{tmp}/run"], "missing.dcm: unreadable"),
        (
            ["fit", "--manifest", "{empty}", "--out", "{tmp}/run"],
            "empty.csv lists no images (a header line only)",
        ),
        (["loso", "--manifest", "{empty}", "--out", "{tmp}/run"], "empty.csv lists no images"),
        (["manifest", "{tmp}/tree", "--out", "{tmp}/new.csv"], "no DICOM image with a Modality under"),
        (
            ["manifest", "{tmp}/tree", "--out", "{tmp}/new.csv", "--limit-per-series", "0"],
            "0 is not in the range x>=1",
        ),
        (
            ["evaluate", "--manifest", "{manifest}", "--out", "{tmp}/ev", "--workers", "-1"],
            "-1 is not in the range",
        ),
    ],
)
def test_sorter_train_says_what_is_wrong_in_one_line(
    tmp_path: Path, command: list[str], message: str
) -> None:
    """A model that is no model, a manifest whose files are all missing or that lists nothing, a
    tree with no DICOM image, a count below its least: one ``Error:`` line and status 1 or 2
    (each was a traceback, several from deep inside the sampler, or an empty manifest written)."""
    (tmp_path / "junk.pt").write_bytes(b"junk")
    (tmp_path / "m.csv").write_text("path,label,source,group\nmissing.dcm,CT,s,g\n")
    (tmp_path / "empty.csv").write_text("path,label,source,group\n")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # nothing a manifest can list
    values = {
        "junk": str(tmp_path / "junk.pt"),
        "tmp": str(tmp_path),
        "manifest": str(tmp_path / "m.csv"),
        "empty": str(tmp_path / "empty.csv"),
    }
    result = CliRunner().invoke(main, [part.format(**values) for part in command])
    assert result.exit_code in (1, 2), result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not (tmp_path / "new.csv").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs: 0\n", r"epochs must be at least 1 \(or probe_epochs, for the head alone\), not 0"),
        ("epochs: -1\n", "epochs must be at least 0, not -1"),
        ("batch_size: 0\n", "batch_size must be at least 1, not 0"),
        ("limit_per_label: 0\n", "limit_per_label must be at least 1, not 0"),
        ("lr: 0\n", "lr must be above 0, not 0"),
        ("label_smoothing: 1\n", r"label_smoothing must be in \[0, 1\), not 1"),
        ("source_balance: 1.5\n", r"source_balance must be in \[0, 1\], not 1.5"),
        ("mixup: -0.2\n", "mixup is a Beta distribution's alpha: -0.2 is negative"),
        ("epochs: [1\n", r"config.yaml line 2: not valid YAML \(expected ',' or ']'"),
        ("- epochs\n- 2\n", r"expected keys and values \(epochs: 6\), not a list"),
    ],
)
def test_a_value_no_run_can_use_is_refused_before_training(tmp_path: Path, text: str, message: str) -> None:
    """``epochs: -1`` trained nothing and saved the untrained network as a model; a YAML syntax
    error was a parser traceback; a zero batch failed deep in the sampler."""
    with pytest.raises(ValueError, match=message):
        _resolve(tmp_path, text)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--folds", "1"], "--folds must be 0 (one fold per source) or at least 2, not 1"),
        (["--folds", "-3"], "--folds must be 0 (one fold per source) or at least 2, not -3"),
        (
            ["--folds", "5", "--only-fold", "2", "--only-fold", "9"],
            "--only-fold 9: this run has folds 0 to 4",
        ),
        (["--epochs", "0"], "epochs must be at least 1 (or probe_epochs, for the head alone), not 0"),
    ],
)
def test_loso_refuses_folds_it_cannot_train_before_decoding(
    tmp_path: Path, options: list[str], message: str
) -> None:
    """One fold left nothing to train on (a traceback from the sampler after every image was
    decoded); a fold number past the last trained nothing and failed in calibration."""
    rows = [
        f"{label}/{source}.dcm,{label},{source},{source}" for label in ("CT", "MR") for source in "abcdef"
    ]
    (tmp_path / "m.csv").write_text("path,label,source,group\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["loso", "--manifest", str(tmp_path / "m.csv"), "--out", str(out), *options]
    )
    assert result.exit_code in (1, 2), result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not out.exists()  # refused before anything was written or decoded
