"""Is the node ready for the next patient: database writable, disk above reserve, weights, destinations.

The cheap checks (database, disk) run on each ``/readyz``; the dear ones
(VGG16 weights resolved and hashed, C-ECHO to every destination) run at
start-up and then every ``http.check_interval_s`` in a thread, and a probe
reads the last answer: a load balancer polling every second must never make
the node open associations to the PACS.  A destination going down or coming
back is an event (``destination.down`` / ``destination.up``) for the
notifications.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from dicom_node import events, logs
from dicom_node.config import DicomDestination, DicomWebDestination, NodeSettings
from dicom_node.index import db

log = logging.getLogger("dicom_node.web.readiness")


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str
    #: when it was looked at (epoch seconds)
    checked_at: float
    #: how long it took (ms), for the destinations' round trip
    ms: float | None = None


def weights_needed(settings: NodeSettings) -> bool:
    """A pipeline that fuses with DMF on VGG16 features cannot run without the weights (FAITHFUL needs none)."""
    from fusion.api import uses_vgg

    return any(uses_vgg(p.method, p.feature_source) for p in settings.pipelines)


def check_weights(settings: NodeSettings) -> Check:
    from fusion import weights

    t = time.time()
    if not weights_needed(settings):
        return Check(True, "not needed: no pipeline uses DMF with VGG16 features", t)
    info = weights.weights_info()
    if info["available"]:
        return Check(True, f"VGG16 weights at {info['path']} (sha256 {str(info['sha256'])[:12]}...)", t)
    return Check(False, f"VGG16 weights missing: {info['error']}; run `fusion-node models fetch` "
                        "(or provision them ahead of time, docs/operations.md)", t)


def echo(dest: DicomDestination, settings: NodeSettings) -> Check:
    """C-ECHO to a DICOM destination with the node's AE title (the same path a send takes)."""
    from dicom_node.net import scu

    t0 = time.time()
    try:
        tls_arguments = scu.tls_args(dest)
    except Exception as exc:  # noqa: BLE001 - a bad TLS file is a failed check, shown with its reason
        return Check(False, f"TLS set-up failed: {exc}", t0)
    ae = scu.requestor_ae(settings.node.ae_title, min(settings.node.network_timeout_s, 10.0))
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_arguments)
    try:
        if not assoc.is_established:
            return Check(False, scu.association_failure(assoc, dest, tls_arguments), t0)
        status = assoc.send_c_echo()
        ok = bool(status) and getattr(status, "Status", None) == 0x0000
        detail = "C-ECHO success" if ok else "C-ECHO answered with a failure or not at all"
        return Check(ok, detail, t0, round((time.time() - t0) * 1000, 1))
    finally:
        if assoc.is_established:
            assoc.release()


def http_probe(dest: DicomWebDestination, settings: NodeSettings) -> Check:
    """A DICOMweb service answers a QIDO-RS search (``GET <url>/studies?limit=1``) with the send's credentials.

    The same client as the sender (TLS trust, token or Basic credentials), so
    refused credentials show here, before the first fused series waits on them.
    """
    import httpx

    from dicom_node.outbox.stow import StowSender

    t0 = time.time()
    try:
        with StowSender(dest, settings, settings.node.ae_title)._client() as client:
            r = client.get(dest.url.rstrip("/") + "/studies", params={"limit": "1"}, timeout=10.0)
    except (httpx.HTTPError, OSError) as exc:
        return Check(False, f"no HTTP answer: {type(exc).__name__}: {exc}", t0)
    ms = round((time.time() - t0) * 1000, 1)
    if r.status_code in (401, 403):
        return Check(False, f"HTTP {r.status_code}: credentials refused; check token/username/password", t0, ms)
    return Check(r.status_code < 500, f"HTTP {r.status_code}", t0, ms)


