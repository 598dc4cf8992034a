"""What a sender is, what it reports, and which sender serves which destination ``kind``.

The queue (``queue.py``) claims due rows and hands a batch to the sender of
the destination's kind; the sender yields one :class:`Outcome` per item as it
goes, and the queue records each at once (sent, retry later, dead, or handed
back untried).  A new kind of destination is one module with a class that
takes ``(destination, settings, calling_ae)`` and has ``send``, one line in
:func:`_factories`, and its config model in ``dicom_node.config``.

Statuses to outcomes, the same for every kind: a DICOM status of category
Success or Warning is *sent* (a warning is logged as one); any other status,
no answer, or a broken connection is *failed* and retried with backoff until
the retry limit; only an instance that cannot be read from the node's own
store is *permanent* (dead at once: retrying cannot help).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from pynetdicom.status import code_to_category

from dicom_node.config import DicomDestination, DicomWebDestination, NodeSettings
from dicom_node.net.statuses import hex_status

Result = Literal["sent", "failed", "permanent", "untried"]


@dataclass
class Work:
    """One claimed outbox row, as a sender sees it."""

    id: int
    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    attempts: int


@dataclass(frozen=True)
class Outcome:
    work: Work
    result: Result
    #: the DICOM status the peer answered (C-STORE response, or STOW-RS Failure Reason), if any
    status: int | None = None
    error: str | None = None


def outcome_for_status(work: Work, status: int | None, error: str | None = None, what: str = "C-STORE") -> Outcome:
    """The outcome of a peer's answer for one instance (see the module docstring)."""
    if status is None:
        return Outcome(work, "failed", None, error or f"no {what} response (timeout, abort or invalid response)")
    category = code_to_category(status)
    if category in ("Success", "Warning"):
        return Outcome(work, "sent", status)
    return Outcome(work, "failed", status,
                   f"{what} {category.lower()} status {hex_status(status)}" + (f": {error}" if error else ""))


class Sender(Protocol):
    def send(self, batch: list[Work], cancel: threading.Event | None) -> Iterator[Outcome]:
        """Deliver ``batch``; yield an outcome for every item (``untried`` for those not attempted)."""
        ...


Destination = DicomDestination | DicomWebDestination
#: ``factory(destination, settings, calling_ae)``; each takes the destination model of its own kind
SenderFactory = Callable[..., Sender]


def _factories() -> dict[str, SenderFactory]:
    from dicom_node.outbox.cstore import CStoreSender
    from dicom_node.outbox.stow import StowSender

    return {"dicom": CStoreSender, "dicomweb": StowSender}


def sender_for(destination: Destination, settings: NodeSettings, calling_ae: str) -> Sender:
    try:
        factory = _factories()[destination.kind]
    except KeyError:  # pragma: no cover - the config model admits only known kinds
        raise ValueError(f"destination {destination.name!r}: no sender for kind {destination.kind!r}") from None
    return factory(destination, settings, calling_ae)
