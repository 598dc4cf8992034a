"""fusion.metrics: VIFB number for number, the papers' (CDDFuse Evaluator) convention by hand
cases and docs/ports.md (the toy fusion), the relations between the two conventions, the API and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from fusion import environment, metrics
from fusion.metrics import evaluate, gray_cv2, load_image, papers, vifb

# (pair, method): every method once, gray IR (manWalking, walking2, running, walkingnight) and
# RGB IR (snow, carLight).  FUSION_VIFB_ALL=1 runs all 54 stored cases (about 40 s).
VIFB_CASES = [
    "manWalking/CBF", "walking2/TIF", "running/LatLRR", "walkingnight/IFEVIP", "snow/MGFF",
    "carLight/ADF", "manWalking/GFCE", "walking2/VSMWLS", "running/FPDE",
]
VIFB_METRICS = ["EN", "SD", "SF", "AG", "EI", "MI", "CE", "PSNR", "RMSE", "SSIM", "Qabf", "Qcb", "Qcv"]


def _vifb_reference(reference_dir):
    return json.loads((reference_dir / "vifb" / "metrics.json").read_text())


def _cases():
    if environment.flag("FUSION_VIFB_ALL"):
        pairs = ["manWalking", "walking2", "running", "walkingnight", "snow", "carLight"]
        methods = ["ADF", "CBF", "FPDE", "GFCE", "VSMWLS", "TIF", "LatLRR", "MGFF", "IFEVIP"]
        return [f"{p}/{m}" for p in pairs for m in methods]
    return VIFB_CASES


@pytest.mark.parametrize("case", _cases())
def test_vifb_matches_matlab_values(reference_dir, case):
    ref = _vifb_reference(reference_dir)[case]
    assert sorted(ref) == sorted(VIFB_METRICS)
    pair, method = case.split("/")
    root = reference_dir / "vifb"
    vi = np.asarray(Image.open(root / "input" / "VI" / f"{pair}.jpg"))
    ir = np.asarray(Image.open(root / "input" / "IR" / f"{pair}.jpg"))
    fused = np.asarray(Image.open(root / "fused" / f"{pair}_{method}.jpg"))
    got = vifb(fused, vi, ir)
    assert list(got) == VIFB_METRICS
    # the stored values have 5 significant digits: rounding alone is up to 5e-5 relative
    errors = {k: abs(got[k] - ref[k]) / abs(ref[k]) for k in VIFB_METRICS}
    assert max(errors.values()) <= 1e-4, {k: (got[k], ref[k]) for k, e in errors.items() if e > 1e-4}
    # and the file-path API gives the same numbers
    if case == VIFB_CASES[0]:
        again = evaluate(root / "fused" / f"{pair}_{method}.jpg", root / "input" / "VI" / f"{pair}.jpg",
                         root / "input" / "IR" / f"{pair}.jpg", convention="vifb")
        assert again == got


# ----------------------------------------------------------------------------- papers' convention by hand


def test_papers_en_sd_mse_psnr_by_hand():
    two_level = np.zeros((8, 8))
    two_level[:, 4:] = 200
    assert papers.EN(two_level) == pytest.approx(1.0)
    four = np.repeat(np.array([[0, 50, 100, 150]]), 4, axis=0)
    assert papers.EN(four) == pytest.approx(2.0)
    assert papers.SD(two_level) == pytest.approx(100.0)
    a = np.full((16, 16), 100.0)
    b = np.full((16, 16), 140.0)
    f = np.full((16, 16), 120.0)
    f[0, 0] = 180  # max(F) = 180, not 255
    mse = ((20**2 * 255 + 80**2) / 256 + (20**2 * 255 + 40**2) / 256) / 2
    assert papers.MSE(f, a, b) == pytest.approx(mse, rel=1e-6)
    assert papers.PSNR(f, a, b) == pytest.approx(10 * math.log10(180**2 / mse), rel=1e-6)


def test_papers_sf_ag_denominators_by_hand():
    h, w = 5, 10
    ramp = np.tile(np.arange(w) * 3.0, (h, 1))  # dx = 3 everywhere, dy = 0
    assert papers.SF(ramp) == pytest.approx(3.0)  # mean over H*(W-1) differences
    assert vifb.SF(ramp) == pytest.approx(3.0 * math.sqrt((w - 1) / w))  # sum / (H*W)
    assert papers.AG(ramp) == pytest.approx(3 / math.sqrt(2))  # mean over H*W
    assert vifb.AG(ramp) == pytest.approx(3 / math.sqrt(2) * h * w / ((h - 1) * (w - 1)))


def test_papers_mi_is_nats_on_raw_levels(rng):
    a = rng.integers(0, 256, (64, 64)).astype(np.float64)
    p = np.bincount(a.astype(int).ravel(), minlength=256) / a.size
    h_nats = -(p[p > 0] * np.log(p[p > 0])).sum()
    zeros = np.zeros_like(a)
    assert papers.MI(a, a, zeros) == pytest.approx(h_nats, rel=1e-9)  # MI(F, A) with F = A is H(A)
    assert papers.MI(a, a, a) == pytest.approx(2 * h_nats, rel=1e-9)
    two_level = np.zeros((8, 8))
    two_level[:, 4:] = 200
    assert papers.MI(two_level, two_level, zeros[:8, :8]) == pytest.approx(math.log(2))
    # labels are distinct values: a relabelling (here x -> x/2 + 7) keeps MI
    assert papers.MI(a / 2 + 7, a, zeros) == pytest.approx(h_nats, rel=1e-9)


def test_papers_ssim_skimage019_defaults_by_hand(rng):
    x = rng.integers(0, 256, (40, 40)).astype(np.float64)
    assert papers.SSIM(x, x, x) == pytest.approx(2.0, abs=1e-6)
    # constant images: only the luminance term with C1 = (0.01 * 2)^2 = 4e-4 is left
    c1 = np.full((20, 20), 1.0)
    c2 = np.full((20, 20), 2.0)
    expected = (2 * 1 * 2 + 4e-4) / (1 + 4 + 4e-4)
    assert papers.SSIM(c2, c1, c2) == pytest.approx(expected + 1.0, rel=1e-6)  # SSIM(F,A) + SSIM(F,B)
    # F = 0 against a +-1 checkerboard: every cropped 7x7 window has mean +-1/49 and
    # sample variance (49/48)(1 - 1/49^2); C2 = (0.03 * 2)^2 = 3.6e-3
    f = np.zeros((30, 30))
    board = np.where((np.add.outer(np.arange(30), np.arange(30)) % 2) == 0, 1.0, -1.0)
    mu2, var = (1 / 49) ** 2, 49 / 48 * (1 - 1 / 49**2)
    s = 4e-4 / (mu2 + 4e-4) * 3.6e-3 / (var + 3.6e-3)
    assert papers.SSIM(f, board, f) == pytest.approx(s + 1.0, rel=1e-4)


def test_papers_scd_vif_qabf_by_hand(rng):
    a = rng.normal(100, 20, (64, 64))
    b = rng.normal(80, 30, (64, 64))
    # F - B = A and F - A = B: both correlations are 1
    assert papers.SCD(a + b, a, b) == pytest.approx(2.0, rel=1e-5)
    x = rng.integers(0, 256, (64, 64)).astype(np.float64)
    assert papers.VIF(x, x, x) == pytest.approx(2.0, rel=1e-6)  # VIF(x, x) = 1 per term
    flat = np.full_like(x, 90.0)
    assert papers.VIF(flat, x, x) == 0.0  # no information in a flat F
    assert papers.VIF(x, flat, flat) == 2.0  # 0/0 -> NaN -> 1 per term
    # Qabf with F equal to both sources: every pixel at the variant's ceiling (G = gF there)
    ceiling = 0.9994 * 0.9879 / (1 + math.exp(-22 * 0.2))
    assert papers.Qabf(x, x, x) == pytest.approx(ceiling, rel=1e-3)


def test_papers_colour_input_is_cv2_luminance():
    rgb = np.zeros((12, 12, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    y = gray_cv2(rgb)
    assert y.dtype == np.float32
    assert np.all(y == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50))
    grey = np.full((12, 12), y[0, 0])
    assert evaluate(rgb, rgb, rgb, only=["EN", "SD", "MSE"]) == evaluate(grey, grey, grey, only=["EN", "SD", "MSE"])


# ----------------------------------------------------------------------------- on Harvard pairs


def _harvard_grey(harvard_dir, subset, other, name):
    mri = gray_cv2(load_image(harvard_dir / subset / "MRI" / f"{name}.png"))
    x = gray_cv2(load_image(harvard_dir / subset / other / f"{name}.png"))
    return mri, x


# docs/ports.md (the toy fusion): the toy fusion F = round((MRI + X)/2) scored by both evaluators, at the
# printed precision.  The Harvard pairs here are CDDFuse's test pairs, so this is a
# direct check of the papers' convention (and of VIFB's on grey medical images).
SPEC_34 = {  # metric: (VIFB, papers) as printed; Qabf: one value (Hong variant)
    ("MRI_CT", "CT", "11"): dict(SF=("21.34", "21.38"), AG=("5.735", "5.691"), MI=("2.672", "2.672"),
                                 SSIM=("1.442", "1.275"), PSNR=("56.3", "16.2"), Qabf="0.370"),
    ("MRI_CT", "CT", "20"): dict(SF=("15.32", "15.35"), AG=("3.545", "3.517"), MI=("2.550", "2.550"),
                                 SSIM=("1.581", "1.388"), PSNR=("56.8", "17.4"), Qabf="0.344"),
    ("MRI_PET", "PET", "11"): dict(SF=("17.81", "17.85"), AG=("5.257", "5.216"), MI=("2.536", "2.536"),
                                   SSIM=("1.323", "1.279"), PSNR=("55.8", "12.2"), Qabf="0.473"),
    ("MRI_PET", "PET", "20"): dict(SF=("16.92", "16.95"), AG=("5.123", "5.083"), MI=("2.397", "2.397"),
                                   SSIM=("1.471", "1.426"), PSNR=("56.8", "14.6"), Qabf="0.413"),
}


def _close_at_printed_precision(value: float, printed: str) -> bool:
    decimals = len(printed.split(".")[1])
    return abs(value - float(printed)) <= 0.5 * 10**-decimals + 1e-12


@pytest.mark.parametrize("key", list(SPEC_34))
def test_spec_34_toy_fusion_values(harvard_dir, key):
    subset, other, name = key
    mri, x = _harvard_grey(harvard_dir, subset, other, name)
    f = np.round((mri + x) / 2)
    p, v = papers(f, mri, x), vifb(f, mri, x)
    for metric, pair in SPEC_34[key].items():
        if metric == "Qabf":  # Hong variant: VIFB (x255) and the papers' evaluator agree at 3 digits
            assert _close_at_printed_precision(p["Qabf"], pair), (p["Qabf"], pair)
            assert _close_at_printed_precision(v["Qabf"], pair), (v["Qabf"], pair)
            continue
        want_v, want_p = pair
        assert _close_at_printed_precision(v[metric], want_v), (metric, v[metric], want_v)
        assert _close_at_printed_precision(p[metric], want_p), (metric, p[metric], want_p)


def test_conventions_agree_or_differ_by_known_factors(harvard_dir):
    a, b = _harvard_grey(harvard_dir, "MRI_CT", "CT", "11")
    assert a.min() == b.min() == 0 and a.max() == b.max() == 255
    h, w = a.shape
    for f in (np.maximum(a, b), np.round((a + b) / 2), np.floor(a / 2) + 20):
        f = f.astype(np.float64)
        # EN, SD: same definition on integer images
        assert vifb.EN(f) == pytest.approx(papers.EN(f), rel=1e-12)
        assert vifb.SD(f) == pytest.approx(papers.SD(f), rel=1e-6)  # the evaluator's float32 std
        # MI: equal on 8-bit images (VIFB's min-max stretch never merges grey levels)
        assert vifb.MI(f, a, b) == pytest.approx(papers.MI(f, a, b), rel=1e-12)
        # SF: same sums of squared differences, different denominators
        sr = float((np.diff(f, axis=1) ** 2).sum())
        sc = float((np.diff(f, axis=0) ** 2).sum())
        assert vifb.SF(f) == pytest.approx(math.sqrt((sr + sc) / (h * w)), rel=1e-12)
        assert papers.SF(f) == pytest.approx(math.sqrt(sr / (h * (w - 1)) + sc / ((h - 1) * w)), rel=1e-6)
        # AG: same gradients, sum / ((H-1)(W-1)) against the mean over H*W
        assert vifb.AG(f) * (h - 1) * (w - 1) == pytest.approx(papers.AG(f) * h * w, rel=1e-6)
        # VIFB's RMSE is (sqrt(MSE_A) + sqrt(MSE_B)) / 2 / sqrt(H*W)
        mse_a, mse_b = np.mean((a - f) ** 2), np.mean((b - f) ** 2)
        assert vifb.RMSE(f, a, b) == pytest.approx((math.sqrt(mse_a) + math.sqrt(mse_b)) / 2 / math.sqrt(h * w))
        assert papers.MSE(f, a, b) == pytest.approx((mse_a + mse_b) / 2, rel=1e-6)
    # MI agreement needs 8-bit images; a non-integer F is quantised by VIFB only
    f = (a + b) / 2 + 0.25
    assert vifb.MI(f, a, b) != pytest.approx(papers.MI(f, a, b), rel=1e-3)


def test_evaluate_conventions_on_a_colour_pair(harvard_dir):
    mri_path = harvard_dir / "MRI_PET" / "MRI" / "11.png"
    pet_path = harvard_dir / "MRI_PET" / "PET" / "11.png"
    mri, pet = load_image(mri_path), load_image(pet_path)
    assert mri.ndim == pet.ndim == 3  # both stored as RGB
    fused = ((mri.astype(np.float64) + pet) / 2).round().astype(np.uint8)
    p = evaluate(fused, mri_path, pet_path)
    assert list(p) == papers.names and all(np.isfinite(list(p.values())))
    # papers: luminance of every image (colour discarded)
    assert p == papers(gray_cv2(fused), gray_cv2(mri), gray_cv2(pet))
    # vifb: a colour fused image is scored per channel, then averaged (SF: channels side by side)
    v = evaluate(fused, mri, pet, convention="vifb")
    assert list(v) == vifb.names
    per_channel = [vifb.Qabf(fused[..., k], mri[..., k], pet[..., k]) for k in range(3)]
    assert v["Qabf"] == pytest.approx(np.mean(per_channel), rel=1e-12)
    assert v["SF"] == pytest.approx(vifb.SF(np.concatenate([fused[..., k] for k in range(3)], axis=1)))
    # gray=True: MATLAB rgb2gray first, as VIFB advises for medical fusion
    g = evaluate(fused, mri, pet, convention="vifb", gray=True, only=["EN", "MI"])
    assert g == vifb(metrics.rgb2gray_matlab(fused), metrics.rgb2gray_matlab(mri),
                     metrics.rgb2gray_matlab(pet), only=["EN", "MI"])
    # floats on 0..255 are rounded to 8 bits, as a saved image would be
    assert evaluate(fused + 0.2, mri, pet, only=["MI"]) == evaluate(fused, mri, pet, only=["MI"])
    with pytest.raises(ValueError, match="convention"):
        evaluate(fused, mri, pet, convention="tang")
    with pytest.raises(ValueError, match="0..1"):
        evaluate(fused / 255.0, mri, pet)
    with pytest.raises(ValueError, match="sizes differ"):
        evaluate(fused[:100], mri, pet)


def test_cli_evaluate(harvard_dir, tmp_path, capsys):
    from dicom_node.cli import main

    a = harvard_dir / "MRI_CT" / "MRI" / "12.png"
    b = harvard_dir / "MRI_CT" / "CT" / "12.png"
    fused = np.maximum(load_image(a), load_image(b))
    fpath = tmp_path / "fused.png"
    Image.fromarray(fused).save(fpath)

    assert main(["evaluate", str(fpath), str(a), str(b), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["convention"] == "papers"
    assert doc["metrics"] == pytest.approx(evaluate(fpath, a, b))

    assert main(["evaluate", str(fpath), str(a), str(b), "--convention", "vifb"]) == 0
    out = capsys.readouterr().out
    assert "VIFB" in out
    for name in vifb.names:
        assert f"  {name} " in out
    assert "Qcv" in out and "lower is better" in out

    assert main(["evaluate", str(tmp_path / "nope.png"), str(a), str(b)]) == 2
    assert "input not found" in capsys.readouterr().err


def test_simple_set_is_kept_and_consistent(harvard_dir):
    a, b = _harvard_grey(harvard_dir, "MRI_CT", "CT", "13")
    f = np.round((a + b) / 2)
    s = metrics.score(a, b, f)
    assert list(s) == list(metrics.METRICS) == ["Qabf", "MI", "SSIM", "SD", "EN", "AG"]
    assert s["EN"] == pytest.approx(papers.EN(f))
    assert s["MI"] == pytest.approx(papers.MI(f, a, b), rel=1e-12)
    assert s["AG"] == pytest.approx(papers.AG(f), rel=1e-6)
    assert s["Qabf"] == pytest.approx(papers.Qabf(f, a, b), rel=1e-5)
    assert s["SSIM"] == pytest.approx(vifb.SSIM(f, a, b), rel=1e-12)
