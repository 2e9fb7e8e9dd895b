"""A server that speaks another language (``lc_messages``) is handled exactly as one that
speaks English: chatdb tells errors apart by SQLSTATE, by libpq's PQping and by the shape
of the connection, never by the server's words.

Two Debian PostgreSQL servers run side by side, one with ``lc_messages = 'C'`` and one
with German messages (a locale made with ``localedef`` into a scratch folder when none is
installed); each scenario runs against both and must end the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import psycopg
import pytest
import servers
from conftest import scratch_folder
from sqlalchemy import create_engine, text

from chatdb import db, migrations
from chatdb.errors import StateError


def need(make, *args):
    """Start a part, or skip (fail in CI) with the reason it cannot be had."""
    try:
        return make(*args)
    except servers.Unavailable as missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run every production test: {missing}")
        pytest.skip(str(missing))


@pytest.fixture(scope="module")
def by_language() -> Iterator[dict[str, servers.DebianPostgres]]:
    """``{"English": server, "German": server}``, each with a database ``chat``."""
    with ExitStack() as stack:
        folder = stack.enter_context(scratch_folder("chatdb-test-language-"))
        german, env = need(servers.message_locale, folder / "locales")
        found = {}
        for language, messages, server_env in (("English", "C", {}), ("German", german, env)):
            server = servers.debian_postgres(
                folder / language, settings=f"lc_messages = '{messages}'\n", env=server_env
            )
            found[language] = need(stack.enter_context, server)
            with psycopg.connect(found[language].socket_url(), autocommit=True) as connection:
                connection.execute("CREATE DATABASE chat")
                connection.execute("CREATE ROLE chatdb_nobody LOGIN CONNECTION LIMIT 0")
        need(_speaks_german, found["German"])
        yield found


def _speaks_german(server: servers.DebianPostgres) -> None:
    with (
        psycopg.connect(server.socket_url()) as connection,
        pytest.raises(psycopg.errors.DivisionByZero) as raised,
    ):
        connection.execute("SELECT 1 / 0")
    if "division by zero" in str(raised.value):
        raise servers.Unavailable("the server's German messages are not installed")


def database(
    name: str, *, role: str = "postgres", query: str = ""
) -> Callable[[servers.DebianPostgres], str]:
    """The URL of database ``name`` on a server, over its Unix socket."""
    return lambda server: server.socket_url(name).replace("postgres@", f"{role}@", 1) + query


def outcome(result) -> tuple[int, bool]:
    """How a command ended: its exit code, and whether it waited for the server."""
    assert "Traceback" not in result.output, result.output
    return result.exit_code, "gave up after" in result.stderr


def on_both(by_language, cli, make_url, *args: str) -> tuple[int, bool]:
    """Run ``args`` against each server; both must end the same way. Returns that way."""
    seen = {
        language: outcome(cli(*args, "--database-url", make_url(server)))
        for language, server in by_language.items()
    }
    assert seen["German"] == seen["English"], seen
    return seen["English"]


def test_an_unknown_database_fails_at_once(by_language, cli):
    url = database("chatdb_no_such_database")
    assert on_both(by_language, cli, url, "status", "--connect-timeout", "30") == (3, False)


def test_a_role_without_connections_fails_at_once(by_language, cli):
    url = database("chat", role="chatdb_nobody")
    assert on_both(by_language, cli, url, "status", "--connect-timeout", "30") == (3, False)


def test_a_setting_the_server_refuses_is_a_bad_parameter(by_language, cli):
    url = database("chat", query="&options=-c%20work_mem%3Dlots")
    assert on_both(by_language, cli, url, "status", "--connect-timeout", "30") == (2, False)


def test_a_refused_tls_login_fails_at_once(by_language, cli):
    assert on_both(
        by_language,
        cli,
        lambda server: server.url("chat", sslmode="disable"),
        "status",
        "--connect-timeout",
        "30",
    ) == (3, False)


def test_a_server_not_accepting_connections_is_waited_for(by_language, cli):
    """A standby with hot_standby off answers every login with 57P03, as a starting server
    does: chatdb waits for it until --connect-timeout."""
    with ExitStack() as stack:
        for server in by_language.values():
            stack.enter_context(not_accepting(server))
        assert on_both(by_language, cli, database("chat"), "status", "--connect-timeout", "1") == (3, True)


def test_an_unknown_database_behind_pgbouncer_fails_at_once(by_language, cli):
    with ExitStack() as stack:
        bouncers = {}
        for server in by_language.values():
            folder = stack.enter_context(scratch_folder("chatdb-test-pgbouncer-"))
            bouncer = servers.pgbouncer(
                folder, host=str(server.socket_dir), port=server.port, run_as=server.user
            )
            bouncers[server.port] = need(stack.enter_context, bouncer)
        through = lambda server: bouncers[server.port].url("chatdb_no_such_database")  # noqa: E731
        assert on_both(by_language, cli, through, "status", "--connect-timeout", "30") == (3, False)


def test_commands_and_their_errors_read_the_same(by_language, cli):
    """A fresh database (no version table: told by SQLSTATE), a migration that meets a
    locked table (lock_not_available), then the commands at head."""
    url = database("chat")
    for language, server in by_language.items():
        engine = db.connect(db.Database(db.parse_url(url(server)), "test"))
        try:
            assert migrations.status(engine).current is None
            migrations.upgrade(engine, "0002")
            with create_engine(engine.url).connect() as blocker:
                blocker.execute(text("LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE"))
                with pytest.raises(StateError) as raised:
                    migrations.upgrade(engine, lock_timeout="200ms")
                assert "lock" in (raised.value.hint or ""), language
                blocker.rollback()
        finally:
            engine.dispose()
    assert on_both(by_language, cli, url, "migrate") == (0, False)
    for args in (
        ("seed", "--users", "5", "--conversations", "20", "--messages", "100", "--days", "30"),
        ("archive", "--older-than", "7d", "--yes"),
        ("purge", "--older-than", "14d", "--yes"),
        ("verify-indexes",),
        ("status",),
    ):
        assert on_both(by_language, cli, url, *args) == (0, False), args


@contextmanager
def not_accepting(server: servers.DebianPostgres) -> Iterator[None]:
    """The server restarted as a standby with hot_standby off, then as it was."""
    server.stop()
    (server.data / "standby.signal").touch()
    conf = server.data / "postgresql.conf"
    original = conf.read_text()
    conf.write_text(original + "hot_standby = off\n")
    server.start()
    try:
        yield
    finally:
        server.stop()
        (server.data / "standby.signal").unlink()
        conf.write_text(original)
        server.start()
