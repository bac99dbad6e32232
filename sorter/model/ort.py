"""ONNX Runtime on the CPU, torch-free: for decode processes, and for runs on a cached graph.

:func:`sorter.model.runtime.export_onnx` exports the graph (which needs torch)
once; the graph's bytes are all a decode process, or a later run that finds
them in :mod:`sorter.model.graph_cache`, needs to build the same session here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class Forward(Protocol):
    """A forward pass: images (N, C, S, S), features (N, F) and optional header codes (N,) in,
    logits (N, L) out (see :class:`sorter.model.runtime.Runner`)."""

    def __call__(
        self, images: np.ndarray, features: np.ndarray, headers: np.ndarray | None = None
    ) -> np.ndarray:
        """Float32 logits for one batch."""


def logits_per_instance(
    forward: Forward,
    images: Sequence[np.ndarray],
    features: Sequence[np.ndarray],
    headers: np.ndarray | None = None,
) -> list[np.ndarray]:
    """One forward pass over several instances' frames; logits (k, L) per instance.

    ``headers``: one header code per instance (:meth:`sorter.model.spec.ModelSpec.header_codes`),
    repeated for each of its frames; a model that does not take them ignores them. Torch-free, for
    decode processes and the classifier alike.
    """
    if not images:
        return []
    counts = [len(frames) for frames in images]
    codes = None if headers is None else np.repeat(np.asarray(headers, dtype=np.int64), counts)
    logits = forward(np.concatenate(images), np.concatenate(features), codes)
    return np.split(logits, np.cumsum(counts)[:-1])


class OrtSession:
    """A CPU session over an exported graph: images (N, C, S, S) and features (N, F) in, logits out.

    Parameters
    ----------
    graph
        The ONNX model's bytes.
    threads
        Intra-op threads. Spinning is off: on a machine whose other cores
        decode, a thread pool that spins while waiting steals their time.
    """

    def __init__(self, graph: bytes, threads: int) -> None:
        import onnxruntime as ort  # optional: only this runtime needs it

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.graph = graph
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(
        self, images: np.ndarray, features: np.ndarray, headers: np.ndarray | None = None
    ) -> np.ndarray:
        """Float32 logits (N, L) for one batch (header codes -1 when ``headers`` is None)."""
        feeds: dict[str, Any] = {"images": np.ascontiguousarray(images, dtype=np.float32)}
        if "features" in self.inputs:  # a model without scalar features exports without the input
            feeds["features"] = np.ascontiguousarray(features, dtype=np.float32)
        if "header" in self.inputs:  # a model whose partner confirms headers
            codes = np.full(len(images), -1, np.int64) if headers is None else headers
            feeds["header"] = np.ascontiguousarray(codes, dtype=np.int64)
        (logits,) = self.session.run(["logits"], feeds)
        return np.asarray(logits, dtype=np.float32)


class OnnxRunner:
    """The CPU runtime: an :class:`OrtSession` under the runner interface of :mod:`sorter.model.runtime`.

    Parameters
    ----------
    graph
        The exported ONNX graph (the network's weights are baked into it).
    threads
        Intra-op threads of the session.
    """

    name = "onnxruntime"

    def __init__(self, graph: bytes, threads: int) -> None:
        self.session = OrtSession(graph, threads)

    @property
    def graph(self) -> bytes:
        """The exported ONNX graph: decode processes build the same session from it."""
        return self.session.graph

    def __call__(
        self, images: np.ndarray, features: np.ndarray, headers: np.ndarray | None = None
    ) -> np.ndarray:
        """Float32 logits (N, L) for one batch."""
        return self.session(images, features, headers)
