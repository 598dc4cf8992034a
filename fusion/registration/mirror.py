"""Which way round does the overlay fit?  A left-right mirror test that compares like with like.

A left-right flipped series (a wrong orientation header, pixel columns stored
the wrong way, a mislabelled acquisition) registers to a plausible local
optimum and, fused, puts lateral structures on the wrong side.  No local
optimiser turns it back, so the test registers **both** the overlay as stored
and its left-right mirror (:func:`fusion.registration.quality.mirrored_lr`)
onto the base — with the same settings, from the same starting alignment, on
the same ~3 mm copies — and compares how well each fits:

``ecc``
    normalised mutual information (entropy correlation coefficient) of the
    intensities, as the rest of the quality check;
``gradient``
    gradient correlation: ``sum((gF . gM)^2) / sqrt(sum |gF|^4 sum |gM|^4)``
    over the two foregrounds — 1 when every edge of one volume lies on an edge
    of the other, whatever the direction of the contrast (the square makes it
    blind to the sign, so CT bone on MR dark cortex counts).  Edges are where
    the asymmetric anatomy differs between the two orientations, and the edge
    term is not diluted by the large uniform regions the intensity histogram
    is made of.

The verdict is a **relative** advantage of the mirrored fit,
``advantage = mean(ecc_m / ecc_o, gradient_m / gradient_o) - 1``: positive when
the mirror fits better.  Because both orientations go through the same
procedure the test is antisymmetric — swapping the overlay for its mirror
negates the advantage — so a margin calibrated on correct cases is the same
margin for flipped ones (docs/registration.md, "Mirror test").  The earlier
check compared the full registration of the stored overlay with a cheaper one
of its mirror and an absolute ECC margin: the cheaper registration handicapped
the mirror, and an absolute margin means more on low-similarity pairs (real
PET/MR) than on high ones.

A symmetric object fits both ways equally (advantage ~0): rightly not
flagged, and no image test can tell; the header checks
(``dicom_node.dicom.orientation``) are the other half of "never a silent wrong side".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from fusion.registration.rigid import RegistrationError, RegistrationParams, register_rigid


def mirror_params(seed: int, threads: int | None) -> RegistrationParams:
    """The mirror test's registration of each orientation (on the ~3 mm copies: 12, 6, 3 mm levels)."""
    return RegistrationParams(shrink_factors=(4, 2, 1), smoothing_sigmas=(6.0, 3.0, 1.5), sampling=0.1,
                              min_samples=20000, iterations=300, working_spacing_mm=None, histogram_bins=32,
                              seed=seed, threads=threads)


@dataclass(frozen=True)
class MirrorFit:
    """How well one orientation of the overlay fits the base after the mirror test's registration."""

    ecc: float
    gradient: float
    #: 4x4 base -> overlay point map the test's registration found (identity when it failed)
    matrix: np.ndarray


@dataclass(frozen=True)
class MirrorTest:
    stored: MirrorFit
    mirrored: MirrorFit
    seconds: float

    @property
    def ecc_ratio(self) -> float:
        return _ratio(self.mirrored.ecc, self.stored.ecc)

    @property
    def gradient_ratio(self) -> float:
        return _ratio(self.mirrored.gradient, self.stored.gradient)

    @property
    def advantage(self) -> float:
        """Relative advantage of the mirrored fit (> 0: the mirror fits better); see the module notes."""
        return 0.5 * (self.ecc_ratio + self.gradient_ratio) - 1.0

    def as_dict(self) -> dict[str, float]:
        return {"ecc": round(self.stored.ecc, 4), "mirrored_ecc": round(self.mirrored.ecc, 4),
                "gradient": round(self.stored.gradient, 4), "mirrored_gradient": round(self.mirrored.gradient, 4),
                "advantage": round(self.advantage, 4), "seconds": round(self.seconds, 3)}


def _ratio(a: float, b: float) -> float:
    if b <= 1e-9:
        return 1.0 if a <= 1e-9 else 2.0
    return min(a / b, 2.0)


def gradient_correlation(fixed: np.ndarray, moved: np.ndarray, region: np.ndarray,
                         spacing_zyx: tuple[float, float, float]) -> float:
    """``sum((gF . gM)^2) / sqrt(sum |gF|^4 sum |gM|^4)`` over ``region`` (NaN in ``moved`` = outside its view)."""
    ok = region & np.isfinite(moved)
    if ok.sum() < 64:
        return 0.0
    m = np.where(np.isfinite(moved), moved, 0.0)
    # each image on its own robust scale (the ratio is scale-free, this only keeps the sums well conditioned)
    f = (fixed - np.median(fixed[ok])) / (np.std(fixed[ok]) + 1e-12)
    m = (m - np.median(m[ok])) / (np.std(m[ok]) + 1e-12)
    gf = np.gradient(f, *spacing_zyx)
    gm = np.gradient(m, *spacing_zyx)
    # gradients next to the edge of the moved volume's view see the fill value: leave them out
    ok &= np.isfinite(np.gradient(moved.astype(np.float64), axis=0)) & np.isfinite(np.gradient(moved, axis=1)) \
        & np.isfinite(np.gradient(moved, axis=2))
    if ok.sum() < 64:
        return 0.0
    dot = sum(a[ok] * b[ok] for a, b in zip(gf, gm, strict=True))
    nf = sum(a[ok] ** 2 for a in gf)
    nm = sum(b[ok] ** 2 for b in gm)
    den = float(np.sqrt(np.sum(nf ** 2) * np.sum(nm ** 2)))
    return float(np.sum(dot ** 2) / den) if den > 0 else 0.0


def mirror_test(probe: object, seed: int, threads: int | None) -> MirrorTest:
    """Register the stored and the mirrored overlay of ``probe`` alike and score both (see the module notes).

    ``probe`` is a :class:`fusion.registration.quality.SimilarityProbe` (its
    coarse copies, foregrounds and histogram binning are shared by both fits).
    """
    import time

    from fusion.registration.quality import SimilarityProbe

    assert isinstance(probe, SimilarityProbe)
    t0 = time.perf_counter()
    params = mirror_params(seed, threads)
    fits = []
    for p in (probe, probe.mirrored()):
        try:
            matrix = register_rigid(p.fixed, p.moving, params).matrix
        except RegistrationError:  # no overlap left: this orientation does not fit at all
            fits.append(MirrorFit(0.0, 0.0, np.eye(4)))
            continue
        fits.append(score(p, matrix))
    return MirrorTest(fits[0], fits[1], time.perf_counter() - t0)


def score(probe: object, matrix: np.ndarray) -> MirrorFit:
    """ECC and gradient correlation of ``probe``'s moving volume mapped by ``matrix`` onto its fixed grid."""
    from fusion.registration.quality import SimilarityProbe, _affine

    assert isinstance(probe, SimilarityProbe)
    transform = _affine(matrix)
    ecc_value, _ = probe.figures(transform)
    nan = float("nan")
    moved = sitk.GetArrayFromImage(
        sitk.Resample(probe.moving, probe.fixed, transform, sitk.sitkLinear, nan, sitk.sitkFloat32))
    mfg = sitk.GetArrayFromImage(
        sitk.Resample(probe._mmask, probe.fixed, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)).astype(bool)
    fixed = sitk.GetArrayFromImage(probe.fixed).astype(np.float64)
    sx, sy, sz = (float(v) for v in probe.fixed.GetSpacing())
    grad = gradient_correlation(fixed, moved.astype(np.float64), probe._fmask | mfg, (sz, sy, sx))
    return MirrorFit(float(ecc_value), grad, np.asarray(matrix, dtype=np.float64))
