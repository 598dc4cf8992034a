"""The embedded default job (`make demo`) writes the pictures it promises."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dicom_node.cli import main


def test_demo_on_generated_phantom(tmp_path, monkeypatch, capsys, vgg_weights):
    monkeypatch.setenv("FUSION_SHARED_DIR", str(tmp_path / "no-shared-here"))
    out = tmp_path / "demo"
    assert main(["demo", "--pairs-only", "--out", str(out), "--device", "cpu"]) == 0
    fused = np.asarray(Image.open(out / "SYNTHETIC_phantom_fused.png"))
    assert fused.shape == (256, 256) and fused.dtype == np.uint8 and fused.max() > 200
    assert Image.open(out / "SYNTHETIC_phantom_montage.png").size[0] > 5 * 256
    printed = capsys.readouterr().out
    assert "vgg gradients" in printed and str(out.resolve()) in printed