class Readiness:
    """The cached checks and the thread that refreshes them."""

    def __init__(self, settings: NodeSettings, database: db.Database | None = None) -> None:
        self.settings = settings
        self.database = database or db.Database(settings.storage.database_location)
        self._lock = threading.Lock()
        self._weights: Check | None = None
        self._destinations: dict[str, Check] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the dear checks, cached ---------------------------------------------------------

    def refresh(self) -> None:
        """Weights and destinations once, now; logs transitions and emits destination.down/up."""
        weights = check_weights(self.settings)
        results = {}
        for dest in self.settings.destinations:
            if isinstance(dest, DicomDestination):
                results[dest.name] = echo(dest, self.settings)
            else:
                results[dest.name] = http_probe(dest, self.settings)
        with self._lock:
            before = dict(self._destinations)
            self._weights, self._destinations = weights, results
        for name, check in results.items():
            old = before.get(name)
            if old is not None and old.ok == check.ok:
                continue
            if not check.ok:
                log.warning("readiness.destination.down", extra=logs.fields(destination=name, detail=check.detail))
                events.emit("destination.down", destination=name, detail=check.detail)
            elif old is not None:
                log.info("readiness.destination.up", extra=logs.fields(destination=name, ms=check.ms))
                events.emit("destination.up", destination=name, detail=check.detail)

    def self_check(self) -> dict[str, Any]:
        """The start-up check: run once, logged once (``selfcheck.done``), then shown by /readyz."""
        self.refresh()
        report = self.report()
        level = logging.INFO if report["ready"] else logging.WARNING
        verdicts = {name: ("ok" if c["ok"] else f"FAILED: {c['detail']}") for name, c in report["checks"].items()}
        destinations = {name: ("ok" if c["ok"] else f"FAILED: {c['detail']}")
                        for name, c in report["destinations"].items()}
        log.log(level, "selfcheck.done", extra=logs.fields(ready=report["ready"], destinations=destinations, **verdicts))
        return report

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="readiness", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def _loop(self) -> None:
        try:
            self.self_check()
        except Exception:
            log.exception("selfcheck.failed")
        while not self._stop.wait(self.settings.http.check_interval_s):
            try:
                self.refresh()
            except Exception:
                log.exception("readiness.refresh.failed")

    # -- the cheap checks, every time ----------------------------------------------------

    def check_database(self) -> Check:
        t = time.time()
        where = self.database.describe()
        try:
            self.database.probe_write()  # takes the write lock: the database is writable and not stuck
        except Exception as exc:  # noqa: BLE001 - any failure means "not writable", with its reason
            return Check(False, f"{where}: {type(exc).__name__}: {exc}", t)
        return Check(True, f"{where} writable", t, round((time.time() - t) * 1000, 1))

    def check_disk(self) -> Check:
        t = time.time()
        root = self.settings.storage.root
        try:
            free = shutil.disk_usage(root).free
        except OSError as exc:
            return Check(False, f"{root}: {exc}", t)
        reserve = self.settings.http.disk_reserve_mb * 2**20
        mb = free // 2**20
        if free < reserve:
            return Check(False, f"{mb} MiB free under {root}, below the reserve of "
                                f"{self.settings.http.disk_reserve_mb} MiB; free space or move storage.root", t)
        return Check(True, f"{mb} MiB free under {root} (reserve {self.settings.http.disk_reserve_mb} MiB)", t)

    def report(self) -> dict[str, Any]:
        with self._lock:
            weights, destinations = self._weights, dict(self._destinations)
        checks: dict[str, Check] = {"database": self.check_database(), "disk": self.check_disk()}
        checks["weights"] = weights or Check(False, "not checked yet", time.time())
        dest_docs = {}
        for dest in self.settings.destinations:
            c = destinations.get(dest.name) or Check(False, "not checked yet", time.time())
            dest_docs[dest.name] = asdict(c)
            checks[f"destination:{dest.name}"] = c
        ready = all(c.ok for c in checks.values())
        return {"ready": ready,
                "checks": {k: asdict(v) for k, v in checks.items() if not k.startswith("destination:")},
                "destinations": dest_docs}
