"""What the current model's head sees for each instance: its embedding.

An adaptation fine-tunes the current model's head (the last layer: a linear map of the pooled
backbone output and the scalar features, :class:`sorter.model.network.SorterNet`) on the
archive's own header labels. The backbone stays as it is, so each instance is decoded and
passed through the backbone once, and every cross-fitted fold and the final fit then train on
those embeddings: seconds per fold instead of a full fine-tune per fold (why adapting 10 000
instances fits in minutes on two cores).

Decoding goes through the service's own path (:func:`sorter.decode.decode_one`, in worker
processes), so the embeddings are exactly what the served model computes; a file that no
longer decodes is left out with its reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from sorter.adaptation.decoding import decode_chunk
from sorter.decode import Prepared, init_decode_process
from sorter.jobs.local import _pool_context
from sorter.model.network import SorterNet
from sorter.model.spec import PreprocessParams

log = logging.getLogger(__name__)

#: Instances decoded per task sent to a worker process.
CHUNK = 16


@dataclass
class Embeddings:
    """Head inputs (N, D) of the instances that decoded, in ``ids`` order, and why others did not."""

    ids: np.ndarray
    vectors: np.ndarray
    failures: dict[int, str] = field(default_factory=dict)


def head_inputs(network: SorterNet, images: np.ndarray, features: np.ndarray) -> np.ndarray:
    """What ``network.head`` sees for preprocessed frames (N, C, S, S) and features (N, F)."""
    device = next(network.parameters()).device
    with torch.inference_mode():
        pooled = network.backbone(torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(device))
        if network.n_features:
            pooled = torch.cat([pooled, torch.from_numpy(features).to(device, pooled.dtype)], dim=1)
        return pooled.float().cpu().numpy()


def embed_files(
    items: Sequence[tuple[int, str]],
    network: SorterNet,
    params: PreprocessParams,
    *,
    frames: int = 1,
    workers: int = 1,
    batch: int = 64,
    on_progress: Callable[[int], None] | None = None,
) -> Embeddings:
    """Decode ``(instance id, path)`` pairs in ``workers`` processes and embed them.

    A multi-frame instance's embedding is the mean of its frames' (the head is linear, so its
    logits are the mean of the frames' logits).
    """
    network.eval()
    ids: list[int] = []
    vectors: list[np.ndarray] = []
    failures: dict[int, str] = {}
    pending: list[Prepared] = []

    def flush() -> None:
        if not pending:
            return
        images = np.concatenate([p.images for p in pending])
        features = np.concatenate([p.features for p in pending])
        out = head_inputs(network, images, features)
        start = 0
        for p in pending:
            ids.append(p.instance_id)
            vectors.append(out[start : start + len(p.images)].mean(axis=0))
            start += len(p.images)
        pending.clear()

    chunks = [list(items[i : i + CHUNK]) for i in range(0, len(items), CHUNK)]
    jobs = [(chunk, params, frames) for chunk in chunks]
    # The service's decode processes: forkserver (no torch, threads or CUDA state inherited), and
    # each exits when this process dies.
    with ProcessPoolExecutor(
        max(1, workers),
        mp_context=_pool_context(),
        initializer=init_decode_process,
        initargs=(os.getpid(), None),
    ) as pool:
        for chunk, results in zip(chunks, pool.map(decode_chunk, jobs), strict=True):
            for (instance_id, _path), result in zip(chunk, results, strict=True):
                if isinstance(result, str):
                    failures[instance_id] = result
                else:
                    pending.append(result)
            if sum(len(p.images) for p in pending) >= batch:
                flush()
            if on_progress is not None:
                on_progress(len(chunk))
    flush()
    width = network.head.in_features
    return Embeddings(
        np.asarray(ids, dtype=np.int64),
        np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, width), np.float32),
        failures,
    )
