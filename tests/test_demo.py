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


def test_node_demo_on_generated_pair(tmp_path, monkeypatch, capsys, vgg_weights):
    """`make demo` itself: a node receives the generated CT+MR pair, fuses it, sends it on, writes its pictures."""
    monkeypatch.setenv("FUSION_SHARED_DIR", str(tmp_path / "no-shared-here"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "fused images and a REG object arrived" in printed
    received = list((out / "received").glob("*.dcm"))
    assert len(received) > 10
    for name in ("fused-series-preview.png", "fused-middle-slice.png"):
        assert Image.open(out / name).size[0] >= 128
    sheets = list((out / "node-data" / "qc").glob("job-*-registration.png"))
    assert len(sheets) == 1 and str(sheets[0]) in printed
