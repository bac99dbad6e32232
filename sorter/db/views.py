"""The SQL views (created by migration 0001) as selectable tables for queries.

They are lightweight ``table()`` constructs outside ``Base.metadata`` so that
Alembic's autogenerate never mistakes them for tables to create.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa

from sorter.db.models import PROBABILITY_COLUMNS

_P = tuple(PROBABILITY_COLUMNS.values())  # p_ct ... p_ot, in label order
#: A review's state (migration 0008): the current decision, the label it stands for, and when.
_REVIEW = ("review_decision", "review_label", "reviewed_at")
_INSTANCE = (
    "instance_id",
    "sop_instance_uid",
    "series_instance_uid",
    "study_instance_uid",
    "sop_class_uid",
    "header_modality",
    "header_label",
    "source",
    "institution_name",
    "station_name",
    "calling_ae",
    "path",
    "status",
    "prediction_id",
    "label",
    "confidence",
    "second_label",
    "second_confidence",
    "verdict",
    *_P,
    "model_id",
    "model_sha256",
    "min_confidence",
    "min_margin",
    "agree_at",
    "disagree_at",
    "predicted_at",
    *_REVIEW,
)
_SERIES = (
    "series_instance_uid",
    "study_instance_uid",
    "source",
    "institution_name",
    "station_name",
    "header_modality",
    "header_label",
    "n_header_labels",
    "label",
    "confidence",
    "second_confidence",
    "n_instances",
    "n_disagree",
    "n_uncertain",
    "verdict",
    *_P,
    *_REVIEW,
)
_STUDY = (
    "study_instance_uid",
    "source",
    "header_labels",
    "labels",
    "n_series",
    "n_instances",
    "n_series_disagree",
    "n_series_uncertain",
    "n_instances_disagree",
    "n_series_reviewed",
    "n_series_confirmed",
    "n_series_rejected",
    "verdict",
)


def _view(name: str, columns: tuple[str, ...]) -> sa.TableClause:
    return sa.table(name, *(sa.column(c) for c in columns))


#: Every classified instance with the prediction it shows: the active model's when it has one,
#: else the latest (see :mod:`sorter.db.catalogue`).
latest_predictions = _view("latest_predictions", _INSTANCE)
#: Instance level: the shown prediction disagrees with the header.
discrepancies = _view("discrepancies", _INSTANCE)
#: Series level: mean probabilities, their argmax and the series verdict.
series_summary = _view("series_summary", _SERIES)
series_discrepancies = _view("series_discrepancies", _SERIES)
#: Study level: labels seen in the header and in the pixels, verdict counts.
study_summary = _view("study_summary", _STUDY)

SERIES_COLUMNS = _SERIES
STUDY_COLUMNS = _STUDY
INSTANCE_COLUMNS = _INSTANCE

#: The latest finished adaptation (``sorter adapt``, migration 0009), beside the generic model.
ADAPTED_INSTANCE_COLUMNS = (
    "instance_id",
    "sop_instance_uid",
    "series_instance_uid",
    "study_instance_uid",
    "source",
    "institution_name",
    "station_name",
    "calling_ae",
    "header_modality",
    "header_label",
    "adaptation_id",
    "generic_label",
    "generic_confidence",
    "generic_verdict",
    # migration 0014: what the generic series verdict's mean arm reads
    "generic_p_evidence",
    "generic_agree_at",
    "generic_disagree_at",
    "adapted_label",
    "adapted_confidence",
    "adapted_verdict",
    "adapted_by",
    "fold",
    "self_confidence",
    "label_issue_score",
    "is_label_issue",
    # migration 0015: both models' doubt of the header, in one ranking
    "adapted_p_header",
    "joint_score",
)
ADAPTED_SERIES_COLUMNS = (
    "series_instance_uid",
    "study_instance_uid",
    "source",
    "station_name",
    "calling_ae",
    "header_label",
    "adaptation_id",
    "n_instances",
    "n_generic_disagree",
    "n_adapted_disagree",
    "generic_verdict",
    "adapted_verdict",
    "n_scored",
    "n_label_issues",
    "label_issue_score",
    "max_label_issue_score",
    "is_label_issue",
    "joint_score",
)
ADAPTED_STUDY_COLUMNS = (
    "study_instance_uid",
    "source",
    "adaptation_id",
    "n_series",
    "n_instances",
    "n_series_generic_disagree",
    "n_series_adapted_disagree",
    "n_series_label_issues",
    "label_issue_score",
    "joint_score",
)
adapted_instances = _view("adapted_instances", ADAPTED_INSTANCE_COLUMNS)
adapted_series = _view("adapted_series", ADAPTED_SERIES_COLUMNS)
adapted_studies = _view("adapted_studies", ADAPTED_STUDY_COLUMNS)


#: A study's verdict from its series' verdicts, most telling first: the ``study_summary`` view's
#: CASE (migrations 0001 and 0008), which :func:`study_verdict` follows.
_STUDY_VERDICT_ORDER = ("disagree", "uncertain", "agree", "no_header")


def study_verdict(series_verdicts: Iterable[str | None]) -> str:
    """The verdict ``study_summary`` gives a study whose series have ``series_verdicts``: for
    the rules' facts and the report, which would otherwise compute both views over the archive."""
    present = set(series_verdicts)
    return next((v for v in _STUDY_VERDICT_ORDER if v in present), "unsupported")
