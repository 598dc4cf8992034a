"""MDLatLRR: multi-level latent low-rank decomposition (what VIFB runs as "LatLRR").

H. Li, X.-J. Wu and J. Kittler, "MDLatLRR: A novel decomposition method for infrared and
visible image fusion", IEEE Trans. Image Processing 29, 2020.  Ported number for number
from VIFB's ``run_LatLRR.m``, ``fusion_method.m``, ``deep_latent.m``, ``decomposition.m``,
``fuison_base_parts.m`` and ``fuison_detail_parts.m`` with the 8x8 projection ``L_8``
(VIFB snapshot 22b2ea9; docs/ports.md, LatLRR), so that ``quantize=True`` reproduces VIFB's published
outputs.

Algorithm (``im2double`` images, i.e. the 0..1 scale):

- Decomposition, one level: every overlapping 8x8 patch (stride 1) is vectorised
  column-major (MATLAB ``temp(:)``), ``V = L_8 P``; the detail image is the overlap-add of
  the 8x8 reshaped columns of ``V`` divided by the number of patches covering each
  pixel, the base is ``image - detail``.  Repeated on the base for 4 levels.
- Fusion: bases averaged 0.5/0.5.  At each level the two images' vectors are combined
  with the nuclear-norm weights ``w1 = ||V1||_* / (||V1||_* + ||V2||_*)`` (nuclear norm of
  the 8x8 reshaped vector), overlap-added and divided by the coverage count.

Reference quirks that are reproduced, because VIFB's published outputs contain them:

- ``fusion_method`` initialises its overlap-add accumulator once, outside the loop over
  levels, and stores ``accumulator / count`` after each level before summing the four
  stored images.  The fused detail is therefore ``4 D1 + 3 D2 + 2 D3 + D4`` (``Dk`` the
  fused detail of level k), not the paper's ``D1 + D2 + D3 + D4``.
- ``run_LatLRR`` loops ``de_level = 1:4`` and keeps the last result: the output is the
  4-level fusion.

All-zero patch pairs (both images' level-k vectors are 0, e.g. 8x8 windows that are black
in both sources): MATLAB computes ``0/0`` weights, the NaN spreads over the patch's 8x8
footprint (and, through the accumulator, every later level) and ``im2uint8`` turns those
pixels into 0.  Such pixels are black in both sources (in practice always: a level-k base
patch is 0 only inside a region that is black in the input).  Here the weights are set to
0 explicitly (no NaN is ever produced) and the pixels covered by any all-zero patch pair
are set to 0, in both modes, which is exactly MATLAB's result and keeps medical
backgrounds black instead of letting the neighbouring detail leak into them.

Computation: patches are never materialised for the whole image.  The patch grid is
processed in bands of a few patch rows (``BAND_VALUES`` per slice; the height depends only
on the image width) for groups of slices at once (``CHUNK_VALUES`` bounds the memory
whatever the stack size).  Each band gives each image's ``V`` with one matrix product per
slice, the nuclear norms with one batched singular-value call on ``(N, 8, 8)`` (NumPy and
CuPy), and the overlap-adds as 64 shifted additions.  Patch vectors use ``j = dy + 8 dx``
(``order='F'``).  Products of one shape per slice and a fixed accumulation order make a
stack's result bit-identical to its slices fused one by one.  On CPU the SVDs dominate
(about 6 us per 8x8 matrix with LAPACK: roughly 10 s for a 3-channel 254x328 pair).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fusion import environment
from fusion.backend import array_module
from fusion.errors import FusionError
from fusion.methods import register
from fusion.methods._common import check_pair_unit, finish

UNIT = 8
LEVELS = 4
BAND_VALUES = 1 << 17  # values per slice of one (64, rows, patches) band array
CHUNK_VALUES = 1 << 22  # values of one band array for a group of slices

MODEL_ENV = "FUSION_LATLRR_MODEL"
MODEL_NAME = "L_8.npy"
# sha256 of the little-endian float64 bytes of L_8 in C order (VIFB models/L_8.mat).
MODEL_SHA256 = "2fd86a4f44847e7672553839fba24d3a80d29dedea2c53ad01220a664c58a57a"


class ModelUnavailableError(FusionError):
    """The MDLatLRR projection matrix ``L_8`` could not be found or failed its checksum."""


def _model_candidates() -> list[Path]:
    out = []
    explicit = environment.latlrr_model()
    if explicit is not None:
        out.append(explicit)
    out.append(Path(__file__).resolve().parent / "models" / MODEL_NAME)
    out.append(environment.shared_dir() / "reference" / "vifb" / "models" / MODEL_NAME)
    return out


@lru_cache(maxsize=1)
def projection_matrix() -> np.ndarray:
    """VIFB's ``L_8`` (64x64 float64), verified against its checksum.

    Looked up at ``$FUSION_LATLRR_MODEL``, then ``fusion/methods/models/L_8.npy``, then the
    shared reference folder (``$FUSION_SHARED_DIR`` or ``../shared`` next to the repository).
    Loaded with ``allow_pickle=False``.
    """
    tried = []
    for path in _model_candidates():
        if not path.is_file():
            tried.append(str(path))
            continue
        mat = np.load(path, allow_pickle=False)
        mat = np.ascontiguousarray(mat, dtype="<f8")
        digest = hashlib.sha256(mat.tobytes()).hexdigest()
        if mat.shape != (UNIT * UNIT, UNIT * UNIT) or digest != MODEL_SHA256:
            raise ModelUnavailableError(
                f"{path} is not VIFB's L_8 (shape {mat.shape}, sha256 {digest})")
        mat.setflags(write=False)
        return mat
    raise ModelUnavailableError(
        "MDLatLRR projection matrix L_8.npy not found; tried " + ", ".join(tried)
        + f" (set {MODEL_ENV} to its path)")


def coverage_count(h: int, w: int, xp: Any, dtype: Any) -> Any:
    """Number of 8x8 stride-1 patches covering each pixel (``count_matric``), exact integers."""
    def counts(n: int) -> Any:
        i = xp.arange(n)
        return (xp.minimum(i, n - UNIT) - xp.maximum(i - (UNIT - 1), 0) + 1).astype(dtype)
    return counts(h)[:, None] * counts(w)[None, :]


def _band_vectors(base: Any, p0: int, p1: int, proj: Any) -> Any:
    """``L_8 P`` for the patches with top rows ``p0 .. p1-1``: shape (..., 64, rows, wp).

    The patch vector index (axis -3) is ``j = dy + 8 dx`` (column-major ``temp(:)``); so
    is the index of the result (MATLAB's ``reshape(v, [8 8])``).  Vectors are columns, as
    in MATLAB's ``temp_vector``: one matrix product per slice (batched over the slices),
    and every row ``j`` of the result is contiguous for the overlap-add.  Each product has
    the same shape for every slice and depends only on the image width, so BLAS returns
    bit-identical vectors whether a slice is fused alone or within a stack.
    """
    xp = array_module(base)
    wp = base.shape[-1] - UNIT + 1
    cols = [base[..., p0 + dy:p1 + dy, dx:dx + wp] for dx in range(UNIT) for dy in range(UNIT)]
    patches = xp.stack(cols, axis=-3)
    shape = patches.shape
    flat = patches.reshape(shape[:-3] + (UNIT * UNIT, shape[-2] * shape[-1]))
    return xp.matmul(proj, flat).reshape(shape)


def _overlap_add(acc: Any, vec: Any, p0: int, p1: int) -> None:
    """Add the 8x8 reshaped vectors (axis -3) of a band of patches into ``acc`` in place.

    ``dy`` runs from 7 down to 0 in the outer loop, so every pixel receives its
    contributions in increasing patch-row order, ``dx`` inner: the same order whatever the
    band boundaries are.
    """
    wp = vec.shape[-1]
    for dy in range(UNIT - 1, -1, -1):
        for dx in range(UNIT):
            acc[..., p0 + dy:p1 + dy, dx:dx + wp] += vec[..., dy + UNIT * dx, :, :]


def _footprint_any(acc: Any, flag: Any, p0: int, p1: int) -> None:
    """Mark in ``acc`` (bool, in place) every pixel covered by a flagged patch of the band."""
    wp = flag.shape[-1]
    for dy in range(UNIT):
        for dx in range(UNIT):
            acc[..., p0 + dy:p1 + dy, dx:dx + wp] |= flag


def nuclear_norms(vec: Any) -> Any:
    """Nuclear norms of the 8x8 reshaped vectors (axis -3 of length 64): one batched SVD.

    The reference reshapes column-major; the (N, 8, 8) matrices taken here are their
    transposes, which have the same singular values.  ``xp.linalg.svd`` is batched in
    NumPy (LAPACK per matrix) and CuPy (batched Jacobi SVD on the GPU).
    """
    xp = array_module(vec)
    lead = vec.shape[:-3] + vec.shape[-2:]
    mats = xp.moveaxis(vec, -3, -1).reshape(-1, UNIT, UNIT)
    sv = xp.linalg.svd(mats, compute_uv=False)
    return sv.sum(axis=-1).reshape(lead)


class _Source:
    """One image's state in the decomposition: current base, detail accumulator, its slices."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.shared = base.ndim == 2 or base.shape[0] == 1  # one image for every slice

    def band(self, g0: int, g1: int, p0: int, p1: int, proj: Any, acc: Any,
             cache: dict) -> tuple[Any, Any]:
        """Vectors and nuclear norms of the band for slices ``g0:g1`` (overlap-added once)."""
        if self.shared:
            if "v" not in cache:
                cache["v"] = _band_vectors(self.base, p0, p1, proj)
                _overlap_add(acc, cache["v"], p0, p1)
                cache["n"] = nuclear_norms(cache["v"])
            return cache["v"], cache["n"]
        v = _band_vectors(self.base[g0:g1], p0, p1, proj)
        _overlap_add(acc[g0:g1], v, p0, p1)
        return v, nuclear_norms(v)


def mdlatlrr_fusion(img1: Any, img2: Any, levels: int = LEVELS) -> Any:
    """``fusion_method(img1, img2, L_8, 8, levels, 'nu', 1)`` on the 0..1 scale.

    ``img1`` and ``img2`` may have different leading shapes that broadcast (one IR image
    shared by a stack of channels); a shared image is decomposed only once.  Returns the
    fused image, pixels under all-zero patch pairs already set to 0.

    Memory: the patch grid is processed in bands of ``band`` patch rows (about
    ``BAND_VALUES`` values per slice and array; the height depends only on the image
    width) and the slices in groups of up to ``CHUNK_VALUES // (band values)``, so the
    temporaries stay around ``CHUNK_VALUES`` values whatever the stack size.
    """
    xp = array_module(img1)
    dtype = xp.result_type(img1, img2)
    h, w = img1.shape[-2:]
    if h < UNIT or w < UNIT:
        raise ValueError(f"MDLatLRR needs images of at least {UNIT}x{UNIT} pixels, got {h}x{w}")
    hp, wp = h - UNIT + 1, w - UNIT + 1
    shape = np.broadcast_shapes(img1.shape, img2.shape)
    n_slices = shape[0] if len(shape) == 3 else 1
    band = max(1, BAND_VALUES // (UNIT * UNIT * wp))
    group = max(1, CHUNK_VALUES // (UNIT * UNIT * band * wp))
    proj = xp.asarray(projection_matrix(), dtype=dtype)
    count = coverage_count(h, w, xp, dtype)

    def rows_of(arr: Any, g0: int, g1: int) -> Any:
        return arr[g0:g1] if arr.ndim == 3 else arr

    src1, src2 = _Source(img1), _Source(img2)
    cumulative = xp.zeros(shape, dtype=dtype)  # fusion_method's I_d_temp (never reset)
    fused_detail = None  # sum over levels of I_d_temp ./ count
    undefined = xp.zeros(shape, dtype=bool)  # pixels MATLAB turns into NaN
    for _ in range(levels):
        acc1 = xp.zeros(src1.base.shape, dtype=dtype)
        acc2 = xp.zeros(src2.base.shape, dtype=dtype)
        for p0 in range(0, hp, band):
            p1 = min(hp, p0 + band)
            cache1: dict = {}
            cache2: dict = {}
            for g0 in range(0, n_slices, group):
                g1 = min(n_slices, g0 + group)
                v1, n1 = src1.band(g0, g1, p0, p1, proj, acc1, cache1)
                v2, n2 = src2.band(g0, g1, p0, p1, proj, acc2, cache2)
                total = n1 + n2
                zero = total == 0
                safe = xp.where(zero, 1.0, total).astype(dtype, copy=False)
                w1 = xp.where(zero, 0.0, n1 / safe).astype(dtype, copy=False)
                w2 = xp.where(zero, 0.0, n2 / safe).astype(dtype, copy=False)
                fused = w1[..., None, :, :] * v1 + w2[..., None, :, :] * v2
                _overlap_add(rows_of(cumulative, g0, g1), fused, p0, p1)
                if bool(zero.any()):
                    target = rows_of(undefined, g0, g1)
                    flag = xp.broadcast_to(zero, target.shape[:-2] + zero.shape[-2:])
                    _footprint_any(target, flag, p0, p1)
        src1.base = src1.base - acc1 / count
        src2.base = src2.base - acc2 / count
        level_detail = cumulative / count
        fused_detail = level_detail if fused_detail is None else fused_detail + level_detail
    fused_img = (0.5 * src1.base + 0.5 * src2.base) + fused_detail
    return xp.where(undefined, 0.0, fused_img).astype(dtype, copy=False)


@register("mdlatlrr")
def mdlatlrr(a: Any, b: Any, *, quantize: bool = False) -> Any:
    """Fuse ``a`` (anatomical, VIFB "VI") and ``b`` (other modality, VIFB "IR") with MDLatLRR.

    ``run_LatLRR`` calls ``fusion_method(IR, VI, ...)`` on ``im2double`` images (the
    method is symmetric in its two inputs) and returns ``im2uint8`` of the 4-level
    result.  There are no internal uint8 steps; ``quantize`` rounds as ``im2uint8``.
    ``b`` may be a single image shared by a stack ``a``: it is then decomposed once.
    """
    xp, va, ir = check_pair_unit(a, b)
    fused = mdlatlrr_fusion(ir, va)
    return finish(fused * 255.0, quantize=quantize).astype(va.dtype, copy=False)
