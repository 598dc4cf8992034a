"""Durable sending: the queue in the node's database and one sender per destination kind (DICOM C-STORE, DICOMweb STOW-RS)."""

from dicom_node.outbox.queue import Outbox, OutboxItem

__all__ = ["Outbox", "OutboxItem"]
