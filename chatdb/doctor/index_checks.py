"""Index checks: which indexes the application's queries use (statistics), and, with
``--deep``, whether each B-tree is intact (amcheck)."""

from __future__ import annotations

from sqlalchemy import Row
from sqlalchemy.exc import DBAPIError

from chatdb import indexes, patterns
from chatdb.doctor import shards
from chatdb.doctor.model import FAIL, OK, SKIPPED, WARN, Finding, count, size
from chatdb.doctor.probe import PRIVILEGE_HINT, Probe
from chatdb.errors import one_line

_CONSTRAINTS = {"p": "a primary key", "u": "a unique constraint", "x": "an exclusion constraint"}


def _served() -> dict[str, str]:
    """Which query pattern each declared index serves."""
    return {pattern.index: pattern.name for pattern in patterns.PATTERNS}


def _indexes(probe: Probe, columns: str, joins: str = "", condition: str = "true") -> list[Row]:
    """The indexes of chatdb's tables in the order of its tables, then by name: ``table``,
    ``index`` and ``columns``, in terms of pg_index ``i``, the index's pg_class ``c`` and
    ``joins``."""
    rows = probe.rows(
        f"SELECT t.relname AS table, c.relname AS index_name, {columns}"
        " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid"
        f" {joins} WHERE i.indrelid = ANY(:oids) AND {condition} ORDER BY t.relname, c.relname",
        oids=probe.oids,
    )
    order = {name: n for n, name in enumerate(probe.tables)}
    return sorted(rows, key=lambda r: (order.get(r.table, len(order)), r.index_name))


def _use(
    row: Row, label: str, node: str | None, status: str, scans: int, detail: str, fix: str | None = None
) -> Finding:
    return Finding("indexes", label, "index use", status, scans, None, detail, fix, "scans", node)


def index_use(probe: Probe) -> list[Finding]:
    """An index never scanned since the statistics were reset. A declared one means the
    application never ran its pattern (keep it); an undeclared one costs every write for
    nothing."""
    reset = probe.scalar("SELECT stats_reset FROM pg_stat_database WHERE datname = current_database()")
    since = (
        f"since the statistics were reset at {reset:%Y-%m-%d %H:%M %Z}"
        if reset
        else ("since the statistics began (never reset)")
    )
    rows = _indexes(
        probe,
        "s.idx_scan, pg_relation_size(c.oid) AS bytes, con.contype::text AS constraint",
        "JOIN pg_stat_all_indexes s ON s.indexrelid = i.indexrelid"
        " LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid"
        "  AND con.contype IN ('p', 'u', 'x')",
    )
    stats = shards.read(probe, "tables", shards.TABLE_STATS)
    found = shards.unread("indexes", stats)
    for row in rows:
        if row.table not in stats:
            found += _index_use_of(
                probe, row, since, row.index_name, None, "", int(row.idx_scan or 0), row.bytes
            )
            continue
        for group in shards.groups(probe, row.table, stats[row.table]):
            scans = bytes_ = 0
            for shard in group.shards:
                assert isinstance(shard.value, dict)
                for name, (scanned, held) in shard.value["indexes"].items():
                    if shards.index_name(name, shard.shard) == row.index_name:
                        scans, bytes_ = scans + int(scanned), bytes_ + int(held)
            label = group.label(row.index_name)
            found += _index_use_of(probe, row, since, label, group.node, f"; {group.where}", scans, bytes_)
    return found


