from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sorter.domain import ALL_LABELS, Label
from sorter.errors import IncompatibleModelError, ModelError
from sorter.model.artefact import load_artefact, save_artefact
from sorter.model.network import build_network
from sorter.model.preprocess import preprocess_frame
from sorter.model.spec import ARCHITECTURES, ModelSpec, PreprocessParams


def _spec(arch: str = "mobilenet_v3_small", size: int = 64) -> ModelSpec:
    return ModelSpec(
        arch=arch,
        labels=ALL_LABELS,
        preprocess=PreprocessParams(input_size=size),
        temperature=1.7,
        training={"sources": 3},
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_builds_with_one_channel_stem(arch):
    spec = replace(_spec(arch), preprocess=PreprocessParams(input_size=64, channels=("scaled",)))
    net = build_network(spec).eval()
    with torch.inference_mode():
        out = net(torch.zeros(2, 1, 64, 64), torch.zeros(2, 1))
    assert out.shape == (2, len(ALL_LABELS))


def test_artefact_round_trip(tmp_path):
    spec = _spec()
    net = build_network(spec).eval()
    path = tmp_path / "m.pt"
    digest = save_artefact(net, spec, path)
    loaded = load_artefact(path)
    assert loaded.sha256 == digest and len(digest) == 64
    assert loaded.spec.temperature == pytest.approx(1.7)
    assert loaded.spec.labels == ALL_LABELS
    assert loaded.spec.training == {"sources": 3}
    x, f = torch.rand(3, 1, 64, 64), torch.rand(3, 1)
    with torch.inference_mode():
        assert torch.allclose(net(x, f), loaded.network(x, f))


def test_tampered_weights_are_refused(tmp_path):
    spec = _spec()
    path = tmp_path / "m.pt"
    save_artefact(build_network(spec), spec, path)
    payload = torch.load(path, weights_only=True)
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name] += 1
    torch.save(payload, path)
    with pytest.raises(IncompatibleModelError, match="checksum"):
        load_artefact(path)


