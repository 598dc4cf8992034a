"""Never a silent wrong side: header checks about left and right, and the mirror test's symmetry.

The mirror test's calibration on real cases (head PET/CT/SPECT, body) is in
docs/registration.md ("Mirror test", ``benchmarks/mirror_calibration.py``);
the accuracy suite (tests/test_registration_accuracy.py) refuses mirrored real
cases.  Here: the header rules one by one, the test's antisymmetry, and the
node's registration stage applying the policy to a header doubt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset


def _hdr(iop, position="HFS", **kw) -> Dataset:
    ds = Dataset()
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    if position:
        ds.PatientPosition = position
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


AXIAL = (1, 0, 0, 0, 1, 0)


@pytest.mark.parametrize("position, iop", [
    ("HFS", AXIAL), ("FFS", (-1, 0, 0, 0, 1, 0)), ("FFS", AXIAL), ("HFP", (-1, 0, 0, 0, -1, 0)), ("HFP", AXIAL),
    ("FFP", (1, 0, 0, 0, -1, 0)), ("HFDL", (-1, 0, 0, 0, -1, 0)),  # decubitus: not checked
    ("HFS", (0, 1, 0, 0, 0, -1)),  # sagittal: not checked
    ("HFS", (np.cos(0.2), np.sin(0.2), 0, -np.sin(0.2), np.cos(0.2), 0)),  # axial turned 11 deg in plane
    ("", (-1, 0, 0, 0, -1, 0)),  # no position recorded: nothing to compare with
])
def test_consistent_orientations_raise_no_doubt(position, iop):
    from dicom_node.dicom.orientation import orientation_doubts

    assert orientation_doubts([_hdr(iop, position)], "base") == []


@pytest.mark.parametrize("position, iop, words", [
    ("HFS", (-1, 0, 0, 0, 1, 0), "towards the patient's right"),  # a head first supine series read feet first
    ("HFS", (1, 0, 0, 0, -1, 0), "towards anterior"),
    ("FFS", (1, 0, 0, 0, -1, 0), "FFS"),
    ("HFP", (1, 0, 0, 0, -1, 0), "HFP"),
    ("HFS", (1, 0, 0, 0, 0.9, 0), "not two orthogonal unit vectors"),
    ("HFS", (1, 0, 0, 0.3, 0.954, 0), "not two orthogonal unit vectors"),
])
def test_inconsistent_orientations_are_doubted(position, iop, words):
    from dicom_node.dicom.orientation import orientation_doubts

    doubts = orientation_doubts([_hdr(AXIAL, position), _hdr(iop, position)] if "unit" in words
                                else [_hdr(iop, position)], "overlay")
    assert len(doubts) == 1 and words in doubts[0] and "overlay" in doubts[0], doubts


def test_laterality_of_the_two_series_must_agree():
    from dicom_node.dicom.orientation import header_doubts

    left, right = _hdr(AXIAL, Laterality="L"), _hdr(AXIAL, ImageLaterality="R")
    assert header_doubts([left], [left]) == []
    assert header_doubts([left], [_hdr(AXIAL, ImageLaterality="B")]) == []
    assert header_doubts([left], [_hdr(AXIAL)]) == []
    doubts = header_doubts([left], [right])
    assert len(doubts) == 1 and "laterality L" in doubts[0] and "R" in doubts[0]


def test_mirror_test_is_antisymmetric():
    """Swapping the overlay for its mirror negates the advantage: one margin serves correct and flipped cases."""
    from fusion.registration.mirror import mirror_test
    from fusion.registration.quality import SimilarityProbe

    rng = np.random.default_rng(3)
    k, j, i = np.meshgrid(*[np.arange(n) for n in (30, 40, 40)], indexing="ij")
    p = np.stack([i - 20, j - 20, k - 15], -1) * 3.0
    head = (np.sum((p / [50, 55, 40]) ** 2, -1) <= 1).astype(float)
    lesion = np.exp(-np.sum((p - [25, -10, 5]) ** 2, -1) / 80)  # off the midline: the anatomy is asymmetric
    fixed = sitk.GetImageFromArray((head + 2 * lesion + rng.normal(0, 0.02, head.shape)).astype(np.float32))
    moving = sitk.GetImageFromArray((1.5 * head - lesion + rng.normal(0, 0.02, head.shape)).astype(np.float32))
    for img in (fixed, moving):
        img.SetSpacing((3.0, 3.0, 3.0))
    probe = SimilarityProbe(fixed, moving)
    right = mirror_test(probe, seed=1, threads=1)
    wrong = mirror_test(probe.mirrored(), seed=1, threads=1)
    print(f"\ncorrect: {right.as_dict()}\nmirrored: {wrong.as_dict()}")
    assert right.advantage < -0.05 < 0.05 < wrong.advantage
    assert right.stored.ecc == wrong.mirrored.ecc and right.mirrored.gradient == wrong.stored.gradient


@pytest.fixture(scope="module")
def phantom_dirs(tmp_path_factory):
    from fusion_demo.samples import write_synthetic_pair

    return write_synthetic_pair(tmp_path_factory.mktemp("pair"))


def _marked(src: Path, dst: Path, **attrs) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        for k, v in attrs.items():
            setattr(ds, k, v)
        ds.save_as(dst / f.name, enforce_file_format=True)
        out.append(dst / f.name)
    return out


@pytest.mark.parametrize("policy", ["fail", "warn"])
def test_a_header_doubt_follows_the_registration_policy(phantom_dirs, tmp_path, policy):
    """CT marked left, MR of the "same" head marked right: refused (fail) or marked CHECK REG (warn), never silent."""
    from dicom_node.config import Pipeline
    from dicom_node.workflow import stages

    ct_dir, mr_dir = phantom_dirs
    pair = stages.load(_marked(ct_dir, tmp_path / "CT", ImageLaterality="L"),
                       _marked(mr_dir, tmp_path / "MR", ImageLaterality="R"))
    pipeline = Pipeline(name="t", base={"modality": ["CT"]}, overlay={"modality": ["MR"]},
                        registration={"on_poor_quality": policy, "quality": {"check_flip": False}})
    if policy == "fail":
        with pytest.raises(stages.JobError, match="laterality L and the overlay R") as err:
            stages.register(pair, pipeline, tmp_path / "qc", 1)
        assert err.value.result["registration_quality"]["header_doubts"]
    else:
        reg = stages.register(pair, pipeline, tmp_path / "qc", 1)
        assert reg.warning and reg.warning.startswith("ORIENTATION?")
        assert reg.quality["ok"] is False and reg.quality["header_doubts"]
