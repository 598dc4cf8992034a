"""DICOM TLS on both sides, with a PKI made by the tests: the node's TLS listener against DCMTK and
pynetdicom callers, and the outbox against DCMTK ``storescp +tls``.

Certificates are made with ``cryptography`` (a dev dependency) rather than the
``openssl`` command: no OpenSSL CLI version or config file to depend on.  EC
P-256 keys: fast to make, and inside DCMTK's default BCP 195 profile.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from dicom_helpers import UID_PREFIX, RunningSCP, dcmtk, free_port, json_logs, make_image, write
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.config import (
    ConfigError,
    DestinationTLS,
    DicomDestination,
    NodeConfig,
    NodeSettings,
    NodeTLS,
    OutboxConfig,
    StorageConfig,
    load_config,
    parse_config,
)
from dicom_node.index.store import Store
from dicom_node.net import tls
from dicom_node.outbox import Outbox

NODE_AE = "FUSIONNODE"

# -- a throw-away PKI -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


@dataclass(frozen=True)
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    #: PEM file of the CA certificate: what ``ca_certificates`` and DCMTK's ``+cf`` take
    pem: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=not ca,
                         encipher_only=False, decipher_only=False)


def make_ca(folder: Path, name: str) -> CA:
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    pem = folder / f"{name}-ca.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CA(cert, key, pem)


def issue(ca: CA, folder: Path, name: str, *, server: bool = False, client: bool = False,
          dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> Pem:
    """A leaf certificate signed by ``ca`` (SAN = ``dns`` + ``ips``) and its unencrypted key."""
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca.cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_key_usage(ca=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False))
    names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert_path, key_path = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    cert_path.write_bytes(builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return Pem(cert_path, key_path)


@dataclass(frozen=True)
class PKI:
    ca: CA
    other_ca: CA
    node: Pem  # the node's server certificate (localhost, 127.0.0.1)
    scu: Pem  # a caller's client certificate from ca
    stranger: Pem  # a client certificate from other_ca
    pacs: Pem  # a destination's server certificate (localhost, 127.0.0.1)
    misnamed: Pem  # a destination's server certificate that names another host
    node_client: Pem  # the node's client certificate for destinations that require one


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(d, "hospital"), make_ca(d, "elsewhere")
    return PKI(
        ca=ca, other_ca=other,
        node=issue(ca, d, "node", server=True, dns=("localhost",), ips=("127.0.0.1",)),
        scu=issue(ca, d, "modality", client=True),
        stranger=issue(other, d, "stranger", client=True),
        pacs=issue(ca, d, "pacs", server=True, dns=("localhost",), ips=("127.0.0.1",)),
        misnamed=issue(ca, d, "misnamed", server=True, dns=("pacs.example.invalid",)),
        node_client=issue(ca, d, "node-client", client=True),
    )


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def capture():
    """JSON log lines of the node's loggers, as dicts."""
    with json_logs("dicom_node.net.listener", "dicom_node.net.tls", "dicom_node.outbox") as log:
        yield log.events


def node_settings(tmp_path: Path, pki: PKI, *, plain: bool = True, require_client: bool = True,
                  timeout: float = 10.0, artim: float = 10.0) -> NodeSettings:
    node_tls = NodeTLS(enabled=True, port=0, certificate=pki.node.cert, private_key=pki.node.key,
                       ca_certificates=pki.ca.pem, require_client_certificate=require_client)
    return NodeSettings(
        node=NodeConfig(ae_title=NODE_AE, host="127.0.0.1", port=0, plain_enabled=plain, network_timeout_s=timeout,
                        artim_timeout_s=artim, tls=node_tls),
        storage=StorageConfig(root=tmp_path / "data"),
    )


@pytest.fixture
def start_node(tmp_path, pki):
    started: list[RunningSCP] = []

    def start(**kw) -> RunningSCP:
        cfg = node_settings(tmp_path, pki, **kw)
        server = RunningSCP(cfg, Store(cfg.storage.root, cfg.storage.database_path))
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


