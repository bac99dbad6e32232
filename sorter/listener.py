"""The DICOM Storage SCP: C-ECHO and C-STORE for every storage SOP class and transfer syntax.

Instances are stored exactly as received (no decompression), durably, before
the success status goes back (:func:`sorter.dicom.storage.store_instance`);
registration and classification happen afterwards on another thread (the
``sink``, a :class:`sorter.spool.SpoolWorker` in ``sorter listen``).

Handlers are small, never raise and return named statuses. Associations are
refused by pynetdicom itself for an unknown calling AE title (``require_calling_aet``:
rejected-permanent, "calling AE title not recognised") and above the limit
(``maximum_associations``: rejected-transient, "local limit exceeded"), and by
:func:`handle_requested` while the spool volume is below its free-space floor
(rejected-transient, "temporary congestion").
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import Status
from pynetdicom.transport import ThreadedAssociationServer

from sorter.dicom.storage import has_free_space, store_instance

log = logging.getLogger(__name__)

#: Receives each stored file's path and the calling AE title; must not block.
Sink = Callable[[Path, str], object]

# A-ASSOCIATE-RJ: result rejected-transient, source service-provider (presentation), reason
# temporary congestion (PS3.8 §9.3.4).
_RJ_TRANSIENT, _RJ_SOURCE_PRESENTATION, _RJ_TEMPORARY_CONGESTION = 0x02, 0x03, 0x01


class StoreStatus(IntEnum):
    """C-STORE statuses we send (PS3.4 Table B.2-1, as named in pynetdicom.status)."""

    SUCCESS = Status.SUCCESS
    OUT_OF_RESOURCES = 0xA700  # "Refused: Out of Resources"
    CANNOT_UNDERSTAND = 0xC210  # "Error: Cannot understand"


@dataclass(frozen=True)
class ListenerConfig:
    """Everything the AE needs; built by the ``sorter listen`` composition root."""

    ae_title: str
    port: int
    spool: Path
    bind: str = "0.0.0.0"
    allowed_aes: tuple[str, ...] = ()
    max_associations: int = 10
    timeout_s: float = 30.0
    min_free_bytes: int = 1 << 30
    ssl_context: ssl.SSLContext | None = None


def tls_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """A server TLS context; with ``ca``, clients must present a certificate it signed (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def handle_echo(event: Event) -> int:
    """C-ECHO: always success."""
    return int(StoreStatus.SUCCESS)


def handle_requested(event: Event, spool: Path, floor: int) -> None:
    """A-ASSOCIATE request: refuse (transient) while the spool volume is below its floor."""
    try:
        if has_free_space(spool, floor):
            return
        calling = getattr(event.assoc.requestor.primitive, "calling_ae_title", "?")
        log.warning("association from %s refused: spool below its free-space floor", calling)
        # As pynetdicom's own ACSE rejects: send A-ASSOCIATE-RJ, then end the association.
        event.assoc.acse.send_reject(_RJ_TRANSIENT, _RJ_SOURCE_PRESENTATION, _RJ_TEMPORARY_CONGESTION)
        event.assoc.kill()
    except Exception:  # never raise into pynetdicom; the C-STORE check still guards the disk
        log.exception("free-space check at association failed")


def handle_store(event: Event, spool: Path, floor: int, sink: Sink) -> int:
    """C-STORE: write the bytes as received, durably, then hand the path on; never raises."""
    sop_uid = "?"
    try:
        request = event.request
        assert isinstance(request, C_STORE)
        sop_uid = str(request.AffectedSOPInstanceUID)
        if not has_free_space(spool, floor):
            log.warning("SOP Instance UID %s refused: spool below its free-space floor", sop_uid)
            return int(StoreStatus.OUT_OF_RESOURCES)
        ds = event.dataset  # element values are decoded on access: only the two UIDs below
        path = store_instance(
            spool,
            event.encoded_dataset(include_meta=True),
            str(ds.get("StudyInstanceUID", "")),
            str(ds.get("SeriesInstanceUID", "")),
            sop_uid,
        )
    except OSError as exc:
        log.error("SOP Instance UID %s not stored: %s", sop_uid, exc.strerror or type(exc).__name__)
        return int(StoreStatus.OUT_OF_RESOURCES)
    except Exception as exc:
        log.error("SOP Instance UID %s not stored: %s", sop_uid, type(exc).__name__)
        return int(StoreStatus.CANNOT_UNDERSTAND)
    try:
        sink(path, event.assoc.requestor.ae_title)
    except Exception:  # stored durably already: the sweep registers it
        log.exception("SOP Instance UID %s stored but not queued", sop_uid)
    return int(StoreStatus.SUCCESS)


def build_ae(config: ListenerConfig) -> AE:
    """The application entity: title, limits, timeouts, and every storage context we accept."""
    ae = AE(ae_title=config.ae_title)
    ae.maximum_associations = config.max_associations
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = config.timeout_s
    if config.allowed_aes:
        ae.require_calling_aet = list(config.allowed_aes)
    syntaxes = list(dict.fromkeys([*ALL_TRANSFER_SYNTAXES, *AllTransferSyntaxes]))
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, syntaxes)
    ae.add_supported_context(Verification, syntaxes)
    return ae


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def _ack_now(sock: socket.socket) -> None:
    if _QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


