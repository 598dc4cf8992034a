"""WLS (VIFB's VSMWLS) and MDLatLRR (VIFB's LatLRR) against VIFB's MATLAB outputs, plus
the method contract and literal transcriptions of the MATLAB code on tiny images.

Reference check per (method, pair), as in ``test_methods.py``:

- raw PSNR of our ``quantize=True`` result against the decoded reference JPEG (>= 32 dB;
  MDLatLRR on ``running`` reaches 31.75 dB, JPEG-limited, see below);
- our result re-encoded with the reference file's own quantisation tables and chroma
  subsampling must reproduce the reference JPEG: >= 50 dB and >= 99.9 % identical pixels
  (in practice all of them).  This is what proves the port exact: applying ``L_8`` to
  row-major instead of column-major patches still scores 35.4 dB raw on manWalking, but
  only 52 dB / 89 % identical pixels after re-encoding.

MDLatLRR costs about 6 us per 8x8 SVD on CPU (four levels, both images, every stride-1
patch), so to keep this file under a minute on two cores only the ``MDLATLRR_FULL``
pairs run on the whole image; the others run on a crop (a different corner per pair, so
every image border is exercised, and one crop inside the image).  MDLatLRR is local: an
output pixel depends on the inputs within 4 levels x 7 pixels = 28 pixels, so the crop's
output equals the whole image's output away from the crop's cut edges (checked:
bit-identical at >= 28 px, 1.8e-6 off at 20 px).  The comparison uses the region at
>= 32 px from the cut edges; for the re-encoding check the crop result is pasted into the
decoded reference, the composite is re-encoded, and the region less one JPEG block (MCU)
along the cut edges (chroma upsampling reads one neighbouring sample) must match the
reference.  ``FUSION_REFERENCE_FULL=1`` runs every pair on the whole image (about two
minutes more); measured that way all 12 cases are bit-identical after re-encoding.
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

from fusion import environment
from fusion.methods import available, get_method

VIFB_NAME = {"wls": "VSMWLS", "mdlatlrr": "LatLRR"}

# MDLatLRR on running reaches 31.75 dB raw only; re-encoded with the reference's JPEG
# settings our output is bit-identical to the reference file, so the gap is the
# reference's own quality-75 JPEG loss on this detailed image, not the port.
RAW_PSNR_MIN_JPEG_LIMITED = {("mdlatlrr", "running"): 31.5}

MDLATLRR_FULL = ("running",)
# Crop (row0, row1, col0, col1) per pair; cut edges are multiples of 16 (the MCU size).
MDLATLRR_CROPS = {
    "manWalking": (48, 208, 80, 256),  # inside 254 x 328: four cut edges
    "walking2": (0, 128, 0, 160),  # top-left corner
    "walkingnight": (128, 254, 160, 328),  # bottom-right
    "snow": (0, 128, 288, 448),  # top-right of 324 x 448
    "carLight": (320, 460, 0, 160),  # bottom-left of 460 x 630
}
RECEPTIVE_MARGIN = 32  # >= 28 = 4 levels x (8 - 1), and a multiple of 16


def _reference_cases():
    full = PAIRS if environment.flag("FUSION_REFERENCE_FULL") else MDLATLRR_FULL
    for pair in PAIRS:
        yield pytest.param("wls", pair, None, id=f"wls-{pair}")
    for pair in PAIRS:
        crop = None if pair in full else MDLATLRR_CROPS[pair]
        yield pytest.param("mdlatlrr", pair, crop,
                           id=f"mdlatlrr-{pair}" + ("" if crop is None else "-crop"))


@pytest.mark.data
@pytest.mark.parametrize(("method", "pair", "crop"), list(_reference_cases()))
def test_matches_vifb_reference(reference_dir: Path, method: str, pair: str, crop) -> None:
    root = reference_dir / "vifb"
    vi, ir = load_pair(root, pair, single_ir=True)
    h, w = vi.shape[-2:]
    r0, r1, c0, c1 = crop if crop is not None else (0, h, 0, w)
    # VIFB's run_*(VI, IR) -> method(IR, VI); ours takes (anatomical = VI role, other = IR role).
    fused = get_method(method)(vi[:, r0:r1, c0:c1], ir[r0:r1, c0:c1], quantize=True)
    assert_reproduces(fused, root / "fused" / f"{pair}_{VIFB_NAME[method]}.jpg", f"{method:8s} {pair:13s}",
                      RAW_PSNR_MIN_JPEG_LIMITED.get((method, pair), RAW_PSNR_MIN), crop, margin=RECEPTIVE_MARGIN)


# --- Literal transcriptions of the MATLAB code (tiny images, Python loops as in MATLAB)


def _l8() -> np.ndarray:
    from fusion.methods.mdlatlrr import projection_matrix

    try:
        return projection_matrix()
    except Exception as exc:  # noqa: BLE001 - skip with the loader's message
        pytest.skip(str(exc))


def _literal_mdlatlrr(img1: np.ndarray, img2: np.ndarray, proj: np.ndarray,
                      levels: int = 4) -> np.ndarray:
    """``run_LatLRR`` + ``fusion_method`` + ``deep_latent`` + ``decomposition`` as written,
    including the never-reset accumulator, NaN weights of all-zero patch pairs and
    ``im2uint8`` (NaN -> 0).  Returns the uint8 levels as float."""
    u = 8
    t1, t2 = img1.shape

    def decomposition(img):
        vecs, count = [], np.zeros((t1, t2))
        for i in range(t1 - u + 1):
            for j in range(t2 - u + 1):
                vecs.append(img[i:i + u, j:j + u].ravel(order="F"))
                count[i:i + u, j:j + u] += 1
        v = proj @ np.array(vecs).T
        detail = np.zeros((t1, t2))
        k = 0
        for i in range(t1 - u + 1):
            for j in range(t2 - u + 1):
                detail[i:i + u, j:j + u] += v[:, k].reshape(u, u, order="F")
                k += 1
        return img - detail / count, v, count

    def deep_latent(img):
        vs = []
        for _ in range(levels):
            img, v, count = decomposition(img)
            vs.append(v)
        return img, vs, count

    b1, v1s, count = deep_latent(img1)
    b2, v2s, _ = deep_latent(img2)
    base = 0.5 * b1 + 0.5 * b2
    acc = np.zeros((t1, t2))
    detail = np.zeros((t1, t2))
    with np.errstate(invalid="ignore"):
        for v1, v2 in zip(v1s, v2s):
            n1 = np.array([np.linalg.svd(v1[:, k].reshape(u, u, order="F"), compute_uv=False).sum()
                           for k in range(v1.shape[1])])
            n2 = np.array([np.linalg.svd(v2[:, k].reshape(u, u, order="F"), compute_uv=False).sum()
                           for k in range(v2.shape[1])])
            f = n1 / (n1 + n2) * v1 + n2 / (n1 + n2) * v2
            k = 0
            for i in range(t1 - u + 1):
                for j in range(t2 - u + 1):
                    acc[i:i + u, j:j + u] += f[:, k].reshape(u, u, order="F")
                    k += 1
            detail = detail + acc / count
        out = base + detail
        return np.where(np.isnan(out), 0.0, np.floor(np.clip(out, 0, 1) * 255 + 0.5))


@pytest.fixture
def tiny_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """24 x 30 uint8-valued images; both black in a 12 x 14 corner (all-zero patch pairs),
    only ``a`` black in another 10 x 10 block."""
    a = np.round(rng.random((24, 30)) * 255) / 255
    b = np.round(rng.random((24, 30)) * 255) / 255
    a[:12, :14] = 0
    b[:12, :14] = 0
    a[14:, 20:] = 0
    return a, b


def test_mdlatlrr_matches_literal_matlab(tiny_pair) -> None:
    a, b = tiny_pair
    proj = _l8()
    want = _literal_mdlatlrr(b, a, proj)  # run_LatLRR: fusion_method(IR, VI)
    fn = get_method("mdlatlrr")
    got = fn(a, b, quantize=True) * 255.0
    np.testing.assert_array_equal(got, want)
    # The all-zero patch pairs: MATLAB's NaN pixels come out as 0, here explicitly.
    assert np.all(got[:12, :14] == 0)
    got_float = fn(a, b)
    assert np.all(np.isfinite(got_float)) and np.all(got_float[:12, :14] == 0)
    np.testing.assert_allclose(got_float * 255.0, want, atol=0.5 + 1e-9)


def test_mdlatlrr_count_and_order() -> None:
    from fusion.methods.mdlatlrr import coverage_count

    want = np.zeros((11, 13))
    for i in range(11 - 7):
        for j in range(13 - 7):
            want[i:i + 8, j:j + 8] += 1
    np.testing.assert_array_equal(coverage_count(11, 13, np, np.float64), want)


def test_mdlatlrr_model_checksum(tmp_path: Path, monkeypatch) -> None:
    from fusion.methods import mdlatlrr

    _l8()
    bad = tmp_path / "L_8.npy"
    np.save(bad, np.asarray(mdlatlrr.projection_matrix()).T)  # transposed: wrong model
    monkeypatch.setenv(mdlatlrr.MODEL_ENV, str(bad))
    mdlatlrr.projection_matrix.cache_clear()
    try:
        with pytest.raises(mdlatlrr.ModelUnavailableError):
            mdlatlrr.projection_matrix()
    finally:
        monkeypatch.delenv(mdlatlrr.MODEL_ENV)
        mdlatlrr.projection_matrix.cache_clear()


def test_mdlatlrr_rejects_tiny_images() -> None:
    _l8()
    with pytest.raises(ValueError):
        get_method("mdlatlrr")(np.zeros((7, 20)), np.zeros((7, 20)))


def test_wls_weight_map_and_solve_match_literal(rng: np.random.Generator) -> None:
    import scipy.ndimage as ndi
    import scipy.sparse
    import scipy.sparse.linalg

    from fusion.methods.wls import solve_optimal, visual_weight_map

    img = np.round(rng.random((20, 26)) * 200) / 255
    q = np.floor(255 * img + 0.5).astype(int)
    count = np.bincount(q.ravel(), minlength=256)
    table = np.array([sum(count[i] * abs(j - i) for i in range(256)) for j in range(256)], float)
    sal = table[q]
    want = (sal - sal.min()) / (sal.max() - sal.min())
    np.testing.assert_allclose(visual_weight_map(img), want, atol=1e-15)
    assert np.all(visual_weight_map(np.full((5, 6), 0.3)) == 0)  # constant: mat2gray -> 0

    # Solve_Optimal's sparse system, solved as MATLAB writes it (column-major vectors).
    m, b1, b2 = rng.standard_normal((3, 20, 26)) * 0.05
    lam = 0.01
    mean7 = ndi.correlate(b2, np.ones((7, 7)) / 49, mode="nearest")  # imfilter 'replicate'
    a_vec = (1.0 / (np.abs(mean7) + 1e-6)).ravel(order="F")
    n = a_vec.size
    big_a = scipy.sparse.diags(a_vec)
    den = 2 * scipy.sparse.identity(n) + lam * (big_a + big_a.T)
    num = 2 * m.ravel(order="F") + lam * (big_a + big_a.T) @ b1.ravel(order="F")
    want = scipy.sparse.linalg.spsolve(den.tocsc(), num).reshape(m.shape, order="F")
    np.testing.assert_allclose(solve_optimal(m, b1, b2, lam), want, rtol=1e-13, atol=1e-16)


# --- The method contract


@pytest.fixture
def stack(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Three slices: smooth structure + noise, pure noise, and an all-black slice."""
    return contract_stack(rng)


