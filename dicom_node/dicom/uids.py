"""What a UID must look like before the node uses it: UIDs become folder and file names in the store."""

from __future__ import annotations

import re
from typing import Any

from dicom_node.errors import NodeError

#: a UID is digits and dots, at most 64 characters (PS3.5 9.1); anything else must never reach a file path
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class InvalidInstanceError(NodeError, ValueError):
    """The file is not a storable instance (unreadable header, missing or malformed UIDs)."""


def check_uid(value: Any, keyword: str) -> str:
    """The UID as str, or InvalidInstanceError: UIDs become path components, so they must be plain."""
    text = str(value).strip() if value is not None else ""
    if not text:
        raise InvalidInstanceError(f"{keyword} is missing")
    if len(text) > 64 or not UID_PATTERN.match(text):
        raise InvalidInstanceError(f"{keyword} is not a valid UID (digits and dots, at most 64 characters)")
    return text


def derived_uid(uid_root: str, seed: str, *parts: object) -> str:
    """A UID that follows from ``seed`` and ``parts`` alone: the same job makes the same objects again.

    A re-run after a crash, or a retry, then writes objects with the UIDs the
    first run used, so the store, the outbox and any PACS see one object twice
    (replaced or ignored) instead of a second, indistinguishable series.
    ``seed`` names the job's inputs and parameters (``workflow.jobs.output_seed``),
    ``parts`` the object within the job (e.g. ``"sc", 3``).
    """
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=uid_root, entropy_srcs=[seed, *(str(p) for p in parts)]))
