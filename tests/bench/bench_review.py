"""The review page (``sorter serve``) on a large archive: how fast the discrepancy queue, a series
page, a thumbnail and the overview are served, on SQLite and on PostgreSQL.

Run: .venv/bin/python tests/bench/bench_review.py [--instances 1000000] [--db sqlite|postgresql|both]
         [--requests 50] [--warmup 3] [--out tests/bench/results-review-2core.json]
         [--work DIR --keep] [--reuse] [--only CASE,CASE]
     (1M instances, both databases: about 15 minutes on 2 cores, 1.5 GB of disk)

Targets (issue): the discrepancy list and a series page in under 200 ms at the 95th percentile on a
database of 1 million instances; a thumbnail of a 512x512 CT in under 150 ms.

1. Generation. A database of ``--instances`` instances is migrated (``create_db_engine`` +
   ``upgrade``) and filled with bulk SQL: ``executemany`` in transactions of 100 000 rows on SQLite
   (a file under the work folder), ``COPY ... FROM STDIN`` on PostgreSQL (a throwaway database on
   127.0.0.1:5432, made as tests/db_fixtures.py makes one, dropped at the end; ``VACUUM ANALYZE``
   once the reviews are written, as autovacuum would; SQLite is not analysed: the sorter never
   does). The shape is an archive's: one ``models`` row (the bundled model's spec and header-test
   thresholds, registered as the scan registers a model), ~20 sources, studies of 1-6 series,
   series of 20-200 instances (~50 on average); every instance ``done`` with one prediction
   (``instances.prediction_id`` set).
   Verdicts: ~90 % agree, ~8 % uncertain, ~2 % disagree; most disagreements are whole mislabelled
   series (``series_discrepancies`` has rows), the rest scattered over otherwise agreeing series.
   Probabilities ``p_ct..p_ot`` sum to 1, ``label``/``confidence``/``second_*`` are their top two,
   and each verdict is what :func:`sorter.compare.compare` says with the model's thresholds (checked
   on a sample). A few hundred review decisions are then recorded through
   :func:`sorter.review.store.record` (series, a few superseded, a few on instances). Every
   instance's path is one real 512x512 CT file written to the work folder (a copy of a corpus CT
   slice, else pydicom's CT_small.dcm upscaled), so any instance id has a thumbnail.
2. Serving. First what ``sorter serve`` does before it serves: build the queue's summary table
   (``series_state``, timed), then time its refreshes (nothing changed; with the prune of vanished
   series; after 10 series were reclassified). Instances were registered over the last 90 days, so
   nothing is "changed since" a refresh unless the benchmark changes it. Then the real app,
   ``create_app(sessions, Access(reviewer="bench"), refresher)`` over ``open_database(url)``,
   driven in-process by ``starlette.testclient.TestClient``: each case gets ``--warmup`` untimed
   requests, then ``--requests`` timed ones (wall time of the client call: routing, middleware,
   SQL, templates). Queue cases walk the pages by the page's own "next page" link
   (``id="next-page"``; the JSON case by ``next_after``) and start again at page 1 at the end.
   Series pages: random flagged (mislabelled) series and random clean ones. Thumbnails: random
   instance ids. "queue series page 1, refresh due" runs on an app whose refresher is always due:
   what a queue request costs when the previous one came more than the refresher's interval (10 s)
   earlier, as it does for a reviewer who reads a series page before going on. The overview's
   numbers (they aggregate the whole archive; the page serves the last result and recomputes it
   in the background when older than 60 s) are computed synchronously ``--overview-runs`` times
   and reported without a target: how stale the overview can be.
   The SQL of each case is timed too (engine events; a statement's time runs until the next one
   starts or the connection goes back to the pool, so it includes fetching): per request, the SQL
   total and the slowest statements, so that a slow case names its statement.
3. Output: a JSON file (machine, N, generation times, per-case median/p95/max in ms, pass/fail
   against 200 ms and 150 ms at p95) and a table on stdout. p95 is numpy's linear-interpolated
   95th percentile of the timed requests.

``--keep`` leaves the databases (and ``meta.json``) in ``--work``; ``--reuse`` benchmarks what a
kept run left there without generating again. Timings belong here, never in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import os
import platform
import random
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import sqlalchemy as sa
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from sorter.compare import compare
from sorter.db.catalogue import activate_if_none
from sorter.db.queries import model_id_for
from sorter.db.session import create_db_engine, make_session_factory, open_database, upgrade
from sorter.domain import Label, Prediction, Verdict
from sorter.model.artefact import DEFAULT_MODEL_PATH, file_sha256
from sorter.model.spec import ModelSpec

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ADMIN_URL = os.environ.get("SORTER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
#: Corpus CT slices tried in turn for the thumbnail file (512x512, uncompressed).
CORPUS_CT = (
    "CT/tcia_nsclc_lung1_001/1-014.dcm",
    "CT/tcia_lidc_idri_0314/000021.dcm",
    "CT/dcmqi_ct_3slice/01.dcm",
)
QUEUE_TARGET_MS = 200.0
THUMB_TARGET_MS = 150.0

LABELS = [label.value for label in Label]  # CT MR PT NM XR MG US OT: the p_* column order
#: Header labels of series (share of series).
HEADER_SHARE = {
    "CT": 0.30,
    "MR": 0.26,
    "PT": 0.06,
    "NM": 0.04,
    "XR": 0.16,
    "MG": 0.07,
    "US": 0.08,
    "OT": 0.03,
}
#: What a mislabelled series' pixels show, by its header label.
MISLABELLED_AS = {
    "CT": ("PT", "XR"),
    "MR": ("CT",),
    "PT": ("CT", "NM"),
    "NM": ("PT",),
    "XR": ("MG", "OT"),
    "MG": ("XR",),
    "US": ("OT",),
    "OT": ("XR", "US"),
}
MODALITIES = {"XR": ("CR", "DX"), "OT": ("OT", "SC")}
SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "NM": "1.2.840.10008.5.1.4.1.1.20",
    "XR": "1.2.840.10008.5.1.4.1.1.1",
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "OT": "1.2.840.10008.5.1.4.1.1.7",
}
UID_ROOT = "1.2.826.0.1.3680043.8.498."
SOURCES = 20
#: Series kinds: a wholly mislabelled series (every instance disagrees), a wholly uncertain one,
#: a noisy one (scattered uncertain and disagreeing instances), a clean one.
P_MISLABELLED, P_UNCERTAIN, P_NOISY = 0.016, 0.05, 0.35
#: In a noisy series, the chance that an instance disagrees / is uncertain.
Q_DISAGREE, Q_UNCERTAIN = 0.012, 0.16
KINDS = ("clean", "noisy", "uncertain", "mislabelled")

INSTANCE_COLUMNS = (
    "id",
    "sop_instance_uid",
    "study_instance_uid",
    "series_instance_uid",
    "sop_class_uid",
    "header_modality",
    "header_label",
    "transfer_syntax_uid",
    "rows",
    "columns",
    "number_of_frames",
    "institution_name",
    "station_name",
    "calling_ae",
    "source",
    "path",
    "status",
    "attempts",
    "prediction_id",
    "registered_at",
    "updated_at",
)
PREDICTION_COLUMNS = (
    "id",
    "instance_id",
    "model_id",
    "label",
    "confidence",
    "second_label",
    "second_confidence",
    "verdict",
    *(f"p_{label.lower()}" for label in LABELS),
    "created_at",
)
CHUNK = 100_000
#: The archive's instances were registered over this many days.
HISTORY_DAYS = 90


# --- the model -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundledModel:
    """The bundled model's identity and spec, as :func:`sorter.pipeline.register_model` stores it."""

    sha256: str
    spec: ModelSpec

    @classmethod
    def load(cls) -> BundledModel:
        sha = file_sha256(DEFAULT_MODEL_PATH)
        card = DEFAULT_MODEL_PATH.with_name(f"{sha}.json")
        if card.is_file():  # the spec beside the artefact: no torch needed
            spec = ModelSpec.from_dict(json.loads(card.read_text())["spec"])
        else:
            from sorter.model.artefact import read_spec

            spec = read_spec(DEFAULT_MODEL_PATH)[0]
        return cls(sha, spec)

    def register(self, session: Any) -> int:
        spec = self.spec
        model_id = model_id_for(
            session,
            {
                "sha256": self.sha256,
                "arch": spec.arch,
                "labels": ",".join(label.value for label in spec.labels),
                "min_confidence": spec.thresholds.min_confidence,
                "min_margin": spec.thresholds.min_margin,
                "path": str(DEFAULT_MODEL_PATH),
                "spec": spec.to_dict(),
            },
            {
                label: (spec.thresholds.agree_at[label], spec.thresholds.disagree_at[label])
                for label in spec.thresholds.agree_at
            },
        )
        activate_if_none(session, model_id)
        return model_id


