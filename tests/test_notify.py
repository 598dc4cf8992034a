"""Notifications against real receivers: a local webhook (http.server) and a local SMTP server (aiosmtpd)."""

from __future__ import annotations

import time

import pytest
from dicom_helpers import free_port, json_logs
from web_helpers import WebhookReceiver


def _settings(tmp_path, notifications):
    from dicom_node.config import parse_config

    return parse_config({"storage": {"root": str(tmp_path)}, "notifications": notifications})


def _job(settings) -> int:
    from dicom_node.workflow.jobs import JobQueue

    q = JobQueue(settings.storage.database_path)
    q.ensure_schema()
    return q.enqueue("k", "ct-mr", "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2")[0]


def test_webhook_gets_the_events_it_asked_for_and_dead_letters_coalesced(tmp_path):
    from dicom_node import events
    from dicom_node.web.notify import Notifier

    hook, other = WebhookReceiver(), WebhookReceiver()
    settings = _settings(tmp_path, [{"name": "all", "url": hook.url},
                                    {"name": "jobs-only", "url": other.url, "events": ["job_failed"]}])
    job_id = _job(settings)
    n = Notifier(settings).start()
    try:
        events.emit("job.failed", job_id=job_id, pipeline="ct-mr", reason="registration rejected", attempt=1)
        for i in range(30):  # a PACS refusing a whole series
            events.emit("outbox.dead", destination="pacs", id=i, sop_instance_uid=f"1.2.3.{i}", attempts=6,
                        error="C-STORE 0xA700")
        events.emit("destination.down", destination="pacs", detail="connection refused")
        events.emit("scp.instance", outcome="stored", bytes=10)  # not a notification event
        hook.wait_for("destination_down")
        other.wait_for("job_failed")
    finally:
        n.stop()
        hook.stop()
        other.stop()
    failed = next(b for b in hook.bodies if b["event"] == "job_failed")
    assert failed["base_series_uid"] == "1.2.826.0.1.3680043.8.498.1" and failed["job_id"] == job_id
    assert failed["summary"].startswith(f"job {job_id} (ct-mr) failed")
    dead = [b for b in hook.bodies if b["event"] == "dead_letter"]
    assert len(dead) == 1 and dead[0]["count"] == 30 and len(dead[0]["sop_instance_uids"]) == 20
    assert other.events() == ["job_failed"]


def test_email_reaches_a_real_smtp_server(tmp_path):
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Sink

    from dicom_node.web.notify import Notifier

    class Keep(Sink):
        def __init__(self):
            self.mails = []

        async def handle_DATA(self, server, session, envelope):  # aiosmtpd's handler naming
            self.mails.append(envelope)
            return "250 OK"

    handler = Keep()
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        settings = _settings(tmp_path, [{"name": "mail", "kind": "email", "smtp_host": "127.0.0.1", "smtp_port": port,
                                         "recipients": ["it@example.org"], "events": ["dead_letter"]}])
        n = Notifier(settings)
        n.send(n._payload("dead_letter", {"destination": "pacs", "count": 2, "error": "refused",
                                          "sop_instance_uids": ["1.2.3.1", "1.2.3.2"]}))
    finally:
        ctl.stop()
    assert len(handler.mails) == 1 and handler.mails[0].rcpt_tos == ["it@example.org"]
    import email

    mail = email.message_from_bytes(handler.mails[0].content)
    assert " ".join(mail["Subject"].split()) == "[fusion-node FUSIONNODE] 2 instance(s) could not be delivered to pacs: refused"
    assert "1.2.3.2" in mail.get_payload() and n.delivered == 1


def test_a_failing_receiver_is_logged_and_the_node_goes_on(tmp_path):
    from dicom_node import events
    from dicom_node.web.notify import Notifier

    broken = WebhookReceiver(status=500)
    settings = _settings(tmp_path, [{"name": "broken", "url": broken.url},
                                    {"name": "nobody", "url": f"http://127.0.0.1:{free_port()}/hook", "timeout_s": 2}])
    n = Notifier(settings).start()
    try:
        with json_logs("dicom_node.web.notify") as log:
            events.emit("destination.down", destination="pacs", detail="refused")  # returns at once, never raises
            deadline = time.monotonic() + 20
            while n.failed < 2:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        n.stop()
        broken.stop()
    failures = log.events("notify.failed")
    assert {r["receiver"] for r in failures} == {"broken", "nobody"}
    assert "500" in next(r["error"] for r in failures if r["receiver"] == "broken")


def test_a_webhook_without_url_is_a_config_error():
    from dicom_node.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="url"):
        parse_config({"notifications": [{"name": "x"}]})
    with pytest.raises(ConfigError, match="recipients"):
        parse_config({"notifications": [{"name": "x", "kind": "email"}]})
