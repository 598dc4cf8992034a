"""Free space under the store's root, and the reserve below which the node refuses new instances.

Two thresholds of ``[retention]`` (both a share of the file system holding
``storage.root``): below ``min_free_percent`` the retention purge deletes
eligible series oldest first (``workflow/retention.py``); below
``reserve_free_percent`` the Storage SCP answers C-STORE with 0xA700 (Refused:
Out of Resources), which a sender retries later, instead of filling the disk
until the database or a half-written file fails.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import RetentionConfig
from dicom_node.logs import fields

log = logging.getLogger("dicom_node.index.disk")


@dataclass(frozen=True)
class DiskSpace:
    total_bytes: int
    free_bytes: int

    @property
    def free_percent(self) -> float:
        return 100.0 * self.free_bytes / self.total_bytes if self.total_bytes else 0.0


def disk_space(path: Path) -> DiskSpace:
    """Space of the file system holding ``path`` (the nearest existing folder above it)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return DiskSpace(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)


class DiskGuard:
    """Answers "is the disk below the reserve?" for every C-STORE, at the cost of one statvfs per second."""

    #: seconds a measurement is reused (a C-STORE burst does not call statvfs per instance)
    cache_s = 1.0

    def __init__(self, root: Path, cfg: RetentionConfig) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self._lock = threading.Lock()
        self._measured: tuple[float, DiskSpace] | None = None
        self._refusing = False

    def apply_settings(self, cfg: RetentionConfig) -> None:
        with self._lock:
            self.cfg, self._measured = cfg, None

    def space(self) -> DiskSpace:
        with self._lock:
            now = time.monotonic()
            if self._measured is None or now - self._measured[0] > self.cache_s:
                self._measured = (now, disk_space(self.root))
            return self._measured[1]

    def below_reserve(self) -> str | None:
        """None when there is room; else the operator's reason (free space, reserve, what to do)."""
        space = self.space()
        short = space.free_percent < self.cfg.reserve_free_percent
        if short != self._refusing:
            self._refusing = short
            (log.error if short else log.warning)(
                "disk.reserve.reached" if short else "disk.reserve.cleared",
                extra=fields(free_percent=round(space.free_percent, 2), free_bytes=space.free_bytes,
                             reserve_free_percent=self.cfg.reserve_free_percent, root=str(self.root)))
        if not short:
            return None
        return (f"{space.free_percent:.1f}% free under {self.root}, below retention.reserve_free_percent "
                f"{self.cfg.reserve_free_percent}%; run `fusion-node purge --dry-run` or free disk space")
