"""Gradient and window kernels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusion.filters import (
    gaussian_derivative_kernels,
    gaussian_gradient,
    gradient_magnitude_orientation,
    structure_tensor_eig,
    window_mean,
    window_sum,
    wrapped_angle_difference,
)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.5])
def test_gradient_of_a_ramp_is_its_slope(sigma):
    y, x = np.mgrid[0:40, 0:50].astype(np.float64)
    angle = math.radians(30)
    ramp = 0.02 * (math.cos(angle) * x + math.sin(angle) * y)
    gx, gy = gaussian_gradient(ramp, sigma)
    inner = (slice(12, -12), slice(12, -12))
    np.testing.assert_allclose(gx[inner], 0.02 * math.cos(angle), rtol=1e-10)
    np.testing.assert_allclose(gy[inner], 0.02 * math.sin(angle), rtol=1e-10)
    mag, phi = gradient_magnitude_orientation(ramp, sigma)
    np.testing.assert_allclose(mag[inner], 0.02, rtol=1e-10)
    np.testing.assert_allclose(phi[inner], angle, rtol=1e-10)


def test_derivative_kernel_is_normalised():
    g, dg = gaussian_derivative_kernels(1.3)
    x = np.arange(len(g)) - len(g) // 2
    assert g.sum() == pytest.approx(1.0)
    assert np.sum(x * dg) == pytest.approx(1.0)
    assert np.sum(dg) == pytest.approx(0.0, abs=1e-15)


def test_stack_filters_each_slice_independently(rng):
    stack = rng.random((3, 30, 31))
    gx, gy = gaussian_gradient(stack, 1.0)
    for s in range(3):
        gxs, gys = gaussian_gradient(stack[s], 1.0)
        np.testing.assert_array_equal(gx[s], gxs)
        np.testing.assert_array_equal(gy[s], gys)
    wm = window_mean(stack, 2)
    np.testing.assert_allclose(wm[1], window_mean(stack[1], 2), atol=0)


def test_window_mean_and_sum():
    x = np.zeros((21, 21))
    x[10, 10] = 1.0
    np.testing.assert_allclose(window_sum(x, 3)[7:14, 7:14], 1.0)
    assert window_sum(x, 3)[6, 10] == pytest.approx(0.0)
    np.testing.assert_allclose(window_mean(np.full((5, 6), 0.3), 9), 0.3)  # window larger than image


@pytest.mark.parametrize(
    "a,b,period,expected",
    [
        (3.1, -3.1, 2 * math.pi, 2 * math.pi - 6.2),  # across the +-pi seam: close, not opposite
        (0.1, 0.1 + math.pi, math.pi, 0.0),  # axial: opposite directions are the same orientation
        (0.0, math.pi / 2, math.pi, math.pi / 2),  # the largest axial gap
        (-1.5, 1.5, math.pi, math.pi - 3.0),
        (0.3, 0.1, math.pi, 0.2),
        (10 * math.pi + 0.05, 0.0, math.pi, 0.05),  # many turns
    ],
)
def test_wrapped_angle_difference(a, b, period, expected):
    d = wrapped_angle_difference(np.array([a]), np.array([b]), period)
    assert d[0] == pytest.approx(expected, abs=1e-12)
    d2 = wrapped_angle_difference(np.array([b]), np.array([a]), period)
    assert d2[0] == pytest.approx(expected, abs=1e-12)


def test_structure_tensor_single_channel_matches_plain_gradient(rng):
    img = rng.random((25, 25))
    gx, gy = gaussian_gradient(img, 1.0)
    mag, ori = structure_tensor_eig(gx * gx, gx * gy, gy * gy)
    np.testing.assert_allclose(mag, np.hypot(gx, gy), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(wrapped_angle_difference(ori, np.arctan2(gy, gx), math.pi), 0, atol=1e-7)
