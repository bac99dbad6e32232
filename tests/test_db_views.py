"""The result views on both databases: instance, series and study verdicts from known probabilities."""

from __future__ import annotations

import pytest
from db_support import query, synthetic_results

pytest_plugins = ["db_fixtures"]


def test_series_verdicts_follow_the_mean_probabilities(db_url):
    uids = synthetic_results(db_url)
    rows = {r.series_instance_uid: r for r in query(db_url, "SELECT * FROM series_summary")}
    by_name = {name: rows[uid] for name, uid in uids.items() if uid in rows}

    assert (by_name["mr_as_ct"].header_label, by_name["mr_as_ct"].label) == ("MR", "CT")
    assert by_name["mr_as_ct"].verdict == "disagree"
    assert by_name["mr_as_ct"].confidence == pytest.approx(0.96)
    assert by_name["mr_as_ct"].second_confidence == pytest.approx(0.03)
    assert (by_name["mr_as_ct"].n_instances, by_name["mr_as_ct"].n_disagree) == (3, 3)
    assert by_name["ct_ok"].verdict == "agree"
    assert by_name["ct_unsure"].verdict == "uncertain"  # top-2 margin 0.01 < 0.2
    assert by_name["no_header"].verdict == "no_header"
    assert by_name["mg_unknown"].verdict == "unsupported"
    assert by_name["mg_unknown"].p_mg is None and by_name["mg_unknown"].p_ct == pytest.approx(0.9)

    discrepant = [r.series_instance_uid for r in query(db_url, "SELECT * FROM series_discrepancies")]
    assert discrepant == [uids["mr_as_ct"]]


def test_instance_and_study_views(db_url):
    uids = synthetic_results(db_url)
    instances = query(db_url, "SELECT series_instance_uid, header_label, label, verdict FROM discrepancies")
    assert [tuple(r) for r in instances] == [(uids["mr_as_ct"], "MR", "CT", "disagree")] * 3

    studies = {r.study_instance_uid: r for r in query(db_url, "SELECT * FROM study_summary")}
    bad, good = studies[uids["study_bad"]], studies[uids["study_good"]]
    assert bad.verdict == "disagree" and bad.n_series == 2 and bad.n_series_disagree == 1
    assert bad.n_instances == 6 and bad.n_instances_disagree == 3
    assert set(bad.header_labels.split(",")) == {"CT", "MR"} and bad.labels == "CT"
    assert good.verdict == "uncertain" and good.n_series_disagree == 0


def test_the_latest_prediction_wins_per_instance(db_url):
    synthetic_results(db_url)
    assert query(db_url, "SELECT count(*) FROM latest_predictions")[0][0] == 18
    assert query(db_url, "SELECT count(DISTINCT model_sha256) FROM latest_predictions")[0][0] == 1
