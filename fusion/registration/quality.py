"""Is this registration good enough to show?  Quality figures and a verdict for a rigid registration.

A misregistered fusion shown to a radiologist is worse than none, so every
registration the node makes is checked before it is fused.  The figures
(computed on copies of both volumes shrunk to about ``coarse_mm`` voxels, so
the check costs a small fraction of the registration):

``support_overlap``
    overlap of the two volumes' supports (Otsu foregrounds) after registration,
    ``|F & M| / min(|F|, |M|)``: the share of the smaller object that lies on the
    larger one, so a head MR on a whole-body CT or a PET covering part of the CT
    still scores 1.  Low: other body parts, or a registration that slid off.
    (``overlap``, the base's share covered by the overlay, is reported too.)
``similarity``
    entropy correlation coefficient ``ECC = 2 MI(A, B) / (H(A) + H(B))`` of the
    two volumes after registration (normalised mutual information, 0 = unrelated,
    1 = one determines the other), over the union of the two foregrounds inside
    the common field of view, 32 x 32 bins.  Unlike the Mattes MI value of the
    optimiser it is comparable across pairs of different contrast and size.
``sharpness``
    how much the similarity drops when the result is moved by ``probe_mm`` along
    each axis and turned by ``probe_deg`` about each axis (12 probes):
    ``1 - mean(ECC at probes) / ECC``.  A real match is a sharp peak; two
    unrelated volumes give a flat, shallow landscape whatever the optimiser found.
``rotation_deg``, ``travel_mm``
    plausibility: the total rotation, and how far the optimiser moved the base
    centre from its starting alignment, also as a fraction of the smaller
    volume's diagonal (``travel_fraction``).
``mirror`` (``flip_similarity``)
    the mirror test (:mod:`fusion.registration.mirror`): the overlay as stored
    and mirrored left-right (its voxels reversed along the axis closest to
    patient x), each registered alike onto the base, scored by ECC and by
    gradient correlation; ``advantage`` is the mirrored fit's relative lead.
    A local optimiser never turns a flipped series back (docs/method.md), so
    when the mirror fits clearly better (``advantage > flip_margin``) the
    series is most likely left-right flipped (a wrong header or a mislabelled
    acquisition) — or the registration failed; either way it must not be
    fused.  A left-right symmetric object fits both ways about equally, which
    is rightly not flagged (the node's header checks cover that side).

Each figure has a threshold in :class:`QualityThresholds`, chosen from
measurements (``docs/registration.md``); :func:`assess_registration` returns a
:class:`RegistrationQuality` whose ``problems`` name every figure outside its
threshold, with the measured value and the limit.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from fusion.registration.rigid import (
    RegistrationResult,
    bin_to,
    foreground_mask,
    volume_centre,
)

if TYPE_CHECKING:
    from PIL import Image

#: voxel size (mm) of the shrunk copies the figures are computed on
COARSE_MM = 3.0
#: joint histogram bins per image for the similarity
BINS = 32
#: default relative margin of the mirror test (docs/registration.md, "Mirror test")
FLIP_MARGIN = 0.04


@dataclass(frozen=True)
class QualityThresholds:
    """Limits of an acceptable registration.

    Chosen from measurements (docs/registration.md, "Quality check"): correct
    registrations of the synthetic cases and of the real CIRS MR/CT pair against
    unrelated pairs, deliberately misregistered results and left-right flipped
    overlays.  The field names match ``dicom_node.config.QualityConfig``.
    """

    #: least support overlap ``|F & M| / min(|F|, |M|)`` (correct: 0.85-1.0; a volume that slid off: < 0.5)
    min_overlap: float = 0.5
    #: least ECC after registration (correct synthetic 0.36-0.45, CIRS MR/CT 0.30; unrelated pairs 0.00-0.10)
    min_similarity: float = 0.12
    #: least relative ECC drop at the probes (correct 0.18-0.34; unrelated 0.01-0.04; CIRS moved 10 mm: 0.07)
    min_sharpness: float = 0.10
    #: largest plausible rotation between the two series, degrees (head holders and couches allow ~15)
    max_rotation_deg: float = 30.0
    #: largest plausible optimiser travel from the starting alignment, as a fraction of the smaller volume's
    #: diagonal (synthetic cases with 40 mm shifts and 15 mm field-of-view offsets: at most 0.12)
    max_travel_fraction: float = 0.25
    #: run the left-right flip check (one cheap extra registration on the coarse copies)
    check_flip: bool = True
    #: the mirrored overlay's relative advantage in the mirror test (fusion.registration.mirror) above which the
    #: overlay is called flipped; calibrated in docs/registration.md ("Mirror test")
    flip_margin: float = FLIP_MARGIN
    #: probe displacement (mm) and rotation (degrees) for the sharpness figure
    probe_mm: float = 8.0
    probe_deg: float = 6.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_overlap <= 1 or not 0 <= self.min_similarity <= 1:
            raise ValueError("min_overlap and min_similarity are fractions in [0, 1]")
        if self.max_rotation_deg <= 0 or self.max_travel_fraction <= 0 or self.flip_margin < 0:
            raise ValueError("max_rotation_deg and max_travel_fraction must be > 0, flip_margin >= 0")
        if self.probe_mm <= 0 or self.probe_deg <= 0:
            raise ValueError("probe_mm and probe_deg must be > 0")

    @classmethod
    def from_mapping(cls, values: dict) -> QualityThresholds:
        """Build from a dict (e.g. the node config), ignoring keys that are not fields."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass(frozen=True)