class QuickAckSocket(socket.socket):
    """A TCP socket that acknowledges what it reads at once (``TCP_QUICKACK`` after every ``recv``).

    Senders (dcmtk's storescu, pynetdicom, most modalities) write a C-STORE
    request without TCP_NODELAY, so Nagle's algorithm holds back the tail of
    each data set until the receiver acknowledges the segments before it, and
    Linux delays that acknowledgement by up to 40 ms: one association stored
    about 20 instances/s. Quick acknowledgements are not sticky in Linux, hence
    after every read. Measured with storescu over loopback: 45 -> 3.8 ms per store.
    """

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        _ack_now(self)
        return data


class QuickAckSSLSocket(ssl.SSLSocket):
    """:class:`QuickAckSocket` for TLS connections (set as the context's ``sslsocket_class``)."""

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        data = super().recv(buflen, flags)
        _ack_now(self)
        return data


class LowLatencyAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server whose connections acknowledge at once and send without delay."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection and tune it (:class:`QuickAckSocket`), wrapping it in TLS when configured."""
        assert self.socket is not None
        client, address = self.socket.accept()
        with contextlib.suppress(OSError):  # not a TCP socket: nothing to tune
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:  # its sslsocket_class is QuickAckSSLSocket (start)
            return self.ssl_context.wrap_socket(client, server_side=True), address
        timeout = client.gettimeout()
        tuned = QuickAckSocket(client.family, client.type, client.proto, fileno=client.detach())
        tuned.settimeout(timeout)
        return tuned, address


def start(config: ListenerConfig, sink: Sink) -> ThreadedAssociationServer:
    """Start serving in background threads; the caller ends it with ``server.shutdown()``."""
    config.spool.mkdir(parents=True, exist_ok=True)
    ae = build_ae(config)
    handlers: list[EventHandlerType] = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [config.spool, config.min_free_bytes, sink]),
        (evt.EVT_REQUESTED, handle_requested, [config.spool, config.min_free_bytes]),
    ]
    if config.ssl_context is not None:
        config.ssl_context.sslsocket_class = QuickAckSSLSocket
    server = ae.make_server(
        (config.bind, config.port),
        evt_handlers=handlers,
        ssl_context=config.ssl_context,
        server_class=LowLatencyAssociationServer,
    )
    ae._servers.append(server)  # as AE.start_server does: server.shutdown() and AE.shutdown() expect it
    threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True).start()
    log.info("listening as %s on %s:%d, spool %s", config.ae_title, config.bind, config.port, config.spool)
    return server
