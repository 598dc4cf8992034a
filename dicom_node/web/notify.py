"""Notifications: failed jobs, dead letters, doubtful registrations and destinations down reach a person.

Each ``[[notifications]]`` receiver names the events it hears; the node's
events (``dicom_node.events``) are turned into one JSON payload each and
sent from one thread, so a slow webhook never holds up a job or a send.
Dead letters of one destination arriving together (a PACS refusing a whole
series) are coalesced into one message.  Payloads carry UIDs, counts and the
node's own messages, never patient names or IDs.  A receiver that fails is
logged (``notify.failed``) and the message dropped: notifying must never
stop the node.
"""

from __future__ import annotations

import json
import logging
import queue
import smtplib
import threading
import time
from email.message import EmailMessage
from typing import Any

import httpx

from dicom_node import events, logs
from dicom_node.config import NodeSettings, Notification
from dicom_node.index import db

log = logging.getLogger("dicom_node.web.notify")

#: node event -> notification event
EVENT_NAMES = {"job.failed": "job_failed", "outbox.dead": "dead_letter", "registration.doubtful": "registration_doubtful",
               "destination.down": "destination_down", "destination.up": "destination_up"}
#: dead letters of one destination within this many seconds go out as one message
COALESCE_S = 2.0
#: UIDs listed in one dead-letter message at most (the count is always exact)
UIDS_LISTED = 20


def _secret(n: Notification) -> str | None:
    if n.token_file is not None:
        return n.token_file.read_text().strip()
    return n.token


def summary(payload: dict[str, Any]) -> str:
    """One line a person reads first (chat message text, e-mail subject)."""
    e = payload["event"]
    if e == "job_failed":
        return f"job {payload['job_id']} ({payload['pipeline']}) failed: {payload['reason']}"
    if e == "dead_letter":
        return f"{payload['count']} instance(s) could not be delivered to {payload['destination']}: {payload['error']}"
    if e == "registration_doubtful":
        return (f"job {payload['job_id']} ({payload['pipeline']}): doubtful registration ({payload['policy']}): "
                f"{payload['problems']}")
    if e == "destination_down":
        return f"destination {payload['destination']} does not answer: {payload['detail']}"
    if e == "destination_up":
        return f"destination {payload['destination']} answers again"
    return e


class Notifier:
    """Listens to the node's events and delivers them to the configured receivers."""

    def __init__(self, settings: NodeSettings, database: db.Database | None = None) -> None:
        self.settings = settings
        self.database = database or db.Database(settings.storage.database_location)
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._unsubscribe: Any = None
        #: what was delivered and what failed, for tests and the status page
        self.delivered = 0
        self.failed = 0

    @property
    def active(self) -> bool:
        return bool(self.settings.notifications)

    def start(self) -> Notifier:
        if not self.active:
            return self
        self._unsubscribe = events.subscribe(self.on_event)
        self._thread = threading.Thread(target=self._loop, name="notify", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def on_event(self, event: str, fields: dict[str, Any]) -> None:
        name = EVENT_NAMES.get(event)
        if name and any(name in n.events for n in self.settings.notifications):
            self._queue.put((name, dict(fields)))

    # -- the sending thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            name, fields = item
            try:
                if name == "dead_letter":
                    payload = self._dead_letters(fields)
                else:
                    payload = self._payload(name, fields)
                self.send(payload)
            except Exception:  # a notification bug must not end the thread
                log.exception("notify.error", extra=logs.fields(event_name=name))

    def _dead_letters(self, first: dict[str, Any]) -> dict[str, Any]:
        """Collect the dead letters of ``first``'s destination arriving within COALESCE_S into one payload."""
        items = [first]
        deadline = time.monotonic() + COALESCE_S
        held: list[tuple[str, dict[str, Any]] | None] = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                nxt = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if nxt is not None and nxt[0] == "dead_letter" and nxt[1]["destination"] == first["destination"]:
                items.append(nxt[1])
            else:
                held.append(nxt)
        for h in held:
            self._queue.put(h)
        return self._payload("dead_letter", {
            "destination": first["destination"], "count": len(items), "error": first.get("error"),
            "sop_instance_uids": [i["sop_instance_uid"] for i in items[:UIDS_LISTED]],
            "outbox_ids": [i["id"] for i in items[:UIDS_LISTED]],
        })

    def _payload(self, name: str, fields: dict[str, Any]) -> dict[str, Any]:
        payload: dict[str, Any] = {"event": name, "node": self.settings.node.ae_title,
                                   "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        payload.update({k: v for k, v in fields.items() if k not in ("attempt",)})
        job_id = fields.get("job_id")
        if job_id is not None:  # the series a person looks for: by UID, never by patient
            row = self.database.execute("SELECT base_series_uid, overlay_series_uid FROM jobs WHERE id = ?",
                                        (job_id,)).fetchone()
            if row is not None:
                payload.update(base_series_uid=row["base_series_uid"], overlay_series_uid=row["overlay_series_uid"])
        payload["summary"] = summary(payload)
        return payload

    def send(self, payload: dict[str, Any]) -> None:
        """Deliver one payload to every receiver that hears its event; failures are logged, never raised."""
        for n in self.settings.notifications:
            if payload["event"] not in n.events:
                continue
            try:
                if n.kind == "webhook":
                    self._webhook(n, payload)
                else:
                    self._email(n, payload)
            except Exception as exc:  # noqa: BLE001 - any failure to notify is logged, the node goes on
                self.failed += 1
                log.warning("notify.failed", extra=logs.fields(receiver=n.name, kind=n.kind,
                                                               event_name=payload["event"],
                                                               error=f"{type(exc).__name__}: {exc}"))
                continue
            self.delivered += 1
            log.info("notify.sent", extra=logs.fields(receiver=n.name, kind=n.kind, event_name=payload["event"]))

    @staticmethod
    def _webhook(n: Notification, payload: dict[str, Any]) -> None:
        assert n.url is not None  # the config requires it for webhooks
        headers = {"User-Agent": "dicom-fusion-node"}
        token = _secret(n)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        r = httpx.post(n.url, json=payload, headers=headers, timeout=n.timeout_s)
        r.raise_for_status()

    @staticmethod
    def _email(n: Notification, payload: dict[str, Any]) -> None:
        msg = EmailMessage()
        msg["Subject"] = f"[fusion-node {payload['node']}] {payload['summary']}"[:200]
        msg["From"] = n.sender
        msg["To"] = ", ".join(n.recipients)
        msg.set_content(payload["summary"] + "\n\n" + json.dumps(payload, indent=2, default=str) + "\n")
        with smtplib.SMTP(n.smtp_host, n.smtp_port, timeout=n.timeout_s) as smtp:
            if n.starttls:
                smtp.starttls()
            smtp.send_message(msg)
