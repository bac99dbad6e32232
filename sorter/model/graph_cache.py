"""A cache of the ONNX graphs exported from model artefacts, so that a CPU run can skip torch.

The CPU runtime runs a graph exported from the artefact's network, and the
export needs torch and torchvision: importing them, loading and exporting took
about 6 of the 9.7 s that ``sorter classify`` spent on one file on the 2-core
dev machine. The graph depends only on the artefact's bytes, so it is cached
under the artefact file's sha256 (which the model's identity already needs):
the next CPU run on the same artefact reads the spec and the graph from here
and never imports torch.

An entry is two files, ``<sha256>.onnx`` and ``<sha256>.json``, each written
to a temporary name and renamed, the JSON last. A missing, partial or
corrupt entry is a miss and the caller exports again; a cache that cannot
be written (a read-only home) costs the next run its export, nothing more.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sorter.errors import IncompatibleModelError
from sorter.fsutil import atomic_file
from sorter.model.spec import ModelSpec

log = logging.getLogger(__name__)

#: Layout of an entry; a different one is a miss.
CACHE_FORMAT = 1


@dataclass(frozen=True)
class CachedGraph:
    """An artefact's spec and its exported ONNX graph."""

    spec: ModelSpec
    graph: bytes


class GraphCache:
    """Exported graphs in ``folder``, keyed by the sha256 of the artefact file they came from."""

    def __init__(self, folder: Path, read_only: bool = False) -> None:
        self.read_only = read_only
        self.folder = Path(folder)

    def _paths(self, artefact_sha256: str) -> tuple[Path, Path]:
        return self.folder / f"{artefact_sha256}.onnx", self.folder / f"{artefact_sha256}.json"

    def get(self, artefact_sha256: str) -> CachedGraph | None:
        """The entry for this artefact, or ``None`` when there is no sound one."""
        graph_path, meta_path = self._paths(artefact_sha256)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            graph = graph_path.read_bytes()
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("graph cache entry %s unreadable (%s); exporting again", meta_path, exc)
            return None
        if (
            not isinstance(meta, dict)
            or meta.get("format") != CACHE_FORMAT
            or meta.get("artefact_sha256") != artefact_sha256
            or meta.get("graph_sha256") != hashlib.sha256(graph).hexdigest()
        ):
            log.warning("graph cache entry %s is stale or corrupt; exporting again", meta_path)
            return None
        try:
            spec = ModelSpec.from_dict(meta["spec"])
        except (IncompatibleModelError, KeyError, TypeError) as exc:
            log.warning("graph cache entry %s: %s; exporting again", meta_path, exc)
            return None
        return CachedGraph(spec, graph)

    def put(self, artefact_sha256: str, spec: dict[str, Any], graph: bytes) -> None:
        """Store an artefact's spec (as in the artefact) and graph; a failure is logged, not raised."""
        if self.read_only:  # the graph shipped beside an artefact: written by `sorter-train export` only
            return
        graph_path, meta_path = self._paths(artefact_sha256)
        meta = {
            "format": CACHE_FORMAT,
            "artefact_sha256": artefact_sha256,
            "graph_sha256": hashlib.sha256(graph).hexdigest(),
            "spec": spec,
        }
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomic(graph_path, graph)
            _write_atomic(meta_path, json.dumps(meta, sort_keys=True).encode())
        except OSError as exc:
            log.info("graph cache %s not written (%s): the next run exports again", self.folder, exc)


def _write_atomic(path: Path, data: bytes) -> None:
    # Concurrent writers (several worker processes starting at once) each
    # rename a complete file of the same content: the last rename wins.
    with atomic_file(path) as out:
        out.write(data)
