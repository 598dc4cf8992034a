"""The life cycles the node's database records: series, jobs, outbox items.

Each enum is the whole set of states of one column; the schema holds the same
set as a CHECK constraint (``index/migrations``; tests/test_database.py checks
they agree), so a typo can never be written.  The
transitions are described where they are made: series in
``workflow/settle.py`` and ``workflow/pairing.py``, jobs in
``workflow/jobs.py``, outbox items in ``outbox/queue.py``.
"""

from __future__ import annotations

from enum import StrEnum


class SeriesState(StrEnum):
    #: instances are arriving (a new instance re-opens a settled series)
    OPEN = "open"
    #: complete: quiet period over, announced count reached, or manual trigger
    SETTLED = "settled"
    #: a job was made with it
    PAIRED = "paired"
    #: no pipeline selects it
    UNMATCHED = "unmatched"
    #: a pipeline selects it, but no partner settled in time
    TIMED_OUT = "timed_out"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class OutboxState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DEAD = "dead"
