"""Set-based reads and writes on the hot path: every helper handles a whole batch.

The caller owns the session and the transaction; nothing here commits.
Statements are dialect-aware only where the SQL differs (``INSERT ... ON
CONFLICT`` comes from the PostgreSQL or SQLite dialect, ``FOR NO KEY UPDATE
SKIP LOCKED`` compiles to nothing on SQLite).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, overload

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from sorter.compare import witnesses_of
from sorter.db.models import Base
from sorter.domain import Claimed, FailureReason, Label, Status, Verdict
from sorter.fspath import encode_path, stored_prefixes

instances = Base.metadata.tables["instances"]
files = Base.metadata.tables["files"]
predictions = Base.metadata.tables["predictions"]
models = Base.metadata.tables["models"]
model_thresholds = Base.metadata.tables["model_thresholds"]


@overload
def as_utc(value: datetime) -> datetime: ...
@overload
def as_utc(value: None) -> None: ...
def as_utc(value: datetime | None) -> datetime | None:
    """A timestamp read from the database, timezone-aware: SQLite returns naive UTC."""
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def pending_backlog(session: Session) -> tuple[int, datetime | None]:
    """How many instances are ``pending``, and when the oldest of them was registered (aware)."""
    count, oldest = session.execute(
        sa.select(sa.func.count(), sa.func.min(instances.c.registered_at)).where(
            instances.c.status == Status.PENDING
        )
    ).one()
    return int(count), as_utc(oldest)


def db_time(session: Session, value: datetime) -> datetime:
    """``value`` as the database compares it: naive UTC on SQLite (stored as text)."""
    return value.replace(tzinfo=None) if session.get_bind().dialect.name == "sqlite" else value


T = TypeVar("T")

#: Most values one query tests (:func:`query_groups`): `sorter scan` of 11 000 files named on
#: the command line stopped at SQLite's "Expression tree is too large (maximum depth 1000)".
GROUP_SIZE = 400


def query_groups(values: Sequence[T]) -> list[Sequence[T]]:
    """``values`` (paths for :func:`path_under`, UIDs or ids for an ``IN``) in groups one query can take;
    ``[()]``, one empty group, for none (no paths: "anywhere"). Callers query once per group."""
    if not values:
        return [()]
    return [values[i : i + GROUP_SIZE] for i in range(0, len(values), GROUP_SIZE)]


def path_scope(paths: Iterable[str]) -> list[str]:
    """Command-line PATHs as :func:`path_under` takes them, as the scan stores paths (absolute,
    links kept): a folder ends with the separator (``/a/b`` is not ``/a/bc``), a file is itself,
    and a path that is no longer there (a share unmounted, a folder moved away) is both."""
    scope = []
    for given in paths:
        path = os.path.abspath(given)
        folder = path.rstrip(os.sep) + os.sep
        if os.path.isdir(path):
            scope.append(folder)
        elif os.path.lexists(path):
            scope.append(path)
        else:
            scope += [path, folder]
    return scope


def path_under(column: sa.ColumnElement[str], paths: Iterable[str]) -> sa.ColumnElement[bool]:
    """``column`` (an :class:`~sorter.db.models.FsPath`) is under one of ``paths``: starts with
    each that ends with the separator (a folder), equals each other (a file: ``x.dcm`` named
    alone is not ``x.dcm.bak``).

    Compared as stored text: a path that had to be escaped is stored under
    another prefix (:func:`sorter.fspath.stored_prefixes`).
    """
    text, paths = sa.type_coerce(column, sa.Text), list(paths)
    folders = [p for p in paths if p.endswith(os.sep)]
    files = [encode_path(p) for p in paths if not p.endswith(os.sep)]
    forms = dict.fromkeys(form for prefix in folders for form in stored_prefixes(prefix))
    tests = [text.startswith(form, autoescape=True) for form in forms]
    if files:
        tests.append(text.in_(files))
    return sa.or_(*tests)


def insert_for(session: Session, table: sa.Table) -> Any:
    """An ``INSERT`` construct with ``on_conflict_*`` for the session's database."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"dicom-sorter supports PostgreSQL and SQLite, not {dialect}")