class RegistrationQuality:
    #: fraction of the base foreground covered by the overlay foreground (``RegistrationResult.overlap``)
    overlap: float
    #: ``|F & M| / min(|F|, |M|)`` of the two foregrounds (the smaller object's share on the larger): thresholded
    support_overlap: float
    similarity: float
    sharpness: float
    rotation_deg: float
    translation_mm: float
    travel_mm: float
    travel_fraction: float
    #: ECC of the left-right mirrored overlay in the mirror test; None when not checked
    flip_similarity: float | None
    #: one sentence per figure outside its threshold (empty: acceptable)
    problems: tuple[str, ...]
    #: short upper-case tags of the problems, for a Series Description (e.g. "OVERLAP 0.31")
    tags: tuple[str, ...]
    seconds: float
    thresholds: QualityThresholds = field(default_factory=QualityThresholds)
    #: the mirror test's figures (fusion.registration.mirror.MirrorTest.as_dict); None when not checked
    mirror: dict[str, float] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def flipped(self) -> bool:
        return any(t.startswith("FLIP") for t in self.tags)

    @property
    def warning(self) -> str | None:
        """Short text for the fused series' description ("CHECK REG: <this> - ..."), None when acceptable.

        At most the first two tags, so the description (64 characters) keeps its "FUSED MR>CT ..." part.
        """
        return " ".join(self.tags[:2]) if self.tags else None

    @property
    def reason(self) -> str:
        """All problems in one operator-readable sentence (empty when acceptable)."""
        return "; ".join(self.problems)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly figures, rounded, plus the verdict (for the job result and the logs)."""
        out: dict[str, Any] = {
            "ok": self.ok,
            "overlap": round(self.overlap, 4),
            "support_overlap": round(self.support_overlap, 4),
            "similarity": round(self.similarity, 4),
            "sharpness": round(self.sharpness, 4),
            "rotation_deg": round(self.rotation_deg, 3),
            "translation_mm": round(self.translation_mm, 2),
            "travel_mm": round(self.travel_mm, 2),
            "travel_fraction": round(self.travel_fraction, 4),
            "flip_similarity": None if self.flip_similarity is None else round(self.flip_similarity, 4),
            "mirror": self.mirror,
            "problems": list(self.problems),
            "seconds": round(self.seconds, 3),
        }
        out["thresholds"] = asdict(self.thresholds)
        return out


# ---------------------------------------------------------------------------
# the similarity on coarse copies
# ---------------------------------------------------------------------------


def coarse_copy(img: sitk.Image, mm: float = COARSE_MM) -> sitk.Image:
    """``img`` averaged down by integer factors to voxels of about ``mm`` (at least its own size), float32."""
    return bin_to(img if img.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(img, sitk.sitkFloat32), mm)


def _edges(values: np.ndarray, bins: int) -> tuple[float, float]:
    lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _bin(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    return np.clip(((values - lo) * (bins / (hi - lo))).astype(np.int64), 0, bins - 1)


def ecc(a: np.ndarray, b: np.ndarray) -> float:
    """Entropy correlation coefficient of two equally long integer bin-index arrays (0..BINS-1)."""
    if a.size < 64:
        return 0.0
    joint = np.bincount(a * BINS + b, minlength=BINS * BINS).astype(np.float64)
    p = joint / joint.sum()
    pa, pb = p.reshape(BINS, BINS).sum(1), p.reshape(BINS, BINS).sum(0)

    def h(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    ha, hb, hab = h(pa), h(pb), h(p)
    if ha + hb <= 0:
        return 0.0
    return max(0.0, 2.0 * (ha + hb - hab) / (ha + hb))


class SimilarityProbe:
    """ECC of a fixed and a moving volume for any rigid transform, on coarse copies (binning fixed once)."""

    def __init__(self, fixed: sitk.Image, moving: sitk.Image, mm: float = COARSE_MM):
        self.fixed = coarse_copy(fixed, mm)
        self.moving = coarse_copy(moving, mm)
        self._fmask = sitk.GetArrayFromImage(foreground_mask(self.fixed)).astype(bool)
        self._mmask = foreground_mask(self.moving)
        farr = sitk.GetArrayFromImage(self.fixed)
        marr = sitk.GetArrayViewFromImage(self.moving)
        mm_arr = sitk.GetArrayViewFromImage(self._mmask).astype(bool)
        self._flo, self._fhi = _edges(farr[self._fmask] if self._fmask.any() else farr.ravel(), BINS)
        self._mlo, self._mhi = _edges(marr[mm_arr] if mm_arr.any() else np.asarray(marr).ravel(), BINS)
        self._fbins = _bin(farr, self._flo, self._fhi, BINS)
        self._mmask_voxels = int(np.count_nonzero(mm_arr))
        #: moving voxel volume / fixed voxel volume
        self._voxel_ratio = float(np.prod(self.moving.GetSpacing()) / np.prod(self.fixed.GetSpacing()))

    def mirrored(self) -> SimilarityProbe:
        """The same fixed side and binning against the moving volume mirrored left-right (:func:`mirrored_lr`)."""
        other = object.__new__(SimilarityProbe)
        other.__dict__.update(self.__dict__)
        other.moving = mirrored_lr(self.moving)
        other._mmask = mirrored_lr(self._mmask)
        return other

    def similarity(self, transform: sitk.Transform) -> float:
        return self.figures(transform)[0]

    def figures(self, transform: sitk.Transform) -> tuple[float, float]:
        """(ECC, support overlap) at ``transform`` (fixed -> moving).

        Support overlap: ``|F & M| / min(|F|, |M|)`` with F the fixed foreground and M
        the moving foreground mapped onto the fixed grid (so only its part inside the
        fixed field of view counts, but at least a quarter of the whole moving
        object): 1 when the smaller object lies wholly on the larger, whatever the
        two fields of view cover.
        """
        nan = float("nan")
        # GetArrayFromImage (a copy): a view of a temporary image would dangle once it is freed
        moved = sitk.GetArrayFromImage(
            sitk.Resample(self.moving, self.fixed, transform, sitk.sitkLinear, nan, sitk.sitkFloat32)
        )
        mfg = sitk.GetArrayFromImage(
            sitk.Resample(self._mmask, self.fixed, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        ).astype(bool)
        inside = np.isfinite(moved)
        both = int(np.count_nonzero(self._fmask & mfg))
        # M counts at least a quarter of the moving object (in fixed voxels), so a volume that slid off the
        # fixed field of view, leaving a sliver inside, does not score as "wholly on the other"
        m_total = self._mmask_voxels * self._voxel_ratio
        smaller = min(int(np.count_nonzero(self._fmask)), max(int(np.count_nonzero(mfg)), 0.25 * m_total))
        support = min(1.0, both / smaller) if smaller else 0.0
        region = inside & (self._fmask | mfg)
        if region.sum() < 64:
            return 0.0, support
        return ecc(self._fbins[region], _bin(moved[region], self._mlo, self._mhi, BINS)), support


def _affine(matrix: np.ndarray) -> sitk.AffineTransform:
    """A 4x4 (fixed -> moving) as a SimpleITK transform for resampling."""
    t = sitk.AffineTransform(3)
    t.SetMatrix([float(v) for v in matrix[:3, :3].ravel()])
    t.SetTranslation([float(v) for v in matrix[:3, 3]])
    return t


def _rot(axis: int, deg: float) -> np.ndarray:
    th = math.radians(deg)
    c, s = math.cos(th), math.sin(th)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def probes(matrix: np.ndarray, centre: np.ndarray, mm: float, deg: float) -> list[np.ndarray]:
    """``matrix`` composed with shifts of +-``mm`` along and turns of +-``deg`` about each axis through ``centre``."""
    out = []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            shift = np.eye(4)
            shift[axis, 3] = sign * mm
            out.append(matrix @ shift)
            turn = np.eye(4)
            turn[:3, :3] = _rot(axis, sign * deg)
            turn[:3, 3] = centre - turn[:3, :3] @ centre
            out.append(matrix @ turn)
    return out


def _diagonal(img: sitk.Image) -> float:
    return float(np.linalg.norm(np.array(img.GetSpacing()) * (np.array(img.GetSize()) - 1)))


def lr_axis(img: sitk.Image) -> int:
    """The voxel axis (0 = columns, 1 = rows, 2 = slices) closest to the patient's left-right (LPS x) axis."""
    d = np.array(img.GetDirection()).reshape(3, 3)
    return int(np.argmax(np.abs(d[0])))


