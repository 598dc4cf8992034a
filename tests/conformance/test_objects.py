"""Every kind of object the node writes is a valid instance of its IOD.

What the pipeline writes (dicom_node/workflow/stages.py -> dicom_node/dicom/sc.py, reg.py):

* a Secondary Capture Image series, one single-frame image per base slice:
  MONOCHROME2 when both inputs are anatomical (MR onto CT), RGB when PET/SPECT is
  colour-mapped into the fusion (PT onto CT, or MR onto a PT base);
* one Spatial Registration object in the base study.

The node writes no multi-frame objects.  Each kind is built for a CT base and a PT
base, in each character set the conformance statement names, written to disk as
the node stores it, and checked twice: ``dciodvfy`` (dicom3tools) reports no
errors (only the documented Standard Extended warnings of the SC geometry), and
pydicom-based checks of the IOD rules dciodvfy does not see in context: Type 1/2
presence, UIDs, file meta consistency, the Image Pixel Module's arithmetic, the
character set covering every value, and references that resolve to the sources.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import SC_GEOMETRY_WARNINGS, UID_PREFIX, dciodvfy, source_series, through_disk
from pydicom.charset import CODES_TO_ENCODINGS, python_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, SpatialRegistrationStorage

from dicom_node.dicom.derived import IMPLEMENTATION_CLASS_UID
from dicom_node.dicom.reg import build_registration
from dicom_node.dicom.sc import SC_MODALITY, build_sc_series

CHARSETS = {
    "latin1": ("ISO_IR 100", "Müller^Jörg", "Schädel nativ"),
    "utf8": ("ISO_IR 192", "Wang^XiaoDong=王^小東", "Κεφαλή 头部"),
    "jis": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "頭部ＣＴ検査"),
}


@dataclass(frozen=True)
class Kind:
    base: str
    overlay: str
    colour: bool


#: the combinations the pipeline produces (colour whenever PET takes part, pipeline.COLOUR_MODALITIES)
KINDS = {
    "ct-base-grey": Kind("CT", "MR", False),
    "ct-base-rgb": Kind("CT", "PT", True),
    "pt-base-rgb": Kind("PT", "MR", True),
}
SLICES = 3
ROWS, COLS = 20, 24

# -- IOD rules (PS3.3 A.8.1 Secondary Capture Image IOD, A.39 Spatial Registration IOD) --------

_PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "StudyID", "AccessionNumber")
SC_TYPE1 = (
    "SOPClassUID", "SOPInstanceUID",  # SOP Common
    "StudyInstanceUID",  # General Study
    "Modality", "SeriesInstanceUID",  # General Series
    "ConversionType",  # SC Equipment
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored",
    "HighBit", "PixelRepresentation", "PixelData",  # Image Pixel
)
SC_TYPE2 = (*_PATIENT_STUDY_TYPE2, "SeriesNumber", "InstanceNumber", "PatientOrientation")
REG_TYPE1 = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Modality", "SeriesInstanceUID",
    "FrameOfReferenceUID",  # Frame of Reference
    "Manufacturer", "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions",  # Enhanced General Equipment
    "InstanceNumber", "ContentLabel", "ContentDate", "ContentTime", "RegistrationSequence",  # Spatial Registration
)
REG_TYPE2 = (*_PATIENT_STUDY_TYPE2, "SeriesNumber", "PositionReferenceIndicator", "ContentDescription",
             "ContentCreatorName")

_TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "UC", "PN"}


@dataclass
class Written:
    """One case's objects on disk and the sources they were made from."""

    kind: Kind
    charset: object
    base: list[Dataset]
    overlay: list[Dataset]
    fused: np.ndarray
    sc_paths: list[Path]
    reg_path: Path


