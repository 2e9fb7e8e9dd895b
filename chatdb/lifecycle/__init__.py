"""``chatdb archive`` and ``chatdb purge``: cold storage and retention, in short batches.

hot tables -> archive (``archive``) -> gone (``purge``). A conversation always moves or
goes whole, with all its messages. The rules that keep other people's data safe:

- The cutoff is taken once, from the database clock, before the first batch
  (``now() - make_interval(secs => N)``: exact seconds, whatever the session's time zone).
- Each batch is one short transaction. Its conversations are locked with
  ``FOR UPDATE SKIP LOCKED`` by a query whose WHERE clause PostgreSQL re-checks on the
  newest row version once the lock is granted, so a conversation that just received a
  message (the application bumps ``updated_at`` in the same transaction) is never taken.
  Adding a message takes a ``FOR KEY SHARE`` lock on its conversation, which conflicts
  with our ``FOR UPDATE``: a conversation being written to is skipped, and no message can
  be added to one we hold.
- Idle conversations go in physical order, windows of table blocks one after another;
  soft-deleted rows and restores in keyset order through an index. Either way a run
  never rescans the dead tuples of earlier batches, and rows skipped because another
  session held them (or moved, in physical order) are visited again by a sweep from the
  start before the run ends.
- ``lock_timeout`` and ``statement_timeout`` on every batch; lock and statement timeouts,
  deadlocks, serialization failures and a foreign-key violation (a user deleted while their
  conversation was copied) are retried with backoff and a smaller batch.
- One lifecycle run per database at a time (see ``Guard``), and an audit row in
  ``chatdb_runs`` for every run, updated in the same transaction as each batch so that
  its counts are exactly what was committed, even after SIGKILL.

The modules, from what a user gives to what the database does (docs/architecture.md
says why each promise holds):

- ``durations``: ``90d``, ``1d12h``: exact units;
- ``models``: plans, options, counts and results;
- ``planning``: the cutoffs from the database clock, and the counts;
- ``statements``: every statement a batch sends to the data tables, and the conditions
  that choose their rows;
- ``phases``: each command's phases, put together from those statements;
- ``guard``: one run per database at a time;
- ``export``: the export file protocol, the file's side;
- ``audit``: the run's row in ``chatdb_runs``, the database's side;
- ``export_session``: one batch's lines, written, then committed or cut off;
- ``retry``: which failed batches are tried again, when and how large;
- ``sizing``: batches and windows that aim at 50 ms;
- ``batch``: one batch, in one transaction;
- ``workers``: the workers' passes and sweeps over a phase;
- ``runner``: a run from the guard to the outcome;
- ``vacuuming``: the dead rows a run left, and ``--vacuum``;
- ``commands``: ``archive``, ``purge``, ``restore``.
"""

from chatdb.lifecycle.audit import SETTLE_TIMEOUT
from chatdb.lifecycle.commands import archive, check_export_contents, purge, restore
from chatdb.lifecycle.durations import MAX_DURATION_SECONDS, Duration, parse_duration
from chatdb.lifecycle.export import ExportFile, check_export
from chatdb.lifecycle.guard import DEAD_HOLDER_WAIT, GUARD_KEY, STALLED_SECONDS, Guard
from chatdb.lifecycle.models import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DELETED_GRACE,
    DEFAULT_JOBS,
    MAX_JOBS,
    SLOW_TRANSACTION_SECONDS,
    Plan,
    RunOptions,
    RunResult,
    Tally,
    Vacuum,
)
from chatdb.lifecycle.phases import Phase, archive_phases, purge_phases, restore_phases
from chatdb.lifecycle.planning import plan_archive, plan_purge, plan_restore
from chatdb.lifecycle.retry import MAX_ATTEMPTS
from chatdb.lifecycle.sizing import (
    FIRST_BATCH_SIZE,
    FIRST_WINDOW_BLOCKS,
    MAX_WINDOW_BLOCKS,
    TARGET_BATCH_SECONDS,
)
from chatdb.lifecycle.statements import LOCK_TIMEOUT, STATEMENT_TIMEOUT, WINDOW, archivable, purgeable
from chatdb.lifecycle.vacuuming import vacuum
from chatdb.lifecycle.workers import LOCKED, MAX_LOCKED_SWEEPS

__all__ = [
    "DEAD_HOLDER_WAIT",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_DELETED_GRACE",
    "DEFAULT_JOBS",
    "FIRST_BATCH_SIZE",
    "FIRST_WINDOW_BLOCKS",
    "GUARD_KEY",
    "LOCKED",
    "LOCK_TIMEOUT",
    "MAX_ATTEMPTS",
    "MAX_DURATION_SECONDS",
    "MAX_JOBS",
    "MAX_LOCKED_SWEEPS",
    "MAX_WINDOW_BLOCKS",
    "SETTLE_TIMEOUT",
    "SLOW_TRANSACTION_SECONDS",
    "STALLED_SECONDS",
    "STATEMENT_TIMEOUT",
    "TARGET_BATCH_SECONDS",
    "WINDOW",
    "Duration",
    "ExportFile",
    "Guard",
    "Phase",
    "Plan",
    "RunOptions",
    "RunResult",
    "Tally",
    "Vacuum",
    "archivable",
    "archive",
    "archive_phases",
    "check_export",
    "check_export_contents",
    "parse_duration",
    "plan_archive",
    "plan_purge",
    "plan_restore",
    "purge",
    "purge_phases",
    "purgeable",
    "restore",
    "restore_phases",
    "vacuum",
]
