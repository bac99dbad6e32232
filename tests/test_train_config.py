"""A fit configuration file's values are checked against each key's type when it is read."""

from __future__ import annotations

from pathlib import Path

import pytest

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
