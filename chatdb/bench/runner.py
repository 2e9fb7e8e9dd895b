"""A bench run: the checks, bench's own users, the phases and the capacity search, and
cleanup (``model``: the request and result; ``rows``: bench's own rows; ``phases``:
running pgbench; ``capacity``: the search)."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from sqlalchemy import Connection, Engine, text

from chatdb import citus, migrations, privileges
from chatdb.bench import capacity, pgbench, phases, rows, workload
from chatdb.bench.model import (
    DEFAULT_CLIENTS,
    DEFAULT_SECONDS,
    BenchRequest,
    BenchResult,
    Progress,
    Removed,
    Step,
)
from chatdb.bench.phases import KEY_COST_NOTICEABLE_MS
from chatdb.bench.rows import cleanup
from chatdb.bench.workload import Keys
from chatdb.errors import StateError, UsageError

__all__ = [
    "DEFAULT_CLIENTS",
    "DEFAULT_SECONDS",
    "KEY_COST_NOTICEABLE_MS",
    "BenchRequest",
    "BenchResult",
    "Progress",
    "cleanup",
    "run",
]


def _check_clients(connection: Connection, clients: int) -> None:
    """Refuse more clients than the server has connections for. Through a pooler (which
    multiplexes clients onto fewer server connections) the server's limit does not apply:
    a pooler answers the startup with a backend key of its own, not the server's pid."""
    driver = connection.connection.driver_connection
    assert driver is not None  # a connection in use has its driver's
    if driver.info.backend_pid != connection.execute(text("SELECT pg_backend_pid()")).scalar_one():
        return
    maximum, superuser_reserved, reserved, usable_reserved, in_use = connection.execute(
        text(
            "SELECT current_setting('max_connections')::int,"
            " CASE WHEN r.rolsuper THEN 0 ELSE current_setting('superuser_reserved_connections')::int END,"
            " coalesce(current_setting('reserved_connections', true), '0')::int,"
            " r.rolsuper OR CASE WHEN to_regrole('pg_use_reserved_connections') IS NULL THEN false"
            "  ELSE pg_has_role(current_user, 'pg_use_reserved_connections', 'MEMBER') END,"
            " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int"
            " FROM pg_roles r WHERE r.rolname = current_user"
        )
    ).one()
    closed = superuser_reserved + (0 if usable_reserved else reserved)
    free = maximum - closed - in_use - 1  # one more connection holds the run's guard
    if clients > free:
        held = f", {closed} reserved for other roles" if closed else ""
        raise UsageError(
            f"--clients {clients} is more than the server allows: max_connections is {maximum}{held}, "
            f"{in_use} in use, and bench holds one more; at most {max(free, 0)} clients",
            hint="lower --clients, or run through a connection pooler such as PgBouncer",
        )


def _write_blocker(connection: Connection) -> str | None:
    """Why the insert pattern cannot run as this role, or None."""
    role = connection.execute(text("SELECT current_user")).scalar_one()
    for privilege, table in (
        ("INSERT", "users"),
        ("DELETE", "users"),
        ("INSERT", "conversations"),
        ("UPDATE", "conversations"),
        ("INSERT", "messages"),
    ):
        granted = connection.execute(
            text("SELECT has_table_privilege(to_regclass(:table), :privilege)"),
            {"table": table, "privilege": privilege},
        ).scalar()
        if not granted:
            return f"role {role} may not {privilege} {'into' if privilege == 'INSERT' else 'on'} {table}"
    columns = rows.user_columns(connection)
    if isinstance(columns, str):
        return columns
    return None


