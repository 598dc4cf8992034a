"""The HTTP side on a real node: a real fusion job, real sends (one PACS that answers, one that does not),
a real webhook receiver, the JSON API and Prometheus exposition read back, the status page in Chromium.

One node run (module fixture) makes every state the page shows: a job done with its check sheet, a job
failed on a doubtful registration, a job stopped mid-fuse (claimed and reporting progress as a worker
does), dead letters, a series waiting for a partner, one still open.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dicom_helpers import dcmtk, free_port
from prometheus_client.parser import text_string_to_metric_families
from web_helpers import WebhookReceiver

REPO = Path(__file__).resolve().parents[1]
#: Starlette's TestClient asks for the httpx2 fork; httpx (a main dependency) works as it is
#: one real node run of a minute or more (two registrations) feeds every test here
pytestmark = [pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`"), pytest.mark.slow]
PATIENT = ("PHANTOM^SYNTHETIC", "SYN-0001")  # what write_synthetic_pair writes: must never leave the node


def _storescu(port: int, ae: str, *paths: Path) -> None:
    done = subprocess.run([dcmtk("storescu"), "-aet", "SCANNER", "-aec", ae, "+sd", "127.0.0.1", str(port),
                           *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


class StoreSCP:
    """DCMTK's storescp as the PACS: its own process, so only the node's events reach the node's metrics."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen([dcmtk("storescp"), "-aet", "PACS", "--output-directory", str(folder),
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while subprocess.run([dcmtk("echoscu"), "-aec", "PACS", "127.0.0.1", str(self.port)],
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _settings(root: Path, pacs_port: int, dead_port: int, hook_url: str, **http):
    from dicom_node.config import parse_config

    pipeline = {"match": "study", "method": "adf", "feature_source": "image",
                "destinations": ["pacs", "archive"],
                "base": {"modality": ["CT"], "min_instances": 10}, "overlay": {"modality": ["MR"], "min_instances": 10}}
    return parse_config({
        "device": "cpu",
        "node": {"ae_title": "FUSIONNODE", "host": "127.0.0.1", "port": 0},
        "storage": {"root": str(root)},
        "settle": {"quiet_seconds": 600, "sweep_interval_s": 0.5},
        "outbox": {"max_attempts": 1, "backoff_initial_s": 1},
        "http": {"port": 0, "check_interval_s": 2, "refresh_s": 5, **http},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
                         {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": dead_port}],
        "pipelines": [{**pipeline, "name": "ct-mr", "registration": {"on_poor_quality": "warn"}},
                      {**pipeline, "name": "ct-mr-strict",
                       "registration": {"on_poor_quality": "fail", "quality": {"min_similarity": 0.99}}}],
        "notifications": [{"name": "ops", "url": hook_url, "token": "hook-secret"}],
    })


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from dicom_node.web.runtime import RunningNode
    from dicom_node.workflow.node import Node
    from fusion_demo.samples import write_synthetic_pair

    tmp = tmp_path_factory.mktemp("web")
    ct, mr = write_synthetic_pair(tmp / "pair")
    lone_ct, partial = write_synthetic_pair(tmp / "other", seed=12)
    pacs = StoreSCP(tmp / "pacs")
    hook = WebhookReceiver()
    settings = _settings(tmp / "node", pacs.port, free_port(), hook.url)
    running = RunningNode(Node(settings)).start()
    node = running.node
    t0 = time.monotonic()
    try:
        _storescu(node.port, "FUSIONNODE", ct, mr)
        for s in node.store.list_series():
            node.settler.trigger(s.series_uid)  # the operator's `trigger`: settle now
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            states = {j.pipeline: j.state for j in node.jobs.list()}
            if states.get("ct-mr") == "done" and states.get("ct-mr-strict") == "failed" and node.outbox.wait_idle(0.1):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"jobs did not finish: {node.jobs.list()}")
        job_seconds = time.monotonic() - t0
        # a CT whose MR never comes (settled, waiting), and five images of a series still arriving (open)
        _storescu(node.port, "FUSIONNODE", lone_ct)
        node.settler.trigger(next(s.series_uid for s in node.store.list_series(state="open")))
        _storescu(node.port, "FUSIONNODE", *sorted(partial.iterdir())[:5])
        # a job a worker holds mid-fuse (what the executor's progress calls leave on it)
        key = "stuck-in-fuse"
        jid, _ = node.jobs.enqueue(key, "ct-mr", "1.2.3.4", "1.2.3.5")
        node.executor.stop()  # no worker may take it: it shows a claimed job as it is mid-run
        claimed = node.jobs.claim()
        assert claimed is not None and claimed.id == jid
        node.jobs.set_progress(jid, "fuse", 24, 40)
        running_job = jid
        yield {"running": running, "node": node, "hook": hook, "pacs": pacs, "tmp": tmp, "url": running.url,
               "job_seconds": job_seconds, "running_job": running_job, "series": (ct, mr)}
    finally:
        running.stop()
        pacs.stop()
        hook.stop()


def _client(live):
    from starlette.testclient import TestClient

    from dicom_node.web.app import create_app

    return TestClient(create_app(live["running"]._ctx))


def _metrics(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_health_and_readiness_report_each_check(live):
    c = _client(live)
    assert c.get("/healthz").json()["status"] == "alive"
    deadline = time.monotonic() + 60
    while (doc := c.get("/readyz").json())["checks"]["weights"]["detail"] == "not checked yet":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    r = c.get("/readyz")
    doc = r.json()
    assert doc["checks"]["database"]["ok"] and doc["checks"]["disk"]["ok"]
    assert doc["checks"]["weights"]["ok"] and "not needed" in doc["checks"]["weights"]["detail"]
    assert doc["destinations"]["pacs"]["ok"], doc["destinations"]["pacs"]
    assert not doc["destinations"]["archive"]["ok"]  # nothing listens on its port
    assert r.status_code == 503 and doc["ready"] is False


def test_metrics_count_what_happened(live):
    node = live["node"]
    text = _client(live).get("/metrics").text
    m = _metrics(text)
    n_in = sum(len(list(p.iterdir())) for p in live["series"]) + len(list(
        (live["tmp"] / "other" / "CT").iterdir())) + 5
    assert m[("fusion_instances_received_total", (("outcome", "stored"),))] == n_in
    assert m[("fusion_received_bytes_total", ())] > 0
    assert m[("fusion_associations_total", (("outcome", "accepted"),))] >= 3
    assert m[("fusion_jobs", (("state", "done"),))] == 1
    assert m[("fusion_jobs", (("state", "failed"),))] == 1
    assert m[("fusion_jobs", (("state", "running"),))] == 1
    assert m[("fusion_series", (("state", "open"),))] == 1
    assert m[("fusion_series", (("state", "settled"),))] == 1
    assert m[("fusion_series", (("state", "paired"),))] == 2
    done = next(j for j in node.jobs.list() if j.state == "done")
    n_out = done.result["instances"] + 1  # the SC images and the REG object
    assert m[("fusion_outbox_items", (("destination", "pacs"), ("state", "sent")))] == n_out
    assert m[("fusion_outbox_dead_letters", (("destination", "archive"),))] == n_out
    assert m[("fusion_outbox_dead_total", (("destination", "archive"),))] == n_out
    assert m[("fusion_outbox_depth", (("destination", "pacs"),))] == 0
    for stage in ("load", "register", "prepare", "fuse", "encode", "store", "queue"):
        assert m[("fusion_job_stage_seconds_count", (("pipeline", "ct-mr"), ("stage", stage)))] == 1
    assert m[("fusion_job_stage_seconds_sum", (("pipeline", "ct-mr"), ("stage", "fuse")))] == pytest.approx(
        done.result["seconds"]["fuse"])
    # one latency per job and destination reached: the job's items all sent to pacs, none to archive
    assert m[("fusion_delivery_latency_seconds_count", (("destination", "pacs"),))] == 1
    latency = m[("fusion_delivery_latency_seconds_sum", (("destination", "pacs"),))]
    assert 0 < latency < live["job_seconds"] + 5
    assert ("fusion_delivery_latency_seconds_count", (("destination", "archive"),)) not in m
    assert m[("fusion_registrations_doubtful_total", (("pipeline", "ct-mr-strict"), ("policy", "fail")))] == 1


def test_api_shows_jobs_with_stage_progress_and_registration(live):
    c = _client(live)
    jobs = {j["pipeline"] + ":" + j["state"]: j for j in c.get("/api/jobs").json()}
    done, failed = jobs["ct-mr:done"], jobs["ct-mr-strict:failed"]
    assert done["progress"] == 1.0 and done["stage"] == "store" and done["slices_total"] == done["slices_done"] > 0
    assert done["registration"]["check_sheet"].endswith("-registration.png")
    assert len(done["registration"]["translation_mm"]) == 3
    assert failed["registration"]["verdict"] == "doubtful" and "registration rejected" in failed["error"]
    mid = c.get(f"/api/jobs/{live['running_job']}").json()
    assert mid["state"] == "running" and mid["stage"] == "fuse" and (mid["slices_done"], mid["slices_total"]) == (24, 40)
    assert 0.5 < mid["progress"] < 0.7  # stage 4 of 6, 60 % through it
    assert mid["eta_s"] is not None and mid["stalled"] is False
    regs = c.get("/api/registrations").json()
    assert {r["pipeline"] for r in regs} == {"ct-mr", "ct-mr-strict"}
    sheet = c.get(f"/qc/{done['registration']['check_sheet']}")
    assert sheet.status_code == 200 and sheet.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert c.get("/qc/..%2Fnode.sqlite").status_code == 404
    series = c.get("/api/series").json()
    assert {s["state"] for s in series} == {"paired", "settled", "open"}
    opened = next(s for s in series if s["state"] == "open")
    assert opened["instances"] == 5 and 0 < opened["settles_in_s"] <= 600
    box = c.get("/api/outbox").json()
    assert box["destinations"]["archive"]["states"]["dead"] == box["dead_letters_total"] > 0
    text = c.get("/api/series").text + c.get("/api/jobs").text + c.get("/api/outbox").text
    for secret in PATIENT:
        assert secret not in text


def test_retry_actions_requeue_a_failed_job_and_dead_letters(live):
    node = live["node"]
    c = _client(live)
    failed = next(j for j in node.jobs.list() if j.state == "failed")
    assert c.post(f"/api/jobs/{live['running_job']}/retry").status_code == 409  # running: not retried
    assert c.post(f"/api/jobs/{failed.id}/retry", headers={"Origin": "http://evil.example"}).status_code == 403
    r = c.post(f"/api/jobs/{failed.id}/retry")
    assert r.status_code == 200 and r.json() == {"requeued": [failed.id], "version": 1}
    assert node.jobs.get(failed.id).state == "queued"
    dead = len(node.outbox.list(state="dead"))
    assert c.post("/api/outbox/retry", json={"destination": "archive"}).json() == {"due_again": dead}
    # put the state back as the other tests expect it (the executor is stopped: nothing runs them)
    node.jobs.fail(failed.id, failed.error, failed.result)
    deadline = time.monotonic() + 60
    while len(node.outbox.list(state="dead")) < dead:  # the outbox thread tries again: dead again
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_token_protects_everything_but_the_probes(live):
    from starlette.testclient import TestClient

    from dicom_node.web.app import WebContext, create_app

    ctx = live["running"]._ctx
    c = TestClient(create_app(WebContext(**{**ctx.__dict__, "token": "s3cret"})))
    assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code in (200, 503)
    for path in ("/", "/metrics", "/api/jobs"):
        assert c.get(path).status_code == 401
    assert c.post("/api/outbox/retry", json={}).status_code == 401
    assert c.get("/api/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/api/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = c.get("/?token=s3cret", follow_redirects=False)  # a browser: once in the URL, then a cookie
    assert r.status_code == 303 and "samesite=strict" in r.headers["set-cookie"].lower()
    assert c.get("/").status_code == 200


def test_notifications_reach_the_webhook_without_patient_data(live):
    hook = live["hook"]
    failed = hook.wait_for("job_failed")
    assert failed["pipeline"] == "ct-mr-strict" and failed["base_series_uid"] and "registration rejected" in failed["reason"]
    doubtful = [b for b in hook.bodies if b["event"] == "registration_doubtful"]
    assert {b["pipeline"] for b in doubtful} == {"ct-mr-strict"}  # the same figures passed ct-mr's limits
    assert doubtful[0]["policy"] == "fail" and doubtful[0]["problems"]
    dead = hook.wait_for("dead_letter")
    done = next(j for j in live["node"].jobs.list() if j.state == "done")
    assert dead["destination"] == "archive"
    # coalesced: one message for the job's instances, not one per instance
    assert sum(b["count"] for b in hook.bodies if b["event"] == "dead_letter") >= done.result["instances"] + 1
    assert len([b for b in hook.bodies if b["event"] == "dead_letter"]) <= 3
    down = hook.wait_for("destination_down")
    assert down["destination"] == "archive"
    assert all(h.get("Authorization") == "Bearer hook-secret" for h in hook.headers)
    every = repr(hook.bodies)
    for secret in PATIENT:
        assert secret not in every


def test_status_page_in_chromium(live, tmp_path):
    """The page as a person sees it: rendered by headless Chromium, screenshot kept in docs/."""
    from PIL import Image

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian chromium not installed (make test installs it)")
    shot = tmp_path / "status.png"
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--window-size=1280,1400", "--virtual-time-budget=5000"]
    dom = subprocess.run([*base, "--dump-dom", live["url"]], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for text in ("Jobs", "Series waiting to settle or for a partner", "Outbox by destination", "Dead letters",
                 "Registration check sheets", "slices", "doubtful", "waiting for a partner series", "settles in"):
        assert text in html, text
    assert html.count('class="bar"') >= 2 and "registration.png" in html
    for secret in PATIENT:
        assert secret not in html
    done = subprocess.run([*base, f"--screenshot={shot}", live["url"]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 1400)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 2000  # the check sheets' grey levels and colours, not just text
    assert any(c == (0x15, 0x65, 0xC0) for _, c in colours)  # a progress bar's fill
    docs = REPO / "docs" / "status-page.png"
    if not docs.exists():  # delete it to have the suite draw it again
        shutil.copy(shot, docs)


def test_a_real_serve_process_answers_health_and_readiness(tmp_path):
    """`fusion-node serve` as an operator runs it: prints its URL; /readyz is 200 once the PACS answers C-ECHO."""
    import httpx

    pacs = StoreSCP(tmp_path / "pacs")
    (tmp_path / "node.toml").write_text(f'''
[node]
ae_title = "SERVED"
host = "127.0.0.1"
port = 0
[http]
port = 0
[storage]
root = "data"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs.port}
[[pipelines]]
name = "ct-mr"
feature_source = "image"
destinations = ["pacs"]
[pipelines.base]
modality = ["CT"]
[pipelines.overlay]
modality = ["MR"]
''')
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(tmp_path / "node.toml")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("fusion-node listening as SERVED on port ")
        line = proc.stdout.readline()
        assert line.startswith("status page and API at http://127.0.0.1:"), line
        url = line.split(" at ")[1].strip()
        assert httpx.get(url + "healthz", timeout=10).json()["status"] == "alive"
        deadline = time.monotonic() + 60
        while (r := httpx.get(url + "readyz", timeout=10)).status_code != 200:
            assert time.monotonic() < deadline, r.json()
            time.sleep(0.3)
        assert r.json()["destinations"]["pacs"]["detail"] == "C-ECHO success"
        proc.send_signal(2)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        pacs.stop()
    err = proc.stderr.read()
    assert err.count('"event": "selfcheck.done"') == 1 and '"ready": true' in err
