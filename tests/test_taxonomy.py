import pytest

from sorter.compare import compare
from sorter.domain import ALL_LABELS, Label, Prediction, Verdict
from sorter.model.spec import Thresholds
from sorter.taxonomy import header_label, is_non_image_modality


@pytest.mark.parametrize(
    ("modality", "label"),
    [
        ("CT", Label.CT),
        ("MR", Label.MR),
        ("PT", Label.PT),
        ("NM", Label.NM),
        ("CR", Label.XR),
        ("DX", Label.XR),
        ("DR", Label.XR),
        ("RG", Label.XR),
        ("RF", Label.XR),
        ("XA", Label.XR),
        ("PX", Label.XR),
        ("IO", Label.XR),
        ("RTIMAGE", Label.XR),
        ("MG", Label.MG),
        ("US", Label.US),
        ("IVUS", Label.US),
        ("OT", Label.OT),
        ("SC", Label.OT),
        ("XC", Label.OT),
        ("ES", Label.OT),
        ("GM", Label.OT),
        ("SM", Label.OT),
        ("OP", Label.OT),
        ("DOC", Label.OT),
        (" ct ", Label.CT),
        ("", None),
        (None, None),
        ("SR", None),
        ("ZZ", None),
    ],
)
def test_header_label_table(modality, label):
    assert header_label(modality) == label


@pytest.mark.parametrize("modality", ["SR", "KO", "PR", "SEG", "REG", "RTSTRUCT", "RTPLAN", "RTDOSE", "ECG"])
def test_non_image_modalities(modality):
    assert is_non_image_modality(modality)
    assert header_label(modality) is None


@pytest.mark.parametrize("modality", ["CT", "RTIMAGE", "MG", "OT", "", None])
def test_image_modalities_are_not_skipped(modality):
    assert not is_non_image_modality(modality)


def _pred(label: Label, p1: float, second: Label, p2: float) -> Prediction:
    return Prediction(label=label, confidence=p1, second_label=second, second_confidence=p2)


@pytest.mark.parametrize(
    ("header", "pred", "supported", "verdict"),
    [
        (Label.CT, _pred(Label.CT, 0.97, Label.MR, 0.02), ALL_LABELS, Verdict.AGREE),
        (Label.MR, _pred(Label.CT, 0.97, Label.MR, 0.02), ALL_LABELS, Verdict.DISAGREE),
        (Label.MR, _pred(Label.CT, 0.60, Label.MR, 0.35), ALL_LABELS, Verdict.UNCERTAIN),  # low confidence
        (
            Label.MR,
            _pred(Label.CT, 0.85, Label.MR, 0.70),
            ALL_LABELS,
            Verdict.UNCERTAIN,
        ),  # impossible but close
        (Label.CT, _pred(Label.CT, 0.55, Label.MR, 0.45), ALL_LABELS, Verdict.UNCERTAIN),
        (None, _pred(Label.CT, 0.99, Label.MR, 0.01), ALL_LABELS, Verdict.NO_HEADER),
        (Label.MG, _pred(Label.CT, 0.99, Label.MR, 0.01), (Label.CT, Label.MR), Verdict.UNSUPPORTED),
    ],
)
def test_compare_table(header, pred, supported, verdict):
    assert compare(header, pred, supported, Thresholds(min_confidence=0.8, min_margin=0.2)) == verdict


def test_compare_thresholds_come_from_the_model():
    pred = _pred(Label.CT, 0.7, Label.MR, 0.2)
    assert compare(Label.MR, pred, ALL_LABELS, Thresholds(0.8, 0.2)) == Verdict.UNCERTAIN
    assert compare(Label.MR, pred, ALL_LABELS, Thresholds(0.6, 0.2)) == Verdict.DISAGREE
