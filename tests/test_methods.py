"""ADF, CBF and FPDE against VIFB's MATLAB outputs, plus the method contract.

The reference outputs in ``reference/vifb/fused`` are JPEGs written by MATLAB
``imwrite`` (quality 75, 4:2:0).  Two checks per (method, pair):

- raw PSNR of our ``quantize=True`` result against the decoded JPEG (>= 32 dB; the
  JPEG loss alone caps this at 31.6-47 dB on these pairs);
- our result re-encoded with the reference file's own quantisation tables and chroma
  subsampling must reproduce the reference JPEG (>= 50 dB; in practice bit-identical).
  This is the check that proves the port exact rather than merely close.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from method_contract import (
    check_dtype_and_range,
    check_single_image_and_broadcast,
    check_stack_equals_slices,
    contract_stack,
)
from vifb_reference import PAIRS, RAW_PSNR_MIN, assert_reproduces, load_pair

from fusion.methods import available, get_method

METHODS = ("adf", "cbf", "fpde")
# FPDE on walking2 reaches 31.64 dB only: our output re-encoded with the reference's
# JPEG settings is bit-identical to the reference file, so the whole gap is the
# reference's own JPEG (quality 75) loss on this detailed image, not the port.
RAW_PSNR_MIN_JPEG_LIMITED = {("fpde", "walking2"): 31.5}


@pytest.mark.data
@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("method", METHODS)
def test_matches_vifb_reference(reference_dir: Path, method: str, pair: str) -> None:
    root = reference_dir / "vifb"
    vi, ir = load_pair(root, pair)
    # VIFB's run_*(VI, IR) -> method(IR, VI); ours takes (anatomical=VI role, other=IR role).
    fused = get_method(method)(vi, ir, quantize=True)
    assert_reproduces(fused, root / "fused" / f"{pair}_{method.upper()}.jpg", f"{method:5s} {pair:13s}",
                      RAW_PSNR_MIN_JPEG_LIMITED.get((method, pair), RAW_PSNR_MIN))


@pytest.fixture
def stack(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Three slices: smooth structure + noise, pure noise, and an all-black slice."""
    return contract_stack(rng)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_stack_equals_slices(stack, method: str, quantize: bool) -> None:
    check_stack_equals_slices(get_method(method), *stack, quantize)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_dtype_and_range(stack, method: str, quantize: bool) -> None:
    # float32 tracks float64 (FPDE's 4th derivatives amplify rounding most); the quantised
    # float32 result is not compared, and only the float64 black slice is checked.
    check_dtype_and_range(get_method(method), *stack, quantize, float32_atol=2e-3, float32_black=False)


@pytest.mark.parametrize("method", METHODS)
def test_single_image_and_broadcast(stack, method: str) -> None:
    check_single_image_and_broadcast(get_method(method), *stack)


def test_rejects_integer_input() -> None:
    img = np.zeros((8, 8), np.uint8)
    with pytest.raises(TypeError):
        get_method("adf")(img, img)


def test_registry() -> None:
    from fusion.methods import adf, cbf, fpde

    assert {"adf", "cbf", "fpde"} <= set(available())
    assert get_method("cbf") is cbf.cbf
    assert get_method("ADF") is adf.adf
    assert get_method("fpde") is fpde.fpde
    with pytest.raises(KeyError) as exc:
        get_method("no-such-method")
    msg = str(exc.value)
    assert "no-such-method" in msg
    for name in ("adf", "cbf", "fpde"):
        assert name in msg


def test_cbf_window_strength_matches_literal_covariance(rng: np.random.Generator) -> None:
    """The vectorised weight equals cbf_ieeeconf2011f's per-pixel sum(eig(covarf(.)))."""
    from fusion.methods.cbf import window_strength

    d = rng.standard_normal((9, 12)) * 20
    padded = np.pad(d, 2, mode="reflect")  # per_extn_im_fn
    expected = np.empty_like(d)
    for i in range(d.shape[0]):
        for j in range(d.shape[1]):
            win = padded[i:i + 5, j:j + 5]
            expected[i, j] = (np.linalg.eigvalsh(np.cov(win, rowvar=False)).sum()
                              + np.linalg.eigvalsh(np.cov(win.T, rowvar=False)).sum())
    np.testing.assert_allclose(window_strength(d), expected, rtol=1e-10, atol=1e-9)


def test_pca_weights_match_eig(rng: np.random.Generator) -> None:
    """Closed-form per-slice weights equal MATLAB's eig-based choice, slice by slice."""
    from fusion.methods._common import pca_detail_weights

    d1 = rng.standard_normal((4, 16, 16))
    d2 = 0.7 * d1 + rng.standard_normal((4, 16, 16)) * np.array([0.1, 1, 3, 10])[:, None, None]
    d2[3] = -d2[3]
    p1, p2 = pca_detail_weights(d1, d2)
    for s in range(4):
        vals, vecs = np.linalg.eigh(np.cov(np.stack([d1[s].ravel(), d2[s].ravel()])))
        v = vecs[:, np.argmax(vals)]
        np.testing.assert_allclose([p1[s, 0, 0], p2[s, 0, 0]], v / v.sum(), rtol=1e-10)
    # Both details zero: MATLAB's eig gives the identity and the code takes (1, 0).
    z = np.zeros((8, 8))
    assert [p.item() for p in pca_detail_weights(z, z)] == [1.0, 0.0]
