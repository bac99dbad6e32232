"""Whether a model can run on a requested device: one check for the commands' ``--device`` and the
Python API's ``device=`` (which got torch's "Found no NVIDIA driver on your system").

Light on purpose: option callbacks run it before any command body, and it imports torch only
for a device other than the CPU.
"""

from __future__ import annotations


def is_cpu(requested: str | None) -> bool:
    """Whether ``requested`` names the CPU, in any case and with stray spaces (``"CPU"``, ``" cpu"``)."""
    return requested is not None and requested.strip().lower() == "cpu"


def device_problem(requested: str | None) -> str | None:
    """Why a model cannot run on ``requested`` on this host, starting with the device as given,
    or ``None`` when it can (``None``, the default, always can)."""
    if requested is None or is_cpu(requested):
        return None
    try:
        import torch
    except ImportError:  # a CPU-only install serves with ONNX Runtime
        return (
            f"{requested}: PyTorch is not installed; install it for GPU inference "
            "(pip install 'dicom-sorter[gpu]') or use cpu (--device cpu)"
        )
    try:
        device = torch.device(requested)
    except RuntimeError:
        return f"{requested!r} is not a device: use cpu, cuda or cuda:N (or leave it unset)"
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"{requested}: only cpu and cuda devices are supported"
    if not torch.cuda.is_available():
        return (
            f"{requested}: no CUDA GPU is usable on this host (no driver or no device); use cpu "
            "(--device cpu), or leave the device unset to use a GPU only when there is one"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"{requested}: this host has {count} CUDA device(s), numbered from cuda:0"
    return None