def mirrored_lr(img: sitk.Image) -> sitk.Image:
    """``img`` with its voxels reversed along the axis closest to patient left-right, the header kept.

    This is what a left-right flipped series is (pixel columns stored in the wrong
    order, or a wrong orientation header): a mirror about the volume's centre plane
    across that voxel axis — for an oblique series a plane tilted like the series,
    which is why the mirror is taken in voxel space, not about patient x.  The
    mirror of a flipped series is the true one, so it registers like any other.
    """
    flip = [False, False, False]
    flip[lr_axis(img)] = True
    out = sitk.Flip(img, flip, flipAboutOrigin=False)
    out.CopyInformation(img)
    return out


def assess_registration(
    fixed: sitk.Image,
    moving: sitk.Image,
    result: RegistrationResult,
    thresholds: QualityThresholds | None = None,
) -> RegistrationQuality:
    """Quality figures and problems of ``result`` (``moving`` registered onto ``fixed``); see the module notes."""
    th = thresholds or QualityThresholds()
    t0 = time.perf_counter()
    probe = SimilarityProbe(fixed, moving)
    c = volume_centre(fixed)
    final = _affine(result.matrix)
    sim, support = probe.figures(final)
    around = [probe.similarity(_affine(m)) for m in probes(result.matrix, c, th.probe_mm, th.probe_deg)]
    sharp = 1.0 - float(np.mean(around)) / sim if sim > 0 else 0.0

    rot = result.rotation_angle_deg
    start = result.initial_matrix if result.initial_matrix is not None else np.eye(4)
    hc = np.append(c, 1.0)
    travel = float(np.linalg.norm((result.matrix @ hc)[:3] - (start @ hc)[:3]))
    diag = min(_diagonal(fixed), _diagonal(moving))
    frac = travel / diag if diag > 0 else float("inf")
    translation = float(np.linalg.norm((result.matrix @ hc)[:3] - c))

    flip_sim = None
    mirror = None
    if th.check_flip:
        from fusion.registration.mirror import mirror_test

        mirror = mirror_test(probe, seed=result.params.seed, threads=result.params.threads)
        flip_sim = mirror.mirrored.ecc

    problems: list[str] = []
    tags: list[str] = []
    if support < th.min_overlap:
        problems.append(f"only {support:.0%} of the smaller object lies on the other one (at least "
                        f"{th.min_overlap:.0%} required): different body parts, or a failed registration")
        tags.append(f"OVERLAP {support:.2f}")
    if sim < th.min_similarity:
        problems.append(f"the registered volumes are hardly related (normalised mutual information ECC {sim:.3f}, "
                        f"at least {th.min_similarity:.3f} required): wrong pairing or a failed registration")
        tags.append(f"NMI {sim:.3f}")
    if sharp < th.min_sharpness:
        change = (f"lowers the similarity by only {sharp:.1%}" if sharp >= 0
                  else f"raises the similarity by {-sharp:.1%}, so the result is not even a local optimum")
        problems.append(f"no clear optimum: moving the result by {th.probe_mm:g} mm / {th.probe_deg:g} deg {change} "
                        f"(a drop of at least {th.min_sharpness:.0%} required)")
        tags.append(f"FLAT {sharp:.2f}")
    if rot > th.max_rotation_deg:
        problems.append(f"implausible rotation {rot:.1f} deg between the series (at most {th.max_rotation_deg:g} deg)")
        tags.append(f"ROT {rot:.0f}DEG")
    if frac > th.max_travel_fraction:
        problems.append(f"implausible shift: the optimiser moved {travel:.0f} mm from the starting alignment, "
                        f"{frac:.0%} of the volume diagonal (at most {th.max_travel_fraction:.0%})")
        tags.append(f"SHIFT {travel:.0f}MM")
    if mirror is not None and mirror.advantage > th.flip_margin:
        problems.append(
            f"the overlay fits better mirrored left-right (by {mirror.advantage:.1%}: ECC {mirror.mirrored.ecc:.3f} vs "
            f"{mirror.stored.ecc:.3f}, gradient correlation {mirror.mirrored.gradient:.3f} vs "
            f"{mirror.stored.gradient:.3f}; margin {th.flip_margin:.1%}): the series is probably left-right flipped "
            "(check its orientation header / laterality), or the registration failed")
        tags.insert(0, "FLIPPED?")
    return RegistrationQuality(
        overlap=float(result.overlap),
        support_overlap=float(support),
        similarity=float(sim),
        sharpness=float(sharp),
        rotation_deg=float(rot),
        translation_mm=translation,
        travel_mm=travel,
        travel_fraction=float(frac),
        flip_similarity=None if flip_sim is None else float(flip_sim),
        problems=tuple(problems),
        tags=tuple(tags),
        seconds=time.perf_counter() - t0,
        thresholds=th,
        mirror=None if mirror is None else mirror.as_dict(),
    )


