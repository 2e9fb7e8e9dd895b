"""The connection a check reads through, and what doctor learnt about the server and the
role once, before the checks ran."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Row, text

from chatdb import citus
from chatdb.doctor.model import Options, Thresholds
from chatdb.identifiers import quote


@dataclass
class Probe:
    connection: Connection
    options: Options
    #: chatdb's tables that exist in the current schema: name -> oid.
    tables: dict[str, int]
    database: str
    user: str
    schema: str
    version: int  # server_version_num
    superuser: bool
    #: Members of pg_read_all_stats (pg_monitor includes it) see every session and statement.
    read_all_stats: bool
    #: Members of pg_stat_scan_tables (in pg_monitor) may run pgstattuple.
    scan_tables: bool
    read_only: bool
    #: Extensions installed in this database: name -> schema.
    extensions: dict[str, str] = field(default_factory=dict)
    #: Bytes that --deep read (pgstattuple, amcheck).
    read_bytes: int = 0
    #: On Citus: chatdb's tables whose rows are in shards on the workers (their table on
    #: the coordinator is an empty shell), by kind (chatdb.citus.DISTRIBUTED or REFERENCE).
    sharded: dict[str, str] = field(default_factory=dict)
    #: What the checks read from the shards once, for all of them (chatdb.doctor.shards).
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def thresholds(self) -> Thresholds:
        return self.options.thresholds

    @property
    def oids(self) -> list[int]:
        return list(self.tables.values())

    def rows(self, sql: str, **params: Any) -> Sequence[Row]:
        return self.connection.execute(text(sql), params).all()

    def one(self, sql: str, **params: Any) -> Row:
        return self.connection.execute(text(sql), params).one()

    def scalar(self, sql: str, **params: Any) -> Any:
        return self.connection.execute(text(sql), params).scalar()

    def quote(self, name: str) -> str:
        return quote(name)

    def qualified(self, name: str) -> str:
        """A table of chatdb's, as a fix names it (schema-qualified unless in public)."""
        table = self.quote(name)
        return table if self.schema == "public" else f"{self.quote(self.schema)}.{table}"

    def function(self, extension: str, name: str) -> str | None:
        """An extension's function, qualified with the extension's schema; None when the
        extension is not installed in this database."""
        schema = self.extensions.get(extension)
        return None if schema is None else f"{self.quote(schema)}.{name}"


PRIVILEGE_HINT = "`chatdb grants` prints the GRANT"


def learn(connection: Connection, options: Options, names: Sequence[str]) -> Probe:
    """What the checks need to know once: the tables, the role's memberships, the
    extensions, the server version."""
    row = connection.execute(
        text(
            "SELECT current_database(), current_user, current_schema(),"
            " current_setting('server_version_num')::int,"
            " coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false),"
            " pg_has_role(current_user, 'pg_read_all_stats', 'USAGE'),"
            " pg_has_role(current_user, 'pg_stat_scan_tables', 'USAGE'),"
            " pg_is_in_recovery() OR current_setting('transaction_read_only')::bool"
        )
    ).one()
    database, user, schema, version, superuser, read_all_stats, scan_tables, read_only = row
    tables = {
        name: oid
        for name, oid in connection.execute(
            text(
                "SELECT c.relname, c.oid FROM pg_class c"
                " WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')"
                " AND c.relname = ANY(:names)"
            ),
            {"names": list(names)},
        )
    }
    ordered = {name: tables[name] for name in names if name in tables}
    extensions: dict[str, str] = dict(
        connection.execute(
            text(
                "SELECT e.extname, n.nspname FROM pg_extension e"
                " JOIN pg_namespace n ON n.oid = e.extnamespace"
                " WHERE e.extname IN ('pg_stat_statements', 'pgstattuple', 'amcheck')"
            )
        ).all()
    )
    sharded = {}
    layout = citus.cluster(connection)
    if layout is not None:
        sharded = {
            name: entry.kind
            for name, entry in layout.tables.items()
            if name in ordered and entry.kind in (citus.DISTRIBUTED, citus.REFERENCE)
        }
    return Probe(
        connection,
        options,
        ordered,
        database,
        user,
        schema,
        int(version),
        bool(superuser),
        bool(superuser or read_all_stats),
        bool(superuser or scan_tables),
        bool(read_only),
        extensions,
        sharded=sharded,
    )
