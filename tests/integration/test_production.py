"""chatdb as it is deployed: through PgBouncer in transaction pooling mode, over TLS with
a certificate checked against a CA, against a server that is down or starting, and as an
operations role that owns nothing. Every part is real and runs on loopback (see
``servers.py``); a part that is not installed skips the test saying which, except in CI
(``CI=true``), where it fails.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import psycopg
import pytest
import servers
from conftest import scratch_folder
from sqlalchemy import create_engine, text

from chatdb.schema import VERSION_TABLE, metadata

OPS = "chatdb_test_ops"
APP = "chatdb_test_app"
TABLE_OWNER = "chatdb_test_table_owner"  # owns a table the operations role may be a member of
CHATDB = (sys.executable, "-m", "chatdb")
SEED = ("--users", "40", "--conversations", "600", "--messages", "3000", "--days", "365")


def need(make):
    """Start a part, or skip (fail in CI) with the reason it cannot be had."""
    try:
        return make()
    except servers.Unavailable as missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run every production test: {missing}")
        pytest.skip(str(missing))


def error_line(result) -> str:
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def chatdb(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CHATDB, *args], capture_output=True, text=True, timeout=timeout)


# --- the parts --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pooler(pg_server) -> Iterator[servers.PgBouncer]:
    """PgBouncer, transaction pooling, in front of the session's test server."""
    url = pg_server.url
    host = url.query.get("host") or url.host or "localhost"
    run_as = None
    if os.geteuid() == 0:
        run_as = pwd.getpwuid(os.stat(host).st_uid).pw_name if host.startswith("/") else "postgres"
    with ExitStack() as stack:
        folder = stack.enter_context(scratch_folder("chatdb-test-pgbouncer-"))
        yield need(
            lambda: stack.enter_context(
                servers.pgbouncer(
                    folder, host=host, port=url.port or 5432, run_as=run_as, roles=("postgres", OPS)
                )
            )
        )


@pytest.fixture(scope="session")
def tls_server() -> Iterator[servers.DebianPostgres]:
    """Debian's PostgreSQL with ssl = on and a certificate from a test CA."""
    with ExitStack() as stack:
        folder = stack.enter_context(scratch_folder("chatdb-test-tls-"))
        yield need(lambda: stack.enter_context(servers.debian_postgres(folder)))


@pytest.fixture(scope="session")
def roles(pg_server) -> Iterator[None]:
    """The operations and application roles, with no privileges of their own, and a role
    that may be given a table to own."""
    with pg_server.admin.connect() as connection:
        for role in (OPS, APP, TABLE_OWNER):
            connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
            connection.execute(text(f'CREATE ROLE "{role}" {"NOLOGIN" if role == TABLE_OWNER else "LOGIN"}'))
    yield
    with pg_server.admin.connect() as connection:
        for role in (OPS, APP, TABLE_OWNER):
            connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))


def pooled_url(pooler: servers.PgBouncer, database, role: str = "postgres") -> str:
    return pooler.url(database.name, role)


def as_role(database, role: str) -> str:
    return database.url.set(drivername="postgresql", username=role).render_as_string(hide_password=False)


# --- PgBouncer in transaction pooling mode ----------------------------------------------------


def leftover_session_state(pooler: servers.PgBouncer, database) -> list[str]:
    """Open as many transactions through the pooler at once as it has server connections
    to the database, so each of them is inspected: any setting, prepared statement or
    temporary table left by chatdb would reach the application's next transaction."""
    servers_held = database.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )
    found = []
    connections = [psycopg.connect(pooled_url(pooler, database)) for _ in range(max(servers_held, 1))]
    try:
        seen = set()
        for connection in connections:
            pid, settings, prepared, temporary = connection.execute(
                "SELECT pg_backend_pid(),"
                " (SELECT array_agg(name || '=' || setting ORDER BY name) FROM pg_settings"
                # application_name is PgBouncer's own: it sets each client's on the server.
                "   WHERE source = 'session' AND name <> 'application_name'),"
                " (SELECT count(*) FROM pg_prepared_statements),"
                " (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())"
            ).fetchone()
            seen.add(pid)
            if settings:
                found.append(f"backend {pid}: session settings {settings}")
            if prepared:
                found.append(f"backend {pid}: {prepared} prepared statements")
            if temporary:
                found.append(f"backend {pid}: {temporary} temporary relations")
        assert len(seen) >= servers_held, "not every server connection was inspected"
    finally:
        for connection in connections:
            connection.close()
    return found