def tls_args(pem: Pem, ca_pem: Path) -> list[str]:
    """DCMTK options: authenticated TLS with ``pem``, trusting ``ca_pem`` (default profile: BCP 195 non-downgrading)."""
    return ["+tls", str(pem.key), str(pem.cert), "+cf", str(ca_pem)]


def run(tool: str, *args: str | Path, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk(tool), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def pynetdicom_echo(port: int, context: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE,
                         tls_args=(context, "localhost") if context is not None else None)
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()


def client_context(ca_pem: Path, pem: Pem | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_pem))
    if pem is not None:
        ctx.load_cert_chain(str(pem.cert), str(pem.key))
    return ctx


# -- the node's TLS listener --------------------------------------------------------------------


def test_dcmtk_echo_and_store_over_tls_beside_the_plain_port(start_node, pki, tmp_path, capture):
    server = start_node()
    assert server.tls_port and server.tls_port != server.port
    echo = run("echoscu", "-v", *tls_args(pki.scu, pki.ca.pem), "-aet", "MODALITY", "-aec", NODE_AE,
               "127.0.0.1", server.tls_port)
    assert echo.returncode == 0 and "Received Echo Response (Success)" in echo.stdout + echo.stderr, echo

    ds = make_image(sop_uid=generate_uid(UID_PREFIX))
    path = write(ds, tmp_path / "in" / "ct.dcm")
    store = run("storescu", "-v", *tls_args(pki.scu, pki.ca.pem), "-aet", "MODALITY", "-aec", NODE_AE,
                "127.0.0.1", server.tls_port, path)
    assert store.returncode == 0 and "Received Store Response (Success)" in store.stdout + store.stderr, store
    rec = server.store.get_instance(ds.SOPInstanceUID)
    assert rec is not None and rec.calling_ae == "MODALITY" and rec.called_ae == NODE_AE
    assert dcmread(rec.path).SOPInstanceUID == ds.SOPInstanceUID

    plain = run("echoscu", "-aec", NODE_AE, "127.0.0.1", server.port)  # the plain port still answers
    assert plain.returncode == 0, plain
    accepted = capture("scp.association.accepted")
    assert [a["tls"] for a in accepted] == [True, True, False]
    # a TLS client on the plain port, or a plain one on the TLS port, gets nowhere
    assert run("echoscu", *tls_args(pki.scu, pki.ca.pem), "-aec", NODE_AE, "127.0.0.1", server.port).returncode != 0
    assert run("echoscu", "-aec", NODE_AE, "127.0.0.1", server.tls_port, timeout=30).returncode != 0


def test_callers_without_a_trusted_certificate_are_refused(start_node, pki, capture):
    server = start_node()
    stranger = run("echoscu", "-v", *tls_args(pki.stranger, pki.ca.pem), "-aec", NODE_AE,
                   "127.0.0.1", server.tls_port)
    assert stranger.returncode != 0 and "Echo Response" not in stranger.stdout + stranger.stderr
    assert not pynetdicom_echo(server.tls_port, client_context(pki.ca.pem))  # no client certificate at all
    assert pynetdicom_echo(server.tls_port, client_context(pki.ca.pem, pki.scu))  # the same client, with one

    refused = capture("scp.tls.refused")
    assert len(refused) >= 2 and all(r["address"] == "127.0.0.1" for r in refused)
    assert "certificate verify failed" in refused[0]["reason"], refused
    assert not capture("scp.association.rejected")  # refused before any DICOM was spoken
    assert len(capture("scp.association.accepted")) == 1

    # the caller checks the node too: a modality that trusts another CA does not talk to it
    wary = run("echoscu", *tls_args(pki.stranger, pki.other_ca.pem), "-aec", NODE_AE, "127.0.0.1", server.tls_port)
    assert wary.returncode != 0


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_client_certificate_optional_and_old_tls_refused(start_node, pki, capture):
    server = start_node(require_client=False)
    assert pynetdicom_echo(server.tls_port, client_context(pki.ca.pem))  # anonymous client, verified server

    old = client_context(pki.ca.pem)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")  # let the client offer TLS 1.1: the refusal must be the node's
    assert not pynetdicom_echo(server.tls_port, old)
    reasons = [r["reason"] for r in capture("scp.tls.refused")]
    assert reasons and any("protocol" in r or "version" in r for r in reasons), reasons