def test_version_mismatch_and_garbage_are_refused(tmp_path):
    spec = _spec()
    path = tmp_path / "m.pt"
    save_artefact(build_network(spec), spec, path)
    payload = torch.load(path, weights_only=True)
    payload["spec"] = payload["spec"].replace('"format_version": 1', '"format_version": 99')
    torch.save(payload, path)
    with pytest.raises(IncompatibleModelError, match="format version 99"):
        load_artefact(path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(IncompatibleModelError):
        load_artefact(junk)
    with pytest.raises(ModelError, match="does not exist"):
        load_artefact(tmp_path / "missing.pt")
    # A folder or a device is not "missing" (both said "does not exist").
    with pytest.raises(ModelError, match=r"is a folder, not a model file \(name the .pt in it\)"):
        load_artefact(tmp_path)
    with pytest.raises(ModelError, match="is not a regular file"):
        load_artefact(Path("/dev/null"))


def test_architecture_mismatch_is_refused(tmp_path):
    small, other = _spec("mobilenet_v3_small"), _spec("resnet18")
    path = tmp_path / "m.pt"
    save_artefact(build_network(small), small, path)
    payload = torch.load(path, weights_only=True)
    payload["spec"] = payload["spec"].replace('"mobilenet_v3_small"', '"resnet18"')
    torch.save(payload, path)
    assert other.arch == "resnet18"
    with pytest.raises(IncompatibleModelError, match="do not match architecture resnet18"):
        load_artefact(path)


def test_unknown_spec_values_are_refused():
    with pytest.raises(ValueError, match="unknown architecture"):
        ModelSpec(arch="alexnet", labels=ALL_LABELS)
    with pytest.raises(ValueError, match="scaling"):
        PreprocessParams(scaling="zscore")
    with pytest.raises(ValueError, match="distinct"):
        ModelSpec(arch="resnet18", labels=(Label.CT, Label.CT))


def test_preprocess_shapes_ranges_and_constant_images():
    params = PreprocessParams(input_size=32, channels=("scaled", "hu"))
    ct = np.full((100, 60), -1000.0, dtype=np.float32)
    ct[20:80, 10:50] = 40.0
    image, feats = preprocess_frame(ct, 0.0, params)
    assert image.shape == (2, 32, 32) and feats.shape == (1,)
    assert image.min() >= 0 and image.max() <= 1
    const, _ = preprocess_frame(np.full((10, 10), 7.0, np.float32), 0.0, params)
    assert np.isfinite(const).all() and const[0].max() == 0
    nan = np.full((8, 8), np.nan, np.float32)
    assert np.isfinite(preprocess_frame(nan, 0.0, params)[0]).all()


def test_matrix_and_aspect_features_describe_the_frame_before_the_letterbox():
    params = PreprocessParams(input_size=16, features=("aspect", "colourfulness", "matrix"))
    for shape, matrix, aspect in (
        ((512, 512), 0.5, 1.0),
        ((64, 256), 2 / 6, 0.25),
        ((3000, 4096), 1.0, 3000 / 4096),
    ):
        _, feats = preprocess_frame(np.ones(shape, np.float32), 0.25, params)
        np.testing.assert_allclose(feats, [aspect, 0.25, matrix], rtol=1e-6)
    _, feats = preprocess_frame(np.ones((8, 32), np.float32), 0.0, params)
    assert feats[2] == 0.0  # below 64 px clips to 0; above 4 096 px to 1
    with pytest.raises(ValueError, match="unknown feature"):
        PreprocessParams(features=("size",))


def test_minmax_matches_the_paper_definition():
    params = PreprocessParams(input_size=16, scaling="minmax", letterbox=False, features=())
    frame = np.arange(256, dtype=np.float32).reshape(16, 16) * 10 - 50
    image, feats = preprocess_frame(frame, 0.3, params)
    assert feats.shape == (0,)
    assert image[0].min() == 0 and image[0].max() == 1
    np.testing.assert_allclose(image[0], (frame - frame.min()) / (frame.max() - frame.min()), atol=1e-6)


def test_reduce_resize_is_a_block_mean_and_old_specs_keep_bilinear():
    rng = np.random.default_rng(0)
    frame = rng.normal(0, 500, (512, 512)).astype(np.float32)
    params = PreprocessParams(input_size=128, resize="reduce", channels=("hu",), features=())
    image, _ = preprocess_frame(frame, 0.0, params)
    block_mean = frame.reshape(128, 4, 128, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(image[0], np.clip((block_mean + 1000) / 3000, 0, 1), atol=1e-6)
    # A spec written before the field existed (the bundled 0.1 model) still resizes bilinearly.
    spec = ModelSpec(arch="mobilenet_v3_small", labels=ALL_LABELS)
    data = spec.to_dict()
    del data["preprocess"]["resize"]
    assert ModelSpec.from_dict(data).preprocess.resize == "bilinear"
    bilinear, _ = preprocess_frame(frame, 0.0, replace(params, resize="bilinear"))
    assert not np.allclose(bilinear, image, atol=1e-4)
    with pytest.raises(ValueError, match="resize"):
        PreprocessParams(resize="nearest")


def test_the_hu_window_is_part_of_the_spec_and_old_specs_keep_today_s():
    """ARCHITECTURE §4: the window is model spec, not a constant in two modules."""
    from sorter.model.spec import HU_WINDOW

    arch = "mobilenet_v3_small"
    spec = ModelSpec(arch=arch, labels=ALL_LABELS, preprocess=PreprocessParams(channels=("hu",)))
    data = spec.to_dict()
    assert "hu_low" not in data["preprocess"]  # the default stays implicit: older releases read it
    assert ModelSpec.from_dict(data).preprocess.hu_low == HU_WINDOW[0]
    narrow = PreprocessParams(channels=("hu",), hu_low=-100.0, hu_high=100.0, input_size=16)
    again = ModelSpec.from_dict(ModelSpec(arch=arch, labels=ALL_LABELS, preprocess=narrow).to_dict())
    assert (again.preprocess.hu_low, again.preprocess.hu_high) == (-100.0, 100.0)
    frame = np.full((16, 16), 0.0, dtype=np.float32)  # water
    default_hu = preprocess_frame(frame, 0.0, PreprocessParams(channels=("hu",), input_size=16))[0]
    narrow_hu = preprocess_frame(frame, 0.0, narrow)[0]
    assert np.allclose(default_hu, 1000.0 / 3000.0) and np.allclose(narrow_hu, 0.5)
    with pytest.raises(ValueError, match="hu window must rise"):
        PreprocessParams(hu_low=10.0, hu_high=-10.0)


def test_the_emission_threshold_round_trips_and_older_specs_read_without_it():
    """A model without ``emission_agree_at`` writes no key (a release before it reads the file);
    one with it keeps it through save and load; a spec before it reads as ``None``."""
    from sorter.domain import Thresholds

    header_test = Thresholds(agree_at={"PT": 0.9, "NM": 0.8}, disagree_at={"PT": 0.01, "NM": 0.02})
    old = replace(_spec(), thresholds=header_test)
    assert "emission_agree_at" not in old.to_dict()["thresholds"]
    assert ModelSpec.from_dict(old.to_dict()).thresholds.emission_agree_at is None
    new = replace(old, thresholds=replace(header_test, emission_agree_at=0.62))
    assert new.to_dict()["thresholds"]["emission_agree_at"] == 0.62
    assert ModelSpec.from_dict(new.to_dict()).thresholds == new.thresholds
    with pytest.raises(IncompatibleModelError, match="emission_agree_at"):
        ModelSpec.from_dict(
            {**new.to_dict(), "thresholds": {**new.to_dict()["thresholds"], "emission_agree_at": 2}}
        )