def _index_use_of(
    probe: Probe,
    row: Row,
    since: str,
    label: str,
    node: str | None,
    shards_: str,
    scans: int,
    bytes_: int,
) -> list[Finding]:
    """The index use finding of one index (or, on Citus, of its shards in a group named
    ``label``, ``shards_`` saying which)."""
    declared = {item.name for item in indexes.declared_indexes()}
    served = _served()
    found = []
    is_declared = row.index_name in declared
    where = f"on {row.table}, {size(bytes_)}"
    if row.constraint:
        enforces = _CONSTRAINTS.get(row.constraint, "a constraint")
        detail = (
            f"{where}; enforces {enforces}: every write uses it ({count(scans, 'scan')} {since}){shards_}"
        )
        found.append(_use(row, label, node, OK, scans, detail))
    elif scans:
        extra = "" if is_declared else "; not declared in chatdb/schema.py (verify-indexes says so)"
        found.append(
            _use(row, label, node, OK, scans, f"{where}; {count(scans, 'scan')} {since}{extra}{shards_}")
        )
    elif is_declared:
        pattern = served.get(row.index_name)
        what = f"the pattern it serves ({pattern})" if pattern else "the queries it serves"
        detail = (
            f"{where}; never scanned {since}: nothing ran {what} since then. "
            f"It is declared in chatdb/schema.py: keep it{shards_}"
        )
        found.append(_use(row, label, node, WARN, 0, detail))
    else:
        detail = (
            f"{where}; not declared in chatdb/schema.py and never scanned {since}: "
            f"every write to {row.table} maintains its {size(bytes_)} for no reader{shards_}"
        )
        fix = f"DROP INDEX CONCURRENTLY {probe.quote(row.index_name)};  -- blocks neither reads nor writes"
        found.append(_use(row, label, node, WARN, 0, detail, fix))
    return found


def _not_checked(why: str) -> list[Finding]:
    return [
        Finding(
            "integrity", None, "amcheck", SKIPPED, detail=f"{why}: the indexes' integrity was not checked"
        )
    ]


def _btree(row: Row, status: str, detail: str, fix: str | None = None) -> Finding:
    return Finding("integrity", row.index_name, "btree", status, detail=f"on {row.table}{detail}", fix=fix)


def integrity(probe: Probe) -> list[Finding]:
    """amcheck's bt_index_check on every B-tree index of chatdb's tables (it holds only an
    ACCESS SHARE lock, as a SELECT does). Corruption is a failure."""
    check = probe.function("amcheck", "bt_index_check")
    if check is None:
        return _not_checked(
            "amcheck is not installed in this database"
            " (CREATE EXTENSION amcheck; as its owner or a superuser)"
        )
    schema = probe.extensions["amcheck"]
    allowed = probe.scalar(
        "SELECT has_function_privilege(CAST(:signature AS text), 'EXECUTE')",
        signature=f"{probe.quote(schema)}.bt_index_check(regclass, boolean)",
    )
    if not allowed:
        return _not_checked(f"role {probe.user} may not run amcheck's bt_index_check ({PRIVILEGE_HINT})")
    rows = _indexes(
        probe,
        "c.oid, i.indisvalid AS valid, pg_relation_size(c.oid) AS bytes",
        "JOIN pg_am am ON am.oid = c.relam",
        "am.amname = 'btree'",
    )
    found = []
    if probe.sharded:
        detail = (
            "on Citus the coordinator's indexes of "
            f"{', '.join(probe.sharded)} are empty shells, not checked; their shards' are on the "
            "workers (bt_index_check there, on each shard's index)"
        )
        found.append(Finding("integrity", "shards", "amcheck", SKIPPED, detail=detail))
    for row in rows:
        if row.table in probe.sharded:
            continue
        if not row.valid:
            found.append(_btree(row, SKIPPED, ": invalid, not checked (verify-indexes reports it)"))
            continue
        savepoint = probe.connection.begin_nested()
        try:
            probe.connection.exec_driver_sql(
                f"SELECT {check}(%(oid)s::oid::regclass, false)", {"oid": row.oid}
            )
        except DBAPIError as exc:
            savepoint.rollback()
            sqlstate = getattr(exc.orig, "sqlstate", None) or ""
            if sqlstate == "55P03":  # lock_not_available: an ACCESS EXCLUSIVE lock held too long
                found.append(_btree(row, SKIPPED, ": busy (locked), not checked"))
                continue
            if not sqlstate.startswith("XX"):  # data_corrupted, index_corrupted, internal errors
                raise
            fix = (
                f"REINDEX INDEX CONCURRENTLY {probe.quote(row.index_name)};  -- rebuilds it from the table;"
                " then look for the cause (storage, memory, a collation change)"
            )
            found.append(_btree(row, FAIL, f": {one_line(exc)}", fix))
            continue
        savepoint.commit()
        probe.read_bytes += int(row.bytes)
        found.append(_btree(row, OK, f", {size(row.bytes)}: intact"))
    return found