# --- the synthetic archive -----------------------------------------------------------------------


@dataclass
class Archive:
    """``n`` instances: per-series and per-instance arrays, made once and written to both databases."""

    n: int
    series_uid: list[str]
    series_study: np.ndarray  # study index of each series
    series_header: np.ndarray  # label index of each series' header
    series_kind: np.ndarray  # index into KINDS
    series_modality: list[str]
    series_station: list[str]
    study_uid: list[str]
    study_source: np.ndarray
    first: np.ndarray  # first instance index of each series
    size: np.ndarray  # instances of each series
    inst_series: np.ndarray
    probs: np.ndarray  # (n, 8)
    label: np.ndarray
    second: np.ndarray
    verdict: np.ndarray  # 0 agree, 1 disagree, 2 uncertain
    series_time: list[str]  # when each series was registered and classified (UTC)
    path: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


def synthesize(n: int, spec: ModelSpec, seed: int) -> Archive:
    """Series, studies, sources and per-instance probabilities whose verdicts the model would give."""
    rng = np.random.default_rng(seed)
    # Series of 20..200 instances, ~50 on average; the last one takes what is left.
    sizes = np.minimum(200, 20 + np.floor(rng.exponential(30.0, size=n // 20 + 10))).astype(np.int64)
    cum = np.cumsum(sizes)
    n_series = int(np.searchsorted(cum, n) + 1)
    sizes = sizes[:n_series].copy()
    sizes[-1] -= int(cum[n_series - 1] - n)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    # Studies of 1..6 series, each from one source (a few large sources, a long tail).
    per_study = rng.choice(np.arange(1, 7), size=n_series, p=[0.3, 0.25, 0.2, 0.12, 0.08, 0.05])
    series_study = np.repeat(np.arange(n_series), per_study)[:n_series]
    n_studies = int(series_study[-1] + 1)
    source_weight = 1.0 / np.arange(1, SOURCES + 1) ** 0.8
    study_source = rng.choice(SOURCES, size=n_studies, p=source_weight / source_weight.sum())
    header = rng.choice(len(LABELS), size=n_series, p=[HEADER_SHARE[x] for x in LABELS])

    agree_at = np.array([spec.thresholds.agree_at[x] for x in LABELS])
    disagree_at = np.array([spec.thresholds.disagree_at[x] for x in LABELS])
    # Labels whose header test has room for "uncertain" (CT, MG and US have none: agree_at ~ disagree_at).
    gap = agree_at - disagree_at > 0.05
    gap_share = sum(HEADER_SHARE[x] for x, g in zip(LABELS, gap, strict=True) if g)
    r = rng.random(n_series)
    kind = np.zeros(n_series, dtype=np.int64)
    m, ug = P_MISLABELLED, P_UNCERTAIN / gap_share  # uncertain series only where the header test allows
    kind[(r >= m + ug) & (r < m + ug + P_NOISY)] = 1
    kind[(r >= m) & (r < m + ug) & gap[header]] = 2
    kind[r < m] = 3
    truth = header.copy()
    for s in np.flatnonzero(kind == 3):
        truth[s] = LABELS.index(str(rng.choice(MISLABELLED_AS[LABELS[header[s]]])))

    inst_series = np.repeat(np.arange(n_series), sizes)
    h = header[inst_series]
    k = kind[inst_series]
    cat = np.zeros(n, dtype=np.int64)  # wanted: 0 agree, 1 disagree, 2 uncertain
    cat[k == 3] = 1
    cat[k == 2] = 2
    u = rng.random(n)
    noisy = k == 1
    cat[noisy & (u < Q_DISAGREE)] = 1
    cat[noisy & (u >= Q_DISAGREE) & (u < Q_DISAGREE + Q_UNCERTAIN) & gap[h]] = 2
    # The label that wins besides the header's: the series' truth when mislabelled, else any other.
    other = (h + rng.integers(1, len(LABELS), size=n)) % len(LABELS)
    t = np.where(cat == 0, h, np.where(k == 3, truth[inst_series], other))

    probs = np.zeros((n, len(LABELS)))
    rows = np.arange(n)
    p_h = np.empty(n)
    p_t = np.zeros(n)
    a, d = agree_at[h], disagree_at[h]
    agree = cat == 0
    p_h[agree] = 0.80 + 0.199 * rng.beta(4.0, 1.5, size=int(agree.sum()))
    dis = cat == 1
    p_h[dis] = d[dis] * rng.uniform(0.02, 0.9, size=int(dis.sum()))
    p_t[dis] = (1 - p_h[dis]) * rng.uniform(0.6, 0.995, size=int(dis.sum()))
    unc = cat == 2
    lo, hi = d[unc] + 0.1 * (a[unc] - d[unc]), a[unc] - 0.1 * (a[unc] - d[unc])
    p_h[unc] = rng.uniform(lo, hi)
    p_t[unc] = (1 - p_h[unc]) * rng.uniform(0.55, 0.95, size=int(unc.sum()))
    # The rest spread over the other labels (a Dirichlet draw).
    rest = rng.gamma(0.5, size=(n, len(LABELS)))
    rest[rows, h] = 0.0
    rest[rows, t] = 0.0
    rest /= rest.sum(axis=1, keepdims=True)
    probs[:] = rest * (1.0 - p_h - p_t)[:, None]
    probs[rows, t] = np.where(t == h, 0.0, p_t)
    probs[rows, h] = p_h
    order = np.argsort(-probs, axis=1, kind="stable")
    label, second = order[:, 0], order[:, 1]
    # The verdict is the header test's (compare), computed from the probabilities written.
    p_header = probs[rows, h]
    verdict = np.where(p_header >= agree_at[h], 0, np.where(p_header <= disagree_at[h], 1, 2))
    assert (verdict == cat).mean() > 0.999, "the probabilities do not give the wanted verdicts"

    uid_tail = rng.integers(10**8, 10**9, size=n_series + n_studies)  # UID order is not insertion order
    series_uid = [f"{UID_ROOT}2.{uid_tail[s]}.{s + 1}" for s in range(n_series)]
    study_uid = [f"{UID_ROOT}1.{uid_tail[n_series + s]}.{s + 1}" for s in range(n_studies)]
    modality = [
        str(rng.choice(MODALITIES[LABELS[x]])) if LABELS[x] in MODALITIES else LABELS[x] for x in header
    ]
    station = [
        f"S{study_source[series_study[s]] + 1:02d}{LABELS[header[s]]}{rng.integers(1, 3)}"
        for s in range(n_series)
    ]
    # Registered and classified over the last HISTORY_DAYS, the newest an hour ago: nothing is
    # "changed since the review queue's last refresh" unless the benchmark changes it.
    newest = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    step = timedelta(days=HISTORY_DAYS) / n_series
    series_time = [
        (newest - (n_series - 1 - s) * step).strftime("%Y-%m-%d %H:%M:%S") for s in range(n_series)
    ]
    archive = Archive(
        n=n,
        series_uid=series_uid,
        series_study=series_study,
        series_header=header,
        series_kind=kind,
        series_modality=modality,
        series_station=station,
        study_uid=study_uid,
        study_source=study_source,
        first=first,
        size=sizes,
        inst_series=inst_series,
        probs=probs,
        label=label,
        second=second,
        verdict=verdict,
        series_time=series_time,
    )
    _check_verdicts(archive, spec, rng)
    archive.stats = {
        "instances": n,
        "series": n_series,
        "studies": n_studies,
        "sources": len(set(study_source.tolist())),
        "series_size_mean": round(float(sizes.mean()), 1),
        "series_size_min": int(sizes.min()),
        "series_size_max": int(sizes.max()),
        "series_by_kind": {name: int((kind == i).sum()) for i, name in enumerate(KINDS)},
        "verdict_share": {
            name: round(float((verdict == i).mean()), 4)
            for i, name in enumerate(("agree", "disagree", "uncertain"))
        },
        "disagree_in_mislabelled_series": round(
            float(((verdict == 1) & (k == 3)).sum() / max(1, (verdict == 1).sum())), 3
        ),
    }
    return archive


def _check_verdicts(archive: Archive, spec: ModelSpec, rng: np.random.Generator, sample: int = 3000) -> None:
    """The vectorised header test agrees with :func:`sorter.compare.compare` on a sample."""
    names = (Verdict.AGREE, Verdict.DISAGREE, Verdict.UNCERTAIN)
    for i in rng.choice(archive.n, size=min(sample, archive.n), replace=False):
        p = archive.probs[i]
        prediction = Prediction(
            Label(LABELS[archive.label[i]]),
            float(p[archive.label[i]]),
            Label(LABELS[archive.second[i]]),
            float(p[archive.second[i]]),
            {Label(x): float(v) for x, v in zip(LABELS, p, strict=True)},
        )
        header = Label(LABELS[archive.series_header[archive.inst_series[i]]])
        got = compare(header, prediction, spec.labels, spec.thresholds)
        assert got == names[archive.verdict[i]], (i, got, archive.verdict[i])


def _instance_chunks(archive: Archive, start: int, stop: int) -> Iterator[tuple[Any, ...]]:
    path = archive.path
    for i in range(start, stop):
        s = int(archive.inst_series[i])
        study = int(archive.series_study[s])
        src = int(archive.study_source[study]) + 1
        label = LABELS[archive.series_header[s]]
        yield (
            i + 1,
            f"{UID_ROOT}3.{s + 1}.{i - int(archive.first[s]) + 1}",
            archive.study_uid[study],
            archive.series_uid[s],
            SOP_CLASSES[label],
            archive.series_modality[s],
            label,
            "1.2.840.10008.1.2.1",
            512,
            512,
            1,
            f"Hospital {src:02d}",
            archive.series_station[s],
            archive.series_station[s][:16],
            f"site-{src:02d}",
            path,
            "done",
            1,
            i + 1,
            archive.series_time[s],
            archive.series_time[s],
        )


def _prediction_chunks(archive: Archive, model_id: int, start: int, stop: int) -> Iterator[tuple[Any, ...]]:
    verdicts = ("agree", "disagree", "uncertain")
    probs = archive.probs[start:stop].tolist()
    labels = archive.label[start:stop].tolist()
    seconds = archive.second[start:stop].tolist()
    kinds = archive.verdict[start:stop].tolist()
    series = archive.inst_series[start:stop].tolist()
    for j, p in enumerate(probs):
        top, runner = labels[j], seconds[j]
        yield (
            start + j + 1,
            start + j + 1,
            model_id,
            LABELS[top],
            p[top],
            LABELS[runner],
            p[runner],
            verdicts[kinds[j]],
            *p,
            archive.series_time[series[j]],
        )


def _copy_text(rows: Iterator[tuple[Any, ...]]) -> bytes:
    """Rows in COPY's text format (none of the values holds a tab, newline or backslash)."""
    out = []
    for row in rows:
        out.append(
            "\t".join("\\N" if v is None else repr(v) if isinstance(v, float) else str(v) for v in row)
        )
    return ("\n".join(out) + "\n").encode()


# --- the CT file ---------------------------------------------------------------------------------


def write_ct(dest: Path, source: Path | None) -> Path:
    """One real 512x512 CT slice at ``dest`` (uncompressed): ``source``, a corpus slice, or pydicom's
    CT_small.dcm upscaled 4x."""
    candidates = [source] if source else []
    corpus = REPO.parent / "shared" / "corpus"
    candidates += [corpus / c for c in CORPUS_CT]
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            ds = pydicom.dcmread(candidate)
            if (ds.Rows, ds.Columns) == (512, 512):
                shutil.copyfile(candidate, dest)
                return dest
    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    big = np.kron(ds.pixel_array, np.ones((4, 4), dtype=ds.pixel_array.dtype))
    ds.PixelData = big.tobytes()
    ds.Rows, ds.Columns = big.shape
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(dest, enforce_file_format=True)
    return dest


# --- loading -------------------------------------------------------------------------------------


def _insert_sql(table: str, columns: tuple[str, ...]) -> str:
    quoted = ", ".join(f'"{c}"' for c in columns)
    return f"INSERT INTO {table} ({quoted}) VALUES ({', '.join('?' * len(columns))})"


def load_sqlite(url: str, archive: Archive, model: BundledModel) -> dict[str, Any]:
    """Migrate, register the model, then ``executemany`` in transactions of :data:`CHUNK` rows."""
    started = time.perf_counter()
    engine = create_db_engine(url)
    upgrade(engine)
    migrated = time.perf_counter()
    with make_session_factory(engine)() as session:
        model_id = model.register(session)
        session.commit()
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("PRAGMA foreign_keys=OFF")  # the rows are consistent by construction
        cursor.execute("PRAGMA synchronous=OFF")
        cursor.execute("PRAGMA cache_size=-262144")  # 256 MiB while loading
        for start in range(0, archive.n, CHUNK):
            stop = min(start + CHUNK, archive.n)
            cursor.executemany(
                _insert_sql("instances", INSTANCE_COLUMNS), list(_instance_chunks(archive, start, stop))
            )
            cursor.executemany(
                _insert_sql("predictions", PREDICTION_COLUMNS),
                list(_prediction_chunks(archive, model_id, start, stop)),
            )
            raw.commit()
            _progress("sqlite", stop, archive.n, started)
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        cursor.close()
    finally:
        raw.close()
    loaded = time.perf_counter()
    engine.dispose()
    return {
        "migrate_s": round(migrated - started, 2),
        "load_s": round(loaded - migrated, 2),
        "model_id": model_id,
    }


def _conninfo(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def load_postgresql(url: str, archive: Archive, model: BundledModel) -> dict[str, Any]:
    """Migrate, register the model, ``COPY`` both tables, set the sequences."""
    import psycopg

    started = time.perf_counter()
    engine = create_db_engine(url)
    upgrade(engine)
    migrated = time.perf_counter()
    with make_session_factory(engine)() as session:
        model_id = model.register(session)
        session.commit()
    engine.dispose()
    with psycopg.connect(_conninfo(url)) as connection:
        connection.execute("SET TIME ZONE 'UTC'")  # the timestamps written are UTC
        with connection.cursor() as cursor:
            for start in range(0, archive.n, CHUNK):
                stop = min(start + CHUNK, archive.n)
                cols = ", ".join(f'"{c}"' for c in INSTANCE_COLUMNS)
                with cursor.copy(f"COPY instances ({cols}) FROM STDIN") as copy:
                    copy.write(_copy_text(_instance_chunks(archive, start, stop)))
                cols = ", ".join(f'"{c}"' for c in PREDICTION_COLUMNS)
                with cursor.copy(f"COPY predictions ({cols}) FROM STDIN") as copy:
                    copy.write(_copy_text(_prediction_chunks(archive, model_id, start, stop)))
                connection.commit()
                _progress("postgresql", stop, archive.n, started)
            for table in ("instances", "predictions"):
                cursor.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
                )
        connection.commit()
    loaded = time.perf_counter()
    return {
        "migrate_s": round(migrated - started, 2),
        "load_s": round(loaded - migrated, 2),
        "model_id": model_id,
    }


def vacuum_analyze(url: str) -> float:
    """``VACUUM ANALYZE`` the whole PostgreSQL database (what autovacuum does after a bulk load);
    run after the reviews are written, so that their statistics exist too."""
    import psycopg

    started = time.perf_counter()
    with psycopg.connect(_conninfo(url), autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")
    return round(time.perf_counter() - started, 2)


def _progress(db: str, done: int, total: int, started: float) -> None:
    if done == total or done % (5 * CHUNK) == 0:
        print(f"  {db}: {done:,}/{total:,} instances ({time.perf_counter() - started:.0f} s)", flush=True)


def record_reviews(url: str, archive: Archive, seed: int) -> dict[str, int]:
    """A few hundred decisions through the real write path: flagged and uncertain series, some
    superseded by a later decision, some on instances."""
    from sorter.review import store

    rng = random.Random(seed)
    mislabelled = [archive.series_uid[s] for s in np.flatnonzero(archive.series_kind == 3)]
    uncertain = [archive.series_uid[s] for s in np.flatnonzero(archive.series_kind == 2)]
    scale = min(1.0, archive.n / 1_000_000) ** 0.5  # a smaller archive gets fewer decisions
    picks = [(uid, "mislabelled") for uid in rng.sample(mislabelled, min(len(mislabelled), int(120 * scale)))]
    picks += [(uid, "uncertain") for uid in rng.sample(uncertain, min(len(uncertain), int(180 * scale)))]
    counts = {"series": 0, "superseded": 0, "instance": 0}
    engine, sessions = open_database(url)
    try:
        with sessions() as session:
            for uid, kind in picks:
                if kind == "mislabelled":
                    decision = rng.choices(["confirm", "reject", "skip"], weights=[60, 25, 15])[0]
                else:
                    decision = rng.choice(["reject", "skip"])
                # A few decisions are revised: a skip first, the decision later (the skip stays as
                # the audit trail, no longer current).
                steps = ["skip", decision] if rng.random() < 0.1 else [decision]
                for step in steps:
                    store.record(session, store.Decision("series", uid, step, "bench", note="bench"))
                counts["series"] += 1
                counts["superseded"] += len(steps) - 1
            # Decisions on single instances: scattered disagreements in noisy series.
            noisy_dis = np.flatnonzero(
                (archive.verdict == 1) & (archive.series_kind[archive.inst_series] == 1)
            )
            for i in rng.sample(noisy_dis.tolist(), min(len(noisy_dis), int(40 * scale))):
                s = int(archive.inst_series[i])
                sop = f"{UID_ROOT}3.{s + 1}.{i - int(archive.first[s]) + 1}"
                store.record(session, store.Decision("instance", sop, "reject", "bench"))
                counts["instance"] += 1
            session.commit()
    finally:
        engine.dispose()
    return counts


# --- timing --------------------------------------------------------------------------------------


class SqlTimer:
    """Times every statement the engine runs while a case is timed (per request: total, slowest).

    A statement's time runs from its execution until the next statement starts or the connection
    goes back to the pool, so that it includes fetching the rows: SQLite computes most of a
    grouped result while it is fetched, not when it is executed.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self.statements: list[tuple[float, str]] = []
        sa.event.listen(engine, "before_cursor_execute", self._before)
        sa.event.listen(engine, "checkin", self._end)

    def _end(self, *_args: Any) -> None:
        open_ = getattr(self._local, "open", None)
        if open_ is not None:
            started, statement = open_
            self._local.open = None
            with self._lock:
                self.statements.append((time.perf_counter() - started, statement))

    def _before(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self._end()
        self._local.open = (time.perf_counter(), statement)

    def take(self) -> list[tuple[float, str]]:
        with self._lock:
            out, self.statements = self.statements, []
        return out


def _summary(
    name: str, samples: list[float], target: float | None, sql: list[list[tuple[float, str]]], **extra: Any
) -> dict[str, Any]:
    ms = np.array(samples) * 1000.0
    per_request_sql = [sum(t for t, _ in stmts) * 1000.0 for stmts in sql]
    slowest: dict[str, list[float]] = {}
    for stmts in sql:
        for t, s in stmts:
            slowest.setdefault(" ".join(s.split())[:160], []).append(t * 1000.0)
    top = sorted(slowest.items(), key=lambda kv: -max(kv[1]))[:2]
    p95 = float(np.percentile(ms, 95)) if len(ms) else float("nan")
    return {
        "case": name,
        "n": len(samples),
        "median_ms": round(float(np.median(ms)), 1) if len(ms) else None,
        "p95_ms": round(p95, 1) if len(ms) else None,
        "max_ms": round(float(ms.max()), 1) if len(ms) else None,
        "sql_median_ms": round(statistics.median(per_request_sql), 1) if per_request_sql else None,
        "statements_per_request": round(statistics.mean(len(s) for s in sql), 1) if sql else None,
        "slowest_statements": [
            {"sql": s, "n": len(t), "median_ms": round(statistics.median(t), 1), "max_ms": round(max(t), 1)}
            for s, t in top
        ],
        "target_p95_ms": target,
        "pass": (p95 < target) if target is not None and len(ms) else None,
        **extra,
    }


_NEXT = re.compile(r'<a href="([^"]+)" rel="next" id="next-page"')


@dataclass
class Case:
    """One timed thing: fixed URLs (``urls``), or a walk of the queue's pages from ``start``."""

    name: str
    target: float | None
    urls: Callable[[], Iterator[str]] | None = None  # fixed URLs (series pages, thumbnails)
    start: str | None = None  # a queue walk: page 1's URL
    json_walk: bool = False
    check: Callable[[Any], None] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def run_case(
    client: Any, timer: SqlTimer, case: Case, requests: int, warmup: int, budget_s: float
) -> dict[str, Any]:
    """Warm up, then time ``requests`` requests (fewer when the case exceeds ``budget_s``)."""
    samples: list[float] = []
    sql: list[list[tuple[float, str]]] = []
    pages = {"deepest": 0, "restarts": 0}
    walk_url, page_no = case.start, 1
    fixed = case.urls() if case.urls else None

    def next_url() -> str:
        if fixed is not None:
            return next(fixed)
        assert walk_url is not None
        return walk_url

    def advance(response: Any) -> None:
        nonlocal walk_url, page_no
        if fixed is not None or case.start is None:
            return
        if case.json_walk:
            after = response.json()["next_after"]
            nxt = f"{case.start}&after={after}" if after else None
        else:
            m = _NEXT.search(response.text)
            nxt = html.unescape(m.group(1)) if m else None
        if nxt is None:
            walk_url, page_no = case.start, 1
            pages["restarts"] += 1
        else:
            walk_url, page_no = nxt, page_no + 1
            pages["deepest"] = max(pages["deepest"], page_no)

    started = time.perf_counter()
    for k in range(warmup + requests):
        url = next_url()
        timer.take()
        t0 = time.perf_counter()
        response = client.get(url)
        took = time.perf_counter() - t0
        statements = timer.take()
        if response.status_code != 200:
            raise SystemExit(f"{case.name}: GET {url} -> {response.status_code}: {response.text[:300]}")
        if case.check is not None:
            case.check(response)
        advance(response)
        if k >= warmup:
            samples.append(took)
            sql.append(statements)
            if time.perf_counter() - started > budget_s and len(samples) >= 10:
                break
    extra: dict[str, Any] = dict(case.info)
    if case.start is not None:
        extra["pages"] = {"deepest_page": pages["deepest"], "walked_to_end": pages["restarts"]}
    if len(samples) < requests:
        extra["note"] = f"stopped after {len(samples)} requests: over the {budget_s:.0f} s budget"
    return _summary(case.name, samples, case.target, sql, **extra)


def _first_page_rows(client: Any, query: str) -> int:
    response = client.get(f"/api/queue?{query}")
    return len(response.json()["rows"]) if response.status_code == 200 else -1


def _png(response: Any) -> None:
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"


def bench_database(url: str, archive: Archive, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Every case against the app over ``url``."""
    from starlette.testclient import TestClient

    from sorter.review.security import Access
    from sorter.review.state import Refresher
    from sorter.review.web import Overview, create_app

    engine, sessions = open_database(url)
    rng = random.Random(seed)
    refresher, series_state = build_series_state(sessions, archive, rng)
    timer = SqlTimer(engine)
    flagged = [archive.series_uid[s] for s in np.flatnonzero(archive.series_kind == 3)]
    clean = [archive.series_uid[s] for s in np.flatnonzero(archive.series_kind == 0)]

    def cycle(items: list[str]) -> Callable[[], Iterator[str]]:
        def gen() -> Iterator[str]:
            while True:
                yield rng.choice(items)

        return gen

    def ids() -> Iterator[str]:
        while True:
            yield f"/instances/{rng.randint(1, archive.n)}/thumb.png"

    queue_walks = [
        ("queue series (walk pages)", "level=series"),
        ("queue study (walk pages)", "level=study"),
        ("queue instance (walk pages)", "level=instance"),
        ("queue series verdict=uncertain", "level=series&verdict=uncertain"),
        ("queue series label=CT", "level=series&label=CT"),
        ("queue series review=any", "level=series&review=any"),
        ("queue series min_confidence=0.9", "level=series&min_confidence=0.9"),
        ("queue series header=MR", "level=series&header=MR"),
        ("queue series source=site-03", "level=series&source=site-03"),
        ("queue study review=any", "level=study&review=any"),
        ("queue instance review=any min_confidence=0.9", "level=instance&review=any&min_confidence=0.9"),
    ]
    cases = [
        Case("queue series page 1", QUEUE_TARGET_MS, urls=lambda: iter(lambda: "/queue?level=series", None))
    ]
    cases += [Case(name, QUEUE_TARGET_MS, start=f"/queue?{q}") for name, q in queue_walks]
    cases.append(
        Case(
            "api/queue series (walk next_after)",
            QUEUE_TARGET_MS,
            start="/api/queue?level=series",
            json_walk=True,
        )
    )
    cases.append(
        Case("series page, flagged series", QUEUE_TARGET_MS, urls=cycle([f"/series/{u}" for u in flagged]))
    )
    cases.append(
        Case("series page, clean series", QUEUE_TARGET_MS, urls=cycle([f"/series/{u}" for u in clean]))
    )
    cases.append(Case("thumbnail 512x512 CT", THUMB_TARGET_MS, urls=ids, check=_png))

    results: list[dict[str, Any]] = []
    try:
        with TestClient(create_app(sessions, Access(reviewer="bench"), refresher)) as client:
            client.get("/healthz")
            for case in cases:
                if args.only and not any(part in case.name for part in args.only.split(",")):
                    continue
                query = case.start.split("?", 1)[1] if case.start else None
                if query is not None:
                    case.info["page1_rows"] = _first_page_rows(client, query)
                row = run_case(client, timer, case, args.requests, args.warmup, args.case_budget_s)
                results.append(row)
                print(_line(row), flush=True)
        # A reviewer reads a page for longer than the refresher's interval: then the next queue
        # request pays the incremental refresh of series_state first. An app whose refresher is
        # always due times that.
        due = Case("queue series page 1, refresh due", QUEUE_TARGET_MS, urls=cycle(["/queue?level=series"]))
        if not args.only or any(part in due.name for part in args.only.split(",")):
            eager = Refresher(interval_s=0.0)
            with TestClient(create_app(sessions, Access(reviewer="bench"), eager)) as client:
                row = run_case(client, timer, due, args.requests, args.warmup, args.case_budget_s)
            row["note"] = "every request refreshes series_state (Refresher interval 0), as after 10 s idle"
            results.append(row)
            print(_line(row), flush=True)
        # The page serves the last numbers and recomputes them in the background: what that
        # background computation costs is timed here, synchronously.
        overview, overview_sql = [], []
        numbers = Overview(sessions)
        for _ in range(args.overview_runs):
            timer.take()
            t0 = time.perf_counter()
            numbers.compute()
            overview.append(time.perf_counter() - t0)
            overview_sql.append(timer.take())
        over = None
        if overview:
            over = _summary(
                "overview, computed in the background",
                overview,
                None,
                overview_sql,
                note="aggregates the whole archive; the page serves the last result; no target",
            )
            print(_line(over), flush=True)
    finally:
        engine.dispose()
    return {"series_state": series_state, "cases": results, "overview_cold": over}


def build_series_state(
    sessions: Any, archive: Archive, rng: random.Random, touched: int = 10
) -> tuple[Any, dict[str, Any]]:
    """What ``sorter serve`` does before it serves: build the queue's summary table
    (``series_state``). Then what its refreshes cost: with nothing changed (with and without the
    prune of vanished series), and after ``touched`` series were reclassified (their instances'
    ``updated_at`` stamped now, as a scan batch stamps them)."""
    from sorter.db.queries import instances
    from sorter.review.state import Refresher, refresh

    refresher = Refresher()
    with sessions() as session:
        built = refresher.ensure(session, force=True)
    assert built is not None
    out: dict[str, Any] = {
        "build": {"kind": built.kind, "series": built.series, "s": round(built.seconds, 2)}
    }
    print(f"  series_state {built.kind}: {built.series} series in {built.seconds:.1f} s", flush=True)
    for name, prune in (("refresh_unchanged_ms", False), ("refresh_unchanged_with_prune_ms", True)):
        with sessions() as session:
            result = refresh(session, prune=prune)
        out[name] = round(result.seconds * 1000, 1)
    uids = rng.sample(archive.series_uid, touched)
    with sessions() as session:
        session.execute(
            sa.update(instances)
            .where(instances.c.series_instance_uid.in_(uids))
            .values(updated_at=sa.func.now())
        )
        session.commit()
    with sessions() as session:
        result = refresh(session, prune=False)
    out[f"refresh_after_{touched}_series_changed_ms"] = round(result.seconds * 1000, 1)
    out["refresh_after_change_series"] = result.series
    with sessions() as session:  # back to "nothing changed", so that the timed refreshes are alike
        session.execute(
            sa.update(instances)
            .where(instances.c.series_instance_uid.in_(uids))
            .values(updated_at=instances.c.registered_at)
        )
        session.commit()
    print(f"  series_state refreshes: {out}", flush=True)
    return refresher, out


def _line(row: dict[str, Any]) -> str:
    verdict = {True: "PASS", False: "FAIL", None: "-"}[row["pass"]]
    return (
        f"  {row['case']:<46} n={row['n']:>3}  median {row['median_ms']:>8.1f}  p95 {row['p95_ms']:>8.1f}"
        f"  max {row['max_ms']:>8.1f} ms  (sql {row['sql_median_ms'] or 0:>7.1f})  {verdict}"
    )


# --- databases -----------------------------------------------------------------------------------


def create_postgres_database() -> str:
    """A throwaway database on the server of :data:`ADMIN_URL` (as tests/db_fixtures.py makes one)."""
    admin = create_db_engine(ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
    name = f"sorter_bench_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        raise SystemExit(f"PostgreSQL unreachable at {ADMIN_URL}: {exc}") from exc
    finally:
        admin.dispose()
    return sa.make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(url: str) -> None:
    admin = create_db_engine(ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{sa.make_url(url).database}" WITH (FORCE)'))
    finally:
        admin.dispose()


def database_size_mb(url: str) -> float:
    engine = create_db_engine(url)
    try:
        if engine.dialect.name == "sqlite":
            db = Path(sa.make_url(url).database or "")
            return round(sum(p.stat().st_size for p in db.parent.glob(db.name + "*")) / 2**20, 1)
        with engine.connect() as connection:
            size = connection.execute(sa.text("SELECT pg_database_size(current_database())")).scalar_one()
        return round(size / 2**20, 1)
    finally:
        engine.dispose()


def server_version(url: str) -> str:
    engine = create_db_engine(url)
    try:
        with engine.connect() as connection:
            if engine.dialect.name == "sqlite":
                return "SQLite " + sqlite3.sqlite_version
            return str(connection.execute(sa.text("SHOW server_version")).scalar_one()).split()[0]
    finally:
        engine.dispose()


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    with contextlib.suppress(ValueError, OSError):
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "python": sys.version.split()[0]}


def main() -> None:
    """Generate, serve, time; prints a table and writes JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--requests", type=int, default=50, help="timed requests per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests per case first")
    parser.add_argument("--overview-runs", type=int, default=3)
    parser.add_argument(
        "--case-budget-s", type=float, default=120.0, help="stop a case early past this (>= 10 requests)"
    )
    parser.add_argument("--seed", type=int, default=20261204)
    parser.add_argument(
        "--ct-file", type=Path, default=None, help="a 512x512 CT file for every instance's path"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for the SQLite file and the CT (default: a temp dir)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the databases and --work (meta.json says where)"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="benchmark the databases a --keep run left in --work"
    )
    parser.add_argument(
        "--only", default=None, help="time only the cases whose name holds one of these comma-separated parts"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results-review-2core.json")
    args = parser.parse_args()
    if args.reuse and args.work is None:
        parser.error("--reuse needs --work")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-review-"))
    work.mkdir(parents=True, exist_ok=True)
    meta_path = work / "meta.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if args.reuse else {}
    if args.reuse:
        args.instances = meta["instances"]
        args.seed = meta["seed"]
    model = BundledModel.load()
    wanted = ("sqlite", "postgresql") if args.db == "both" else (args.db,)

    print(f"synthesising {args.instances:,} instances", flush=True)
    t0 = time.perf_counter()
    archive = synthesize(args.instances, model.spec, args.seed)
    synth_s = time.perf_counter() - t0
    ct = work / "ct-512.dcm"
    if not ct.exists():
        write_ct(ct, args.ct_file)
    archive.path = str(ct.resolve())
    print(f"  {json.dumps(archive.stats)} ({synth_s:.1f} s)", flush=True)

    result: dict[str, Any] = {
        "machine": machine(),
        "instances": args.instances,
        "seed": args.seed,
        "requests_per_case": args.requests,
        "warmup_per_case": args.warmup,
        "targets_p95_ms": {"queue_and_series_page": QUEUE_TARGET_MS, "thumbnail": THUMB_TARGET_MS},
        "archive": archive.stats,
        "ct_file": {"rows": 512, "columns": 512, "bytes": ct.stat().st_size},
        "synthesis_s": round(synth_s, 1),
        "databases": {},
    }
    made: list[str] = []
    try:
        for db in wanted:
            print(f"\n== {db}", flush=True)
            generation: dict[str, Any] = {}
            if args.reuse:
                url = meta["urls"][db]
            else:
                url = f"sqlite:///{work / 'review.db'}" if db == "sqlite" else create_postgres_database()
                if db == "sqlite" and (work / "review.db").exists():
                    for stale in work.glob("review.db*"):
                        stale.unlink()
                made.append(url)
                g0 = time.perf_counter()
                loader = load_sqlite if db == "sqlite" else load_postgresql
                generation = loader(url, archive, model)
                r0 = time.perf_counter()
                generation["reviews"] = record_reviews(url, archive, args.seed)
                generation["reviews_s"] = round(time.perf_counter() - r0, 2)
                if db == "postgresql":
                    generation["vacuum_analyze_s"] = vacuum_analyze(url)
                generation["total_s"] = round(time.perf_counter() - g0, 1)
                print(f"  generated in {generation['total_s']} s: {generation}", flush=True)
                meta.setdefault("urls", {})[db] = url
                meta.update(instances=args.instances, seed=args.seed)
                meta_path.write_text(json.dumps(meta, indent=2) + "\n")
            served = bench_database(url, archive, args, args.seed)
            result["databases"][db] = {
                "server": server_version(url),
                "size_mib": database_size_mb(url),
                "generation": generation or {"reused": True},
                **served,
            }
    finally:
        if not args.keep and not args.reuse:
            for url in made:
                if url.startswith("postgresql"):
                    drop_postgres_database(url)
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)
            else:
                for stale in work.glob("review.db*"):
                    stale.unlink()
        elif made:
            print(f"\nkept: {meta_path} ({', '.join(made)})", flush=True)

    checked = [
        (db, row["case"], row["pass"])
        for db, r in result["databases"].items()
        for row in r["cases"]
        if row["pass"] is not None
    ]
    result["all_pass"] = all(ok for _, _, ok in checked)
    result["failing"] = [f"{db}: {case}" for db, case, ok in checked if not ok]
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{args.instances:,} instances; p95 targets {QUEUE_TARGET_MS:.0f} ms (queue, series page), "
        f"{THUMB_TARGET_MS:.0f} ms (thumbnail)"
    )
    for db, r in result["databases"].items():
        print(
            f"{db} ({r['server']}, {r['size_mib']} MiB, generated in {r['generation'].get('total_s', '-')} s)"
        )
        for row in [*r["cases"], *([r["overview_cold"]] if r["overview_cold"] else [])]:
            print(_line(row))
    print(
        f"all pass: {result['all_pass']}"
        + (f"; failing: {', '.join(result['failing'])}" if result["failing"] else "")
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