def _build(folder: Path, kind_name: str, charset_name: str) -> Written:
    kind = KINDS[kind_name]
    charset, name, description = CHARSETS[charset_name]
    study = pydicom.uid.generate_uid(UID_PREFIX)
    base = through_disk(source_series(kind.base, SLICES, rows=ROWS, cols=COLS, dz=3.0, study_uid=study,
                                      charset=charset, patient_name=name, study_description=description),
                        folder / "base")
    overlay = through_disk(source_series(kind.overlay, 5, rows=12, cols=12, dz=2.0, study_uid=study,
                                         charset=charset, patient_name=name, study_description=description,
                                         series_number=4), folder / "overlay")
    rng = np.random.default_rng(7)
    shape = (SLICES, ROWS, COLS, 3) if kind.colour else (SLICES, ROWS, COLS)
    fused = rng.integers(0, 256, shape, dtype=np.uint8)
    matrix = np.eye(4)
    matrix[:3, 3] = (1.5, -2.0, 0.5)
    sc = build_sc_series(base, overlay, fused, uid_root=UID_PREFIX, series_description="FUSED MR>CT DMF",
                         derivation_description="DMF fusion", base_to_overlay=matrix)
    reg = build_registration(base, overlay, matrix, uid_root=UID_PREFIX, content_label="RIGID_MI")
    sc_paths = []
    for i, ds in enumerate(sc):
        sc_paths.append(folder / f"sc{i}.dcm")
        ds.save_as(sc_paths[-1], enforce_file_format=True)
    reg.save_as(folder / "reg.dcm", enforce_file_format=True)
    return Written(kind, charset, base, overlay, fused, sc_paths, folder / "reg.dcm")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[tuple[str, str], Written]:
    root = tmp_path_factory.mktemp("objects")
    return {(k, c): _build(root / f"{k}-{c}", k, c) for k in KINDS for c in CHARSETS}


CASES = [(k, c) for k in KINDS for c in CHARSETS]
REG_CASES = [(k, c) for k, c in CASES if not KINDS[k].colour or k.startswith("pt")]  # one REG per base modality


# -- generic checks ----------------------------------------------------------------------------


def _walk(ds: Dataset):
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def check_file_meta(path: Path, sop_class: str) -> Dataset:
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", "no Part-10 preamble/prefix"
    ds = pydicom.dcmread(path)
    meta = ds.file_meta
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == sop_class
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.get("ImplementationVersionName")
    return ds


def check_types(ds: Dataset, type1: tuple[str, ...], type2: tuple[str, ...]) -> None:
    missing1 = [kw for kw in type1 if kw not in ds or ds[kw].value in (None, "", b"") or ds[kw].VM == 0]
    assert not missing1, f"Type 1 attributes absent or empty: {missing1}"
    missing2 = [kw for kw in type2 if kw not in ds]
    assert not missing2, f"Type 2 attributes absent: {missing2}"


def check_uids(ds: Dataset) -> None:
    for elem in _walk(ds):
        if elem.VR != "UI" or elem.value in (None, ""):
            continue
        values = elem.value if elem.VM > 1 else [elem.value]
        for v in values:
            assert UID(v).is_valid and len(v) <= 64, f"{elem.keyword} {v!r} is not a valid UID"


_ESCAPE = re.compile(rb"(\x1b[\x20-\x2f]+[\x30-\x7e])")


