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
