"""``fusion-node``: the operator's command line.

``serve`` runs the node; ``init-config`` writes a commented example config;
``status``, ``trigger``, ``jobs`` and ``outbox`` inspect and steer a node's
database; ``fuse`` fuses two image files; ``evaluate`` scores a fused image
(fusion-quality metrics, papers' or VIFB's convention); ``demo`` is the embedded default job;
``models fetch|info`` provisions the VGG16 weights ahead of time; ``worker``
starts a Dask worker for ``[executor] kind = "dask"``.  Errors are
printed as one line saying what to do; ``--debug`` shows the traceback.

Listing and status commands print tables for a person and JSON with
``--json``; the global options (``--config``, ``--json``, ``--log-level``,
``--log-format``, ``--debug``) may come before or after the subcommand.

Exit status: 0 done; 1 an unexpected error (one line; ``--debug`` for the
traceback); 2 bad input (arguments, config file, unknown id); 3 a missing
resource (weights, the node's database); 4 ``status``: the node is not
running; 141 the reader of the output went away (``| head``), silently;
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dicom_node import logs

if TYPE_CHECKING:
    from dicom_node.config import NodeSettings
    from dicom_node.index.store import SeriesRecord, Store
    from dicom_node.outbox import Outbox
    from dicom_node.workflow.jobs import Job, JobQueue
    from fusion.features import VGG16Features

log = logging.getLogger("dicom_node.cli")

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_RESOURCE = 3
#: the command was understood but the state of what it names refuses it (e.g. retrying a running job)
EXIT_FAILED = 1
EXIT_NOT_RUNNING = 4
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader closed


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _trio(text: str) -> tuple[str, ...]:
    names = tuple(t.strip().lower() for t in text.split(",") if t.strip())
    if len(names) < 2:
        raise argparse.ArgumentTypeError("a trio names at least two methods, e.g. adf,cbf,fpde")
    return names


def _load_model_or_fail(feature_source: str, device: str) -> VGG16Features | None:
    """The VGG model when DMF needs it, turning missing weights into an operator message."""
    if feature_source != "vgg":
        return None
    from fusion.backend import resolve_device
    from fusion.features import load_vgg16
    from fusion.weights import WeightsUnavailableError

    try:
        return load_vgg16(device=resolve_device(device))
    except WeightsUnavailableError as exc:
        raise CliError(str(exc), EXIT_RESOURCE) from exc


def cmd_fuse(args: argparse.Namespace) -> int:
    from fusion import fuse
    from fusion.allocator import keep_freed_memory
    from fusion.api import resolve_trio, uses_vgg
    from fusion.imageio import read_image, write_image

    for p in (args.base, args.overlay):
        if not p.exists():
            raise CliError(f"input not found: {p}")
    a, b = read_image(args.base), read_image(args.overlay)
    model = None
    if uses_vgg(args.method, args.feature_source):
        keep_freed_memory()  # the VGG stage's large blocks: docs/speed-vgg.md, "system time"
        model = _load_model_or_fail(args.feature_source, args.device)
    t0 = time.perf_counter()
    try:
        # the library's rule: the overlay's modality when given, else colour = PET, grey = CT
        trio = resolve_trio(args.trio, args.modality, colour=b.ndim == 3 and b.shape[-1] == 3, method=args.method)
        out = fuse(a, b, method=args.method, trio=trio or None, device=args.device,
                   feature_source=args.feature_source, model=model)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    write_image(args.output, out)
    log.info("fuse.done", extra=logs.fields(method=args.method, trio=",".join(trio),
                                             seconds=round(time.perf_counter() - t0, 3), output=str(args.output)))
    print(args.output)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from fusion.metrics import CONVENTIONS, evaluate

    for p in (args.fused, args.src_a, args.src_b):
        if not p.exists():
            raise CliError(f"input not found: {p}")
    try:
        scores = evaluate(args.fused, args.src_a, args.src_b, convention=args.convention, gray=args.gray)
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from exc
    suite = CONVENTIONS[args.convention]
    if args.json:
        print(json.dumps({"convention": args.convention, "fused": str(args.fused),
                          "sources": [str(args.src_a), str(args.src_b)],
                          "metrics": {k: (v if np.isfinite(v) else None) for k, v in scores.items()}}, indent=2))
        return 0
    print(f"{args.fused} vs {args.src_a}, {args.src_b} -- {suite.description}")
    for name, value in scores.items():
        print(f"  {name:5s} {value:12.5g}{'   (lower is better)' if name in suite.lower_is_better else ''}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from dicom_node import provision
    from fusion import weights

    if args.action == "fetch":
        try:
            path = provision.fetch_vgg16(force=args.force)
        except weights.WeightsUnavailableError as exc:
            raise CliError(str(exc), EXIT_RESOURCE) from exc
        print(f"VGG16 weights ready: {path}")
        return 0
    info = weights.weights_info()
    if args.json:
        _print_json(info)
        return 0
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fusion_demo import demo

    if args.pairs_only:
        return demo.run_pair_demo(args.out, device=args.device, max_pairs=args.pairs)
    return demo.run_node_demo(args.out, device=args.device, sample=args.sample)


def _settings(args: argparse.Namespace) -> NodeSettings:
    from dicom_node.config import ConfigError, load_config

    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc


def cmd_init_config(args: argparse.Namespace) -> int:
    from dicom_node.config import EXAMPLE_TOML

    if args.path.exists() and not args.force:
        raise CliError(f"{args.path} exists; pass --force to overwrite it")
    args.path.write_text(EXAMPLE_TOML)
    print(f"wrote {args.path}; edit AE titles, destinations and pipelines, then: fusion-node serve --config {args.path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from dicom_node.errors import NodeError
    from dicom_node.web.readiness import weights_needed
    from dicom_node.web.runtime import start_node
    from fusion.allocator import keep_freed_memory

    settings = _settings(args)
    if weights_needed(settings):  # only the VGG stage was shown to gain (docs/speed-vgg.md, "system time");
        keep_freed_memory()       # before the worker threads start; a pipeline added by a reload goes without
    _configure_logs(args, settings)
    try:
        running = start_node(settings)
    except NodeError as exc:
        raise CliError(exc.operator_message) from exc
    node = running.node
    cfg = node.settings.node
    ports = [f"TLS port {node.tls_port}"] if node.tls_port is not None else []
    if cfg.plain_enabled:
        ports.insert(0, f"port {node.port}")
    aes = [cfg.ae_title, *(p.ae_title for p in node.settings.pipelines if p.ae_title)]
    print(f"fusion-node listening as {', '.join(aes)} on {' and '.join(ports)}; Ctrl-C or SIGTERM stops "
          f"(within {cfg.shutdown_timeout_s:g} s), SIGHUP reloads {args.config}", flush=True)
    print(f"status page and API at {running.url}" if running.url else "HTTP side disabled ([http] enabled = false)",
          flush=True)
    received: list[str] = []  # handlers only set flags; the main loop logs (no lock taken in a signal handler)

    def on_stop(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        node.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_stop)
    signal.signal(signal.SIGHUP, lambda *_: node.request_reload())
    while node.wait() == "reload":
        log.info("node.signal", extra=logs.fields(signal="SIGHUP", action="reload"))
        node.reload(args.config)
    log.info("node.signal", extra=logs.fields(signal=received[0] if received else None, action="stop"))
    running.stop()  # the node (listener, jobs, outbox), then the HTTP side, readiness and notifications
    # Everything is committed and the log flushed: exit now.  Interpreter teardown (torch, SimpleITK,
    # thread joins) took 1-7 s under load and could crash under a job thread still inside a native
    # call (a registration released at the deadline), turning a clean stop into a failure status.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _offline_node(args: argparse.Namespace) -> tuple[NodeSettings, Store, JobQueue, Outbox]:
    """The node's database parts without the network side, for inspection commands."""
    from dicom_node.index import db
    from dicom_node.index.store import Store, StoreError
    from dicom_node.outbox import Outbox
    from dicom_node.workflow.jobs import JobQueue, node_identity

    settings = _settings(args)
    db_path = settings.storage.database_path
    if not settings.storage.database_url and not db_path.is_file():  # never a silently created empty store
        raise CliError(f"no node database at {db_path} (from [storage] in {args.config}); check the config path "
                       "and [storage] root/database, or start the node once with `fusion-node serve`", EXIT_RESOURCE)
    database = db.Database(settings.storage.database_location)
    owner = node_identity(settings.storage.root)
    store, jobs = Store(settings.storage.root, database), JobQueue(database, owner=owner)
    # a running node may own 'sending' rows: an inspection never takes them over
    outbox = Outbox(database, settings, recover_interrupted=False, owner=owner)
    try:
        store.ensure_schema()
    except StoreError as exc:  # its message says what is wrong with the database
        raise CliError(exc.operator_message, EXIT_RESOURCE) from exc
    return settings, store, jobs, outbox


