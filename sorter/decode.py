"""The decode side of the pipeline: read, decode and preprocess one instance, in a decode process.

This module is what the decode processes import (the forkserver preloads it, and unpickling a pool
task imports its function's module): it needs neither torch nor SQLAlchemy, so those processes
start in a fraction of a second and stay small. The optional model a decode process runs is an
ONNX Runtime session of an exported graph (:func:`init_decode_process`).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sorter.dicom import native
from sorter.dicom.pixels import load_image
from sorter.dicom.quiet import quiet_pydicom
from sorter.dicom.reading import read_dataset
from sorter.domain import Claimed, FailureReason, Outcome, Status
from sorter.errors import INTERRUPTS, InputError, NonImageObject, describe
from sorter.lifeline import watch_parent
from sorter.model.ort import Forward, OrtSession, logits_per_instance
from sorter.model.preprocess import prepare_image
from sorter.model.spec import PreprocessParams

log = logging.getLogger(__name__)

#: (0008,0018) SOP Instance UID.
_SOP_INSTANCE_UID = 0x00080018


@dataclass(frozen=True)
class Prepared:
    """Network input for one instance: frames ``(k, C, S, S)`` and features ``(k, F)``.

    ``logits`` (k, L) is set instead when the decode process ran the model
    (:func:`init_decode_process` with a graph); the images are then dropped.
    """

    instance_id: int
    images: np.ndarray
    features: np.ndarray
    logits: np.ndarray | None = None


#: The model in this decode process, when the scanning process handed one over.
_model: OrtSession | None = None


Decoder = Callable[[Claimed, PreprocessParams, int], "Prepared | Outcome"]


def init_decode_process(parent_pid: int | None = None, graph: bytes | None = None) -> None:
    """Initialise a decode process: Ctrl-C is left to the parent, and the parent's death ends it.

    With ``graph`` (an exported ONNX model) the process also runs the model on
    what it decoded (one thread), and sends back logits instead of images.

    The parent stops submitting, rolls back its open batches and shuts the pool
    down; workers dying mid-file on the same signal would only add noise. A
    parent killed outright (kill -9, the OOM killer) cannot shut the pool down,
    and an idle worker would wait on its task queue for ever: a watcher thread
    ends the worker once ``parent_pid`` has exited (:mod:`sorter.lifeline`).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet_pydicom()  # filters set in the parent do not reach a spawned or forkserver process
    native.install()  # OpenJPEG's messages go into the file's reason, not between progress lines
    if parent_pid is not None:
        watch_parent(parent_pid)
    if graph is not None:
        global _model
        _model = OrtSession(graph, threads=1)


def decode_one(item: Claimed, params: PreprocessParams, frames: int = 1) -> Prepared | Outcome:
    """Read, decode and preprocess one instance; never raises for a bad file.

    JPEG 2000 and 8-bit JPEG frames are decoded at the coarsest resolution that still
    covers the model's input (:mod:`sorter.dicom.reduced`); :func:`decode_one_full`
    decodes every pixel.

    Parameters
    ----------
    item
        The claimed instance (its id and path).
    params
        The model's preprocessing parameters.
    frames
        Frames classified per multi-frame instance.

    Returns
    -------
    Prepared or Outcome
        The network input, or a ``failed``/``skipped`` outcome with its reason.
    """
    return run_decoder(_prepare, item, params, frames)


def decode_one_full(item: Claimed, params: PreprocessParams, frames: int = 1) -> Prepared | Outcome:
    """:func:`decode_one` with every frame decoded at full resolution (``SORTER_FULL_DECODE``)."""
    return run_decoder(_prepare_full, item, params, frames)


def decoder_for(full_decode: bool) -> Decoder:
    """The decode function a run uses: reduced resolution unless ``full_decode``."""
    return decode_one_full if full_decode else decode_one


def _prepare(item: Claimed, params: PreprocessParams, frames: int) -> Prepared | Outcome:
    return _load_and_prepare(item, params, frames, params.input_size)


def _prepare_full(item: Claimed, params: PreprocessParams, frames: int) -> Prepared | Outcome:
    return _load_and_prepare(item, params, frames, None)


