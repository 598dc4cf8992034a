"""Rigid multimodal registration (Mattes mutual information) and resampling.

Pure image science: SimpleITK images in physical space (LPS millimetres, as
``dicom_node.dicom.volume`` builds them) in, a transform and quality figures out.

Method (the measured starting point in docs/method.md, with the changes measured in
docs/registration.md that make it meet the issue-4 bar on real volumes):

- preparation (:func:`prepare_pair`): each volume clipped to its 0.5-99.5th
  percentiles (the exact minimum, e.g. CT padding at -3024 HU, left out) so the
  histogram bins span the object's contrast; both averaged down by whole voxel
  blocks towards ``working_spacing_mm`` (2 mm: a 0.66 mm CT becomes 1.97 x 1.97
  x 2.5 mm, which is 15 times fewer voxels and no less accurate); the moving
  volume resampled to cubic voxels — ITK's metric gradient on anisotropic voxels
  is biased (measured: ~1 mm along 2.8 mm slices, even started at the truth);
- geometry-centred initialisation (``CenteredTransformInitializer`` GEOMETRY):
  the centres of the two volumes' extents are made to coincide, the rotation
  centre is the fixed volume's centre (``initialisation="moments"``: centres
  of mass instead; ``initial=`` a known starting matrix);
- Mattes mutual information with ``histogram_bins`` bins, evaluated on a
  RANDOM ``sampling`` fraction of the fixed voxels drawn with a fixed ``seed``,
  raised per level to at least ``min_samples`` points (5 % of a shrink-4 level
  is a few hundred points: the optimiser then wandered into wrong optima for
  rotations above ~8 deg);
- regular-step gradient descent, parameter scales from physical shift (so a
  step of 1 moves some voxel by about 1 mm whether it rotates or translates);
- multi-resolution: ``shrink_factors`` of the working grid with Gaussian
  ``smoothing_sigmas`` in **physical units (mm)**, about half the level's voxel
  size and no less than ~0.6 of the coarser working voxel at the last level
  (too little smoothing for the shrink aliases the coarse levels — rotations of
  10-15 deg were not captured with 2/1/0 mm — and biases the finest level);
- linear interpolation of the moving image.

Reproducibility (measured, SimpleITK 2.5): with a fixed seed and ``threads=1``
the result is bit-identical run after run.  With more threads it is not (most
likely ITK's Mattes MI sums its joint histogram across threads in no fixed
order): the last bits differ and the optimiser path drifts by ~1e-7 mm
(synthetic 64^3) to ~1e-4 mm (CIRS CT/MR) — clinically nothing, but not
bit-identical.  ``threads=None`` uses SimpleITK's default (all cores); a number
sets SimpleITK's *global* default thread count for the duration of the call
(the registration method's own setting does not reach the pyramid filters it
builds), under a lock.

Not done here: a search over flips.  A left-right flipped series is not
recovered by this local optimiser (docs/method.md); ``fusion.registration.quality``
detects it (and unrelated pairs and poor optima) so the caller can stop rather
than fuse.

Conventions: the transform maps **fixed** physical points to **moving**
physical points (SimpleITK's definition), which is what
:func:`resample_onto` needs to pull the moving image onto the fixed grid.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from fusion.errors import FusionError

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
    "lanczos": sitk.sitkLanczosWindowedSinc,
}
#: Longest edge (voxels) of the shrunk copies used for the overlap figure.
_OVERLAP_GRID = 96


class RegistrationError(FusionError):
    """SimpleITK could not register the pair (e.g. no overlap left); the message says why."""


@dataclass(frozen=True)
class RegistrationParams:
    """Knobs of :func:`register_rigid`.

    The first six fields match ``dicom_node.config.RegistrationConfig``, so a
    pipeline can pass ``RegistrationParams.from_mapping(cfg.registration.model_dump())``
    (keys that are not fields — ``enabled``, the quality limits — are ignored).
    """

    #: fraction of fixed voxels sampled by the metric (RANDOM, seeded)
    sampling: float = 0.05
    histogram_bins: int = 50
    #: one entry per resolution level, coarsest first, of the working grid (``working_spacing_mm``)
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    #: Gaussian sigma per level, in mm (see ``smoothing_in_mm``)
    smoothing_sigmas: tuple[float, ...] = (4.0, 2.0, 1.5)
    #: most optimiser iterations per level
    iterations: int = 500
    seed: int = 20261122
    #: first step length of the regular-step optimiser (about mm with physical-shift scales)
    learning_rate: float = 1.0
    #: stop when the step has shrunk below this
    min_step: float = 1e-4
    #: step shrink factor each time the gradient turns back
    relaxation_factor: float = 0.5
    gradient_magnitude_tolerance: float = 1e-8
    #: smoothing sigmas in mm (True, SimpleITK's default) or in voxels of the full-resolution images
    smoothing_in_mm: bool = True
    #: starting point: "geometry" (centres of the two extents coincide; the measured choice in docs/method.md) or
    #: "moments" (centres of mass; may help when the fields of view differ a lot, e.g. whole-body PET vs head MR)
    initialisation: str = "geometry"
    #: worker threads; None = SimpleITK's default (all cores).  Only 1 is bit-reproducible: ITK's
    #: Mattes MI accumulates its joint histogram from several threads in no fixed order (see module notes)
    threads: int | None = None
    #: least number of metric samples per level: coarse levels have few voxels, and 5 % of a shrink-4 level
    #: is a few hundred points — too few for a 50-bin joint histogram (measured: the optimiser then wanders
    #: into wrong optima for rotations above ~8 deg); 0 = the plain percentage everywhere
    min_samples: int = 20000
    #: clip each volume to these percentiles of its values (exact-minimum padding such as -3024 HU ignored)
    #: before registering, so the histogram bins span the object's contrast, not the extremes; None: no clipping
    clip_percentiles: tuple[float, float] | None = (0.5, 99.5)
    #: register on copies averaged down (whole voxel blocks) to about this voxel size, mm; coarser volumes stay
    #: as they are; None: the volumes' own grids.  The pyramid's shrink factors count from this working grid
    working_spacing_mm: float | None = 2.0
    #: resample an anisotropic moving volume to cubic voxels before registering: ITK's metric gradient on
    #: anisotropic voxels is biased (measured: ~1 mm along 2.8 mm slices, even when started at the truth)
    isotropic_moving: bool = True

    def __post_init__(self) -> None:
        # config gives lists; keep the frozen object hashable and immutable
        object.__setattr__(self, "shrink_factors", tuple(int(s) for s in self.shrink_factors))
        object.__setattr__(self, "smoothing_sigmas", tuple(float(s) for s in self.smoothing_sigmas))
        if self.clip_percentiles is not None:
            object.__setattr__(self, "clip_percentiles", tuple(float(v) for v in self.clip_percentiles))
        if len(self.shrink_factors) != len(self.smoothing_sigmas) or not self.shrink_factors:
            raise ValueError(
                f"shrink_factors {self.shrink_factors} and smoothing_sigmas {self.smoothing_sigmas} "
                "need one entry per level, at least one level"
            )
        if any(s < 1 for s in self.shrink_factors) or any(s < 0 for s in self.smoothing_sigmas):
            raise ValueError("shrink factors must be >= 1 and smoothing sigmas >= 0")
        if not 0 < self.sampling <= 1:
            raise ValueError(f"sampling is a fraction in (0, 1], got {self.sampling}")
        if self.histogram_bins < 8 or self.iterations < 1:
            raise ValueError("histogram_bins must be >= 8 and iterations >= 1")
        if self.initialisation not in ("geometry", "moments"):
            raise ValueError(f"initialisation must be 'geometry' or 'moments', got {self.initialisation!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {self.min_samples}")
        if self.clip_percentiles is not None and not (
            len(self.clip_percentiles) == 2 and 0 <= self.clip_percentiles[0] < self.clip_percentiles[1] <= 100
        ):
            raise ValueError(f"clip_percentiles must be (low, high) with 0 <= low < high <= 100, got {self.clip_percentiles}")
        if self.working_spacing_mm is not None and self.working_spacing_mm <= 0:
            raise ValueError(f"working_spacing_mm must be > 0 or None, got {self.working_spacing_mm}")

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> RegistrationParams:
        """Build from a dict, ignoring keys that are not fields (e.g. ``enabled``)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass(frozen=True)
