"""What every object the node derives shares: equipment, the patient and study copied from the base,
references to the source images, the output character set, and the checks on the node's own text.

Science stays out of ``dicom_node.dicom`` and DICOM I/O stays out of ``fusion``: these
modules take numpy arrays and pydicom headers (read with ``stop_before_pixels``) and
return pydicom ``Dataset`` objects with complete file meta (Explicit VR Little Endian),
ready for ``ds.save_as(path, enforce_file_format=True)`` or a C-STORE.  They open no
files and no sockets.  The objects themselves: ``sc.py`` (the fused Secondary Capture
series) and ``reg.py`` (the Spatial Registration); both are checked with dciodvfy
(tests/test_derived.py, tests/conformance/test_objects.py).

Character sets (PS3.5 6.1; ``dicom_node.dicom.charset``; tests/test_charsets.py)
    * Patient and study text is copied as pydicom decoded it from the base, and the
      object is written in the base's Specific Character Set, verbatim (single-byte
      sets such as ISO_IR 100, UTF-8 ISO_IR 192, ISO 2022 code extensions such as
      ``["", "ISO 2022 IR 87"]``; pydicom re-encodes each PN component group with the
      escape sequences), so a PACS files the derived series under the same name bytes.
    * When that set cannot hold every text value the object carries (a base that
      sends non-ASCII without declaring a set, a set pydicom does not know, a
      configured institution name outside the base's repertoire), the object is
      written in ISO_IR 192 instead (``FALLBACK_CHARSET``): UTF-8 holds every value,
      where keeping the base's declaration would write bytes it does not cover.
    * Text the node adds itself (descriptions, labels) must fit the output set; the
      node's own texts are ASCII.

Codes (checked against pydicom's copy of PS3.16):
    * Derivation Code Sequence (CID 7203 "Image Derivation"): PS3.16 has no code for
      multimodal image fusion (CID 7203 lists resampling, MPR, MIP, pixel-by-pixel
      arithmetic, segmentation ...; the only SNOMED "Fusion", 129379006, means surgical
      fixation, CID 7310).  We write (113085, DCM, "Spatial resampling"), which is
      exact — the overlay was registered and resampled onto the base grid — and say
      what was fused, and how, in Derivation Description.  A local code (e.g. 99DFN
      "FUSION") would be allowed, CID 7203 being extensible, but readers ignore it
      and dciodvfy flags the unknown coding scheme; it is left out.
    * Purpose of Reference in Source Image Sequence (CID 7202):
      (121322, DCM, "Source image for image processing operation") for the base and
      the overlay slices alike.
    * Registration Type Code Sequence (CID 7100 "RCS Registration Method Type"):
      (125021, DCM, "Frame of Reference Identity") for the base item,
      (125024, DCM, "Image Content-based Alignment") for the mutual-information result.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass

import numpy as np
from highdicom.base_content import ContributingEquipment
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.coding import Code
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    generate_uid,
)

from dicom_node import __version__
from dicom_node.dicom import charset
from dicom_node.dicom import charset as charset_module

#: CID 7202 Source Image Purpose of Reference.
CODE_SOURCE_IMAGE_FOR_PROCESSING = Code("121322", "DCM", "Source image for image processing operation")
#: Identifies this software (deterministic, per version, under pydicom's UID root, which
#: is meant for exactly this: UIDs derived from entropy sources).
IMPLEMENTATION_CLASS_UID = generate_uid(
    prefix="1.2.826.0.1.3680043.8.498.", entropy_srcs=["dicom-fusion-node", __version__]
)
IMPLEMENTATION_VERSION_NAME = f"DFN_{__version__}"[:16]

#: Specific Character Set of a derived object whose base's set cannot hold every text value
#: the object carries (see the module docstring): UTF-8 holds them all.
FALLBACK_CHARSET = charset.FALLBACK

IS_MAX = 2**31 - 1
LO_MAX = 64
ST_MAX = 1024

# Patient, Patient Study and General Study attributes copied verbatim from the base.
# The Type 2 ones are written empty when the base lacks them.
COPIED_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
COPIED_OPTIONAL = (
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthTime",
    "OtherPatientIDsSequence",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)


@dataclass(frozen=True)
class Equipment:
    """Who made the object: General / Enhanced General / SC Equipment attributes.

    ``device_serial_number`` is Type 1 in the Enhanced General Equipment Module of
    the REG object; for software it identifies the installation (default: host name;
    the pipeline may pass the node's AE title).
    """

    manufacturer: str = "dicom-fusion-node"
    manufacturer_model_name: str = "dicom-fusion-node"
    software_versions: str = __version__
    device_serial_number: str | None = None
    institution_name: str | None = None

    def serial(self) -> str:
        return (self.device_serial_number or platform.node() or "unknown")[:LO_MAX]


DEFAULT_EQUIPMENT = Equipment()


def check_matrix(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=float)
    if m.shape != (4, 4):
        raise ValueError(f"matrix must be 4x4, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("matrix has non-finite values")
    if not np.allclose(m[3], (0, 0, 0, 1), atol=1e-9):
        raise ValueError(f"matrix last row must be [0, 0, 0, 1], got {m[3].tolist()}")
    if abs(np.linalg.det(m[:3, :3])) < 1e-9:
        raise ValueError("matrix is singular")
    return m


def unique_headers(headers: Sequence[Dataset]) -> list[Dataset]:
    seen, out = set(), []
    for h in headers:
        if h.SOPInstanceUID not in seen:
            seen.add(h.SOPInstanceUID)
            out.append(h)
    return out


def sop_ref(h: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = h.SOPClassUID
    item.ReferencedSOPInstanceUID = h.SOPInstanceUID
    return item


def source_item(h: Dataset) -> Dataset:
    item = sop_ref(h)
    item.PurposeOfReferenceCodeSequence = [code_item(CODE_SOURCE_IMAGE_FOR_PROCESSING)]
    return item


def code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def copy_patient_study(base: Dataset, ds: Dataset, charset: str | list[str] | None) -> None:
    """Patient / General Study / Patient Study attributes, verbatim (same study as the base).

    ``charset`` is the object's Specific Character Set (``output_charset``); the
    copied values are Unicode, so pydicom encodes them in it when the object is written.
    """
    ds.StudyInstanceUID = base.StudyInstanceUID
    if charset:
        ds.SpecificCharacterSet = deepcopy(charset)
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
    for kw in COPIED_TYPE2:
        if kw in base:
            ds[kw] = deepcopy(base[kw])
        else:
            setattr(ds, kw, None)
    for kw in COPIED_OPTIONAL:
        if kw in base:
            ds[kw] = deepcopy(base[kw])
        elif kw in ds:
            del ds[kw]


def copy_laterality(base: Dataset, ds: Dataset) -> None:
    """General Series Laterality (Type 2C) and Body Part Examined (Type 3) from the base.

    Laterality is required for paired body parts.  The base's value is copied; without
    one, Body Part Examined is copied so that readers (and dciodvfy) can tell an
    unpaired part; when neither is known, Laterality is written empty, which PS3.3
    allows for "unknown" (dciodvfy: a warning; an absent Laterality: an error).
    """
    if "Laterality" in base:
        ds.Laterality = deepcopy(base["Laterality"]).value
        return
    body_part = base.get("BodyPartExamined")
    if body_part:
        ds.BodyPartExamined = body_part
    else:
        ds.Laterality = ""


def contributing_equipment(base: Dataset, overlay: Dataset | None,
                           charset: str | list[str] | None) -> list[ContributingEquipment]:
    """The acquisition equipment of both source series (SOP Common, Type 3).

    Optional information: an item is left out when it cannot be built (no
    Manufacturer ...) or its text does not fit the base's character set (the overlay
    may come from another site with another Specific Character Set).
    """
    items = []
    for h in (base, overlay):
        if h is None:
            continue
        try:
            item = ContributingEquipment.for_image_acquisition(h)
        except Exception:  # noqa: BLE001 - optional information: whatever highdicom refuses is left out
            continue
        if all(charset_module.encodable(t, charset) for _, t in charset_module.text_elements(item)):
            items.append(item)
    return items


def default_series_number(base: Dataset, offset: int) -> int:
    try:
        number = int(base.get("SeriesNumber") or 0) + offset
    except (TypeError, ValueError):
        number = offset
    return max(1, min(number, IS_MAX))



#: copied from the base besides the patient/study attributes (REG: Position Reference Indicator, LO)
COPIED_OTHER = ("PositionReferenceIndicator",)


def output_charset(base: Dataset, eq: Equipment) -> str | list[str] | None:
    """The Specific Character Set of a derived object: the base's, else ``FALLBACK_CHARSET``.

    The base's set is kept whenever it represents every text value copied from the
    base and every equipment string (``dicom_node.dicom.charset``'s rule), so the
    derived series carries the patient's name as the source series did.
    """
    value = base.get("SpecificCharacterSet")
    copied = Dataset()
    for kw in (*COPIED_TYPE2, *COPIED_OPTIONAL, *COPIED_OTHER):
        if kw in base:
            copied[kw] = base[kw]
    texts = [*charset.text_elements(copied), ("Manufacturer", eq.manufacturer),
             ("ManufacturerModelName", eq.manufacturer_model_name), ("SoftwareVersions", eq.software_versions),
             ("DeviceSerialNumber", eq.serial()), ("InstitutionName", eq.institution_name or "")]
    if charset.represents(texts, value):
        return deepcopy(value) if value else None
    return FALLBACK_CHARSET


def check_text(value: str, name: str, max_len: int, charset: str | list[str] | None) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    if len(value) > max_len:
        raise ValueError(f"{name} is {len(value)} characters, at most {max_len} allowed")
    if not charset_module.encodable(value, charset):
        raise ValueError(f"{name} {value!r} cannot be encoded in the base's character set {charset!r}")


def check_lo(value: str, name: str, charset: str | list[str] | None) -> None:
    check_text(value, name, LO_MAX, charset)
    if "\\" in value or any(ord(ch) < 32 for ch in value):
        raise ValueError(f"{name} must not contain backslashes or control characters")
