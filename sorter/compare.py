"""Header versus pixels: the verdict for one instance. Pure."""

from __future__ import annotations

from collections.abc import Collection

from sorter.domain import Label, Prediction, Thresholds, Verdict


def compare(
    header: Label | None,
    prediction: Prediction,
    supported: Collection[Label],
    thresholds: Thresholds | None = None,
    *,
    contradicted_by: Collection[Label] | None = None,
    nuclide_allows: Collection[Label] | None = None,
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
        The model's operating point (see :class:`~sorter.model.spec.Thresholds`).
    contradicted_by
        The labels the object's SOP class allows, when they exclude the header's
        (:func:`sorter.taxonomy.class_contradiction`): a header at odds with itself.
    nuclide_allows
        The labels the header's radionuclide allows, when they exclude the header's
        (:func:`sorter.nuclides.nuclide_contradiction`): a PT header naming a single-photon
        emitter, an NM header naming a positron emitter.

    Returns
    -------
    Verdict
        ``no_header`` without a header label; ``unsupported`` when the model
        cannot emit the header label. With the header test (thresholds for the
        header's label): ``agree`` when the header label's probability is at
        least its ``agree_at``, ``disagree`` when at most its ``disagree_at``,
        otherwise ``uncertain``. Without it: ``uncertain`` when the prediction is below
        the confidence threshold or its top-2 margin is too small; otherwise
        ``agree`` or ``disagree`` by the argmax. An ``uncertain`` header that its own SOP
        class contradicts is ``disagree`` when the pixels' top label is one the class allows:
        two independent witnesses against the Modality, where the pixels alone fall short.
        A header its radionuclide rules out is ``disagree`` unless the pixels refute every label
        the nuclide allows: the nuclide says which scanner took the image, which the pixels of
        a SPECT and a PET slice seldom tell apart, so it decides wherever the pixels leave room.
    """
    verdict = _pixels_verdict(header, prediction, supported, thresholds)
    if verdict is Verdict.UNCERTAIN and contradicted_by and prediction.label in contradicted_by:
        return Verdict.DISAGREE
    if verdict is not Verdict.DISAGREE and nuclide_allows:
        room = any(
            _pixels_verdict(label, prediction, supported, thresholds) is not Verdict.DISAGREE
            for label in nuclide_allows
        )
        return Verdict.DISAGREE if room else verdict
    return verdict


def _pixels_verdict(
    header: Label | None,
    prediction: Prediction,
    supported: Collection[Label],
    thresholds: Thresholds | None,
) -> Verdict:
    """:func:`compare` on the pixels alone."""
    limits = thresholds or Thresholds()
    if header is None:
        return Verdict.NO_HEADER
    if header not in supported:
        return Verdict.UNSUPPORTED
    bounds = limits.bounds(header)
    if bounds is not None:
        # The header test: refuting a header needs only that its label is implausible, not
        # that the model knows the right one (an NM series stored as PT is refuted while NM
        # and OT share the rest).
        agree_at, disagree_at = bounds
        p_header = prediction.probabilities.get(header)
        if p_header is None:
            # Only the top two are known; any other label's probability is at most the runner-up's.
            top = {prediction.label: prediction.confidence}
            top.setdefault(prediction.second_label, prediction.second_confidence)
            if header not in top:
                refuted = prediction.second_confidence <= disagree_at
                return Verdict.DISAGREE if refuted else Verdict.UNCERTAIN
            p_header = top[header]
        if p_header >= agree_at:
            return Verdict.AGREE
        return Verdict.DISAGREE if p_header <= disagree_at else Verdict.UNCERTAIN
    if prediction.confidence < limits.min_confidence or prediction.margin < limits.min_margin:
        return Verdict.UNCERTAIN
    return Verdict.AGREE if prediction.label == header else Verdict.DISAGREE
