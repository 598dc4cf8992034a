"""The contract every fusion method in ``fusion.methods`` keeps, as checks the method test files share.

Each file calls these with its own stack and its own float32 tolerances: how
far float32 may drift from float64 depends on the method (a max-abs switch can
flip where two coefficients are nearly equal), and the files say why.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Method = Callable[..., np.ndarray]


def contract_stack(rng: np.random.Generator, rows: int = 40, cols: int = 56) -> tuple[np.ndarray, np.ndarray]:
    """Three slices: smooth structure + noise, pure noise, and an all-black slice (the black one must stay black)."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    smooth = 0.5 + 0.4 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    a = np.stack([np.clip(smooth + 0.05 * rng.standard_normal(smooth.shape), 0, 1),
                  rng.random(smooth.shape), np.zeros_like(smooth)])
    b = np.stack([np.clip(1 - smooth + 0.05 * rng.standard_normal(smooth.shape), 0, 1),
                  rng.random(smooth.shape), np.zeros_like(smooth)])
    return a, b


def check_stack_equals_slices(fn: Method, a: np.ndarray, b: np.ndarray, quantize: bool) -> None:
    """A whole stack gives exactly what its slices give one by one."""
    whole = fn(a, b, quantize=quantize)
    one_by_one = np.stack([fn(a[i], b[i], quantize=quantize) for i in range(a.shape[0])])
    assert whole.shape == a.shape
    np.testing.assert_array_equal(whole, one_by_one)


def check_dtype_and_range(fn: Method, a: np.ndarray, b: np.ndarray, quantize: bool, *, float32_atol: float,
                          quantized_float32_atol: float | None = None, float32_black: bool = True) -> None:
    """Output dtype follows the input, values are finite on 0..1, quantised output sits on 1/255 levels,
    float32 tracks float64 within ``float32_atol`` (``quantized_float32_atol`` when quantising, if given),
    and the all-black third slice stays black (in float32 too unless ``float32_black`` is False)."""
    out64 = fn(a, b, quantize=quantize)
    out32 = fn(a.astype(np.float32), b.astype(np.float32), quantize=quantize)
    assert out64.dtype == np.float64 and out32.dtype == np.float32
    for out in (out64, out32):
        assert np.all(np.isfinite(out))
        assert out.min() >= 0.0 and out.max() <= 1.0
    if quantize:
        levels = out64 * 255.0
        np.testing.assert_allclose(levels, np.rint(levels), atol=1e-9)
        if quantized_float32_atol is not None:
            np.testing.assert_allclose(out32, out64, atol=quantized_float32_atol)
    else:
        np.testing.assert_allclose(out32, out64, atol=float32_atol)
    assert np.all(out64[2] == 0)
    if float32_black:
        assert np.all(out32[2] == 0)


def check_single_image_and_broadcast(fn: Method, a: np.ndarray, b: np.ndarray) -> None:
    """One slice in, one slice out; one "IR" image is shared by every slice of a stack, as VIFB does for gray IR."""
    single = fn(a[0], b[0])
    assert single.shape == a[0].shape
    np.testing.assert_array_equal(fn(a, b[0]), fn(a, np.broadcast_to(b[0], a.shape)))
