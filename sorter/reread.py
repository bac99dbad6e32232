"""Read classified instances' headers again: ``sorter reclassify --reread-headers``.

What a scan stores of a header (its label, SOP class, radionuclide ...) is read once, when the
file is registered, and a rescan skips unchanged files. A release that reads headers differently
(a CT localizer's label, the radionuclide column of migration 0011) therefore changes nothing
stored until the file changes. This reads the headers (never the pixels) of the instances asked
for, stores what changed, and returns their ids, so that they are classified again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from sorter.db import queries
from sorter.db.queries import HEADER_COLUMNS, instances
from sorter.dicom.headers import read_header
from sorter.domain import Status
from sorter.errors import InputError
from sorter.ingest import from_header, instance_row
from sorter.jobs.executor import PAGE

log = logging.getLogger(__name__)


@dataclass
class Reread:
    """What :func:`reread_headers` did."""

    read: int = 0
    #: Instances whose stored header changed: to be classified again.
    changed: int = 0
    #: Files that cannot be read now (left as they were; ``sorter scan`` records why).
    unreadable: int = 0
    #: Files that now hold another instance (left to ``sorter scan``, which re-registers them).
    replaced: int = 0


def reread_headers(
    sessions: sessionmaker[Session],
    only: queries.InstanceFilter | None = None,
    on_changed: Callable[[list[int]], None] | None = None,
) -> Reread:
    """Read again the headers of the classified instances ``only`` keeps; store what changed.

    One transaction per page of instances (keyset pagination on ``id``); ``on_changed`` is told
    each page's changed ids after its commit, to classify them before the next page is read. An
    interrupted run keeps what it stored, and a rerun finds nothing more to change: only the
    page in flight may keep its old verdicts (``--predicted-before`` the first run's start
    redoes them).
    """
    result = Reread()
    after = 0
    columns = [instances.c[name] for name in HEADER_COLUMNS]
    while True:
        with sessions() as session:
            ids = queries.next_ids(session, after=after, limit=PAGE, statuses=[Status.DONE], only=only)
            if not ids:
                return result
            after = ids[-1]
            stmt = sa.select(instances.c.id, instances.c.path, instances.c.sop_instance_uid, *columns).where(
                instances.c.id.in_(ids)
            )
            updates = []
            for row in session.execute(stmt).all():
                result.read += 1
                try:
                    header = read_header(row.path)
                except InputError as exc:
                    log.info("cannot read the header of %s again: %s", row.path, exc.reason)
                    result.unreadable += 1
                    continue
                fresh = instance_row(from_header(header))
                if fresh["sop_instance_uid"] != row.sop_instance_uid:
                    result.replaced += 1
                    continue
                if any(fresh[name] != getattr(row, name) for name in HEADER_COLUMNS):
                    updates.append({"b_id": row.id, **{name: fresh[name] for name in HEADER_COLUMNS}})
                    result.changed += 1
            if updates:
                stmt_update = (
                    sa.update(instances)
                    .where(instances.c.id == sa.bindparam("b_id"))
                    .values(updated_at=sa.func.now())
                )
                session.execute(stmt_update, updates)
            session.commit()
        if on_changed is not None and updates:
            on_changed([update["b_id"] for update in updates])
