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


def _fused(subset: str, precision: str, model) -> np.ndarray:
    # one pair, its central 128x128: bf16 is emulated (slow) on CPUs without it, and the
    # comparison is of two precisions on the same input, not of the picture
    pair = harvard_pairs(subset=subset)[0]
    crop = (slice(64, 192), slice(64, 192))
    a = (load_image(pair.mri)[crop].astype(np.float32) / 255)[None]
    other = load_image(pair.other)
    b = ((other if other.ndim == 2 else other.mean(-1))[crop].astype(np.float32) / 255)[None]
    ex = np.stack([get_method(m)(a, b) for m in ("cbf", "tif", "wls")])
    mag, phi = exposure_gradients(ex, "vgg", model=model, precision=precision)  # type: ignore[arg-type]  # a str from the parametrisation
    return np.round(np.clip(dmf_blend(ex, dmf_weights(ex, mag, phi, DMFParams())), 0, 1) * 255)


@pytest.mark.parametrize("subset", ["MRI_CT", "MRI_PET"])
def test_bf16_features_move_the_8bit_fusion_by_at_most_two_grey_levels(vgg_weights, harvard_dir, subset):
    from fusion.features import load_vgg16

    model = load_vgg16(weights_path=str(vgg_weights))
    ref, fast = _fused(subset, "fp32", model), _fused(subset, "bf16", model)
    diff = np.abs(ref - fast)
    assert diff.max() <= 2 and diff.mean() <= 0.2, (diff.max(), diff.mean())