def test_every_command_through_pgbouncer_in_transaction_mode(empty_db, pooler, cli):
    url = pooled_url(pooler, empty_db)
    steps = [
        ("migrate",),
        ("seed", *SEED),
        ("status", "--json"),
        ("verify-indexes",),
        ("archive", "--older-than", "90d", "--json"),
        ("archive", "restore", "--user", "seed-42-0000001", "--json"),
        ("purge", "--older-than", "300d", "--deleted-grace", "1d", "--json"),
        ("migrate", "down", "0004", "--yes"),
        ("migrate",),
        ("migrate", "status", "--check"),
    ]
    for step in steps:
        result = cli(*step, "--database-url", url)
        assert result.exit_code == 0, (step, result.output)
    assert empty_db.scalar("SELECT version_num FROM chatdb_alembic_version") == "0007_keys_with_user_id"
    assert empty_db.scalar("SELECT count(*) FROM conversations_archive") > 0
    assert empty_db.scalar("SELECT count(*) FROM chatdb_runs WHERE outcome = 'succeeded'") == 3
    assert leftover_session_state(pooler, empty_db) == []


def test_a_concurrent_build_through_pgbouncer_gives_up_after_lock_timeout(empty_db, pooler, cli):
    url = pooled_url(pooler, empty_db)
    assert cli("migrate", "--to", "0004", "--database-url", url).exit_code == 0
    with empty_db.engine.connect() as blocker:
        blocker.execute(text("LOCK TABLE messages IN SHARE UPDATE EXCLUSIVE MODE"))
        started = time.monotonic()
        result = cli("migrate", "--database-url", url)
        waited = time.monotonic() - started
        blocker.rollback()
    assert result.exit_code == 1, result.output
    assert "waited longer than 5s for a lock" in error_line(result)
    assert 5 <= waited < 30
    assert leftover_session_state(pooler, empty_db) == []
    assert cli("migrate", "--database-url", url).exit_code == 0


def _wait_for_running(database, process: subprocess.Popen, at_least: int = 3) -> int:
    deadline = time.monotonic() + 60
    while True:
        with database.engine.connect() as connection:
            row = connection.execute(
                text("SELECT id, (counts->>'conversations')::int FROM chatdb_runs WHERE outcome = 'running'")
            ).first()
        if row is not None and (row[1] or 0) >= at_least:
            return row[0]
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run committed no batch in time"
        time.sleep(0.02)


