"""Running on Citus: how chatdb's tables are laid out on a cluster, and making that layout.

On a database with the Citus extension (the coordinator of a cluster), ``chatdb migrate``
distributes ``schema.DISTRIBUTED_TABLES`` by ``schema.DISTRIBUTION_COLUMN``, co-located,
and the application's ``users`` must be a reference table, which chatdb makes it only
when it created ``users`` itself or the operator asks (``--reference-users``). chatdb's
own small tables stay on the coordinator; those a lifecycle batch writes
(``schema.CITUS_LOCAL_TABLES``: the audit row) are added to Citus's metadata as Citus
local tables, so that each batch commits in two phases with its audit row. See
docs/architecture.md, "Running on Citus".

Every function takes a Connection or an Engine, returns plain data and never prints.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, ForeignKeyConstraint, Table, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError

from chatdb.errors import ChatdbError, StateError, one_line
from chatdb.schema import (
    CITUS_LOCAL_TABLES,
    DISTRIBUTED_TABLES,
    DISTRIBUTION_COLUMN,
    USERS_CREATED_BY_CHATDB,
    add_constraint_sql,
    users,
)

#: citus_table_type as Citus names it, for the tables in its metadata.
DISTRIBUTED = "distributed"
REFERENCE = "reference"
#: A table of the coordinator that Citus added to its metadata (one with a foreign key
#: to a reference table, or one added by ``citus_add_local_table_to_metadata``, as chatdb
#: adds ``schema.CITUS_LOCAL_TABLES``): it stays on the coordinator.
CITUS_LOCAL = "local"

CREATE_REFERENCE_USERS = f"SELECT create_reference_table('{users.name}')"
#: What the operator runs on a coordinator that is not in Citus's metadata.
SET_COORDINATOR_HOST = "SELECT citus_set_coordinator_host('<host>', {port})"

#: The revision whose primary keys include the distribution column: below it, Citus
#: cannot hold the tables distributed.
LAYOUT_REVISION = "0007_keys_with_user_id"

_DIALECT = postgresql.dialect()


@dataclass(frozen=True)
class CitusTable:
    name: str
    kind: str  # DISTRIBUTED, REFERENCE or CITUS_LOCAL
    column: str | None  # the distribution column of a distributed table
    colocation: int


@dataclass(frozen=True)
class Cluster:
    """What the coordinator's metadata says about chatdb's tables. A table it does not
    list is a plain table of the coordinator."""

    version: str
    tables: dict[str, CitusTable]

    def kind(self, table: str) -> str | None:
        entry = self.tables.get(table)
        return entry.kind if entry else None


def enabled(connection: Connection) -> bool:
    """Whether this database has the Citus extension (a coordinator, or a worker)."""
    return bool(
        connection.execute(text("SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')")).scalar()
    )


def sequential(connection: Connection) -> None:
    """Make the transaction's statements on distributed tables use one connection per node.
    A transaction that writes a reference table (``users``) after a statement that ran
    in parallel over the shards of a table with a foreign key to it is refused ("cannot
    modify table ... because there was a parallel operation on a distributed table"):
    Citus must see the reference row and the shard rows that refer to it on the same
    connection. Local to the transaction; nothing on plain PostgreSQL."""
    if enabled(connection):
        connection.execute(text("SET LOCAL citus.multi_shard_modify_mode = 'sequential'"))


def cluster(connection: Connection) -> Cluster | None:
    """The Citus layout of this database, or None when it has no Citus extension."""
    version = connection.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'citus'")).scalar()
    if version is None:
        return None
    rows = connection.execute(
        text(
            "SELECT c.relname, p.partmethod::text, p.repmodel::text,"
            " column_to_column_name(p.logicalrelid, p.partkey), p.colocationid"
            " FROM pg_dist_partition p JOIN pg_class c ON c.oid = p.logicalrelid"
            " WHERE c.relnamespace = current_schema()::regnamespace"
        )
    )
    tables = {}
    for name, method, model, column, colocation in rows:
        if method == "h":
            kind = DISTRIBUTED
        elif model == "t":
            kind = REFERENCE
        else:
            kind = CITUS_LOCAL
        tables[name] = CitusTable(name, kind, column if method == "h" else None, colocation)
    return Cluster(version, tables)


def preflight(engine: Engine, *, reference_users: bool = False) -> Cluster | None:
    """Refuse to migrate a Citus database whose application-owned ``users`` is not a
    reference table, unless ``reference_users`` (then ``distribute`` makes it one), or
    whose coordinator is not in Citus's metadata while chatdb's audit table is not a
    Citus local table yet (see ``require_coordinator``). None when the database has no
    Citus."""
    with engine.connect() as connection:
        layout = cluster(connection)
        if layout is None:
            return None
        comment = connection.execute(
            text("SELECT obj_description(to_regclass(:name), 'pg_class')"), {"name": users.name}
        ).scalar()
        present = connection.execute(text("SELECT to_regclass(:name)"), {"name": users.name}).scalar()
        require_coordinator(connection, layout)
    kind = layout.kind(users.name)
    if present is None or kind == REFERENCE:
        return layout
    if kind == DISTRIBUTED:
        raise StateError(
            f"users is distributed by {layout.tables[users.name].column}; chatdb's distributed "
            "tables need it as a reference table (a copy on every node)"
        )
    if comment != USERS_CREATED_BY_CHATDB and not reference_users:
        raise StateError(
            "users is a local table on this Citus cluster and chatdb's distributed tables need it "
            f"as a reference table: run {CREATE_REFERENCE_USERS}, or pass --reference-users to "
            "have chatdb run it"
        )
    return layout


def coordinator_in_metadata(connection: Connection) -> bool:
    """Whether the coordinator is a node of Citus's metadata (group 0 of ``pg_dist_node``),
    as ``citus_set_coordinator_host`` makes it: Citus keeps local tables in its metadata
    only then."""
    found = connection.execute(text("SELECT EXISTS (SELECT FROM pg_dist_node WHERE groupid = 0)"))
    return bool(found.scalar())


def require_coordinator(connection: Connection, layout: Cluster) -> None:
    """Refuse when a table of ``schema.CITUS_LOCAL_TABLES`` is not a Citus local table
    yet and the coordinator is not in Citus's metadata: Citus adds a local table to its
    metadata only then, and without it a batch's write on a worker would commit in one
    phase, apart from its audit row. chatdb cannot know the name by which the workers
    reach the coordinator, so the operator runs ``citus_set_coordinator_host``."""
    if all(layout.kind(table.name) == CITUS_LOCAL for table in CITUS_LOCAL_TABLES):
        return
    if coordinator_in_metadata(connection):
        return
    port = connection.execute(text("SELECT current_setting('port')")).scalar()
    raise StateError(
        "the coordinator is not in Citus's metadata, which chatdb needs to commit each lifecycle "
        f"batch with its audit row: run {SET_COORDINATOR_HOST.format(port=port)} on it, <host> "
        "being its name as the workers reach it, then chatdb migrate again"
    )


def distributed_tables(connection: Connection) -> list[str]:
    """chatdb's tables that Citus distributes in this database (none without Citus)."""
    layout = cluster(connection)
    if layout is None:
        return []
    return [table.name for table in DISTRIBUTED_TABLES if layout.kind(table.name) == DISTRIBUTED]


def refuse_below_layout(connection: Connection, target: str, action: str, undone: list[str]) -> None:
    """Refuse to ``action`` ("downgrade to", "stamp") ``target`` when ``undone`` (the
    revisions it leaves not applied) holds ``LAYOUT_REVISION`` and chatdb's tables are
    distributed: their keys must keep ``user_id``. Citus itself would stop a downgrade
    half-way, with the revisions after it already undone."""
    if LAYOUT_REVISION not in undone:
        return
    distributed = distributed_tables(connection)
    if distributed:
        raise StateError(
            f"cannot {action} {target} on Citus: the distributed tables ({', '.join(distributed)}) "
            f"need primary keys that include {DISTRIBUTION_COLUMN}, which revisions below "
            f"{LAYOUT_REVISION} do not have"
        )


def owner_keys() -> list[ForeignKeyConstraint]:
    """The foreign keys between distributed tables (each from a child to its parent)."""
    names = {table.name for table in DISTRIBUTED_TABLES}
    return [
        key
        for table in DISTRIBUTED_TABLES
        for key in sorted(table.foreign_key_constraints, key=lambda key: str(key.name))
        if key.referred_table.name in names
    ]


@dataclass(frozen=True)
class Distribution:
    """What ``distribute`` changed: the tables it distributed, and those it added to
    Citus's metadata as Citus local tables."""

    distributed: list[str]
    local: list[str]


def distribute(engine: Engine, *, lock_timeout: str) -> Distribution:
    """Make ``users`` a reference table if it is not one, distribute every table of
    ``schema.DISTRIBUTED_TABLES`` that is not distributed yet, co-located with the first,
    and add each table of ``schema.CITUS_LOCAL_TABLES`` that is not in Citus's metadata yet
    to it (``citus_add_local_table_to_metadata``), in one transaction. Citus distributes a
    table only when every foreign key between it and a local table is gone, so the keys
    between these tables are dropped first (those there are: a table an operator made
    local again with ``undistribute_table`` lost its key before) and added back (checked)
    once all are distributed. Returns what it changed; nothing when all was done already.

    A table distributed otherwise (by another column, or not co-located) is a StateError:
    chatdb's router queries need all of a user's rows on one node."""
    first = DISTRIBUTED_TABLES[0].name
    quote = _DIALECT.identifier_preparer.quote
    with engine.begin() as connection:
        connection.execute(text("SELECT set_config('lock_timeout', :t, true)"), {"t": lock_timeout})
        layout = cluster(connection)
        assert layout is not None
        _check_layout(layout)
        require_coordinator(connection, layout)
        todo = [table.name for table in DISTRIBUTED_TABLES if layout.kind(table.name) != DISTRIBUTED]
        local = [table.name for table in CITUS_LOCAL_TABLES if layout.kind(table.name) != CITUS_LOCAL]
        try:
            if layout.kind(users.name) != REFERENCE:
                connection.execute(text(CREATE_REFERENCE_USERS))
            keys = owner_keys() if todo else []
            for key in keys:
                owner, constraint = quote(key.table.name), quote(str(key.name))
                connection.execute(text(f"ALTER TABLE {owner} DROP CONSTRAINT IF EXISTS {constraint}"))
            for name in todo:
                connection.execute(
                    text("SELECT create_distributed_table(:table, :column, colocate_with => :with)"),
                    {
                        "table": quote(name),
                        "column": DISTRIBUTION_COLUMN,
                        "with": "default" if name == first else quote(first),
                    },
                )
            for key in keys:
                connection.execute(text(add_constraint_sql(key)))
            for table in CITUS_LOCAL_TABLES:
                if table.name in local:
                    _add_local_table(connection, table)
        except DBAPIError as exc:
            raise StateError(f"could not distribute chatdb's tables: {one_line(exc)}") from None
    return Distribution(todo, local)


def _add_local_table(connection: Connection, table: Table) -> None:
    """Add ``table`` to Citus's metadata as a Citus local table. Citus keeps the rows in a
    shard of the coordinator and gives the table an identity column's new sequence, which
    starts again at 1: each such sequence goes on from where the table's was."""
    quote = _DIALECT.identifier_preparer.quote
    positions = []
    for column in table.c:
        if column.identity is None:
            continue
        sequence = connection.execute(
            text("SELECT pg_get_serial_sequence(:table, :column)"),
            {"table": quote(table.name), "column": column.name},
        ).scalar_one()
        last, called = connection.execute(text(f"SELECT last_value, is_called FROM {sequence}")).one()
        positions.append((column.name, last, called))
    connection.execute(text("SELECT citus_add_local_table_to_metadata(:table)"), {"table": quote(table.name)})
    for name, last, called in positions:
        connection.execute(
            text("SELECT setval(pg_get_serial_sequence(:table, :column), :last, :called)"),
            {"table": quote(table.name), "column": name, "last": last, "called": called},
        )


def redistribute_sql(table: str) -> str:
    """The statement that distributes ``table``, distributed by another column, by
    ``user_id`` and co-located with the first distributed table: Citus moves its rows."""
    return (
        f"SELECT alter_distributed_table('{table}', distribution_column => '{DISTRIBUTION_COLUMN}', "
        f"colocate_with => '{DISTRIBUTED_TABLES[0].name}');"
    )


def colocate_sql(table: str) -> str:
    """The statement that puts ``table``, distributed by ``user_id``, back in the first
    distributed table's co-location group (its shards are already where that group's are)."""
    return (
        f"SELECT update_distributed_table_colocation('{table}', "
        f"colocate_with => '{DISTRIBUTED_TABLES[0].name}');"
    )


def require_layout(layout: Cluster) -> None:
    """Refuse to run archive, restore or purge unless every table of
    ``schema.DISTRIBUTED_TABLES`` is distributed by ``user_id`` and co-located: each batch
    is one router task per statement only then (a user's rows on one node)."""
    local = [table.name for table in DISTRIBUTED_TABLES if layout.kind(table.name) != DISTRIBUTED]
    if local:
        raise StateError(
            f"{', '.join(local)} {'is' if len(local) == 1 else 'are'} not distributed on this Citus "
            f"cluster while {DISTRIBUTED_TABLES[0].name} is; chatdb needs all of a user's rows on one node",
            hint="run chatdb migrate, which distributes them",
        )
    _check_layout(layout)


def _check_layout(layout: Cluster) -> None:
    group = None
    for table in DISTRIBUTED_TABLES:
        entry = layout.tables.get(table.name)
        if entry is None or entry.kind != DISTRIBUTED:
            continue
        if entry.column != DISTRIBUTION_COLUMN:
            raise StateError(
                f"{table.name} is distributed by {entry.column}; chatdb needs it distributed "
                f"by {DISTRIBUTION_COLUMN}, co-located with {DISTRIBUTED_TABLES[0].name}",
                hint=f"run {redistribute_sql(table.name)} then the command again",
            )
        if group is not None and entry.colocation != group:
            raise StateError(
                f"{table.name} is not co-located with the other tables distributed by "
                f"{DISTRIBUTION_COLUMN}; chatdb needs all of a user's rows on one node",
                hint=f"run {colocate_sql(table.name)} then the command again",
            )
        group = entry.colocation


# --- shards ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardIndexes:
    """The indexes of one shard placement of a distributed table, by the names of the
    coordinator's (the shard's names carry ``_<shardid>``), each with its definition in
    the coordinator's terms and whether it is valid and ready."""

    table: str
    shard: int
    node: str  # host:port
    indexes: dict[str, tuple[str, bool]]
    error: str | None = None  # the worker's error, when the placement could not be read

    @property
    def where(self) -> str:
        return f"shard {self.table}_{self.shard} on {self.node}"


#: Run on each placement by run_command_on_placements, %s being the shard's name.
_SHARD_INDEXES = (
    "SELECT coalesce(json_agg(json_build_array(c.relname, pg_get_indexdef(i.indexrelid),"
    " i.indisvalid AND i.indisready)), '[]') FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
    " WHERE i.indrelid = '%s'::regclass"
)


def shard_indexes(connection: Connection, table: str) -> list[ShardIndexes]:
    """The indexes of every shard placement of ``table``, read on the workers."""
    found = []
    for placement in on_placements(connection, table, _SHARD_INDEXES):
        if placement.error is not None:
            found.append(ShardIndexes(table, placement.shard, placement.node, {}, placement.error))
            continue
        suffix = re.compile(rf"_{placement.shard}\b")
        rows = placement.value or []
        assert isinstance(rows, list)
        indexes = {
            suffix.sub("", name): (suffix.sub("", definition), bool(valid))
            for name, definition, valid in rows
        }
        found.append(ShardIndexes(table, placement.shard, placement.node, indexes))
    return found


def index_definitions(connection: Connection, table: str) -> dict[str, str]:
    """The coordinator's definition of each index of ``table`` (its shell table)."""
    rows = connection.execute(
        text(
            "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = CAST(:table AS regclass)"
        ),
        {"table": table},
    )
    return dict(rows.all())


@dataclass(frozen=True)
class PlacementResult:
    """What a command returned on one shard placement: its single value, read as JSON, or
    the worker's error when the placement could not be read."""

    table: str
    shard: int
    node: str  # host:port
    value: object = None
    error: str | None = None


def on_placements(connection: Connection, table: str, command: str) -> list[PlacementResult]:
    """Run ``command`` on every shard placement of ``table`` (``%s`` is the shard's name,
    as in ``format()``: a literal ``%`` is ``%%``); it returns one JSON value."""
    rows = connection.execute(
        text(
            "SELECT shardid, nodename, nodeport, success, result"
            " FROM run_command_on_placements(CAST(:table AS regclass), :command)"
            " ORDER BY shardid, nodename, nodeport"
        ),
        {"table": table, "command": command},
    )
    found = []
    for shard, host, port, success, result in rows:
        node = f"{host}:{port}"
        if success:
            found.append(PlacementResult(table, int(shard), node, json.loads(result) if result else None))
        else:
            found.append(PlacementResult(table, int(shard), node, error=" ".join(str(result).split())))
    return found


def on_workers(connection: Connection, command: str) -> list[PlacementResult]:
    """Run ``command`` (one JSON value) in this database on every worker; ``table`` is
    empty and ``shard`` 0 in what it returns."""
    rows = connection.execute(
        text(
            "SELECT nodename, nodeport, success, result FROM run_command_on_workers(:command)"
            " ORDER BY nodename, nodeport"
        ),
        {"command": command},
    )
    return [
        PlacementResult("", 0, f"{host}:{port}", json.loads(result) if success and result else None)
        if success
        else PlacementResult("", 0, f"{host}:{port}", error=" ".join(str(result).split()))
        for host, port, success, result in rows
    ]


# --- sizes and placements ------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where the shards of a table are: how many on a node, and their size there."""

    table: str
    node: str  # host:port
    shards: int
    total_bytes: int


def sizes(connection: Connection, tables: list[str]) -> dict[str, tuple[int, int]]:
    """(row estimate, bytes) of each of ``tables`` that Citus distributes or replicates,
    summed over its shards (the coordinator's table of a distributed one is an empty
    shell). The estimate is the shards' planner statistics, -1 when none was analysed."""
    found = {}
    for table in tables:
        kind = connection.execute(
            text(
                "SELECT p.partmethod::text FROM pg_dist_partition p"
                " WHERE p.logicalrelid = to_regclass(:table)"
            ),
            {"table": table},
        ).scalar()
        if kind is None:
            continue
        estimate = connection.execute(
            text(
                "SELECT CASE WHEN bool_and(result::bigint < 0) THEN -1"
                " ELSE sum(greatest(result::bigint, 0)) END"
                " FROM run_command_on_shards(CAST(:table AS regclass),"
                " 'SELECT reltuples::bigint FROM pg_class WHERE oid = ''%s''::regclass')"
                " WHERE success"
            ),
            {"table": table},
        ).scalar()
        if kind == "n":  # a reference or a Citus local table: one shard, counted once
            estimate = (
                connection.execute(
                    text("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(:table)"),
                    {"table": table},
                ).scalar()
                if estimate is None
                else estimate
            )
        size = connection.execute(
            text("SELECT citus_total_relation_size(CAST(:table AS regclass), fail_on_error => false)"),
            {"table": table},
        ).scalar()
        found[table] = (int(estimate if estimate is not None else -1), int(size or 0))
    return found


def placements(connection: Connection, tables: list[str]) -> list[Placement]:
    """The shards of ``tables`` by node (citus_shards), in table order then node."""
    rows = connection.execute(
        text(
            "SELECT table_name::text, nodename || ':' || nodeport, count(*), coalesce(sum(shard_size), 0)"
            " FROM citus_shards WHERE table_name::text = ANY(:tables)"
            " GROUP BY 1, 2 ORDER BY array_position(CAST(:tables AS text[]), table_name::text), 2"
        ),
        {"tables": tables},
    )
    return [Placement(table, node, int(shards), int(size)) for table, node, shards, size in rows]


# --- errors --------------------------------------------------------------------------------

#: Messages by which Citus says a statement cannot run on how the tables are distributed.
#: Citus gives most of them SQLSTATE 0A000 (feature_not_supported), some XX000, codes
#: PostgreSQL's own errors share; only the words tell them apart. Citus's messages are not
#: translated (it ships no message catalogs), so they read the same under any lc_messages.
_DISTRIBUTION_PHRASES = (
    "distributed",
    "distribution column",
    "colocated",
    "co-located",
    "reference table",
    "shard",
    "parallel operation",
    "multi-shard",
    "router",
    "repartition",
)


def distribution_error(exc: BaseException) -> ChatdbError | None:
    """A StateError that says a statement failed because of how the tables are
    distributed on Citus (not a lock, not the data), or None when ``exc`` is not one."""
    orig = getattr(exc, "orig", exc)
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate not in ("0A000", "XX000", "25001"):
        return None
    message = one_line(exc)
    if not any(phrase in message.lower() for phrase in _DISTRIBUTION_PHRASES):
        return None
    return StateError(
        f"Citus cannot run this on the distributed tables: {message}",
        hint="a limit of how the tables are distributed, not a lock or the data: "
        'see README.md, "Running on Citus"',
    )
