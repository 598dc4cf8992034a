"""Where benchmark results go: one Markdown file per benchmark in docs/, a section appended per run."""

from __future__ import annotations

from pathlib import Path


def append_section(path: Path, heading: str, text: str) -> None:
    """Print ``text`` and append it to ``path``, creating the file with ``heading`` (title + intro) first."""
    print(text)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(heading)
    with path.open("a") as fh:
        fh.write(text)
