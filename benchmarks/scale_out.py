"""N generated pairs through the embedded node and through Dask with 1, 2 and 4 workers: throughput and latency.

    python benchmarks/scale_out.py [--pairs 8] [--workers 1 2 4] [--quiet 1]

Each configuration gets a fresh node process (``fusion-node serve``), a fresh
database and a DCMTK ``storescp`` as the PACS (``--unique-filenames``, so an
instance delivered twice would show as two files):

- ``embedded``: the default - SQLite, the jobs in the node's own thread (``workers = 1``);
- ``dask-K``: PostgreSQL (a temporary cluster with fsync on, tests/postgres_server.py),
  ``[executor] kind = "dask"`` with ``workers = K`` jobs in flight, and a Dask
  scheduler with K worker processes (``--nthreads 1``) on this machine.

The N pairs (the generated CT+MR phantom, a new study each) are sent one
after the other, each pair by one storescu association per series, as fast
as the node takes them.  Per pair: *last image → delivered* is from the last
instance of the pair received (the series' ``last_received``) to the last
derived instance acknowledged by the PACS (its outbox row's ``updated_at``).
Throughput is N over first image received → last delivered.  Also checked:
every pair delivered exactly once (N SC series, no duplicate file).

On a machine with C cores, more than C workers only share the cores: the
figures then show the layout's overheads, not a site's speed-up
(docs/scale-out.md says what to expect where workers have their own cores).
Appends a table to ``docs/scale-out.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from dask_cluster import DaskCluster
from dicom_helpers import dcmtk, free_port, storescu, wait_listening
from postgres_server import PostgresServer
from serve_process import pacs_pipeline_toml, start_serve, stop_process

from benchmarks.report import append_section
from dicom_node.index import db
from fusion.environment import dcmtk_environment

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
#: DCMTK leaves Nagle on unless told: ~40 ms per C-STORE on loopback otherwise (docs/ingest.md)
DCMTK_ENV = dcmtk_environment()


def _config(folder: Path, *, port: int, pacs_port: int, quiet: float, url: str = "", scheduler: str = "",
            workers: int = 1) -> Path:
    path = folder / "node.toml"
    path.write_text(pacs_pipeline_toml(
        port=port, root=folder / "data", pacs_port=pacs_port, pacs_ae="PACS", top=f"workers = {workers}",
        storage=f'database_url = "{url}"' if url else "", quiet_seconds=quiet, feature_source="vgg",
        sections=f'[executor]\nkind = "dask"\nscheduler = "{scheduler}"' if scheduler else ""))
    return path


def run_config(name: str, work: Path, pairs: list[tuple[Path, Path]], *, quiet: float, workers: int,
               pg: PostgresServer | None) -> dict:
    folder = work / name
    folder.mkdir(parents=True)
    pacs_dir = folder / "pacs"
    pacs_dir.mkdir()
    pacs_port, port = free_port(), free_port()
    pacs_log = open(folder / "storescp.log", "wb")
    pacs = subprocess.Popen([dcmtk("storescp"), "-aet", "PACS", "-od", str(pacs_dir), "--unique-filenames",
                             str(pacs_port)], stdout=pacs_log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    cluster = None
    url = pg.create_database(name.replace("-", "_")) if pg else ""
    try:
        wait_listening(pacs_port, pacs, folder / "storescp.log")
        if pg is not None:
            cluster = DaskCluster(folder / "dask", workers=workers)
        config = _config(folder, port=port, pacs_port=pacs_port, quiet=quiet, url=url,
                         scheduler=cluster.address if cluster else "", workers=workers)
        log = folder / "node.log"
        node = start_serve(config, port, log)
        try:
            database = db.Database(url or folder / "data" / "node.sqlite")
            t0 = time.time()
            for ct, mr in pairs:
                for series in (ct, mr):
                    storescu(port, series, env=DCMTK_ENV, timeout=600).check_returncode()
            sent_s = time.time() - t0
            deadline = time.monotonic() + 3600
            while time.monotonic() < deadline:
                jobs = database.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
                states = {r["state"]: r["n"] for r in jobs}
                waiting = database.execute("SELECT COUNT(*) FROM outbox WHERE state <> 'sent'").fetchone()[0]
                if states.get("failed"):
                    raise RuntimeError(f"{name}: a job failed: {database.execute('SELECT error FROM jobs').fetchall()}")
                if states.get("done", 0) == len(pairs) and waiting == 0:
                    break
                if node.poll() is not None:
                    raise RuntimeError(f"{name}: the node exited: {log.read_text()[-3000:]}")
                time.sleep(0.5)
            else:
                raise TimeoutError(f"{name}: not all pairs delivered within an hour")
            rows = database.execute(
                "SELECT j.id, j.result, (SELECT MAX(s.last_received) FROM series s WHERE s.series_uid IN"
                " (j.base_series_uid, j.overlay_series_uid)) AS last_in,"
                " (SELECT MAX(o.updated_at) FROM outbox o WHERE o.job_id = j.id) AS delivered,"
                " (SELECT MIN(s.first_received) FROM series s WHERE s.series_uid IN"
                " (j.base_series_uid, j.overlay_series_uid)) AS first_in FROM jobs j ORDER BY j.id").fetchall()
            database.close()
        finally:
            stop_process(node, 60)
    finally:
        if cluster is not None:
            cluster.close()
        pacs.kill()
        pacs.wait(10)
        pacs_log.close()
    latencies = [r["delivered"] - r["last_in"] for r in rows]
    span = max(r["delivered"] for r in rows) - min(r["first_in"] for r in rows)
    import pydicom

    files = [p for p in pacs_dir.iterdir() if p.is_file()]
    sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    sc_series = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in files
                 if str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) == SC_CLASS}
    results = [json.loads(r["result"]) for r in rows]
    compute = [sum(v for k, v in (res.get("seconds") or {}).items() if k in ("load", "register", "prepare", "fuse",
                                                                             "encode")) for res in results]
    return {"config": name, "pairs": len(pairs), "workers": workers, "send_s": round(sent_s, 1),
            "span_s": round(span, 1), "pairs_per_h": round(len(pairs) / span * 3600, 1),
            "latency_median_s": round(statistics.median(latencies), 1), "latency_max_s": round(max(latencies), 1),
            "job_compute_median_s": round(statistics.median(compute), 1),
            "sc_series": len(sc_series), "files": len(files), "duplicates": len(sops) - len(set(sops)),
            "executors": sorted({str((res.get("executor") or {}).get("worker", "local")) for res in results})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--quiet", type=float, default=1.0, help="settle quiet period, s")
    ap.add_argument("--no-embedded", action="store_true", help="leave out the embedded default's run")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "scale-out.md")
    args = ap.parse_args(argv)

    from fusion_demo.samples import write_synthetic_pair

    work = Path(tempfile.mkdtemp(prefix="fusion-scale-"))
    load_before = os.getloadavg()[0]
    try:
        pairs = [write_synthetic_pair(work / "input" / f"pair{i}", seed=11 + i) for i in range(args.pairs)]
        out = []
        if not args.no_embedded:
            out.append(run_config("embedded", work, pairs, quiet=args.quiet, workers=1, pg=None))
            print(json.dumps(out[-1]), flush=True)
        with PostgresServer(durable=True) as pg:
            for k in args.workers:
                out.append(run_config(f"dask-{k}", work, pairs, quiet=args.quiet, workers=k, pg=pg))
                print(json.dumps(out[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = out[0]["pairs_per_h"] if out and out[0]["config"] == "embedded" else None
    lines = ["| configuration | pairs | throughput (pairs/h) | vs embedded | last image → delivered, median (s) | "
             "max (s) | job compute, median (s) | SC series at the PACS | duplicate files |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in out:
        ratio = f"{r['pairs_per_h'] / base:.2f}×" if base else "—"
        lines.append(f"| {r['config']} | {r['pairs']} | {r['pairs_per_h']} | {ratio} | {r['latency_median_s']} | "
                     f"{r['latency_max_s']} | {r['job_compute_median_s']} | {r['sc_series']} | {r['duplicates']} |")
    cores = os.cpu_count()
    heading = (f"\n### Measured {time.strftime('%Y-%m-%d')}: {cores} cores, {args.pairs} generated pairs, "
               f"quiet period {args.quiet:g} s; load average {load_before:.1f} before, "
               f"{os.getloadavg()[0]:.1f} after\n\n")
    command = f"\n\n`python benchmarks/scale_out.py --pairs {args.pairs} --workers {' '.join(map(str, args.workers))}`\n"
    append_section(args.out, "# Scale-out\n", heading + "\n".join(lines) + command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
