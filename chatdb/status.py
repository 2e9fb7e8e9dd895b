"""``chatdb status``: what a database holds, at which revision, and what ran lately."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Engine, select, text

from chatdb import catalog, citus, migrations, size_history
from chatdb.schema import CHATDB_TABLES, USERS_CREATED_BY_CHATDB, chatdb_runs

#: Above this many rows (by the planner's estimate) the count is the estimate: an exact
#: count(*) of a large table is a sequential scan nobody asked for.
EXACT_COUNT_LIMIT = 1_000_000
RECENT_RUNS = 10


@dataclass(frozen=True)
class TableStats:
    name: str
    rows: int
    rows_exact: bool
    total_bytes: int
    owner: str  # "chatdb" or "application" (a users table chatdb did not create)


@dataclass(frozen=True)
class RunSummary:
    id: int
    command: str
    outcome: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    cutoff: dt.datetime | None
    db_user: str
    counts: dict
    error: str | None = None

    def done(self, rows: str) -> int:
        """The ``conversations`` or ``messages`` the run moved or deleted, hot and archived
        together."""
        return int(self.counts.get(rows) or 0) + int(self.counts.get(f"archive_{rows}") or 0)


@dataclass(frozen=True)
class StatusReport:
    server_version: str
    database: str
    user: str
    migration: migrations.MigrationStatus
    tables: list[TableStats]
    runs: list[RunSummary]
    #: Whether this run added the tables' sizes to chatdb_size_history (doctor's growth).
    sizes_recorded: bool = False
    #: On Citus: where the shards of the distributed and reference tables are, by node.
    placements: list[citus.Placement] | None = None


def gather(engine: Engine) -> StatusReport:
    migration = migrations.status(engine)
    with engine.connect() as connection:
        recorded = size_history.record(connection, "status")
        version, database, user = connection.execute(
            text("SELECT current_setting('server_version'), current_database(), current_user")
        ).one()
        names = ("users", *(table.name for table in CHATDB_TABLES))
        present = catalog.table_names(connection)
        quote = connection.dialect.identifier_preparer.quote
        on_citus = citus.enabled(connection)
        # On Citus the coordinator's table of a distributed one is an empty shell: the
        # sizes and estimates are the shards'.
        sharded = citus.sizes(connection, [n for n in names if n in present]) if on_citus else {}
        tables = []
        for name in (n for n in names if n in present):
            estimate, size, comment = connection.execute(
                text(
                    "SELECT c.reltuples::bigint, pg_total_relation_size(c.oid),"
                    " obj_description(c.oid, 'pg_class')"
                    " FROM pg_class c WHERE c.oid = to_regclass(:name)"
                ),
                {"name": quote(name)},
            ).one()
            estimate, size = sharded.get(name, (estimate, size))
            exact = estimate <= EXACT_COUNT_LIMIT  # -1 (never analysed) counts exactly too
            rows = (
                connection.execute(text(f"SELECT count(*) FROM {quote(name)}")).scalar_one()
                if exact
                else estimate
            )
            owner = "application" if name == "users" and comment != USERS_CREATED_BY_CHATDB else "chatdb"
            tables.append(TableStats(name, int(rows), exact, int(size), owner))
        runs = []
        if chatdb_runs.name in present:
            query = (
                select(chatdb_runs)
                .order_by(chatdb_runs.c.started_at.desc(), chatdb_runs.c.id.desc())
                .limit(RECENT_RUNS)
            )
            for row in connection.execute(query).mappings():
                runs.append(
                    RunSummary(
                        id=row["id"],
                        command=row["command"],
                        outcome=row["outcome"],
                        started_at=row["started_at"],
                        finished_at=row["finished_at"],
                        cutoff=row["cutoff"],
                        db_user=row["db_user"],
                        counts=dict(row["counts"] or {}),
                        error=row["error"],
                    )
                )
        placements = citus.placements(connection, [t.name for t in tables]) if on_citus else None
    return StatusReport(version, database, user, migration, tables, runs, recorded, placements)
