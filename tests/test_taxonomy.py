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


def _probs(**values: float) -> Prediction:
    """A prediction with its full probability vector (labels not named share the rest)."""
    rest = [label for label in ALL_LABELS if label.name not in values]
    left = (1.0 - sum(values.values())) / len(rest)
    probs = {label: values.get(label.name, left) for label in ALL_LABELS}
    ranked = sorted(probs, key=probs.__getitem__, reverse=True)
    return Prediction(ranked[0], probs[ranked[0]], ranked[1], probs[ranked[1]], probs)


HEADER_TEST = Thresholds(
    agree_at={label.value: 0.2 for label in ALL_LABELS},
    disagree_at={label.value: 0.01 for label in ALL_LABELS},
)


@pytest.mark.parametrize(
    ("header", "pred", "verdict"),
    [
        (Label.CT, _probs(CT=0.97, MR=0.02), Verdict.AGREE),
        # The argmax is another label, but the pixels do not rule the header out.
        (Label.MR, _probs(CT=0.70, MR=0.25), Verdict.AGREE),
        (Label.MR, _probs(CT=0.90, MR=0.05), Verdict.UNCERTAIN),
        (Label.MR, _probs(CT=0.97, MR=0.005), Verdict.DISAGREE),
        # Refuted without a confident alternative: a Lu-177 SPECT stored as PT, NM and OT split.
        (Label.PT, _probs(NM=0.55, OT=0.40, PT=0.004), Verdict.DISAGREE),
        (None, _probs(CT=0.99), Verdict.NO_HEADER),
    ],
)
def test_header_test_verdicts(header, pred, verdict):
    assert compare(header, pred, ALL_LABELS, HEADER_TEST) == verdict


def test_header_test_without_the_probability_vector_uses_the_top_two():
    assert compare(Label.CT, _pred(Label.CT, 0.9, Label.MR, 0.05), ALL_LABELS, HEADER_TEST) == Verdict.AGREE
    assert (
        compare(Label.MR, _pred(Label.CT, 0.9, Label.MR, 0.05), ALL_LABELS, HEADER_TEST) == Verdict.UNCERTAIN
    )
    # Neither of the top two: its probability is at most the runner-up's.
    assert (
        compare(Label.US, _pred(Label.CT, 0.995, Label.MR, 0.004), ALL_LABELS, HEADER_TEST)
        == Verdict.DISAGREE
    )
    assert (
        compare(Label.US, _pred(Label.CT, 0.9, Label.MR, 0.05), ALL_LABELS, HEADER_TEST) == Verdict.UNCERTAIN
    )


def test_header_test_thresholds_are_per_header_label():
    per_label = Thresholds(agree_at={"CT": 0.9, "NM": 0.2}, disagree_at={"CT": 0.5, "NM": 0.01})
    pred = _probs(PT=0.55, CT=0.3, NM=0.1)
    assert compare(Label.CT, pred, ALL_LABELS, per_label) == Verdict.DISAGREE  # 0.3 <= 0.5
    assert compare(Label.NM, pred, ALL_LABELS, per_label) == Verdict.UNCERTAIN  # 0.01 < 0.1 < 0.2
    # A label without thresholds falls back to the confidence rule: PT 0.55 is not confident.
    assert compare(Label.MR, pred, ALL_LABELS, per_label) == Verdict.UNCERTAIN


@pytest.mark.parametrize(
    "kwargs",
    [
        {"agree_at": {"CT": 0.5}},
        {"disagree_at": {"CT": 0.1}},
        {"agree_at": {"CT": 0.1}, "disagree_at": {"CT": 0.2}},
    ],
)
def test_header_test_thresholds_are_validated(kwargs):
    with pytest.raises(ValueError, match="agree_at"):
        Thresholds(**kwargs)
