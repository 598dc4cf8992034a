"""What happened in the node, told to whoever listens (metrics, notifications) without the parts knowing them.

The listener, the executor and the outbox call :func:`emit` with a stable
event name and UIDs/counts (never patient names or IDs); the HTTP side
(``dicom_node.web``) subscribes while it runs.  A listener that raises is
logged and dropped for that event only: counting or notifying must never
cost a C-STORE, a job or a send.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("dicom_node.events")

Listener = Callable[[str, dict[str, Any]], None]

_listeners: list[Listener] = []
_lock = threading.Lock()


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call ``listener(event, fields)`` for every event from now on; returns the function that unsubscribes."""
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def emit(event: str, **fields: Any) -> None:
    """Tell every listener; cheap when there is none (the CLI's offline commands, most tests)."""
    if not _listeners:
        return
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(event, fields)
        except Exception:  # a metric or a notification must never cost the node its work
            log.exception("events.listener.failed", extra={"fields": {"event_name": event}})
