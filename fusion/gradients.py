"""Gradient magnitude and orientation of the exposures: from the image, or from VGG features.

DMF's visibility and consistency terms (eqs. 3-5) are built from a gradient.
The paper takes it on dense CNN feature maps (eq. 2); a feature map has many
channels, so its gradient is the Di Zenzo multi-channel gradient: the largest
eigenvalue and dominant direction of the channel-summed structure tensor.  The
plain image gradient is kept as the ``feature_source="image"`` ablation.

Orientations are axial (compared modulo pi) in both paths, so an edge keeps
its orientation whether it is dark-to-bright or bright-to-dark in a given
exposure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from fusion.backend import array_module, from_torch, to_torch, torch_device_for
from fusion.filters import gaussian_derivative_kernels, gradient_magnitude_orientation, structure_tensor_eig

FeatureSource = Literal["vgg", "image"]
Precision = Literal["auto", "fp32", "bf16"]
ORIENTATION_PERIOD = math.pi


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); Linux /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: Precision, device: str) -> Literal["fp32", "bf16"]:
    """The VGG convolutions' precision: bf16 where the CPU has it (``auto``), fp32 otherwise.

    On CUDA ``auto`` stays fp32 so that GPU and CPU reference results agree to 1e-4; bf16 on a
    CPU without native bf16 is emulated and slower than fp32, so ``auto`` never picks it there.
    """
    if precision == "auto":
        return "bf16" if device == "cpu" and cpu_has_bf16() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    return precision


def image_gradients(images: Any, sigma: float = 1.0) -> tuple[Any, Any]:
    """Magnitude and orientation of the plain Gaussian-derivative gradient."""
    return gradient_magnitude_orientation(images, sigma)


def feature_gradients(
    images: Any,
    model: Any,
    layers: Sequence[str] = ("relu1_2", "relu2_2"),
    sigma: float = 1.0,
    batch_size: int | None = None,
    precision: Precision = "auto",
) -> tuple[Any, Any]:
    """Di Zenzo gradient of VGG feature maps, at the images' resolution.

    ``images`` is ``(N, H, W)`` on 0..1 (NumPy or CuPy; the torch model must be
    on the matching device).  Each tapped layer contributes its structure tensor
    averaged over channels, deeper layers upsampled bilinearly to full size; the
    channel average keeps layers of different widths on one footing.  Batches
    bound memory: a 64-channel full-resolution tap is 64x the image.

    ``precision="bf16"`` runs the convolutions in bfloat16 autocast with channels-last
    tensors (about 4x the fp32 rate on a CPU with AVX512-BF16), and the feature maps'
    derivatives too, on the maps as the network left them: converting 64 full-resolution
    channels to float32 NCHW first cost more than the network itself, and the fp32
    depthwise convolutions 3x more than these (docs/speed-vgg.md).  The products are
    formed and averaged in float32, so the weights move by far less than one grey level
    (tests/test_precision.py).
    """
    import torch
    import torch.nn.functional as F

    xp = array_module(images)
    n, h, w = images.shape
    device = torch_device_for(xp)
    if batch_size is None:
        batch_size = 32 if device == "cuda" else 4
    g_np, dg_np = gaussian_derivative_kernels(float(sigma))
    radius = len(g_np) // 2
    g = torch.as_tensor(g_np, dtype=torch.float32, device=device)
    dg = torch.as_tensor(dg_np, dtype=torch.float32, device=device)

    def sep(x: Any, ky: Any, kx: Any) -> Any:
        # x: (B, C, h, w); correlate rows with ky, columns with kx, channel by channel
        # (depthwise convolution: ~8x faster on the CPU than folding channels into the batch)
        c = x.shape[1]
        x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
        x = F.conv2d(x, ky.to(x.dtype).view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        return F.conv2d(x, kx.to(x.dtype).view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)

    src = to_torch(xp.ascontiguousarray(images.astype(xp.float32, copy=False)))
    bf16 = resolve_precision(precision, str(device)) == "bf16"
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    tensors = []
    # TF32 convolutions would make GPU features differ from the CPU's by ~1e-3.
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for start in range(0, n, batch_size):
            batch = src[start : start + batch_size].to(device).unsqueeze(1)
            if bf16:
                with torch.autocast(device_type=str(device), dtype=torch.bfloat16):
                    taps = model(batch.contiguous(memory_format=torch.channels_last))
            else:
                taps = model(batch)
            acc = torch.zeros((batch.shape[0], 3, h, w), dtype=torch.float32, device=device)
            for name in layers:
                fmap = taps[name]
                fh, fw = fmap.shape[-2:]
                gx = sep(fmap, g, dg).float()
                gy = sep(fmap, dg, g).float()
                tensor = torch.stack(
                    [(gx * gx).mean(1), (gx * gy).mean(1), (gy * gy).mean(1)], dim=1
                )
                if (fh, fw) != (h, w):
                    # derivatives were taken on a coarser grid: rescale to full-resolution units
                    scale = fh / h
                    tensor = F.interpolate(tensor, size=(h, w), mode="bilinear", align_corners=False)
                    tensor = tensor * scale * scale
                acc += tensor
            tensors.append(acc)
    j = from_torch(torch.cat(tensors), xp)
    return structure_tensor_eig(j[:, 0], j[:, 1], j[:, 2])


def exposure_gradients(
    exposures: Any,
    source: FeatureSource,
    *,
    model: Any = None,
    layers: Sequence[str] = ("relu1_2", "relu2_2"),
    sigma: float = 1.0,
    precision: Precision = "auto",
) -> tuple[Any, Any]:
    """Gradients of ``(K, S, H, W)`` exposures, all K*S slices in one batch."""
    k, s, h, w = exposures.shape
    flat = exposures.reshape(k * s, h, w)
    if source == "image":
        mag, phi = image_gradients(flat, sigma)
    elif source == "vgg":
        if model is None:
            raise ValueError("feature_source='vgg' needs a VGG16 model (fusion.features.load_vgg16)")
        mag, phi = feature_gradients(flat, model, layers, sigma, precision=precision)
    else:
        raise ValueError(f"feature_source must be 'vgg' or 'image', got {source!r}")
    return mag.reshape(k, s, h, w), phi.reshape(k, s, h, w)
