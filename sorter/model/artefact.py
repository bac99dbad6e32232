"""Save and load the self-describing model artefact (ARCHITECTURE §5).

Layout: one ``torch.save`` file holding ``{"format": "dicom-sorter-model",
"spec": <JSON text>, "state_dict": ...}``. The spec carries the sha256 of the
weights so that a corrupted or hand-edited file is refused at load time, and
it is JSON text so that ``torch.load(weights_only=True)`` can read the file
without unpickling arbitrary objects.

torch is imported inside the functions that need it: the model's identity
(:func:`file_sha256`) and the default path are all that a CPU run on a
cached graph (:mod:`sorter.model.graph_cache`) needs from here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sorter.errors import IncompatibleModelError, ModelError
from sorter.fsutil import atomic_file
from sorter.model.spec import ModelSpec

if TYPE_CHECKING:
    import torch

    from sorter.model.network import SorterNet

MAGIC = "dicom-sorter-model"
DEFAULT_MODEL_PATH = Path(__file__).with_name("default") / "model.pt"


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Checksum of the weights: names, shapes, dtypes and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of the artefact file, used as the model's identity in the database."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadedModel:
    """A network with its spec and identity."""

    spec: ModelSpec
    network: SorterNet
    path: Path
    sha256: str


def save_artefact(network: SorterNet, spec: ModelSpec, path: Path) -> str:
    """Write the artefact to ``path`` atomically and return its file sha256."""
    import torch

    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    spec_data: dict[str, Any] = spec.to_dict()
    spec_data["weights_sha256"] = weights_sha256(state)
    payload = {"format": MAGIC, "spec": json.dumps(spec_data, sort_keys=True), "state_dict": state}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per save: two concurrent saves to one path (two exports, a fold and a
    # resume) must not write into each other's temporary file; the last rename wins whole.
    with atomic_file(path, permissions=0o644) as out:
        torch.save(payload, out)
    return file_sha256(path)


def require_file(path: Path) -> None:
    """Raise :class:`ModelError` unless ``path`` is a file, saying what it is instead (a folder
    or /dev/null was "does not exist")."""
    if path.is_file():
        return
    if path.is_dir():
        raise ModelError(f"model artefact {path} is a folder, not a model file (name the .pt in it)")
    if path.exists():
        raise ModelError(f"model artefact {path} is not a regular file")
    raise ModelError(f"model artefact {path} does not exist")


def read_spec(path: Path) -> tuple[ModelSpec, dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate an artefact without building the network."""
    import torch

    path = Path(path)
    require_file(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean the same here
        # Their texts are torch's internals (a pickle's magic number, "internal miniz error"):
        # the type alone stays, for a bug report.
        raise IncompatibleModelError(
            f"{path} is not a readable dicom-sorter model: not a PyTorch file, or a truncated one "
            f"({type(exc).__name__}); copy it again, or write it with `sorter-train export`"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != MAGIC:
        raise IncompatibleModelError(f"{path} is not a dicom-sorter model artefact")
    raw = json.loads(payload["spec"])
    spec = ModelSpec.from_dict(raw)
    state: dict[str, torch.Tensor] = payload["state_dict"]
    expected = raw.get("weights_sha256")
    if expected != weights_sha256(state):
        raise IncompatibleModelError(f"{path}: weights checksum mismatch (file corrupted or edited)")
    return spec, raw, state


def load_artefact(path: Path | None = None) -> LoadedModel:
    """Load an artefact (the bundled default when ``path`` is None) onto the CPU."""
    from sorter.model.network import build_network

    path = Path(path) if path is not None else DEFAULT_MODEL_PATH
    spec, _, state = read_spec(path)
    network = build_network(spec)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise IncompatibleModelError(f"{path}: weights do not match architecture {spec.arch}: {exc}") from exc
    network.eval()
    return LoadedModel(spec=spec, network=network, path=path, sha256=file_sha256(path))