def _bytes_fit(raw: bytes, charset) -> str | None:
    """Why ``raw`` is not valid in ``charset`` (PS3.5 6.1), or None when it is.

    Checked on the bytes, independently of pydicom's decoder (which falls back to
    Latin-1 and so reads anything): the default repertoire is ASCII; a single
    set must decode strictly, without C1 controls; ISO 2022 values may only use
    the escape sequences of the declared terms, and a value that switched G0 to a
    multi-byte set switches back to ASCII (ESC ( B) before it ends.
    """
    terms = [str(t).strip() for t in ([charset] if isinstance(charset, str) else list(charset or []))]
    if not terms:
        return None if raw.isascii() and b"\x1b" not in raw else "non-ASCII bytes without Specific Character Set"
    codecs = {python_encoding[t] for t in terms}
    if len(terms) == 1 and not terms[0].startswith("ISO 2022"):
        try:
            text = raw.decode(python_encoding[terms[0]])
        except UnicodeDecodeError as exc:
            return str(exc)
        return "C1 control character" if any(0x80 <= ord(c) < 0xA0 for c in text) else None
    parts = _ESCAPE.split(raw)
    escapes = parts[1::2]
    for esc, segment in zip([b"\x1b(B", *escapes], parts[0::2]):
        codec = CODES_TO_ENCODINGS.get(esc)
        if codec not in codecs:
            return f"escape sequence {esc!r} of a set not declared in {terms}"
        try:
            if codec == "iso8859":
                segment.decode("ascii")
            elif codec.startswith("iso2022_jp"):
                (esc + segment).decode(codec)
            else:
                segment.decode(codec)
        except UnicodeDecodeError as exc:
            return f"{codec}: {exc}"
    if any(e.startswith(b"\x1b$") for e in escapes) and escapes[-1] != b"\x1b(B":
        return "value does not switch back to ASCII (ESC ( B) at its end"
    return None


def check_charset(ds: Dataset, charset=None) -> None:
    """Every text value's bytes are valid in the declared Specific Character Set (items inherit it)."""
    charset = ds.get("SpecificCharacterSet", charset)
    for tag in ds.keys():
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.VR in _TEXT_VRS and raw.value:
            why = _bytes_fit(bytes(raw.value), charset)
            assert why is None, f"{ds[tag].keyword} {bytes(raw.value)!r} in {charset!r}: {why}"
        elif ds[tag].VR == "SQ":
            for item in ds[tag].value:
                check_charset(item, charset)