class RegistrationResult:
    #: maps fixed physical points to moving physical points (SimpleITK convention)
    transform: sitk.Euler3DTransform
    #: the same mapping as a 4x4 homogeneous matrix in LPS mm: ``y = M @ [x, 1]``
    matrix: np.ndarray
    #: where the fixed volume's centre (the rotation centre) moves: the Euler transform's translation, mm
    translation_mm: tuple[float, float, float]
    #: SimpleITK Euler angles about x, y, z in degrees (applied as Rz Rx Ry)
    rotation_deg: tuple[float, float, float]
    #: Mattes MI at the end (negative: lower is better), on the last level's sample
    final_metric: float
    #: optimiser iterations over all levels
    iterations: int
    stop_condition: str
    seconds: float
    #: fraction of the fixed foreground that lands inside the moving foreground
    overlap: float
    iterations_per_level: tuple[int, ...] = ()
    params: RegistrationParams = field(default_factory=RegistrationParams)
    #: the starting alignment (the initialiser's transform) as a 4x4, for the plausibility check
    initial_matrix: np.ndarray | None = None

    @property
    def rotation_angle_deg(self) -> float:
        """Total rotation angle (axis-angle magnitude), degrees."""
        r = self.matrix[:3, :3]
        c = max(-1.0, min(1.0, (float(np.trace(r)) - 1.0) / 2.0))
        return math.degrees(math.acos(c))

    @property
    def translation_norm_mm(self) -> float:
        return float(np.linalg.norm(self.translation_mm))