METHODS = ("wls", "mdlatlrr")
# float32 vs float64 on 0..1.  WLS selects max-abs detail coefficients (|L1| < |L2|): where
# the two are nearly equal in magnitude the choice can flip with float32 rounding, and the
# smoothed choice map spreads that over a 13x13 window (measured 5e-4 at a few pixels;
# the other pixels agree to ~1e-5).  MDLatLRR has no such switch.
FLOAT32_ATOL = {"wls": 2e-3, "mdlatlrr": 1e-5}


@pytest.fixture(params=METHODS)
def method(request) -> str:
    if request.param == "mdlatlrr":
        _l8()
    return request.param


@pytest.mark.parametrize("quantize", [False, True])
def test_stack_equals_slices(stack, method: str, quantize: bool) -> None:
    check_stack_equals_slices(get_method(method), *stack, quantize)


@pytest.mark.parametrize("quantize", [False, True])
def test_dtype_and_range(stack, method: str, quantize: bool) -> None:
    # 8-bit-valued inputs, so that WLS's saliency histogram of uint8(255 I) is the same in
    # float32 and float64 (an arbitrary float at a bin boundary may change bins).
    # All-black slice stays black (MDLatLRR: all-zero patch pairs, see the module notes).
    a, b = (np.round(x * 255.0) / 255.0 for x in stack)
    check_dtype_and_range(get_method(method), a, b, quantize, float32_atol=FLOAT32_ATOL[method])


