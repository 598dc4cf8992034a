"""The index, job queue and outbox as of the first Alembic revision.

Revision ID: 0001
Revises:
Create Date: 2026-12-02

A database written before the node used Alembic has these tables, perhaps
without the columns added since its release: they are added here (with their
defaults), so such a file continues where it was.  The state columns carry
CHECK constraints from ``states.py`` as they were at this revision.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SERIES_STATES = ("open", "settled", "paired", "unmatched", "timed_out")
JOB_STATES = ("queued", "running", "done", "failed")
OUTBOX_STATES = ("pending", "sending", "sent", "dead")


def _in(column: str, values: tuple[str, ...]) -> sa.CheckConstraint:
    return sa.CheckConstraint(f"{column} IN ({', '.join(repr(v) for v in values)})")


Table = tuple[str, list[Any], dict[str, Any]]


def _tables() -> list[tuple[str, list[Any], dict[str, Any], list[tuple[str, list[str]]]]]:
    """Each table as ``(name, columns and constraints, options, indexes)``, new objects on every call."""
    text, integer, real = sa.Text, sa.Integer, sa.Float
    studies: Table = ("studies", [
        sa.Column("study_uid", text, primary_key=True),
        *(sa.Column(c, text) for c in ("patient_id", "patient_name", "patient_birth_date", "patient_sex",
                                         "study_date", "study_time", "accession_number", "study_description",
                                         "study_id", "referring_physician_name", "specific_character_set")),
    ], {})
    series: Table = ("series", [
        sa.Column("series_uid", text, primary_key=True),
        sa.Column("study_uid", text, sa.ForeignKey("studies.study_uid"), nullable=False),
        sa.Column("modality", text), sa.Column("series_description", text), sa.Column("series_number", integer),
        sa.Column("series_date", text), sa.Column("series_time", text), sa.Column("frame_of_reference_uid", text),
        sa.Column("body_part", text), sa.Column("announced_count", integer),
        sa.Column("instance_count", integer, nullable=False, server_default=sa.text("0")),
        sa.Column("first_received", real), sa.Column("last_received", real),
        sa.Column("state", text, _in("state", SERIES_STATES), nullable=False, server_default="open"),
        sa.Column("state_reason", text), sa.Column("state_changed", real),
        sa.Column("origin", text, _in("origin", ("received", "derived")), nullable=False,
                  server_default="received"),
    ], {})
    instances: Table = ("instances", [
        sa.Column("sop_instance_uid", text, primary_key=True),
        sa.Column("series_uid", text, sa.ForeignKey("series.series_uid"), nullable=False),
        sa.Column("sop_class_uid", text, nullable=False), sa.Column("transfer_syntax_uid", text, nullable=False),
        sa.Column("instance_number", integer), sa.Column("rows", integer), sa.Column("columns", integer),
        sa.Column("number_of_frames", integer), sa.Column("path", text, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False), sa.Column("received_at", real, nullable=False),
        sa.Column("calling_ae", text), sa.Column("called_ae", text),
    ], {})
    jobs: Table = ("jobs", [
        sa.Column("id", integer, primary_key=True, autoincrement=True),
        sa.Column("key", text, nullable=False, unique=True),
        sa.Column("pipeline", text, nullable=False),
        sa.Column("base_series_uid", text, nullable=False), sa.Column("overlay_series_uid", text, nullable=False),
        sa.Column("state", text, _in("state", JOB_STATES), nullable=False, server_default="queued"),
        sa.Column("attempts", integer, nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", real, nullable=False), sa.Column("started_at", real),
        sa.Column("finished_at", real), sa.Column("error", text), sa.Column("result", text),
        sa.Column("version", integer, nullable=False, server_default=sa.text("1")),
        sa.Column("interruptions", integer, nullable=False, server_default=sa.text("0")),
        sa.Column("retries", integer, nullable=False, server_default=sa.text("0")),
        sa.Column("lease_owner", text), sa.Column("lease_run", text), sa.Column("lease_expires", real),
        sa.Column("checkpoint", text), sa.Column("stage", text), sa.Column("progress_done", integer),
        sa.Column("progress_total", integer), sa.Column("stage_started_at", real), sa.Column("progress_at", real),
    ], {"sqlite_autoincrement": True})  # ids are never reused: a job id in a log or an audit record names one job
    outbox: Table = ("outbox", [
        sa.Column("id", integer, primary_key=True, autoincrement=True),
        sa.Column("destination", text, nullable=False), sa.Column("sop_instance_uid", text, nullable=False),
        sa.Column("sop_class_uid", text, nullable=False), sa.Column("path", text, nullable=False),
        sa.Column("job_id", integer),
        sa.Column("state", text, _in("state", OUTBOX_STATES), nullable=False, server_default="pending"),
        sa.Column("attempts", integer, nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt_at", real, nullable=False), sa.Column("last_status", integer),
        sa.Column("last_error", text), sa.Column("created_at", real, nullable=False),
        sa.Column("updated_at", real, nullable=False), sa.Column("series_uid", text),
        sa.Column("first_failed_at", real),
        sa.UniqueConstraint("destination", "sop_instance_uid"),
    ], {"sqlite_autoincrement": True})
    destinations: Table = ("outbox_destinations", [
        sa.Column("destination", text, primary_key=True), sa.Column("failing_since", real),
        sa.Column("down_alerted", integer, nullable=False, server_default=sa.text("0")), sa.Column("last_error", text),
    ], {})
    return [
        (*studies, [("studies_patient", ["patient_id"])]),
        (*series, [("series_state", ["state"]), ("series_study", ["study_uid"])]),
        (*instances, [("instances_series", ["series_uid"])]),
        (*jobs, [("jobs_state", ["state"])]),
        (*outbox, [("outbox_due", ["state", "next_attempt_at"]), ("outbox_job", ["job_id"]),
                  ("outbox_series", ["series_uid"])]),
        (*destinations, []),
    ]


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for name, items, options, indexes in _tables():
        if not inspector.has_table(name):
            op.create_table(name, *items, **options)
            existing: set[str] = set()
        else:  # a database from before Alembic: add the columns its release did not have yet
            have = {c["name"] for c in inspector.get_columns(name)}
            for column in items:
                if isinstance(column, sa.Column) and column.name not in have:
                    op.add_column(name, column)
            existing = {str(i["name"]) for i in inspector.get_indexes(name)}
        for index, columns in indexes:
            if index not in existing:
                op.create_index(index, name, columns)


def downgrade() -> None:
    for name, *_ in reversed(_tables()):
        op.drop_table(name)
