"""TLS contexts for the node's DICOM TLS listener and for sending to TLS destinations.

DICOM secures associations with the Secure Transport Connection Profiles of
PS3.15 Annex B.  The current ones point at IETF BCP 195 (RFC 8996 and RFC
9325): TLS 1.2 or newer only; for TLS 1.2 only AEAD cipher suites with
forward secrecy (ECDHE/DHE with AES-GCM or ChaCha20-Poly1305); no TLS
compression, no renegotiation.  That is what the "Non-downgrading BCP 195
TLS Profile" (B.9) requires and what DCMTK offers by default, so the node
interoperates with DCMTK-based modalities and PACS out of the box.  TLS 1.3
suites are all AEAD with forward secrecy already; OpenSSL's defaults are kept.

Both directions authenticate the peer with certificates: a caller must
present a client certificate signed by ``[node.tls] ca_certificates``
(unless ``require_client_certificate = false``), and the node always
verifies a destination's certificate (``verify_hostname`` controls only
whether it must also name the host) - images with patient data never go to
an unauthenticated peer.

pynetdicom hides why a handshake failed (it logs and drops the connection),
so the contexts built here remember the last TLS error: the listener logs a
refused handshake with the peer's address, and the outbox turns it into an
error an operator can act on (:func:`describe_failure`).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

from dicom_node.config import DestinationTLS, NodeTLS
from dicom_node.errors import NodeError
from dicom_node.logs import fields

log = logging.getLogger("dicom_node.net.tls")

#: TLS 1.2 suites allowed (BCP 195 / RFC 9325 section 4.2): AEAD with forward secrecy only
BCP195_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!aPSK:!SHA1"

#: default ceiling on a server-side handshake done by :meth:`NodeSSLContext.wrap_socket`.  The
#: node's listener does not use it: it wraps without handshaking and runs the handshake in the
#: connection's own thread, bounded by ``node.artim_timeout_s`` (``server.py``), so a silent
#: peer delays nobody else
HANDSHAKE_TIMEOUT_S = 10.0


class TLSConfigError(NodeError, ValueError):
    """A certificate, key or CA file cannot be used; the message names the key and the file."""


class _RecordingSocket(ssl.SSLSocket):
    """An SSLSocket that tells its context why a handshake or read failed."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except (ssl.SSLError, OSError) as exc:
            if isinstance(self.context, NodeSSLContext):  # always: only NodeSSLContext makes these sockets
                self.context._note_failure(self, exc, "handshake")
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        # TLS 1.3: a peer that refuses our client certificate says so after the handshake, on the first read
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            if isinstance(self.context, NodeSSLContext):
                self.context._note_failure(self, exc, "read")
            raise


class NodeSSLContext(ssl.SSLContext):
    """An SSLContext that records TLS failures and bounds server-side handshakes.

    ``on_failure(peer_address, reason, stage)`` is called for every TLS
    failure, ``stage`` being "handshake" or "read" (the listener logs it);
    :attr:`last_failure` keeps the last reason (the outbox reports it).
    """

    sslsocket_class = _RecordingSocket

    def __init__(self, protocol: int) -> None:
        super().__init__()
        self._failure_lock = threading.Lock()
        self.last_failure: str | None = None
        self.on_failure: Callable[[str, str, str], None] | None = None
        self.handshake_timeout_s: float | None = None

    def _note_failure(self, sock: ssl.SSLSocket, exc: BaseException, stage: str) -> None:
        reason = failure_text(exc)
        with self._failure_lock:
            self.last_failure = reason
        if self.on_failure is not None:
            try:
                peer = sock.getpeername()[0]
            except OSError:
                peer = "?"
            self.on_failure(str(peer), reason, stage)

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        args = (sock, server_side, do_handshake_on_connect, suppress_ragged_eofs, server_hostname, session)
        if not server_side or self.handshake_timeout_s is None:
            return super().wrap_socket(*args)
        previous = sock.gettimeout()
        sock.settimeout(self.handshake_timeout_s)
        wrapped = super().wrap_socket(*args)
        wrapped.settimeout(previous)
        return wrapped


