"""Every DIMSE status code the node answers with, and which service answers which (PS3.4 B.2.3, C.4).

The conformance statement lists the same codes per service; its drift test
compares them with :data:`STORAGE_SCP` and :data:`QUERY_RETRIEVE_SCP`.  One
code can mean different things in different services (0xA900 is "Data Set
does not match SOP Class" for C-STORE and "Identifier does not match SOP
Class" for C-FIND/C-GET/C-MOVE), so each service table says what it means there.
"""

from __future__ import annotations

SUCCESS = 0x0000
#: C-FIND: one match in this response, more may follow; C-GET/C-MOVE: sub-operations go on
PENDING = 0xFF00
#: the caller's C-CANCEL was honoured
CANCEL = 0xFE00
#: Refused: Out of Resources - disk full, database unavailable; the sender should retry later
OUT_OF_RESOURCES = 0xA700
#: Refused: Out of resources, unable to calculate number of matches (the index could not be read)
UNABLE_TO_CALCULATE_MATCHES = 0xA701
#: Refused: Out of resources, unable to perform sub-operations (every sub-operation failed)
SUBOPS_FAILED = 0xA702
#: Refused: Move Destination unknown
MOVE_DESTINATION_UNKNOWN = 0xA801
#: Error: Data Set (C-STORE) or Identifier (Q/R) does not match SOP Class
DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: Warning: sub-operations complete, one or more failed or had warnings
SUBOPS_WARNING = 0xB000
#: Error: Cannot understand (C-STORE) / Failed: Unable to process (C-FIND)
CANNOT_UNDERSTAND = 0xC000

#: what the Storage SCP answers, and what it means there
STORAGE_SCP: dict[int, str] = {
    SUCCESS: "stored: written, fsynced, renamed into place and indexed",
    OUT_OF_RESOURCES: "the node's disk or database failed, free disk space is below the retention reserve, or the "
                      "instance exceeds a decoding limit ([limits]); retry later",
    DOES_NOT_MATCH_SOP_CLASS: "missing or invalid UIDs, UIDs that differ from the command, an image without Pixel Data, "
                              "impossible image attributes, an attribute with the wrong VR",
    CANNOT_UNDERSTAND: "the dataset cannot be parsed or its pixel data cannot be decoded to what it declares",
}

#: what the Query/Retrieve SCP answers (C-FIND, C-GET, C-MOVE), and what it means there
QUERY_RETRIEVE_SCP: dict[int, str] = {
    SUCCESS: "matching or all sub-operations completed",
    PENDING: "a match (C-FIND) or sub-operations going on (C-GET/C-MOVE)",
    CANCEL: "the caller's C-CANCEL was honoured",
    UNABLE_TO_CALCULATE_MATCHES: "the node's index could not be read",
    SUBOPS_FAILED: "every sub-operation failed",
    MOVE_DESTINATION_UNKNOWN: "the move destination is not a configured DICOM destination, or could not be reached",
    DOES_NOT_MATCH_SOP_CLASS: "wrong QueryRetrieveLevel, missing unique keys above the level, an invalid key value",
    SUBOPS_WARNING: "sub-operations complete, one or more failed or had warnings",
    CANNOT_UNDERSTAND: "C-FIND: the identifier could not be decoded or the index could not be read",
}


def hex_status(status: int | None) -> str | None:
    """``0xA700`` style, as logs and the conformance statement write codes."""
    return None if status is None else f"0x{status:04X}"
