"""Who may open an association with the node: one pure decision, and the exact A-ASSOCIATE-RJ it answers.

The SCP (``scp.py``) asks :meth:`AccessPolicy.decide` as soon as an
A-ASSOCIATE-RQ has arrived, before any presentation context is negotiated,
and sends the rejection returned here unchanged.  Keeping the decision free
of sockets and threads makes every rule testable on its own and lets the
conformance statement cite the constants below (its drift test imports them).

Checks, in this order (the first that fails decides):

1. Called AE Title: the node's ``ae_title`` or a pipeline's ``ae_title``
   (``node.require_called_ae``) -> :data:`REJECT_CALLED_AE`.  It comes first
   because it selects which per-pipeline lists apply.
2. Peer address: ``node.allowed_addresses``, then the called pipeline's
   ``allowed_addresses`` -> :data:`REJECT_ADDRESS`.  A peer outside
   ``node.allowed_addresses`` never gets this far: the listener closes its
   connection at accept (:meth:`AccessPolicy.admits_address`, ``server.py``),
   so the rejection is only sent for a pipeline's list.  PS3.8 has no reason code
   for an address; "no reason given" tells a stranger nothing.
3. Calling AE Title: ``node.allowed_callers``, then the called pipeline's
   ``allowed_callers`` -> :data:`REJECT_CALLING_AE`.
4. Capacity: ``node.max_associations`` open already -> :data:`REJECT_LIMIT`,
   the only transient rejection: the caller may retry later, while retrying
   after 1-3 cannot help until the configuration changes.

AE titles are compared without leading/trailing spaces (not significant in
the AE VR) and case-sensitively.  An IPv4 peer seen through an IPv6
dual-stack socket (``::ffff:10.1.2.3``) is checked as its IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from dicom_node.config import NodeConfig, NodeSettings, Pipeline, QueryRetrieveConfig

# -- A-ASSOCIATE-RJ fields (PS3.8 section 9.3.4, Table 9-21) -------------------------------

#: Result
RESULT_REJECTED_PERMANENT = 1
RESULT_REJECTED_TRANSIENT = 2

#: Source
SOURCE_SERVICE_USER = 1
SOURCE_SERVICE_PROVIDER_ACSE = 2
SOURCE_SERVICE_PROVIDER_PRESENTATION = 3

#: Reason/Diag. when the source is the service user
REASON_USER_NO_REASON_GIVEN = 1
REASON_USER_APPLICATION_CONTEXT_NOT_SUPPORTED = 2
REASON_USER_CALLING_AE_NOT_RECOGNIZED = 3
REASON_USER_CALLED_AE_NOT_RECOGNIZED = 7
#: Reason/Diag. when the source is the service provider, presentation related
REASON_PRESENTATION_TEMPORARY_CONGESTION = 1
REASON_PRESENTATION_LOCAL_LIMIT_EXCEEDED = 2

#: (result, source, reason) sent to a caller whose Calling AE Title is not allowed
REJECT_CALLING_AE: tuple[int, int, int] = (
    RESULT_REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_USER_CALLING_AE_NOT_RECOGNIZED)
#: (result, source, reason) sent when the Called AE Title is neither the node's nor a pipeline's
REJECT_CALLED_AE: tuple[int, int, int] = (
    RESULT_REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_USER_CALLED_AE_NOT_RECOGNIZED)
#: (result, source, reason) sent to a peer whose IP address is not allowed
REJECT_ADDRESS: tuple[int, int, int] = (
    RESULT_REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_USER_NO_REASON_GIVEN)
#: (result, source, reason) sent when ``node.max_associations`` are open already
REJECT_LIMIT: tuple[int, int, int] = (
    RESULT_REJECTED_TRANSIENT, SOURCE_SERVICE_PROVIDER_PRESENTATION, REASON_PRESENTATION_LOCAL_LIMIT_EXCEEDED)
#: (result, source, reason) sent when the decision itself failed (a bug): fail closed, retry allowed
REJECT_INTERNAL_ERROR: tuple[int, int, int] = (
    RESULT_REJECTED_TRANSIENT, SOURCE_SERVICE_USER, REASON_USER_NO_REASON_GIVEN)

#: every rejection the node sends, by name (for the conformance statement and logs)
REJECTIONS: dict[str, tuple[int, int, int]] = {
    "calling_ae": REJECT_CALLING_AE,
    "called_ae": REJECT_CALLED_AE,
    "address": REJECT_ADDRESS,
    "limit": REJECT_LIMIT,
    "internal_error": REJECT_INTERNAL_ERROR,
}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Decision:
    """Accept, or reject with ``rejection`` = (result, source, reason); ``why`` is for the operator's log."""

    rejection: tuple[int, int, int] | None
    why: str
    #: the rule that decided: "accepted", or a key of :data:`REJECTIONS`
    rule: str
    #: name of the pipeline whose AE title was called, None for the node's own title
    pipeline: str | None = None

    @property
    def accepted(self) -> bool:
        return self.rejection is None


