"""Tables of the results store (ARCHITECTURE §6).

``instances`` holds one row per SOP Instance UID and its life-cycle status;
``predictions`` one row per (instance, model); ``models`` one row per model
artefact; ``files`` is the scan ledger (path, size, mtime) that lets a re-scan
skip unchanged files with one indexed lookup per batch.

Enums are stored by value in VARCHAR columns with CHECK constraints (no native
PostgreSQL enum types: adding a label must not need an ``ALTER TYPE``), and
every constraint and index is named by the conventions below so that
migrations can refer to them on every database.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sorter.domain import Label, Status, Verdict
from sorter.fspath import decode_path, encode_path, readable

#: Alembic's recommended conventions (alembic ``naming.rst``).
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Probability columns of ``predictions``, one per label of the taxonomy.
PROBABILITY_COLUMNS: dict[Label, str] = {label: f"p_{label.value.lower()}" for label in Label}

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets BIGINT
# because an archive can outgrow 2**31 instances over the years.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class FsPath(sa.types.TypeDecorator[str]):
    """A file-system path in a TEXT column, stored by :func:`sorter.fspath.encode_path`.

    Names that are not valid UTF-8 cannot go into a text column as they are;
    this keeps every path the code handles a plain ``os`` path and every stored
    value valid text. Comparisons bind through it too (``path IN (...)``);
    prefix matches must go through :func:`sorter.db.queries.path_under`, since
    an escaped path changes its prefix.
    """

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: sa.Dialect) -> str | None:
        """The stored form of a path."""
        return None if value is None else encode_path(value)

    def process_result_value(self, value: str | None, dialect: sa.Dialect) -> str | None:
        """The path a stored value stands for."""
        return None if value is None else decode_path(value)


class _Readable(sa.types.TypeDecorator[str]):
    """Free text (a failure's detail, a source name) that may quote an undecodable file name.

    Such bytes are written as ``\\xe9`` (:func:`sorter.fspath.readable`): the text
    is for people, and a lone surrogate would fail the whole batch's statement.
    """

    impl: type[sa.types.TypeEngine[str]] = sa.Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: sa.Dialect) -> str | None:
        """``value`` with undecodable bytes escaped."""
        return None if value is None else readable(value)


class ReadableText(_Readable):
    """Free text in a ``TEXT`` column (see :class:`_Readable`)."""

    impl = sa.Text
    cache_ok = True


class ReadableString(_Readable):
    """Free text in a ``VARCHAR(n)`` column (see :class:`_Readable`)."""

    impl = sa.String
    cache_ok = True


def enum_by_value(enum_class: type[enum.Enum], name: str) -> sa.Enum:
    """A VARCHAR column type storing ``enum_class`` members by value, with a named CHECK."""
    return sa.Enum(
        enum_class,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        validate_strings=True,
        values_callable=lambda members: [member.value for member in members],
    )


class Base(DeclarativeBase):
    """Declarative base whose MetaData carries the naming conventions."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class Model(Base):
    """A model artefact that produced predictions, identified by its file sha256."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(sa.String(64), unique=True)
    arch: Mapped[str] = mapped_column(sa.String(64))
    labels: Mapped[str] = mapped_column(sa.String(64))  # comma-separated, in output order
    min_confidence: Mapped[float] = mapped_column(sa.Float)
    min_margin: Mapped[float] = mapped_column(sa.Float)
    path: Mapped[str | None] = mapped_column(sa.Text)
    spec: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())
    # Stamped by `sorter models use` (and for the first model a database sees): the latest is the
    # active model, whose predictions the views show (migration 0006).
    activated_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    # None for a model that classifies; ``out_of_fold`` for the cross-fitted predictions of an
    # adaptation (``sorter adapt``): a row so that they are stored as predictions, never activated
    # (migration 0009).
    role: Mapped[str | None] = mapped_column(sa.String(16))


class ModelThreshold(Base):
    """The header test's operating point of one model for headers of one label
    (:class:`sorter.model.spec.Thresholds`); older models have no rows."""

    __tablename__ = "model_thresholds"

    model_id: Mapped[int] = mapped_column(
        sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True
    )
    label: Mapped[Label] = mapped_column(enum_by_value(Label, "label"), primary_key=True)
    agree_at: Mapped[float] = mapped_column(sa.Float)
    disagree_at: Mapped[float] = mapped_column(sa.Float)


class Instance(Base):
    """One DICOM instance (or one unreadable file, under a UID derived from its path)."""

    __tablename__ = "instances"
    __table_args__ = (
        sa.Index("ix_instances_status_id", "status", "id"),
        sa.Index("ix_instances_series_instance_uid", "series_instance_uid"),
        sa.Index("ix_instances_study_instance_uid", "study_instance_uid"),
        sa.Index("ix_instances_prediction_id", "prediction_id"),
        sa.Index("ix_instances_source", "source"),
        # What changed since the review queue's last refresh (sorter.review.state, migration 0008).
        sa.Index("ix_instances_updated_at", "updated_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(sa.String(64), unique=True)
    study_instance_uid: Mapped[str | None] = mapped_column(sa.String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(sa.String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(sa.String(64))
    header_modality: Mapped[str | None] = mapped_column(sa.String(16))
    header_label: Mapped[Label | None] = mapped_column(enum_by_value(Label, "header_label"))
    # The radionuclide's code value (migration 0011; sorter.nuclides).
    radionuclide: Mapped[str | None] = mapped_column(sa.String(64))
    transfer_syntax_uid: Mapped[str | None] = mapped_column(sa.String(64))
    rows: Mapped[int | None] = mapped_column(sa.Integer)
    columns: Mapped[int | None] = mapped_column(sa.Integer)
    number_of_frames: Mapped[int | None] = mapped_column(sa.Integer)
    institution_name: Mapped[str | None] = mapped_column(sa.String(128))
    station_name: Mapped[str | None] = mapped_column(sa.String(64))
    calling_ae: Mapped[str | None] = mapped_column(sa.String(16))
    source: Mapped[str | None] = mapped_column(ReadableString(255))
    path: Mapped[str] = mapped_column(FsPath)
    status: Mapped[Status] = mapped_column(
        enum_by_value(Status, "status"), server_default=Status.PENDING.value
    )
    error: Mapped[str | None] = mapped_column(sa.String(64))  # a stable reason, e.g. "truncated"
    detail: Mapped[str | None] = mapped_column(ReadableText)
    # Queue tasks that took this instance (committed before each try, so a try that
    # hangs or kills its process still counts); bounds the retries of a poison file.
    attempts: Mapped[int] = mapped_column(sa.Integer, server_default=sa.text("0"))
    # The prediction the views show: the active model's when it has one, else the latest
    # (sorter.db.queries.mark_done, sorter.db.catalogue). Deliberately not a foreign
    # key: predictions reference instances, and a cycle would make both table
    # creation and SQLite's batch migrations awkward for no integrity gain
    # (predictions are only ever deleted together with their instance).
    prediction_id: Mapped[int | None] = mapped_column(BigId)
    registered_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())
    updated_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())


class Prediction(Base):
    """What one model saw in one instance; kept per model, re-runs replace the row."""

    __tablename__ = "predictions"
    __table_args__ = (
        sa.UniqueConstraint("instance_id", "model_id", name="uq_predictions_instance_id_model_id"),
        sa.Index("ix_predictions_model_id", "model_id"),
        sa.Index("ix_predictions_verdict_confidence", "verdict", "confidence"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    instance_id: Mapped[int] = mapped_column(BigId, sa.ForeignKey("instances.id", ondelete="CASCADE"))
    model_id: Mapped[int] = mapped_column(sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"))
    label: Mapped[Label] = mapped_column(enum_by_value(Label, "label"))
    confidence: Mapped[float] = mapped_column(sa.Float)
    second_label: Mapped[Label] = mapped_column(enum_by_value(Label, "second_label"))
    second_confidence: Mapped[float] = mapped_column(sa.Float)
    verdict: Mapped[Verdict] = mapped_column(enum_by_value(Verdict, "verdict"))
    # One column per taxonomy label (NULL where the model lacks the label), so that
    # series-level aggregation is a plain AVG in SQL on every database.
    p_ct: Mapped[float | None] = mapped_column(sa.Float)
    p_mr: Mapped[float | None] = mapped_column(sa.Float)
    p_pt: Mapped[float | None] = mapped_column(sa.Float)
    p_nm: Mapped[float | None] = mapped_column(sa.Float)
    p_xr: Mapped[float | None] = mapped_column(sa.Float)
    p_mg: Mapped[float | None] = mapped_column(sa.Float)
    p_us: Mapped[float | None] = mapped_column(sa.Float)
    p_ot: Mapped[float | None] = mapped_column(sa.Float)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())


class File(Base):
    """The scan ledger: a path seen by a scan, with the size, mtime, ctime and mode it had then."""

    __tablename__ = "files"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    path: Mapped[str] = mapped_column(FsPath, unique=True)
    size: Mapped[int | None] = mapped_column(sa.BigInteger)
    mtime_ns: Mapped[int | None] = mapped_column(sa.BigInteger)
    instance_id: Mapped[int | None] = mapped_column(
        BigId, sa.ForeignKey("instances.id", ondelete="SET NULL"), index=True
    )
    # chmod/chown change these, not the mtime: a failure they fix is retried (migration 0005).
    ctime_ns: Mapped[int | None] = mapped_column(sa.BigInteger)
    mode: Mapped[int | None] = mapped_column(sa.Integer)
    seen_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())


class RuleAction(Base):
    """What one rule's action did for one instance (``sorter/rules``): the ledger that keeps a re-run
    or a retry from acting twice. ``done`` is final; ``failed`` is tried again by the next run (a
    forward once ``next_attempt_at`` has passed); ``pending`` is a queued forward; ``dead`` a forward
    that failed :data:`sorter.rules.forward.MAX_ATTEMPTS` times."""

    __tablename__ = "rule_actions"
    __table_args__ = (
        sa.UniqueConstraint("instance_id", "rule", "action", name="uq_rule_actions_once"),
        sa.Index("ix_rule_actions_due", "action", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    instance_id: Mapped[int] = mapped_column(BigId, sa.ForeignKey("instances.id", ondelete="CASCADE"))
    rule: Mapped[str] = mapped_column(sa.String(64))
    action: Mapped[str] = mapped_column(sa.String(16))
    status: Mapped[str] = mapped_column(sa.String(16))  # pending | sending | done | failed | dead
    target: Mapped[str | None] = mapped_column(FsPath)
    error: Mapped[str | None] = mapped_column(sa.String(64))
    detail: Mapped[str | None] = mapped_column(ReadableText)
    attempts: Mapped[int] = mapped_column(sa.Integer, server_default=sa.text("0"))
    next_attempt_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    claim: Mapped[str | None] = mapped_column(sa.String(32))  # the sender holding a ``sending`` row
    updated_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())


class Review(Base):
    """A person's decision on a discrepancy (``sorter serve``), one row per decision (migration 0008).

    ``confirm``: the header is wrong and ``label`` is the truth; ``reject``: the header is right
    (``label`` is the header's); ``skip``. A later decision on the same ``(level, uid)`` clears
    ``is_current`` on the earlier one, which stays as the audit trail. ``shown_*`` and
    ``model_id`` record the prediction the reviewer was shown.
    """

    __tablename__ = "reviews"
    __table_args__ = (
        sa.CheckConstraint("level IN ('instance', 'series')", name="level"),
        sa.CheckConstraint("decision IN ('confirm', 'reject', 'skip')", name="decision"),
        sa.Index(
            "uq_reviews_current",
            "level",
            "uid",
            unique=True,
            postgresql_where=sa.text("is_current"),
            sqlite_where=sa.text("is_current"),
        ),
        # The views' joins: SQLite does not match `is_current = TRUE` to the partial index.
        sa.Index("ix_reviews_level_uid", "level", "uid"),
        sa.Index("ix_reviews_study_instance_uid", "study_instance_uid"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    level: Mapped[str] = mapped_column(sa.String(16))
    uid: Mapped[str] = mapped_column(sa.String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(sa.String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(sa.String(64))
    decision: Mapped[str] = mapped_column(sa.String(16))
    label: Mapped[Label | None] = mapped_column(enum_by_value(Label, "label"))
    header_label: Mapped[str | None] = mapped_column(sa.String(16))
    model_id: Mapped[int | None] = mapped_column(sa.Integer, sa.ForeignKey("models.id", ondelete="SET NULL"))
    shown_label: Mapped[str | None] = mapped_column(sa.String(16))
    shown_confidence: Mapped[float | None] = mapped_column(sa.Float)
    shown_verdict: Mapped[str | None] = mapped_column(sa.String(16))
    reviewer: Mapped[str] = mapped_column(sa.String(128))
    note: Mapped[str | None] = mapped_column(ReadableText)
    via: Mapped[str | None] = mapped_column(sa.String(16))  # "study" when a study decision wrote it
    is_current: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.true())
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())


class SeriesState(Base):
    """The review queue's summary of one series: the series view's row for the active model when
    it was computed (:mod:`sorter.review.state` keeps it current; migration 0008)."""

    __tablename__ = "series_state"
    __table_args__ = (
        sa.Index("ix_series_state_verdict_series", "verdict", "series_instance_uid"),
        sa.Index("ix_series_state_verdict_study", "verdict", "study_instance_uid"),
    )

    series_instance_uid: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    study_instance_uid: Mapped[str | None] = mapped_column(sa.String(64))
    source: Mapped[str | None] = mapped_column(sa.String(255))
    station_name: Mapped[str | None] = mapped_column(sa.String(64))
    header_modality: Mapped[str | None] = mapped_column(sa.String(16))
    header_label: Mapped[str | None] = mapped_column(sa.String(16))
    label: Mapped[str | None] = mapped_column(sa.String(16))
    confidence: Mapped[float | None] = mapped_column(sa.Float)
    second_confidence: Mapped[float | None] = mapped_column(sa.Float)
    n_instances: Mapped[int] = mapped_column(sa.Integer)
    n_disagree: Mapped[int] = mapped_column(sa.Integer)
    n_uncertain: Mapped[int] = mapped_column(sa.Integer)
    verdict: Mapped[str | None] = mapped_column(sa.String(16))
    model_id: Mapped[int | None] = mapped_column(sa.Integer)
    computed_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))


class Adaptation(Base):
    """One ``sorter adapt`` run on this archive (migration 0009): the model it started from, the
    out-of-fold pseudo-model its cross-fitted predictions are stored under, and the adapted model."""

    __tablename__ = "adaptations"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(16))  # "done": written whole in one transaction
    base_model_id: Mapped[int | None] = mapped_column(
        sa.Integer, sa.ForeignKey("models.id", ondelete="SET NULL")
    )
    oof_model_id: Mapped[int | None] = mapped_column(
        sa.Integer, sa.ForeignKey("models.id", ondelete="SET NULL")
    )
    adapted_model_id: Mapped[int | None] = mapped_column(
        sa.Integer, sa.ForeignKey("models.id", ondelete="SET NULL")
    )
    work_dir: Mapped[str | None] = mapped_column(FsPath)
    parameters: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    summary: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())
    finished_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))


class LabelIssue(Base):
    """Confident learning's judgement of one sampled instance's header label in one adaptation:
    ``self_confidence`` is the out-of-fold probability of the header's label, ``score`` is
    ``1 - self_confidence`` (higher: the rest of the archive contradicts the header more), and
    ``is_issue`` whether cleanlab's per-class thresholds flag it (migration 0009)."""

    __tablename__ = "label_issues"
    __table_args__ = (
        sa.UniqueConstraint("adaptation_id", "instance_id", name="uq_label_issues_adaptation_instance"),
        sa.Index("ix_label_issues_instance_id", "instance_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    adaptation_id: Mapped[int] = mapped_column(
        sa.Integer, sa.ForeignKey("adaptations.id", ondelete="CASCADE")
    )
    instance_id: Mapped[int] = mapped_column(BigId, sa.ForeignKey("instances.id", ondelete="CASCADE"))
    fold: Mapped[int] = mapped_column(sa.Integer)
    given_label: Mapped[str] = mapped_column(sa.String(16))
    self_confidence: Mapped[float] = mapped_column(sa.Float)
    score: Mapped[float] = mapped_column(sa.Float)
    is_issue: Mapped[bool] = mapped_column(sa.Boolean)
