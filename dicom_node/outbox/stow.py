"""The sender for ``kind = "dicomweb"`` destinations: STOW-RS (PS3.18 10.5) over HTTP(S) with httpx.

Each request is one ``multipart/related; type="application/dicom"`` body of up
to ``batch_size`` Part-10 files, POSTed to ``<url>/studies``.  The server's
answer (PS3.18 10.5.3, ``application/dicom+json``) lists the instances it
stored (Referenced SOP Sequence, with a Warning Reason where it changed them)
and those it did not (Failed SOP Sequence, with a Failure Reason that is a
DICOM status code); each instance gets the outcome of its own status, the
same mapping as C-STORE (``senders.py``).  A server that answers 200 with no
body stored everything; any other answer without per-instance lists, an HTTP
error, a timeout or a refused connection fails the whole request, to be
retried with backoff.  Credentials never reach the log.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from dicom_node.config import DicomWebDestination, NodeSettings
from dicom_node.logs import fields
from dicom_node.net.statuses import hex_status
from dicom_node.outbox.senders import Outcome, Work, outcome_for_status

log = logging.getLogger("dicom_node.outbox.stow")

_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


def _value(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def parse_stow_response(body: bytes) -> tuple[dict[str, int], dict[str, int]] | None:
    """``(stored, failed)``: SOP Instance UID -> status (0x0000 or a Warning Reason; a Failure Reason).

    None when the body is not a DICOM JSON dataset (some servers answer 200 with nothing).
    """
    try:
        doc = json.loads(body) if body.strip() else None
    except ValueError:
        return None
    if isinstance(doc, list):  # a few servers wrap the dataset in an array
        doc = doc[0] if doc else None
    if not isinstance(doc, dict):
        return None
    stored: dict[str, int] = {}
    failed: dict[str, int] = {}
    for item in (doc.get(_REFERENCED_SOP_SEQUENCE) or {}).get("Value") or []:
        uid = _value(item, _REFERENCED_SOP_INSTANCE_UID)
        if uid:
            stored[str(uid)] = int(_value(item, _WARNING_REASON) or 0)
    for item in (doc.get(_FAILED_SOP_SEQUENCE) or {}).get("Value") or []:
        uid = _value(item, _REFERENCED_SOP_INSTANCE_UID)
        if uid:
            failed[str(uid)] = int(_value(item, _FAILURE_REASON) or 0xC000)
    if not stored and not failed:
        return None
    return stored, failed


def _secret(value: str | None, path: Path | None) -> str | None:
    """A credential from the config or from its file (read at each use, so a rotated secret is picked up)."""
    if path is not None:
        return Path(path).read_text().strip()
    return value


class StowSender:
    def __init__(self, destination: DicomWebDestination, settings: NodeSettings, calling_ae: str) -> None:
        self.dest = destination
        self.settings = settings
        self.calling_ae = calling_ae

    def _client(self) -> httpx.Client:
        d = self.dest
        verify = ssl.create_default_context(cafile=str(d.ca_certificates) if d.ca_certificates else None)
        auth: httpx.Auth | None = None
        headers = {"Accept": "application/dicom+json", "User-Agent": f"dicom-fusion-node ({self.calling_ae})"}
        token = _secret(d.token, d.token_file)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif d.username is not None:
            auth = httpx.BasicAuth(d.username, _secret(d.password, d.password_file) or "")
        return httpx.Client(verify=verify, auth=auth, headers=headers, timeout=httpx.Timeout(d.timeout_s))

    def send(self, batch: list[Work], cancel: threading.Event | None) -> Iterator[Outcome]:
        readable: list[tuple[Work, bytes]] = []
        for w in batch:
            try:
                readable.append((w, Path(w.path).read_bytes()))
            except OSError as exc:
                yield Outcome(w, "permanent", None, f"cannot read {w.path}: {exc.__class__.__name__}: {exc}")
        if not readable:
            return
        where = dict(destination=self.dest.name, url=self.dest.url)
        try:
            client = self._client()
        except (OSError, ssl.SSLError) as exc:
            reason = f"cannot prepare the connection (credentials or CA file): {exc}"
            log.error("outbox.stow.failed", extra=fields(**where, items=len(readable), reason=reason))
            yield from (Outcome(w, "failed", None, reason) for w, _ in readable)
            return
        size = self.dest.batch_size
        with client:
            for start in range(0, len(readable), size):
                if cancel is not None and cancel.is_set():
                    yield from (Outcome(w, "untried") for w, _ in readable[start:])
                    return
                yield from self._post(client, readable[start:start + size], where)

    def _post(self, client: httpx.Client, part: list[tuple[Work, bytes]], where: dict[str, Any]) -> Iterator[Outcome]:
        boundary = f"dfn-{uuid.uuid4().hex}"
        chunks: list[bytes] = []
        for _, data in part:
            chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), data, b"\r\n"]
        chunks.append(f"--{boundary}--\r\n".encode())
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        try:
            rsp = client.post(f"{self.dest.url}/studies", content=b"".join(chunks),
                              headers={"Content-Type": content_type})
        except httpx.HTTPError as exc:
            reason = f"STOW-RS request failed: {exc.__class__.__name__}: {exc}"
            log.error("outbox.stow.failed", extra=fields(**where, items=len(part), reason=reason))
            yield from (Outcome(w, "failed", None, reason) for w, _ in part)
            return
        parsed = parse_stow_response(rsp.content)
        if parsed is None:
            if rsp.status_code == 200:
                log.info("outbox.stow.done", extra=fields(**where, http_status=200, sent=len(part), failed=0))
                yield from (Outcome(w, "sent", 0x0000) for w, _ in part)
                return
            reason = f"STOW-RS answered HTTP {rsp.status_code} {rsp.reason_phrase}" + (
                " (check the credentials in [[destinations]])" if rsp.status_code in (401, 403) else "")
            log.error("outbox.stow.failed", extra=fields(**where, items=len(part), http_status=rsp.status_code,
                                                         reason=reason))
            yield from (Outcome(w, "failed", None, reason) for w, _ in part)
            return
        stored, failed = parsed
        counts = {"sent": 0, "failed": 0}
        for w, _ in part:
            if w.sop_instance_uid in stored:
                outcome = outcome_for_status(w, stored[w.sop_instance_uid], what="STOW-RS")
            elif w.sop_instance_uid in failed:
                outcome = outcome_for_status(w, failed[w.sop_instance_uid], what="STOW-RS")
            else:
                outcome = Outcome(w, "failed", None, f"STOW-RS answered HTTP {rsp.status_code} without this instance")
            counts["sent" if outcome.result == "sent" else "failed"] += 1
            yield outcome
        log.info("outbox.stow.done", extra=fields(**where, http_status=rsp.status_code, **counts,
                                                  failure_reasons=sorted({str(hex_status(s)) for s in failed.values()})))
