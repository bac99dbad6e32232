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

Unauthenticated peers cannot hold the listener: a connection counts against the
association limit only once its A-ASSOCIATE-RQ has arrived (:class:`ListenerAE`);
every PDU must arrive whole within ``timeout_s`` of its first byte (the request:
of the connection, a TLS handshake included), and may not declare more than
:data:`MAX_REQUEST_PDU_LENGTH` before association, or than our announced maximum
plus :data:`PDU_LENGTH_ALLOWANCE` after (:class:`PduGuard`, which answers an
A-ABORT); TLS handshakes run in each connection's own thread, never in the one
that accepts.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import Status
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from sorter.associations import SPOOL_FULL, AssociationTracker
from sorter.dicom.storage import has_free_space, store_instance
from sorter.tls import load_authorities, load_identity

log = logging.getLogger(__name__)

#: Receives each stored file's path and the calling AE title; must not block.
Sink = Callable[[Path, str], object]

# A-ASSOCIATE-RJ: result rejected-transient, source service-provider (presentation), reason
# temporary congestion (PS3.8 §9.3.4).
_RJ_TRANSIENT, _RJ_SOURCE_PRESENTATION, _RJ_TEMPORARY_CONGESTION = 0x02, 0x03, 0x01

#: Longest A-ASSOCIATE-RQ accepted, checked at its header. pynetdicom buffers whatever length a
#: header declares (up to 4 GiB) before the calling AE title is known. A request is small: 128
#: presentation contexts (the most PS3.8 allows) of 12 transfer syntaxes each encode to 43 KiB.
MAX_REQUEST_PDU_LENGTH = 64 * 1024
#: The maximum PDU receive length we announce in the A-ASSOCIATE-AC (pynetdicom's default).
MAX_PDU_LENGTH = 16382
#: How much longer than the announced maximum a PDU after the request may be. Peers disagree on
#: whether the maximum counts the PDV item headers, and some round up to a buffer size of their
#: own: tolerated, as memory stays bounded per association; a peer ignoring it outright is aborted.
PDU_LENGTH_ALLOWANCE = 64 * 1024
#: PS3.8 §9.3.1: a PDU starts with its type, a reserved byte and the length of what follows (4 bytes).
_PDU_HEADER = 6


def _abort_pdu(source: int, reason: int) -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source, pdu.reason_diagnostic = source, reason
    return bytes(pdu.encode())


# A-ABORT, source service-provider, reason invalid-PDU-parameter value (PS3.8 §9.3.8).
_ABORT_INVALID_PDU_PARAMETER = _abort_pdu(0x02, 0x06)


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
    load_identity(context, str(cert), str(key), names=("--tls-cert", "--tls-key"))
    if ca is not None:
        load_authorities(context, str(ca), name="--tls-ca")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def handle_echo(event: Event) -> int:
    """C-ECHO: always success."""
    return int(StoreStatus.SUCCESS)


def handle_requested(
    event: Event, spool: Path, floor: int, tracker: AssociationTracker | None = None
) -> None:
    """A-ASSOCIATE request: refuse (transient) while the spool volume is below its floor."""
    try:
        if has_free_space(spool, floor):
            return
        calling = getattr(event.assoc.requestor.primitive, "calling_ae_title", "?")
        log.warning("association from %s refused: spool below its free-space floor", calling)
        if tracker is not None:
            tracker.reject(event, SPOOL_FULL)
        # As pynetdicom's own ACSE rejects: send A-ASSOCIATE-RJ, then end the association.
        event.assoc.acse.send_reject(_RJ_TRANSIENT, _RJ_SOURCE_PRESENTATION, _RJ_TEMPORARY_CONGESTION)
        event.assoc.kill()
    except Exception:  # never raise into pynetdicom; the C-STORE check still guards the disk
        log.exception("free-space check at association failed")


def handle_store(
    event: Event, spool: Path, floor: int, sink: Sink, tracker: AssociationTracker | None = None
) -> int:
    """C-STORE: write the bytes as received, durably, then hand the path on; never raises."""
    status = _store(event, spool, floor, sink)
    if tracker is not None:
        tracker.stored(event, status == StoreStatus.SUCCESS)
    return status


def _store(event: Event, spool: Path, floor: int, sink: Sink) -> int:
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
            event.assoc.requestor.ae_title,  # kept in the file's meta: the sender outlives a lost queue
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


class ListenerAE(AE):
    """pynetdicom's AE, whose active associations are those whose A-ASSOCIATE-RQ has arrived.

    pynetdicom checks the association limit against every acceptor thread, and starts one per TCP
    connection: idle or stalled connections, their calling AE title still unknown, used the limit
    up and locked every sender out. Until its request has arrived a connection is bounded instead
    by the timeout and :data:`MAX_REQUEST_PDU_LENGTH` (:class:`PduGuard`). ``AE.shutdown``, which
    aborts the active associations, leaves those connections to their timeout.
    """

    @property
    def active_associations(self) -> list[Association]:
        """Requestors, and acceptors whose A-ASSOCIATE-RQ has arrived."""
        return [
            assoc
            for assoc in super().active_associations
            if not (assoc.is_acceptor and assoc.requestor.primitive is None)
        ]