def peer_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's address as an IP; IPv4-mapped IPv6 becomes IPv4, a zone index is dropped; None if unparseable."""
    try:
        ip = ipaddress.ip_address(str(address).split("%", 1)[0].strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _networks(values: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def _in(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: Sequence[Network]) -> bool:
    return any(ip.version == net.version and ip in net for net in networks)


@dataclass(frozen=True)
class _Called:
    """One AE title the node answers to, with the lists that apply to it on top of the node's."""

    pipeline: str | None
    callers: frozenset[str]
    networks: tuple[Network, ...]


class AccessPolicy:
    """The association rules of one configuration; immutable, safe to share between threads."""

    def __init__(self, node: NodeConfig, pipelines: Sequence[Pipeline] = ()) -> None:
        self.node_ae = node.ae_title.strip()
        self.require_called_ae = node.require_called_ae
        self.max_associations = node.max_associations
        self._callers = frozenset(c.strip() for c in node.allowed_callers)
        self._networks = _networks(node.allowed_addresses)
        self._called: dict[str, _Called] = {self.node_ae: _Called(None, frozenset(), ())}
        for p in pipelines:
            if p.ae_title:
                self._called[p.ae_title.strip()] = _Called(
                    p.name, frozenset(c.strip() for c in p.allowed_callers), _networks(p.allowed_addresses))

    @classmethod
    def from_settings(cls, settings: NodeSettings) -> AccessPolicy:
        return cls(settings.node, settings.pipelines)

    @property
    def called_ae_titles(self) -> tuple[str, ...]:
        """Every Called AE Title the node answers to: its own first, then the pipelines'."""
        return tuple(self._called)

    def admits_address(self, address: str) -> bool:
        """Whether ``node.allowed_addresses`` lets this peer connect at all (checked at accept, before anything else).

        The pipelines' own address lists depend on the Called AE Title, which
        only the A-ASSOCIATE-RQ names; :meth:`decide` checks them.
        """
        if not self._networks:
            return True
        ip = peer_ip(address)
        return ip is not None and _in(ip, self._networks)

    def decide(self, calling_ae: str, called_ae: str, address: str, open_associations: int) -> Decision:
        """Decide on one A-ASSOCIATE-RQ.

        ``open_associations`` counts the associations the node has accepted and
        not yet closed, this request not included.
        """
        calling = (calling_ae or "").strip()
        called_title = (called_ae or "").strip()
        called = self._called.get(called_title)
        if called is None:
            if self.require_called_ae:
                return Decision(REJECT_CALLED_AE, f"called AE title {called_title!r} is not one of "
                                f"{', '.join(map(repr, self._called))} (node.require_called_ae)", "called_ae")
            called = self._called[self.node_ae]
        pipeline = called.pipeline
        where = f"pipeline {pipeline!r}" if pipeline else "node"

        if self._networks or called.networks:
            ip = peer_ip(address)
            if ip is None:
                return Decision(REJECT_ADDRESS, f"peer address {address!r} is not an IP address", "address", pipeline)
            if self._networks and not _in(ip, self._networks):
                return Decision(REJECT_ADDRESS, f"address {ip} is not in node.allowed_addresses", "address", pipeline)
            if called.networks and not _in(ip, called.networks):
                return Decision(REJECT_ADDRESS, f"address {ip} is not in the allowed_addresses of {where}",
                                "address", pipeline)

        if self._callers and calling not in self._callers:
            return Decision(REJECT_CALLING_AE, f"calling AE title {calling!r} is not in node.allowed_callers",
                            "calling_ae", pipeline)
        if called.callers and calling not in called.callers:
            return Decision(REJECT_CALLING_AE, f"calling AE title {calling!r} is not in the allowed_callers of {where}",
                            "calling_ae", pipeline)

        if open_associations >= self.max_associations:
            return Decision(REJECT_LIMIT, f"{open_associations} associations open, node.max_associations is "
                            f"{self.max_associations}", "limit", pipeline)
        return Decision(None, f"called {called_title!r}" + (f" ({where})" if pipeline else ""), "accepted", pipeline)


# -- Query/Retrieve: its own allow lists ------------------------------------------------------------


@dataclass(frozen=True)
class QRDecision:
    """May this caller query and retrieve?  ``rule`` names the list that decided, ``why`` is for the log."""

    allowed: bool
    why: str
    rule: str


class QueryRetrieveAccess:
    """``[query_retrieve] allowed_callers`` / ``allowed_addresses``: deny unless a list names the caller.

    Separate from the storage lists: a modality allowed to send is not
    thereby allowed to list every patient.  With both lists empty nobody may
    (the secure default; PACS likewise answer C-FIND/C-GET/C-MOVE only for
    configured workstations).  A caller must match every list that is set.
    """

    def __init__(self, cfg: QueryRetrieveConfig) -> None:
        self._callers = frozenset(c.strip() for c in cfg.allowed_callers)
        self._networks = _networks(cfg.allowed_addresses)

    def decide(self, calling_ae: str, address: str) -> QRDecision:
        calling = (calling_ae or "").strip()
        if not self._callers and not self._networks:
            return QRDecision(False, "query_retrieve.allowed_callers and allowed_addresses are empty: "
                              "no one may query or retrieve until the workstations are listed", "qr_not_configured")
        if self._networks:
            ip = peer_ip(address)
            if ip is None or not _in(ip, self._networks):
                return QRDecision(False, f"address {address} is not in query_retrieve.allowed_addresses", "qr_address")
        if self._callers and calling not in self._callers:
            return QRDecision(False, f"calling AE title {calling!r} is not in query_retrieve.allowed_callers",
                              "qr_calling_ae")
        return QRDecision(True, "listed in [query_retrieve]", "accepted")
