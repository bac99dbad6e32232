"""``sorter listen`` over real associations on loopback: storage, refusals, dcmtk, a database outage."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from db_support import query, scan, small_archive, sorter
from pydicom.data import get_testdata_file
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS
from support import free_port, listen_env, start_listen, stop_process_group, umask

from sorter import listener
from sorter.commands.listen import backend
from sorter.config import Settings
from sorter.dicom.storage import safe_name, store_instance
from sorter.rules.filing import file_instance
from sorter.scu import c_echo, c_store
from sorter.spool import SpoolWorker
from sorter.summary import RunSummary

pytest_plugins = ["db_fixtures"]

#: Each file is sent in its own transfer syntax, compressed ones as they are.
FILES = (
    "CT_small.dcm",  # Explicit VR Little Endian
    "MR_small_implicit.dcm",  # Implicit VR Little Endian
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "SC_rgb_rle.dcm",  # RLE lossless
    "JPEG-LL.dcm",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
)
OUR_AE = "SORTER"
#: storescu's option proposing each compressed syntax.
DCMTK_PROPOSE = {JPEG2000Lossless: "-xv", JPEGLosslessSV1: "-xs", JPEGLSLossless: "-xt", RLELossless: "-xr"}


def _datasets() -> list[pydicom.Dataset]:
    """The test files under fresh UIDs (several share the SOP Instance UID of MR_small)."""
    out = []
    for name in FILES:
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        out.append(ds)
    return out


def _config(tmp_path: Path, **kw: Any) -> listener.ListenerConfig:
    values: dict[str, Any] = {"bind": "127.0.0.1", "min_free_bytes": 0, "timeout_s": 10.0, **kw}
    return listener.ListenerConfig(OUR_AE, free_port(), tmp_path / "spool", **values)


@contextmanager
def serving(config: listener.ListenerConfig, sink: listener.Sink) -> Iterator[listener.ListenerConfig]:
    server = listener.start(config, sink)
    try:
        yield config
    finally:
        server.shutdown()


@contextmanager
def listening(
    config: listener.ListenerConfig, url: str, model: Path, grace_s: float = 60.0
) -> Iterator[SpoolWorker]:
    """The same wiring as ``sorter listen``: spool worker (database, model, executor) and the AE."""
    settings = Settings.from_env(database_url=url, model=model, workers=1, batch_size=8, device="cpu")
    worker = SpoolWorker(
        config.spool,
        backend(settings, RunSummary()),
        batch_size=8,
        flush_s=0.2,
        retry_s=0.5,
        grace_s=grace_s,
    )
    worker.start()
    try:
        with serving(config, worker.offer):
            yield worker
    finally:
        worker.stop(timeout=120)


def _store(
    config: listener.ListenerConfig, datasets: list[pydicom.Dataset], calling: str = "MODALITY1"
) -> list[int]:
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", config.port, ae_title=OUR_AE)
    assert assoc.is_established
    try:
        return [int(c_store(assoc, ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _spooled(spool: Path) -> list[Path]:
    return sorted(spool.rglob("*.dcm"))


def test_statuses_are_the_named_storage_statuses():
    assert (
        STORAGE_SERVICE_CLASS_STATUS[listener.StoreStatus.OUT_OF_RESOURCES][1] == "Refused: Out of Resources"
    )
    assert STORAGE_SERVICE_CLASS_STATUS[listener.StoreStatus.CANNOT_UNDERSTAND][1] == "Cannot Understand"


def test_store_instance_is_idempotent_newer_bytes_win_and_bad_uids_are_hashed(tmp_path):
    first = store_instance(tmp_path, b"one", "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert first == tmp_path / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm" and first.read_bytes() == b"one"
    inode = first.stat().st_ino
    assert store_instance(tmp_path, b"one", "1.2.3", "1.2.3.4", "1.2.3.4.5") == first
    assert first.stat().st_ino == inode  # identical bytes: nothing rewritten
    store_instance(tmp_path, b"two", "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert first.read_bytes() == b"two" and first.stat().st_ino != inode
    evil = store_instance(tmp_path, b"x", "../../etc", "1.2/3", "01.2")
    assert evil.resolve().is_relative_to(tmp_path.resolve())
    assert evil.name == safe_name("01.2") + ".dcm" and evil.name.startswith("x-")
    assert [p.name for p in tmp_path.rglob("*") if p.name.startswith(".")] == []  # no temp file left


def test_spooled_and_filed_instances_get_the_service_s_umask_not_0600(tmp_path):
    """A unit's ``UMask=0027`` is there so that the ``sorter`` group reads the spool and what rules
    file; a file written through a temporary name used to stay 0600 whatever the umask."""
    with umask(0o027):
        spooled = store_instance(tmp_path / "spool", b"one", "1.2.3", "1.2.3.4", "1.2.3.4.5")
        filed = file_instance(spooled, tmp_path / "by-label" / "CT" / "one.dcm", "copy")
    assert filed.error is None
    assert stat.S_IMODE(spooled.stat().st_mode) == 0o640
    assert stat.S_IMODE(filed.target.stat().st_mode) == 0o640
    with umask(0o022):
        again = store_instance(tmp_path / "spool", b"two", "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert again == spooled and stat.S_IMODE(again.stat().st_mode) == 0o644


def test_echo_and_stores_in_every_transfer_syntax_are_spooled_as_sent_and_classified(
    tmp_path, sqlite_url, tiny_model
):
    datasets = _datasets()
    config = _config(tmp_path)
    with listening(config, sqlite_url, tiny_model):
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", config.port, ae_title=OUR_AE)
        assert assoc.is_established and int(c_echo(assoc).Status) == listener.StoreStatus.SUCCESS
        assoc.release()
        assert _store(config, datasets) == [listener.StoreStatus.SUCCESS] * len(FILES)

    by_uid = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in _spooled(config.spool)}
    assert len(by_uid) == len(FILES)
    for ds in datasets:
        stored = pydicom.dcmread(by_uid[ds.SOPInstanceUID])
        assert stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID  # kept as received
        assert stored == ds
    rows = query(sqlite_url, "SELECT status, calling_ae, source, prediction_id FROM instances")
    assert len(rows) == len(FILES)
    assert {(r.status, r.calling_ae, r.source) for r in rows} == {("done", "MODALITY1", "MODALITY1")}
    assert all(r.prediction_id is not None for r in rows)


def test_unknown_calling_ae_is_rejected_by_name(tmp_path):
    config = _config(tmp_path, allowed_aes=("PACS",))
    with serving(config, lambda *_: None):
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", config.port, ae_title=OUR_AE)
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)  # calling AE not recognised
        ae = AE(ae_title="PACS")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", config.port, ae_title=OUR_AE)
        assert assoc.is_established
        assoc.release()


def test_the_association_over_the_limit_is_rejected(tmp_path):
    config = _config(tmp_path, max_associations=2)
    with serving(config, lambda *_: None):
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(Verification)
        held = [ae.associate("127.0.0.1", config.port, ae_title=OUR_AE) for _ in range(2)]
        assert all(a.is_established for a in held)
        extra = ae.associate("127.0.0.1", config.port, ae_title=OUR_AE)
        assert extra.is_rejected
        rj = extra.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # local limit exceeded
        for assoc in held:
            assoc.release()


def test_below_the_free_space_floor_associations_are_refused(tmp_path):
    config = _config(tmp_path, min_free_bytes=1 << 62)
    with serving(config, lambda *_: None):
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", config.port, ae_title=OUR_AE)
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x01)  # temporary congestion


def test_below_the_free_space_floor_stores_are_out_of_resources(tmp_path, monkeypatch):
    monkeypatch.setattr(listener, "handle_requested", lambda *_: None)  # let the association through
    received: list[Path] = []
    config = _config(tmp_path, min_free_bytes=1 << 62)
    with serving(config, lambda path, _ae: received.append(path)):
        statuses = _store(config, _datasets()[:2])
    assert statuses == [listener.StoreStatus.OUT_OF_RESOURCES] * 2
    assert received == [] and _spooled(config.spool) == []


@pytest.mark.skipif(
    shutil.which("storescu") is None or shutil.which("echoscu") is None,
    reason="dcmtk's echoscu/storescu not installed (apt-get install dcmtk)",
)
def test_dcmtk_echoscu_and_storescu_sending_a_folder(tmp_path):
    # storescu proposes uncompressed syntaxes unless told otherwise (one -x option per run):
    # the uncompressed files go as a folder, each compressed file with its own syntax's option.
    folder = tmp_path / "outbox"
    folder.mkdir()
    datasets = _datasets()
    runs: list[list[str]] = [["+sd", "+r", str(folder)]]
    for i, ds in enumerate(datasets):
        option = DCMTK_PROPOSE.get(ds.file_meta.TransferSyntaxUID)
        target = folder / f"{i}.dcm" if option is None else tmp_path / f"{i}.dcm"
        ds.save_as(target, enforce_file_format=True)
        if option is not None:
            runs.append([option, str(target)])
    received: list[Path] = []
    config = _config(tmp_path)
    with serving(config, lambda path, _ae: received.append(path)):
        peer = ["-aet", "DCMTK", "-aec", OUR_AE, "127.0.0.1", str(config.port)]
        subprocess.run(["echoscu", *peer], check=True, timeout=30)
        for args in runs:
            subprocess.run(["storescu", *peer[:4], *args[:-1], *peer[4:], args[-1]], check=True, timeout=60)
    stored = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in _spooled(config.spool)}
    assert len(received) == len(datasets)
    for ds in datasets:
        got = stored[ds.SOPInstanceUID]
        assert got.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID  # not decompressed
        # dcmtk drops trailing padding and pads odd-length fragments while sending: compare the rest.
        for tag in (0xFFFCFFFC, 0x7FE00010):
            for one in (got, ds):
                if tag in one:
                    del one[tag]
        assert got == ds


def test_a_database_outage_loses_nothing_and_the_sweep_catches_up(tmp_path, sqlite_url, tiny_model):
    datasets = _datasets()
    config = _config(tmp_path)
    down = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/absent"  # nothing listens there
    with listening(config, down, tiny_model):
        assert _store(config, datasets) == [listener.StoreStatus.SUCCESS] * len(FILES)
    assert len(_spooled(config.spool)) == len(FILES)

    # The same spool, a working database: the start-up sweep registers and classifies everything.
    with listening(_config(tmp_path), sqlite_url, tiny_model, grace_s=0.0):
        pass
    rows = query(sqlite_url, "SELECT status, prediction_id FROM instances")
    assert len(rows) == len(FILES)
    assert all(r.status == "done" and r.prediction_id is not None for r in rows)


def test_sorter_listen_configured_by_environment_stores_classifies_and_stops_on_sigterm(
    tmp_path, sqlite_url, tiny_model
):
    port = free_port()
    env = listen_env(OUR_AE, port, tmp_path / "spool", sqlite_url, tiny_model, "MODALITY1 OTHER")
    process = start_listen(env, subprocess.DEVNULL, subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert process.poll() is None and time.monotonic() < deadline, "sorter listen did not start"
            time.sleep(0.2)
        config = listener.ListenerConfig(OUR_AE, port, tmp_path / "spool")
        assert _store(config, _datasets()[:2]) == [listener.StoreStatus.SUCCESS] * 2
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            stop_process_group(process)
    assert process.returncode == 143, err.decode()  # 128 + SIGTERM: a clean stop asked for
    rows = query(sqlite_url, "SELECT status, calling_ae FROM instances")
    assert [tuple(r) for r in rows] == [("done", "MODALITY1")] * 2


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _pki(folder: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    folder.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "1", "-subj", "/CN=test CA", cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=folder)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext", cwd=folder)  # fmt: skip
    return folder


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make test certificates")
def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(tmp_path):
    pki = _pki(tmp_path / "pki")
    context = listener.tls_context(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    config = _config(tmp_path, ssl_context=context)
    with serving(config, lambda *_: None):
        for with_cert in (True, False):
            client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
            if with_cert:
                client.load_cert_chain(pki / "client.pem", pki / "client.key")
            ae = AE(ae_title="MODALITY1")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", config.port, ae_title=OUR_AE, tls_args=(client, "127.0.0.1"))
            assert assoc.is_established is with_cert
            if with_cert:
                assert int(c_echo(assoc).Status) == listener.StoreStatus.SUCCESS
                assoc.release()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make test certificates")
def test_tls_files_that_cannot_be_used_say_why_in_one_line(tmp_path):
    """The ssl module said "[SSL] PEM lib (_ssl.c:3905)" for a certificate and key swapped, "key
    values mismatch" for another's key, and OpenSSL asked for an encrypted key's pass phrase on a
    terminal a service does not have. `sorter listen` and `sorter rules check` say why now."""
    pki = _pki(tmp_path / "pki")
    _openssl("genrsa", "-aes256", "-passout", "pass:secret", "-out", "locked.key", "2048", cwd=pki)
    _openssl("req", "-x509", "-new", "-key", "locked.key", "-passin", "pass:secret", "-out", "locked.pem",
             "-days", "1", "-subj", "/CN=locked", cwd=pki)  # fmt: skip
    cases = [
        (("server.pem", "client.key", None), "the key does not belong to the certificate"),
        (
            ("server.key", "server.pem", None),
            "not a PEM certificate and its PEM private key (given the wrong",
        ),
        (("locked.pem", "locked.key", None), "the key is encrypted; give an unencrypted copy"),
        (("server.pem", "server.key", "server.key"), "cannot use --tls-ca"),
    ]
    for (cert, key, ca), said in cases:
        args = ["--tls-cert", str(pki / cert), "--tls-key", str(pki / key)]
        args += ["--tls-ca", str(pki / ca)] if ca else []
        command = [sys.executable, "-m", "sorter", "listen", "--ae-title", "X", "--port", str(free_port())]
        env = {**os.environ, "SORTER_DATABASE_URL": f"sqlite:///{tmp_path / 'l.db'}"}
        result = subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=env
        )
        assert result.returncode == 1 and said in result.stderr, (cert, key, result.stderr)
        assert "Traceback" not in result.stderr and "_ssl.c" not in result.stderr
    rules = tmp_path / "forward.toml"
    rules.write_text(
        'mode = "all"\n[[rule]]\nname = "f"\n[rule.forward]\nae_title = "X"\nhost = "127.0.0.1"\n'
        f'port = 11112\ntls = true\ntls_cert = "{pki / "server.pem"}"\ntls_key = "{pki / "client.key"}"\n'
    )
    from click.testing import CliRunner

    from sorter.cli import main

    checked = CliRunner().invoke(main, ["rules", "check", str(rules)])
    assert checked.exit_code == 2, checked.output
    assert "forward.toml:9: cannot use tls_cert" in checked.output, checked.output
    assert "the key does not belong to the certificate" in checked.output


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make test certificates")
def test_forward_rules_speak_tls_to_a_listener_that_requires_it(tmp_path, sqlite_url, tiny_model):
    """A `[rule.forward]` with tls to `sorter listen`'s TLS port, with and without its client
    certificate: the destination verifies the sender, the sender verifies the destination."""
    pki = _pki(tmp_path / "pki")
    config = _config(
        tmp_path, ssl_context=listener.tls_context(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    )
    drop = tmp_path / "drop"
    small_archive(drop)
    scan(sqlite_url, tiny_model, drop, tmp=tmp_path)
    stored: list[str] = []

    def rules(name: str, client: bool) -> Path:
        mine = f'tls_cert = "{pki / "client.pem"}"\ntls_key = "{pki / "client.key"}"\n' if client else ""
        path = tmp_path / f"{name}.toml"
        path.write_text(
            f'mode = "all"\n[[rule]]\nname = "{name}"\n[rule.match]\nmodality = "CT"\n[rule.forward]\n'
            f'ae_title = "{OUR_AE}"\nhost = "127.0.0.1"\nport = {config.port}\ntls = true\n'
            f'tls_ca = "{pki / "ca.pem"}"\n{mine}'
        )
        return path

    with serving(config, lambda path, _ae: stored.append(path.name)):
        refused = sorter("rules", "apply", str(rules("anonymous", client=False)), url=sqlite_url, expect=3)
        accepted = sorter("rules", "apply", str(rules("with-cert", client=True)), url=sqlite_url)
    assert "anonymous: 0 done, 3 failed" in refused.output
    assert "with-cert: 3 done" in accepted.output
    assert len(stored) == 3  # the three CT slices, over TLS
    errors = query(sqlite_url, "SELECT DISTINCT rule, error FROM rule_actions WHERE status = 'failed'")
    assert errors == [("anonymous", "destination_unreachable")]


def test_a_full_queue_never_fails_a_store_and_the_sweep_catches_up(tmp_path, sqlite_url, tiny_model):
    settings = Settings.from_env(database_url=sqlite_url, model=tiny_model, workers=1, device="cpu")
    worker = SpoolWorker(tmp_path / "spool", backend(settings, RunSummary()), queue_size=1, grace_s=0.0)
    config = _config(tmp_path)
    with serving(config, worker.offer):  # the worker is not running yet: one offer fills its queue
        assert _store(config, _datasets()[:3]) == [listener.StoreStatus.SUCCESS] * 3
    worker.start()
    worker.stop(timeout=120)
    rows = query(sqlite_url, "SELECT status FROM instances")
    assert [r.status for r in rows] == ["done"] * 3


def test_accepted_connections_send_without_delay_and_acknowledge_at_once():
    """Nagle on the sender plus delayed ACKs here capped one association at about 20 stores/s."""
    with socket.socket() as server_socket:
        server_socket.bind(("127.0.0.1", 0))
        server_socket.listen()
        fake_server = SimpleNamespace(socket=server_socket, ssl_context=None)
        with socket.create_connection(server_socket.getsockname()) as client:
            accepted, _ = listener.LowLatencyAssociationServer.get_request(fake_server)  # type: ignore[arg-type]
            with accepted:
                assert isinstance(accepted, listener.QuickAckSocket)
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                client.sendall(b"A-ASSOCIATE")
                assert accepted.recv(64) == b"A-ASSOCIATE"


def test_files_rejected_at_registration_are_reported_by_status_and_reason(tmp_path, sqlite_url, tiny_model):
    """What ``sorter listen`` counts in its metrics besides the classified instances."""
    spool = tmp_path / "spool"
    (spool / "study" / "series").mkdir(parents=True)
    (spool / "study" / "series" / "garbage.dcm").write_text("not a DICOM file")
    (spool / "study" / "series" / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    rejected: list[tuple[str, str | None]] = []
    settings = Settings.from_env(database_url=sqlite_url, model=tiny_model, workers=1, device="cpu")
    worker = SpoolWorker(
        spool,
        backend(settings, RunSummary()),
        grace_s=0.0,
        on_rejected=lambda status, reason: rejected.append((status.value, reason)),
    )
    worker.start()  # its start-up sweep registers the spool
    worker.stop(timeout=120)
    assert rejected == [("failed", "not_dicom")]
    assert sorted(r.status for r in query(sqlite_url, "SELECT status FROM instances")) == ["done", "failed"]


def test_a_spool_sweep_interval_of_0_sweeps_only_at_start_up(tmp_path, sqlite_url, tiny_model, monkeypatch):
    """0 walked the whole spool after every batch (each second); now it turns the periodic sweep off."""
    from sorter import spool as spool_module

    sweeps: list[float] = []
    real_sweep = spool_module.SpoolIngest.sweep

    def counted(self: Any) -> Any:
        sweeps.append(time.monotonic())
        return real_sweep(self)

    monkeypatch.setattr(spool_module.SpoolIngest, "sweep", counted)
    spool = tmp_path / "spool"
    (spool / "study" / "series").mkdir(parents=True)
    ct = spool / "study" / "series" / "ct.dcm"
    ct.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    settings = Settings.from_env(database_url=sqlite_url, model=tiny_model, workers=1, device="cpu")
    worker = SpoolWorker(spool, backend(settings, RunSummary()), sweep_s=0.0, flush_s=0.05, grace_s=0.0)
    worker.start()
    deadline = time.monotonic() + 60
    while not worker.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # twenty empty batches
    worker.offer(ct, "MODALITY")
    worker.stop(timeout=120)
    assert len(sweeps) == 1
    assert [r.status for r in query(sqlite_url, "SELECT status FROM instances")] == ["done"]
