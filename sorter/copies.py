"""An instance whose file fails is read from another copy of it, when the ledger knows one.

Copies of one instance at several paths are one row, read from the first path seen
(:mod:`sorter.ingest`). When that file turns out to be truncated, corrupt or in a transfer syntax
no codec here reads, while a copy elsewhere is whole (an interrupted transfer beside a complete
one, one image stored in several encodings), the instance used to stay ``failed`` for good: the
copy was an unchanged duplicate to every later scan. Now the instance moves to the next copy and
is classified again, and the bad file gets a failure row of its own (under a UID derived from its
path, as a file without a usable UID gets), so that ``sorter failures`` still names it.

Each copy is tried once: the bad file's ledger entry points at its own row from then on, so the
instance never comes back to it, and an unchanged re-scan reads neither file. Whatever the
number of copies, the failures of a batch cost one query, and a few more statements when a copy
is found.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from sorter.db import queries
from sorter.dicom.headers import read_header
from sorter.domain import FailureReason, Outcome, Status
from sorter.errors import InputError
from sorter.fspath import display_path
from sorter.ingest import failure, instance_row, other_series

log = logging.getLogger(__name__)


def read_other_copies(session: Session, failed: Sequence[Outcome]) -> dict[int, Outcome | None]:
    """Move each failed instance that has a readable copy elsewhere to that copy, ``pending``.

    Parameters
    ----------
    session
        The caller's session, whose transaction claimed the instances; the caller commits, then
        submits the moved instances again.
    failed
        The batch's outcomes that are not ``done``; the ``failed`` ones are looked at.

    Returns
    -------
    dict
        For each moved instance, the failure to report instead of its own: the bad file's row, or
        ``None`` when that file is gone (a vanished file needs no row).
    """
    by_id = {o.instance_id: o for o in failed if o.status is Status.FAILED}
    chosen: dict[int, queries.Copy] = {}
    for copy in queries.other_copies(session, list(by_id)):
        if copy.instance_id not in chosen and _readable_copy(copy):
            chosen[copy.instance_id] = copy
    if not chosen:
        return {}
    bad: dict[str, tuple[Outcome, queries.Copy]] = {}
    for instance_id, copy in chosen.items():
        outcome = by_id[instance_id]
        if outcome.error != FailureReason.VANISHED and os.path.lexists(copy.at):
            bad[copy.at] = (outcome, copy)
    rows = [_bad_file_row(outcome, copy) for outcome, copy in bad.values()]
    queries.insert_instances(session, rows)
    own = queries.instances_by_uid(session, {row["sop_instance_uid"] for row in rows})
    row_of = {row["path"]: own[row["sop_instance_uid"]].id for row in rows}
    # The row may be older (the path once held a file without a UID): it takes this failure.
    queries.mark_finished(
        session,
        [{"b_id": row_of[row["path"]], **{k: row[k] for k in ("status", "error", "detail")}} for row in rows],
    )
    queries.link_files(session, {copy.at: row_of.get(copy.at) for copy in chosen.values()})
    queries.read_from(session, {instance_id: copy.path for instance_id, copy in chosen.items()})
    reported: dict[int, Outcome | None] = {}
    for instance_id, copy in chosen.items():
        outcome = by_id[instance_id]
        log.info(
            "instance %s: %s at %s; reading its copy at %s",
            copy.sop_instance_uid,
            outcome.error,
            display_path(copy.at),
            display_path(copy.path),
        )
        row_id = row_of.get(copy.at)
        reported[instance_id] = (
            None
            if row_id is None
            else Outcome(row_id, Status.FAILED, None, error=outcome.error, detail=outcome.detail)
        )
    return reported


def _readable_copy(copy: queries.Copy) -> bool:
    """A copy worth trying: a file (or a link to one) that is not the failed file itself, and
    still holds the instance (its header is read: one read per failed instance with a copy)."""
    if not os.path.isfile(copy.path):
        return False
    try:
        if os.path.samefile(copy.path, copy.at):
            return False
    except OSError:  # the failed file is gone
        pass
    try:
        header = read_header(copy.path)
    except InputError:
        return False
    # Changed since, or another image under the same UID (another series): not a copy of this one.
    return header.sop_instance_uid == copy.sop_instance_uid and not other_series(
        copy.series_instance_uid, header.series_instance_uid
    )


def _bad_file_row(outcome: Outcome, copy: queries.Copy) -> dict[str, Any]:
    """The failure row of a file whose instance is now read from another copy."""
    note = f"its instance {copy.sop_instance_uid} is read from a copy, {display_path(copy.path)}"
    detail = f"{outcome.detail}; {note}" if outcome.detail else note
    registration = failure(
        copy.at,
        outcome.error or FailureReason.DECODE_ERROR,
        detail,
        source=copy.source,
        calling_ae=copy.calling_ae,
    )
    return instance_row(registration)
