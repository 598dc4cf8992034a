"""Opening associations as a requestor, the same way everywhere: the outbox's C-STORE sender and Q/R's C-MOVE.

One place for what every SCU of the node needs: an AE with the configured
timeouts, the presentation-context limit, the TLS arguments for a destination,
and an operator-readable sentence for an association that did not come up.
"""

from __future__ import annotations

from typing import Any

from pydicom.uid import UID
from pynetdicom import AE, evt

from dicom_node.config import DicomDestination
from dicom_node.net import tls
from dicom_node.net.association import no_delay

#: a DICOM association negotiates at most 128 presentation contexts (odd IDs 1..255)
MAX_CONTEXTS = 128

#: how long a connection attempt may take before the destination counts as unreachable
CONNECT_TIMEOUT_S = 30.0


def requestor_ae(ae_title: str, network_timeout_s: float) -> AE:
    """An AE for outgoing associations, with the node's network timeout on every phase."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = network_timeout_s
    ae.dimse_timeout = network_timeout_s
    ae.network_timeout = network_timeout_s
    ae.connection_timeout = min(network_timeout_s, CONNECT_TIMEOUT_S)
    return ae


def on_open_no_delay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: TCP_NODELAY as soon as the socket exists."""
    no_delay(event.assoc)


def tls_args(dest: DicomDestination) -> tuple[tls.NodeSSLContext, str] | None:
    """pynetdicom's ``tls_args`` for a destination, None for plain TCP; raises TLSConfigError for bad files.

    The host name is checked against the certificate when ``verify_hostname``,
    else only sent (SNI).
    """
    if dest.tls is None:
        return None
    return tls.client_context(dest.tls, dest.name), dest.host


def association_failure(assoc: Any, dest: DicomDestination | None = None,
                        tls_arguments: tuple[tls.NodeSSLContext, str] | None = None) -> str:
    """Why an association is not established, in words an operator can act on."""
    prim = getattr(assoc.acceptor, "primitive", None)
    if assoc.is_rejected and prim is not None:
        return f"association rejected: {prim.result_str}, {prim.source_str}, {prim.reason_str}"
    if tls_arguments is not None and dest is not None and dest.tls is not None and tls_arguments[0].last_failure:
        return tls.describe_failure(tls_arguments[0].last_failure, dest.host, dest.tls)
    if prim is not None and getattr(prim, "result", None) == 0x00:
        return "association aborted: the peer accepted no presentation context"
    if assoc.is_aborted and prim is not None:
        return "association aborted during negotiation"
    return "connection failed: peer unreachable, refused or did not answer"


def accepted_syntaxes(assoc: Any, sop_class: str) -> list[UID]:
    """Transfer syntaxes the peer accepted for ``sop_class`` with us as SCU (Storage sub-operations, C-STORE)."""
    return [UID(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
            if cx.abstract_syntax == sop_class and cx.as_scu]
