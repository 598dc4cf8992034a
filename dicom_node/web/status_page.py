"""The status page a person reads: server-rendered HTML, no JavaScript, reloads itself.

Jobs with their stage and a progress bar, series waiting to settle or for a
partner, each destination's outbox, the dead letters, and the registration
check sheets as images.  Everything comes from :mod:`dicom_node.web.views`
(the JSON API shows the same); values are escaped, and no patient name or
ID is ever on it.
"""

from __future__ import annotations

import time
from html import escape
from typing import Any

from dicom_node import __version__
from dicom_node.config import NodeSettings

_CSS = """
body{font:15px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2f4e;color:#fff;padding:14px 24px;display:flex;align-items:center;gap:18px;flex-wrap:wrap}
header h1{font-size:20px;margin:0;font-weight:600}
header .meta{opacity:.85;font-size:14px}
main{padding:10px 24px 30px;max-width:1240px}
section{background:#fff;border:1px solid #d9dde5;border-radius:8px;margin:16px 0;padding:12px 16px}
h2{font-size:17px;margin:2px 0 10px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #e8ebf0;vertical-align:middle}
th{font-size:13px;color:#566;font-weight:600;background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.uid{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;color:#445;word-break:break-all}
.badge{display:inline-block;padding:1px 9px;border-radius:10px;font-size:13px;font-weight:600;color:#fff}
.ok,.done,.sent{background:#2e7d32}.running,.sending{background:#1565c0}.queued,.pending,.open,.settled{background:#6d7580}
.failed,.dead,.bad,.timed_out{background:#c62828}.warn,.stalled,.unmatched{background:#e08a00}.paired{background:#4f6d8f}
.bar{width:220px;height:16px;background:#e3e7ee;border-radius:8px;overflow:hidden;display:inline-block;vertical-align:middle}
.bar>span{display:block;height:100%;background:#1565c0}
tr.row-done .bar>span{background:#2e7d32}
tr.row-failed td{background:#fff6f6}
.jobs td:nth-child(7){width:150px}
.pct{display:inline-block;width:48px;text-align:right;margin-right:6px;font-variant-numeric:tabular-nums}
.err{color:#b71c1c;font-size:13px}
.muted{color:#778;font-size:13px}
.checks{display:flex;gap:10px;flex-wrap:wrap;margin:0;padding:0;list-style:none}
.checks li{background:#fafbfc;border:1px solid #e1e4ea;border-radius:6px;padding:5px 10px;font-size:13px}
.sheets{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:14px}
figure{margin:0;border:1px solid #e1e4ea;border-radius:6px;padding:8px;background:#fafbfc}
figure img{width:100%;height:auto;display:block;border-radius:4px;background:#000}
figcaption{font-size:13px;margin-top:6px}
form{display:inline;margin:0}
button{font:inherit;font-size:13px;padding:2px 10px;border:1px solid #9aa5b8;border-radius:5px;background:#fff;cursor:pointer}
"""


def _badge(state: str | None, text: str | None = None) -> str:
    s = escape(state or "-")
    return f'<span class="badge {s}">{escape(text or state or "-")}</span>'


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _ago(t: float | None, now: float) -> str:
    return "-" if t is None else _duration(now - t) + " ago"


def _short(uid: str | None) -> str:
    """A UID's tail, enough to tell series apart on a screen; the full UID is in the title and the API."""
    if not uid:
        return "-"
    tail = uid if len(uid) <= 16 else "..." + uid[-13:]
    return f'<span class="uid" title="{escape(uid)}">{escape(tail)}</span>'


