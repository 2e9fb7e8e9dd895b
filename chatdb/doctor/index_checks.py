"""Index checks: which indexes the application's queries use (statistics), and, with
``--deep``, whether each B-tree is intact (amcheck)."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError

from chatdb import indexes, patterns
from chatdb.doctor.model import FAIL, OK, SKIPPED, WARN, Finding, count, size
from chatdb.doctor.probe import PRIVILEGE_HINT, Probe
from chatdb.errors import one_line

_CONSTRAINTS = {"p": "a primary key", "u": "a unique constraint", "x": "an exclusion constraint"}


def _served() -> dict[str, str]:
    """Which query pattern each declared index serves."""
    return {pattern.index: pattern.name for pattern in patterns.PATTERNS}


def index_use(probe: Probe) -> list[Finding]:
    """An index never scanned since the statistics were reset. A declared one means the
    application never ran its pattern (keep it); an undeclared one costs every write for
    nothing."""
    declared = {item.name for item in indexes.declared_indexes()}
    served = _served()
    reset = probe.scalar("SELECT stats_reset FROM pg_stat_database WHERE datname = current_database()")
    since = (
        f"since the statistics were reset at {reset:%Y-%m-%d %H:%M %Z}"
        if reset
        else ("since the statistics began (never reset)")
    )
    rows = probe.rows(
        "SELECT t.relname AS table, c.relname AS index, s.idx_scan, pg_relation_size(c.oid) AS bytes,"
        " con.contype::text AS constraint"
        " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid"
        " JOIN pg_stat_all_indexes s ON s.indexrelid = i.indexrelid"
        " LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid"
        "  AND con.contype IN ('p', 'u', 'x')"
        " WHERE i.indrelid = ANY(:oids) ORDER BY t.relname, c.relname",
        oids=probe.oids,
    )
    order = {name: n for n, name in enumerate(probe.tables)}
    found = []
    for row in sorted(rows, key=lambda r: (order.get(r.table, len(order)), r.index)):
        scans = int(row.idx_scan or 0)
        is_declared = row.index in declared
        where = f"on {row.table}, {size(row.bytes)}"
        if row.constraint:
            found.append(
                Finding(
                    "indexes",
                    row.index,
                    "index use",
                    OK,
                    scans,
                    None,
                    f"{where}; enforces {_CONSTRAINTS.get(row.constraint, 'a constraint')}:"
                    " every write uses it"
                    f" ({count(scans, 'scan')} {since})",
                    unit="scans",
                )
            )
        elif scans:
            extra = "" if is_declared else "; not declared in chatdb/schema.py (verify-indexes says so)"
            found.append(
                Finding(
                    "indexes",
                    row.index,
                    "index use",
                    OK,
                    scans,
                    None,
                    f"{where}; {count(scans, 'scan')} {since}{extra}",
                    unit="scans",
                )
            )
        elif is_declared:
            pattern = served.get(row.index)
            what = f"the pattern it serves ({pattern})" if pattern else "the queries it serves"
            found.append(
                Finding(
                    "indexes",
                    row.index,
                    "index use",
                    WARN,
                    0,
                    None,
                    f"{where}; never scanned {since}: nothing ran {what} since then. "
                    "It is declared in chatdb/schema.py: keep it",
                    unit="scans",
                )
            )
        else:
            found.append(
                Finding(
                    "indexes",
                    row.index,
                    "index use",
                    WARN,
                    0,
                    None,
                    f"{where}; not declared in chatdb/schema.py and never scanned {since}: "
                    f"every write to {row.table} maintains its {size(row.bytes)} for no reader",
                    f"DROP INDEX CONCURRENTLY {probe.quote(row.index)};  -- blocks neither reads nor writes",
                    unit="scans",
                )
            )
    return found


def integrity(probe: Probe) -> list[Finding]:
    """amcheck's bt_index_check on every B-tree index of chatdb's tables (it holds only an
    ACCESS SHARE lock, as a SELECT does). Corruption is a failure."""
    check = probe.function("amcheck", "bt_index_check")
    if check is None:
        return [
            Finding(
                "integrity",
                None,
                "amcheck",
                SKIPPED,
                detail="amcheck is not installed in this database (CREATE EXTENSION amcheck; as its owner "
                "or a superuser): the indexes' integrity was not checked",
            )
        ]
    schema = probe.extensions["amcheck"]
    allowed = probe.scalar(
        "SELECT has_function_privilege(CAST(:signature AS text), 'EXECUTE')",
        signature=f"{probe.quote(schema)}.bt_index_check(regclass, boolean)",
    )
    if not allowed:
        return [
            Finding(
                "integrity",
                None,
                "amcheck",
                SKIPPED,
                detail=f"role {probe.user} may not run amcheck's bt_index_check ({PRIVILEGE_HINT}): "
                "the indexes' integrity was not checked",
            )
        ]
    rows = probe.rows(
        "SELECT t.relname AS table, c.relname AS index, c.oid, i.indisvalid AS valid,"
        " pg_relation_size(c.oid) AS bytes"
        " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid"
        " JOIN pg_am am ON am.oid = c.relam"
        " WHERE i.indrelid = ANY(:oids) AND am.amname = 'btree' ORDER BY t.relname, c.relname",
        oids=probe.oids,
    )
    order = {name: n for n, name in enumerate(probe.tables)}
    found = []
    for row in sorted(rows, key=lambda r: (order.get(r.table, len(order)), r.index)):
        if not row.valid:
            found.append(
                Finding(
                    "integrity",
                    row.index,
                    "btree",
                    SKIPPED,
                    detail=f"on {row.table}: invalid, not checked (verify-indexes reports it)",
                )
            )
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
                found.append(
                    Finding(
                        "integrity",
                        row.index,
                        "btree",
                        SKIPPED,
                        detail=f"on {row.table}: busy (locked), not checked",
                    )
                )
                continue
            if not sqlstate.startswith("XX"):  # data_corrupted, index_corrupted, internal errors
                raise
            found.append(
                Finding(
                    "integrity",
                    row.index,
                    "btree",
                    FAIL,
                    detail=f"on {row.table}: {one_line(exc)}",
                    fix=f"REINDEX INDEX CONCURRENTLY {probe.quote(row.index)};"
                    "  -- rebuilds it from the table;"
                    " then look for the cause (storage, memory, a collation change)",
                )
            )
            continue
        savepoint.commit()
        probe.read_bytes += int(row.bytes)
        found.append(
            Finding("integrity", row.index, "btree", OK, detail=f"on {row.table}, {size(row.bytes)}: intact")
        )
    return found
