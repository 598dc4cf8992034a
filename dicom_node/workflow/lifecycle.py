"""Reloading the configuration of a running node (SIGHUP): what applies live, what needs a restart.

A reload reads the TOML file again and validates it exactly as at start-up.
A file that does not load is logged (``config.reload.failed``, with the
operator message) and the running configuration is kept: a typo made while
the node runs must never stop it.  Keys in :data:`RESTART_KEYS` (sockets,
folders, thread counts, the executor) keep their running values and are logged as
``config.reload.restart_needed``; everything else (destinations, pipelines,
access lists, association limit, settle, outbox and retention policy, C-MOVE
destinations, UID root) takes effect for the next association, sweep, job or send.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node import logs
from dicom_node.config import ConfigError, NodeSettings, load_config

log = logging.getLogger("dicom_node.workflow.lifecycle")

#: dotted keys a running node cannot change (bound sockets, open folders and database, started threads)
RESTART_KEYS: tuple[str, ...] = (
    "node.ae_title", "node.host", "node.port", "node.plain_enabled", "node.network_timeout_s", "node.tls",
    "node.artim_timeout_s", "storage", "workers", "device", "executor", "query_retrieve.enabled", "limits",
    "logging.format", "logging.file", "logging.file_max_bytes", "logging.file_backup_count", "http", "notifications",
)

#: sections compared key by key (others as a whole)
_NESTED = ("node", "query_retrieve", "settle", "outbox", "retention", "logging")


def _flat(settings: NodeSettings) -> dict[str, Any]:
    dumped = settings.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key, value in dumped.items():
        if key in _NESTED and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def changed_keys(old: NodeSettings, new: NodeSettings) -> list[str]:
    """Dotted keys whose values differ (sections in :data:`_NESTED` key by key)."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _keeps_running_value(key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in RESTART_KEYS)


@dataclass(frozen=True)
class Reload:
    #: the configuration to run with: the new file, with the running values of the restart keys
    settings: NodeSettings
    #: keys applied now
    applied: list[str]
    #: keys that changed in the file but take effect only after a restart
    restart_needed: list[str]


def merge_live(old: NodeSettings, new: NodeSettings) -> Reload:
    """The new configuration with every restart key kept at its running value."""
    changed = changed_keys(old, new)
    restart = [k for k in changed if _keeps_running_value(k)]
    node_keep = {k.split(".", 1)[1]: getattr(old.node, k.split(".", 1)[1]) for k in RESTART_KEYS
                 if k.startswith("node.")}
    qr = new.query_retrieve.model_copy(update={"enabled": old.query_retrieve.enabled})
    log_keep = {k: getattr(old.logging, k) for k in ("format", "file", "file_max_bytes", "file_backup_count")}
    merged = new.model_copy(update={"node": new.node.model_copy(update=node_keep), "storage": old.storage,
                                    "workers": old.workers, "device": old.device, "executor": old.executor, "query_retrieve": qr,
                                    "limits": old.limits, "http": old.http, "notifications": old.notifications, "logging": new.logging.model_copy(update=log_keep)})
    return Reload(merged, [k for k in changed if k not in restart], restart)


def reload_settings(old: NodeSettings, path: Path) -> Reload | None:
    """Read ``path`` again; the merged configuration, or None (logged) when the file is unusable."""
    try:
        new = load_config(path)
    except ConfigError as exc:
        log.error("config.reload.failed", extra=logs.fields(config=str(path), error=exc.operator_message,
                                                            kept="the running configuration"))
        return None
    except OSError as exc:
        log.error("config.reload.failed", extra=logs.fields(config=str(path), error=str(exc),
                                                            kept="the running configuration"))
        return None
    result = merge_live(old, new)
    log.info("config.reloaded", extra=logs.fields(config=str(path), applied=result.applied,
                                                  restart_needed=result.restart_needed))
    if result.restart_needed:
        log.warning("config.reload.restart_needed", extra=logs.fields(
            config=str(path), keys=result.restart_needed,
            hint="these keys keep their running values until `fusion-node serve` is restarted"))
    return result
