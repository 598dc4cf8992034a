"""docs/conformance-statement.md and the code say the same thing.

Each table of the statement introduced by ``<!-- table: NAME -->`` is compared
with what the code declares or does: the SCP's SOP classes, transfer syntaxes
and statuses (``scp``, ``qr``), the rejections of ``access``, the configuration
defaults, the association parameters of the AE the node builds, what the outbox
really proposes to a peer (a real pynetdicom SCP records it), and the attributes
of the objects ``derived`` writes.  Both directions fail: a constant missing
from the statement, and a row the code does not back.
"""

from __future__ import annotations

import re
import ssl
import threading
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dicom_helpers import UID_PREFIX, free_port, source_series
from pydantic import BaseModel
from pydicom import dcmread
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_description, dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, evt
from pynetdicom.status import code_to_category

from dicom_node.config import (
    DestinationTLS,
    DicomDestination,
    NodeConfig,
    NodeSettings,
    OutboxConfig,
    QueryRetrieveConfig,
    StorageConfig,
)
from dicom_node.dicom import derived
from dicom_node.dicom import reg as reg_module
from dicom_node.dicom import sc as sc_module
from dicom_node.index import matching as query
from dicom_node.index.store import Store
from dicom_node.net import access, listener, statuses, storage_scp, tls
from dicom_node.net import query_retrieve as qr
from dicom_node.outbox import Outbox
from dicom_node.outbox import queue as outbox

STATEMENT = Path(__file__).resolve().parents[2] / "docs" / "conformance-statement.md"
_MARKER = re.compile(r"^<!-- table: ([a-z0-9-]+) -->\s*$")

#: every machine-checked table, each compared by a test below
CHECKED_TABLES = {
    "verification-scp-sop-classes", "verification-scp-transfer-syntaxes",
    "storage-scp-sop-classes", "storage-scp-transfer-syntaxes", "storage-scp-status",
    "storage-scu-sop-classes", "storage-scu-transfer-syntaxes", "storage-scu-status",
    "find-scp-sop-classes", "get-scp-sop-classes", "move-scp-sop-classes", "qr-scp-transfer-syntaxes",
    "qr-scp-status", "find-keys",
    "association-parameters", "association-rejections", "ae-mapping", "config-defaults",
    "character-sets", "tls-parameters", "sc-attributes", "reg-attributes",
}


def _cells(line: str) -> list[str]:
    return [c.strip().replace("`", "") for c in line.strip().strip("|").split("|")]


