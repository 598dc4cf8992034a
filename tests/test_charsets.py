"""Patient and study text in other character sets arrives intact in the objects the node writes.

Three Specific Character Sets a department meets: ISO_IR 100 (Latin-1, Western
Europe), ISO_IR 192 (UTF-8) and ISO 2022 code extensions with a multi-byte set
(Japanese, ``["", "ISO 2022 IR 87"]``: ASCII plus JIS X 0208 switched by escape
sequences, PS3.5 6.1.2.5 and Annex H).  The source headers are written to disk and
read back first, as the node reads its store; the derived SC and REG objects are
written, read back and compared value by value (Unicode, exactly) and byte by
byte where the set is the same, and ``dciodvfy`` checks that every value is valid
in the declared repertoire.  The last test sends the files over the network with
DCMTK's storescu and builds the derived objects from what the node stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import (
    SC_GEOMETRY_WARNINGS,
    UID_PREFIX,
    RunningSCP,
    dciodvfy,
    make_image,
    run_tool,
    source_series,
    through_disk,
    write,
)
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.config import NodeSettings, StorageConfig
from dicom_node.dicom.derived import FALLBACK_CHARSET, Equipment
from dicom_node.dicom.reg import build_registration
from dicom_node.dicom.sc import build_sc_series
from dicom_node.index.store import Store

SCP_AE = "FUSIONNODE"


@dataclass(frozen=True)
class Case:
    charset: str | list[str]
    patient_name: str
    study_description: str
    referring: str
    issuer: str  # Issuer of Patient ID, inside Other Patient IDs Sequence (sequence inheritance)
    #: the Patient's Name value field as it must be on disk
    name_bytes: bytes


CASES = {
    "latin1": Case("ISO_IR 100", "Müller^Jörg", "Schädel nativ ÄÖÜß", "Weiß^Anna", "Klinikum Süd",
                   "Müller^Jörg".encode("latin-1")),
    "utf8": Case("ISO_IR 192", "Wang^XiaoDong=王^小東", "Κεφαλή CT 头部 – Kopf", "Ελληνικά^Δοκιμή",
                 "醫院 Ιατρείο", "Wang^XiaoDong=王^小東".encode()),
    # PS3.5 H.3.1 example: alphabetic, ideographic and phonetic component groups, each group
    # starting in ASCII and every JIS X 0208 run closed by ESC ( B before a delimiter
    "jis": Case(["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "頭部ＣＴ　検査", "佐藤^花子",
                "東京病院",
                b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B"),
}

TEXT_KEYWORDS = ("PatientName", "StudyDescription", "ReferringPhysicianName")


def _pair(case: Case, folder: Path) -> tuple[list[Dataset], list[Dataset]]:
    """CT base and MR overlay of one study, as read back from disk."""
    study = generate_uid(UID_PREFIX)
    ct = source_series("CT", 3, charset=case.charset, patient_name=case.patient_name,
                       study_description=case.study_description, study_uid=study)
    mr = source_series("MR", 4, charset=case.charset, patient_name=case.patient_name,
                       study_description=case.study_description, study_uid=study, series_number=4)
    for h in (*ct, *mr):
        h.ReferringPhysicianName = case.referring
        other = Dataset()
        other.PatientID = "OTHER-1"
        other.IssuerOfPatientID = case.issuer
        other.TypeOfPatientID = "TEXT"
        h.OtherPatientIDsSequence = [other]
    return through_disk(ct, folder / "ct"), through_disk(mr, folder / "mr")


def _raw_value(path: Path, keyword: str) -> bytes:
    """The value field of a top-level element exactly as written (not decoded)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    raw = ds.get_item(keyword)
    return bytes(raw.value).rstrip(b" ")


def _assert_intact(ds: Dataset, case: Case) -> None:
    assert ds.SpecificCharacterSet == case.charset
    assert str(ds.PatientName) == case.patient_name
    assert ds.StudyDescription == case.study_description
    assert str(ds.ReferringPhysicianName) == case.referring
    assert ds.OtherPatientIDsSequence[0].IssuerOfPatientID == case.issuer


