"""What a reader sees: the DICOM standard palettes for PET/NM, the CT window saturation warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def test_palettes_are_the_standard_ones():
    from pydicom.pixels import apply_color_lut
    from pydicom.uid import UID

    from dicom_node.dicom.palette import PALETTE_UIDS, colourise, palette_lut

    for name, uid in PALETTE_UIDS.items():
        lut = palette_lut(name)
        assert lut.shape == (256, 3)
        # exactly pydicom's copy of the standard Palette Color LUT instance, entry for entry
        np.testing.assert_array_equal(np.rint(lut * 255).astype(np.uint8),
                                      apply_color_lut(np.arange(256, dtype=np.uint8), palette=UID(uid)))
        np.testing.assert_array_equal(lut[0], [0, 0, 0])  # no uptake: black
        np.testing.assert_array_equal(lut[255], [1, 1, 1])  # the hottest: white
    hot = palette_lut("hot_iron")
    lum = hot @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(lum) >= -1e-6)  # Hot Iron: brightness never falls with uptake
    np.testing.assert_allclose(hot[128], [1.0, 0.0, 0.0], atol=1 / 255)  # half way: pure red (PS3.6 B.1.1)
    assert palette_lut("pet")[128, 2] == pytest.approx(1.0)  # PET half way: blue-purple, not red
    stack = np.linspace(0, 1, 2 * 3 * 4).reshape(2, 3, 4)
    rgb = colourise(stack, "pet")
    assert rgb.shape == (2, 3, 4, 3) and rgb.dtype == np.float32
    with pytest.raises(ValueError, match="unknown palette"):
        palette_lut("rainbow")


def test_window_saturation():
    from fusion.display import window_saturation

    hu = np.array([-1000.0] * 50 + [30.0] * 30 + [700.0] * 20)  # air, soft tissue, bone
    s = window_saturation(hu, 40, 80)  # brain window: bone white, soft tissue shown
    assert s.body_voxels == 50 and s.white == pytest.approx(0.4) and s.black == 0.0
    s = window_saturation(hu, -600, 1200)  # lung window: soft tissue and bone at the top
    assert s.white == pytest.approx(1.0) and s.worst() == ("white", 1.0)
    assert window_saturation(np.full(10, -1000.0), 40, 80).body_voxels == 0


@pytest.fixture(scope="module")
def phantom_pair(tmp_path_factory):
    from dicom_node.workflow import stages
    from fusion_demo.samples import write_synthetic_pair

    ct_dir, mr_dir = write_synthetic_pair(tmp_path_factory.mktemp("pair"))
    return stages.load(sorted(Path(ct_dir).iterdir()), sorted(Path(mr_dir).iterdir()))


def _pipeline(**kw):
    from dicom_node.config import Pipeline

    return Pipeline(name="t", base={"modality": ["CT"]}, overlay={"modality": ["MR"]}, feature_source="image", **kw)


def test_a_window_that_whites_out_the_body_is_warned(phantom_pair, caplog):
    from dicom_node.workflow import stages

    identity = stages.Registration(tuple(tuple(float(v) for v in r) for r in np.eye(4)))
    # the phantom's own header window (40/80): skull white, brain shown - no warning
    assert stages.prepare(phantom_pair, identity, _pipeline()).warnings == ()
    # a lung window typed for a head: almost every body voxel above its top
    prepared = stages.prepare(phantom_pair, identity, _pipeline(ct_window=[-800, 300]))
    assert len(prepared.warnings) == 1
    text = prepared.warnings[0]
    assert "-800/300" in text and "white" in text and "ct_window" in text
    share = int(text.split(" shows ")[1].split("%")[0])
    assert share > 90
    # the limit is per pipeline: at 100 % nothing is ever warned
    assert stages.prepare(phantom_pair, identity, _pipeline(ct_window=[-800, 300],
                                                            ct_saturation_warning=1.0)).warnings == ()


def test_palette_is_selectable_and_pet_is_coloured_with_it(phantom_pair):
    from dataclasses import replace

    from dicom_node.dicom.palette import colourise
    from dicom_node.workflow import stages

    identity = stages.Registration(tuple(tuple(float(v) for v in r) for r in np.eye(4)))
    # the MR of the phantom pair relabelled PT: shown in colour through the pipeline's palette
    pet_pair = replace(phantom_pair, overlay=replace(phantom_pair.overlay, modality="PT"))
    for palette in ("hot_iron", "pet"):
        prepared = stages.prepare(pet_pair, identity, _pipeline(palette=palette))
        assert prepared.other.shape[-1] == 3
        grey_guess = prepared.other  # every RGB value is an entry of that palette's LUT
        from dicom_node.dicom.palette import palette_lut

        lut = palette_lut(palette)
        sample = grey_guess.reshape(-1, 3)[:: 997]
        d = np.min(np.abs(sample[:, None, :] - lut[None]).sum(-1), axis=1)
        assert d.max() < 1e-6
    assert not np.array_equal(colourise(np.array([0.5]), "hot_iron"), colourise(np.array([0.5]), "pet"))


def test_palette_config_key():
    from dicom_node.config import ConfigError, parse_config

    base = {"pipelines": [{"name": "p", "base": {"modality": ["CT"]}, "overlay": {"modality": ["PT"]}}]}
    assert parse_config(base).pipelines[0].palette == "hot_iron"
    base["pipelines"][0]["palette"] = "pet"
    assert parse_config(base).pipelines[0].palette == "pet"
    base["pipelines"][0]["palette"] = "rainbow"
    with pytest.raises(ConfigError):
        parse_config(base)