# -- output for a person (tables) or a program (--json) ---------------------------------------------


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, default=str))


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], empty: str = "(none)") -> None:
    """Columns padded to their widest cell; the last column is left ragged (errors, reasons)."""
    if not rows:
        print(empty)
        return
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths[:-1])) + ("  " if len(r) > 1 else "") + r[-1])


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _age(ts: float | None, now: float | None = None) -> str:
    """The age of ``ts`` (``heartbeat.age_text``); empty when unknown."""
    from dicom_node.workflow.heartbeat import age_text

    return "" if ts is None else age_text((time.time() if now is None else now) - ts)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _states(counts: dict[str, int], order: Sequence[str]) -> str:
    return ", ".join(f"{k} {counts.get(k, 0)}" for k in order if counts.get(k, 0)) or "none"


def worker_command(settings: NodeSettings, *, scheduler: str | None = None, name: str | None = None,
                   resources: str | None = None, nanny: bool = False) -> list[str]:
    """The ``dask worker`` command line of a fusion worker for this node's configuration.

    One thread (one job at a time: a job already uses every core, or the
    GPU), the fusion task module preloaded (a missing or broken install fails
    at start, not at the first job), and no nanny by default: Dask's nanny
    starts the worker with ``OMP_NUM_THREADS=1`` (its
    ``distributed.nanny.pre-spawn-environ``), which leaves torch one core for
    the VGG stage.  Let systemd or the container runtime restart a worker
    that died instead.
    """
    address = scheduler or settings.executor.scheduler
    if not address:
        raise CliError("no Dask scheduler: set [executor] kind = \"dask\" and scheduler = \"tcp://HOST:8786\" "
                       "in the node's configuration, or pass --scheduler")
    cmd = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
           "--preload", "dicom_node.workflow.remote"]
    if not nanny:
        cmd.append("--no-nanny")
    if name:
        cmd += ["--name", name]
    if resources:
        cmd += ["--resources", resources]
    return cmd


