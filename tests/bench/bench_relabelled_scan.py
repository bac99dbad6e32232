"""`sorter scan` on relabelled copies of the corpus's DICOM files, end to end.

Every DICOM file of the corpus manifest is copied once per other label with that label's Modality
written in (CT, MR, PT, NM, DX, MG, US, OT) under new SOP Instance and Series UIDs, its SOP class
left as it was (what a router's or an anonymiser's tag edit does). One `sorter scan` of the copies
and the corpus itself, into a fresh SQLite database, then: the verdicts of right headers (the
originals) and of relabelled copies, split by whether the SOP class contradicts the Modality.

The model has seen the corpus (the bundled one trained on all of it), so the pixels are
optimistic here; ``bench_header_class.py`` gives the leave-sources-out figure. Compare code
versions with ``--sorter-root`` (a worktree of an older commit: its `sorter` runs the scan).

Run: .venv/bin/python tests/bench/bench_relabelled_scan.py [--sorter-root /tmp/old] [--out F.json]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sorter.taxonomy import class_contradiction  # noqa: E402

sys.path.insert(0, str(ROOT / "tests" / "bench"))
from bench_header_class import MODALITY  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpus"


def write_copies(corpus: Path, out: Path) -> int:
    """Relabelled copies of every DICOM file of ``corpus``'s manifest; returns how many."""
    rows = [r for r in csv.DictReader((corpus / "manifest.csv").open()) if r["format"] == "dcm"]
    n = 0
    for row in rows:
        for label, modality in MODALITY.items():
            if label == row["label"]:
                continue
            ds = pydicom.dcmread(corpus / row["path"], force=True)
            ds.Modality = modality
            ds.SOPInstanceUID = generate_uid()
            if "MediaStorageSOPInstanceUID" in getattr(ds, "file_meta", {}):
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            series = f"{ds.get('SeriesInstanceUID', row['path'])}/{label}"  # one copied series per label
            ds.SeriesInstanceUID = "2.25." + str(int(hashlib.sha1(series.encode()).hexdigest()[:30], 16))
            folder = out / f"{row['label']}_as_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            ds.save_as(folder / f"{n:05d}.dcm", enforce_file_format=False)
            n += 1
    return n


def shares(db: Path, copies: Path) -> dict[str, dict[str, float | int]]:
    """Verdict shares of right headers and relabelled copies, by whether the class contradicts."""
    tally: Counter[tuple[str, str, str]] = Counter()
    query = (
        "SELECT i.path, i.header_modality, i.sop_class_uid, p.verdict FROM instances i "
        "JOIN predictions p ON p.id = i.prediction_id WHERE i.status = 'done'"
    )
    for path, modality, sop_class, verdict in sqlite3.connect(db).execute(query):
        kind = "relabelled" if path.startswith(str(copies)) else "right"
        split = (
            "class contradicts"
            if class_contradiction(modality, sop_class)
            else "class agrees or says nothing"
        )
        for group in (f"{kind}, all", f"{kind}, {split}"):
            tally[(group, verdict, "")] += 1
    out: dict[str, dict[str, float | int]] = {}
    for group in sorted({g for g, _, _ in tally}):
        total = sum(v for (g, _, _), v in tally.items() if g == group)
        out[group] = {"n": total} | {
            verdict: round(v / total, 4) for (g, verdict, _), v in sorted(tally.items()) if g == group
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--sorter-root", type=Path, default=ROOT, help="the code tree whose sorter scans")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # pydicom's notes on the corpus's odd character sets
    with tempfile.TemporaryDirectory(prefix="relabelled-") as tmp:
        work = Path(tmp)
        copies = work / "copies"
        n = write_copies(args.corpus, copies)
        env = {**os.environ, "PYTHONPATH": str(args.sorter_root.resolve())}
        command = [sys.executable, "-m", "sorter", "scan", "--no-progress", str(copies), str(args.corpus)]
        subprocess.run(command, cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
        result = {
            "copies": n,
            "sorter_root": str(args.sorter_root),
            "shares": shares(work / "sorter.db", copies),
        }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