@dataclass(frozen=True)
class LedgerEntry:
    """What the scan ledger knows about one path."""

    size: int | None
    mtime_ns: int | None
    instance_id: int | None
    ctime_ns: int | None = None
    mode: int | None = None
    #: The linked instance's status and failure reason (``None`` without an instance).
    status: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class ExistingInstance:
    """The identifying columns of an instance row."""

    id: int
    sop_instance_uid: str
    path: str
    status: Status
    series_instance_uid: str | None = None


def ledger_lookup(session: Session, paths: Collection[str]) -> dict[str, LedgerEntry]:
    """Ledger entries for ``paths`` (absent paths are not in the result); one query."""
    if not paths:
        return {}
    rows = session.execute(
        sa.select(
            files.c.path,
            files.c.size,
            files.c.mtime_ns,
            files.c.instance_id,
            files.c.ctime_ns,
            files.c.mode,
            instances.c.status,
            instances.c.error,
        )
        .select_from(files.outerjoin(instances, instances.c.id == files.c.instance_id))
        .where(files.c.path.in_(list(paths)))
    )
    return {
        row.path: LedgerEntry(
            row.size,
            row.mtime_ns,
            row.instance_id,
            row.ctime_ns,
            row.mode,
            row.status.value if isinstance(row.status, Status) else row.status,
            row.error,
        )
        for row in rows
    }


def finished_files(session: Session, paths: Collection[str], statuses: Collection[str]) -> list[Any]:
    """Rows ``(path, id, at)`` of the ledger ``paths`` whose instance has one of ``statuses``.

    ``at`` is the path the instance row records (a duplicate copy's may differ); one query.
    """
    if not paths:
        return []
    return list(
        session.execute(
            sa.select(files.c.path, instances.c.id, instances.c.path.label("at"))
            .join(instances, instances.c.id == files.c.instance_id)
            .where(files.c.path.in_(list(paths)), instances.c.status.in_(list(statuses)))
        ).all()
    )


def instances_by_uid(session: Session, uids: Collection[str]) -> dict[str, ExistingInstance]:
    """Existing instance rows for ``uids``; one query."""
    if not uids:
        return {}
    rows = session.execute(
        sa.select(
            instances.c.id,
            instances.c.sop_instance_uid,
            instances.c.path,
            instances.c.status,
            instances.c.series_instance_uid,
        ).where(instances.c.sop_instance_uid.in_(list(uids)))
    )
    return {
        r.sop_instance_uid: ExistingInstance(
            r.id, r.sop_instance_uid, r.path, r.status, r.series_instance_uid
        )
        for r in rows
    }