def _jobs(jobs: list[dict[str, Any]], now: float) -> str:
    if not jobs:
        return '<p class="muted">No jobs yet: a job is made when two series of a pipeline have settled.</p>'
    rows = []
    # the work in hand first (running, queued, failed), then the newest finished ones
    order = {"running": 0, "queued": 1, "failed": 2, "done": 3}
    shown = sorted(jobs, key=lambda j: (order.get(j["state"], 9), -j["id"]))[:40]
    for j in shown:
        p = j["progress"]
        bar = "-" if p is None else (f'<span class="pct">{p * 100:.0f}%</span>'
                                     f'<span class="bar"><span style="width:{p * 100:.1f}%"></span></span>')
        stage = escape(j["stage"] or ("-" if j["state"] != "done" else "delivered"))
        if j["stage"] == "fuse" and j["slices_total"]:
            stage += f' <span class="muted">{j["slices_done"] or 0}/{j["slices_total"]} slices</span>'
        if j["state"] == "running":
            when = f'running {_duration(j.get("elapsed_s"))}; ETA {_duration(j["eta_s"])}'
        elif j["state"] == "done":
            when = f'done {_ago(j["finished_at"], now)}'
        elif j["state"] == "failed":
            when = f'failed {_ago(j["finished_at"], now)}'
        else:
            when = f'queued {_ago(j["created_at"], now)}'
        notes = ""
        if j.get("stalled"):
            notes += f'{_badge("stalled")} <span class="err">no progress for {_duration(j["silent_s"])}</span> '
        reg = j["registration"] or {}
        if reg.get("warning"):
            notes += f'{_badge("warn", "CHECK REG")} '
        if j["error"]:
            notes += f'<div class="err">{escape(j["error"][:300])}</div>'
        action = ""
        if j["state"] == "failed":  # same version, same UIDs
            action = (f'<form method="post" action="/api/jobs/{j["id"]}/retry">'
                      f'<button type="submit">retry</button></form>')
        elif j["state"] == "done":  # only as an explicit new version (new UIDs, marked V2 …)
            action = (f'<form method="post" action="/api/jobs/{j["id"]}/retry?new_version=1">'
                      f'<button type="submit">new version</button></form>')
        rows.append(
            f'<tr class="row-{escape(j["state"])}"><td class="num">{j["id"]}</td><td>{escape(j["pipeline"])}</td>'
            f'<td>{_badge(j["state"])}</td><td>{stage}</td><td>{bar}</td><td>{when}</td>'
            f'<td>{_short(j["base_series_uid"])}<br>{_short(j["overlay_series_uid"])}</td><td>{notes}</td>'
            f'<td>{action}</td></tr>')
    head = ("<tr><th>job</th><th>pipeline</th><th>state</th><th>stage</th><th>progress</th><th>time</th>"
            "<th>base / overlay series</th><th>notes</th><th></th></tr>")
    return f'<table class="jobs">{head}{"".join(rows)}</table>'