def test_the_guard_through_pgbouncer_refuses_a_second_run_and_dies_with_sigkill(migrated_db, pooler, cli):
    url = pooled_url(pooler, migrated_db)
    assert cli("seed", *SEED, "--database-url", url).exit_code == 0
    first = subprocess.Popen(
        [*CHATDB, "archive", "--older-than", "30d", "--batch-size", "1", "--database-url", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run_id = _wait_for_running(migrated_db, first)
        second = cli("archive", "--older-than", "30d", "--database-url", url)
        assert second.exit_code == 1, second.output
        assert "another archive or purge run is in progress" in error_line(second)
        purge = cli("purge", "--older-than", "300d", "--database-url", url)
        assert purge.exit_code == 1, purge.output
        assert "another archive or purge run is in progress" in error_line(purge)
        # A DBA sees who holds the guard, and which command.
        holders = migrated_db.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'chatdb archive'"
        )
        assert holders >= 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    rerun = cli("archive", "--older-than", "30d", "--json", "--database-url", url)
    assert rerun.exit_code == 0, rerun.output
    assert json.loads(rerun.stdout)["took_over"] == [run_id]
    assert migrated_db.scalar("SELECT outcome FROM chatdb_runs WHERE id = :i", i=run_id) == "interrupted"
    idle = (
        "SELECT count(*) FROM conversations"
        " WHERE updated_at < now() - interval '30 days' AND deleted_at IS NULL"
    )
    assert migrated_db.scalar(idle) == 0


def test_a_dead_server_behind_pgbouncer_is_an_error_on_the_first_query(pooler, cli):
    # PgBouncer accepts the login for a database the server does not have; only the
    # first query fails. Not retried: the database does not exist.
    result = cli("status", "--connect-timeout", "30", "--database-url", pooler.url("chatdb_no_such_db"))
    assert result.exit_code == 3, result.output
    line = error_line(result)
    assert "chatdb_no_such_db" in line
    assert "gave up" not in line


# --- TLS ----------------------------------------------------------------------------------------


def test_verify_full_with_the_right_ca(tls_server, cli):
    url = tls_server.url(sslmode="verify-full", sslrootcert=str(tls_server.certificates.ca))
    result = cli("status", "--json", "--database-url", url)
    assert result.exit_code == 0, result.output
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]


def test_verify_full_with_a_wrong_ca_is_one_clear_line_at_once(tls_server, cli):
    url = tls_server.url(sslmode="verify-full", sslrootcert=str(tls_server.certificates.other_ca))
    started = time.monotonic()
    result = cli("status", "--connect-timeout", "30", "--database-url", url)
    assert result.exit_code == 3, result.output
    line = error_line(result)
    assert "certificate verify failed" in line
    assert "gave up" not in line
    assert time.monotonic() - started < 10
    assert "sslrootcert" in result.stderr  # the hint says where to look


def test_verify_full_rejects_a_host_name_the_certificate_does_not_name(tls_server, cli):
    url = tls_server.url(sslmode="verify-full", sslrootcert=str(tls_server.certificates.ca))
    url = url.replace("@localhost:", "@127.0.0.2:")  # loopback, but not in the certificate
    result = cli("status", "--connect-timeout", "5", "--database-url", url)
    assert result.exit_code == 3, result.output


def test_a_server_that_requires_tls_refuses_sslmode_disable(tls_server, cli):
    result = cli("status", "--database-url", tls_server.url(sslmode="disable"))
    assert result.exit_code == 3, result.output
    assert "no encryption" in error_line(result)


# --- a server that is down, then starts ------------------------------------------------------


