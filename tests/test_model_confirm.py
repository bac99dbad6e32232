"""A confirming partner: an ensemble takes the header beside the pixels, and its partner alone
confirms a header it is sure of, skipping the main network, in torch, in the exported graph and on
every serving path (classify, scan with the model here or in the decode processes); and the rule
that chooses where it may (train/confirm.py) is measured out of fold."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from db_support import copy_dicom, make_confirming_model, pydicom_file, query
from test_model_cascade import pick_by_feature
from test_scan_executor import _scan

from sorter.classify import classify_paths
from sorter.decode import decode_one
from sorter.domain import ALL_LABELS, Label, Thresholds
from sorter.model.classifier import Classifier
from sorter.model.network import EnsembleNet, SorterNet, build_network
from sorter.model.ort import OnnxRunner
from sorter.model.runtime import export_onnx
from sorter.model.spec import ARCHITECTURES, ModelSpec, PartnerSpec, PreprocessParams
from train.confirm import choose_confirm, confirm_point, served

PRE = PreprocessParams(input_size=64, channels=("scaled", "hu"), features=("colourfulness",))
LABELS = [label.value for label in ALL_LABELS]
SPEC_T, MAIN_T, PARTNER_T = 1.3, 1.4, 2.0


def _spec(confirm: float | None = 0.6, agree_at: float | None = None) -> ModelSpec:
    thresholds = Thresholds()
    if agree_at is not None:
        thresholds = Thresholds(
            agree_at=dict.fromkeys(LABELS, agree_at), disagree_at=dict.fromkeys(LABELS, 0.01)
        )
    partner = PartnerSpec(
        "mobilenet_v3_small",
        PARTNER_T,
        MAIN_T,
        0.4,
        confirm=None if confirm is None else dict.fromkeys(LABELS, confirm),
    )
    return ModelSpec(
        arch="efficientnet_lite0",
        labels=tuple(ALL_LABELS),
        preprocess=PRE,
        temperature=SPEC_T,
        thresholds=thresholds,
        partner=partner,
    )


def _ensemble(spec: ModelSpec) -> EnsembleNet:
    torch.manual_seed(0)
    network = build_network(spec).eval()
    assert isinstance(network, EnsembleNet)
    pick_by_feature(network.partner.head, 40.0)
    return network


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 2, 64, 64, generator=gen), torch.rand(n, 1, generator=gen)


def test_the_partner_confirms_a_header_it_is_sure_of_and_everything_else_gets_the_average():
    network = _ensemble(_spec(0.6))
    images, features = _batch()
    with torch.no_grad():
        partner = network.partner(images, features)
        average = network(images, features)  # no header: the plain ensemble
        main = SorterNet.forward(network, images, features)
    np.testing.assert_allclose(
        average, main * (0.6 / MAIN_T) + partner * (0.4 / PARTNER_T), rtol=1e-5, atol=1e-5
    )
    probs = torch.softmax(partner / PARTNER_T, dim=1)
    header = probs.argmax(dim=1)  # the partner's own choice: confirmed where it is sure enough
    header[::3] = -1  # no header: never confirmed
    header[1::5] = (probs.argmin(dim=1))[1::5]  # a header the partner doubts: the average
    sure = (header >= 0) & (probs.gather(1, header.clamp(min=0)[:, None]).squeeze(1) >= 0.6)
    assert 0 < int(sure.sum()) < len(header)
    with torch.no_grad():
        out = network(images, features, header)
    # Confirmed rows: the partner's logits, so that the spec's temperature gives its own calibration.
    np.testing.assert_allclose(out[sure], partner[sure] * SPEC_T / PARTNER_T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[~sure], average[~sure], rtol=1e-5, atol=1e-5)
    # The exported graph routes the same rows, with a header input, also when none or all confirm.
    graph = OnnxRunner(export_onnx(network, _spec(0.6)), threads=1)
    for codes in (header, torch.full_like(header, -1), probs.argmax(dim=1)):
        with torch.no_grad():
            expected = network(images, features, codes).numpy()
        got = graph(images.numpy(), features.numpy(), codes.numpy())
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(graph(images.numpy(), features.numpy()), average.numpy(), rtol=1e-4, atol=1e-4)
    # Every frame confirmed: the graph runs the main network on no rows at all.
    network.confirm.fill_(0.0)
    everything = probs.argmax(dim=1)
    got = OnnxRunner(export_onnx(network, _spec(0.6)), threads=1)(
        images.numpy(), features.numpy(), everything.numpy()
    )
    np.testing.assert_allclose(got, (partner * SPEC_T / PARTNER_T).numpy(), rtol=1e-4, atol=1e-4)


def test_a_confirmed_frame_is_always_agree_and_the_spec_round_trips():
    network = build_network(_spec(0.6, agree_at=0.8))
    assert isinstance(network, EnsembleNet) and network.confirms
    assert network.confirm.tolist() == pytest.approx([0.8] * len(LABELS))  # raised to agree_at
    spec = _spec(0.7, agree_at=0.5)
    assert ModelSpec.from_dict(spec.to_dict()) == spec and spec.confirms
    assert spec.network_name == "efficientnet_lite0 + mobilenet_v3_small (confirms headers)"
    names = [f"{a} + {b} (confirms headers)" for a in ARCHITECTURES for b in ARCHITECTURES]
    longest = max(names, key=len)
    assert len(longest) <= 64, longest  # the models table's arch column
    plain = _spec(None)
    assert "confirm" not in plain.to_dict()["partner"] and not plain.confirms
    assert ModelSpec.from_dict(plain.to_dict()) == plain
    assert plain.header_codes([Label.CT, None, Label.XR]).tolist() == [0, -1, LABELS.index("XR")]
    with pytest.raises(ValueError, match=r"outside \(0.5, 1\]"):
        _spec(0.4)
    with pytest.raises(ValueError, match="one threshold per label"):
        replace(plain, partner=replace(plain.partner, confirm={"CT": 0.9}))  # type: ignore[arg-type]


def _decisions(path: Path, classifier: Classifier) -> None:
    """What ``sorter classify`` gives the files of ``path``: CT headers confirmed by the partner."""
    records = {Path(r["path"]).name: r for r in classify_paths([path], classifier)}
    assert records["ct.dcm"]["verdict"] == "agree" and records["ct.dcm"]["confidence"] > 0.99
    assert records["mr-as-ct.dcm"]["verdict"] == "agree"  # confirmed: the partner knows only CT
    assert records["mr.dcm"]["confidence"] < 0.99  # the average: the main network had its say


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_classify_passes_the_header_to_the_model(tmp_path, runtime):
    model = make_confirming_model(tmp_path / "confirming.pt", seed=3)
    copy_dicom(pydicom_file("CT_small.dcm"), tmp_path / "in" / "ct.dcm")
    copy_dicom(pydicom_file("MR_small.dcm"), tmp_path / "in" / "mr.dcm")
    copy_dicom(pydicom_file("MR_small.dcm"), tmp_path / "in" / "mr-as-ct.dcm", modality="CT")
    _decisions(tmp_path / "in", Classifier.load(model, device="cpu", runtime=runtime))


def test_a_scan_passes_the_header_to_the_model_here_and_in_the_decode_processes(tmp_path):
    model = make_confirming_model(tmp_path / "confirming.pt", seed=3)
    archive = tmp_path / "archive"
    for i in range(3):
        copy_dicom(pydicom_file("CT_small.dcm"), archive / f"ct{i}.dcm")
        copy_dicom(pydicom_file("MR_small.dcm"), archive / f"mr{i}.dcm")
    sql = (
        "SELECT i.path, i.header_label, p.verdict, p.p_ct FROM predictions p "
        "JOIN instances i ON i.id = p.instance_id ORDER BY i.path"
    )
    results = {}
    for in_workers in (True, False):
        url = f"sqlite:///{tmp_path / f'in-workers-{in_workers}.db'}"
        summary = _scan(url, Classifier.load(model, device="cpu"), archive, decode_one, 4, in_workers)
        assert summary.classified == 6
        results[in_workers] = [tuple(row) for row in query(url, sql)]
    there, here = results[True], results[False]
    assert [r[:3] for r in there] == [r[:3] for r in here]
    assert np.allclose([r[3] for r in there], [r[3] for r in here], rtol=0, atol=1e-6)
    for _, header, verdict, p_ct in results[True]:
        if header == "CT":  # confirmed by the partner, which is sure of CT
            assert verdict == "agree" and p_ct > 0.99
        else:  # the average, where the untrained main network keeps the partner's CT below it
            assert p_ct < 0.99


def test_confirm_thresholds_hold_relabelled_copies_confirmed_within_the_tolerance():
    """A partner that is right on label 0 and 1 but confidently calls label-2 images label 0: label 0
    needs a high threshold (or none), the others may confirm low, out of fold as in sample."""
    rng = np.random.default_rng(0)
    n = 600
    y = rng.integers(0, 3, n)
    folds = np.arange(n) % 3
    groups = np.asarray([f"s{i % 12}" for i in range(n)])
    probs = np.full((n, 3), 0.05)
    probs[np.arange(n), y] = 0.7  # the ensemble: right, at 0.7, and refutes every relabelled copy
    partner = np.full((n, 3), 0.02)
    partner[np.arange(n), y] = 0.96
    partner[y == 2] = [0.9, 0.02, 0.08]  # sure of label 0 on label-2 images
    agree_at, disagree_at = np.full(3, 0.65), np.full(3, 0.1)
    at = choose_confirm(probs, partner, y, agree_at, tolerance=0.01)
    assert at[0] > 0.9 and at[1] <= 0.7 and at[2] <= 0.7
    found = confirm_point(probs, partner, y, folds, groups, (agree_at, disagree_at), ["A", "B", "C"], 0.01)
    assert found["ensemble_images"]["agree"] == pytest.approx(1.0)
    assert found["ensemble_images"]["caught"] == pytest.approx(1.0)
    assert found["images"]["false_agree"] <= found["ensemble_images"]["false_agree"] + 0.01
    assert found["images"]["caught"] >= found["ensemble_images"]["caught"] - 0.01
    assert 0.3 < found["fast"] < 1.0 and set(found["per_fold"]) == {0, 1, 2}
    view = served(probs, partner, at)
    assert (view[y == 2, 0] == probs[y == 2, 0]).all()  # label 0 never confirmed on label-2 images
