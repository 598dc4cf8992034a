"""Peak memory of a node receiving ``max_associations`` worst-case objects at once.

    python benchmarks/intake_memory.py [--n 10] [--out docs/reliability.md]

For each worst case a fresh ``fusion-node serve`` process (default ``[limits]``)
receives N copies over N concurrent associations; its peak RSS (VmHWM in
/proc) is compared with its idle RSS and with the documented bound
``idle + decode_concurrency x 4 x max_frame_bytes``.  The worst cases are
decode bombs (frame headers claiming far more than the stream holds),
frames exactly at ``limits.max_frame_pixels`` that really decode, and a
deflate bomb.  Prints a Markdown table; ``--out`` appends it to that file.
"""

from __future__ import annotations

import argparse
import copy
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from hostile_corpus import base_dataset, new_uid, part10
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, JPEGLossless, JPEGLSLossless
from pynetdicom import AE, _config
from test_hostile_intake import NodeProcess

from dicom_node.config import LimitsConfig

MiB = 1 << 20


def _compressed_4096(work: Path, tool: list[str]) -> bytes:
    """A real 4096 x 4096 16-bit frame compressed by DCMTK: it decodes, at exactly max_frame_pixels."""
    ds = base_dataset(rows=4096, columns=4096, seed=1)
    src, dest = work / "big.dcm", work / f"big-{tool[0]}{tool[1]}.dcm"
    ds.save_as(src, enforce_file_format=True)
    subprocess.run([f"/usr/bin/{tool[0]}", *tool[1:], str(src), str(dest)], check=True, capture_output=True)
    return dest.read_bytes()


def _patched(small: bytes, n: int, consistent: bool) -> bytes:
    """A 64 x 64 JPEG frame whose SOF says n x n (and Rows/Columns too when ``consistent``)."""
    import io

    ds = dcmread(io.BytesIO(small))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    pos = 2
    while frame[pos + 1] not in (0xC3, 0xF7, 0xC0, 0xC1):
        pos += 2 + struct.unpack(">H", frame[pos + 2:pos + 4])[0]
    frame = frame[:pos + 5] + struct.pack(">HH", n, n) + frame[pos + 9:]
    frame += b"\x00" * (len(frame) & 1)
    ds.PixelData = struct.pack("<HHI", 0xFFFE, 0xE000, 0) + struct.pack("<HHI", 0xFFFE, 0xE000, len(frame)) + frame
    ds["PixelData"].is_undefined_length = True
    if consistent:
        ds.Rows = ds.Columns = n
    return _with_uid(ds)


def _with_uid(ds) -> bytes:
    ds = copy.deepcopy(ds)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = new_uid()
    return part10(ds, meta={"TransferSyntaxUID": ds.file_meta.TransferSyntaxUID})


