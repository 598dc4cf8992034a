"""DMF weights (eqs. 3-8), the background/saturation trap, and the pyramid blend."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusion.dmf import (
    DMFParams,
    consistency,
    dmf_blend,
    dmf_weights,
    exposure_mask,
    normalise,
)
from fusion.pyramid import blend, default_levels, downsample, laplacian_pyramid, reconstruct, upsample


def test_weights_hand_computed_three_exposures():
    # One slice, two pixels, window l=0 so eq. 4 is pointwise.
    #            pixel 0  pixel 1
    I = np.array([[[[0.50, 0.95]]],   # exposure 0 (pixel 1 over-exposed: outside (0.1, 0.9))
                  [[[0.40, 0.50]]],   # exposure 1
                  [[[0.30, 0.60]]]])  # exposure 2
    M = np.array([[[[1.0, 2.0]]], [[[2.0, 2.0]]], [[[1.0, 4.0]]]])
    phi = np.array([[[[0.0, 0.0]]], [[[0.2, math.pi]]], [[[0.0, -0.4]]]])
    p = DMFParams(window=0, sigma_s=0.2, tau=0.9)
    W = dmf_weights(I, M, phi, p)

    g = math.exp(-(0.2**2) / (2 * 0.2**2))  # exp(-1/2), gap 0.2 rad
    h = math.exp(-(0.4**2) / (2 * 0.2**2))  # exp(-2), gap 0.4 rad
    # pixel 0: VA = (1,2,1)/4; gaps d01=0.2, d02=0, d12=0.2; SC = (g+1, 2g, g+1); all exposed
    va = np.array([1, 2, 1]) / 4
    sc = np.array([g + 1, 2 * g, g + 1])
    ca = sc / sc.sum()
    w0 = va * ca / (va * ca).sum()
    # pixel 1: VA = (2,2,4)/8; pi wraps onto 0 (axial), so d01=0, d02=0.4, d12=0.4;
    # exposure 0 masked out: CA = (0, SC1, SC2)/(SC1+SC2)
    va1 = np.array([2, 2, 4]) / 8
    sc1 = np.array([1 + h, 1 + h, 2 * h]) * np.array([0, 1, 1])
    ca1 = sc1 / sc1.sum()
    w1 = va1 * ca1 / (va1 * ca1).sum()
    np.testing.assert_allclose(W[:, 0, 0, 0], w0, rtol=1e-12)
    np.testing.assert_allclose(W[:, 0, 0, 1], w1, rtol=1e-12)
    assert W[0, 0, 0, 1] == 0.0


def test_weights_sum_to_one_everywhere(rng):
    K, S, H, Wd = 3, 2, 24, 20
    I = rng.random((K, S, H, Wd))
    I[:, :, :5] = 0.0  # black background in every exposure
    I[:, :, -4:] = 1.0  # saturated in every exposure
    M = rng.random((K, S, H, Wd)) * (rng.random((K, S, H, Wd)) > 0.3)
    M[:, :, :3] = 0.0  # flat: no gradient anywhere
    phi = rng.uniform(-math.pi, math.pi, (K, S, H, Wd))
    W = dmf_weights(I, M, phi, DMFParams(window=2))
    assert np.all(np.isfinite(W)) and W.min() >= 0
    np.testing.assert_allclose(W.sum(axis=0), 1.0, atol=1e-12)


def _naive_weights(I, M, phi, p: DMFParams):
    """The paper's formulas with eps only in the denominators."""
    eps = 1e-12
    va = M / (M.sum(0) + eps)
    ca_num = consistency(phi, p.window, p.sigma_s) * exposure_mask(I, p.tau)
    ca = ca_num / (ca_num.sum(0) + eps)
    return va * ca / ((va * ca).sum(0) + eps)


def test_background_and_saturation_do_not_fade():
    # Three exposures of a slice with a saturated "bone" block (1.0 in all) beside
    # textured, well-exposed tissue, on a black background.
    H = W = 64
    y, x = np.mgrid[0:H, 0:W]
    tissue = 0.5 + 0.2 * np.sin(x / 3.0) * np.cos(y / 4.0)
    base = np.zeros((H, W))
    base[8:56, 8:40] = tissue[8:56, 8:40]
    base[16:48, 40:56] = 1.0  # bone: saturated everywhere
    I = np.stack([base, np.clip(base * 1.05, 0, 1), np.clip(base * 0.97 + 0.01 * (base > 0), 0, 1)])[:, None]
    from fusion.gradients import image_gradients

    M, phi = image_gradients(I.reshape(3, H, W))
    M, phi = M.reshape(I.shape), phi.reshape(I.shape)
    p = DMFParams()
    bone = (slice(None), 0, slice(20, 44), slice(44, 52))

    naive = dmf_blend(I, _naive_weights(I, M, phi, p), p)
    ours = dmf_blend(I, dmf_weights(I, M, phi, p), p)
    # the naive formula loses the bone (weights 0 there), ours keeps it
    assert naive[bone[1:]].mean() < 0.5
    assert ours[bone[1:]].mean() > 0.97
    # background stays black, tissue stays close to the exposures
    assert ours[0, :4, :4].max() < 1e-3  # pyramid blending leaks ~1e-5 from neighbours, far below one grey level
    np.testing.assert_allclose(ours[0, 20:44, 12:36], I[:, 0, 20:44, 12:36].mean(0), atol=0.05)


def test_normalise_falls_back_to_uniform():
    x = np.array([[0.0, 1.0], [0.0, 3.0]])
    np.testing.assert_allclose(normalise(x, 1e-12), [[0.5, 0.25], [0.5, 0.75]])


def test_consistency_sums_over_other_exposures():
    phi = np.zeros((3, 1, 5, 5))
    sc = consistency(phi, window=1, sigma_s=0.2)
    np.testing.assert_allclose(sc, 2.0)  # identical orientations: exp(0) from each of the 2 others


@pytest.mark.parametrize("shape", [(256, 256), (3, 255, 190), (2, 17, 33), (1, 9, 64)])
def test_laplacian_pyramid_reconstructs_exactly(rng, shape):
    x = rng.random(shape)
    pyr = laplacian_pyramid(x, default_levels(*shape[-2:]))
    np.testing.assert_allclose(reconstruct(pyr), x, atol=1e-12)


def test_blend_with_constant_weights_reproduces_input(rng):
    img = rng.random((2, 40, 52))
    same = np.stack([img, img, img])
    np.testing.assert_allclose(blend(same, np.full(same.shape, 1 / 3)), img, atol=1e-12)
    others = np.stack([img, rng.random(img.shape), rng.random(img.shape)])
    one_hot = np.zeros(others.shape)
    one_hot[0] = 1.0
    np.testing.assert_allclose(blend(others, one_hot), img, atol=1e-12)


def test_pyramid_levels_match_reference_sizes():
    assert default_levels(256, 256) == 8
    x = np.ones((7, 11))
    d = downsample(x)
    assert d.shape == (4, 6)
    # upsample restores the finer size for both parities
    assert upsample(d, (2 * 4 - 7, 2 * 6 - 11)).shape == (7, 11)
    # a constant image stays constant through reduce/expand away from zero-padded borders
    np.testing.assert_allclose(d, 1.0)
