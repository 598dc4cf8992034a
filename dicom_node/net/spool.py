"""Where pynetdicom spools incoming C-STORE datasets: inside the storage root, one folder per association.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each dataset, as it
arrives, to ``tempfile.NamedTemporaryFile`` in the system temporary folder,
and deletes it only after the C-STORE handler returned: a dataset cut off by
an abort, or any dataset in flight when the process is killed, stays in
``$TMPDIR`` for good, with the patient's name and ID in it (issue 11).

Here the spool files of the node's own AEs go to
``<root>/tmp/spool/<association>/`` (folders 0700, files 0600 as ``mkstemp``
makes them); the association's folder is removed when it is released,
aborted or its connection closes, and :meth:`dicom_node.index.store.Store.clear_tmp`
empties ``<root>/tmp`` when the node starts.  Other AEs in the process
(tests, tools) keep pynetdicom's behaviour.

pynetdicom creates the file in its DUL thread, which knows its association;
that is how a file finds its folder.  Patching ``dimse_messages.NamedTemporaryFile``
is, with ``_config.STORE_RECV_CHUNKED_DATASET``, the only process-wide change
the listener makes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from pathlib import Path
from typing import IO, Any

from pynetdicom import AE, dimse_messages, evt

from dicom_node.logs import fields

log = logging.getLogger("dicom_node.net.spool")

_roots: weakref.WeakKeyDictionary[AE, Path] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_FOLDER_ATTR = "_dicom_node_spool"


def _named_temporary_file(*args: Any, **kwargs: Any) -> IO[bytes]:
    """``NamedTemporaryFile`` for pynetdicom: in the association's spool folder when its AE has one."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    folder = folder_for(assoc) if assoc is not None else None
    if folder is not None:
        kwargs["dir"] = folder
    return tempfile.NamedTemporaryFile(*args, **kwargs)


def _install() -> None:
    if dimse_messages.NamedTemporaryFile is not _named_temporary_file:
        setattr(dimse_messages, "NamedTemporaryFile", _named_temporary_file)  # noqa: B010  # mypy: module attr is a function


def attach(ae: AE, root: Path) -> None:
    """Spool the C-STOREs this AE receives under ``root`` (created 0700)."""
    _make_private_dir(root)
    with _lock:
        _roots[ae] = Path(root)
    _install()


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def folder_for(assoc: Any) -> Path | None:
    """The association's own spool folder (made on first use), None when its AE spools elsewhere."""
    folder = getattr(assoc, _FOLDER_ATTR, None)
    if folder is not None:
        if not folder.is_dir():
            _make_private_dir(folder)
        return folder
    with _lock:
        root = _roots.get(getattr(assoc, "ae", None))  # type: ignore[arg-type]  # None is simply not a key
    if root is None:
        return None
    folder = root / uuid.uuid4().hex
    _make_private_dir(folder)
    setattr(assoc, _FOLDER_ATTR, folder)
    return folder


def discard(assoc: Any) -> None:
    """Remove the association's spool folder and whatever is left in it (partial datasets of an abort)."""
    folder = getattr(assoc, _FOLDER_ATTR, None)
    if folder is None:
        return
    left = sum(1 for _ in folder.glob("*")) if folder.is_dir() else 0
    shutil.rmtree(folder, ignore_errors=True)
    if left:
        log.info("scp.spool.removed", extra=fields(files=left))


def _on_end(event: evt.Event) -> None:
    discard(event.assoc)


#: handlers that remove an association's spool folder when it ends, however it ends
HANDLERS: list[tuple[evt.EventType, Any]] = [
    (evt.EVT_RELEASED, _on_end),
    (evt.EVT_ABORTED, _on_end),
    (evt.EVT_CONN_CLOSE, _on_end),
]