def run(engine: Engine, request: BenchRequest, progress: Progress | None = None) -> BenchResult:
    budgets = request.validate()
    migrations.require_head(engine)
    program = pgbench.locate()
    mix, left_out, reads, estimate = _preflight(engine, request)
    if request.while_command is not None:
        phases.rehearse(engine.url, request.while_command)
    budgets = [b for b in budgets if b.pattern in mix]
    target, env = pgbench.libpq_target(engine.url)
    env.setdefault("PGAPPNAME", "chatdb bench")
    if "connect_timeout" not in engine.url.query:
        env["PGCONNECT_TIMEOUT"] = "10"
    guard = rows.Guard(engine)
    token = None
    created = 0
    try:
        token = guard.acquire()
        leftovers = cleanup(engine, keep=token)
        if "insert" in mix:
            created = rows.create_rows(engine, token, request.clients)
        keys = Keys(token, _sample(engine, estimate) if reads else ())
        with ExitStack() as stack:
            folder = phases.folder(stack, request.log_dir)
            names, scripts = [], []
            for name, weight in mix.items():
                path = folder / f"{name}.sql"
                path.write_text(workload.WORKLOADS[name].script(keys))
                names.append(name)
                scripts.append((path, weight))
            ctx = phases.Context(
                program, target, env, folder, request, names, scripts, budgets, engine.url, progress
            )
            # Keys drawn before the run cost the server nothing (chosen on the client).
            key_cost = phases.key_cost(ctx, keys) if reads and not keys.sample else None
            steps: list[Step] = []
            capacity_tps, capped = None, False
            if request.rate is not None:
                alone = phases.phase(ctx, "alone", request.rate, f"alone at {request.rate:,.6g} tps")
                rate = request.rate
            else:
                steps, alone, capacity_tps, capped = capacity.search(ctx)
                rate = alone.rate_tps
            measured = [alone]
            if request.while_command is not None:
                measured.append(phases.during(ctx, rate, request.while_command))
    finally:
        removed = Removed()
        try:
            if token is not None and created:
                with engine.connect() as connection, connection.begin():
                    removed = rows.remove_run(connection, token)
        finally:
            guard.release()
    return BenchResult(
        request=request,
        budgets=budgets,
        mix=mix,
        left_out=left_out,
        pgbench=pgbench.version(program),
        rate_tps=rate,
        capacity_tps=capacity_tps,
        capacity_capped=capped,
        steps=steps,
        key_cost_ms=key_cost,
        messages_estimate=int(estimate),
        phases=measured,
        users_created=created,
        removed=removed,
        leftovers=leftovers,
    )


def _sample(engine: Engine, estimate: int) -> tuple[dict[str, Any], ...]:
    """On Citus, the messages the read patterns draw their keys from (``Keys.sample``);
    nothing on one server, where each statement looks its key up."""
    with engine.connect() as connection:
        layout = citus.cluster(connection)
        if layout is None or layout.kind("messages") != citus.DISTRIBUTED:
            return ()
        sample = workload.sample_keys(connection, estimate)
        connection.rollback()
    return sample


def _preflight(engine: Engine, request: BenchRequest) -> tuple[dict[str, int], dict[str, str], bool, int]:
    """What can run as this role on this database: the mix as run, what was left out and
    why, whether it reads, and the planner's estimate of the messages."""
    mix = dict(request.mix)
    left_out: dict[str, str] = {}
    with engine.connect() as connection:
        privileges.require_table_privileges(
            connection,
            [("SELECT", "messages"), ("SELECT", "conversations")],
            "bench reads the application's conversations and messages",
        )
        _check_clients(connection, request.clients)
        if "insert" in mix:
            blocker = _write_blocker(connection)
            if blocker is not None:
                left_out["insert"] = blocker
                del mix["insert"]
        reads = any(not workload.WORKLOADS[name].writes for name in mix)
        estimate = connection.execute(
            text("SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = to_regclass('messages')")
        ).scalar_one()
        if citus.enabled(connection):
            # A distributed table's estimate is its shards' (the coordinator's is empty).
            estimate = max(citus.sizes(connection, ["messages"]).get("messages", (estimate, 0))[0], estimate)
        if reads and not connection.execute(text("SELECT EXISTS (SELECT 1 FROM messages)")).scalar_one():
            raise StateError(
                "the database holds no messages for the read patterns to ask for",
                hint="seed it (`chatdb seed`), or bench only the writes: --mix insert=1",
            )
        connection.rollback()
    if not mix:
        raise StateError(f"nothing to run: the mix holds only insert, and {left_out['insert']}")
    return mix, left_out, reads, int(estimate)
