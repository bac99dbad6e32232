"""The ``forward`` action: C-STORE an instance to a DICOM destination, queued, retried, dead-lettered.

A matching rule queues the instance (``rule_actions`` status ``pending``); :func:`deliver` sends
what is due, one association per destination for all of it (a series goes over one association,
in series order), each file in the transfer syntax it is stored in, or decompressed to Explicit
VR Little Endian when the destination does not accept that compression. A destination that refuses
or is down leaves its items ``failed`` with the next try after an exponential backoff; after
:data:`MAX_ATTEMPTS` an item is ``dead`` (the dead letters ``sorter status`` counts) until
``sorter rules apply --retry-now`` gives it one more try.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config

from sorter.errors import ConfigError, describe
from sorter.listener import QuickAckSSLSocket, ack_now
from sorter.scu import c_store
from sorter.tls import client_context, load_identity

log = logging.getLogger(__name__)

#: Tries before an item is dead-lettered; with :data:`BACKOFF_S` doubling, the last waits ~2 h.
MAX_ATTEMPTS = 10
BACKOFF_S = 15.0
BACKOFF_MAX_S = 6 * 3600.0
#: Success, and the C-STORE warnings (coercion, elements discarded, data set mismatch): stored.
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
#: pynetdicom requests at most 128 presentation contexts per association.
MAX_CONTEXTS = 128


@dataclass(frozen=True)
class ForwardAction:
    """C-STORE to ``ae_title`` at ``host:port``, calling as ``calling_ae``."""

    ae_title: str
    host: str
    port: int
    calling_ae: str = "DICOM_SORTER"
    #: TLS (DICOM over TLS, PS3.15 B.1): the destination's certificate is checked against
    #: ``tls_ca`` (default: the system's CAs) and its host name; ``tls_cert`` and ``tls_key``
    #: are this side's certificate when the destination asks for one.
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    kind: str = "forward"
    how: str = "c-store"

    def tls_context(self) -> ssl.SSLContext | None:
        """The client TLS context, or ``None`` without TLS."""
        if not self.tls:
            return None
        context = client_context(self.tls_ca, name="tls_ca")
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.tls_cert:
            load_identity(context, self.tls_cert, self.tls_key, names=("tls_cert", "tls_key"))
        return context

    @property
    def to(self) -> str:
        """The destination, as messages and ``sorter rules check`` show it."""
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")

    def target(self, _facts: dict[str, Any]) -> str:
        """Where the instance goes (the same for every instance)."""
        return self.to


@dataclass(frozen=True)
class Item:
    """One queued C-STORE: the ledger row and the instance it sends."""

    row_id: int
    attempts: int
    path: str
    sop_instance_uid: str
    sop_class_uid: str | None
    transfer_syntax_uid: str | None
    series_instance_uid: str | None


@dataclass(frozen=True)
class Sent:
    """What became of one item: ``error`` is ``None`` once the destination has stored it."""

    item: Item
    error: str | None = None
    detail: str | None = None


def next_try(attempts: int, now: datetime | None = None) -> datetime:
    """When an item that has failed ``attempts`` times is tried again."""
    delay = min(BACKOFF_S * 2 ** max(0, attempts - 1), BACKOFF_MAX_S)
    return (now or datetime.now(UTC)) + timedelta(seconds=delay)


def _contexts(ae: AE, items: Iterable[Item]) -> None:
    syntaxes: dict[str, list[str]] = defaultdict(list)
    for item in items:
        if item.sop_class_uid:
            ts = [
                item.transfer_syntax_uid or ExplicitVRLittleEndian,
                ExplicitVRLittleEndian,
                ImplicitVRLittleEndian,
            ]
            syntaxes[item.sop_class_uid] += [t for t in ts if t not in syntaxes[item.sop_class_uid]]
    for sop_class, ts in list(syntaxes.items())[:MAX_CONTEXTS]:
        ae.add_requested_context(sop_class, ts)


def send(action: ForwardAction, items: list[Item], timeout_s: float = 30.0) -> list[Sent]:
    """C-STORE ``items`` over one association (in series order); one :class:`Sent` per item."""
    if not items:
        return []
    ae = AE(ae_title=action.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    _contexts(ae, items)
    try:
        context = action.tls_context()
    except ConfigError as exc:  # our own files (changed since `rules check`): not the destination's fault
        return [Sent(i, "tls_config", str(exc)) for i in items]
    try:
        tls_args = (context, action.host) if context is not None else None
        assoc = ae.associate(action.host, action.port, ae_title=action.ae_title, tls_args=tls_args)
    except OSError as exc:  # a name that does not resolve, a TLS handshake refused (ssl.SSLError too)
        return [Sent(i, "destination_unreachable", describe(exc)) for i in items]
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "could not be reached"
        reason = "association_rejected" if assoc.is_rejected else "destination_unreachable"
        return [Sent(i, reason, f"{action.to} {why}") for i in items]
    _no_delay(assoc)
    results: list[Sent] = []
    try:
        for item in sorted(items, key=lambda i: (i.series_instance_uid or "", i.row_id)):
            results.append(_store(assoc, action, item))
            if not assoc.is_established:  # aborted or released by the peer: the rest waits
                done = {r.item.row_id for r in results}
                results += [
                    Sent(i, "association_lost", f"{action.to} ended the association")
                    for i in items
                    if i.row_id not in done
                ]
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return results


class _QuickAckRequestor(socket.socket):
    """A connected requestor socket that sets ``TCP_QUICKACK`` after every read; no new slots,
    so an existing socket can take this class (``socket.socket`` has ``__slots__``)."""

    __slots__ = ()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        ack_now(self)
        return data


def _no_delay(assoc: Any) -> None:
    """Send each PDU at once and acknowledge each response at once.

    pynetdicom's requestor socket keeps Nagle's algorithm, which holds the tail of every C-STORE
    until the peer's delayed ACK; and a peer that keeps it too (dcmtk's storescp unless
    TCP_NODELAY=1) holds the tail of its response until ours. Measured to a local storescp:
    10.6 stores/s as pynetdicom leaves it (tests/bench/bench_forward.py); in a 200-store probe,
    15-19/s with TCP_NODELAY here alone, and with quick acknowledgements as well (as the
    listener's :class:`~sorter.listener.QuickAckSocket`) 53/s, as fast as a storescp with
    TCP_NODELAY=1 allowed (54/s).
    """
    raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if raw is None:
        return
    with contextlib.suppress(OSError):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if type(raw) is socket.socket:
        raw.__class__ = _QuickAckRequestor  # the same object; recv then acknowledges at once
    elif type(raw) is ssl.SSLSocket:
        raw.__class__ = QuickAckSSLSocket


def _send_file(assoc: Any, path: str) -> Any:
    """C-STORE the file at ``path`` as it is stored. pynetdicom reads this switch at send time;
    it only concerns sends given a path, which only this module makes."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    return c_store(assoc, path)


def _store(assoc: Any, action: ForwardAction, item: Item) -> Sent:
    if not os.path.exists(item.path):
        return Sent(item, "source_missing", f"{item.path} is gone")
    try:
        # The file's own bytes, in chunks, never decoded (pynetdicom's chunked send): its
        # transfer syntax as stored, and no CPU spent re-encoding it (measured: 12 ms of 2 cores
        # per CT slice, which slowed a `sorter listen` beside it).
        status = _send_file(assoc, item.path)
    except Exception:
        status = None  # no exactly matching context, or a file without file meta: decoded below
    if status is None:
        try:
            dataset = dcmread(item.path)
        except FileNotFoundError as exc:
            return Sent(item, "source_missing", describe(exc))
        except Exception as exc:  # the file changed since it was classified
            return Sent(item, "unreadable", describe(exc))
        try:
            status = c_store(assoc, dataset)
        except (ValueError, RuntimeError) as exc:  # no accepted context for its class or syntax
            if not dataset.file_meta.TransferSyntaxUID.is_compressed:
                return Sent(item, "no_presentation_context", describe(exc))
            # The destination does not take its compression (Orthanc refuses RLE by default):
            # decompressed to Explicit VR Little Endian, which every storage SCP accepts, losing
            # nothing the stored file holds.
            try:
                dataset.decompress(generate_instance_uid=False)  # the same instance, re-encoded
                status = c_store(assoc, dataset)
            except Exception as again:
                return Sent(
                    item, "no_presentation_context", f"{describe(exc)}; decompressed: {describe(again)}"
                )
    code = int(getattr(status, "Status", -1)) if status else -1
    if code in STORED:
        return Sent(item)
    if code == -1:
        return Sent(item, "no_response", f"{action.to} did not answer the C-STORE")
    return Sent(item, "store_refused", f"{action.to} answered C-STORE status 0x{code:04X}")