def build_ae(config: ListenerConfig) -> ListenerAE:
    """The application entity: title, limits, timeouts, and every storage context we accept."""
    ae = ListenerAE(ae_title=config.ae_title)
    ae.maximum_associations = config.max_associations
    ae.maximum_pdu_size = MAX_PDU_LENGTH  # what PduGuard allows after the request, plus an allowance
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


def ack_now(sock: socket.socket) -> None:
    """Acknowledge what ``sock`` has read at once (Linux; quick ACKs are not sticky)."""
    if _QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


class PduTooLong(ConnectionError):
    """A PDU header declared more bytes than the peer may send at that point of the association."""


class PduGuard:
    """Frames what one connection reads into PDUs, to bound each PDU in time and length.

    pynetdicom's DUL thread reads a PDU's header, then blocks until every byte it declares has
    arrived, buffering them: with no time limit (its own timers are checked by that same thread,
    between PDUs) and no length limit. A connection that stopped or trickled mid-PDU was kept for
    ever, holding its association; one declaring 4 GiB was buffered. Bounding the reads below
    pynetdicom holds whatever reads them, and turns a violation into a failed read, which
    pynetdicom handles already: it closes the connection and ends the association (A-P-ABORT).
    """

    __slots__ = ("_deadline", "_header", "_later_limit", "_left", "_limit", "peer", "timeout_s")

    def __init__(self, timeout_s: float | None, peer: str, later_limit: int) -> None:
        self.timeout_s = timeout_s
        self.peer = peer
        self._limit = MAX_REQUEST_PDU_LENGTH  # the first PDU is the A-ASSOCIATE-RQ
        self._later_limit = later_limit
        self._header = b""  # of the PDU being read, while incomplete
        self._left = 0  # bytes of the PDU being read still to come after its header
        # The first PDU's time counts from the connection, a TLS handshake included: from its
        # first byte, a peer could wait the timeout out before starting and so double it.
        self._deadline: float | None = None if timeout_s is None else time.monotonic() + timeout_s

    def time_left(self) -> float | None:
        """What is left of the current PDU's time (``None``: no timeout); starts the next PDU's.

        A PDU's time starts at its first read: pynetdicom reads only once data is waiting, so time
        between PDUs is not counted (pynetdicom's network timeout bounds that). Raises
        :class:`TimeoutError` once it has run out.
        """
        if self.timeout_s is None:
            return None
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.timeout_s
        left = self._deadline - now
        if left <= 0:
            raise TimeoutError(f"no whole PDU within {self.timeout_s:g} s")
        return left

    def consumed(self, data: bytes) -> None:
        """Account for ``data`` just read; raise :class:`PduTooLong` at a header declaring too much."""
        at = 0
        while at < len(data):
            if self._left:
                step = min(self._left, len(data) - at)
                self._left -= step
                at += step
                if not self._left:
                    self._deadline = None  # PDU complete: the next one's time starts at its first read
                continue
            taken = data[at : at + _PDU_HEADER - len(self._header)]
            self._header += taken
            at += len(taken)
            if len(self._header) < _PDU_HEADER:
                return
            length = int.from_bytes(self._header[2:], "big")
            self._header = b""
            if length > self._limit:
                raise PduTooLong(f"PDU declaring {length} bytes, {self._limit} allowed")
            self._limit, self._left = self._later_limit, length
            if not length:
                self._deadline = None


def _guarded_recv(
    sock: socket.socket, guard: PduGuard | None, read: Callable[[int, int], bytes], size: int, flags: int
) -> bytes:
    """``read(size, flags)`` bounded by ``guard`` (the PDU's time left, its declared length); ACK at once."""
    if guard is None:
        data = read(size, flags)
        ack_now(sock)
        return data
    try:
        sock.settimeout(guard.time_left())
        data = read(size, flags)
        ack_now(sock)
        guard.consumed(data)
    except TimeoutError:
        log.warning(
            "%s: no whole PDU within %g s (the timeout): connection closed", guard.peer, guard.timeout_s
        )
        raise
    except PduTooLong as exc:
        log.warning("%s: %s: A-ABORT (invalid PDU parameter value), connection closed", guard.peer, exc)
        with contextlib.suppress(OSError):
            sock.sendall(_ABORT_INVALID_PDU_PARAMETER)
        raise
    finally:
        # Our sends (A-ASSOCIATE-AC, responses) wait no longer than the timeout for a peer that does
        # not read, and never with what happened to be left of the last PDU's time.
        with contextlib.suppress(OSError):
            sock.settimeout(guard.timeout_s)
    return data