def test_plain_port_can_be_switched_off(start_node, pki):
    server = start_node(plain=False)
    assert server.port == server.tls_port
    assert server.listener._bound("plain") is None
    echo = run("echoscu", *tls_args(pki.scu, pki.ca.pem), "-aec", NODE_AE, "127.0.0.1", server.port)
    assert echo.returncode == 0, echo


def test_silent_tls_peers_do_not_delay_a_tls_caller(start_node, pki, capture):
    """Handshakes run in each connection's own thread: 5 peers that connect and say nothing delay nobody.

    pynetdicom's server handshakes in its one accepting thread; before issue 11 each silent peer cost every
    TLS caller the handshake timeout (~10 s each).  The ARTIM timer then closes the silent ones.
    """
    server = start_node(artim=3.0)
    args = (*tls_args(pki.scu, pki.ca.pem), "-aec", NODE_AE, "127.0.0.1", server.tls_port)
    start = time.monotonic()
    assert run("echoscu", *args).returncode == 0
    alone = time.monotonic() - start  # the same echo with nobody in the way, this machine, this moment
    silent = [socket.create_connection(("127.0.0.1", server.tls_port)) for _ in range(5)]
    try:
        time.sleep(0.2)
        start = time.monotonic()
        echo = run("echoscu", *args)
        waited = time.monotonic() - start
        assert echo.returncode == 0, echo
        print(f"TLS echoscu behind 5 silent TLS peers: {waited:.2f} s (alone: {alone:.2f} s)")
        assert waited < max(1.0, 3 * alone), (waited, alone)
        deadline = time.monotonic() + 10
        while len(capture("scp.tls.refused")) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for s in silent:
            s.close()
    refused = capture("scp.tls.refused")
    assert len(refused) == 5 and all("timed out" in r["reason"] for r in refused), refused


# -- the outbox to a TLS destination ------------------------------------------------------------


class TlsStorescp:
    """DCMTK storescp with TLS (it requires and verifies a client certificate by default)."""

    def __init__(self, folder: Path, pem: Pem, ca_pem: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = folder.parent / f"storescp-{self.port}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([dcmtk("storescp"), "-od", str(folder), "-aet", "PACS",
                                          *tls_args(pem, ca_pem), str(self.port)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:  # a plain TCP connect only: storescp shrugs off the failed handshake
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"storescp +tls did not start: {self.log.read_text()}") from None
                time.sleep(0.05)

    def received(self) -> set[str]:
        return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.folder.iterdir()}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def storescp(tmp_path, pki):
    started: list[TlsStorescp] = []

    def start(pem: Pem) -> TlsStorescp:
        scp = TlsStorescp(tmp_path / f"pacs{len(started)}", pem, pki.ca.pem)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def outbox_for(tmp_path: Path, port: int, dest_tls: DestinationTLS, name: str) -> Outbox:
    settings = NodeSettings(
        node=NodeConfig(ae_title="FUSIONTEST", network_timeout_s=5),
        destinations=[DicomDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port, tls=dest_tls)],
        outbox=OutboxConfig(max_attempts=3, backoff_initial_s=0.05, backoff_max_s=0.1),
    )
    return Outbox(tmp_path / f"{name}.sqlite", settings)


def sc_files(folder: Path, n: int) -> list[Path]:
    series, study = generate_uid(UID_PREFIX), generate_uid(UID_PREFIX)
    return [write(make_image(study_uid=study, series_uid=series, instance_number=i + 1), folder / f"{i}.dcm")
            for i in range(n)]


