"""The audit trail: who stored, queried, retrieved and was sent which study, in its own file.

Records follow the DICOM Audit Message structure (PS3.15 A.5, derived from
RFC 3881), written as one JSON object per line to ``<root>/audit/audit.jsonl``
(folder 0700, file 0600).  This file is the one place outside the store and
its index where patient identifiers may appear: an audit record exists to say
whose data went where.  The JSON log (``logs.py``) never carries them.

One record per:

* association and study received (``DICOM Instances Transferred``, action C);
* C-FIND (``Query``, action E), naming the studies or patients it answered with;
* C-GET / C-MOVE and study (``DICOM Instances Transferred``, action R);
* outbox delivery and study (``DICOM Instances Transferred``, action R, the node the requestor).

Writing is append-only with ``O_APPEND`` (one ``write`` per record, so lines
of concurrent writers never interleave) and fsynced; a failure to write is
logged (``audit.write_failed``) and never fails the DICOM operation itself.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.logs import fields

log = logging.getLogger("dicom_node.audit")

#: the file under the audit folder
FILE_NAME = "audit.jsonl"

# -- coded values (PS3.16 DCM codes, PS3.15 A.5.1) ----------------------------------------------------

#: EventID "DICOM Instances Transferred"
INSTANCES_TRANSFERRED = {"code": "110104", "codeSystemName": "DCM", "displayName": "DICOM Instances Transferred"}
#: EventID "Query"
QUERY = {"code": "110112", "codeSystemName": "DCM", "displayName": "Query"}
#: RoleIDCode of the participant data come from / go to
SOURCE_ROLE = {"code": "110153", "codeSystemName": "DCM", "displayName": "Source Role ID"}
DESTINATION_ROLE = {"code": "110152", "codeSystemName": "DCM", "displayName": "Destination Role ID"}
#: EventActionCode: Create, Read, Execute (RFC 3881 5.1.2)
CREATE, READ, EXECUTE = "C", "R", "E"
#: EventOutcomeIndicator (RFC 3881 5.1.4)
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: an application entity, by AE title and network address."""

    ae_title: str
    address: str | None = None
    requestor: bool = False
    role: dict[str, str] | None = None

    def as_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"UserID": self.ae_title, "AlternativeUserID": f"AETITLES={self.ae_title}",
                               "UserIsRequestor": self.requestor}
        if self.role is not None:
            out["RoleIDCode"] = self.role
        if self.address:
            out["NetworkAccessPointID"] = self.address
            out["NetworkAccessPointTypeCode"] = 2 if _is_ip(self.address) else 1  # 2 = IP address, 1 = machine name
        return out


@dataclass
class Study:
    """What one record says of one study: its patient, and the instances per SOP class."""

    study_uid: str
    patient_id: str | None = None
    instances: dict[str, int] = field(default_factory=dict)

    def add(self, sop_class_uid: str, n: int = 1) -> None:
        self.instances[sop_class_uid] = self.instances.get(sop_class_uid, 0) + n


def _patient(patient_id: str) -> dict[str, Any]:
    return {"ParticipantObjectTypeCode": 1, "ParticipantObjectTypeCodeRole": 1,
            "ParticipantObjectIDTypeCode": {"code": "2", "codeSystemName": "RFC-3881", "displayName": "Patient Number"},
            "ParticipantObjectID": patient_id}


def _study(study: Study) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ParticipantObjectTypeCode": 2, "ParticipantObjectTypeCodeRole": 3,
        "ParticipantObjectIDTypeCode": {"code": "110180", "codeSystemName": "DCM", "displayName": "Study Instance UID"},
        "ParticipantObjectID": study.study_uid,
    }
    if study.instances:
        out["ParticipantObjectDescription"] = {"SOPClass": [{"UID": uid, "NumberOfInstances": n}
                                                            for uid, n in sorted(study.instances.items())]}
    return out


def study_objects(studies: Iterable[Study]) -> list[dict[str, Any]]:
    """ParticipantObjectIdentification entries: each patient once, then each study."""
    studies = list(studies)
    patients = sorted({s.patient_id for s in studies if s.patient_id})
    return [*(_patient(p) for p in patients), *(_study(s) for s in studies)]


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


class AuditTrail:
    """Appends audit records to ``<folder>/audit.jsonl``; cheap to create, safe to share between threads."""

    def __init__(self, folder: Path, source_id: str = "FUSIONNODE") -> None:
        # absolute now: a relative storage root means the folder the node started in, whatever the
        # working directory is when a record is written later
        self.folder = Path(folder).absolute()
        self.path = self.folder / FILE_NAME
        self.source_id = source_id
        with _locks_guard:
            self._lock = _locks.setdefault(self.path.resolve(), threading.Lock())

    def record(self, event_id: dict[str, str], action: str, outcome: int, participants: Sequence[Participant],
               objects: Sequence[dict[str, Any]], *, description: str | None = None,
               query: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write one record and return it.  ``query`` describes a C-FIND (SOP class, level, matches)."""
        doc: dict[str, Any] = {
            "EventIdentification": {"EventID": event_id, "EventActionCode": action, "EventDateTime": now(),
                                    "EventOutcomeIndicator": outcome},
            "ActiveParticipant": [p.as_record() for p in participants],
            "AuditSourceIdentification": {"AuditSourceID": self.source_id},
            "ParticipantObjectIdentification": list(objects),
        }
        if description:
            doc["EventIdentification"]["EventOutcomeDescription"] = description
        if query is not None:
            doc["ParticipantObjectIdentification"].append({
                "ParticipantObjectTypeCode": 2, "ParticipantObjectTypeCodeRole": 3,
                "ParticipantObjectIDTypeCode": {"code": "110181", "codeSystemName": "DCM", "displayName": "SOP Class UID"},
                "ParticipantObjectID": query.get("sop_class_uid", ""), "ParticipantObjectDetail": query})
        self._append(doc)
        return doc

    def _append(self, doc: dict[str, Any]) -> None:
        line = (json.dumps(doc, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        try:
            with self._lock:
                if not self.folder.is_dir():
                    self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                    os.chmod(self.folder, 0o700)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            log.error("audit.write_failed", extra=fields(path=str(self.path), error=exc.strerror or type(exc).__name__,
                                                         action=f"check permissions and free space under {self.folder}"))

    def read(self) -> list[dict[str, Any]]:
        """Every record so far (tests, the operator's tools)."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


def trail_for(root: Path, source_id: str) -> AuditTrail:
    """The audit trail of a store root: ``<root>/audit``."""
    return AuditTrail(Path(root) / "audit", source_id)
