"""Header versus pixels: the verdict for one instance. Pure."""

from __future__ import annotations

from collections.abc import Collection

from sorter.domain import NO_WITNESSES, Label, Prediction, Thresholds, Verdict, Witnesses
from sorter.nuclides import EMISSION, nuclide_confirms, nuclide_contradiction
from sorter.taxonomy import class_contradiction


def compare(
    header: Label | None,
    prediction: Prediction,
    supported: Collection[Label],
    thresholds: Thresholds | None = None,
    witnesses: Witnesses = NO_WITNESSES,
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
    witnesses
        What the header's other attributes say (:func:`witnesses_of`): the labels the object's
        SOP class allows when they exclude the header's (``contradicted_by``: a header at odds
        with itself); the labels its radionuclide allows when they exclude the header's
        (``nuclide_allows``: a PT header naming a single-photon emitter, an NM header naming a
        positron emitter); whether its radionuclide is one only the header's scanner images
        (``nuclide_confirms``: a PT header naming F-18, an NM header naming Tc-99m).

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
        For the same reason a header its radionuclide confirms (and its SOP class does not
        contradict) is ``agree`` when the probability of emission imaging, PT and NM together,
        reaches the model's ``emission_agree_at`` (older models: the header's ``agree_at``): the
        pixels leave room for a SPECT or PET image, the nuclide says which. It never makes a verdict
        ``disagree`` or ``uncertain``.
    """
    verdict = _pixels_verdict(header, prediction, supported, thresholds)
    contradicted_by, nuclide_allows = witnesses.contradicted_by, witnesses.nuclide_allows
    if verdict is Verdict.UNCERTAIN and contradicted_by and prediction.label in contradicted_by:
        return Verdict.DISAGREE
    if witnesses.nuclide_confirms and not contradicted_by and _emission(header, prediction, thresholds):
        # Only ever towards agree: pixels that do not look like emission imaging keep their verdict
        # (a PET/CT's CT carries the PET's radiopharmaceutical; relabelled PT, it stays refuted).
        return Verdict.AGREE
    if verdict is not Verdict.DISAGREE and nuclide_allows:
        room = any(
            _pixels_verdict(label, prediction, supported, thresholds) is not Verdict.DISAGREE
            for label in nuclide_allows
        )
        return Verdict.DISAGREE if room else verdict
    return verdict


def _emission(header: Label | None, prediction: Prediction, thresholds: Thresholds | None) -> bool:
    """Whether a PT or NM header's emission threshold (``emission_agree_at``, else its
    ``agree_at``) is reached by PT and NM together."""
    bound = (thresholds or Thresholds()).emission_bound(header) if header in EMISSION else None
    if bound is None:  # another label, or a model without the header test
        return False
    return sum(prediction.probabilities.get(label, 0.0) for label in EMISSION) >= bound


def witnesses_of(
    modality: str | None, sop_class_uid: str | None, label: Label | None, radionuclide: str | None
) -> Witnesses:
    """What a header's SOP class and radionuclide say about its Modality (``modality``, read as
    ``label``), as every path that classifies reads them."""
    return Witnesses(
        contradicted_by=class_contradiction(modality, sop_class_uid),
        nuclide_allows=nuclide_contradiction(label, radionuclide),
        nuclide_confirms=nuclide_confirms(label, radionuclide),
    )


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