def test_outbox_sends_over_tls_to_dcmtk_storescp(tmp_path, pki, storescp, capture):
    pacs = storescp(pki.pacs)
    files = sc_files(tmp_path / "out", 2)
    with outbox_for(tmp_path, pacs.port, DestinationTLS(ca_certificates=pki.ca.pem, certificate=pki.node_client.cert,
                                                        private_key=pki.node_client.key), "ok") as ob:
        ob.enqueue("pacs", files)
        assert ob.process_due() == {"sent": 2, "retried": 0, "dead": 0}
    assert pacs.received() == {str(dcmread(f).SOPInstanceUID) for f in files}
    done = capture("outbox.association.done")
    assert done and done[0]["tls"] is True and done[0]["sent"] == 2


@pytest.mark.parametrize("case, expected", [
    ("untrusted", ["not trusted", "certificate verify failed", "elsewhere-ca.pem"]),
    ("no_client_cert", ["refused", "client certificate"]),
    ("misnamed", ["does not name '127.0.0.1'", "verify_hostname"]),
])
def test_outbox_tls_failures_are_named(tmp_path, pki, storescp, capture, case, expected):
    pacs = storescp(pki.misnamed if case == "misnamed" else pki.pacs)
    client = dict(certificate=pki.node_client.cert, private_key=pki.node_client.key)
    dest_tls = {
        "untrusted": DestinationTLS(ca_certificates=pki.other_ca.pem, **client),
        "no_client_cert": DestinationTLS(ca_certificates=pki.ca.pem),
        "misnamed": DestinationTLS(ca_certificates=pki.ca.pem, **client),
    }[case]
    with outbox_for(tmp_path, pacs.port, dest_tls, case) as ob:
        ob.enqueue("pacs", sc_files(tmp_path / "out", 1))
        assert ob.process_due() == {"sent": 0, "retried": 1, "dead": 0}
        (item,) = ob.list()
    assert item.state == "pending" and item.attempts == 1
    assert item.last_error.startswith("TLS: ")
    for fragment in expected:
        assert fragment in item.last_error, item.last_error
    assert pacs.received() == set()
    failed = capture("outbox.association.failed")
    assert failed and failed[0]["reason"] == item.last_error

    if case == "misnamed":  # the same certificate is accepted once hostname checking is switched off
        relaxed = DestinationTLS(ca_certificates=pki.ca.pem, verify_hostname=False, **client)
        with outbox_for(tmp_path, pacs.port, relaxed, "relaxed") as ob:
            ob.enqueue("pacs", sc_files(tmp_path / "out2", 1))
            assert ob.process_due()["sent"] == 1


# -- configuration --------------------------------------------------------------------------------


def test_tls_files_are_checked_at_load_relative_to_the_config_file(tmp_path, pki):
    folder = tmp_path / "etc"
    (folder / "tls").mkdir(parents=True)
    for src, name in ((pki.node.cert, "node.pem"), (pki.node.key, "node.key"), (pki.ca.pem, "ca.pem")):
        (folder / "tls" / name).write_bytes(src.read_bytes())
    text = ('[node.tls]\nenabled = true\ncertificate = "tls/node.pem"\nprivate_key = "tls/node.key"\n'
            'ca_certificates = "tls/ca.pem"\n')
    (folder / "node.toml").write_text(text)
    cfg = load_config(folder / "node.toml")
    assert cfg.node.tls.certificate == folder / "tls" / "node.pem" and cfg.node.tls.port == 2762
    assert cfg.node.plain_enabled and cfg.node.port == 11112

    (folder / "tls" / "node.key").unlink()
    with pytest.raises(ConfigError, match=r"node\.tls\.private_key: file not found: .*etc/tls/node\.key"):
        load_config(folder / "node.toml")

    (folder / "node.toml").write_text(
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "pacs.local"\nport = 2762\n'
        '[destinations.tls]\nca_certificates = "tls/pacs-ca.pem"\n')
    with pytest.raises(ConfigError, match=r"destinations\.0\.tls\.ca_certificates \(destination 'pacs'\): "
                                          r"file not found: .*etc/tls/pacs-ca\.pem"):
        load_config(folder / "node.toml")


