"""The HTTP routes: health, readiness, metrics, the JSON API with its retry actions, the status page.

Starlette, with plain (threaded) endpoints: each request reads SQLite with
the same classes the CLI uses.  When ``http.token`` (or ``token_file``) is set,
every route but ``/healthz`` and ``/readyz`` asks for it: ``Authorization:
Bearer <token>``, or once ``?token=<token>`` in a browser, which sets a
``SameSite=Strict`` cookie.  The retry actions are POSTs; without a token
(bound to 127.0.0.1) a POST from another web origin is refused, so a page
in the operator's browser cannot retry jobs behind their back.
"""

from __future__ import annotations

import hmac
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from dicom_node import __version__
from dicom_node.config import NodeSettings
from dicom_node.index.store import Store
from dicom_node.outbox import Outbox
from dicom_node.web import status_page, views
from dicom_node.web.metrics import CONTENT_TYPE, NodeMetrics
from dicom_node.web.readiness import Readiness
from dicom_node.workflow.jobs import JobQueue

COOKIE = "fusion_node_token"
_CHECK_SHEET = re.compile(r"^job-\d+-registration\.png$")


@dataclass
class WebContext:
    """What the routes read and steer: the node's database parts, its metrics and readiness."""

    settings: NodeSettings
    store: Store
    jobs: JobQueue
    outbox: Outbox
    metrics: NodeMetrics
    readiness: Readiness
    token: str | None = None
    started: float = field(default_factory=time.time)

    @property
    def qc_dir(self) -> Path:
        return self.settings.storage.root / "qc"


def http_token(settings: NodeSettings) -> str | None:
    cfg = settings.http
    if cfg.token_file is not None:
        return cfg.token_file.read_text().strip() or None
    return cfg.token


def create_app(ctx: WebContext) -> Starlette:
    def authorised(request: Request) -> bool:
        if ctx.token is None:
            return True
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else request.cookies.get(COOKIE, "")
        return hmac.compare_digest(given.encode(), ctx.token.encode())

    def guard(request: Request) -> Response | None:
        """None when the request may go on, else the answer to give instead."""
        if ctx.token is not None and request.query_params.get("token") is not None:
            if hmac.compare_digest(request.query_params["token"].encode(), ctx.token.encode()):
                resp = RedirectResponse(request.url.path, status_code=303)
                resp.set_cookie(COOKIE, ctx.token, httponly=True, samesite="strict",
                                secure=ctx.settings.http.certificate is not None)
                return resp
        if not authorised(request):
            return JSONResponse({"error": "a bearer token is required (http.token in the node's config): "
                                          "send 'Authorization: Bearer <token>', or open the page once with ?token=..."},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if request.method == "POST" and ctx.token is None:
            origin = request.headers.get("origin")
            if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host"):
                return JSONResponse({"error": f"cross-origin POST from {origin} refused"}, status_code=403)
        return None

    def protected(fn):
        def endpoint(request: Request) -> Response:
            denied = guard(request)
            return denied if denied is not None else fn(request)
        endpoint.__name__ = fn.__name__
        return endpoint

    def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive", "version": __version__, "ae_title": ctx.settings.node.ae_title,
                             "uptime_s": round(time.time() - ctx.started, 1)})

    def readyz(request: Request) -> Response:
        report = ctx.readiness.report()
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    @protected
    def metrics(request: Request) -> Response:
        return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE)

    @protected
    def series(request: Request) -> Response:
        return JSONResponse(views.series_list(ctx.store, ctx.settings, request.query_params.get("state")))

    @protected
    def one_series(request: Request) -> Response:
        s = ctx.store.get_series(request.path_params["uid"])
        if s is None or s.origin != "received":
            return JSONResponse({"error": "no such received series"}, status_code=404)
        return JSONResponse(views.series_view(s, ctx.settings, time.time()))

    @protected
    def jobs(request: Request) -> Response:
        return JSONResponse(views.jobs_list(ctx.jobs, request.query_params.get("state")))

    @protected
    def one_job(request: Request) -> Response:
        job_id = request.path_params["id"]
        found = [j for j in views.jobs_list(ctx.jobs) if j["id"] == job_id]
        if not found:
            return JSONResponse({"error": f"no job {job_id}"}, status_code=404)
        return JSONResponse(found[0])

    @protected
    def outbox(request: Request) -> Response:
        return JSONResponse(views.outbox_view(ctx.outbox))

    @protected
    def registrations(request: Request) -> Response:
        return JSONResponse([{"job_id": j["id"], "pipeline": j["pipeline"], "state": j["state"], **j["registration"]}
                             for j in views.jobs_list(ctx.jobs) if j["registration"]])

    def _answer(request: Request, doc: dict[str, Any], status: int = 200) -> Response:
        if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return RedirectResponse("/", status_code=303)  # a form on the status page: back to it
        return JSONResponse(doc, status_code=status)

    @protected
    def retry_job(request: Request) -> Response:
        from dicom_node.workflow.jobs import JobStateError
        from dicom_node.workflow.jobs import retry_job as retry

        job_id = request.path_params["id"]
        if ctx.jobs.get(job_id) is None:
            return JSONResponse({"error": f"no job {job_id}"}, status_code=404)
        new_version = request.query_params.get("new_version", "") in ("1", "true", "yes")
        try:  # the CLI's one guarded retry: a running job never, a done one only as a new version
            again = retry(ctx.jobs, job_id, new_version=new_version)
        except JobStateError as exc:
            return JSONResponse({"error": exc.operator_message}, status_code=409)
        return _answer(request, {"requeued": [job_id], "version": again.version})

    async def retry_outbox(request: Request) -> Response:
        denied = guard(request)
        if denied is not None:
            return denied
        ids: list[int] | None = None
        destination: str | None = None
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            body = await request.json()
            ids = [int(i) for i in body.get("ids") or []] or None
            destination = body.get("destination")
        elif ctype.startswith("application/x-www-form-urlencoded"):
            form = await request.form()
            destination = str(form.get("destination") or "") or None
        from starlette.concurrency import run_in_threadpool

        n = await run_in_threadpool(ctx.outbox.retry, ids, destination)
        return _answer(request, {"due_again": n})

    @protected
    def check_sheet(request: Request) -> Response:
        name = request.path_params["name"]
        path = ctx.qc_dir / name
        if not _CHECK_SHEET.match(name) or not path.is_file():
            return JSONResponse({"error": "no such check sheet"}, status_code=404)
        return FileResponse(path, media_type="image/png")

    @protected
    def page(request: Request) -> Response:
        html = status_page.render(
            settings=ctx.settings, jobs=views.jobs_list(ctx.jobs), series=views.series_list(ctx.store, ctx.settings),
            outbox=views.outbox_view(ctx.outbox), sheets=views.check_sheets(ctx.qc_dir, ctx.jobs),
            readiness=ctx.readiness.report(), uptime_s=time.time() - ctx.started)
        return HTMLResponse(html)

    routes = [
        Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics),
        Route("/api/series", series), Route("/api/series/{uid}", one_series),
        Route("/api/jobs", jobs), Route("/api/jobs/{id:int}", one_job),
        Route("/api/jobs/{id:int}/retry", retry_job, methods=["POST"]),
        Route("/api/outbox", outbox), Route("/api/outbox/retry", retry_outbox, methods=["POST"]),
        Route("/api/registrations", registrations),
        Route("/qc/{name}", check_sheet), Route("/", page),
    ]
    return Starlette(routes=routes)
