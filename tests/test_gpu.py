"""CPU (NumPy/SciPy) and GPU (CuPy) paths give the same numbers.

Skipped without a CUDA GPU and CuPy.  Inputs are float64 so the comparison
measures the kernels, not float32 rounding (FPDE's fourth-order steps amplify
float32 noise to ~5e-4); the VGG part runs in float32 on both, TF32 off.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

TOL = 1e-4  # on 0..1 images, the bar


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


def _pairs(harvard_dir, per_subset=4):
    from fusion_demo.samples import harvard_pairs, load_image

    out = {}
    for subset in ("MRI_CT", "MRI_PET", "MRI_SPECT"):
        pairs = harvard_pairs(harvard_dir.parent, subset)[:per_subset]
        out[subset] = (np.stack([load_image(p.mri) for p in pairs]), np.stack([load_image(p.other) for p in pairs]))
    return out


def test_kernels_agree(cp, rng):
    from fusion.filters import gaussian_gradient, window_mean, wrapped_angle_difference
    from fusion.pyramid import blend

    x = rng.random((3, 64, 80))
    for got, want in zip(gaussian_gradient(cp.asarray(x), 1.0), gaussian_gradient(x, 1.0)):
        np.testing.assert_allclose(got.get(), want, atol=1e-12)
    np.testing.assert_allclose(window_mean(cp.asarray(x), 9).get(), window_mean(x, 9), atol=1e-12)
    a, b = rng.uniform(-10, 10, (2, 1000))
    np.testing.assert_allclose(
        wrapped_angle_difference(cp.asarray(a), cp.asarray(b), math.pi).get(),
        wrapped_angle_difference(a, b, math.pi), atol=1e-12)
    w = rng.random((3, 2, 40, 52))
    w /= w.sum(0)
    imgs = rng.random((3, 2, 40, 52))
    np.testing.assert_allclose(blend(cp.asarray(imgs), cp.asarray(w)).get(), blend(imgs, w), atol=1e-12)


@pytest.mark.parametrize("name", ["adf", "cbf", "fpde"])
def test_methods_agree(cp, harvard_dir, name):
    from fusion.methods import get_method

    for subset, (mri, other) in _pairs(harvard_dir, 2).items():
        a = mri / 255.0
        b = (other if other.ndim == 3 else other.mean(-1)) / 255.0
        want = get_method(name)(a, b)
        got = get_method(name)(cp.asarray(a), cp.asarray(b)).get()
        assert np.abs(got - want).max() <= TOL, (subset, name)


@pytest.mark.parametrize("source", ["vgg", "image"])
def test_dmf_cpu_and_gpu_agree_on_harvard_pairs(cp, harvard_dir, vgg_weights, source):
    from fusion import fuse

    for subset, (mri, other) in _pairs(harvard_dir).items():
        a, b = mri / 255.0, other / 255.0  # float64
        cpu = fuse(a, b, device="cpu", feature_source=source)
        gpu = fuse(cp.asarray(a), cp.asarray(b), device="cuda", feature_source=source).get()
        diff = np.abs(cpu - gpu).max()
        assert diff <= TOL, f"{subset} {source}: max |CPU - GPU| = {diff:.2e}"