@pytest.mark.parametrize("name", list(CASES))
def test_sc_and_reg_keep_patient_and_study_text(name, tmp_path):
    case = CASES[name]
    ct, mr = _pair(case, tmp_path)
    fused = np.arange(3 * 16 * 16, dtype=np.uint32).reshape(3, 16, 16).astype(np.uint8)
    sc = build_sc_series(ct, mr, fused, uid_root=UID_PREFIX, series_description="FUSED MR>CT DMF",
                         derivation_description="DMF fusion of MR onto CT")
    reg = build_registration(ct, mr, np.eye(4), uid_root=UID_PREFIX, content_label="RIGID_MI")
    paths = [write(sc[0], tmp_path / "sc.dcm"), write(sc[2], tmp_path / "sc2.dcm"), write(reg, tmp_path / "reg.dcm")]
    source = next((tmp_path / "ct").glob("*.dcm"))
    for path in paths:
        ds = pydicom.dcmread(path)
        _assert_intact(ds, case)
        if name == "jis":
            assert ds.PatientName.alphabetic == "Yamada^Tarou"
            assert ds.PatientName.ideographic == "山田^太郎"
            assert ds.PatientName.phonetic == "やまだ^たろう"
        # the same set as the base: the very bytes the scanner sent, escape sequences included
        assert _raw_value(path, "PatientName") == case.name_bytes == _raw_value(source, "PatientName")
        assert _raw_value(path, "StudyDescription") == _raw_value(source, "StudyDescription")
        # the values the node adds itself are ASCII
        assert ds.SeriesDescription.isascii()
        dciodvfy(path, [SC_GEOMETRY_WARNINGS])


def test_jis_description_bytes_switch_back_to_ascii(tmp_path):
    """An ISO 2022 value ends in ASCII (ESC ( B), so the padding and the next value are read right."""
    ct, mr = _pair(CASES["jis"], tmp_path)
    reg = build_registration(ct, mr, np.eye(4), uid_root=UID_PREFIX, content_label="RIGID_MI")
    path = write(reg, tmp_path / "reg.dcm")
    raw = _raw_value(path, "StudyDescription")
    assert raw.startswith(b"\x1b$B") and raw.endswith(b"\x1b(B")
    assert raw.decode("iso2022_jp") == CASES["jis"].study_description


# pydicom warns about the misspelt term on reading; that is the situation under test
@pytest.mark.filterwarnings("ignore:Incorrect value for Specific Character Set", "ignore:Invalid value for VR CS")
@pytest.mark.parametrize("what", ["undeclared latin-1", "misspelt term", "institution outside the set"])
def test_set_that_cannot_hold_a_value_becomes_utf8(what, tmp_path):
    """A declaration that would not cover the bytes written is replaced by ISO_IR 192, values intact."""
    equipment = None
    if what == "undeclared latin-1":
        # scanners that send Latin-1 without Specific Character Set: pydicom reads Latin-1
        ct = source_series("CT", 2, charset=None, patient_name="Müller^Jörg")
    elif what == "misspelt term":
        ct = source_series("CT", 2, charset="ISO_IR 100", patient_name="Müller^Jörg")
        for h in ct:
            h.SpecificCharacterSet = "ISO-IR 100"  # pydicom decodes it as ISO_IR 100 with a warning
    else:
        ct = source_series("CT", 2, charset=None, patient_name="Doe^Jane")
        equipment = Equipment(institution_name="Klinikum Nürnberg")
    ct = through_disk(ct, tmp_path / "ct")
    expected = str(ct[0].PatientName)
    assert expected == ("Doe^Jane" if equipment else "Müller^Jörg")
    sc = build_sc_series(ct, [], np.zeros((2, 16, 16), np.uint8), uid_root=UID_PREFIX, series_description="F",
                         derivation_description="D", overlay_index=[[], []], equipment=equipment)
    reg = build_registration(ct, ct, np.eye(4), uid_root=UID_PREFIX, content_label="X", equipment=equipment)
    for ds, fname in ((sc[0], "sc.dcm"), (reg, "reg.dcm")):
        back = pydicom.dcmread(write(ds, tmp_path / fname))
        assert back.SpecificCharacterSet == FALLBACK_CHARSET == "ISO_IR 192"
        assert str(back.PatientName) == expected
        if equipment is not None:
            assert back.InstitutionName == "Klinikum Nürnberg"
        dciodvfy(tmp_path / fname, [SC_GEOMETRY_WARNINGS])


