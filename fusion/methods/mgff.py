"""MGFF: multi-scale guided filter fusion.

D. P. Bavirisetti, G. Xiao, J. Zhao, R. Dhuli and G. Liu, "Multi-scale guided image and
video fusion: a fast and efficient approach", Circuits, Systems, and Signal Processing
38(12), 2019.  Ported number for number from VIFB's ``run_MGFF.m``,
``fuse_MGF_RGB.m``, ``guidedfilter_color.m`` and ``guidedfilter.m`` (VIFB snapshot 22b2ea9; docs/ports.md,
row MGFF), so that ``quantize=True`` reproduces VIFB's published outputs.
"""

from __future__ import annotations

from typing import Any

from fusion.backend import array_module
from fusion.methods import register
from fusion.methods._common import finish, guided_filter, prepare_pair

RADIUS = 9
EPS = 1e3  # on the 0..255 scale
LEVELS = 4


def _weights(s1: Any, s2: Any) -> tuple[Any, Any]:
    """``S1./(S1+S2)`` and ``S2./(S1+S2)``, with 0.5 each where both saliencies are 0.

    There ``S = |D| = 0`` for both details, so the weight does not change the sum (the
    detail terms are 0); MATLAB gets ``0/0 = NaN`` instead, which poisons the whole pixel
    and ``uint8`` then turns it black.  That happens exactly where both sources are flat
    zero (black background), where our result is 0 as well, but a flat non-zero area
    would turn black in MATLAB and keeps its value here.
    """
    xp = array_module(s1)
    den = s1 + s2
    flat = den == 0
    safe = xp.where(flat, 1.0, den)
    return xp.where(flat, 0.5, s1 / safe), xp.where(flat, 0.5, s2 / safe)


@register("mgff")
def mgff(a: Any, b: Any, *, quantize: bool = False) -> Any:
    """Fuse ``a`` (anatomical, VIFB "VI") and ``b`` (other modality, VIFB "IR") with MGFF.

    ``run_MGFF`` calls ``fuse_MGF_RGB(IR, VI)``: image 1 is ``b``, image 2 is ``a``.  Four
    levels of *cross* guided filtering (r = 9, eps = 1e3 on 0..255): image 1's next base is
    image 2's current base filtered with image 1's current base as the guide, and vice
    versa; details are the differences.  Details are weighted by their relative absolute
    value, the two final bases averaged.  ``guidedfilter_color`` filters each channel
    independently, so a stack of channels is exactly the reference's RGB path.  No
    internal uint8 steps (``im2uint8`` of the uint8 result is the identity); ``quantize``
    only rounds the result.
    """
    _, i1, i2 = prepare_pair(b, a)
    prev1, prev2 = i1, i2
    details = []
    for _ in range(LEVELS):
        base1 = guided_filter(prev1, prev2, RADIUS, EPS)
        base2 = guided_filter(prev2, prev1, RADIUS, EPS)
        details.append((prev1 - base1, prev2 - base2))
        prev1, prev2 = base1, base2
    fused_detail = None
    for d1, d2 in details:
        w1, w2 = _weights(abs(d1), abs(d2))
        level = d1 * w1 + d2 * w2
        fused_detail = level if fused_detail is None else fused_detail + level
    fused = 0.5 * (prev1 + prev2) + fused_detail
    return finish(fused.astype(i1.dtype, copy=False), quantize=quantize)