class QuickAckSocket(socket.socket):
    """A TCP socket that acknowledges what it reads at once (``TCP_QUICKACK`` after every ``recv``),
    its reads bounded by a :class:`PduGuard` once the server has set one.

    Senders (dcmtk's storescu, pynetdicom, most modalities) write a C-STORE
    request without TCP_NODELAY, so Nagle's algorithm holds back the tail of
    each data set until the receiver acknowledges the segments before it, and
    Linux delays that acknowledgement by up to 40 ms: one association stored
    about 20 instances/s. Quick acknowledgements are not sticky in Linux, hence
    after every read. Measured with storescu over loopback: 45 -> 3.8 ms per store.
    """

    guard: PduGuard | None = None

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        return _guarded_recv(self, self.guard, super().recv, bufsize, flags)


class QuickAckSSLSocket(ssl.SSLSocket):
    """:class:`QuickAckSocket` for TLS connections (set as the context's ``sslsocket_class``)."""

    guard: PduGuard | None = None

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        return _guarded_recv(self, self.guard, super().recv, buflen, flags)


def _peer(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


class LowLatencyAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server whose connections acknowledge at once, send without delay, and are
    bounded (:class:`PduGuard`); TLS handshakes happen in each connection's thread, under the timeout."""

    # Not joined by shutdown(): a connection's thread may now wait out a TLS handshake (up to the
    # timeout), which would delay a SIGTERM by as much; pynetdicom's association threads are daemons too.
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection and tune it (:class:`QuickAckSocket`), wrapping it in TLS when configured."""
        assert self.socket is not None
        client, address = self.socket.accept()
        with contextlib.suppress(OSError):  # not a TCP socket: nothing to tune
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:  # its sslsocket_class is QuickAckSSLSocket (start)
            # Not the handshake: it waits for the peer, and this one thread accepts every connection
            # (one idle TCP connection blocked all others). process_request_thread does it.
            wrapped = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
            return wrapped, address
        timeout = client.gettimeout()
        tuned = QuickAckSocket(client.family, client.type, client.proto, fileno=client.detach())
        tuned.settimeout(timeout)
        return tuned, address

    def process_request_thread(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: tuple[str, int] | str,
    ) -> None:
        """In the connection's own thread: bound its PDUs, complete a TLS handshake in the time the
        first PDU has, then serve it as pynetdicom does."""
        if isinstance(request, QuickAckSocket | QuickAckSSLSocket):
            # The AE's timeouts are all --timeout; its maximum PDU size is what it announces.
            guard = PduGuard(
                self.ae.network_timeout,
                _peer(client_address),
                self.ae.maximum_pdu_size + PDU_LENGTH_ALLOWANCE,
            )
            request.guard = guard
            try:
                if isinstance(request, ssl.SSLSocket):
                    # The socket's timeout bounds the whole handshake (CPython keeps a deadline).
                    request.settimeout(guard.time_left())
                    request.do_handshake()
                request.settimeout(guard.timeout_s)  # sends; reads set their own (PduGuard)
            except OSError as exc:  # TimeoutError and ssl.SSLError included
                log.warning("%s: TLS handshake not completed: %s", guard.peer, exc)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler, whose association waits for its request no longer than its connection may."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        guard = getattr(self.request, "guard", None)
        if isinstance(guard, PduGuard) and guard.timeout_s is not None:
            # pynetdicom waits the ACSE timeout for the request from now: after a TLS handshake that
            # took most of the connection's time, a peer then sending nothing would be kept twice as long.
            try:
                left = guard.time_left() or 0.0
            except TimeoutError:
                left = 0.0
            assoc.acse_timeout = min(left, assoc.acse_timeout or left)
        return assoc


def start(
    config: ListenerConfig, sink: Sink, tracker: AssociationTracker | None = None
) -> ThreadedAssociationServer:
    """Start serving in background threads; the caller ends it with ``server.shutdown()``.

    ``tracker`` (default: one that only logs) gathers each association into one log line.
    """
    config.spool.mkdir(parents=True, exist_ok=True)
    ae = build_ae(config)
    tracker = tracker or AssociationTracker()
    handlers: list[EventHandlerType] = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [config.spool, config.min_free_bytes, sink, tracker]),
        (evt.EVT_REQUESTED, handle_requested, [config.spool, config.min_free_bytes, tracker]),
        *tracker.handlers(),
    ]
    if config.ssl_context is not None:
        config.ssl_context.sslsocket_class = QuickAckSSLSocket
    server = ae.make_server(
        (config.bind, config.port),
        evt_handlers=handlers,
        ssl_context=config.ssl_context,
        server_class=LowLatencyAssociationServer,
        request_handler=GuardedRequestHandler,
    )
    ae._servers.append(server)  # as AE.start_server does: server.shutdown() and AE.shutdown() expect it
    threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True).start()
    log.info("listening as %s on %s:%d, spool %s", config.ae_title, config.bind, config.port, config.spool)
    return server
