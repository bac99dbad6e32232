"""Inference runtimes for the resident network: the forward pass, nothing else.

``auto`` (the default) picks what measured fastest (tests/bench/bench_throughput.py):
on CUDA, eager torch in bfloat16 with channels-last memory; on the CPU, ONNX
Runtime on a graph exported from the loaded network (about 2.5x eager torch
for the default model on 2 cores; :mod:`sorter.model.graph_cache` keeps the
export for the next run), falling back to eager torch when onnxruntime is
missing or the export fails. Every runtime returns float32
logits for the same weights; the exported graph agrees with torch to about
1e-5 in the logits.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from sorter.model.network import SorterNet
from sorter.model.ort import OnnxRunner
from sorter.model.spec import ModelSpec

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx")


class Runner(Protocol):
    """A forward pass: images (N, C, S, S), features (N, F) and, for a model that takes them,
    header codes (N,) in (:meth:`sorter.model.spec.ModelSpec.header_codes`); logits (N, L) out."""

    name: str

    def __call__(
        self, images: np.ndarray, features: np.ndarray, headers: np.ndarray | None = None
    ) -> np.ndarray:
        """Float32 logits for one batch."""


class TorchRunner:
    """Eager torch under inference mode; bfloat16 autocast and channels-last on CUDA."""

    def __init__(self, network: SorterNet, device: torch.device) -> None:
        self.device = device
        self.network = network.to(device).eval()
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.network = self.network.to(memory_format=torch.channels_last)
        self.name = "torch-cuda-bf16" if self.cuda else "torch"

    def __call__(
        self, images: np.ndarray, features: np.ndarray, headers: np.ndarray | None = None
    ) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
            f = torch.from_numpy(np.ascontiguousarray(features)).to(self.device, non_blocking=True)
            inputs = [x, f]
            if headers is not None and getattr(self.network, "confirms", False):
                inputs.append(torch.from_numpy(np.asarray(headers, dtype=np.int64)).to(self.device))
            if self.cuda:
                inputs[0] = x.to(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = self.network(*inputs)
            else:
                logits = self.network(*inputs)
            return logits.float().cpu().numpy()


def export_onnx(network: SorterNet, spec: ModelSpec) -> bytes:
    """The network as an ONNX graph (opset 17, any batch size): what :class:`OnnxRunner` runs.

    Inputs ``images`` and ``features``, and ``header`` (int64) for a model whose partner confirms
    headers (:attr:`sorter.model.spec.ModelSpec.confirms`)."""
    size = spec.preprocess.input_size
    example: tuple[torch.Tensor, ...] = (
        torch.zeros(1, len(spec.preprocess.channels), size, size),
        torch.zeros(1, len(spec.preprocess.features)),
    )
    names = ["images", "features"]
    if spec.confirms:
        example, names = (*example, torch.zeros(1, dtype=torch.int64)), [*names, "header"]
    with tempfile.TemporaryDirectory(prefix="sorter-onnx-") as folder:
        graph = Path(folder) / "model.onnx"
        # The TorchScript exporter is deprecated upstream but needs no onnxscript; torch is
        # pinned (pyproject.toml), and a failed export falls back to torch under ``auto``.
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            # EfficientNet's padding slices are exported unfolded; the exporter says so on every
            # first run, and a user can do nothing about it.
            warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
            torch.onnx.export(
                network.cpu().eval(),
                example,
                graph,
                input_names=names,
                output_names=["logits"],
                dynamic_axes={**{name: {0: "n"} for name in names}, "logits": {0: "n"}},
                opset_version=17,
                dynamo=False,
            )
        return graph.read_bytes()


def make_runner(
    network: SorterNet,
    spec: ModelSpec,
    device: torch.device,
    runtime: str = "auto",
    threads: int | None = None,
) -> Runner:
    """The runner for ``runtime`` (``auto``, ``torch`` or ``onnx``) on ``device``.

    ``onnx`` is CPU only and raises when it cannot be built; ``auto`` falls back
    to torch with a warning that says why. ``threads``: the CPU threads of the
    forward pass (default: torch's current setting).
    """
    if threads:
        torch.set_num_threads(threads)
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "torch" or device.type != "cpu":
        if runtime == "onnx":
            raise ValueError(
                "the onnx runtime runs on the CPU only: use --device cpu or SORTER_RUNTIME=torch"
            )
        runner = TorchRunner(network, device)
        if runner.cuda:
            # The first CUDA call loads kernels and sets up the context (seconds):
            # paid here, at start-up, instead of by the first batch of a scan.
            params = spec.preprocess
            images = np.zeros((32, len(params.channels), params.input_size, params.input_size), np.float32)
            runner(images, np.zeros((32, len(params.features)), np.float32), np.full(32, -1, np.int64))
        return runner
    try:
        import onnxruntime  # noqa: F401  # optional: fail before exporting when it is missing

        return OnnxRunner(export_onnx(network, spec), torch.get_num_threads())
    except Exception as exc:  # ImportError, or an operator the exporter cannot write
        if runtime == "onnx":
            raise
        log.warning("ONNX Runtime unavailable (%s: %s); running the model in torch", type(exc).__name__, exc)
        return TorchRunner(network, device)