def cmd_worker(args: argparse.Namespace) -> int:
    """Start a Dask worker for the node's jobs: checks the shared storage first, then becomes ``dask worker``."""
    settings = _settings(args)
    cmd = worker_command(settings, scheduler=args.scheduler, name=args.name, resources=args.resources,
                         nanny=args.nanny)
    root = Path(os.path.abspath(settings.storage.root))
    if not (root / "instances").is_dir():
        raise CliError(f"this machine does not see the node's storage at {root} (no instances/ folder there): "
                       "mount [storage] root at the same path as on the node (a shared file system), then start "
                       "the worker again", EXIT_RESOURCE)
    try:
        import distributed  # noqa: F401 - only whether it is installed
    except ImportError:
        raise CliError("Dask is not installed here: pip install 'dicom-fusion-node[dask]'", EXIT_RESOURCE) from None
    if args.print:
        print(" ".join(cmd))
        return 0
    os.execv(cmd[0], cmd)  # the worker's signals and exit status are dask's own from here



def cmd_status(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from dicom_node.states import JobState, SeriesState
    from dicom_node.workflow.heartbeat import heartbeat_path, read_liveness

    settings, store, jobs, outbox = _offline_node(args)
    db_path = settings.storage.database_path
    live = read_liveness(heartbeat_path(db_path, settings.storage.instance))
    counts, job_counts, per_dest = store.counts(), jobs.counts(), outbox.summary()
    if args.json:
        _print_json({"node": live.as_dict(), "config": str(Path(args.config).resolve()), "database": str(db_path),
                     "series": asdict(counts), "jobs": {s.value: job_counts.get(s.value, 0) for s in JobState},
                     "outbox": per_dest})
    else:
        print(f"node:     {live.summary}")
        print(f"database: {db_path}")
        print(f"series:   {counts.series} in {counts.studies} studies, {counts.instances} instances, "
              f"{_size(counts.bytes)}; {_states(counts.series_by_state, [s.value for s in SeriesState])}")
        print(f"jobs:     {_states(job_counts, [s.value for s in JobState])}")
        print("outbox:")
        _table(["  DESTINATION", "PENDING", "SENDING", "SENT", "DEAD"],
               [[f"  {d}", c["pending"], c["sending"], c["sent"], c["dead"]] for d, c in per_dest.items()],
               empty="  (no destinations)")
    return 0 if live.running else EXIT_NOT_RUNNING


def _series_doc(s: SeriesRecord) -> dict:
    """A series for ``series list --json``: no patient name, ID or birth date (use the PACS for those)."""
    keys = ("series_uid", "study_uid", "modality", "series_description", "series_number", "body_part",
            "instance_count", "announced_count", "state", "state_reason", "origin", "study_date",
            "study_description")
    doc = {k: getattr(s, k) for k in keys}
    for k in ("first_received", "last_received", "state_changed"):
        doc[k] = _iso(getattr(s, k))
    return doc


def cmd_series(args: argparse.Namespace) -> int:
    _, store, _, _ = _offline_node(args)
    found = store.list_series(state=args.state, origin=args.origin)
    if args.json:
        _print_json([_series_doc(s) for s in found])
        return 0
    _table(["SERIES UID", "MOD", "IMAGES", "STATE", "ORIGIN", "LAST IMAGE", "DESCRIPTION", "REASON"],
           [[s.series_uid, s.modality or "", s.instance_count, s.state, s.origin, _age(s.last_received) + " ago",
             s.series_description or "", s.state_reason or ""] for s in found],
           empty="no series" + (f" in state {args.state}" if args.state else ""))
    return 0


def _series_label(store: Store, uid: str) -> str:
    s = store.get_series(uid)
    return f"{s.modality or '?'}/{s.instance_count}" if s is not None else "?"


def _job_doc(job: Job, store: Store) -> dict:
    doc = {k: getattr(job, k) for k in ("id", "state", "pipeline", "version", "attempts", "interruptions",
                                          "retries", "base_series_uid", "overlay_series_uid", "error", "result")}
    doc["lease"] = {"owner": job.lease_owner, "run": job.lease_run, "expires": _iso(job.lease_expires)}
    doc["checkpoint"] = sorted((job.checkpoint or {}).keys())
    for k in ("created_at", "started_at", "finished_at"):
        doc[k] = _iso(getattr(job, k))
    doc["base_series"] = _series_label(store, job.base_series_uid)
    doc["overlay_series"] = _series_label(store, job.overlay_series_uid)
    return doc


def _took(job: Job) -> str:
    start, end = job.started_at, job.finished_at
    if start is None:
        return ""
    if end is None or end < start:
        return f"running {_age(start)}"
    return f"{end - start:.1f} s"


def cmd_trigger(args: argparse.Namespace) -> int:
    from dicom_node.workflow.pairing import Pairing
    from dicom_node.workflow.settle import Settler

    settings, store, jobs_queue, _ = _offline_node(args)
    try:
        Settler(settings, store).trigger(args.series_uid)
    except KeyError as exc:
        raise CliError(str(exc)) from exc
    jobs = Pairing(settings, store, jobs_queue).pair_settled()
    print(f"series {args.series_uid} settled; new jobs: {jobs or 'none (partner missing or job exists)'}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    _, store, jobs, _ = _offline_node(args)
    from dicom_node.workflow.jobs import JobStateError, retry_job

    if args.action == "retry":
        if not args.ids:
            raise CliError("name the job(s) to retry: `fusion-node jobs retry ID ...`")
        errors = []
        unknown = [i for i in args.ids if jobs.get(i) is None]
        if unknown:  # bad input (exit 2), not a refusal by the job's state (exit 1)
            raise CliError(f"no job {', '.join(map(str, unknown))}; `fusion-node jobs list` shows the jobs")
        for job_id in args.ids:
            try:
                again = retry_job(jobs, job_id, new_version=args.new_version)
            except JobStateError as exc:
                errors.append(exc.operator_message)
                continue
            print(f"job {again.id} queued again (version {again.version}, retry {again.retries}); "
                  "a running node picks it up")
        if errors:
            raise CliError("; ".join(errors), code=EXIT_FAILED)
        return 0
    if args.action == "show":
        if not args.ids:
            raise CliError("name the job id(s) to show, e.g. `fusion-node jobs show 3`")
        shown = []
        for job_id in args.ids:
            job = jobs.get(job_id)
            if job is None:
                raise CliError(f"no job {job_id}; `fusion-node jobs list` shows them")
            shown.append(_job_doc(job, store))
        if args.json:
            _print_json(shown if len(shown) > 1 else shown[0])
            return 0
        for doc in shown:
            print(f"job {doc['id']}: {doc['state']}  pipeline {doc['pipeline']}  version {doc['version']}  "
                  f"attempts {doc['attempts']}  interrupted {doc['interruptions']}  retried {doc['retries']}")
            print(f"  base     {doc['base_series']:8s} {doc['base_series_uid']}")
            print(f"  overlay  {doc['overlay_series']:8s} {doc['overlay_series_uid']}")
            print(f"  created  {doc['created_at']}  started {doc['started_at'] or '-'}  finished {doc['finished_at'] or '-'}")
            if doc["lease"]["owner"]:
                print(f"  lease    {doc['lease']['owner']} until {doc['lease']['expires'] or '-'}")
            if doc["checkpoint"]:
                print(f"  saved    {', '.join(doc['checkpoint'])} (a restart resumes after them)")
            if doc["error"]:
                print(f"  error    {doc['error']}")
            for key, value in (doc["result"] or {}).items():
                print(f"  {key:8s} {json.dumps(value, default=str)}")
        return 0
    found = jobs.list(args.state)
    if args.json:
        _print_json([_job_doc(j, store) for j in found])
        return 0
    _table(["ID", "STATE", "PIPELINE", "BASE", "OVERLAY", "TRIES", "VER", "INTERRUPTED", "RETRIED", "CREATED",
            "TOOK", "ERROR"],
           [[j.id, j.state, j.pipeline, _series_label(store, j.base_series_uid),
             _series_label(store, j.overlay_series_uid), j.attempts, j.version, j.interruptions, j.retries,
             _age(j.created_at) + " ago", _took(j),
             (j.error or "").splitlines()[0][:100] if j.error else ""] for j in found],
           empty="no jobs" + (f" in state {args.state}" if args.state else ""))
    return 0


def cmd_outbox(args: argparse.Namespace) -> int:
    _, _, _, outbox = _offline_node(args)
    if args.action == "retry":
        ids = [i for group in args.ids for i in group]
        n = outbox.retry(ids or None, destination=args.destination, series_uid=args.series)
        print(f"{n} item(s) due again; a running node sends them")
        return 0
    if args.items:
        items = outbox.list(state=args.state, destination=args.destination)
        if args.json:
            _print_json([{**{k: getattr(i, k) for k in ("id", "destination", "state", "attempts", "job_id",
                                                          "series_uid", "sop_instance_uid", "last_status",
                                                          "last_error")},
                          "path": str(i.path), "next_attempt_at": _iso(i.next_attempt_at),
                          "created_at": _iso(i.created_at), "updated_at": _iso(i.updated_at)} for i in items])
            return 0
        _table(["ID", "DESTINATION", "STATE", "TRIES", "JOB", "SOP INSTANCE UID", "LAST ERROR"],
               [[i.id, i.destination, i.state, i.attempts, i.job_id or "", i.sop_instance_uid, i.last_error or ""]
                for i in items], empty="outbox empty")
        return 0
    from dicom_node.outbox.queue import id_ranges

    groups = outbox.groups(state=args.state, destination=args.destination)
    health = outbox.destination_health()
    if args.json:
        _print_json({"groups": [{"destination": g.destination, "job_id": g.job_id, "series_uid": g.series_uid,
                                 "state": g.state, "items": g.count, "max_attempts": g.max_attempts,
                                 "oldest": _iso(g.oldest), "last_update": _iso(g.last_update),
                                 "last_error": g.last_error, "ids": list(g.ids),
                                 **({"retry": g.retry_command} if g.state == "dead" else {})} for g in groups],
                     "failing_destinations": {n: {**h, "failing_since": _iso(h["failing_since"])}
                                              for n, h in health.items()}})
        return 0
    _table(["DESTINATION", "JOB", "STATE", "ITEMS", "TRIES", "QUEUED", "IDS", "SERIES", "LAST ERROR"],
           [[g.destination, g.job_id or "-", g.state, g.count, g.max_attempts, _age(g.oldest) + " ago",
             id_ranges(g.ids), g.series_uid or "-", g.last_error or ""] for g in groups], empty="outbox empty")
    dead = [g for g in groups if g.state == "dead"]
    if dead:
        print(f"{sum(g.count for g in dead)} dead letter(s) in {len(dead)} series; send them again with:")
        for g in dead:
            print(f"  {g.retry_command}")
    for name, h in health.items():
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["failing_since"]))
        print(f"destination {name} failing since {since}: {h['last_error']}")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from dicom_node.workflow.retention import DAY_S, Retention

    settings, store, _, _ = _offline_node(args)
    report = Retention(settings, store).purge(dry_run=args.dry_run)
    space = report.free_before
    print(f"disk: {space.free_percent:.1f}% free ({space.free_bytes / 1e9:.1f} GB) under {settings.storage.root}; "
          f"watermark {settings.retention.min_free_percent:g}%, reserve {settings.retention.reserve_free_percent:g}%"
          + (" -- BELOW THE WATERMARK" if report.below_watermark else ""))
    verb = "would purge" if args.dry_run else "purged"
    for v in report.purged:
        print(f"{verb}: {v.origin:8s} {v.state:9s} {v.series_uid} {v.instances} instance(s) "
              f"{v.size_bytes / 1e6:.1f} MB, {v.age_s / DAY_S:.2f} days: {v.reason}")
    if args.explain:
        for v in report.kept:
            print(f"keep: {v.origin:8s} {v.state:9s} {v.series_uid} {v.instances} instance(s): {v.reason}")
    print(f"{verb} {len(report.purged)} series, {report.bytes_purged / 1e6:.1f} MB; kept {len(report.kept)}"
          + ("" if args.explain else " (--explain says why)"))
    return 0