def check_pixels(ds: Dataset) -> None:
    samples, photometric = int(ds.SamplesPerPixel), str(ds.PhotometricInterpretation)
    assert (photometric, samples) in {("MONOCHROME2", 1), ("MONOCHROME1", 1), ("RGB", 3)}, (photometric, samples)
    assert ("PlanarConfiguration" in ds) == (samples > 1), "Planar Configuration is Type 1C: colour only"
    if samples > 1:
        assert ds.PlanarConfiguration in (0, 1)
    bits, stored, high = int(ds.BitsAllocated), int(ds.BitsStored), int(ds.HighBit)
    assert stored <= bits and high == stored - 1 and bits % 8 == 0
    assert ds.PixelRepresentation in (0, 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = int(ds.Rows) * int(ds.Columns) * samples * bits // 8 * frames
    assert len(ds.PixelData) == expected + expected % 2, (len(ds.PixelData), expected)
    if photometric.startswith("MONOCHROME"):  # VOI LUT Module: centre and width come together
        assert ("WindowCenter" in ds) == ("WindowWidth" in ds)


# -- Secondary Capture ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind, charset", CASES)
def test_sc_series(written, kind, charset):
    w = written[kind, charset]
    series_uids, sop_uids = set(), set()
    by_uid = {h.SOPInstanceUID: h for h in (*w.base, *w.overlay)}
    for i, path in enumerate(w.sc_paths):
        ds = check_file_meta(path, SecondaryCaptureImageStorage)
        check_types(ds, SC_TYPE1, SC_TYPE2)
        check_uids(ds)
        check_charset(pydicom.dcmread(path))
        check_pixels(ds)
        assert ds.SpecificCharacterSet == w.charset
        assert ds.Modality == SC_MODALITY and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.ConversionType == "WSD" and ds.BurnedInAnnotation == "NO"
        assert ds.PhotometricInterpretation == ("RGB" if w.kind.colour else "MONOCHROME2")
        assert np.array_equal(ds.pixel_array, w.fused[i])
        assert ds.InstanceNumber == i + 1
        assert ds.StudyInstanceUID == w.base[0].StudyInstanceUID
        assert str(ds.PatientName) == str(w.base[0].PatientName) and ds.PatientID == w.base[0].PatientID
        # references resolve to the sources, with their SOP classes; the base slice comes first
        refs = ds.SourceImageSequence
        assert refs[0].ReferencedSOPInstanceUID == w.base[i].SOPInstanceUID
        for ref in refs:
            source = by_uid.get(ref.ReferencedSOPInstanceUID)
            assert source is not None, f"Source Image Sequence names an unknown instance {ref.ReferencedSOPInstanceUID}"
            assert ref.ReferencedSOPClassUID == source.SOPClassUID
            assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert len(refs) > 1, "the overlay slices that contributed are referenced too"
        series_uids.add(ds.SeriesInstanceUID)
        sop_uids.add(ds.SOPInstanceUID)
        if i == 0:
            dciodvfy(path, [SC_GEOMETRY_WARNINGS])
    assert len(series_uids) == 1
    assert series_uids.isdisjoint({w.base[0].SeriesInstanceUID, w.overlay[0].SeriesInstanceUID})
    assert len(sop_uids) == SLICES and sop_uids.isdisjoint(by_uid)


# -- Spatial Registration --------------------------------------------------------------------------


@pytest.mark.parametrize("kind, charset", REG_CASES)
def test_spatial_registration(written, kind, charset):
    w = written[kind, charset]
    ds = check_file_meta(w.reg_path, SpatialRegistrationStorage)
    check_types(ds, REG_TYPE1, REG_TYPE2)
    check_uids(ds)
    check_charset(pydicom.dcmread(w.reg_path))
    assert ds.SpecificCharacterSet == w.charset
    assert ds.Modality == "REG" and "PixelData" not in ds
    assert ds.FrameOfReferenceUID == w.base[0].FrameOfReferenceUID
    assert ds.StudyInstanceUID == w.base[0].StudyInstanceUID
    sources = {h.SOPInstanceUID: h for h in (*w.base, *w.overlay)}
    frames = []
    for item in ds.RegistrationSequence:
        frames.append(item.FrameOfReferenceUID)
        (mreg,) = item.MatrixRegistrationSequence
        assert "RegistrationTypeCodeSequence" in mreg  # Type 2
        (matrix,) = mreg.MatrixSequence
        assert len(matrix.FrameOfReferenceTransformationMatrix) == 16
        assert matrix.FrameOfReferenceTransformationMatrixType in ("RIGID", "RIGID_SCALE", "AFFINE")
        for ref in item.ReferencedImageSequence:
            source = sources[ref.ReferencedSOPInstanceUID]
            assert source.FrameOfReferenceUID == item.FrameOfReferenceUID
            assert ref.ReferencedSOPClassUID == source.SOPClassUID
    assert frames == [w.base[0].FrameOfReferenceUID, w.overlay[0].FrameOfReferenceUID]
    # Common Instance Reference: every series named exists and holds the instances listed under it
    series_of = {h.SOPInstanceUID: h.SeriesInstanceUID for h in sources.values()}
    listed = set()
    for series in ds.ReferencedSeriesSequence:
        for ref in series.ReferencedInstanceSequence:
            assert series_of[ref.ReferencedSOPInstanceUID] == series.SeriesInstanceUID
            listed.add(ref.ReferencedSOPInstanceUID)
    assert listed == set(sources)  # same study here: nothing under Studies Containing Other ...
    assert "StudiesContainingOtherReferencedInstancesSequence" not in ds
    assert dciodvfy(w.reg_path) == []


def test_every_case_was_built(written):
    """The matrix above is complete: 3 kinds x 3 character sets of SC, 2 base modalities x 3 of REG."""
    assert len(CASES) == 9 and len(REG_CASES) == 6
    assert {KINDS[k].base for k, _ in REG_CASES} == {"CT", "PT"}
    assert {c for _, c in REG_CASES} == set(CHARSETS)