def _another_instance(item: Claimed) -> Outcome | None:
    """For an instance classified before (`sorter reclassify`): a failure when its file now holds
    another instance (a name reused before any scan saw it), whose pixels must not be judged as
    its own. One header read, so only these instances pay it, never a scan's new ones."""
    if item.status is not Status.DONE or not item.sop_instance_uid:
        return None
    try:
        held = read_dataset(item.path, specific_tags=[_SOP_INSTANCE_UID]).get(_SOP_INSTANCE_UID)
    except InputError:
        return None  # reading it again says why
    if held is None or str(held.value).strip() == item.sop_instance_uid:
        return None
    detail = "its file now holds another instance; `sorter scan` registers it"
    return Outcome(item.id, Status.FAILED, item.header_label, error=FailureReason.VANISHED, detail=detail)


def _load_and_prepare(
    item: Claimed, params: PreprocessParams, frames: int, min_side: int | None
) -> Prepared | Outcome:
    replaced = _another_instance(item)
    if replaced is not None:
        return replaced
    try:
        with native.caught() as said:
            image = load_image(item.path, frames=frames, min_side=min_side).without_blank_frames(item.path)
    except NonImageObject as exc:
        return Outcome(item.id, Status.SKIPPED, item.header_label, error=exc.reason, detail=exc.detail)
    except InputError as exc:
        detail = native.with_said(exc.detail, said)
        return Outcome(item.id, Status.FAILED, item.header_label, error=exc.reason, detail=detail)
    try:
        images, features = prepare_image(
            image.frames, image.colourfulness, params, image.shape, image.grid_step
        )
    except InputError as exc:
        return Outcome(item.id, Status.FAILED, item.header_label, error=exc.reason, detail=exc.detail)
    return Prepared(item.id, images, features)


def run_decoder(decode: Decoder, item: Claimed, params: PreprocessParams, frames: int) -> Prepared | Outcome:
    """``decode(item, params, frames)``, with anything it raises turned into ``failed/decode_error``.

    Every decode goes through here (in the decode processes, in a queue worker),
    so that a decoder bug, or a codec's panic, costs one file and never its
    batch, and what crosses a process boundary is always a plain, picklable
    :class:`Outcome`. Interrupts (Ctrl-C, ``SystemExit``) still stop the run.
    """
    try:
        return decode(item, params, frames)
    except INTERRUPTS:
        raise
    except BaseException as exc:  # keep the evidence in the log, the one-line reason in the database
        log.warning("instance %d: unexpected %s while decoding", item.id, type(exc).__name__, exc_info=True)
        return Outcome(
            item.id, Status.FAILED, item.header_label, error=FailureReason.DECODE_ERROR, detail=describe(exc)
        )


def decode_chunk(
    decode: Decoder,
    items: Sequence[Claimed],
    params: PreprocessParams,
    frames: int,
    headers: np.ndarray | None = None,
) -> list[Prepared | Outcome]:
    """Decode several instances in one pool task (run in a decode process); never raises for a bad file.

    ``headers``: the items' header codes (:meth:`sorter.model.spec.ModelSpec.header_codes`), for a
    model in this process that takes them. It lives here, not beside the executor, because
    unpickling a task imports its function's module in the decode process, and this one is
    torch-free.
    """
    results = [run_decoder(decode, item, params, frames) for item in items]
    if _model is None:
        return results
    try:
        return run_model(_model, results, headers)
    except INTERRUPTS:
        raise
    except BaseException as exc:  # the parent runs the model on the images instead
        log.warning("model in the decode process failed (%s); sending images back", describe(exc))
        return results


def run_model(
    model: Forward, results: list[Prepared | Outcome], headers: np.ndarray | None = None
) -> list[Prepared | Outcome]:
    """Replace every :class:`Prepared`'s images by its logits, in one forward pass (``headers``: one
    code per result, see :func:`decode_chunk`)."""
    keep = [isinstance(r, Prepared) for r in results]
    ready = [r for r in results if isinstance(r, Prepared)]
    codes = None if headers is None else np.asarray(headers)[keep]
    parts = iter(logits_per_instance(model, [r.images for r in ready], [r.features for r in ready], codes))
    empty = np.zeros(0, dtype=np.float32)
    return [
        Prepared(r.instance_id, empty, empty, next(parts)) if isinstance(r, Prepared) else r for r in results
    ]