def test_contributing_equipment_outside_the_base_set_is_left_out(tmp_path):
    """The base's set wins over optional text: an overlay from a Latin-1 site under a Japanese base."""
    ct, _ = _pair(CASES["jis"], tmp_path)
    mr = through_disk(source_series("MR", 2, charset="ISO_IR 100", manufacturer="Müller Medizintechnik"),
                      tmp_path / "mr-latin1")
    ds = build_sc_series(ct, mr, np.zeros((3, 16, 16), np.uint8), uid_root=UID_PREFIX, series_description="F",
                         derivation_description="D", overlay_index=[[], [], []])[0]
    back = pydicom.dcmread(write(ds, tmp_path / "sc.dcm"))
    assert back.SpecificCharacterSet == CASES["jis"].charset
    manufacturers = {e.Manufacturer for e in back.ContributingEquipmentSequence}
    assert "ACME" in manufacturers and "Müller Medizintechnik" not in manufacturers
    dciodvfy(tmp_path / "sc.dcm", [SC_GEOMETRY_WARNINGS])
    # under a UTF-8 base the same overlay's equipment is kept
    ct8, _ = _pair(CASES["utf8"], tmp_path / "u8")
    ds8 = build_sc_series(ct8, mr, np.zeros((3, 16, 16), np.uint8), uid_root=UID_PREFIX, series_description="F",
                          derivation_description="D", overlay_index=[[], [], []])[0]
    assert {"ACME", "Müller Medizintechnik"} <= {e.Manufacturer for e in ds8.ContributingEquipmentSequence}


def test_received_over_dicom_then_derived(tmp_path):
    """storescu (DCMTK) -> the node's store index keeps the Unicode values -> derived objects intact."""
    cfg = NodeSettings(storage=StorageConfig(root=tmp_path / "data"))
    cfg = cfg.model_copy(update={"node": cfg.node.model_copy(update={
        "ae_title": SCP_AE, "host": "127.0.0.1", "port": 0, "network_timeout_s": 10.0})})
    store = Store(cfg.storage.root, cfg.storage.database_path)
    sent = {}
    for name, case in CASES.items():
        ds = make_image(SpecificCharacterSet=case.charset, PatientName=case.patient_name,
                        StudyDescription=case.study_description, ReferringPhysicianName=case.referring,
                        Modality="CT", BodyPartExamined="HEAD", ImagePositionPatient=["0", "0", "0"],
                        ImageOrientationPatient=["1", "0", "0", "0", "1", "0"], PixelSpacing=["1", "1"])
        sent[name] = (write(ds, tmp_path / "send" / f"{name}.dcm"), ds)
    with RunningSCP(cfg, store) as server:
        proc = run_tool("storescu", "-aet", "CHARSETSCU", "-aec", SCP_AE, "127.0.0.1", str(server.port),
                        *(p for p, _ in sent.values()), timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    for name, (_path, ds) in sent.items():
        case = CASES[name]
        rec = store.get_series(ds.SeriesInstanceUID)
        assert rec is not None, name
        assert rec.patient_name == case.patient_name
        assert rec.study_description == case.study_description
        assert rec.referring_physician_name == case.referring
        expected_set = case.charset if isinstance(case.charset, str) else "\\".join(case.charset)
        assert rec.specific_character_set == expected_set
        (inst,) = store.instances(ds.SeriesInstanceUID)
        assert _raw_value(inst.path, "PatientName") == case.name_bytes  # stored as sent
        header = pydicom.dcmread(inst.path, stop_before_pixels=True)
        sc = build_sc_series([header], [header], np.zeros((1, 16, 16), np.uint8), uid_root=UID_PREFIX,
                             series_description="F", derivation_description="D", overlay_index=[[0]])[0]
        back = pydicom.dcmread(write(sc, tmp_path / f"sc-{name}.dcm"))
        assert back.SpecificCharacterSet == case.charset
        assert str(back.PatientName) == case.patient_name and back.StudyDescription == case.study_description
        assert _raw_value(tmp_path / f"sc-{name}.dcm", "PatientName") == case.name_bytes
        dciodvfy(tmp_path / f"sc-{name}.dcm", [SC_GEOMETRY_WARNINGS])