def insert_instances(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert new instance rows; a UID inserted meanwhile by someone else is left as it is.

    ``ON CONFLICT DO NOTHING`` takes no row lock, so registering never waits
    for a worker that holds a claimed instance.
    """
    if rows:
        stmt = insert_for(session, instances).on_conflict_do_nothing(index_elements=["sop_instance_uid"])
        session.execute(stmt, list(rows))


#: The columns a header read fills (``sorter reclassify --reread-headers`` rewrites them alone).
HEADER_COLUMNS = (
    "study_instance_uid",
    "series_instance_uid",
    "sop_class_uid",
    "header_modality",
    "header_label",
    "radionuclide",
    "transfer_syntax_uid",
    "rows",
    "columns",
    "number_of_frames",
    "institution_name",
    "station_name",
)
#: Columns a re-read file may change; ``b_id`` selects the row.
_REREAD_COLUMNS = (*HEADER_COLUMNS, "calling_ae", "source", "path", "status", "error", "detail")


def reset_instances(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Overwrite re-read instances (header columns and status) by id, dropping their current prediction.

    Parameters
    ----------
    session
        The caller's session.
    rows
        Dicts with ``b_id`` and every name in ``_REREAD_COLUMNS``.
    """
    if not rows:
        return
    # Column keys in the parameter dicts become the SET clause (SQLAlchemy's
    # executemany UPDATE); the constant columns are added to every row.
    stmt = sa.update(instances).where(instances.c.id == sa.bindparam("b_id"))
    params = [
        {
            **{name: row[name] for name in _REREAD_COLUMNS},
            "b_id": row["b_id"],
            "prediction_id": None,
            "attempts": 0,
        }
        for row in rows
    ]
    session.execute(stmt.values(updated_at=sa.func.now()), params)


def move_instances(session: Session, moves: Mapping[int, str]) -> None:
    """Record new paths for instances whose file moved (old path gone, same SOP Instance UID)."""
    if moves:
        stmt = sa.update(instances).where(instances.c.id == sa.bindparam("b_id"))
        session.execute(stmt, [{"b_id": i, "path": p} for i, p in moves.items()])


def delete_instances(session: Session, ids: Collection[int]) -> None:
    """Delete instances (their predictions go with them; ledger entries are unlinked)."""
    if ids:
        session.execute(sa.delete(instances).where(instances.c.id.in_(list(ids))))


def upsert_files(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert or refresh ledger entries (``path, size, mtime_ns, ctime_ns, mode, instance_id``)."""
    if not rows:
        return
    stmt = insert_for(session, files)
    stmt = stmt.on_conflict_do_update(
        index_elements=["path"],
        set_={
            "size": stmt.excluded.size,
            "mtime_ns": stmt.excluded.mtime_ns,
            "ctime_ns": stmt.excluded.ctime_ns,
            "mode": stmt.excluded.mode,
            "instance_id": stmt.excluded.instance_id,
            "seen_at": sa.func.now(),
        },
    )
    session.execute(stmt, list(rows))


def model_id_for(
    session: Session, values: Mapping[str, Any], thresholds: Mapping[str, tuple[float, float]] | None = None
) -> int:
    """The id of the model row with ``values["sha256"]``, inserting it (and its header-test
    ``thresholds``, label -> (agree_at, disagree_at)) when new."""
    session.execute(
        insert_for(session, models).values(**values).on_conflict_do_nothing(index_elements=["sha256"])
    )
    model_id = int(
        session.execute(sa.select(models.c.id).where(models.c.sha256 == values["sha256"])).scalar_one()
    )
    if thresholds:
        rows = [
            {"model_id": model_id, "label": Label(label), "agree_at": high, "disagree_at": low}
            for label, (high, low) in thresholds.items()
        ]
        session.execute(
            insert_for(session, model_thresholds)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["model_id", "label"])
        )
    return model_id


def claim(
    session: Session, ids: Iterable[int], statuses: Collection[Status] = (Status.PENDING,)
) -> list[Claimed]:
    """Lock the instances of ``ids`` that are still in ``statuses`` and nobody else holds.

    On PostgreSQL the rows stay locked (``FOR NO KEY UPDATE SKIP LOCKED``) until
    the caller's transaction ends, so concurrent workers never classify the same
    instance, and a worker that dies releases its rows with its connection.
    ``NO KEY`` lets ledger rows keep referencing a locked instance meanwhile.
    SQLite has one writer and no row locks: the status re-check is the claim.
    """
    id_list = list(ids)
    if not id_list:
        return []
    stmt = (
        sa.select(
            instances.c.id,
            instances.c.path,
            instances.c.header_label,
            instances.c.status,
            instances.c.sop_instance_uid,
            instances.c.header_modality,
            instances.c.sop_class_uid,
            instances.c.radionuclide,
        )
        .where(instances.c.id.in_(id_list), instances.c.status.in_(list(statuses)))
        .order_by(instances.c.id)
        .with_for_update(skip_locked=True, key_share=True, of=instances)
    )
    return [
        Claimed(
            r.id,
            r.path,
            r.header_label,
            Status(r.status),
            r.sop_instance_uid,
            witnesses_of(r.header_modality, r.sop_class_uid, r.header_label, r.radionuclide),
        )
        for r in session.execute(stmt)
    ]


@dataclass(frozen=True)
class Attempts:
    """How :func:`take_attempts` sorted a queue batch."""

    fresh: list[int]  # never tried: counted, to be classified by this task
    retried: list[int]  # tried before and still pending: to be tried again one by one
    exhausted: list[int]  # tried ``max_attempts`` times: now failed


def take_attempts(session: Session, ids: Iterable[int], max_attempts: int) -> Attempts:
    """Count a queue task's try on the ``pending`` instances of ``ids`` that nobody holds.

    Instances tried ``max_attempts`` times already are failed (``attempts_exhausted``)
    instead. The caller commits before classifying, so that a try that hangs or
    kills its process still counts; rows another worker holds are skipped, as
    :func:`claim` would skip them.
    """
    id_list = list(ids)
    if not id_list:
        return Attempts([], [], [])
    rows = session.execute(
        sa.select(instances.c.id, instances.c.attempts)
        .where(instances.c.id.in_(id_list), instances.c.status == Status.PENDING)
        .order_by(instances.c.id)
        .with_for_update(skip_locked=True, key_share=True, of=instances)
    ).all()
    exhausted = [r.id for r in rows if r.attempts >= max_attempts]
    retried = [r.id for r in rows if 0 < r.attempts < max_attempts]
    fresh = [r.id for r in rows if r.attempts == 0]
    if len(rows) == 1:  # a batch of one is the isolated retry itself
        fresh, retried = fresh + retried, []
    if exhausted:
        session.execute(
            sa.update(instances)
            .where(instances.c.id.in_(exhausted))
            .values(
                status=Status.FAILED,
                error=FailureReason.ATTEMPTS_EXHAUSTED,
                detail=f"taken by {max_attempts} queue tasks that never finished (a decoder that hangs "
                "or kills its worker process)",
                updated_at=sa.func.now(),
            )
        )
    if fresh:
        session.execute(
            sa.update(instances)
            .where(instances.c.id.in_(fresh))
            .values(attempts=instances.c.attempts + 1, updated_at=sa.func.now())
        )
    return Attempts(fresh, retried, exhausted)


@dataclass(frozen=True)
class InstanceFilter:
    """Which instances a command works on; an empty field does not filter.

    ``labels`` and ``verdicts`` are those of the prediction the views show.
    """

    labels: Sequence[Label] = ()
    headers: Sequence[Label] = ()
    sources: Sequence[str] = ()
    verdicts: Sequence[Verdict] = ()
    under: Sequence[str] = ()

    def apply(self, stmt: sa.Select[Any]) -> sa.Select[Any]:
        """``stmt`` (a select over ``instances``) narrowed to the instances this filter keeps."""
        i = instances.c
        if self.headers:
            stmt = stmt.where(i.header_label.in_(list(self.headers)))
        if self.sources:
            stmt = stmt.where(i.source.in_(list(self.sources)))
        if self.under:
            stmt = stmt.where(path_under(i.path, self.under))
        if self.labels or self.verdicts:
            shown = sa.select(predictions.c.id).where(predictions.c.id == i.prediction_id)
            if self.labels:
                shown = shown.where(predictions.c.label.in_(list(self.labels)))
            if self.verdicts:
                shown = shown.where(predictions.c.verdict.in_(list(self.verdicts)))
            stmt = stmt.where(sa.exists(shown))
        return stmt


def next_ids(
    session: Session,
    *,
    after: int,
    limit: int,
    statuses: Collection[Status],
    under: Sequence[str] = (),
    without_model: int | None = None,
    predicted_before: datetime | None = None,
    only: InstanceFilter | None = None,
) -> list[int]:
    """A page of instance ids (keyset pagination on ``id``), for resuming and reclassifying.

    Parameters
    ----------
    session
        The caller's session.
    after
        Return ids greater than this.
    limit
        Page size.
    statuses
        Only instances in these statuses.
    under
        Only instances whose path starts with one of these folder prefixes.
    without_model
        Only instances without a prediction from this model id.
    predicted_before
        With ``without_model``: a prediction of that model made before this (aware) time counts
        as none, so it is made again (``reclassify --predicted-before``).
    only
        Further filters (``reclassify``'s options).
    """
    stmt = sa.select(instances.c.id).where(instances.c.id > after, instances.c.status.in_(list(statuses)))
    if only is not None:
        stmt = only.apply(stmt)
    if under:
        stmt = stmt.where(path_under(instances.c.path, under))
    if without_model is not None:
        made = predicted_by(without_model)
        if predicted_before is not None:
            made = made.where(predictions.c.created_at >= db_time(session, predicted_before))
        stmt = stmt.where(~sa.exists(made))
    return list(session.execute(stmt.order_by(instances.c.id).limit(limit)).scalars())


@dataclass(frozen=True)
class FailedInstance:
    """A failed instance's id, path and source (what a re-read needs)."""

    id: int
    path: str
    source: str | None


def failed_instances(session: Session, *, after: int, limit: int) -> list[FailedInstance]:
    """A page of ``failed`` instances (keyset pagination on ``id``)."""
    rows = session.execute(
        sa.select(instances.c.id, instances.c.path, instances.c.source)
        .where(instances.c.id > after, instances.c.status == Status.FAILED)
        .order_by(instances.c.id)
        .limit(limit)
    )
    return [FailedInstance(row.id, row.path, row.source) for row in rows]


def upsert_predictions(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write predictions; a re-run of the same model on an instance replaces its row."""
    if not rows:
        return
    stmt = insert_for(session, predictions)
    replace = {
        c.name: stmt.excluded[c.name]
        for c in predictions.columns
        if c.name not in ("id", "instance_id", "model_id")
    }
    replace["created_at"] = sa.func.now()
    session.execute(
        stmt.on_conflict_do_update(index_elements=["instance_id", "model_id"], set_=replace), list(rows)
    )


def active_model() -> sa.ScalarSelect[Any]:
    """The active model's id as a scalar subquery: the one ``sorter models use`` stamped last."""
    return (
        sa.select(models.c.id)
        .where(models.c.activated_at.is_not(None))
        .order_by(models.c.activated_at.desc(), models.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )


def predicted_by(model_id: Any) -> sa.Select[Any]:
    """The id of the current instance's prediction from ``model_id`` (a model id or a scalar
    subquery), correlated with ``instances``: ``.scalar_subquery()`` for the id, ``sa.exists()``
    for whether there is one."""
    return sa.select(predictions.c.id).where(
        predictions.c.instance_id == instances.c.id, predictions.c.model_id == model_id
    )


def mark_done(session: Session, ids: Collection[int], model_id: int) -> None:
    """Set ``done`` and point each instance at the prediction the views show: one statement.

    That is the active model's prediction when the instance has one, else this one from
    ``model_id``: classifying with another model (``reclassify --model``) stores its predictions
    without switching the views, which only ``sorter models use`` does.
    """
    if not ids:
        return
    shown = sa.func.coalesce(
        predicted_by(active_model()).scalar_subquery(), predicted_by(model_id).scalar_subquery()
    )
    session.execute(
        sa.update(instances)
        .where(instances.c.id.in_(list(ids)))
        .values(status=Status.DONE, error=None, detail=None, prediction_id=shown, updated_at=sa.func.now())
    )


def ledger_paths_of(session: Session, ids: Collection[int]) -> list[tuple[str, int]]:
    """``(path, instance id)`` of every ledger row that points at an instance of ``ids``."""
    if not ids:
        return []
    stmt = sa.select(files.c.path, files.c.instance_id).where(files.c.instance_id.in_(list(ids)))
    return [(str(row.path), int(row.instance_id)) for row in session.execute(stmt)]


@dataclass(frozen=True)
class Copy:
    """A ledger path that holds a copy of an instance read from another path (``at``)."""

    instance_id: int
    path: str
    at: str
    sop_instance_uid: str
    source: str | None
    calling_ae: str | None
    series_instance_uid: str | None = None


def other_copies(session: Session, ids: Collection[int]) -> list[Copy]:
    """The ledger's copies of the instances of ``ids`` at a path other than the one each is read
    from, first seen first; one query."""
    if not ids:
        return []
    stmt = (
        sa.select(
            files.c.instance_id,
            files.c.path,
            instances.c.path.label("at"),
            instances.c.sop_instance_uid,
            instances.c.source,
            instances.c.calling_ae,
            instances.c.series_instance_uid,
        )
        .join(instances, instances.c.id == files.c.instance_id)
        .where(files.c.instance_id.in_(list(ids)), files.c.path != instances.c.path)
        .order_by(files.c.id)
    )
    return [
        Copy(
            int(r.instance_id),
            str(r.path),
            str(r.at),
            r.sop_instance_uid,
            r.source,
            r.calling_ae,
            r.series_instance_uid,
        )
        for r in session.execute(stmt)
    ]


def read_from(session: Session, moves: Mapping[int, str]) -> None:
    """Instances to be read again from another path: moved there, ``pending``, reason cleared."""
    if moves:
        stmt = (
            sa.update(instances)
            .where(instances.c.id == sa.bindparam("b_id"))
            .values(status=Status.PENDING, error=None, detail=None, attempts=0, updated_at=sa.func.now())
        )
        session.execute(stmt, [{"b_id": i, "path": p} for i, p in moves.items()])


def link_files(session: Session, links: Mapping[str, int | None]) -> None:
    """Point the ledger entries of paths at other instances (``None``: forget the path)."""
    gone = [path for path, instance_id in links.items() if instance_id is None]
    if gone:
        session.execute(sa.delete(files).where(files.c.path.in_(gone)))
    kept = [{"b_path": path, "instance_id": i} for path, i in links.items() if i is not None]
    if kept:
        session.execute(sa.update(files).where(files.c.path == sa.bindparam("b_path")), kept)


def instance_paths(session: Session, ids: Collection[int]) -> dict[int, str]:
    """The stored path of each instance of ``ids`` that exists."""
    if not ids:
        return {}
    stmt = sa.select(instances.c.id, instances.c.path).where(instances.c.id.in_(list(ids)))
    return {int(row.id): str(row.path) for row in session.execute(stmt)}


def lose_instances(session: Session, ids: Collection[int], detail: str) -> None:
    """Instances whose file is gone: ``failed`` (``vanished``, with ``detail``) and shown by no
    view (their prediction rows stay, as a re-read instance's do)."""
    if ids:
        session.execute(
            sa.update(instances)
            .where(instances.c.id.in_(list(ids)))
            .values(
                status=Status.FAILED,
                error=FailureReason.VANISHED,
                detail=detail,
                prediction_id=None,
                updated_at=sa.func.now(),
            )
        )


def mark_finished(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Set a terminal status with its reason (``b_id, status, error, detail``) per instance; a
    ``failed`` or ``skipped`` instance shows no prediction."""
    if rows:
        stmt = (
            sa.update(instances)
            .where(instances.c.id == sa.bindparam("b_id"))
            .values(updated_at=sa.func.now(), prediction_id=None)
        )
        session.execute(stmt, [{k: row[k] for k in ("b_id", "status", "error", "detail")} for row in rows])


def stale_pending(session: Session, *, older_than: datetime, limit: int) -> list[int]:
    """Ids of instances ``pending`` since before ``older_than`` (oldest first), for the queue sweep."""
    stmt = (
        sa.select(instances.c.id)
        .where(instances.c.status == Status.PENDING, instances.c.updated_at < older_than)
        .order_by(instances.c.updated_at, instances.c.id)
        .limit(limit)
    )
    return list(session.execute(stmt).scalars())


def touch(session: Session, ids: Collection[int]) -> None:
    """Set ``updated_at`` to now, so that a sweep re-enqueues an instance at most once per period."""
    if ids:
        session.execute(
            sa.update(instances).where(instances.c.id.in_(list(ids))).values(updated_at=sa.func.now())
        )
