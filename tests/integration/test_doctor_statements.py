"""doctor's slow statements against a server with pg_stat_statements loaded: Debian's
PostgreSQL (tests/servers.py) started for this module with it in
shared_preload_libraries. A pattern of chatdb/patterns.py runs, and doctor matches its
statement to it. The whole report also runs on that older server. The server also allows
prepared transactions, for doctor's check of one left open."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
import servers
from conftest import scratch_folder
from sqlalchemy import create_engine, text
from test_production import need

from chatdb import patterns

DATABASE = "doctor_statements"


def _library() -> None:
    library = servers.postgres_bin().parent / "lib" / "pg_stat_statements.so"
    if not library.exists():
        raise servers.Unavailable(f"{library} is not installed (Debian package postgresql-contrib)")


def _engine(url: str, **options):
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://"), **options)


@pytest.fixture(scope="module")
def server() -> Iterator[servers.DebianPostgres]:
    with ExitStack() as stack:
        folder = stack.enter_context(scratch_folder("chatdb-test-statements-"))
        started = need(lambda: stack.enter_context(servers.debian_postgres(folder)))
        need(_library)
        with open(started.data / "postgresql.conf", "a") as conf:
            conf.write(
                "shared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.track = top\n"
                "max_prepared_transactions = 2\n"  # for the prepared transaction below
            )
        started.stop()
        started.start()
        admin = _engine(started.socket_url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {DATABASE}"))
        admin.dispose()
        yield started


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.socket_url(DATABASE)


def doctor(cli, url: str, *args: str) -> tuple[int, dict]:
    result = cli("doctor", "--json", *args, "--database-url", url)
    assert "Traceback" not in result.output
    return result.exit_code, json.loads(result.stdout)


def statements(payload: dict) -> list[dict]:
    return [c for c in payload["checks"] if c["area"] == "statements"]


def test_the_statements_of_a_pattern_are_matched_to_it(server, url, cli):
    assert cli("migrate", "--database-url", url).exit_code == 0
    # Loaded but not created in this database: one line, how to create it.
    code, payload = doctor(cli, url)
    (missing,) = statements(payload)
    assert code == 0 and missing["status"] == "skipped"
    assert missing["detail"].endswith("CREATE EXTENSION pg_stat_statements; in this database")

    engine = create_engine(
        url.replace("postgresql://", "postgresql+psycopg://"), connect_args={"prepare_threshold": None}
    )
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE EXTENSION pg_stat_statements"))
            connection.execute(text("SELECT pg_stat_statements_reset()"))
        with engine.connect() as connection:  # the application reads a conversation's history
            for _ in range(5):
                connection.execute(patterns.conversation_history(uuid.uuid4())).all()
                connection.execute(patterns.recent_conversations("user-1")).all()
    finally:
        engine.dispose()

    code, payload = doctor(cli, url, "--threshold", "slow_statement_ms=0")
    assert code == 0
    found = {c["object"]: c for c in statements(payload)}
    history = found["history of a conversation"]
    assert history["status"] == "warn" and history["threshold"] == 0
    assert "pattern: history of a conversation" in history["detail"]
    assert "in 5 calls" in history["detail"] and "mean " in history["detail"] and "max " in history["detail"]
    assert "verify-indexes" in history["fix"]
    assert found["recent active conversations of a user"]["status"] == "warn"
    assert all("#" in c["detail"] for c in statements(payload))  # ranked by total time

    # Back: under the default threshold (100 ms) these are not slow.
    code, payload = doctor(cli, url)
    assert {c["object"]: c["status"] for c in statements(payload)}["history of a conversation"] == "ok"
    # The report runs whole on this older server, nothing failing.
    assert not [c for c in payload["checks"] if c["status"] == "fail"], payload["checks"]

    engine = _engine(url)
    with engine.begin() as connection:
        connection.execute(text("SELECT pg_stat_statements_reset()"))
    engine.dispose()
    code, payload = doctor(cli, url)
    # What is left is doctor's own: recording the sizes, reading the runs.
    left = statements(payload)
    assert left and all(c["status"] == "ok" for c in left)
    assert all(c["object"].startswith("queryid ") for c in left)
    assert all("not one of chatdb's query patterns" in c["detail"] for c in left)
    assert any("INSERT INTO chatdb_size_history" in c["detail"] for c in left)


def test_installed_but_not_loaded(migrated_db, cli):
    """The suite's own server does not preload it: created in the database, it cannot run."""
    migrated_db.execute("CREATE EXTENSION pg_stat_statements")
    code, payload = doctor(cli, migrated_db.cli_url)
    (unloaded,) = statements(payload)
    assert code == 0 and unloaded["status"] == "skipped"
    assert (
        "installed but not loaded" in unloaded["detail"] and "shared_preload_libraries" in unloaded["detail"]
    )


def test_a_constant_that_pg_stat_statements_keeps_is_not_shown(server, url, cli):
    """pg_stat_statements replaces the values of the application's statements with $1, but
    keeps some statements' constants as they were written (a DO block's body): doctor
    shows them as '…' too."""
    assert cli("migrate", "--database-url", url).exit_code == 0
    engine = _engine(url, connect_args={"prepare_threshold": None})
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
            connection.execute(text("SELECT pg_stat_statements_reset()"))
        with engine.begin() as connection:
            connection.execute(
                text("DO $$BEGIN PERFORM count(*) FROM messages WHERE content <> 'hunter2-in-a-body'; END$$")
            )
            recorded = connection.execute(
                text("SELECT string_agg(query, ' ') FROM pg_stat_statements")
            ).scalar()
        assert "hunter2-in-a-body" in recorded  # kept by pg_stat_statements: what doctor must hide
    finally:
        engine.dispose()
    for args in (["--json"], []):
        result = cli("doctor", *args, "--all", "--threshold", "slow_statement_ms=0", "--database-url", url)
        assert "Traceback" not in result.output
        assert "hunter2" not in result.stdout + result.stderr
    _, payload = doctor(cli, url, "--threshold", "slow_statement_ms=0")
    assert any("DO '…'" in c["detail"] for c in statements(payload)), statements(payload)


def test_a_prepared_transaction_left_open_is_shown_with_the_statement_that_ends_it(server, url, cli):
    assert cli("migrate", "--database-url", url).exit_code == 0
    gid = "chatdb test's transaction"
    engine = _engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(text("INSERT INTO users (id) VALUES ('prepared-user')"))
            connection.execute(text(f"PREPARE TRANSACTION '{gid.replace(chr(39), chr(39) * 2)}'"))
            connection.commit()
        _, payload = doctor(cli, url, "--threshold", "long_transaction_seconds=0")
        (prepared,) = [c for c in payload["checks"] if c["object"] == f"prepared {gid}"]
        assert prepared["check"] == "long transaction" and prepared["status"] == "warn", prepared
        assert "a prepared transaction of " in prepared["detail"], prepared
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql(prepared["fix"])  # runs as printed
            assert connection.execute(text("SELECT count(*) FROM pg_prepared_xacts")).scalar() == 0
            assert (
                connection.execute(text("SELECT count(*) FROM users WHERE id = 'prepared-user'")).scalar()
                == 0
            )
    finally:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            for (left,) in connection.execute(text("SELECT gid FROM pg_prepared_xacts")).all():
                connection.exec_driver_sql(f"ROLLBACK PREPARED '{left.replace(chr(39), chr(39) * 2)}'")
        engine.dispose()
