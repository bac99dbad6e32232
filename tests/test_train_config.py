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
    ],
)
def test_sorter_train_says_what_is_wrong_in_one_line(
    tmp_path: Path, command: list[str], message: str
) -> None:
    """A model that is no model, a manifest whose files are all missing: one ``Error:`` line and
    status 1 (both were tracebacks, the second from deep inside the sampler)."""
    (tmp_path / "junk.pt").write_bytes(b"junk")
    (tmp_path / "m.csv").write_text("path,label,source,group\nmissing.dcm,CT,s,g\n")
    values = {"junk": str(tmp_path / "junk.pt"), "tmp": str(tmp_path), "manifest": str(tmp_path / "m.csv")}
    result = CliRunner().invoke(main, [part.format(**values) for part in command])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
