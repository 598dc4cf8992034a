"""The node's one exception base: every error an operator may see carries a message saying what to do.

Each layer raises its own subclass (``ConfigError``, ``StoreError``,
``GeometryError``, ``JobError`` ...), defined where it is raised; callers that
only need to report catch :class:`NodeError` and print ``operator_message``.
Errors from ``fusion`` (``fusion.errors.FusionError``) are turned into
``JobError`` at the pipeline's stage boundary.
"""

from __future__ import annotations

from typing import Any


class NodeError(Exception):
    """An error whose message tells the operator what happened and what to change."""

    def __init__(self, message: str, *, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        #: what was measured before the failure (e.g. registration figures), kept on a failed job
        self.result = result

    @property
    def operator_message(self) -> str:
        return str(self)