def start_while_chatdb_waits(server: servers.DebianPostgres, *args: str) -> tuple[dict, float]:
    """Stop the server, start chatdb, start the server 2 s later without waiting for it
    (chatdb meets "the database system is starting up" if it asks in that moment);
    return chatdb's JSON and how long it took."""
    server.stop()
    try:
        started = time.monotonic()
        process = subprocess.Popen(
            [*CHATDB, *args, "--json", "--connect-timeout", "30"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)
        assert process.poll() is None, process.communicate()
        server.start_in_background()
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if not (server.data / "postmaster.pid").exists():
            server.start_in_background()
        servers.wait_until_accepting(server.socket_url())
    assert process.returncode == 0, stderr
    return json.loads(stdout), time.monotonic() - started


def test_a_server_that_starts_while_chatdb_waits(tls_server):
    url = tls_server.url(sslmode="verify-full", sslrootcert=str(tls_server.certificates.ca))
    payload, elapsed = start_while_chatdb_waits(tls_server, "migrate", "status", "--database-url", url)
    assert payload["ok"] is True
    assert elapsed >= 2


def test_a_server_that_starts_behind_pgbouncer_while_chatdb_waits(tls_server):
    with ExitStack() as stack:
        folder = stack.enter_context(scratch_folder("chatdb-test-pgbouncer-"))
        bouncer = stack.enter_context(
            servers.pgbouncer(
                folder, host=str(tls_server.socket_dir), port=tls_server.port, run_as=tls_server.user
            )
        )
        payload, elapsed = start_while_chatdb_waits(
            tls_server, "status", "--database-url", bouncer.url("postgres")
        )
    assert payload["ok"] is True
    assert elapsed >= 2


def test_a_server_that_stays_down_gives_up_after_the_connect_timeout(tls_server):
    url = tls_server.url(sslmode="verify-full", sslrootcert=str(tls_server.certificates.ca))
    tls_server.stop()
    try:
        started = time.monotonic()
        result = chatdb("status", "--connect-timeout", "3", "--database-url", url)
        elapsed = time.monotonic() - started
    finally:
        tls_server.start()
    assert result.returncode == 3, result.stderr
    assert "gave up after 3s" in result.stderr
    assert 3 <= elapsed < 20


# --- least privilege -----------------------------------------------------------------------------


def grant(cli, database) -> list[str]:
    result = cli("grants", "--app-role", APP, "--ops-role", OPS, "--database", database.name)
    assert result.exit_code == 0, result.output
    statements = [line for line in result.stdout.splitlines() if line and not line.startswith("--")]
    for statement in statements:
        database.execute(statement)
    return statements


README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
DATABASE, SCHEMA = "<the database>", "<the schema>"
#: The README's words, in its table of roles, for the objects a privilege is on.
_OBJECTS = {
    "the hot and archive tables": ("conversations", "messages", "conversations_archive", "messages_archive"),
    "the archive tables": ("conversations_archive", "messages_archive"),
    "the version table": (VERSION_TABLE,),
    "the database": (DATABASE,),
    "the schema": (SCHEMA,),
}
_OBJECT = re.compile("|".join([*map(re.escape, _OBJECTS), r"`\w+`"]))


def readme_privileges(row: str, version: int) -> dict[str, list[str]]:
    """What the README's table of roles says the role of ``row`` (its first cell) may do on
    a server of ``version`` (server_version_num), all of it: ``{object: sorted
    privileges}``, the object "<the database>", "<the schema>", a table, or "member of"
    (the roles it is a member of). A clause that ends "(PostgreSQL N and later)" holds
    from that major version. Every clause of the cell must be understood, and the last
    must be "nothing else"."""
    (line,) = [line for line in README.splitlines() if line.startswith(f"| {row} |")]
    *clauses, last = line.split(" | ")[1].split("; ")

    def objects(words: str) -> list[str]:
        assert re.fullmatch(r"(\s|,|\band\b|\bor\b)*", _OBJECT.sub("", words)), words
        return [name for found in _OBJECT.findall(words) for name in _OBJECTS.get(found, (found.strip("`"),))]

    may: dict[str, set[str]] = {}
    for clause in clauses:
        if member := re.fullmatch(r"membership of `(\w+)`", clause):
            may.setdefault("member of", set()).add(member[1])
            continue
        granted = re.fullmatch(r"`([A-Z, ]+)` on (.+?)(?: \(PostgreSQL (\d+) and later\))?", clause)
        assert granted, clause
        if granted[3] and version < int(granted[3]) * 10000:
            continue
        for name in objects(granted[2]):
            may.setdefault(name, set()).update(granted[1].split(", "))
    none = re.fullmatch(r"nothing else(?: \(none on (.+)\))?", last)
    assert none, last
    assert not set(objects(none[1] or "")) & set(may), line
    return {name: sorted(privileges) for name, privileges in may.items()}


def privileges_held(database, role: str) -> dict[str, list[str]]:
    """Every privilege ``role`` holds in ``database``, as ``readme_privileges`` gives
    them: on the database, on schema public, on each relation in it (a privilege on some
    of a table's columns only is "SELECT (columns)"), and the roles it is a member of."""
    on_tables = ["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"]
    if database.scalar("SELECT current_setting('server_version_num')::int >= 170000"):
        on_tables.append("MAINTAIN")
    held: dict[str, set[str]] = {}
    with database.engine.connect() as connection:

        def check(function: str, privileges, on: object) -> set[str]:
            sql = text(f"SELECT {function}(:role, :on, :privilege)")
            return {
                p
                for p in privileges
                if connection.execute(sql, {"role": role, "on": on, "privilege": p}).scalar()
            }

        held[DATABASE] = check("has_database_privilege", ("CONNECT", "TEMPORARY", "CREATE"), database.name)
        held[SCHEMA] = check("has_schema_privilege", ("USAGE", "CREATE"), "public")
        relations = connection.execute(
            text("SELECT oid, relname, relkind FROM pg_class WHERE relnamespace = 'public'::regnamespace")
        ).all()
        for oid, name, kind in relations:
            if kind == "S":
                held[name] = check("has_sequence_privilege", ("USAGE", "SELECT", "UPDATE"), oid)
            elif kind in ("r", "p", "v", "m", "f"):
                whole = check("has_table_privilege", on_tables, oid)
                columns = check("has_any_column_privilege", ("SELECT", "INSERT", "UPDATE", "REFERENCES"), oid)
                held[name] = whole | {f"{privilege} (columns)" for privilege in columns - whole}
        held["member of"] = set(
            connection.execute(
                text("SELECT roleid::regrole::text FROM pg_auth_members WHERE member = to_regrole(:role)"),
                {"role": role},
            ).scalars()
        )
    tables = {name for _, name, kind in relations if kind in ("r", "p")}
    assert tables == {*metadata.tables, VERSION_TABLE}  # every table of chatdb's is seen
    return {name: sorted(privileges) for name, privileges in held.items() if privileges}


def test_each_role_holds_exactly_what_the_readme_says_after_the_grants(migrated_db, roles, cli):
    """README, "Least privilege": the table of roles is what `chatdb grants` gives each
    role, and all it gives: one privilege more or less on any of chatdb's objects (or one
    role more or less to be a member of) differs from the README. PostgreSQL's own grants
    to PUBLIC are revoked first, as a database run with least privilege has them."""
    migrated_db.execute(f'REVOKE ALL ON DATABASE "{migrated_db.name}" FROM PUBLIC')
    migrated_db.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
    grant(cli, migrated_db)
    version = int(migrated_db.scalar("SELECT current_setting('server_version_num')"))
    for row, role in (
        ("the application's role (`--app-role`)", APP),
        ("the operations role (`--ops-role`)", OPS),
    ):
        assert privileges_held(migrated_db, role) == readme_privileges(row, version), role


def test_the_operations_role_runs_the_operations_commands(migrated_db, roles, pooler, cli):
    assert cli("seed", *SEED, "--database-url", migrated_db.cli_url).exit_code == 0
    grant(cli, migrated_db)
    ops = as_role(migrated_db, OPS)
    for step in (
        ("status", "--json"),
        ("verify-indexes",),
        ("archive", "--older-than", "90d"),
        ("archive", "restore", "--user", "seed-42-0000001"),
        ("purge", "--older-than", "300d"),
        ("migrate", "status", "--check"),
    ):
        result = cli(*step, "--database-url", ops)
        assert result.exit_code == 0, (step, result.output)
    # Through the pooler too.
    result = cli(
        "archive", "--older-than", "60d", "--json", "--database-url", pooler.url(migrated_db.name, OPS)
    )
    assert result.exit_code == 0, result.output
    assert migrated_db.scalar("SELECT count(*) FROM chatdb_runs WHERE db_user = :r", r=OPS) == 4


_HOT_AND_ARCHIVE = ("conversations", "messages", "conversations_archive", "messages_archive")


def vacuumed_by_hand(database) -> set[str]:
    """The hot and archive tables with a manual VACUUM in the statistics (autovacuum's
    are apart, in last_autovacuum)."""
    return set(
        database.scalar(
            "SELECT coalesce(array_agg(relname::text), '{}') FROM pg_stat_all_tables"
            " WHERE relid = ANY(CAST(:tables AS regclass[])) AND last_vacuum IS NOT NULL",
            tables=list(_HOT_AND_ARCHIVE),
        )
    )


def wait_for_vacuums(database, tables: set[str]) -> None:
    """Until the statistics show a manual VACUUM of every one of ``tables``."""
    deadline = time.monotonic() + 30
    while not tables <= vacuumed_by_hand(database):
        assert time.monotonic() < deadline, (tables, vacuumed_by_hand(database))
        time.sleep(0.05)


def changed(payload: dict) -> list[str]:
    """The tables a run's --json says it deleted rows from or inserted rows into, in the
    order --vacuum takes them."""
    done = payload["done"]
    rows = {
        "conversations": done["conversations"],
        "messages": done["messages"],
        "conversations_archive": done["archive_conversations"],
        "messages_archive": done["archive_messages"],
    }
    if payload["command"] == "archive":
        rows |= {"conversations_archive": done["conversations"], "messages_archive": done["messages"]}
    return [table for table in _HOT_AND_ARCHIVE if rows[table]]


def without_maintain(database, role: str) -> None:
    """Take back the MAINTAIN that `chatdb grants` gives ``role`` on the hot and archive
    tables from PostgreSQL 17, as a DBA who leaves that statement out would: it then may
    vacuum none of them, as up to 16."""
    if database.scalar("SELECT current_setting('server_version_num')::int >= 170000"):
        database.execute(f'REVOKE MAINTAIN ON TABLE {", ".join(_HOT_AND_ARCHIVE)} FROM "{role}"')


def test_vacuum_as_the_operations_role_after_the_grants_vacuums_from_postgresql_17(migrated_db, roles, cli):
    """README, "Least privilege": from PostgreSQL 17 `chatdb grants` gives the operations
    role MAINTAIN on the hot and archive tables, so its --vacuum vacuums every table the
    run changed (the statistics agree) and skips none; up to 16 the same statements run
    and grant nothing more, and it skips them all."""
    db = migrated_db
    assert cli("seed", *SEED, "--database-url", db.cli_url).exit_code == 0
    grant(cli, db)
    ops = as_role(db, OPS)
    maintain = db.scalar("SELECT current_setting('server_version_num')::int >= 170000")
    archive = cli("archive", "--older-than", "90d", "--database-url", ops)
    assert archive.exit_code == 0, archive.output
    purge = cli("purge", "--older-than", "200d", "--vacuum", "--json", "--database-url", ops)
    assert purge.exit_code == 0, purge.output
    payload = json.loads(purge.stdout)
    assert changed(payload) == list(_HOT_AND_ARCHIVE), payload["done"]
    vacuum = payload["vacuum"]
    if maintain:
        assert vacuum["vacuumed"] == list(_HOT_AND_ARCHIVE), vacuum
        assert vacuum["skipped"] == {} and vacuum["run_by"] == {}, vacuum
        wait_for_vacuums(db, set(_HOT_AND_ARCHIVE))
    else:
        assert vacuum["vacuumed"] == [], vacuum
        assert list(vacuum["skipped"]) == list(_HOT_AND_ARCHIVE), vacuum
    assert vacuumed_by_hand(db) == set(vacuum["vacuumed"])


def test_vacuum_as_the_operations_role_reports_only_the_tables_postgresql_vacuumed(
    migrated_db, roles, pg_server, cli
):
    """PostgreSQL vacuums a table only for its owner (or a member of the owning role), the
    database's owner, a superuser, or from 17 a role with MAINTAIN on it; any other it
    skips with a WARNING and no error. --vacuum as the operations role, which owns no
    table (and here has no MAINTAIN), says so of each table and vacuums only those it
    may; the statistics agree."""
    db = migrated_db
    assert cli("seed", *SEED, "--database-url", db.cli_url).exit_code == 0
    grant(cli, db)
    without_maintain(db, OPS)
    ops = as_role(db, OPS)
    owner = db.scalar("SELECT tableowner FROM pg_tables WHERE tablename = 'messages'")
    maintain = db.scalar("SELECT current_setting('server_version_num')::int >= 170000")

    # May vacuum none: the run says it skipped all four, and who may vacuum what it left.
    archive = cli("archive", "--older-than", "90d", "--vacuum", "--database-url", ops)
    assert archive.exit_code == 0, archive.output
    said = " ".join(archive.stdout.split())
    assert "VACUUM (ANALYZE) done" not in said, said
    why = f"{OPS} may not vacuum a table owned by {owner} (only {owner} or a member of it,"
    assert f"VACUUM (ANALYZE) skipped on {', '.join(_HOT_AND_ARCHIVE)}: {why}" in said, said
    assert ("a role with MAINTAIN on the table may)" in said) == maintain, said
    assert "Left tables needing VACUUM: messages (" in said, said
    who = f"{owner} (the owner)" + (" or a role with MAINTAIN on the table" if maintain else "")
    assert f"VACUUM (ANALYZE) messages; must be run by {who}." in said, said
    assert "give --vacuum next time" not in said, said
    assert vacuumed_by_hand(db) == set()

    # May vacuum messages_archive as a member of its owner, and from 17
    # conversations_archive with MAINTAIN on it: those are vacuumed, the rest skipped.
    db.execute(f'ALTER TABLE messages_archive OWNER TO "{TABLE_OWNER}"')
    may = {"messages_archive"}
    if maintain:
        db.execute(f'GRANT MAINTAIN ON TABLE conversations_archive TO "{OPS}"')
        may.add("conversations_archive")
    with pg_server.admin.connect() as connection:
        connection.execute(text(f'GRANT "{TABLE_OWNER}" TO "{OPS}"'))
    try:
        purge = cli("purge", "--older-than", "200d", "--vacuum", "--json", "--database-url", ops)
    finally:
        with pg_server.admin.connect() as connection:
            connection.execute(text(f'REVOKE "{TABLE_OWNER}" FROM "{OPS}"'))
    assert purge.exit_code == 0, purge.output
    payload = json.loads(purge.stdout)
    tables = changed(payload)
    assert "messages_archive" in tables and "conversations_archive" in tables, payload["done"]
    vacuum = payload["vacuum"]
    assert vacuum["vacuumed"] == [table for table in tables if table in may], vacuum
    assert list(vacuum["skipped"]) == [table for table in tables if table not in may], vacuum
    for table, reason in vacuum["skipped"].items():
        assert reason.startswith(f"{OPS} may not vacuum a table owned by {owner} "), (table, reason)
    wait_for_vacuums(db, set(vacuum["vacuumed"]))
    assert vacuumed_by_hand(db) == set(vacuum["vacuumed"])

    # The owner vacuums every table the run changed, as before.
    run = cli("archive", "--older-than", "30d", "--vacuum", "--json", "--database-url", db.cli_url)
    assert run.exit_code == 0, run.output
    payload = json.loads(run.stdout)
    assert payload["vacuum"]["vacuumed"] == changed(payload) == list(_HOT_AND_ARCHIVE), payload
    assert payload["vacuum"]["skipped"] == {} and payload["vacuum"]["run_by"] == {}, payload["vacuum"]
    wait_for_vacuums(db, set(_HOT_AND_ARCHIVE))


def test_the_operations_role_cannot_seed_and_says_why(migrated_db, roles, cli):
    grant(cli, migrated_db)
    result = cli("seed", "--database-url", as_role(migrated_db, OPS))
    assert result.exit_code == 1, result.output
    assert f"error: permission denied: role {OPS} cannot INSERT into table users" in error_line(result)
    assert migrated_db.scalar("SELECT count(*) FROM conversations") == 0


def test_the_operations_role_cannot_migrate_and_says_why(empty_db, roles, cli):
    assert cli("migrate", "--database-url", empty_db.cli_url).exit_code == 0
    grant(cli, empty_db)  # the grants are for head; then the database goes back to 0004
    assert cli("migrate", "down", "0004", "--yes", "--database-url", empty_db.cli_url).exit_code == 0
    result = cli("migrate", "--database-url", as_role(empty_db, OPS))
    assert result.exit_code == 1, result.output
    line = error_line(result)
    assert f"permission denied: role {OPS} " in line
    assert "CREATE on schema public" in line or "does not own table" in line
    assert empty_db.scalar("SELECT version_num FROM chatdb_alembic_version") == "0004_archive_and_audit"
    # Given CREATE on the schema, it still owns none of the tables it would alter.
    empty_db.execute(f'GRANT CREATE ON SCHEMA public TO "{OPS}"')
    line = error_line(cli("migrate", "--database-url", as_role(empty_db, OPS)))
    assert f"permission denied: role {OPS} does not own table" in line
    empty_db.execute(f'REVOKE CREATE ON SCHEMA public FROM "{OPS}"')
    # Downgrading and stamping say the same, before they build a revision to compare with.
    for step in (("migrate", "down", "-1", "--yes"), ("migrate", "stamp", "0003")):
        line = error_line(cli(*step, "--database-url", as_role(empty_db, OPS)))
        assert f"permission denied: role {OPS} " in line, (step, line)
    assert empty_db.scalar("SELECT version_num FROM chatdb_alembic_version") == "0004_archive_and_audit"


def test_the_application_role_writes_chats_and_never_the_audit_trail(migrated_db, roles, cli):
    grant(cli, migrated_db)
    engine = create_engine(migrated_db.url.set(username=APP), connect_args={"prepare_threshold": None})
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO users (id) VALUES ('u1')"))
            connection.execute(text("INSERT INTO conversations (user_id) VALUES ('u1')"))
            connection.execute(
                text(
                    "INSERT INTO messages (conversation_id, user_id, role, content)"
                    " SELECT id, user_id, 'user', 'hi' FROM conversations"
                )
            )
            assert connection.execute(text("SELECT count(*) FROM conversations_archive")).scalar() == 0
        with pytest.raises(Exception, match="permission denied"), engine.begin() as connection:
            connection.execute(text("INSERT INTO chatdb_runs (command) VALUES ('purge')"))
        with pytest.raises(Exception, match="permission denied"), engine.begin() as connection:
            connection.execute(text("DELETE FROM conversations_archive"))
    finally:
        engine.dispose()


def test_grants_quotes_role_names_and_refuses_bad_ones(cli):
    result = cli("grants", "--app-role", 'app"; DROP TABLE users; --', "--ops-role", "Ops Team", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    statements = [s for role in payload["roles"] for s in role["statements"]]
    assert 'TO "app""; DROP TABLE users; --";' in statements[0]
    to_ops = (' TO "Ops Team";', ' TO "Ops Team"$grant$; END IF; END$$;')  # the last, in a DO block
    assert all(s.endswith(to_ops) for s in statements[4:])
    for bad in ("", "public", "pg_monitor", "x" * 64, "a\nb"):
        refused = cli("grants", "--app-role", bad, "--ops-role", "ops")
        assert refused.exit_code == 2, (bad, refused.output)
    same = cli("grants", "--app-role", "x", "--ops-role", "x")
    assert same.exit_code == 2
    for option, bad in (("--schema", ""), ("--schema", " "), ("--schema", "s" * 64), ("--database", "")):
        refused = cli("grants", "--app-role", "app", "--ops-role", "ops", option, bad)
        assert refused.exit_code == 2, (option, bad, refused.output)
        assert option in error_line(refused)


def test_grants_names_the_configured_database_and_needs_none(cli):
    unreachable = "postgresql://owner@127.0.0.1:1/chat_prod?sslmode=require"
    result = cli("grants", "--app-role", "chatbot", "--ops-role", "ops", "--database-url", unreachable)
    assert result.exit_code == 0, result.output
    assert "GRANT CONNECT, TEMPORARY ON DATABASE chat_prod TO ops;" in result.stdout
    assert "GRANT CONNECT ON DATABASE chat_prod TO chatbot;" in result.stdout
    chosen = cli(
        "grants", "--app-role", "chatbot", "--ops-role", "ops", "--database", "other", "--schema", "chat"
    )
    assert "ON DATABASE other TO" in chosen.stdout
    assert "ON TABLE chat.conversations, chat.messages" in chosen.stdout