__all__ = [
    "COARSE_MM",
    "QualityThresholds",
    "RegistrationQuality",
    "SimilarityProbe",
    "assess_registration",
    "coarse_copy",
    "ecc",
    "mirrored_lr",
    "probes",
]


def check_sheet(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform,
                names: tuple[str, str] = ("base", "overlay"), title: str = "", max_pixels: int = 256) -> Image.Image:
    """The picture to look at: orthogonal slices of ``fixed``, ``moving`` before and after ``transform``, checkerboards.

    "Before" is the overlay as the scanners placed it (identity in patient
    coordinates).  Drawn on ``fixed``'s grid binned to at most about
    ``max_pixels`` across, windowed for display only
    (:func:`fusion.preview.display_range`).  Returns a ``PIL.Image``.
    """
    from fusion.preview import display_range, registration_sheet
    from fusion.registration.rigid import resample_onto

    factor = max(1, -(-max(fixed.GetSize()[:2]) // max_pixels))
    grid = sitk.BinShrink(fixed, [factor, factor, 1]) if factor > 1 else fixed
    outside = float(sitk.GetArrayViewFromImage(moving).min())
    before = resample_onto(moving, grid, sitk.Euler3DTransform(), default_value=outside)
    after = resample_onto(moving, grid, transform, default_value=outside)
    base_v, before_v, after_v = (display_range(sitk.GetArrayViewFromImage(v)) for v in (grid, before, after))
    return registration_sheet(base_v, before_v, after_v, spacing_zyx=grid.GetSpacing()[::-1], names=names, title=title)
