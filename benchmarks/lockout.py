"""How long an allowed caller waits behind connections that never associate (issue 11's lockout figures).

    python benchmarks/lockout.py [--code DIR] [--idle 25] [--closed 25] [--silent-tls 5]

Starts the node's listener in this process (plain and TLS ports; certificates
made with ``openssl``), then:

1. plain: opens ``--idle`` TCP connections that send nothing and ``--closed``
   that close at once, and times DCMTK ``echoscu`` until it is answered
   (retrying every 0.5 s while it is refused);
2. TLS: opens ``--silent-tls`` TCP connections to the TLS port that send
   nothing, and times ``echoscu +tls`` likewise.

Each figure comes with the same echo timed with nobody in the way, in the same
run.  ``--code DIR`` imports ``dicom_node`` from another checkout (the figures
before a change).  Prints a Markdown table; docs/reliability.md quotes it.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ECHOSCU = "/usr/bin/echoscu"
NODE_AE = "FUSIONNODE"


def _pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, with openssl."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    p = {k: folder / f"{k}.pem" for k in ("ca", "ca-key", "node", "node-key", "client", "client-key")}
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", "/CN=bench-ca", "-keyout", str(p["ca-key"]), "-out", str(p["ca"]),
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, ext in (("node", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        csr = folder / f"{name}.csr"
        extfile = folder / f"{name}.ext"
        extfile.write_text(ext + "\n")
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
            "-keyout", str(p[f"{name}-key"]), "-out", str(csr))
        run("x509", "-req", "-in", str(csr), "-CA", str(p["ca"]), "-CAkey", str(p["ca-key"]), "-CAcreateserial",
            "-days", "2", "-out", str(p[name]), "-extfile", str(extfile))
    return p


def _echo(port: int, tls: list[str]) -> bool:
    proc = subprocess.run([ECHOSCU, *tls, "-aec", NODE_AE, "127.0.0.1", str(port)], capture_output=True, timeout=120)
    return proc.returncode == 0


def _until_answered(port: int, tls: list[str], limit_s: float) -> float:
    start = time.monotonic()
    while not _echo(port, tls):
        if time.monotonic() - start > limit_s:
            return float("inf")
        time.sleep(0.5)
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", type=Path, default=REPO, help="checkout to import dicom_node from (default: this one)")
    ap.add_argument("--idle", type=int, default=25)
    ap.add_argument("--closed", type=int, default=25)
    ap.add_argument("--silent-tls", type=int, default=5)
    ap.add_argument("--limit", type=float, default=120.0, help="give up waiting after this many seconds")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.code.resolve()))
    from dicom_node.config import parse_config
    from dicom_node.index.store import Store
    from dicom_node.net.listener import Listener
    from dicom_node.net.storage_scp import StorageService

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pki = _pki(folder)
        node = {"ae_title": NODE_AE, "host": "127.0.0.1", "port": 0, "allowed_addresses": ["127.0.0.0/8"],
                "tls": {"enabled": True, "port": 0, "certificate": str(pki["node"]), "private_key": str(pki["node-key"]),
                        "ca_certificates": str(pki["ca"])}}
        cfg = parse_config({"node": node, "storage": {"root": str(folder / "data")}})
        store = Store(cfg.storage.root, cfg.storage.database_path)
        listener = Listener(cfg, [StorageService(store)]).start()
        tls = ["+tls", str(pki["client-key"]), str(pki["client"]), "+cf", str(pki["ca"])]
        rows = []
        try:
            start = time.monotonic()
            assert _echo(listener.port, [])
            alone = time.monotonic() - start
            idle = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(args.idle)]
            for _ in range(args.closed):
                socket.create_connection(("127.0.0.1", listener.port)).close()
            time.sleep(0.2)
            waited = _until_answered(listener.port, [], args.limit)
            rows.append((f"plain: {args.idle} idle + {args.closed} closed connections", waited, alone))
            for s in idle:
                s.close()
            time.sleep(1)
            start = time.monotonic()
            assert _echo(listener.tls_port, tls)
            alone = time.monotonic() - start
            silent = [socket.create_connection(("127.0.0.1", listener.tls_port)) for _ in range(args.silent_tls)]
            time.sleep(0.2)
            waited = _until_answered(listener.tls_port, tls, args.limit)
            rows.append((f"TLS: {args.silent_tls} silent TLS peers", waited, alone))
            for s in silent:
                s.close()
        finally:
            listener.stop()
    print(f"code: {args.code.resolve()}\n")
    print("| case | allowed echoscu answered after (s) | same echo alone (s) |\n|---|---|---|")
    for name, waited, alone in rows:
        print(f"| {name} | {waited:.2f} | {alone:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
