"""Header versus pixels: the verdict for one instance. Pure."""

from __future__ import annotations

from collections.abc import Collection

from sorter.domain import Label, Prediction, Verdict
from sorter.model.spec import Thresholds


def compare(
    header: Label | None,
    prediction: Prediction,
    supported: Collection[Label],
    thresholds: Thresholds | None = None,
) -> Verdict:
    """Decide whether the header label and the predicted label disagree.

    Parameters
    ----------
    header
        Label derived from the header Modality (``None`` when missing or unmapped).
    prediction
        Calibrated model output.
    supported
        Labels the model can emit.
    thresholds
        The model's confidence and top-2 margin thresholds.

    Returns
    -------
    Verdict
        ``no_header`` without a header label; ``unsupported`` when the model
        cannot emit the header label; ``uncertain`` when the prediction is below
        the confidence threshold or its top-2 margin is too small; otherwise
        ``agree`` or ``disagree``.
    """
    limits = thresholds or Thresholds()
    if header is None:
        return Verdict.NO_HEADER
    if header not in supported:
        return Verdict.UNSUPPORTED
    if prediction.confidence < limits.min_confidence or prediction.margin < limits.min_margin:
        return Verdict.UNCERTAIN
    return Verdict.AGREE if prediction.label == header else Verdict.DISAGREE
