"""Listener under denial-of-service connections: how long each is kept, whether senders still get through.

Run: .venv/bin/python tests/bench/bench_listener_dos.py [--timeout 2] [--max-associations 3]
     [--stream-mb 300] [--wait 15] [--work DIR] [--out bench-listener-dos.json]

Starts two ``python -m sorter listen`` child processes on free loopback ports (one plain, one with
TLS, a self-signed certificate made with openssl), each with a fresh SQLite database, the bundled
model, ``SORTER_TIMEOUT=--timeout``, ``SORTER_MAX_ASSOCIATIONS=--max-associations`` and one allowed
calling AE title. For each scenario it opens hostile connections (as many as the association limit
before association; one fewer after, since an established association rightly holds a slot); while
they are held, another thread sends an allow-listed C-ECHO and a C-STORE of pydicom's CT_small
(dcmtk's echoscu and storescu in plain, pynetdicom over TLS), and this one waits up to ``--timeout``
+ ``--wait`` seconds for the listener to close each hostile connection. Per scenario it reports the
seconds from opening to the close (``null``: still open), the first bytes the listener sent (an
A-ABORT?), the echo and store results, and the listener's resident memory before and at its peak
(sampled every 20 ms; the model is loaded by a store before the first scenario).

Scenarios: idle TCP; idle TCP on the TLS port (no handshake); a TLS ClientHello trickled a byte every
0.3 s; 8 bytes of an A-ASSOCIATE-RQ; an A-ASSOCIATE-RQ trickled a byte a second; an A-ASSOCIATE-RQ
header declaring 0xFFFFFFF0 bytes, then ``--stream-mb`` MB streamed; after association, 8 bytes of
a P-DATA-TF; after association, a P-DATA-TF declaring 0xFFFFFFF0 bytes, then the stream.
Prints JSON and writes it to ``--out``. Timings belong here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import UID, generate_uid
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: hostile_sockets
import hostile_sockets

OUR_AE = "SORTER"
ALLOWED = "BENCH"
CLIENT_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def association_request() -> bytes:
    """An allow-listed A-ASSOCIATE-RQ proposing Verification, as pynetdicom encodes it."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID("1.2.840.10008.3.1.1.1")
    primitive.calling_ae_title = ALLOWED
    primitive.called_ae_title = OUR_AE
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16382
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = UID("1.2.826.0.1.3680043.9.3811.3.0.4")
    primitive.user_information = [maximum, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def client_hello(cert: Path) -> bytes:
    """The first flight of a TLS client (its ClientHello), captured through memory buffers."""
    context = ssl.create_default_context(cafile=str(cert))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with suppress(ssl.SSLWantReadError):  # it waits for the server: the hello is written by then
        tls.do_handshake()
    return outgoing.read()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@contextmanager
def rss_peak(pid: int) -> Iterator[list[int]]:
    """Samples ``pid``'s resident memory every 20 ms; yields [before, peak], filled in on exit."""
    result = [rss_bytes(pid), 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result[1] = max(result[1], rss_bytes(pid))
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result[1] = max(result[1], rss_bytes(pid))


def start_listener(
    work: Path, name: str, timeout: float, max_associations: int, tls: tuple[Path, Path] | None
) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SORTER_")}
    env.update(
        {
            "SORTER_AE_TITLE": OUR_AE,
            "SORTER_PORT": str(port),
            "SORTER_BIND": "127.0.0.1",
            "SORTER_SPOOL": str(work / f"spool-{name}"),
            "SORTER_MIN_FREE_MB": "1",
            "SORTER_DATABASE_URL": f"sqlite:///{work / f'{name}.db'}",
            "SORTER_ALLOW_AE": ALLOWED,
            "SORTER_TIMEOUT": str(timeout),
            "SORTER_MAX_ASSOCIATIONS": str(max_associations),
            "SORTER_WORKERS": "1",
            "SORTER_DEVICE": "cpu",
        }
    )
    if tls:
        env["SORTER_TLS_CERT"], env["SORTER_TLS_KEY"] = str(tls[0]), str(tls[1])
    log = (work / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "sorter", "listen"], env=env, stdout=log, stderr=log, start_new_session=True
    )
    return process, port


def wait_until_answering(process: subprocess.Popen[bytes], echo: Callable[[], bool]) -> float:
    started = time.monotonic()
    while not echo():
        if process.poll() is not None:
            raise SystemExit(f"sorter listen exited with {process.returncode} before answering")
        if time.monotonic() - started > 180:
            raise SystemExit("sorter listen did not answer a C-ECHO in time")
        time.sleep(0.3)
    return time.monotonic() - started


def stop_listener(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    return process.wait()


class Peer:
    """Allow-listed C-ECHO and C-STORE: dcmtk in plain, pynetdicom over TLS (echoscu may lack TLS)."""

    def __init__(self, port: int, work: Path, tls: ssl.SSLContext | None) -> None:
        self.port, self.tls = port, tls
        ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
        self.dataset = ds
        self.file = work / "ct.dcm"
        ds.save_as(self.file, enforce_file_format=True)

    def echo(self) -> bool:
        if self.tls is None:
            args = ["echoscu", "-to", "10", "-ta", "10", "-td", "10", "-aet", ALLOWED, "-aec", OUR_AE]
            return subprocess.run([*args, "127.0.0.1", str(self.port)], capture_output=True).returncode == 0
        return self._pynetdicom(lambda assoc: int(assoc.send_c_echo().Status) == 0)

    def store(self) -> bool:
        self.dataset.SOPInstanceUID = self.dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if self.tls is None:
            self.dataset.save_as(self.file, enforce_file_format=True)
            args = ["storescu", "-to", "10", "-ta", "10", "-td", "10", "-aet", ALLOWED, "-aec", OUR_AE]
            run = subprocess.run([*args, "127.0.0.1", str(self.port), str(self.file)], capture_output=True)
            return run.returncode == 0
        return self._pynetdicom(lambda assoc: int(assoc.send_c_store(self.dataset).Status) == 0)

    def _pynetdicom(self, work: Callable[[Any], bool]) -> bool:
        ae = AE(ae_title=ALLOWED)
        ae.add_requested_context(Verification)
        ae.add_requested_context(self.dataset.SOPClassUID, self.dataset.file_meta.TransferSyntaxUID)
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = CLIENT_TIMEOUT
        tls_args = (self.tls, "127.0.0.1") if self.tls else None
        assoc = ae.associate("127.0.0.1", self.port, ae_title=OUR_AE, tls_args=tls_args)
        if not assoc.is_established:
            return False
        try:
            return work(assoc)
        finally:
            assoc.release()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)


def associated(port: int) -> socket.socket:
    sock = connect(port)
    sock.sendall(association_request())
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            raise SystemExit("the listener closed instead of answering the association request")
        header += chunk
    if header[0] != 0x02:
        raise SystemExit(f"association not accepted: PDU type {header[0]:#04x}")
    left = int.from_bytes(header[2:], "big")
    while left:
        left -= len(sock.recv(left))
    return sock


def stream(sock: socket.socket, header: bytes, megabytes: int) -> int:
    """``header``, then up to ``megabytes`` MB of zeros until the listener stops taking them; bytes sent."""
    chunk, sent = bytes(1 << 20), 0
    try:
        sock.sendall(header)
        while sent < megabytes << 20:
            sent += sock.send(chunk)
    except OSError:  # reset by the listener
        pass
    return sent


def closed_after(
    socks: list[socket.socket], since: float, until: float, trickle: bytes = b"", every_s: float = 1.0
) -> tuple[list[float | None], list[bytes]]:
    """:func:`hostile_sockets.closed_after`, the seconds rounded to 10 ms."""
    seconds, received = hostile_sockets.closed_after(socks, since, until, trickle, every_s)
    return [None if s is None else round(s, 2) for s in seconds], received


def run_scenario(
    name: str,
    pid: int,
    port: int,
    peer: Peer,
    count: int,
    open_one: Callable[[int], tuple[socket.socket, int]],
    timeout: float,
    wait: float,
    trickle: bytes = b"",
    every_s: float = 1.0,
) -> dict[str, Any]:
    """Open ``count`` hostile connections, echo and store while they are held, time their closing."""
    with ExitStack() as held, rss_peak(pid) as rss:
        since = time.monotonic()
        hostile, sent = [], 0
        for _ in range(count):
            sock, nbytes = open_one(port)
            hostile.append(held.enter_context(sock))
            sent += nbytes
        answers: dict[str, Any] = {}

        def echo_and_store() -> None:  # beside the watch below, so that it times each close as it happens
            answers["echo"], answers["store"] = peer.echo(), peer.store()
            answers["took_s"] = round(time.monotonic() - since, 2)

        sender = threading.Thread(target=echo_and_store)
        sender.start()
        closed, received = closed_after(hostile, since, since + timeout + wait, trickle, every_s)
        sender.join()
    done = [c for c in closed if c is not None]
    return {
        "scenario": name,
        "hostile_connections": count,
        "closed_after_s": closed,
        "max_closed_after_s": max(done) if len(done) == len(closed) else None,
        "all_closed_within_timeout_plus_1s": len(done) == len(closed) and max(done) <= timeout + 1,
        "listener_sent_first": sorted({r[:10].hex() for r in received}),
        "echo_while_held": answers["echo"],
        "store_while_held": answers["store"],
        "echo_and_store_done_after_s": answers["took_s"],
        "hostile_bytes_sent": sent,
        "listener_rss_before_mb": round(rss[0] / 2**20, 1),
        "listener_rss_peak_mb": round(rss[1] / 2**20, 1),
        "listener_rss_growth_mb": round((rss[1] - rss[0]) / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--timeout", type=float, default=2.0, help="the listener's --timeout (s)")
    parser.add_argument("--max-associations", type=int, default=3)
    parser.add_argument("--stream-mb", type=int, default=300, help="MB streamed after an oversized header")
    parser.add_argument("--wait", type=float, default=15.0, help="s past --timeout to wait for a close")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary folder, removed after)")
    parser.add_argument("--out", type=Path, default=Path("bench-listener-dos.json"))
    args = parser.parse_args()
    for tool in ("echoscu", "storescu", "openssl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} must be on PATH")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-listener-dos-"))
    work.mkdir(parents=True, exist_ok=True)
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    request, hello = association_request(), client_hello(cert)
    huge = (0xFFFFFFF0).to_bytes(4, "big")
    n, t, w = args.max_associations, args.timeout, args.wait
    rows: list[dict[str, Any]] = []
    statuses: dict[str, int] = {}
    plain, plain_port = start_listener(work, "plain", t, n, None)
    secure, tls_port = start_listener(work, "tls", t, n, (cert, key))
    try:
        plain_peer = Peer(plain_port, work, None)
        tls_peer = Peer(tls_port, work, ssl.create_default_context(cafile=str(cert)))
        startup = {
            "plain": round(wait_until_answering(plain, plain_peer.echo), 1),
            "tls": round(wait_until_answering(secure, tls_peer.echo), 1),
        }
        # The first store loads the model (the listener classifies what it receives): not in the figures.
        if not (plain_peer.store() and tls_peer.store()):
            raise SystemExit("an allow-listed store failed before any hostile connection")
        time.sleep(5)

        def sending(data: bytes) -> Callable[[int], tuple[socket.socket, int]]:
            def open_one(port: int) -> tuple[socket.socket, int]:
                sock = connect(port)
                sock.sendall(data)
                return sock, len(data)

            return open_one

        def after_association(data: bytes, megabytes: int = 0) -> Callable[[int], tuple[socket.socket, int]]:
            def open_one(port: int) -> tuple[socket.socket, int]:
                sock = associated(port)
                if megabytes:
                    return sock, stream(sock, data, megabytes)
                sock.sendall(data)
                return sock, len(data)

            return open_one

        def oversized(port: int) -> tuple[socket.socket, int]:
            sock = connect(port)
            return sock, stream(sock, b"\x01\x00" + huge, args.stream_mb)

        scenarios: list[tuple[str, subprocess.Popen[bytes], int, Peer, int, Any, dict[str, Any]]] = [
            ("idle-tcp", plain, plain_port, plain_peer, n, sending(b""), {}),
            ("idle-tcp-on-tls-port", secure, tls_port, tls_peer, n, sending(b""), {}),
            ("tls-clienthello-slowloris", secure, tls_port, tls_peer, n, sending(hello[:1]),
             {"trickle": hello[1:], "every_s": 0.3}),
            ("stalled-request-8-bytes", plain, plain_port, plain_peer, n, sending(request[:8]), {}),
            ("slowloris-request-1-byte-per-s", plain, plain_port, plain_peer, n, sending(request[:1]),
             {"trickle": request[1:], "every_s": 1.0}),
            ("oversized-request-0xFFFFFFF0", plain, plain_port, plain_peer, n, oversized, {}),
            ("stalled-pdata-8-bytes", plain, plain_port, plain_peer, n - 1,
             after_association(b"\x04\x00" + (1000).to_bytes(4, "big") + b"\x00\x00"), {}),
            ("oversized-pdata-0xFFFFFFF0", plain, plain_port, plain_peer, n - 1,
             after_association(b"\x04\x00" + huge, args.stream_mb), {}),
        ]  # fmt: skip
        for name, process, port, peer, count, open_one, extra in scenarios:
            row = run_scenario(name, process.pid, port, peer, count, open_one, t, w, **extra)
            row["echo_after"] = peer.echo()
            rows.append(row)
            print(
                f"{name:<32} closed after {row['closed_after_s']} s, echo {row['echo_while_held']}, "
                f"store {row['store_while_held']}, RSS +{row['listener_rss_growth_mb']} MB",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(t)  # let the listener finish with the last ones before the next scenario
    finally:
        statuses = {"plain": stop_listener(plain), "tls": stop_listener(secure)}
        if any(statuses.values()):
            for name in ("plain", "tls"):
                print((work / f"{name}.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": sys.version.split()[0],
        "timeout_s": t,
        "max_associations": n,
        "stream_mb": args.stream_mb,
        "listener_startup_s": startup,
        "listener_exit_status": statuses,
        "note": "closed_after_s counts from opening the hostile connections; null: still open after "
        "timeout + wait. Before association, as many hostile connections as the limit; after, one fewer "
        "(an established association holds a slot). listener_sent_first: distinct first 10 bytes, "
        "07000000000400000206 is A-ABORT source service-provider, invalid-PDU-parameter value.",
        "scenarios": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
