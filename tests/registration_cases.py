"""Registration cases with a known answer, built from real volumes (helper for tests and benchmarks).

Not a test module: ``tests/test_registration_accuracy.py`` and
``benchmarks/registration.py`` import it, so both measure exactly the same cases.

A case is (base, overlay, truth):

- **base**: a real volume (the CIRS 057A CT) resampled to a coarser grid
  (``BASE_SPACING_MM``, anti-aliased), keeping its own field of view, origin and
  direction — the fixed image of the registration.
- **truth**: a rigid transform ``T`` mapping base (fixed) points to overlay
  (moving) points, SimpleITK's convention; rotation about a random axis through
  the base centre by ``angle_deg`` (up to 15 deg), then a translation of
  ``shift_mm`` (up to 40 mm) in a random direction.
- **overlay**: the second "modality": the full-resolution source seen through
  ``T`` (``overlay(y) = g(source(T^-1 y)) + noise``) on its own grid — another
  voxel spacing, another field of view (other extent, centre off by up to 15 mm,
  so the two volumes only partly overlap), another voxel order (identity,
  left-right/anterior-posterior reversed, or oblique) — with a non-monotonic
  intensity remap ``g`` and noise:

  * ``"ct"`` (CT-like overlay): 1.0-2.0 mm in-plane, 2-3 mm slices, light blur
    (the voxel size), ``g`` a random sine of the HU window, Gaussian noise 3 %
    of the range;
  * ``"pet"`` (PET-like overlay): 3-4 mm voxels, Gaussian PSF of 6-8 mm FWHM,
    ``g`` a random non-monotonic "uptake" curve, Poisson-like noise (standard
    deviation proportional to the square root of the value).

TRE (target registration error) is measured at the 8 corners and the centre of
the **base** volume (the grid the fused series is shown on; its corners are the
farthest points a radiologist can look at, so rotation errors count fully):
``|T_est(p) - T_true(p)|``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fusion.registration.rigid import volume_centre as centre

#: base (fixed) voxel size for the accuracy cases: the CIRS CT (0.66 x 0.66 x 1.25 mm) anti-aliased to this
BASE_SPACING_MM = (2.0, 2.0, 2.5)
#: the bar of the issue (mm) over the corners and centre of the base volume
TRE_MEDIAN_BAR_MM = 0.5
TRE_MAX_BAR_MM = 1.0
MAX_ANGLE_DEG = 15.0
MAX_SHIFT_MM = 40.0


@dataclass(frozen=True)
class Case:
    kind: str
    seed: int
    base: sitk.Image
    overlay: sitk.Image
    #: 4x4, base (fixed) point -> overlay (moving) point, LPS mm
    truth: np.ndarray
    angle_deg: float
    shift_mm: float
    #: how the overlay grid was laid out (for the report)
    layout: str


@functools.lru_cache(maxsize=2)
def load_cirs(cirs_dir: str) -> tuple[sitk.Image, sitk.Image]:
    """(CT, MR) of the CIRS 057A pair as float32 LPS volumes (cached per process)."""
    from dicom_node.dicom.volume import load_series

    d = Path(cirs_dir)
    ct = load_series(sorted((d / "CT").glob("*.dcm"))).image
    mr = load_series(sorted((d / "MR").glob("*.dcm"))).image
    return ct, mr


def corners_and_centre(img: sitk.Image) -> np.ndarray:
    """The 8 corner voxel centres and the centre of ``img`` in physical (LPS) mm, shape (9, 3)."""
    size = np.array(img.GetSize()) - 1
    idx = [(i, j, k) for i in (0, size[0]) for j in (0, size[1]) for k in (0, size[2])]
    idx.append(tuple(size / 2.0))
    return np.array([img.TransformContinuousIndexToPhysicalPoint([float(v) for v in p]) for p in idx])


def tre_mm(estimated: np.ndarray, truth: np.ndarray, img: sitk.Image) -> np.ndarray:
    """|estimated(p) - truth(p)| at the corners and centre of ``img`` (9 values, mm)."""
    h = np.c_[corners_and_centre(img), np.ones(9)]
    return np.linalg.norm(h @ estimated.T - h @ truth.T, axis=1)


def resample_to_spacing(img: sitk.Image, spacing: tuple[float, float, float], direction: np.ndarray | None = None,
                        extent_scale=(1.0, 1.0, 1.0), centre_offset=(0.0, 0.0, 0.0), default: float | None = None,
                        blur_sigma_mm: float | tuple | None = None) -> sitk.Image:
    """``img`` anti-aliased and resampled onto a grid of ``spacing`` (mm) about its own centre.

    The new grid covers ``extent_scale`` times the old extent per axis (of the
    new direction's axes), centred ``centre_offset`` mm from the old centre.
    """
    old_sp = np.array(img.GetSpacing())
    old_extent = old_sp * np.array(img.GetSize())
    sp = np.array(spacing, float)
    d_old = np.array(img.GetDirection()).reshape(3, 3)
    d = d_old if direction is None else np.asarray(direction, float)
    # extent along the new axes: project the old extent box
    ext = np.abs(d.T @ d_old) @ old_extent * np.asarray(extent_scale, float)
    size = np.maximum(2, np.round(ext / sp)).astype(int)
    c = centre(img) + np.asarray(centre_offset, float)
    origin = c - d @ ((size - 1) * sp / 2.0)
    if blur_sigma_mm is None:
        # anti-aliasing: sigma^2 = (new^2 - old^2) / (2 sqrt(2 ln 2))^2 ... approximated as half the new spacing
        blur = np.sqrt(np.maximum((sp.min() / 2.0) ** 2 - (old_sp / 2.0) ** 2, 0.0))
    else:
        blur = np.broadcast_to(np.asarray(blur_sigma_mm, float), (3,))
    src = sitk.SmoothingRecursiveGaussian(img, [float(b) for b in blur]) if np.any(blur > 0) else img
    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    ref.SetSpacing([float(s) for s in sp])
    ref.SetOrigin([float(o) for o in origin])
    ref.SetDirection([float(v) for v in d.ravel()])
    fill = float(sitk.GetArrayViewFromImage(img).min()) if default is None else default
    return sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, fill, sitk.sitkFloat32)


def rigid(angle_deg: float, axis: np.ndarray, shift: np.ndarray, about: np.ndarray) -> np.ndarray:
    """4x4: rotate by ``angle_deg`` about ``axis`` through ``about``, then translate by ``shift``."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    th = math.radians(angle_deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    r = np.eye(3) + math.sin(th) * k + (1 - math.cos(th)) * (k @ k)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = about - r @ about + np.asarray(shift, float)
    return m


def affine_transform(matrix: np.ndarray) -> sitk.AffineTransform:
    t = sitk.AffineTransform(3)
    t.SetMatrix([float(v) for v in matrix[:3, :3].ravel()])
    t.SetTranslation([float(v) for v in matrix[:3, 3]])
    return t


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _layout(rng: np.random.Generator) -> tuple[str, np.ndarray]:
    choice = int(rng.integers(4))
    if choice == 0:
        return "identity", np.eye(3)
    if choice == 1:
        return "LR+AP reversed", np.diag([-1.0, -1.0, 1.0])  # a proper rotation: columns right-to-left, rows anterior-up
    if choice == 2:
        return "LR+SI reversed", np.diag([-1.0, 1.0, -1.0])
    ang = rng.uniform(5, 20)
    return f"oblique {ang:.0f} deg", rigid(ang, _unit(rng), np.zeros(3), np.zeros(3))[:3, :3]


def _hu_unit(arr: np.ndarray) -> np.ndarray:
    return np.clip((arr + 1000.0) / 2000.0, 0.0, 1.0)


def make_case(source: sitk.Image, base: sitk.Image, kind: str, seed: int) -> Case:
    """One case (see the module notes); deterministic in ``seed``."""
    if kind not in ("ct", "pet"):
        raise ValueError(f"kind is 'ct' or 'pet', got {kind!r}")
    rng = np.random.default_rng([seed, 0 if kind == "ct" else 1])
    angle = float(rng.uniform(0.3, 1.0) * MAX_ANGLE_DEG)
    shift = float(rng.uniform(0.25, 1.0) * MAX_SHIFT_MM)
    truth = rigid(angle, _unit(rng), shift * _unit(rng), centre(base))
    layout, direction = _layout(rng)
    offset = rng.uniform(-15, 15, 3)
    if kind == "ct":
        spacing = (*(2 * [float(rng.uniform(1.0, 2.0))]), float(rng.uniform(2.0, 3.0)))
        scale = rng.uniform(0.8, 1.15, 3)
        psf = None
    else:
        spacing = tuple(float(v) for v in rng.uniform(3.0, 4.0, 3))
        scale = rng.uniform(0.9, 1.3, 3)
        psf = float(rng.uniform(6.0, 8.0)) / 2.3548  # FWHM -> sigma
    # the overlay grid, in the overlay scanner's frame; the object moved by T inside it
    grid = resample_to_spacing(source, spacing, direction=direction, extent_scale=scale, centre_offset=offset,
                               blur_sigma_mm=0.0)
    src = source
    blur = psf if psf is not None else max(spacing) / 2.0
    src = sitk.SmoothingRecursiveGaussian(src, float(blur))
    inv = affine_transform(np.linalg.inv(truth))  # Resample pulls: overlay point y -> source point T^-1 y
    moved = sitk.Resample(src, grid, inv, sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    u = _hu_unit(sitk.GetArrayFromImage(moved).astype(np.float64))
    noise_rng = np.random.default_rng([seed, 7, 0 if kind == "ct" else 1])
    if kind == "ct":
        f, ph = rng.uniform(2.0, 3.5), rng.uniform(0, math.pi)
        v = np.sin(2 * math.pi * f * u + ph) + 0.5 * u
        v = v + noise_rng.normal(0.0, 0.03 * 3.0, v.shape)
    else:
        # "uptake": low in air, a peak for soft tissue, lower again in dense material; Poisson-like noise
        peak, width = rng.uniform(0.45, 0.55), rng.uniform(0.04, 0.08)
        v = 0.1 * (u > 0.2) + np.exp(-((u - peak) / width) ** 2) + 0.4 * np.clip(u - 0.6, 0, None)
        v = np.clip(v + noise_rng.normal(0.0, 1.0, v.shape) * 0.05 * np.sqrt(np.clip(v, 0, None) + 0.01), 0, None)
    out = sitk.GetImageFromArray(v.astype(np.float32))
    out.CopyInformation(grid)
    return Case(kind=kind, seed=seed, base=base, overlay=out, truth=truth, angle_deg=angle, shift_mm=shift,
                layout=layout)


def cirs_base(cirs_dir: str, spacing=BASE_SPACING_MM) -> tuple[sitk.Image, sitk.Image]:
    """(source, base): the full-resolution CIRS CT and its anti-aliased copy at ``spacing``."""
    ct, _ = load_cirs(str(cirs_dir))
    return ct, resample_to_spacing(ct, spacing)


def flipped_lr(img: sitk.Image) -> sitk.Image:
    """The same voxels with the patient's left and right swapped (a mirror about the volume's sagittal centre plane)
    — what a wrongly labelled (left-right flipped) series looks like in patient coordinates.  The result keeps a
    proper (det +1) direction: the voxel data are reversed along the axis closest to LPS x instead."""
    d = np.array(img.GetDirection()).reshape(3, 3)
    axis = int(np.argmax(np.abs(d[0])))
    flip = [False, False, False]
    flip[axis] = True
    out = sitk.Flip(img, flip, flipAboutOrigin=False)
    out.CopyInformation(img)  # same grid, mirrored content
    return out


def moved_header(img: sitk.Image, p: np.ndarray) -> sitk.Image:
    """The same voxels placed by the rigid ``p`` in patient space (point x -> p x): an exact, interpolation-free move."""
    out = sitk.Image(img)
    d = np.array(img.GetDirection()).reshape(3, 3)
    o = np.array(img.GetOrigin())
    out.SetDirection([float(v) for v in (p[:3, :3] @ d).ravel()])
    out.SetOrigin([float(v) for v in p[:3, :3] @ o + p[:3, 3]])
    return out


# ---------------------------------------------------------------------------------------------------------------
# two genuinely different modalities: the Harvard MRI/CT, MRI/PET, MRI/SPECT pairs stacked into volumes
# ---------------------------------------------------------------------------------------------------------------

#: the Harvard atlas slices: 256 x 256 pixels, taken as 1 mm (a head of ~180 mm across fills ~180 pixels)
HARVARD_PIXEL_MM = 1.0
#: the gap between consecutive atlas slices of one patient, taken as 6 mm (21 slices from the skull base to
#: the vertex, ~125 mm)
HARVARD_GAP_MM = 6.0
#: consecutive Harvard files that are one patient's slices, bottom to top (seen in a contact sheet: the series
#: change where the anatomy jumps back to the skull base)
HARVARD_STACKS: dict[str, tuple[tuple[int, int], ...]] = {
    "MRI_CT": ((11, 20), (21, 31)),
    "MRI_PET": ((11, 31), (32, 52)),
    "MRI_SPECT": ((11, 43), (44, 70), (71, 83)),
}
HARVARD_OTHER = {"MRI_CT": "CT", "MRI_PET": "PET", "MRI_SPECT": "SPECT"}
#: Harvard subset -> overlay kind of the case
HARVARD_KINDS = {"MRI_CT": "head-ct", "MRI_PET": "head-pet", "MRI_SPECT": "head-spect"}
#: largest rotation of the Harvard cases, about an axis within ~15 deg of the head's long axis (6 mm slices
#: carry little out-of-plane detail), and largest shift
HARVARD_MAX_ANGLE_DEG = 6.0
HARVARD_MAX_SHIFT_MM = 15.0
#: the two-modality cases' bars: what the method reaches on them today (docs/registration.md), not a goal
TWO_MODALITY_MEDIAN_BAR_MM = 15.0
TWO_MODALITY_MAX_BAR_MM = 25.0


def harvard_slice(path: str | Path) -> np.ndarray:
    """One Harvard image as float32 on 0..1 (colour PET/SPECT as ITU-R 601 luminance), rows top to bottom."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"), dtype=np.float32)
    return arr / 255.0


def harvard_stack(harvard_dir: str | Path, subset: str, first: int, last: int, modality: str) -> sitk.Image:
    """Files ``first..last`` of one subset and modality ("MRI" or the other) as an axial LPS volume centred at 0.

    Columns towards the patient's left, rows towards posterior (the atlas
    slices are in radiological display orientation), slices towards the head,
    :data:`HARVARD_PIXEL_MM` pixels, :data:`HARVARD_GAP_MM` between slices.
    """
    folder = Path(harvard_dir) / subset / modality
    vol = np.stack([harvard_slice(folder / f"{n}.png") for n in range(first, last + 1)])
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((HARVARD_PIXEL_MM, HARVARD_PIXEL_MM, HARVARD_GAP_MM))
    size = np.array(img.GetSize()) - 1
    img.SetOrigin(tuple(float(v) for v in -size * np.array(img.GetSpacing()) / 2))
    return img


def make_two_modality_case(harvard_dir: str | Path, subset: str, stack: int, seed: int) -> Case:
    """A case from two real modalities: one patient's MRI stack is the base, the other modality's stack moved by ``T``.

    The Harvard pairs are co-registered by the atlas makers, so the other
    modality's volume moved by a known ``T`` (rotation up to
    :data:`HARVARD_MAX_ANGLE_DEG` through the base centre, then a shift up to
    :data:`HARVARD_MAX_SHIFT_MM`), seen on its own grid (CT: 1 x 1 mm, 5 mm
    slices; PET/SPECT: 2 mm in-plane, 5 mm slices, 3 mm FWHM extra blur) with 2 %
    noise, is a second modality with known ground truth: its contrast,
    resolution and noise are those of the real scanner, not a remap of the base.
    The atlas's own co-registration error (about 1 mm, seen when a registration
    is started at the truth) is part of the measured TRE.
    """
    first, last = HARVARD_STACKS[subset][stack]
    kind = HARVARD_KINDS[subset]
    rng = np.random.default_rng([seed, 2, stack, sorted(HARVARD_KINDS).index(subset)])
    base = harvard_stack(harvard_dir, subset, first, last, "MRI")
    source = harvard_stack(harvard_dir, subset, first, last, HARVARD_OTHER[subset])
    angle = float(rng.uniform(0.3, 1.0) * HARVARD_MAX_ANGLE_DEG)
    shift = float(rng.uniform(0.25, 1.0) * HARVARD_MAX_SHIFT_MM)
    axis = np.array([*(0.25 * rng.normal(size=2)), 1.0]) * rng.choice([-1.0, 1.0])
    truth = rigid(angle, axis, shift * _unit(rng), centre(base))
    if subset == "MRI_CT":
        spacing: tuple[float, float, float] = (1.0, 1.0, 5.0)
        blur: float | tuple[float, float, float] = 0.3
    else:
        spacing = (2.0, 2.0, 5.0)
        blur = (1.3, 1.3, 0.3)
    grid = resample_to_spacing(source, spacing, extent_scale=(1.1, 1.1, 1.3), blur_sigma_mm=0.0, default=0.0)
    src = sitk.SmoothingRecursiveGaussian(source, blur)
    moved = sitk.Resample(src, grid, affine_transform(np.linalg.inv(truth)), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    v = sitk.GetArrayFromImage(moved)
    v = np.clip(v + np.random.default_rng([seed, 9, stack]).normal(0.0, 0.02, v.shape).astype(np.float32), 0, None)
    out = sitk.GetImageFromArray(v.astype(np.float32))
    out.CopyInformation(grid)
    return Case(kind=kind, seed=seed, base=base, overlay=out, truth=truth, angle_deg=angle, shift_mm=shift,
                layout=f"{subset} {first}-{last}")
