"""Ingest: the node's C-STORE rate against the machine's durable-write ceiling, measured side by side.

    python benchmarks/ingest.py [--series ../shared/data/cirs057a/CT] [--repeat 3] [--associations 1 4]
                                [--database sqlite|postgresql|both]

In one run, on the file system of the node's store:

- **ceiling**: what durability alone costs per instance - write the file's
  bytes, fsync, rename into a folder, fsync the folder (the node's rule for
  a C-STORE it answers Success) - as images/s for the same files;
- **node, 1 association**: DCMTK ``storescu`` sends the series to a running
  node (``fusion-node serve``; every instance validated, decoded under the
  limits, written durably and indexed before Success); images/s from the
  first to the last instance indexed;
- **node, K associations**: K storescu processes at once, each sending its own
  copy of the series (new UIDs), so K series arrive in parallel;
- **storescp**: DCMTK's storescp on the same machine (no fsync), the network
  and DICOM parsing alone;
- **pynetdicom, no-op handler**: a pynetdicom AE set up as the node's
  listener is (datasets spooled to a file, 128 KiB PDUs, TCP_NODELAY) whose
  C-STORE handler only answers Success: what receiving costs in pynetdicom
  before the node does anything, the node's own ceiling in this process model;
- ``--baseline TREE``: the node of another checkout (e.g. the previous
  release, ``git archive``), measured in the same run, for before/after.

The node is sent to once its start-up self-check has finished
(``selfcheck.done`` in its log): the rate of a running node, not of one still
importing its fusion stack.  The storescp and no-op rows are timed from
storescu's start to its end (association included); the node's from its
first to its last instance indexed.

DCMTK (3.6.7 on Debian) leaves Nagle's algorithm on unless ``TCP_NODELAY=1``
is in its environment: without it every C-STORE on loopback waits ~40 ms for
a delayed ACK (22 images/s for storescu -> storescp, whatever the receiver).
The DCMTK tools here run with ``TCP_NODELAY=1``, as a scanner's DICOM stack
would send; the node sets TCP_NODELAY on its own sockets.

The ratio node/ceiling is the figure issue 15 asks for (≥ 0.9 on one
association).  With ``--database postgresql`` the node indexes into a
temporary PostgreSQL with fsync on (tests/postgres_server.py).  Appends a
table to ``docs/ingest.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import sqlalchemy
from dicom_helpers import dcmtk, free_port, wait_listening
from serve_process import stop_process

from benchmarks.report import append_section
from fusion.environment import child_environment, dcmtk_environment

#: the DCMTK tools' environment: Nagle off (see the module docstring)
DCMTK_ENV = dcmtk_environment()


def ceiling(files: list[Path], work: Path) -> float:
    """images/s of write + fsync + rename + directory fsync for these files' bytes."""
    tmp, final = work / "tmp", work / "final"
    tmp.mkdir(parents=True, exist_ok=True)
    final.mkdir(parents=True, exist_ok=True)
    blobs = [p.read_bytes() for p in files]
    t0 = time.perf_counter()
    for i, data in enumerate(blobs):
        part = tmp / f"{i}.part"
        with open(part, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, final / f"{i}.dcm")
        fd = os.open(final, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return len(blobs) / (time.perf_counter() - t0)


def ceiling_once(files: list[Path], work: Path) -> float:
    rate = ceiling(files, work / "ceiling")
    shutil.rmtree(work / "ceiling")
    return rate


def copies(series: Path, out: Path, n: int) -> list[Path]:
    """``n`` copies of the series with new Series/SOP Instance UIDs (one study), so each counts as new."""
    import pydicom
    from pydicom.uid import generate_uid

    folders = []
    for k in range(n):
        folder = out / f"copy{k}"
        folder.mkdir(parents=True)
        series_uid = generate_uid()
        for p in sorted(series.iterdir()):
            ds = pydicom.dcmread(p)
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(folder / p.name)
        folders.append(folder)
    return folders


def node_rate(work: Path, folders: list[Path], url: str = "", tree: Path = REPO) -> float:
    """images/s of a node (the one in ``tree``) receiving ``folders`` over one association each, all at once."""
    port = free_port()
    root = work / f"node-{uuid.uuid4().hex[:6]}"
    root.mkdir()
    config = root / "node.toml"
    config.write_text(f"""
[node]
ae_title = "FUSIONNODE"
host = "127.0.0.1"
port = {port}
max_associations = 16
[http]
enabled = false
[storage]
root = "{root / 'data'}"
{f'database_url = "{url}"' if url else ''}
[settle]
quiet_seconds = 3600
""")
    log = open(root / "node.log", "w")
    node = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)],
                            env=child_environment(tree), cwd=tree, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_listening(port, node)
        wait_started(root / "node.log", node)
        senders = [subprocess.Popen([dcmtk("storescu"), "-aet", "SCANNER", "-aec", "FUSIONNODE", "+sd",
                                     "127.0.0.1", str(port), str(f)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, env=DCMTK_ENV) for f in folders]
        for s in senders:
            _, err = s.communicate(timeout=900)
            if s.returncode != 0:
                raise RuntimeError(f"storescu failed: {err.decode()[-1000:]}")
        # read with SQLAlchemy itself, so the same script measures older versions of the node too
        engine = sqlalchemy.create_engine(url or f"sqlite:///{root / 'data' / 'node.sqlite'}")
        with engine.connect() as conn:
            row = conn.exec_driver_sql("SELECT COUNT(*) AS n, MIN(received_at) AS t0, MAX(received_at) AS t1"
                                       " FROM instances").mappings().one()
        engine.dispose()
        expected = sum(len(list(f.iterdir())) for f in folders)
        if row["n"] != expected:
            raise RuntimeError(f"{row['n']} of {expected} instances indexed")
        # n - 1 intervals between the first and the last instance indexed
        return (row["n"] - 1) / (row["t1"] - row["t0"])
    finally:
        stop_process(node, 30)
        log.close()


def wait_started(log: Path, node: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until the node has logged the end of its start-up self-check (it imports the fusion stack meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and node.poll() is None:
        if "selfcheck.done" in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the node did not finish its self-check in {timeout} s:\n{log.read_text()[-2000:]}")


def noop_scp(port: int) -> None:
    """A pynetdicom AE configured as the node's listener is, whose C-STORE handler does nothing (``--noop-scp``)."""
    from pydicom.uid import CTImageStorage
    from pynetdicom import AE, _config, evt

    from dicom_node.net.association import no_delay
    from dicom_node.net.listener import RECEIVE_PDU_BYTES
    from dicom_node.net.storage_scp import STORAGE_TRANSFER_SYNTAXES

    _config.STORE_RECV_CHUNKED_DATASET = True
    ae = AE(ae_title="NOOP")
    ae.maximum_pdu_size = RECEIVE_PDU_BYTES
    ae.add_supported_context(CTImageStorage, list(STORAGE_TRANSFER_SYNTAXES))
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[
        (evt.EVT_C_STORE, lambda event: 0x0000), (evt.EVT_ACCEPTED, lambda event: no_delay(event.assoc))])


def noop_rate(folder: Path) -> float:
    """images/s of storescu -> :func:`noop_scp` in its own process."""
    port = free_port()
    scp = subprocess.Popen([sys.executable, __file__, "--noop-scp", str(port)], env=child_environment(REPO),
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, scp)
        n = len(list(folder.iterdir()))
        t0 = time.perf_counter()
        subprocess.run([dcmtk("storescu"), "-aec", "NOOP", "+sd", "127.0.0.1", str(port), str(folder)], check=True,
                       capture_output=True, timeout=600, env=DCMTK_ENV)
        return n / (time.perf_counter() - t0)
    finally:
        scp.kill()
        scp.wait(10)


def storescp_rate(work: Path, folder: Path) -> float:
    port = free_port()
    out = work / f"scp-{uuid.uuid4().hex[:6]}"
    out.mkdir()
    scp = subprocess.Popen([dcmtk("storescp"), "-od", str(out), str(port)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=DCMTK_ENV)
    try:
        wait_listening(port, scp)
        n = len(list(folder.iterdir()))
        t0 = time.perf_counter()
        subprocess.run([dcmtk("storescu"), "+sd", "127.0.0.1", str(port), str(folder)], check=True,
                       capture_output=True, timeout=600, env=DCMTK_ENV)
        return n / (time.perf_counter() - t0)
    finally:
        scp.kill()
        scp.wait(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=Path, default=REPO.parent / "shared" / "data" / "cirs057a" / "CT")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--database", choices=("sqlite", "postgresql", "both"), default="sqlite")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "ingest.md")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another checkout of the node, measured in the same run (before/after)")
    ap.add_argument("--noop-scp", type=int, default=None, help=argparse.SUPPRESS)  # the child of noop_rate
    args = ap.parse_args(argv)
    if args.noop_scp is not None:
        noop_scp(args.noop_scp)
        return 0

    load_before = _load()
    work = Path(tempfile.mkdtemp(prefix="fusion-ingest-"))
    rows: list[dict[str, float]] = []
    spread: list[float] = []
    try:
        folders = copies(args.series, work / "input", max(args.associations))
        files = sorted(folders[0].iterdir())
        engines = ["sqlite", "postgresql"] if args.database == "both" else [args.database]
        pg = None
        if "postgresql" in engines:
            from postgres_server import PostgresServer

            pg = PostgresServer(durable=True).start()
        try:
            for _ in range(args.repeat):
                # the disk's fsync time varies by 10x within minutes here (other tenants' writes): the ceiling
                # is measured before, between and after the receivers, and its median taken
                ceilings = [ceiling_once(files, work)]
                line = {"ceiling": 0.0, "storescp": storescp_rate(work, folders[0]), "noop": noop_rate(folders[0])}
                ceilings.append(ceiling_once(files, work))
                trees = [("", REPO)] + ([("baseline ", args.baseline.resolve())] if args.baseline else [])
                for engine in engines:
                    for k in args.associations:
                        for label, tree in trees:
                            url = pg.create_database() if engine == "postgresql" and pg else ""
                            line[f"{label}{engine}-{k}"] = node_rate(work, folders[:k], url, tree)
                ceilings.append(ceiling_once(files, work))
                line["ceiling"] = statistics.median(ceilings)
                spread.extend(ceilings)
                print({key: round(v, 1) for key, v in line.items()}, "ceilings:", [round(c) for c in ceilings],
                      flush=True)
                rows.append(line)
        finally:
            if pg is not None:
                pg.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keys = list(rows[0])
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    n = len(list(args.series.iterdir()))
    table = [f"| what | images/s (median of {len(rows)}) | ratio to the ceiling |", "|---|---|---|"]
    for k in keys:
        engine, _, k_assoc = k.partition("-")
        who = "node"
        if engine.startswith("baseline "):
            who, engine = f"baseline node ({args.baseline.name})", engine.removeprefix("baseline ")
        label = {"ceiling": "durable-write ceiling (write, fsync, rename, dir fsync)",
                 "storescp": "DCMTK storescp, no fsync",
                 "noop": "pynetdicom as the node's listener, no-op handler, no fsync",
                 }.get(k, f"{who}, {engine}, {k_assoc} association(s)")
        table.append(f"| {label} | {med[k]:.1f} | {med[k] / med['ceiling']:.2f} |")
    heading = (f"\n### Measured {time.strftime('%Y-%m-%d')}: {n} instances of {args.series.name} "
               f"({sum(p.stat().st_size for p in args.series.iterdir()) / n / 1024:.0f} KiB each), "
               f"{os.cpu_count()} cores\n\n")
    command = (f"\n\n`python benchmarks/ingest.py --repeat {args.repeat} --associations "
               f"{' '.join(map(str, args.associations))} --database {args.database}"
               f"{f' --baseline {args.baseline}' if args.baseline else ''}`; "
               f"load average before/after: {load_before} / {_load()}; the ceiling ranged "
               f"{min(spread):.0f}-{max(spread):.0f} images/s over the run's {len(spread)} measurements\n")
    append_section(args.out, "# Ingest: the node against the durable-write ceiling\n", heading + "\n".join(table) + command)
    return 0


def _load() -> str:
    """The 1-minute load average (the machine is shared: a figure only means something beside it)."""
    return f"{os.getloadavg()[0]:.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