def _parse(text: str) -> dict[str, list[dict[str, str]]]:
    """``{name: [row as {header: cell}]}`` for every marked Markdown table."""
    tables: dict[str, list[dict[str, str]]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _MARKER.match(line)
        if not m:
            continue
        name = m.group(1)
        assert name not in tables, f"table {name!r} is marked twice"
        block = []
        for ln in lines[i + 1:]:
            if not ln.startswith("|"):
                break
            block.append(ln)
        assert len(block) >= 3, f"table {name!r}: a header, a separator and at least one row expected"
        header = _cells(block[0])
        rows = [dict(zip(header, _cells(ln), strict=True)) for ln in block[2:]]
        tables[name] = rows
    return tables


@pytest.fixture(scope="module")
def tables() -> dict[str, list[dict[str, str]]]:
    return _parse(STATEMENT.read_text(encoding="utf-8"))


def _column(rows: list[dict[str, str]], index: int) -> list[str]:
    return [list(r.values())[index] for r in rows]


def _uid_table(tables, name: str) -> list[str]:
    """The UID column of a SOP class / transfer syntax table; the name column must be the UID's name."""
    rows = tables[name]
    for r in rows:
        label, uid = list(r.values())[:2]
        assert UID(uid).is_valid, f"{name}: {uid!r} is not a UID"
        assert label == UID(uid).name, f"{name}: {uid} is {UID(uid).name!r}, the statement says {label!r}"
    return _column(rows, 1)


def _codes(rows: list[dict[str, str]], column: str) -> list[int]:
    return [int(c, 16) for r in rows for c in re.findall(r"0x[0-9A-Fa-f]{4}", r[column])]


#: PS3.4 status classes as the statement names them, by pynetdicom's category of the code
_CLASS_NAMES = {"Success": ("Success",), "Warning": ("Warning",), "Pending": ("Pending",), "Cancel": ("Cancel",),
                "Failure": ("Error", "Refused", "Failed")}


def _check_status_classes(rows: list[dict[str, str]]) -> None:
    for r in rows:
        assert r["Service Status"].startswith(_CLASS_NAMES[code_to_category(int(r["Code"], 16))]), r


def test_every_marked_table_is_checked(tables):
    assert set(tables) == CHECKED_TABLES


# -- SOP classes and transfer syntaxes ------------------------------------------------------------


def test_verification_scp(tables):
    assert _uid_table(tables, "verification-scp-sop-classes") == ["1.2.840.10008.1.1"]
    assert _uid_table(tables, "verification-scp-transfer-syntaxes") == list(listener.VERIFICATION_TRANSFER_SYNTAXES)


def test_storage_scp_sop_classes(tables):
    listed = _uid_table(tables, "storage-scp-sop-classes")
    assert len(listed) == len(set(listed))
    assert set(listed) == set(storage_scp.STORAGE_SOP_CLASSES)


def test_storage_scp_transfer_syntaxes_in_order_of_preference(tables):
    assert _uid_table(tables, "storage-scp-transfer-syntaxes") == list(storage_scp.STORAGE_TRANSFER_SYNTAXES)


def test_storage_scp_statuses(tables):
    listed = _codes(tables["storage-scp-status"], "Code")
    assert sorted(listed) == sorted(statuses.STORAGE_SCP)
    _check_status_classes(tables["storage-scp-status"])


def test_qr_scp_sop_classes_and_syntaxes(tables):
    assert set(_uid_table(tables, "find-scp-sop-classes")) == set(qr.FIND_SOP_CLASSES)
    assert set(_uid_table(tables, "get-scp-sop-classes")) == set(qr.GET_SOP_CLASSES)
    assert set(_uid_table(tables, "move-scp-sop-classes")) == set(qr.MOVE_SOP_CLASSES)
    assert _uid_table(tables, "qr-scp-transfer-syntaxes") == list(qr.QR_TRANSFER_SYNTAXES)


def test_qr_scp_statuses(tables):
    listed = _codes(tables["qr-scp-status"], "Code")
    assert len(listed) == len(set(listed))
    assert set(listed) == set(statuses.QUERY_RETRIEVE_SCP)
    _check_status_classes(tables["qr-scp-status"])


def test_find_keys_per_level(tables):
    """Each level's rows are exactly the keys query.py matches and returns at that level."""
    rows = tables["find-keys"]
    levels = query.MODEL_LEVELS["PATIENT"]
    assert {r["Level"] for r in rows} == set(levels)
    for i, level in enumerate(levels):
        own = [k for k in query.supported_keys(level) if i == 0 or k not in query.supported_keys(levels[i - 1])]
        listed = []
        for r in (r for r in rows if r["Level"] == level):
            tag = int(r["Tag"].strip("()").replace(",", ""), 16)
            assert dictionary_description(tag) == r["Attribute Name"], r
            listed.append(keyword_for_tag(tag))
        assert sorted(listed) == sorted(own), level
    assert query.MODEL_LEVELS["STUDY"] == levels[1:]


# -- the outbox as SCU: what it proposes and how it treats statuses ------------------------------------


def _built_objects(folder: Path) -> list[Path]:
    """One SC image and one REG object, as the pipeline writes them."""
    study = generate_uid(UID_PREFIX)
    ct = source_series("CT", 2, study_uid=study)
    mr = source_series("MR", 2, study_uid=study)
    sc = sc_module.build_sc_series(ct, mr, np.zeros((2, 16, 16), np.uint8), uid_root=UID_PREFIX,
                                 series_description="F", derivation_description="D")[0]
    reg = reg_module.build_registration(ct, mr, np.eye(4), uid_root=UID_PREFIX, content_label="RIGID_MI")
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "sc.dcm", folder / "reg.dcm"]
    sc.save_as(paths[0], enforce_file_format=True)
    reg.save_as(paths[1], enforce_file_format=True)
    return paths


class _RecordingSCP:
    """A pynetdicom Storage SCP that records the requested presentation contexts and answers ``status``."""

    def __init__(self, sop_classes: list[str]) -> None:
        self.status = 0x0000
        self.requested: list[tuple[str, list[str]]] = []
        self.port = free_port()
        ae = AE(ae_title="PACS")
        for sop in sop_classes:
            ae.add_supported_context(sop, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self._lock = threading.Lock()
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_STORE, lambda event: self.status)])

    def _on_requested(self, event) -> None:
        with self._lock:
            self.requested += [(str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax])
                               for cx in event.assoc.requestor.requested_contexts]

    def stop(self) -> None:
        self._server.shutdown()