def test_single_image_and_broadcast(stack, method: str) -> None:
    a, b = stack
    fn = get_method(method)
    check_single_image_and_broadcast(fn, a, b)
    # and a single anatomical image against a stack of the other modality.
    assert fn(a[0], b).shape == b.shape


def test_wls_is_asymmetric(stack) -> None:
    a, b = stack
    fn = get_method("wls")
    assert not np.allclose(fn(a[0], b[0]), fn(b[0], a[0]))


def test_rejects_integer_input(method: str) -> None:
    img = np.zeros((16, 16), np.uint8)
    with pytest.raises(TypeError):
        get_method(method)(img, img)


def test_registry() -> None:
    from fusion.methods import mdlatlrr, wls

    assert {"wls", "mdlatlrr"} <= set(available())
    assert "latlrr" not in available() and "vsmwls" not in available()
    assert get_method("WLS") is wls.wls
    assert get_method("mdlatlrr") is mdlatlrr.mdlatlrr


@pytest.mark.gpu
@pytest.mark.parametrize("name", METHODS)
def test_gpu_matches_cpu(stack, name: str) -> None:
    import cupy as cp

    if name == "mdlatlrr":
        _l8()
    a, b = stack
    fn = get_method(name)
    got = fn(cp.asarray(a), cp.asarray(b))
    assert isinstance(got, cp.ndarray) and got.dtype == np.float64
    np.testing.assert_allclose(got.get(), fn(a, b), atol=1e-9)
