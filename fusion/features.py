"""VGG16 convolutional features in torch, built by hand (no torchvision).

The layout of :attr:`VGG16Features.features` is torchvision's
``vgg16().features`` up to relu3_3 (indices 0..15), so torchvision's state dict
(``vgg16-397923af.pth``) truncated to ``features.0``..``features.14`` loads
with strict key matching.  Weights come from :mod:`fusion.weights` (ImageNet
VGG16, Simonyan & Zisserman 2015; see docs/vgg-weights.md).

Inputs are images on 0..1, grey ``(N, 1, H, W)`` (replicated to RGB) or RGB
``(N, 3, H, W)``; ImageNet normalisation is applied inside the model.  Taps are
post-ReLU activations: relu1_2 at full resolution, relu2_2 at 1/2, relu3_3 at 1/4.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from . import weights as _weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Index in torchvision's vgg16().features of the ReLU whose output is the tap.
TAPS: dict[str, int] = {
    "relu1_1": 1,
    "relu1_2": 3,
    "relu2_1": 6,
    "relu2_2": 8,
    "relu3_1": 11,
    "relu3_2": 13,
    "relu3_3": 15,
}
DEFAULT_LAYERS = ("relu1_2", "relu2_2")

# (out_channels or "M") in torchvision order, up to conv3_3.
_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256)


def _check_layers(layers: Iterable[str]) -> tuple[str, ...]:
    layers = tuple(layers)
    if not layers:
        raise ValueError("at least one VGG16 tap is needed")
    unknown = [name for name in layers if name not in TAPS]
    if unknown:
        raise ValueError(f"unknown VGG16 tap(s) {unknown}; known: {', '.join(TAPS)}")
    return layers


class VGG16Features(nn.Module):
    """VGG16 conv1_1..conv3_3 with ImageNet normalisation and named ReLU taps."""

    # buffers registered in __init__; declared so they read as tensors, not ``Tensor | Module``
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, layers: Sequence[str] = DEFAULT_LAYERS) -> None:
        super().__init__()
        self.layers = _check_layers(layers)
        modules: list[nn.Module] = []
        in_ch = 3
        for v in _CFG:
            if v == "M":
                modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                modules.append(nn.Conv2d(in_ch, int(v), kernel_size=3, padding=1))
                # Not inplace: a tapped ReLU output must stay intact while later layers run.
                modules.append(nn.ReLU(inplace=False))
                in_ch = int(v)
        self.features = nn.Sequential(*modules)
        # Non-persistent: the state dict holds exactly torchvision's features.N keys.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(N,1|3,H,W) on 0..1 -> ImageNet-normalised (N,3,H,W) in the model's dtype."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected (N,1,H,W) or (N,3,H,W) images, got shape {tuple(x.shape)}")
        x = x.to(device=self.mean.device, dtype=self.mean.dtype)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Return ``{tap: activations}`` for the requested taps (default: ``self.layers``).

        Stops after the deepest requested tap.
        """
        layers = self.layers if layers is None else _check_layers(layers)
        wanted = {TAPS[name]: name for name in layers}
        last = max(wanted)
        h = self.normalise(x)
        out: dict[str, torch.Tensor] = {}
        for idx, module in enumerate(self.features):
            h = module(h)
            if idx in wanted:
                out[wanted[idx]] = h
            if idx == last:
                break
        return {name: out[name] for name in layers}


@functools.lru_cache(maxsize=4)
def _state_dict(weights_path: str | None) -> dict[str, torch.Tensor]:
    return _weights.load_vgg16_state_dict(weights_path)


def load_vgg16(
    layers: Sequence[str] = DEFAULT_LAYERS,
    device: str | torch.device = "cpu",
    weights_path: str | None = None,
) -> VGG16Features:
    """A new :class:`VGG16Features` with the verified ImageNet weights, eval mode, frozen.

    The weights must already be provisioned (``fusion-node models fetch``); this
    never downloads.  The verified state dict is cached per process (per path).
    Raises :class:`fusion.weights.WeightsUnavailableError` when they are missing.
    """
    model = VGG16Features(layers)
    key = None if weights_path is None else str(weights_path)
    model.load_state_dict(_state_dict(key), strict=True)
    model.requires_grad_(False)
    model.eval()
    return model.to(device)


def extract_features(
    model: VGG16Features,
    images: torch.Tensor | np.ndarray,
    batch_size: int = 8,
    layers: Sequence[str] | None = None,
    out_device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Features of a stack of images, computed ``batch_size`` images at a time.

    ``images``: (N,H,W), (N,1,H,W) or (N,3,H,W) on 0..1 (a tensor or array).
    Returns ``{tap: (N, C, H_tap, W_tap)}`` on ``out_device`` (default: the
    model's device), float32.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"expected (N,H,W) or (N,C,H,W) images, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("no images given")
    layers = model.layers if layers is None else _check_layers(layers)
    device = model.mean.device
    out_device = device if out_device is None else torch.device(out_device)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch_size):
            feats = model(x[start : start + batch_size].to(device), layers)
            for name in layers:
                parts[name].append(feats[name].to(out_device))
        return {name: torch.cat(chunks, dim=0) for name, chunks in parts.items()}


__all__ = ["VGG16Features", "TAPS", "DEFAULT_LAYERS", "load_vgg16", "extract_features"]
