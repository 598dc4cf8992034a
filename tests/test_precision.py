"""The VGG stage's fast path (bf16 convolutions) changes no result a reader can see."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.dmf import DMFParams, dmf_blend, dmf_weights
from fusion.gradients import cpu_has_bf16, exposure_gradients, resolve_precision
from fusion.methods import get_method
from fusion_demo.samples import harvard_pairs, load_image


def test_auto_picks_bf16_only_where_the_cpu_has_it():
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_bf16() else "fp32")
    assert resolve_precision("auto", "cuda") == "fp32"  # GPU results must agree with the CPU's to 1e-4
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", "cpu")  # type: ignore[arg-type]  # the error path on purpose


def _pairs(subset: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Three pairs spread over the subset, grey 0..1; whole images where the CPU has bf16, else
    their central 128x128 (bf16 is emulated, ~7x slower, where it has not: the comparison is of
    two precisions on the same input, not of the picture)."""
    pairs = harvard_pairs(subset=subset)
    crop = (slice(None), slice(None)) if cpu_has_bf16() else (slice(64, 192), slice(64, 192))
    out = []
    for pair in (pairs[0], pairs[len(pairs) // 3], pairs[2 * len(pairs) // 3]):
        a = load_image(pair.mri)[crop].astype(np.float32) / 255
        other = load_image(pair.other)
        out.append((a, (other if other.ndim == 2 else other.mean(-1))[crop].astype(np.float32) / 255))
    return out


def _fused(a: np.ndarray, b: np.ndarray, precision: str, model) -> np.ndarray:
    a, b = a[None], b[None]
    ex = np.stack([get_method(m)(a, b) for m in ("cbf", "tif", "wls")])
    mag, phi = exposure_gradients(ex, "vgg", model=model, precision=precision)  # type: ignore[arg-type]  # a str from the parametrisation
    return np.round(np.clip(dmf_blend(ex, dmf_weights(ex, mag, phi, DMFParams())), 0, 1) * 255)[0]


@pytest.mark.parametrize("subset", ["MRI_CT", "MRI_PET", "MRI_SPECT"])
def test_bf16_features_move_the_8bit_fusion_by_at_most_two_grey_levels(vgg_weights, harvard_dir, subset):
    """Issue 15's bar for the fast path: at most 2 grey levels, mean <= 0.2, Q^AB/F within 0.003."""
    from fusion.features import load_vgg16
    from fusion.metrics import qabf

    model = load_vgg16(weights_path=str(vgg_weights))
    dq = []
    for a, b in _pairs(subset):
        ref, fast = _fused(a, b, "fp32", model), _fused(a, b, "bf16", model)
        diff = np.abs(ref - fast)
        assert diff.max() <= 2 and diff.mean() <= 0.2, (diff.max(), diff.mean())
        a8, b8 = np.round(a * 255), np.round(b * 255)
        dq.append(qabf(a8, b8, fast) - qabf(a8, b8, ref))
    assert abs(float(np.mean(dq))) <= 0.003, dq