def test_outbox_proposes_what_the_statement_says_and_handles_statuses(tables, tmp_path):
    scu_classes = _uid_table(tables, "storage-scu-sop-classes")
    scu_syntaxes = _uid_table(tables, "storage-scu-transfer-syntaxes")
    status_rows = {r["Service Status"]: _codes([r], "Codes") for r in tables["storage-scu-status"]}
    assert set(status_rows) == {"Success", "Warning", "Failure"}
    for category, codes in status_rows.items():
        assert codes and all(code_to_category(c) == category for c in codes), (category, codes)

    paths = _built_objects(tmp_path / "objects")
    assert {str(dcmread(p, stop_before_pixels=True).SOPClassUID) for p in paths} == set(scu_classes)

    peer = _RecordingSCP(scu_classes)
    try:
        settings = NodeSettings(storage=StorageConfig(root=tmp_path / "data"),
                                destinations=[DicomDestination(name="pacs", ae_title="PACS", host="127.0.0.1",
                                                          port=peer.port)])
        expected_state = {"Success": "sent", "Warning": "sent", "Failure": "pending"}
        for category, codes in status_rows.items():
            peer.status = codes[0]
            peer.requested.clear()
            box = Outbox(tmp_path / f"outbox-{category}.sqlite", settings)
            box.enqueue("pacs", paths)
            box.process_due()
            # one context per SOP class, proposing exactly the statement's syntaxes, in its order
            assert sorted(peer.requested) == sorted((sop, scu_syntaxes) for sop in scu_classes), peer.requested
            items = box.list(destination="pacs")
            assert {i.state for i in items} == {expected_state[category]}, (category, items)
            assert {i.last_status for i in items} == {codes[0]}
    finally:
        peer.stop()


def test_outbox_context_limit(tables):
    params = {r["Parameter"]: r["Value"] for r in tables["association-parameters"]}
    assert int(params["Maximum presentation contexts proposed (outbox)"]) == outbox.MAX_CONTEXTS


# -- association parameters, AE mapping, defaults ----------------------------------------------------


def _ae(tmp_path: Path) -> AE:
    cfg = NodeSettings(storage=StorageConfig(root=tmp_path / "data"))
    return listener.Listener(cfg, [storage_scp.StorageService(Store(cfg.storage.root, cfg.storage.database_path))]).build_ae()


def test_association_parameters(tables, tmp_path):
    ae = _ae(tmp_path)
    node = NodeConfig()
    actual: dict[str, Any] = {
        "Maximum PDU size received": ae.maximum_pdu_size,
        "ACSE timeout (s)": ae.acse_timeout,
        "DIMSE timeout (s)": ae.dimse_timeout,
        "Network timeout (s)": ae.network_timeout,
        "Maximum presentation contexts proposed (outbox)": outbox.MAX_CONTEXTS,
        "Implementation Class UID": ae.implementation_class_uid,
        "Implementation Version Name": ae.implementation_version_name,
        "Files written: Implementation Class UID": derived.IMPLEMENTATION_CLASS_UID,
        "Files written: Implementation Version Name": derived.IMPLEMENTATION_VERSION_NAME,
    }
    assert ae.dimse_timeout == ae.network_timeout == node.network_timeout_s
    assert ae.acse_timeout == node.artim_timeout_s  # the listener's wait for an A-ASSOCIATE-RQ (ARTIM)
    rows = {r["Parameter"]: r["Value"] for r in tables["association-parameters"]}
    assert set(rows) == set(actual)
    for name, value in actual.items():
        if isinstance(value, (int, float)):
            assert float(rows[name]) == float(value), name
        else:
            assert rows[name] == str(value), name


def test_ae_mapping(tables):
    (row,) = tables["ae-mapping"]
    node = NodeConfig()
    assert row["Application Entity"] == row["Default AE Title"] == node.ae_title
    assert [int(p) for p in re.findall(r"\d+", row["Default TCP Port"])] == [node.port, node.tls.port]