class MatrixTransform(Protocol):
    """A SimpleITK affine-family transform (Euler3D, Affine, VersorRigid3D, ...).

    SimpleITK's base ``Transform`` has no matrix accessors: each subclass defines its own.
    """

    def GetMatrix(self) -> Sequence[float]: ...
    def GetCenter(self) -> Sequence[float]: ...
    def GetTranslation(self) -> Sequence[float]: ...


def transform_matrix(transform: MatrixTransform) -> np.ndarray:
    """4x4 homogeneous matrix of a SimpleITK affine-family transform (fixed -> moving, mm)."""
    t = transform
    a = np.array(t.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.array(t.GetCenter(), dtype=np.float64)
    tr = np.array(t.GetTranslation(), dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = tr + c - a @ c
    return m


def robust_clip(img: sitk.Image, percentiles: tuple[float, float]) -> sitk.Image:
    """``img`` clipped to ``percentiles`` of its values above its minimum (padding such as -3024 HU ignored)."""
    arr = sitk.GetArrayViewFromImage(img)
    sample = np.asarray(arr[:: max(1, arr.shape[0] // 32)]).ravel()  # a few dozen slices are plenty
    sample = sample[np.isfinite(sample)]
    above = sample[sample > sample.min()] if sample.size else sample
    if above.size < 16:
        return img
    lo, hi = np.percentile(above, percentiles)
    if not hi > lo:
        return img
    return sitk.Clamp(img, sitk.sitkFloat32, float(lo), float(hi))


def resample_spacing(img: sitk.Image, spacing: npt.ArrayLike, anti_alias: bool = True) -> sitk.Image:
    """``img`` on a grid of ``spacing`` (mm per axis) with the same direction, centred on the same extent.

    With ``anti_alias`` a Gaussian of sigma ``sqrt(new^2 - old^2) / 2`` per axis
    (mm) is applied first where the grid gets coarser.  Outside values: the image
    minimum.  float32.
    """
    old = np.array(img.GetSpacing(), dtype=np.float64)
    new = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    extent = old * (np.array(img.GetSize()) - 1)
    size = [int(np.floor(e / s + 1e-6)) + 1 for e, s in zip(extent, new)]
    d = np.array(img.GetDirection()).reshape(3, 3)
    shift = (extent - (np.array(size) - 1) * new) / 2.0  # keep the grid centred where it was
    origin = np.array(img.GetOrigin()) + d @ shift
    src = img
    sigma = np.sqrt(np.maximum(new**2 - old**2, 0.0)) / 2.0
    if anti_alias:
        for axis in range(3):
            if sigma[axis] > 0.05 * old[axis]:  # one axis at a time: a zero sigma is not allowed
                src = sitk.RecursiveGaussian(src, float(sigma[axis]), False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
    low = float(sitk.GetArrayViewFromImage(img).min())
    return sitk.Resample(src, size, sitk.Transform(), sitk.sitkLinear, [float(v) for v in origin],
                         [float(v) for v in new], img.GetDirection(), low, sitk.sitkFloat32)


def bin_to(img: sitk.Image, spacing_mm: float) -> sitk.Image:
    """``img`` averaged over blocks of whole voxels so each axis gets as close to ``spacing_mm`` as it can.

    Box averaging is anti-aliasing enough here (every pyramid level smooths again)
    and costs a fraction of a Gaussian on a 512 x 512 CT.
    """
    factors = [max(1, int(round(spacing_mm / s))) for s in img.GetSpacing()]
    return sitk.BinShrink(img, factors) if max(factors) > 1 else img


def prepare_pair(fixed: sitk.Image, moving: sitk.Image, p: RegistrationParams) -> tuple[sitk.Image, sitk.Image]:
    """The two float32 volumes as :func:`register_rigid` registers them.

    Clipped to ``p.clip_percentiles``; averaged down towards ``p.working_spacing_mm``
    (integer blocks of voxels: a 0.66 x 0.66 x 1.25 mm CT becomes 1.97 x 1.97 x 2.5 mm);
    the moving volume then resampled to cubic voxels of its smallest spacing when
    ``p.isotropic_moving``.  The physical extent and position are unchanged.
    """
    f, m = fixed, moving
    if p.clip_percentiles is not None:
        f, m = robust_clip(f, p.clip_percentiles), robust_clip(m, p.clip_percentiles)
    if p.working_spacing_mm:
        f, m = bin_to(f, p.working_spacing_mm), bin_to(m, p.working_spacing_mm)
    if p.isotropic_moving:
        sp = np.array(m.GetSpacing())
        if sp.max() > sp.min() * 1.05:
            m = resample_spacing(m, np.full(3, sp.min()))
    return f, m


def _sampling_per_level(fixed: sitk.Image, p: RegistrationParams) -> list[float]:
    """Metric sampling fraction per level: ``p.sampling``, raised to give at least ``p.min_samples`` points."""
    out = []
    for shrink in p.shrink_factors:
        n = float(np.prod([max(1, -(-s // shrink)) for s in fixed.GetSize()]))
        out.append(float(min(1.0, max(p.sampling, p.min_samples / n))))
    return out


def euler_from_matrix(matrix: np.ndarray, centre: npt.ArrayLike) -> sitk.Euler3DTransform:
    """The rigid 4x4 ``matrix`` as an Euler transform rotating about ``centre`` (same point mapping)."""
    m = np.asarray(matrix, dtype=np.float64)
    c = np.asarray(centre, dtype=np.float64)
    t = sitk.Euler3DTransform()
    t.SetCenter([float(v) for v in c])
    t.SetMatrix([float(v) for v in m[:3, :3].ravel()], 1e-6)
    # y = R (x - c) + c + t  ==  R x + m[:3, 3]
    t.SetTranslation([float(v) for v in m[:3, 3] + m[:3, :3] @ c - c])
    return t


def volume_centre(img: sitk.Image) -> np.ndarray:
    """The physical (LPS mm) centre of the volume's voxel grid: the rotation centre of the transforms here."""
    return np.array(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in img.GetSize()]))


_GLOBAL_THREADS_LOCK = threading.Lock()


@contextlib.contextmanager
def _thread_count(threads: int | None) -> Iterator[None]:
    """Run with SimpleITK's global default thread count set to ``threads`` (None: leave it).

    ``ImageRegistrationMethod.SetNumberOfThreads`` alone does not reach the
    pyramid filters the method builds internally, so the global default is set
    for the call and restored after; the lock keeps two such calls in one process
    from fighting over it.
    """
    if threads is None:
        yield
        return
    with _GLOBAL_THREADS_LOCK:
        saved = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
        try:
            yield
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(saved)


def register_rigid(
    fixed: sitk.Image,
    moving: sitk.Image,
    params: RegistrationParams | None = None,
    initial: np.ndarray | None = None,
) -> RegistrationResult:
    """Rigidly register ``moving`` onto ``fixed`` by Mattes MI (see the module notes).

    ``initial``: a 4x4 rigid fixed -> moving matrix to start from instead of the
    initialiser (e.g. a previous result); its rotation centre is the fixed centre.
    """
    p = params or RegistrationParams()
    t0 = time.perf_counter()
    f = fixed if fixed.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(fixed, sitk.sitkFloat32)
    m = moving if moving.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(moving, sitk.sitkFloat32)
    if f.GetDimension() != 3 or m.GetDimension() != 3:
        raise ValueError("register_rigid needs two 3-D images")
    f_in, m_in = f, m
    f, m = prepare_pair(f, m, p)

    mode = (
        sitk.CenteredTransformInitializerFilter.MOMENTS
        if p.initialisation == "moments"
        else sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    start: sitk.Euler3DTransform
    if initial is None:
        # given an Euler3DTransform the initialiser returns one (SimpleITK downcasts its result)
        start = sitk.CenteredTransformInitializer(f_in, m_in, sitk.Euler3DTransform(), mode)
    else:
        start = euler_from_matrix(initial, volume_centre(f_in))

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=p.histogram_bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel(_sampling_per_level(f, p), p.seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=p.learning_rate,
        minStep=p.min_step,
        numberOfIterations=p.iterations,
        relaxationFactor=p.relaxation_factor,
        gradientMagnitudeTolerance=p.gradient_magnitude_tolerance,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(p.shrink_factors))
    reg.SetSmoothingSigmasPerLevel(list(p.smoothing_sigmas))
    if p.smoothing_in_mm:
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    else:
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(start, inPlace=False)

    per_level: list[int] = []
    reg.AddCommand(sitk.sitkMultiResolutionIterationEvent, lambda: per_level.append(0))

    def _count() -> None:
        if per_level:
            per_level[-1] = reg.GetOptimizerIteration() + 1

    reg.AddCommand(sitk.sitkIterationEvent, _count)
    try:
        with _thread_count(p.threads):
            if p.threads is not None:
                reg.SetNumberOfThreads(int(p.threads))
            out = reg.Execute(f, m)
    except RuntimeError as exc:
        raise RegistrationError(
            f"rigid registration failed: {str(exc).strip().splitlines()[-1]} — the volumes probably do not "
            "overlap after centring (different body parts, or a wrong orientation in a header)"
        ) from exc

    # Execute returns a CompositeTransform holding the optimised Euler transform
    if isinstance(out, sitk.CompositeTransform):
        out = out.GetNthTransform(out.GetNumberOfTransforms() - 1)
    euler = sitk.Euler3DTransform(out)
    matrix = transform_matrix(euler)
    overlap = foreground_overlap(f_in, m_in, euler)
    tx, ty, tz = euler.GetTranslation()
    return RegistrationResult(
        transform=euler,
        matrix=matrix,
        translation_mm=(float(tx), float(ty), float(tz)),
        rotation_deg=(
            math.degrees(euler.GetAngleX()),
            math.degrees(euler.GetAngleY()),
            math.degrees(euler.GetAngleZ()),
        ),
        final_metric=float(reg.GetMetricValue()),
        iterations=int(sum(per_level)),
        stop_condition=reg.GetOptimizerStopConditionDescription(),
        seconds=time.perf_counter() - t0,
        overlap=overlap,
        iterations_per_level=tuple(per_level),
        params=p,
        initial_matrix=transform_matrix(start),
    )


def resample_onto(
    moving: sitk.Image,
    fixed: sitk.Image,
    transform: sitk.Transform,
    default_value: float = 0.0,
    interpolator: str = "linear",
) -> sitk.Image:
    """``moving`` on ``fixed``'s grid (the overlay on the base), float32.

    ``transform`` maps fixed points to moving points, as :func:`register_rigid`
    returns it.  Voxels that map outside ``moving`` get ``default_value``.
    """
    try:
        interp = _INTERPOLATORS[interpolator]
    except KeyError:
        raise ValueError(f"interpolator must be one of {sorted(_INTERPOLATORS)}, got {interpolator!r}") from None
    return sitk.Resample(
        sitk.Cast(moving, sitk.sitkFloat32), fixed, transform, interp, float(default_value), sitk.sitkFloat32
    )


def volume_to_array(img: sitk.Image) -> np.ndarray:
    """Voxels as a ``(slices, rows, columns)`` NumPy array (a copy, SimpleITK's z, y, x order)."""
    return sitk.GetArrayFromImage(img)


def _shrunk(img: sitk.Image, longest: int = _OVERLAP_GRID) -> sitk.Image:
    factor = [max(1, int(math.ceil(s / longest))) for s in img.GetSize()]
    # subsample (no averaging): padding values stay exact, so foreground_mask can drop them
    return sitk.Shrink(img, factor) if max(factor) > 1 else img


def foreground_mask(img: sitk.Image) -> sitk.Image:
    """Foreground support of a volume: Otsu threshold, holes filled slice by slice (uint8 0/1).

    A rough "where the object is" for quality figures, not a segmentation: CT
    couch and MR coil signal may count as foreground.
    """
    from scipy import ndimage as ndi

    f = sitk.Cast(img, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(f)
    finite = np.isfinite(arr)
    if not finite.any():
        mask = np.zeros(arr.shape, dtype=np.uint8)
    else:
        # Otsu on a robust range of the values above the minimum, so CT padding
        # outside the reconstruction circle (-3024 HU), zero-filled borders or a
        # few hot voxels do not set the split
        values = arr[finite]
        above = values[values > values.min()]
        lo, hi = np.percentile(above if above.size else values, [0.5, 99.5])
        clipped = np.clip(np.where(finite, arr, lo), lo, hi)
        thr = sitk.OtsuThresholdImageFilter()
        thr.SetInsideValue(0)
        thr.SetOutsideValue(1)
        thr.SetNumberOfHistogramBins(128)
        thr.Execute(sitk.GetImageFromArray(clipped.astype(np.float32)))
        mask = clipped > thr.GetThreshold()
        if hi <= lo:
            mask[:] = False
        # fill holes within each slice (structure without z neighbours), then drop speckle
        struct = np.zeros((3, 3, 3), dtype=bool)
        struct[1] = ndi.generate_binary_structure(2, 1)
        mask = ndi.binary_fill_holes(mask, structure=struct)
        mask = ndi.binary_opening(mask, structure=struct).astype(np.uint8)
    out = sitk.GetImageFromArray(mask)
    out.CopyInformation(f)
    return out


def foreground_overlap(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """Fraction of the fixed foreground whose points map (through ``transform``) into the moving foreground.

    1.0: every fixed object voxel has moving object behind it; low values mean
    the overlay covers only part of the base (different fields of view, or a
    failed registration).  Computed on copies shrunk to at most ~96 voxels a side.
    """
    fm = foreground_mask(_shrunk(fixed))
    mm = foreground_mask(_shrunk(moving))
    mapped = sitk.Resample(mm, fm, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    f_arr = sitk.GetArrayViewFromImage(fm).astype(bool)
    total = int(f_arr.sum())
    if total == 0:
        return 0.0
    return float(np.logical_and(f_arr, sitk.GetArrayViewFromImage(mapped).astype(bool)).sum() / total)
