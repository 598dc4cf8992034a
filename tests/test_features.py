"""VGG16 feature extractor: layout, taps, grey/RGB, batching, and fixed values with the real weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from fusion import weights as W
from fusion.features import IMAGENET_MEAN, IMAGENET_STD, TAPS, VGG16Features, extract_features, load_vgg16

ALL3 = ("relu1_2", "relu2_2", "relu3_3")


@pytest.fixture(scope="module")
def random_model() -> VGG16Features:
    """Random weights: enough for layout, shapes and equivalences (never used for values)."""
    torch.manual_seed(0)
    return VGG16Features(ALL3).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def model(vgg_weights) -> VGG16Features:
    return load_vgg16(layers=ALL3, weights_path=str(vgg_weights))


def _fixed_image(n: int = 32) -> torch.Tensor:
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    img = 0.5 + 0.35 * np.sin(0.3 * i) * np.cos(0.2 * j + 0.1 * i) + 0.1 * (j - i) / 31
    return torch.from_numpy(img.astype(np.float32))[None, None]


def test_layout_matches_torchvision_vgg16_features():
    m = VGG16Features()
    f = m.features
    assert len(f) == 16 and TAPS["relu3_3"] == 15
    convs = {i: (f[i].in_channels, f[i].out_channels) for i in range(16) if isinstance(f[i], torch.nn.Conv2d)}
    assert convs == {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256), 14: (256, 256)}
    assert all(isinstance(f[i], torch.nn.MaxPool2d) for i in (4, 9))
    assert all(isinstance(f[i], torch.nn.ReLU) and not f[i].inplace for i in (1, 3, 6, 8, 11, 13, 15))
    for i, (_cin, _cout) in convs.items():
        assert f[i].kernel_size == (3, 3) and f[i].padding == (1, 1) and f[i].stride == (1, 1)
    # A torchvision state dict truncated to features.0..14 loads with strict key matching.
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == W.EXPECTED_SHAPES


@pytest.mark.parametrize("h,w", [(32, 32), (30, 22)])
def test_tap_shapes(random_model, h, w):
    out = random_model(torch.rand(2, 1, h, w))
    assert list(out) == list(ALL3)
    assert out["relu1_2"].shape == (2, 64, h, w)
    assert out["relu2_2"].shape == (2, 128, h // 2, w // 2)
    assert out["relu3_3"].shape == (2, 256, h // 4, w // 4)
    assert all(bool((v >= 0).all()) for v in out.values())


def test_stops_after_deepest_requested_tap(random_model):
    called = []
    handle = random_model.features[4].register_forward_hook(lambda *a: called.append(1))
    try:
        out = random_model(torch.rand(1, 1, 16, 16), layers=("relu1_2",))
    finally:
        handle.remove()
    assert list(out) == ["relu1_2"] and called == []


def test_unknown_tap_is_an_error():
    with pytest.raises(ValueError, match="unknown VGG16 tap"):
        VGG16Features(("relu5_3",))


def test_grey_equals_replicated_rgb(random_model):
    grey = torch.rand(3, 1, 24, 20, generator=torch.Generator().manual_seed(1))
    a = random_model(grey)
    b = random_model(grey.repeat(1, 3, 1, 1))
    for k in ALL3:
        assert torch.equal(a[k], b[k])


def test_normalisation_is_imagenet(random_model):
    x = torch.rand(1, 3, 4, 4)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(random_model.normalise(x), (x - mean) / std)


def test_batching_matches_one_big_batch(random_model):
    stack = torch.rand(7, 40, 36, generator=torch.Generator().manual_seed(2))
    whole = extract_features(random_model, stack, batch_size=7)
    for bs in (1, 3, 100):
        parts = extract_features(random_model, stack, batch_size=bs)
        for k in ALL3:
            assert parts[k].shape == whole[k].shape
            # CPU convolution may pick another algorithm per batch size: last-bit differences only.
            torch.testing.assert_close(parts[k], whole[k], rtol=1e-5, atol=1e-4)
    # (N,H,W), (N,1,H,W) and a NumPy array are the same input
    again = extract_features(random_model, stack.numpy()[:, None], batch_size=4)
    for k in ALL3:
        torch.testing.assert_close(again[k], whole[k], rtol=1e-5, atol=1e-4)
    assert not whole["relu1_2"].requires_grad


def test_extract_rejects_bad_input(random_model):
    with pytest.raises(ValueError):
        extract_features(random_model, torch.rand(4, 4))
    with pytest.raises(ValueError):
        extract_features(random_model, torch.rand(0, 8, 8))


# --------------------------------------------------------------------------- real weights

# Computed once from the verified weights (cache sha256 8819c9c9...) with torch 2.13 CPU.
# per tap: (mean, sum of squares, [(channel, y, x, value), ...])
_EXPECTED = {
    "relu1_2": (0.4694907582170913, 71891.33836678906, [(14, 5, 30, 11.579996109008789), (34, 28, 4, 3.5513362884521484)]),
    "relu2_2": (1.0170730944393824, 218267.1698114601, [(125, 11, 6, 22.34079933166504), (50, 7, 0, 11.324907302856445)]),
    "relu3_3": (1.3157464713440277, 271022.68187099806, [(14, 7, 7, 68.01425170898438), (153, 2, 5, 24.959823608398438)]),
}


@pytest.mark.weights
def test_fixed_input_feature_values(model):
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    feats = extract_features(model, _fixed_image())
    for tap, (mean, sumsq, points) in _EXPECTED.items():
        v = feats[tap]
        assert float(v.double().mean()) == pytest.approx(mean, rel=1e-4)
        assert float((v.double() ** 2).sum()) == pytest.approx(sumsq, rel=1e-4)
        for c, y, x, value in points:
            assert float(v[0, c, y, x]) == pytest.approx(value, rel=1e-4)


@pytest.mark.weights
def test_first_conv_is_a_correlation_with_the_stored_kernels(model):
    """conv1_1 equals scipy's correlate (zero padding) of the normalised image: kernels not flipped."""
    img = _fixed_image()
    with torch.inference_mode():
        x = model.normalise(img)
        conv = model.features[0](x)[0].double().numpy()
    xn = x[0].double().numpy()
    w = model.features[0].weight.double().numpy()
    b = model.features[0].bias.double().numpy()
    flipped_err = 0.0
    for o in range(w.shape[0]):
        ref = b[o] + sum(ndimage.correlate(xn[c], w[o, c], mode="constant", cval=0.0) for c in range(3))
        np.testing.assert_allclose(conv[o], ref, rtol=1e-4, atol=1e-4)
        flipped = b[o] + sum(ndimage.convolve(xn[c], w[o, c], mode="constant", cval=0.0) for c in range(3))
        flipped_err = max(flipped_err, float(np.abs(conv[o] - flipped).max()))
    assert flipped_err > 0.1  # the check can tell a flipped kernel apart


@pytest.mark.weights
def test_load_vgg16_defaults(vgg_weights):
    m = load_vgg16(weights_path=str(vgg_weights))
    assert m.layers == ("relu1_2", "relu2_2")
    out = extract_features(m, torch.rand(2, 16, 16))
    assert set(out) == {"relu1_2", "relu2_2"}
    m2 = load_vgg16(weights_path=str(vgg_weights))
    assert m2 is not m  # a fresh module each call; only the verified state dict is cached
    assert torch.equal(m2.features[0].weight, m.features[0].weight)