@pytest.mark.parametrize("raw, fragment", [
    ({"node": {"tls": {"enabled": True}}}, "certificate and private_key is not set"),
    ({"node": {"tls": {"enabled": True, "certificate": "a", "private_key": "b"}}}, "needs ca_certificates"),
    ({"node": {"plain_enabled": False}}, "would not listen at all"),
    ({"node": {"port": 2762, "tls": {"enabled": True, "certificate": "a", "private_key": "b",
                                     "require_client_certificate": False}}}, "needs its own port"),
    ({"destinations": [{"name": "p", "ae_title": "P", "host": "h", "port": 1, "tls": {"certificate": "c"}}]},
     "set both certificate and private_key"),
    ({"node": {"tls": {"enabld": True}}}, "node.tls.enabld"),
])
def test_tls_config_mistakes_are_named(raw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_config(raw)


def test_disabled_tls_needs_no_files_and_bad_pem_is_named(tmp_path, pki):
    cfg = parse_config({"node": {"tls": {"enabled": False, "certificate": str(tmp_path / "absent.pem")}}})
    assert not cfg.node.tls.enabled
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(tls.TLSConfigError, match="node.tls.certificate/private_key"):
        tls.server_context(NodeTLS(enabled=True, certificate=junk, private_key=pki.node.key, ca_certificates=pki.ca.pem))
    ctx = tls.client_context(DestinationTLS(ca_certificates=pki.ca.pem))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    server = tls.server_context(NodeTLS(enabled=True, certificate=pki.node.cert, private_key=pki.node.key,
                                        ca_certificates=pki.ca.pem))
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2 and server.verify_mode == ssl.CERT_REQUIRED
    # TLS 1.2 suites: forward secrecy and AEAD only (BCP 195)
    tls12 = [c["name"] for c in server.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(("ECDHE" in n or "DHE" in n) and ("GCM" in n or "CHACHA20" in n) for n in tls12), tls12


# -- the operator's view: `fusion-node serve` from a TOML file -----------------------------------


def test_serve_command_listens_on_plain_and_tls_and_stops_cleanly(pki, tmp_path):
    """The real process: config from TOML (relative certificate paths), both ports printed, SIGTERM stops it."""
    import shutil
    import signal
    import sys

    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    for src, name in ((pki.node.cert, "node-cert.pem"), (pki.node.key, "node-key.pem"), (pki.ca.pem, "ca.pem")):
        shutil.copy(src, tls_dir / name)
    (tmp_path / "node.toml").write_text(f'''
[node]
ae_title = "{NODE_AE}"
host = "127.0.0.1"
port = 0
[node.tls]
enabled = true
port = 0
certificate = "tls/node-cert.pem"
private_key = "tls/node-key.pem"
ca_certificates = "tls/ca.pem"
[http]
port = 0
[storage]
root = "data"
''')
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(tmp_path / "node.toml")],
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"fusion-node listening as {NODE_AE} on port "), line + proc.stderr.read()
        plain = int(line.split(" on port ")[1].split()[0])
        tls_port = int(line.split("TLS port ")[1].split(";")[0])
        echo = run("echoscu", *tls_args(pki.scu, pki.ca.pem), "-aet", "MODALITY", "-aec", NODE_AE,
                   "127.0.0.1", tls_port)
        assert echo.returncode == 0, echo
        assert run("echoscu", "-aet", "MODALITY", "-aec", NODE_AE, "127.0.0.1", plain).returncode == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert (tmp_path / "data" / "node.sqlite").is_file()  # storage paths are relative to the config file