def failure_text(exc: BaseException) -> str:
    """A short, stable description of a TLS error (OpenSSL's reason, not a stack)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc).lower().replace("_", " ")
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    return f"{type(exc).__name__}: {exc}"


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)


def _load_chain(ctx: ssl.SSLContext, certificate: Path, private_key: Path, key_prefix: str) -> None:
    for key, path in (("certificate", certificate), ("private_key", private_key)):
        if not Path(path).is_file():
            raise TLSConfigError(f"{key_prefix}.{key}: file not found: {path}")
    try:
        ctx.load_cert_chain(str(certificate), str(private_key))
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{key_prefix}.certificate/private_key: {certificate} and {private_key} are not a "
                             f"PEM certificate and its matching unencrypted private key ({failure_text(exc)})") from None


def _load_cas(ctx: ssl.SSLContext, cafile: Path, key: str) -> None:
    if not Path(cafile).is_file():
        raise TLSConfigError(f"{key}: file not found: {cafile}")
    try:
        ctx.load_verify_locations(cafile=str(cafile))
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{key}: {cafile} holds no usable PEM CA certificate ({failure_text(exc)})") from None


def server_context(cfg: NodeTLS, on_failure: Callable[[str, str, str], None] | None = None,
                   handshake_timeout_s: float | None = HANDSHAKE_TIMEOUT_S) -> NodeSSLContext:
    """The listener's context: our certificate, callers verified against ``ca_certificates``."""
    if cfg.certificate is None or cfg.private_key is None:
        raise TLSConfigError("node.tls: certificate and private_key must be set to listen with TLS")
    ctx = NodeSSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    _load_chain(ctx, cfg.certificate, cfg.private_key, "node.tls")
    if cfg.ca_certificates is not None:
        _load_cas(ctx, cfg.ca_certificates, "node.tls.ca_certificates")
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_certificate else ssl.CERT_OPTIONAL
    elif cfg.require_client_certificate:
        raise TLSConfigError("node.tls.require_client_certificate = true needs node.tls.ca_certificates")
    else:
        ctx.verify_mode = ssl.CERT_NONE
    ctx.on_failure = on_failure
    ctx.handshake_timeout_s = handshake_timeout_s
    return ctx


def client_context(cfg: DestinationTLS, destination: str = "?") -> NodeSSLContext:
    """Context for sending to one destination: the peer is always verified, against its CA or the system's."""
    key = f"destination {destination!r} tls"
    ctx = NodeSSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    if cfg.ca_certificates is not None:
        _load_cas(ctx, cfg.ca_certificates, f"{key}.ca_certificates")
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cfg.certificate is not None and cfg.private_key is not None:
        _load_chain(ctx, cfg.certificate, cfg.private_key, key)
    ctx.check_hostname = cfg.verify_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def describe_failure(reason: str, host: str, cfg: DestinationTLS) -> str:
    """An outbox error for a failed TLS connection, with what to change."""
    text = reason.lower()
    trust = (f"ca_certificates = {cfg.ca_certificates}" if cfg.ca_certificates is not None
             else "the system trust store (no ca_certificates set)")
    if "mismatch" in text or "hostname" in text or "ip address" in text:
        return (f"TLS: the destination's certificate does not name {host!r} ({reason}); connect by a name or "
                "address the certificate carries, or set verify_hostname = false in its [destinations.tls]")
    if "verify failed" in text:
        return (f"TLS: the destination's certificate is not trusted ({reason}); its CA must be in {trust}")
    if "certificate required" in text or "bad certificate" in text or "unknown ca" in text or "alert" in text:
        return (f"TLS: the destination refused the connection ({reason}); it wants a client certificate it trusts: "
                "set certificate/private_key in [destinations.tls] to one signed by a CA the destination accepts")
    return f"TLS: handshake with the destination failed ({reason})"


def log_failures() -> Callable[[str, str, str], None]:
    """An ``on_failure`` callback for the listener.

    A failed handshake is a refused caller (``scp.tls.refused``: address and
    reason are all that is known, no AE title has been sent yet); a failure
    later on an open connection is ``scp.tls.error``.
    """

    def note(address: str, reason: str, stage: str) -> None:
        event = "scp.tls.refused" if stage == "handshake" else "scp.tls.error"
        log.warning(event, extra=fields(address=address, reason=reason))

    return note
