"""fusion.fuse, colour handling, the CLI and the simple metrics."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dicom_node.cli import main
from fusion import dmf_stack, fuse
from fusion.intensity import rgb_to_ycbcr, to_uint8, to_unit, ycbcr_to_rgb
from fusion.metrics import average_gradient, entropy, mutual_information, qabf, ssim
from fusion_demo.samples import synthetic_pair


@pytest.fixture(scope="module")
def pair():
    return synthetic_pair(96)


def test_fuse_grey_pair(pair):
    mr, ct = pair
    out = fuse(mr, ct, method="dmf", feature_source="image", device="cpu")
    assert out.shape == mr.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    # the saturated skull of the CT survives fusion (the background/saturation trap)
    # does not fade: it stays within the range the three exposures give it
    skull = (ct == 255) & (mr < 120)
    ex = dmf_stack(to_unit(mr)[None], to_unit(ct)[None], feature_source="image").exposures[:, 0]
    lo, hi = min(e[skull].mean() for e in ex), max(e[skull].mean() for e in ex)
    assert lo - 0.02 <= out[skull].mean() <= hi + 0.02
    assert out[skull].mean() > 0.3  # far from the black a collapsed weight gives


def test_stack_equals_slices(pair):
    mr, ct = pair
    a = np.stack([mr, np.flipud(mr), np.zeros_like(mr)])
    b = np.stack([ct, np.flipud(ct), np.zeros_like(ct)])
    for method in ("dmf", "faithful"):
        stacked = fuse(a, b, method=method, feature_source="image", device="cpu")
        for i in range(3):
            np.testing.assert_allclose(stacked[i], fuse(a[i], b[i], method=method, feature_source="image",
                                                        device="cpu"), atol=1e-6)
        assert stacked[2].max() < 1e-6  # an empty slice stays empty


def test_single_methods_through_fuse(pair):
    mr, ct = pair
    for m in ("adf", "cbf", "fpde"):
        out = fuse(mr, ct, method=m, device="cpu")
        assert out.shape == mr.shape
    with pytest.raises(ValueError, match="unknown method"):
        fuse(mr, ct, method="nope")


def test_colour_overlay_keeps_chroma(pair, rng):
    mr, _ = pair
    h, w = mr.shape
    pet = np.zeros((h, w, 3), np.uint8)
    pet[20:70, 20:70] = (200, 60, 30)  # a reddish hot spot
    out = fuse(mr, pet, feature_source="image", device="cpu")
    assert out.shape == (h, w, 3)
    ycc_in = rgb_to_ycbcr(to_unit(pet))
    ycc_out = rgb_to_ycbcr(out)
    # where the new luminance keeps the colour inside the RGB gamut, chroma is unchanged
    in_gamut = np.all((out > 0.001) & (out < 0.999), axis=-1)
    in_gamut[:25, :] = in_gamut[65:, :] = False
    assert in_gamut.sum() > 500
    np.testing.assert_allclose(ycc_out[in_gamut][..., 1:], ycc_in[in_gamut][..., 1:], atol=1e-5)


def test_ycbcr_round_trip(rng):
    rgb = rng.random((10, 12, 3))
    np.testing.assert_allclose(ycbcr_to_rgb(rgb_to_ycbcr(rgb)), rgb, atol=1e-12)
    np.testing.assert_allclose(rgb_to_ycbcr(np.ones((1, 1, 3)))[0, 0], [1.0, 0.5, 0.5], atol=1e-9)


def test_size_mismatch_is_a_clear_error(pair):
    mr, ct = pair
    with pytest.raises(ValueError, match="register and resample"):
        fuse(mr, ct[:-1])


def test_dmf_stack_weights_sum_to_one(pair):
    mr, ct = pair
    res = dmf_stack(to_unit(mr)[None], to_unit(ct)[None], feature_source="image")
    assert res.exposures.shape == (3, 1) + mr.shape
    np.testing.assert_allclose(res.weights.sum(0), 1.0, atol=1e-6)


def test_dmf_with_vgg_features(pair, vgg_weights):
    mr, ct = pair
    out_vgg = fuse(mr, ct, method="dmf", feature_source="vgg", device="cpu")
    out_img = fuse(mr, ct, method="dmf", feature_source="image", device="cpu")
    assert out_vgg.shape == mr.shape
    assert 0 < np.abs(out_vgg - out_img).mean() < 0.1  # different weights, same kind of image


def test_cli_fuse_writes_png(tmp_path, pair):
    mr, ct = pair
    Image.fromarray(mr).save(tmp_path / "mr.png")
    Image.fromarray(ct).save(tmp_path / "ct.png")
    out = tmp_path / "out" / "fused.png"
    rc = main(["fuse", str(tmp_path / "mr.png"), str(tmp_path / "ct.png"), "-o", str(out),
               "--method", "dmf", "--feature-source", "image", "--device", "cpu", "--trio", "adf,cbf,fpde"])
    assert rc == 0
    img = np.asarray(Image.open(out))
    assert img.shape == mr.shape and img.dtype == np.uint8
    # the default method needs no VGG16 weights and no trio
    rc = main(["fuse", str(tmp_path / "mr.png"), str(tmp_path / "ct.png"), "-o", str(tmp_path / "d.png")])
    assert rc == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "d.png")),
                                  to_uint8(fuse(mr, ct)))
    rc = main(["fuse", str(tmp_path / "mr.png"), str(tmp_path / "ct.png"), "-o", str(tmp_path / "f.npy"),
               "--method", "cbf"])
    assert rc == 0 and np.load(tmp_path / "f.npy").dtype == np.float32


def test_cli_missing_input_is_an_error(tmp_path, capsys):
    rc = main(["fuse", str(tmp_path / "nope.png"), str(tmp_path / "x.png"), "-o", str(tmp_path / "o.png")])
    assert rc == 2
    assert "input not found" in capsys.readouterr().err


def test_metrics_on_hand_cases():
    two_level = np.zeros((8, 8))
    two_level[:, 4:] = 200
    assert entropy(two_level) == pytest.approx(1.0)
    # MI(F, A) with F == A is A's entropy in nats
    assert mutual_information(two_level, np.zeros((8, 8)), two_level) == pytest.approx(np.log(2))
    rng = np.random.default_rng(0)
    x = rng.random((32, 32)) * 255
    assert ssim(x, x, x) == pytest.approx(2.0)
    ramp = np.tile(np.arange(10.0), (5, 1)) * 3
    assert average_gradient(ramp) == pytest.approx(3 / np.sqrt(2))
    # F equal to both sources keeps all edges: every pixel at the variant's ceiling
    assert qabf(x, x, x) == pytest.approx(0.9994 * 0.9879 / (1 + np.exp(-22 * 0.2)), rel=1e-3)


def test_logs_are_json_with_stable_event_names():
    import io
    import json
    import logging

    from dicom_node import logs

    buf = io.StringIO()
    logs.setup("INFO", buf)
    logging.getLogger("fusion.test").info("weights.verified path=%s", "/x", extra=logs.fields(seconds=0.5))
    doc = json.loads(buf.getvalue())
    assert doc["event"] == "weights.verified" and doc["detail"] == "path=/x" and doc["seconds"] == 0.5
    assert doc["level"] == "info" and doc["logger"] == "fusion.test"


# -- one default-trio rule for the library, the CLI and the node ----------------------------------


@pytest.mark.parametrize("modality, colour", [("CT", False), ("PT", True), ("PT", False), ("NM", True),
                                              (None, True), (None, False)])
def test_library_cli_and_node_pick_the_same_trio(modality, colour, tmp_path, monkeypatch, pair):
    """A grey PET gets the PET trio when its modality is known, everywhere; unknown: colour = PET, grey = CT."""
    import fusion.api as api
    from dicom_node.config import parse_config
    from dicom_node.workflow import stages
    from fusion.api import resolve_trio

    seen = []

    def recording_dmf(a, b, *, trio, **kwargs):
        seen.append(tuple(trio))
        return api.DMFResult(a, None, None)

    monkeypatch.setattr(api, "dmf_stack", recording_dmf)
    mr, ct = pair
    overlay = np.stack([ct, ct // 2, ct // 3], axis=-1) if colour else ct

    fuse(mr, overlay, method="dmf", feature_source="image", device="cpu", modality=modality)  # the library

    Image.fromarray(mr).save(tmp_path / "mr.png")
    Image.fromarray(overlay).save(tmp_path / "overlay.png")
    args = ["fuse", str(tmp_path / "mr.png"), str(tmp_path / "overlay.png"), "-o", str(tmp_path / "f.png"),
            "--method", "dmf", "--feature-source", "image", "--device", "cpu"] + (["--modality", modality] if modality else [])
    assert main(args) == 0  # the command line

    if modality is not None:  # the node always knows the modality (DICOM Modality of the overlay)
        pipeline = parse_config({"pipelines": [{"name": "p", "base": {"modality": ["MR"]},
                                                "overlay": {"modality": [modality]},
                                                "method": "dmf", "feature_source": "image"}]}).pipelines[0]
        b = to_unit(overlay).astype(np.float32)
        stages.fuse(stages.PreparedStacks(to_unit(mr)[None].astype(np.float32), b[None], modality), pipeline, "cpu")

    expected = resolve_trio(None, modality, colour)
    assert seen == [expected] * len(seen) and len(seen) == (2 if modality is None else 3)
    assert expected == api.default_trio(modality or ("PT" if colour else "CT"))
