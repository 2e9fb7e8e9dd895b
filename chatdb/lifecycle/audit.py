"""The run's audit row in ``chatdb_runs``: opened before the first batch, renewed (its
heartbeat and counts) in the transaction of every batch, closed with the run's outcome.

It also carries the database's side of the export file protocol: the file's identity,
its committed length and tail, and the intent of the batch being written (see
docs/architecture.md, "What the database records")."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from sqlalchemy import BigInteger, Connection, Engine, cast, insert, select, text
from sqlalchemy.exc import DBAPIError

from chatdb import db
from chatdb.errors import StateError
from chatdb.lifecycle.models import Plan, Tally
from chatdb.lifecycle.statements import LOCK_TIMEOUT
from chatdb.schema import chatdb_runs

SETTLE_TIMEOUT = "2s"  # waiting to learn whether an interrupted COMMIT committed

#: The export file's length with every committed batch, as the audit row records it.
EXPORT_BYTES = cast(chatdb_runs.c.counts["export_bytes"].as_string(), BigInteger)

#: Renew the heartbeat and add a batch's counts, in the batch's own transaction, so that
#: the row counts exactly what committed; record the export's length and tail with the
#: batch (when ``:export_bytes`` is not null) and clear the intent: the batch that commits
#: this is the one its run recorded it was about to export. Only while the run is
#: ``running``: a run marked by another changes nothing (its row count is 0).
HEARTBEAT = text(
    "UPDATE chatdb_runs SET heartbeat_at = now(), counts = (counts - 'export_pending') || jsonb_build_object("
    " 'conversations', coalesce((counts->>'conversations')::bigint, 0) + :conversations,"
    " 'messages', coalesce((counts->>'messages')::bigint, 0) + :messages,"
    " 'archive_conversations', coalesce((counts->>'archive_conversations')::bigint, 0)"
    "   + :archive_conversations,"
    " 'archive_messages', coalesce((counts->>'archive_messages')::bigint, 0) + :archive_messages,"
    " 'exported', coalesce((counts->>'exported')::bigint, 0) + :exported)"
    " || jsonb_strip_nulls(jsonb_build_object("
    "  'export_bytes', CAST(:export_bytes AS bigint), 'export_tail', CAST(:export_tail AS text)))"
    " WHERE id = :id AND outcome = 'running'"
)
#: Record what the run is about to append to the export file (``export_pending``), only
#: while the run is ``running``.
INTENT = text(
    "UPDATE chatdb_runs SET counts = counts || jsonb_build_object('export_pending', CAST(:intent AS jsonb))"
    " WHERE id = :id AND outcome = 'running'"
)
#: The run's outcome, error and last counts, and its end.
CLOSE = text(
    "UPDATE chatdb_runs SET outcome = :outcome, finished_at = now(), error = :error,"
    " counts = counts || CAST(:extra AS jsonb) WHERE id = :id"
)
_SET_LOCK_TIMEOUT = text("SELECT set_config('lock_timeout', :t, true)")


def _no_longer_running(run_id: int | None) -> StateError:
    return StateError(
        f"run {run_id} is no longer marked running in chatdb_runs; stopped",
        hint="another run may have taken over; see `chatdb status`",
    )


def masked(arguments: dict[str, Any]) -> dict[str, Any]:
    return {key: db.mask_text(value) if isinstance(value, str) else value for key, value in arguments.items()}


def exported_before(connection: Connection, path: str) -> tuple[int | None, str | None, dict | None]:
    """What the last run exporting to ``path`` recorded of the file it committed (its
    length and the hash of its last bytes), and of the batch it was about to append when
    it recorded them last (see ExportFile.intent), if any."""
    counts = chatdb_runs.c.counts
    with connection.begin():
        row = connection.execute(
            select(
                EXPORT_BYTES,
                counts["export_tail"].as_string(),
                counts["export_pending"],
            )
            .where(counts["export_path"].as_string() == path)
            .order_by(chatdb_runs.c.id.desc())
            .limit(1)
        ).first()
    return (None, None, None) if row is None else (row[0], row[1], row[2])


class AuditRow:
    """The row of one run. ``id`` is None until ``open``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.id: int | None = None

    def open(
        self, connection: Connection, plan: Plan, arguments: dict[str, Any], export: dict[str, Any]
    ) -> int:
        """Insert the row, ``running``, with the plan's counts and cutoffs and what the
        run records of its export file (``export``: its identity, length and tail)."""
        counts: dict[str, Any] = {**Tally().as_dict(), "exported": 0}
        if plan.counts is not None:
            counts["planned"] = plan.counts.as_dict()
        if plan.deleted_cutoff is not None:
            counts["deleted_cutoff"] = plan.deleted_cutoff.isoformat()
        counts.update(export)
        with connection.begin():
            # What the run records of its export file (its length now, the start it may
            # be cut back to) must outlive a crash of the server: committed for good.
            connection.execute(text("SELECT set_config('synchronous_commit', 'on', true)"))
            self.id = connection.execute(
                insert(chatdb_runs)
                .values(
                    command=plan.command,
                    arguments=masked(arguments),
                    cutoff=plan.cutoff,
                    client_host=socket.gethostname()[:255],
                    client_pid=os.getpid(),
                    counts=counts,
                )
                .returning(chatdb_runs.c.id)
            ).scalar_one()
        return self.id

    def record_intent(self, intent: dict[str, Any]) -> None:
        """Before a batch's lines reach the export file, record durably, in a transaction
        of its own, what the run is about to append after the committed length: if the
        batch never commits, the next run can tell those bytes from any others, even in
        a file that was empty. The batch's own transaction clears it (HEARTBEAT)."""
        with self.engine.begin() as connection:
            connection.execute(
                text(
                    "SELECT set_config('synchronous_commit', 'on', true),"
                    " set_config('lock_timeout', :lock, true)"
                ),
                {"lock": LOCK_TIMEOUT},
            )
            recorded = connection.execute(INTENT, {"intent": json.dumps(intent), "id": self.id}).rowcount
        if not recorded:
            raise _no_longer_running(self.id)

    def heartbeat(
        self, connection: Connection, tally: Tally, exported: int, export: dict[str, Any] | None
    ) -> None:
        """Renew the run's heartbeat and add the batch's counts, in the batch's own
        transaction: the audit row counts exactly what was committed, and records how long
        the export file is with this batch's lines in it (``export``, when it exports)."""
        params: dict[str, Any] = {**tally.as_dict(), "exported": exported, "id": self.id}
        params |= {"export_bytes": None, "export_tail": None}
        if export is not None:
            params |= export
        renewed = connection.execute(HEARTBEAT, params).rowcount
        if not renewed:
            raise _no_longer_running(self.id)

    def committed_export_bytes(self) -> int | None:
        """The export file's length the database committed, read on a connection of its
        own with ``FOR SHARE``: it waits (up to SETTLE_TIMEOUT) for a batch's transaction
        that holds the row to end. A ``DBAPIError`` when it cannot tell."""
        with self.engine.connect() as connection, connection.begin():
            connection.execute(_SET_LOCK_TIMEOUT, {"t": SETTLE_TIMEOUT})
            return connection.execute(
                select(EXPORT_BYTES).where(chatdb_runs.c.id == self.id).with_for_update(read=True)
            ).scalar_one()

    def close(self, connection: Connection, outcome: str, error: str | None, extra: dict[str, Any]) -> bool:
        """Record the run's outcome, on ``connection`` or, failing that, on a connection
        of its own. False when neither could: the row stays ``running``, and the next run
        marks it interrupted."""
        params = {"outcome": outcome, "error": error, "extra": json.dumps(extra), "id": self.id}

        def close(connection: Connection) -> None:
            # A batch stuck in its COMMIT holds the row: rather than wait for it for ever,
            # the run is left `running`, and the next run marks it interrupted.
            connection.execute(_SET_LOCK_TIMEOUT, {"t": SETTLE_TIMEOUT})
            connection.execute(CLOSE, params)

        try:
            if connection.in_transaction():
                connection.rollback()
            with connection.begin():
                close(connection)
        except DBAPIError:
            # The run's connection is gone (or the row stayed locked): try once more on
            # a connection of its own; failing that, the next run marks this one.
            try:
                with self.engine.begin() as other:
                    close(other)
            except DBAPIError:
                return False
        return True