def _leaf_defaults(model: BaseModel, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(_leaf_defaults(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _literal(text: str) -> Any:
    if text == "(none)":
        return None
    return tomllib.loads(f"v = {text}")["v"]


def test_config_defaults(tables):
    rows = {r["Configuration key"]: r["Default"] for r in tables["config-defaults"]}
    defaults = NodeSettings()
    # the networking sections are listed completely; other rows are checked where they appear
    required = {**_leaf_defaults(NodeConfig(), "node."), **_leaf_defaults(OutboxConfig(), "outbox."),
                **_leaf_defaults(QueryRetrieveConfig(), "query_retrieve.")}
    missing = sorted(set(required) - set(rows))
    assert not missing, f"configuration keys missing from the statement: {missing}"
    for key, text in rows.items():
        value: Any = defaults
        for part in key.split("."):
            assert hasattr(value, part), f"the statement lists {key}, the configuration has no such key"
            value = getattr(value, part)
        expected = None if value is None else (str(value) if isinstance(value, Path) else value)
        assert _literal(text) == expected, f"{key}: statement {text}, code {value!r}"


# -- access control and TLS ---------------------------------------------------------------------------


def test_association_rejections(tables):
    rows = tables["association-rejections"]
    constants = {k: v for k, v in vars(access).items() if k.startswith("REJECT_") and isinstance(v, tuple)}
    assert {r["Constant"] for r in rows} == set(constants)
    for r in rows:
        listed = tuple(int(re.match(r"\d+", r[c]).group()) for c in ("Result", "Source", "Reason"))
        assert listed == constants[r["Constant"]], r
    assert set(access.REJECTIONS.values()) == set(constants.values())


def test_tls_parameters(tables):
    rows = {r["Parameter"]: r["Value"] for r in tables["tls-parameters"]}
    assert set(rows) == {"Minimum protocol version", "TLS 1.2 cipher suites (OpenSSL syntax)",
                         "Handshake timeout of the listener (s)"}
    assert rows["TLS 1.2 cipher suites (OpenSSL syntax)"] == tls.BCP195_TLS12_CIPHERS
    assert float(rows["Handshake timeout of the listener (s)"]) == NodeConfig().artim_timeout_s
    context = tls.client_context(DestinationTLS(), "statement")  # system trust store: no files needed
    version = {ssl.TLSVersion.TLSv1_2: "TLS 1.2", ssl.TLSVersion.TLSv1_3: "TLS 1.3"}[context.minimum_version]
    assert rows["Minimum protocol version"] == version


# -- character sets ----------------------------------------------------------------------------------

#: pydicom's aliases that are not DICOM defined terms: the default repertoire's empty value,
#: the common misspelling ISO_IR 6, and two legacy spellings of the Chinese code extensions
_NOT_DEFINED_TERMS = {"", "ISO_IR 6", "ISO 2022 GBK", "ISO 2022 58"}


def test_character_sets(tables):
    listed = _column(tables["character-sets"], 1)
    assert len(listed) == len(set(listed))
    assert set(listed) == set(python_encoding) - _NOT_DEFINED_TERMS


# -- attributes of the created objects ---------------------------------------------------------------


def _value_for(keyword: str) -> Any:
    vr = dictionary_VR(keyword)
    if vr == "SQ":
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "X1", "99TEST", "test"
        return [item]
    return {"DA": "20200101", "TM": "120000", "DS": "1.5", "AS": "050Y", "CS": "YES"}.get(vr, "TEXT")


def _variants(folder: Path) -> tuple[list[Dataset], list[Dataset]]:
    """SC and REG objects covering every optional branch of derived.py."""
    study = generate_uid(UID_PREFIX)
    full = source_series("CT", 2, study_uid=study)
    for h in full:
        # every attribute derived.py copies from the base when present (its own lists, so a new one
        # without a row in the statement fails)
        for kw in (*derived.COPIED_TYPE2, *derived.COPIED_OPTIONAL):
            if kw not in h:
                setattr(h, kw, _value_for(kw))
        h.Laterality = "L"
    plain = source_series("CT", 2)  # no Laterality: Body Part Examined is copied instead
    mr_same = source_series("MR", 2, study_uid=study)
    mr_other = source_series("MR", 2)  # another study: Studies Containing Other Referenced Instances
    eq = derived.Equipment(institution_name="General Hospital")
    grey = sc_module.build_sc_series(full, mr_same, np.zeros((2, 16, 16), np.uint8), uid_root=UID_PREFIX,
                                   series_description="F", derivation_description="D", equipment=eq)
    rgb = sc_module.build_sc_series(plain, mr_other, np.zeros((2, 16, 16, 3), np.uint8), uid_root=UID_PREFIX,
                                  series_description="F", derivation_description="D", overlay_index=[[0], [1]])
    regs = [reg_module.build_registration(full, mr_same, np.eye(4), uid_root=UID_PREFIX, content_label="X", equipment=eq),
            reg_module.build_registration(plain, mr_other, np.eye(4), uid_root=UID_PREFIX, content_label="X")]
    return [*grey, *rgb], regs


def _attribute_rows(rows: list[dict[str, str]]) -> set[int]:
    tags = set()
    for r in rows:
        tag = int(r["Tag"].strip("()").replace(",", ""), 16)
        assert dictionary_description(tag) == r["Attribute Name"], r
        assert tag not in tags, f"{r['Attribute Name']} listed twice"
        tags.add(tag)
    return tags


@pytest.mark.parametrize("name", ["sc-attributes", "reg-attributes"])
def test_created_object_attributes(tables, tmp_path, name):
    sc, reg = _variants(tmp_path)
    objects = sc if name == "sc-attributes" else reg
    written = {int(e.tag) for ds in objects for e in ds}
    listed = _attribute_rows(tables[name])
    undocumented = sorted(keyword_for_tag(t) for t in written - listed)
    assert not undocumented, f"written but not in the statement's {name}: {undocumented}"
    never = sorted(keyword_for_tag(t) for t in listed - written)
    assert not never, f"in the statement's {name} but never written: {never}"