def _deflate_bomb(inflated: int) -> bytes:
    ds = base_dataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = part10(ds, meta={"TransferSyntaxUID": DeflatedExplicitVRLittleEndian})
    import io

    from dicom_node.dicom.structure import dataset_start

    start = dataset_start(io.BytesIO(head), len(head))[0]
    body = part10(ds)[start:]
    px = body.find(b"\xe0\x7f\x10\x00")
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [c.compress(body[:px] + struct.pack("<HH", 0x0029, 0x1010) + b"OB\x00\x00" + struct.pack("<I", inflated))]
    zeros = b"\x00" * MiB
    for _ in range(inflated // MiB):
        parts.append(c.compress(zeros))
    parts.append(c.compress(body[px:]) + c.flush())
    return head[:start] + b"".join(parts)


def _send_all(port: int, files: list[Path], ts: str) -> list[int | None]:
    statuses: list[int | None] = [None] * len(files)
    _config.STORE_SEND_CHUNKED_DATASET = True

    def one(i: int) -> None:
        ae = AE(ae_title=f"MEM{i}")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 300
        ae.add_requested_context(CTImageStorage, ts)
        assoc = ae.associate("127.0.0.1", port, ae_title="FUSIONNODE")
        if not assoc.is_established:
            return
        rsp = assoc.send_c_store(files[i])
        statuses[i] = int(rsp.Status) if rsp and "Status" in rsp else None
        assoc.release()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(files))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(name: str, make: Callable[[], bytes], ts: str, n: int, work: Path, **limits: int) -> dict:
    folder = work / name
    folder.mkdir()
    files = []
    for i in range(n):
        path = folder / f"{i}.dcm"
        path.write_bytes(make())
        files.append(path)
    node = NodeProcess(folder, **limits)
    try:
        time.sleep(1.0)
        idle = _rss_kib(node.proc.pid, "VmRSS")
        t0 = time.monotonic()
        statuses = _send_all(node.port, files, ts)
        seconds = time.monotonic() - t0
        peak = _rss_kib(node.proc.pid, "VmHWM")
    finally:
        node.stop()
    return {"name": name, "size": files[0].stat().st_size, "statuses": statuses, "idle_mib": idle / 1024,
            "peak_mib": peak / 1024, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10, help="concurrent associations (node.max_associations, default 10)")
    ap.add_argument("--out", type=Path, default=None, help="append the table to this Markdown file")
    args = ap.parse_args(argv)
    limits = LimitsConfig()
    # the suite's small test limits are not wanted here: the defaults are what is measured
    defaults = {"max_instance_bytes": limits.max_instance_bytes, "max_inflated_bytes": 256 * MiB}
    with tempfile.TemporaryDirectory(prefix="intake-mem-") as tmp:
        work = Path(tmp)
        (work / "src").mkdir()
        base = work / "src" / "small.dcm"
        base_dataset().save_as(base, enforce_file_format=True)
        small = {}
        for key, tool in (("jpeg-lossless", ["dcmcjpeg", "+el"]), ("jpeg-ls", ["dcmcjpls", "+el"])):
            dest = work / "src" / f"{key}.dcm"
            subprocess.run([f"/usr/bin/{tool[0]}", *tool[1:], str(base), str(dest)], check=True, capture_output=True)
            small[key] = dest.read_bytes()
        big_ll = dcmread(__import__("io").BytesIO(_compressed_4096(work / "src", ["dcmcjpeg", "+el"])))
        big_ls = dcmread(__import__("io").BytesIO(_compressed_4096(work / "src", ["dcmcjpls", "+el"])))
        cases = [
            ("JPEG lossless, SOF claims 16384² (Rows 64)", lambda: _patched(small["jpeg-lossless"], 16384, False),
             JPEGLossless),
            ("JPEG lossless, SOF and Rows/Columns 65500²", lambda: _patched(small["jpeg-lossless"], 65500, True),
             JPEGLossless),
            ("JPEG-LS, SOF55 claims 16384² (Rows 64)", lambda: _patched(small["jpeg-ls"], 16384, False),
             JPEGLSLossless),
            ("JPEG-LS, 64² stream, SOF55 and Rows/Columns 4096² (padded by CharLS)",
             lambda: _patched(small["jpeg-ls"], 4096, True), JPEGLSLossless),
            ("JPEG lossless, real 4096² 16-bit frame (at max_frame_pixels)", lambda: _with_uid(big_ll), JPEGLossless),
            ("JPEG-LS, real 4096² 16-bit frame (at max_frame_pixels)", lambda: _with_uid(big_ls), JPEGLSLossless),
            ("Deflated, 1 MB inflating to 1 GiB", lambda: _deflate_bomb(1 << 30), DeflatedExplicitVRLittleEndian),
        ]
        rows = []
        for name, make, ts in cases:
            r = measure(f"case{len(rows)}", make, ts, args.n, work, **defaults)
            r["label"] = name
            rows.append(r)
            print(f"{name}: {r['statuses']} peak {r['peak_mib']:.0f} MiB idle {r['idle_mib']:.0f} MiB "
                  f"{r['seconds']:.1f} s", flush=True)
    idle = min(r["idle_mib"] for r in rows)
    bound = idle + limits.decode_concurrency * 4 * limits.max_frame_bytes / MiB
    lines = [
        f"N = {args.n} concurrent associations, each sending one object; default `[limits]` "
        f"(decode_concurrency = {limits.decode_concurrency}, max_frame_bytes = {limits.max_frame_bytes // MiB} MiB; "
        f"the deflate bomb with max_inflated_bytes = 256 MiB, which does not change memory: it inflates to disk). "
        f"Documented bound: idle RSS + decode_concurrency × 4 × max_frame_bytes = {bound:.0f} MiB.",
        "",
        "| worst case (×N) | object size | statuses | node idle RSS | node peak RSS | peak / bound | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        st = ", ".join(sorted({"none" if s is None else f"0x{s:04X}" for s in r["statuses"]}))
        lines.append(f"| {r['label']} | {r['size'] / 1024:.0f} KiB | {st} | {r['idle_mib']:.0f} MiB | "
                     f"{r['peak_mib']:.0f} MiB | {r['peak_mib'] / bound:.2f} | {r['seconds']:.1f} s |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as fp:
            fp.write("\n" + text + "\n")
    return 0 if all(r["peak_mib"] <= bound for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