def _series(series: list[dict[str, Any]], now: float) -> str:
    waiting = [s for s in series if s["state"] in ("open", "settled", "timed_out")]
    if not waiting:
        return '<p class="muted">No series waiting: every received series is paired or set aside.</p>'
    rows = []
    for s in waiting[-40:]:
        if s["state"] == "open":
            why = f'settles in {_duration(s.get("settles_in_s"))} unless more images arrive'
            if s["announced"]:
                why += f' ({s["instances"]}/{s["announced"]} announced)'
        elif s["state"] == "settled":
            why = f'waiting for a partner series for {_duration(s.get("waiting_for_partner_s"))}'
        else:
            why = escape(s["state_reason"] or "no partner arrived in time")
        rows.append(f'<tr><td>{escape(s["modality"] or "-")}</td><td>{escape(s["series_description"] or "")}</td>'
                    f'<td class="num">{s["instances"]}</td><td>{_badge(s["state"])}</td><td>{why}</td>'
                    f'<td>{_ago(s["last_received"], now)}</td><td>{_short(s["series_uid"])}</td></tr>')
    head = ("<tr><th>modality</th><th>description</th><th>images</th><th>state</th><th>waiting for</th>"
            "<th>last image</th><th>series UID</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _outbox(outbox: dict[str, Any], readiness: dict[str, Any]) -> str:
    rows = []
    for name, d in outbox["destinations"].items():
        st = d["states"]
        check = readiness["destinations"].get(name)
        echo = "-" if check is None else (_badge("ok", "answers") if check["ok"] else
                                          _badge("bad", "down") + f' <span class="err">{escape(check["detail"])}</span>')
        retry = ""
        if st["dead"]:
            retry = (f'<form method="post" action="/api/outbox/retry"><input type="hidden" name="destination" '
                     f'value="{escape(name)}"><button type="submit">retry {st["dead"]} dead</button></form>')
        err = f'<div class="err">{escape(d["last_error"][:200])}</div>' if d["last_error"] else ""
        rows.append(f'<tr><td><b>{escape(name)}</b></td><td>{echo}</td><td class="num">{d["depth"]}</td>'
                    f'<td>{_duration(d["oldest_age_s"]) if d["depth"] else "-"}</td>'
                    f'<td class="num">{st["sent"]}</td><td class="num">{st["dead"]}</td><td>{err}</td><td>{retry}</td></tr>')
    if not rows:
        return '<p class="muted">No destinations configured.</p>'
    head = ("<tr><th>destination</th><th>C-ECHO</th><th>waiting</th><th>oldest waiting</th><th>sent</th>"
            "<th>dead</th><th>last error</th><th></th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _dead(outbox: dict[str, Any], now: float) -> str:
    """Dead letters grouped by destination, job and error: a refused series is one line, not one per image."""
    dead = outbox["dead_letters"]
    if not dead:
        return '<p class="muted">None: every instance was delivered or is still being tried.</p>'
    groups: dict[tuple[str, int | None, str], list[dict[str, Any]]] = {}
    for d in dead:
        groups.setdefault((d["destination"], d["job_id"], d["last_error"] or ""), []).append(d)
    rows = []
    for (dest, job_id, error), items in sorted(groups.items(), key=lambda g: -max(i["updated_at"] for i in g[1])):
        ids = [i["id"] for i in items]
        rows.append(f'<tr><td>{escape(dest)}</td><td class="num">{job_id or "-"}</td><td class="num">{len(items)}</td>'
                    f'<td>{min(ids)}&ndash;{max(ids)}</td><td>{_ago(max(i["updated_at"] for i in items), now)}</td>'
                    f'<td><span class="err">{escape(error[:200])}</span></td></tr>')
    more = outbox["dead_letters_total"] - len(dead)
    tail = f'<p class="muted">and {more} older ones (GET /api/outbox)</p>' if more > 0 else ""
    head = ("<tr><th>destination</th><th>job</th><th>instances</th><th>outbox items</th><th>given up</th>"
            "<th>error</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>{tail}"


def _sheets(sheets: list[dict[str, Any]]) -> str:
    if not sheets:
        return '<p class="muted">No check sheets yet: one is drawn for every registered job.</p>'
    figs = []
    for s in sheets:
        t = s["translation_mm"] or []
        r = s["rotation_deg"] or []
        verdict = _badge("ok" if s["verdict"] == "ok" else "bad", s["verdict"] or "-")
        figures = (f'moved {", ".join(f"{v:.1f}" for v in t)} mm, turned {", ".join(f"{v:.1f}" for v in r)} deg; '
                   f'overlap {s["overlap"] if s["overlap"] is not None else "-"}')
        reason = f'<div class="err">{escape(s["reason"])}</div>' if s["verdict"] != "ok" and s["reason"] else ""
        figs.append(f'<figure><a href="/qc/{escape(s["check_sheet"])}"><img src="/qc/{escape(s["check_sheet"])}" '
                    f'alt="registration check sheet of job {s["job_id"]}" loading="lazy"></a>'
                    f'<figcaption><b>job {s["job_id"]}</b> {escape(s["pipeline"])} {verdict} '
                    f'<span class="muted">{escape(figures)}</span>{reason}</figcaption></figure>')
    return f'<div class="sheets">{"".join(figs)}</div>'


def _readiness(readiness: dict[str, Any]) -> str:
    items = []
    for name, c in readiness["checks"].items():
        items.append(f'<li>{_badge("ok" if c["ok"] else "bad", name)} {escape(c["detail"])}</li>')
    return f'<ul class="checks">{"".join(items)}</ul>'


def render(*, settings: NodeSettings, jobs: list[dict[str, Any]], series: list[dict[str, Any]],
           outbox: dict[str, Any], sheets: list[dict[str, Any]], readiness: dict[str, Any], uptime_s: float) -> str:
    now = time.time()
    refresh = settings.http.refresh_s
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j["state"]] = counts.get(j["state"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no jobs"
    failing = [n for n, c in readiness["checks"].items() if not c["ok"]]
    failing += [f"{n} down" for n, c in readiness["destinations"].items() if not c["ok"]]
    ready = _badge("ok", "ready") if readiness["ready"] else (
        _badge("bad", "not ready") + f' <span class="meta">{escape(", ".join(failing))}</span>')
    dead_total = outbox["dead_letters_total"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{refresh}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fusion-node {escape(settings.node.ae_title)}</title>
<style>{_CSS}</style></head>
<body>
<header><h1>fusion-node {escape(settings.node.ae_title)}</h1>{ready}
<span class="meta">version {__version__} &middot; up {_duration(uptime_s)} &middot; jobs: {escape(summary)}
&middot; dead letters: {dead_total} &middot; {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))},
reloads every {refresh} s</span></header>
<main>
<section><h2>Jobs</h2>{_jobs(jobs, now)}</section>
<section><h2>Series waiting to settle or for a partner</h2>{_series(series, now)}</section>
<section><h2>Outbox by destination</h2>{_outbox(outbox, readiness)}</section>
<section><h2>Dead letters</h2>{_dead(outbox, now)}</section>
<section><h2>Registration check sheets</h2>{_sheets(sheets)}</section>
<section><h2>Readiness</h2>{_readiness(readiness)}</section>
<p class="muted">JSON: <a href="/api/jobs">/api/jobs</a> <a href="/api/series">/api/series</a>
<a href="/api/outbox">/api/outbox</a> <a href="/api/registrations">/api/registrations</a> &middot;
<a href="/metrics">/metrics</a> &middot; <a href="/readyz">/readyz</a></p>
</main></body></html>
"""
