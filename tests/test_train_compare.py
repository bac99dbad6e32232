"""``sorter-train compare``: runs are compared on the folds they all evaluated, and only runs dealt
the same folds can be compared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from train.cli import main
from train.compare import compare_runs, compare_sources, comparison_markdown

LABELS = ["CT", "MR"]


def _run(folder: Path, folds: list[int], right: float, seed: int = 0) -> Path:
    """A loso run's outputs: 8 images per fold, ``right`` of them predicted right (confidently)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    n = 8 * len(folds)
    labels = np.array(["CT", "MR"] * (n // 2))
    truth = np.array([LABELS.index(label) for label in labels])
    hit = rng.random(n) < right
    predicted = np.where(hit, truth, 1 - truth)
    logits = np.full((n, 2), -3.0)
    logits[np.arange(n), predicted] = 3.0
    np.savez(
        folder / "oof.npz",
        logits=logits,
        labels=labels,
        sources=np.array([f"s{i % 4}" for i in range(n)]),
        folds=np.repeat(folds, 8),
        temperature=1.0,
    )
    config = {"manifest": "m.csv", "folds": 5, "seed": seed, "labels": LABELS, "arch": folder.name}
    config |= {"channels": ["scaled", "hu"], "input_size": 128, "scaling": "percentile"}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.json").write_text("{}")
    return folder


def test_runs_are_compared_on_the_folds_every_run_evaluated(tmp_path):
    good = _run(tmp_path / "good", [0, 1, 2], right=1.0)
    poor = _run(tmp_path / "poor", [1, 2, 3], right=0.5)
    common, rows = compare_runs([good, poor])
    assert common == [1, 2]
    assert [r["n"] for r in rows] == [16, 16]
    assert rows[0]["accuracy"] == 1.0 and rows[0]["balanced_accuracy"] == 1.0
    assert rows[1]["accuracy"] < 1.0
    table = comparison_markdown(common, rows, {"good@2x128x128": 500.0})
    assert "| good: good (percentile) | 2x128x128 | 500.0 | 1.000 | 1.000 |" in table
    assert "Same source-disjoint folds [1, 2] (16 held-out images)" in table
    # The header test as export ships it, judged on the folds its thresholds were not chosen on.
    assert all(r["operating_point"]["cross_fitted"] for r in rows)
    assert "cross-fitted (each fold judged by thresholds chosen on the other folds)" in table


def test_one_common_fold_reports_the_header_test_in_sample(tmp_path):
    first = _run(tmp_path / "first", [0, 1], right=0.75)
    second = _run(tmp_path / "second", [1, 2], right=0.75)
    common, rows = compare_runs([first, second])
    assert common == [1] and not any(r["operating_point"]["cross_fitted"] for r in rows)
    table = comparison_markdown(common, rows, {})
    assert "in-sample (chosen and scored on the same images: one fold)" in table


def test_runs_dealt_other_folds_are_refused(tmp_path):
    first = _run(tmp_path / "a", [0, 1], right=1.0, seed=0)
    other = _run(tmp_path / "b", [0, 1], right=1.0, seed=7)
    with pytest.raises(ValueError, match="hold out different sources in each fold"):
        compare_runs([first, other])
    # The command says so in one line (exit 2), naming each run's seed, never with a traceback.
    result = CliRunner().invoke(main, ["compare", str(first), str(other)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert f"{other}: manifest m.csv, --folds 5, --seed 7" in result.output
    assert "compare runs of the same manifest, --folds and --seed" in result.output


def test_a_folder_that_is_not_a_finished_run_is_refused(tmp_path):
    """A fit's folder, or a loso run still going, has no out-of-fold predictions to compare."""
    first = _run(tmp_path / "a", [0, 1], right=1.0)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("{}")
    result = CliRunner().invoke(main, ["compare", str(first), str(unfinished)])
    assert result.exit_code == 2, result.output
    assert "is not a finished `sorter-train loso` run (no metrics.json, oof.npz)" in result.output


def test_a_runs_configuration_reads_back_as_it_was_resolved(tmp_path):
    """The benchmarks that rerun a loso run's fold networks read its config.yaml back."""
    from train.config import load_run_config, resolve_config, save_config

    recipe = Path(__file__).resolve().parents[1] / "train/recipes/pretrained.yaml"
    config = resolve_config("default", recipe, seed=3, features=())
    save_config(config, tmp_path / "config.yaml", manifest="../shared/corpus/manifest.csv", folds=5)
    assert load_run_config(tmp_path) == (config, Path("../shared/corpus/manifest.csv"))


def test_by_source_lists_what_each_run_said_per_held_out_source(tmp_path):
    good = _run(tmp_path / "good", [0, 1], right=1.0)
    poor = _run(tmp_path / "poor", [0, 1], right=0.5)
    common, rows = compare_sources([good, poor])
    assert common == [0, 1]
    # s0 and s2 hold the CT images, s1 and s3 the MR ones (the fixture alternates them).
    keys = [(r["label"], r["source"]) for r in rows]
    assert keys == [("CT", "s0"), ("CT", "s2"), ("MR", "s1"), ("MR", "s3")]
    assert all(r["runs"][0] == {"right": 4, "n": 4, "instead": {}} for r in rows)
    poor_cells = [r["runs"][1] for r in rows]
    assert sum(c["right"] for c in poor_cells) == round(compare_runs([poor])[1][0]["accuracy"] * 16)
    for row, cell in zip(rows, poor_cells, strict=True):
        other = "MR" if row["label"] == "CT" else "CT"
        assert cell["instead"] == ({other: cell["n"] - cell["right"]} if cell["right"] < cell["n"] else {})
    result = CliRunner().invoke(main, ["compare", "--by-source", str(good), str(poor)])
    assert result.exit_code == 0, result.output
    assert "| label | source | good | poor |" in result.output
    erring = [r for r, c in zip(rows, poor_cells, strict=True) if c["right"] < c["n"]]
    assert erring  # the fixture's poor run errs somewhere
    for row in rows:
        cell = row["runs"][1]
        line = f"| {row['label']} | {row['source']} | 4/4 | {cell['right']}/4"
        assert (line in result.output) == (row in erring)  # only the sources where a run errs


def test_benchmarks_refuse_a_folder_that_is_not_a_finished_run_in_one_line(tmp_path):
    """The benchmarks that read loso runs take them through one argparse type: no traceback."""
    import argparse

    from train.runs import loso_run_argument

    finished = _run(tmp_path / "a", [0, 1], right=1.0)
    assert loso_run_argument(str(finished)) == finished
    with pytest.raises(argparse.ArgumentTypeError, match=r"no such folder"):
        loso_run_argument(str(tmp_path / "absent"))
    (tmp_path / "fit").mkdir()
    (tmp_path / "fit" / "config.yaml").write_text("{}")
    with pytest.raises(
        argparse.ArgumentTypeError,
        match=r"not a finished `sorter-train loso` run \(no metrics.json, oof.npz\)",
    ):
        loso_run_argument(str(tmp_path / "fit"))
