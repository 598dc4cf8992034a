"""Registration accuracy with known ground truth on real volumes, and self-consistency on the real CIRS pair.

Cases come from ``tests/registration_cases.py`` (the CIRS 057A CT, anti-aliased
to 2 x 2 x 2.5 mm, as the base; the second "modality" is the full-resolution CT
moved by a known rigid transform of up to 15 deg and 40 mm, on another grid,
field of view and voxel order, with a non-monotonic intensity remap and noise).
TRE is measured at the 8 corners and the centre of the **base** volume.  The bar
(issue 4): median <= 0.5 mm and max <= 1.0 mm.  The benchmark
(``benchmarks/registration.py``) runs 20+ cases per pairing; here 3 per pairing
with the same bar, seeds fixed, default parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
import registration_cases as rc
import SimpleITK as sitk

from fusion.registration.quality import assess_registration
from fusion.registration.rigid import RegistrationParams, register_rigid

pytestmark = pytest.mark.data

#: the first cases of the benchmark's series (same seeds)
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def cirs(cirs_dir):
    ct, mr = rc.load_cirs(str(cirs_dir))
    source, base = rc.cirs_base(str(cirs_dir))
    return {"ct": ct, "mr": mr, "source": source, "base": base}


@pytest.mark.parametrize("kind", ["ct", "pet"])
def test_known_transforms_are_recovered(cirs, kind):
    tres = []
    for seed in SEEDS:
        case = rc.make_case(cirs["source"], cirs["base"], kind, seed)
        res = register_rigid(case.base, case.overlay, RegistrationParams())
        tre = rc.tre_mm(res.matrix, case.truth, case.base)
        tres.append(tre)
        print(f"\n{kind} seed {seed}: {case.angle_deg:.1f} deg, {case.shift_mm:.1f} mm, {case.layout}, overlay "
              f"{np.round(case.overlay.GetSpacing(), 2).tolist()} mm -> TRE median {np.median(tre):.3f} max "
              f"{tre.max():.3f} mm in {res.seconds:.1f} s")
    tres = np.array(tres)
    assert np.median(tres) <= rc.TRE_MEDIAN_BAR_MM
    assert tres.max() <= rc.TRE_MAX_BAR_MM


@pytest.mark.slow
def test_cirs_mr_onto_ct_is_self_consistent(cirs):
    """Register MR onto CT; move the CT by a known rigid transform; register again: the results compose.

    First result, measured (SimpleITK 2.5, defaults): the CT centre moves by
    (16.0, 40.0, 79.3) mm, |t| = 90.2 mm, rotation 3.3 deg, support overlap 1.0,
    ECC 0.30, ~8 s.  The earlier settings (native grids, shrink 4/2, 2 %) gave
    90.1 mm and 3.2 deg.  Tolerances: 1.5 mm per component (about one MR in-plane
    voxel) and 0.5 deg — outside the spread of seeds and settings (up to ~1 mm at
    the CT's corners: a shallow rotational optimum, 0.2 deg over a 250 mm radius),
    far inside what a wrong optimum gives.  Consistency: B (CT' = P CT, moved
    through its header, so no resampling) composed with P must equal A within
    1 mm at the CT's 8 corners and centre (measured 0.2-0.6 mm for four moves of
    9-14 deg and 11-35 mm; with 200 iterations per level one of them stopped
    0.9 deg short, 4 mm: hence 500).
    """
    ct, mr = cirs["ct"], cirs["mr"]
    a = register_rigid(ct, mr, RegistrationParams())
    print(f"\nCIRS MR->CT: translation {np.round(a.translation_mm, 2)} (|t| {a.translation_norm_mm:.2f}) mm, rotation "
          f"{a.rotation_angle_deg:.2f} deg, {a.seconds:.1f} s, iterations {a.iterations_per_level}, overlap {a.overlap:.3f}")
    assert a.translation_norm_mm == pytest.approx(90.2, abs=1.5)
    np.testing.assert_allclose(a.translation_mm, (16.0, 40.0, 79.3), atol=1.5)
    assert a.rotation_angle_deg == pytest.approx(3.2, abs=0.5)
    q = assess_registration(ct, mr, a)
    print(f"quality: {q.as_dict()}")
    assert q.ok

    p = rc.rigid(9.0, np.array([0.3, -0.5, 0.8]), np.array([18.0, -25.0, 12.0]), rc.centre(ct))
    b = register_rigid(rc.moved_header(ct, p), mr, RegistrationParams())
    disagreement = rc.tre_mm(b.matrix @ p, a.matrix, ct)
    print(f"CT moved by 9 deg / 33 mm: composed results differ by median {np.median(disagreement):.2f}, "
          f"max {disagreement.max():.2f} mm at the CT's corners and centre ({b.seconds:.1f} s)")
    assert disagreement.max() <= 1.0


def test_flipped_overlay_is_refused(cirs):
    """A PET-like overlay whose voxels are mirrored left-right (a mislabelled series): detected, never passed."""
    case = rc.make_case(cirs["source"], cirs["base"], "pet", 0)
    flipped = rc.flipped_lr(case.overlay)
    res = register_rigid(case.base, flipped, RegistrationParams())
    q = assess_registration(case.base, flipped, res)
    print(f"\nflipped PET-like: TRE max {rc.tre_mm(res.matrix, case.truth, case.base).max():.1f} mm; {q.as_dict()}")
    assert not q.ok and q.flipped
    good = assess_registration(case.base, case.overlay, register_rigid(case.base, case.overlay, RegistrationParams()))
    assert good.ok and not good.flipped


def test_unrelated_pair_is_refused(cirs):
    """The CIRS base against an unrelated object (an egg with blobs and noise on its own grid)."""
    rng = np.random.default_rng(5)
    size, sp = (80, 80, 60), 3.0
    origin = rc.centre(cirs["base"]) - (np.array(size) - 1) * sp / 2
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    p = (np.stack([i, j, k], -1) - (np.array(size) - 1) / 2) * sp
    r = np.sqrt((p[..., 0] / 70) ** 2 + (p[..., 1] / 90) ** 2 + (p[..., 2] / 60) ** 2)
    v = 1.0 / (1 + np.exp((r - 1) * 20))
    for _ in range(8):
        c, s = rng.uniform(-40, 40, 3), rng.uniform(6, 15)
        v = v + rng.uniform(-0.8, 0.8) * np.exp(-np.sum((p - c) ** 2, -1) / (2 * s * s))
    other = sitk.GetImageFromArray((v + rng.normal(0, 0.05, v.shape)).astype(np.float32))
    other.SetSpacing((sp, sp, sp))
    other.SetOrigin(tuple(float(o) for o in origin))
    res = register_rigid(cirs["base"], other, RegistrationParams())
    q = assess_registration(cirs["base"], other, res)
    print(f"\nunrelated: {q.as_dict()}")
    assert not q.ok


# -- two genuinely different modalities: the Harvard stacks (tests/registration_cases.make_two_modality_case) --------


@pytest.mark.slow
@pytest.mark.parametrize("subset", ["MRI_CT", "MRI_PET"])
def test_two_modality_case_is_recovered_within_the_measured_bar(harvard_dir, subset):
    """One patient's real MRI stack against the same patient's real CT / PET stack moved by a known transform.

    Not the CT-derived cases' 0.5 mm bar: two real modalities (and the atlas's
    own ~1 mm co-registration) leave millimetres (docs/registration.md,
    "Two real modalities"); the bar is what the method reaches on these
    cases today, so a regression shows.
    """
    case = rc.make_two_modality_case(harvard_dir, subset, 0, 0)
    res = register_rigid(case.base, case.overlay, RegistrationParams(threads=1))
    tre = rc.tre_mm(res.matrix, case.truth, case.base)
    print(f"\n{case.layout}: {case.angle_deg:.1f} deg, {case.shift_mm:.1f} mm -> TRE median {np.median(tre):.2f}, "
          f"max {tre.max():.2f} mm in {res.seconds:.0f} s")
    assert np.median(tre) <= rc.TWO_MODALITY_MEDIAN_BAR_MM
    assert tre.max() <= rc.TWO_MODALITY_MAX_BAR_MM


@pytest.mark.slow
def test_mirrored_head_is_caught_and_the_correct_one_is_not(harvard_dir):
    """A real head CT against its MRI, stored as is and mirrored left-right: the mirror test tells them apart."""
    case = rc.make_two_modality_case(harvard_dir, "MRI_CT", 0, 0)
    flipped = rc.flipped_lr(case.overlay)
    verdicts = {}
    for name, overlay in (("correct", case.overlay), ("mirrored", flipped)):
        res = register_rigid(case.base, overlay, RegistrationParams(threads=1))
        q = assess_registration(case.base, overlay, res)
        print(f"\n{name}: mirror test {q.mirror}, problems {list(q.problems)}")
        verdicts[name] = q
    assert verdicts["mirrored"].flipped and not verdicts["mirrored"].ok
    assert not verdicts["correct"].flipped