def _id_list(text: str) -> list[int]:
    from dicom_node.outbox.queue import parse_id_ranges

    try:
        return parse_id_ranges(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an outbox id list; write e.g. 12, or 1-40,45") from None


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _level(text: str) -> str:
    if text.upper() not in _LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level; use one of {', '.join(_LEVELS)}")
    return text.upper()


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes; after the subcommand they default to 'not given' (SUPPRESS)
    so that a value given before it is kept."""
    def d(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--config", type=Path, default=d(Path("node.toml")), help="node config (default ./node.toml)")
    parser.add_argument("--json", action="store_true", default=d(False), help="print JSON instead of tables")
    parser.add_argument("--log-level", type=_level, default=d(None),
                        help="DEBUG, INFO, WARNING or ERROR (default: [logging] level, else INFO)")
    parser.add_argument("--log-format", choices=("auto", "json", "console"), default=d(None),
                        help="log lines on stderr: console on a terminal, JSON otherwise (default: [logging] format)")
    parser.add_argument("--debug", action="store_true", default=d(False), help="show tracebacks")


class _Subparsers:
    """``add_subparsers()`` whose every command also takes the global options."""

    def __init__(self, action: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
        self._action, self._common = action, common

    def add_parser(self, name: str, **kw: object) -> argparse.ArgumentParser:
        return self._action.add_parser(name, parents=[self._common], **kw)  # type: ignore[arg-type]  # argparse's kwargs are untyped


def build_parser() -> argparse.ArgumentParser:
    from dicom_node import __version__
    from dicom_node.states import SeriesState
    from fusion.api import DEFAULT_METHOD, fusion_methods

    p = argparse.ArgumentParser(prog="fusion-node", description=__doc__.splitlines()[0],
                                epilog="exit status: 0 done, 1 unexpected error, 2 bad input, 3 missing resource "
                                       "(weights, database), 4 status: node not running")
    p.add_argument("--version", action="version", version=f"fusion-node {__version__}")
    _global_options(p, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)  # the same options after the subcommand
    sub = _Subparsers(p.add_subparsers(dest="command", required=True, metavar="COMMAND"), common)

    f = sub.add_parser("fuse", help="fuse two registered images (PNG/JPEG/.npy) into one")
    f.add_argument("base", type=Path, help="anatomical image (MRI)")
    f.add_argument("overlay", type=Path, help="CT, PET or SPECT image (colour kept in chroma)")
    f.add_argument("-o", "--output", type=Path, required=True, help="output .png (8-bit) or .npy (float32 0..1)")
    f.add_argument("--method", default=DEFAULT_METHOD, type=str.lower, choices=fusion_methods(),
                   help=f"fusion method (default {DEFAULT_METHOD}, docs/fidelity.md): {', '.join(fusion_methods())}")
    f.add_argument("--modality", type=str.upper, choices=("CT", "PT", "NM"), default=None,
                   help="the overlay's modality, which picks DMF's default trio "
                        "(default: PT for a colour overlay, CT for a grey one)")
    f.add_argument("--trio", type=_trio, default=None,
                   help="DMF exposures, e.g. cbf,tif,wls (default: per modality, see --modality)")
    f.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    f.add_argument("--feature-source", default="vgg", choices=("vgg", "image"),
                   help="gradients from VGG16 features (default) or the plain image")
    f.set_defaults(func=cmd_fuse)

    e = sub.add_parser("evaluate", help="fusion-quality metrics of a fused image against its two sources")
    e.add_argument("fused", type=Path, help="fused image (PNG/JPEG)")
    e.add_argument("src_a", type=Path, help="first source (MRI; VIFB's VI role)")
    e.add_argument("src_b", type=Path, help="second source (CT/PET/SPECT; VIFB's IR role)")
    e.add_argument("--convention", choices=("papers", "vifb"), default="papers",
                   help="papers: CDDFuse Evaluator on luminance (default); vifb: VIFB's MATLAB metrics")
    e.add_argument("--gray", action="store_true", help="with --convention vifb: rgb2gray colour images first")
    e.set_defaults(func=cmd_evaluate)

    m = sub.add_parser("models", help="VGG16 weights: fetch ahead of time, or show what is installed")
    m.add_argument("action", choices=("fetch", "info"))
    m.add_argument("--force", action="store_true", help="fetch again even if cached")
    m.set_defaults(func=cmd_models)

    def with_config(parser):
        return parser  # --config is a global option (before or after the subcommand)

    ic = sub.add_parser("init-config", help="write a commented example configuration")
    ic.add_argument("path", type=Path, nargs="?", default=Path("node.toml"))
    ic.add_argument("--force", action="store_true")
    ic.set_defaults(func=cmd_init_config)

    with_config(sub.add_parser("serve", help="run the node (SCP, pairing, jobs, outbox)")).set_defaults(func=cmd_serve)
    w = with_config(sub.add_parser("worker", help="run a Dask worker for this node's jobs ([executor] kind = "
                                                 "\"dask\"); the node's [storage] root must be mounted here"))
    w.add_argument("--scheduler", help="the scheduler's address (default: [executor] scheduler)")
    w.add_argument("--name", help="the worker's name at the scheduler (default: its address)")
    w.add_argument("--resources", help="resources it offers, e.g. \"GPU=1\" (with [executor] resources = {GPU = 1})")
    w.add_argument("--nanny", action="store_true",
                   help="under a Dask nanny (restarts it; but limits torch to one thread unless Dask's "
                        "distributed.nanny.pre-spawn-environ is changed)")
    w.add_argument("--print", action="store_true", help="only print the dask worker command line")
    w.set_defaults(func=cmd_worker)
    with_config(sub.add_parser("status", help="is the node running; counts of series, jobs and outgoing items "
                                              "(exit 4 when the node is not running)")).set_defaults(func=cmd_status)
    se = sub.add_parser("series", help="list the series the node holds: state, images, age, why (no patient data)")
    se.add_argument("action", choices=("list",))
    se.add_argument("--state", choices=[s.value for s in SeriesState])
    se.add_argument("--origin", choices=("received", "derived"))
    se.set_defaults(func=cmd_series)
    t = with_config(sub.add_parser("trigger", help="declare a series complete now and pair it"))
    t.add_argument("series_uid")
    t.set_defaults(func=cmd_trigger)
    j = with_config(sub.add_parser("jobs", help="list fusion jobs, show one (error, timings, registration quality), "
                                                "or retry failed ones"))
    j.add_argument("action", choices=("list", "show", "retry"))
    j.add_argument("ids", type=int, nargs="*")
    j.add_argument("--state", choices=("queued", "running", "done", "failed"))
    j.add_argument("--new-version", action="store_true",
                   help="with retry of a done job: make a new version (new UIDs, 'v2' in the descriptions)")
    j.set_defaults(func=cmd_jobs)
    o = with_config(sub.add_parser("outbox", help="list outgoing instances by series (dead letters first), or make "
                                                  "dead/pending ones due again"))
    o.add_argument("action", choices=("list", "retry"))
    o.add_argument("ids", type=_id_list, nargs="*", help="retry: these items, e.g. 12 15 or 1-40,45")
    o.add_argument("--state", choices=("pending", "sending", "sent", "dead"))
    o.add_argument("--destination")
    o.add_argument("--series", metavar="UID", help="retry: only the items of this series")
    o.add_argument("--items", "--instances", dest="items", action="store_true",
                   help="list: one line per instance (default: per destination, job, series and state)")
    o.set_defaults(func=cmd_outbox)

    pg = with_config(sub.add_parser("purge", help="delete what retention allows: series fused and delivered, or "
                                                  "never fused, past their age limits ([retention])"))
    pg.add_argument("--dry-run", action="store_true", help="only list what would go, and why")
    pg.add_argument("--explain", action="store_true", help="also list what is kept, and why")
    pg.set_defaults(func=cmd_purge)

    d = sub.add_parser("demo", help="embedded demo: a node receives a CT+MR pair, fuses it, sends it to a local "
                                    "destination; PNG previews (no services needed)")
    d.add_argument("--sample", choices=("synthetic", "cirs"), default="synthetic",
                   help="generated phantom pair (default, ~1 min) or the real CIRS phantom pair from ../shared")
    d.add_argument("--pairs-only", action="store_true", help="instead: fuse Harvard image pairs into PNG montages")
    d.add_argument("--out", type=Path, default=Path("demo-output"), help="folder for the PNGs (default ./demo-output)")
    d.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    d.add_argument("--pairs", type=int, default=2, help="with --pairs-only: pairs per modality subset (default 2)")
    d.set_defaults(func=cmd_demo)
    return p


def _configure_logs(args: argparse.Namespace, settings: NodeSettings | None = None) -> None:
    """Command-line options over the config's [logging]; only ``serve`` writes the config's log file."""
    cfg = settings.logging if settings is not None else None
    logs.configure(args.log_level or (cfg.level if cfg else "INFO"), args.log_format or (cfg.format if cfg else "auto"),
                   file=cfg.file if cfg else None, file_max_bytes=cfg.file_max_bytes if cfg else 50_000_000,
                   file_backup_count=cfg.file_backup_count if cfg else 10)


def main(argv: Sequence[str] | None = None) -> int:
    from dicom_node.errors import NodeError

    args = build_parser().parse_args(argv)
    _configure_logs(args)
    try:
        return args.func(args)
    except CliError as exc:
        if args.debug:
            raise
        print(f"fusion-node: error: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        # the reader went away (`fusion-node jobs list | head -1`): stop quietly, and keep Python's
        # shutdown flush of stdout from raising again
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130
    except NodeError as exc:
        if args.debug:
            raise
        print(f"fusion-node: error: {exc.operator_message}", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as exc:  # an operator gets one line, not a traceback; --debug shows it
        if args.debug:
            raise
        print(f"fusion-node: unexpected error: {type(exc).__name__}: {exc} (run again with --debug for the "
              "traceback, and report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
