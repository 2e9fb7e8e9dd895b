"""The ``chatdb`` command line as its users drive it: the real app (in-process through
Typer's CliRunner, or as a real process where a terminal, the console script or the
embedded server matter), against a real PostgreSQL. Nothing of chatdb is mocked.

Oracles are written out here (revision ids, table names, row counts inserted by the test,
the version table read back with SQL) rather than recomputed with chatdb's own code.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import scratch_folder
from sqlalchemy.engine import URL

import chatdb
from chatdb import embedded

CHATDB = str(Path(sys.executable).with_name("chatdb"))  # /tmp/venv/bin/chatdb

REVISIONS = [
    "0001_conversations",
    "0002_messages",
    "0003_chatbot_extensions",
    "0004_archive_and_audit",
    "0005_messages_owner_index",
    "0006_size_history",
    "0007_keys_with_user_id",
]
HEAD = REVISIONS[-1]
SECRET = "s3cr3t-Pa55"
#: Nothing listens on port 1: libpq gets "connection refused" at once.
UNREACHABLE = "postgresql://nobody@127.0.0.1:1/{name}"


# --- helpers --------------------------------------------------------------------------------


def error_line(result) -> str:
    """Assert the command failed the chatdb way and return its one error line: exactly one
    line starting with ``error:`` on stderr (anything before it is a plan or notice; after
    it at most one ``hint:`` line), nothing on stdout that looks like an error, and never a
    traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    after = lines[errors[0] + 1 :]
    assert after == [] or (len(after) == 1 and after[0].startswith("hint:")), result.stderr
    assert "error:" not in result.stdout, result.stdout
    return lines[errors[0]]


def json_payload(result, command: str) -> dict:
    """stdout holds exactly one JSON object, the command's, and nothing else."""
    payload = json.loads(result.stdout)
    assert isinstance(payload, dict), result.stdout
    assert result.stdout.strip().count("\n") == 0, result.stdout
    assert payload["command"] == command
    assert isinstance(payload["ok"], bool)
    return payload


def is_int(value) -> bool:
    return type(value) is int  # not a bool, not a float, not a string


def version_of(database) -> str | None:
    """The revision in chatdb's version table, read with SQL (None: no table or no row)."""
    if not table_exists(database, "chatdb_alembic_version"):
        return None
    return database.scalar("SELECT max(version_num) FROM chatdb_alembic_version")


def table_exists(database, name: str) -> bool:
    return database.scalar("SELECT to_regclass(:name) IS NOT NULL", name=name)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a real chatdb process: no database configured by the caller's
    shell (CHATDB_HOME is the test's, set by conftest's autouse fixture)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "CHATDB_DATABASE_URL", "PGPASSWORD", "PGSERVICE", "NO_COLOR")
    }
    env.update(extra)
    return env


def typed_url(url: URL) -> str:
    """A SQLAlchemy URL as a user types it."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


# --- 1. migrate -----------------------------------------------------------------------------


def test_migrate_an_empty_database_then_again(empty_db, cli):
    first = cli("migrate", "--database-url", empty_db.cli_url)
    assert first.exit_code == 0, first.output
    assert HEAD in first.stdout
    assert version_of(empty_db) == HEAD

    again = cli("migrate", "--database-url", empty_db.cli_url)
    assert again.exit_code == 0, again.output
    assert "nothing to do" in again.stdout
    assert HEAD in again.stdout
    assert version_of(empty_db) == HEAD


def test_migrate_json_lists_what_it_applied(empty_db, cli):
    first = cli("migrate", "--json", "--database-url", empty_db.cli_url)
    assert first.exit_code == 0, first.output
    payload = json_payload(first, "migrate")
    assert payload["ok"] is True
    assert payload["applied"] == REVISIONS
    assert payload["previous"] is None
    assert payload["current"] == HEAD

    second = cli("migrate", "--json", "--database-url", empty_db.cli_url)
    assert second.exit_code == 0, second.output
    payload = json_payload(second, "migrate")
    assert payload["ok"] is True
    assert payload["applied"] == []
    assert payload["previous"] == payload["current"] == HEAD


# --- 2. choosing the database ----------------------------------------------------------------


def test_database_url_before_and_after_the_command_name(migrated_db, cli):
    before = cli("--database-url", migrated_db.cli_url, "migrate", "status", "--json")
    after = cli("migrate", "status", "--json", "--database-url", migrated_db.cli_url)
    for result in (before, after):
        assert result.exit_code == 0, result.output
        assert json_payload(result, "migrate status")["current"] == HEAD
    on_status = cli("status", "--json", "--database-url", migrated_db.cli_url)
    assert json_payload(on_status, "status")["database"] == migrated_db.name


def test_the_option_after_the_command_name_wins(migrated_db, cli):
    bad = UNREACHABLE.format(name="bad_one")
    bad_before = cli(
        "--database-url",
        bad,
        "--connect-timeout",
        "0",
        "status",
        "--json",
        "--database-url",
        migrated_db.cli_url,
    )
    assert bad_before.exit_code == 0, bad_before.output
    assert json_payload(bad_before, "status")["database"] == migrated_db.name

    bad_after = cli(
        "--database-url", migrated_db.cli_url, "status", "--database-url", bad, "--connect-timeout", "0"
    )
    assert bad_after.exit_code == 3, bad_after.output
    assert "bad_one" in error_line(bad_after)


def test_database_url_between_migrate_and_its_subcommand_is_used(migrated_db, cli):
    """`chatdb migrate --database-url URL status`: the URL comes after the command name
    `migrate`, so it must be the database used, not silently dropped for another one."""
    env = {"DATABASE_URL": UNREACHABLE.format(name="from_env")}
    result = cli(
        "--connect-timeout",
        "0",
        "migrate",
        "--database-url",
        migrated_db.cli_url,
        "status",
        "--json",
        env=env,
    )
    assert result.exit_code == 0, result.output
    assert json_payload(result, "migrate status")["current"] == HEAD


def test_precedence_option_then_chatdb_database_url_then_database_url(migrated_db, cli):
    # CHATDB_DATABASE_URL beats DATABASE_URL.
    env = {"CHATDB_DATABASE_URL": migrated_db.cli_url, "DATABASE_URL": UNREACHABLE.format(name="from_db_url")}
    result = cli("status", "--json", "--connect-timeout", "0", env=env)
    assert result.exit_code == 0, result.output
    assert json_payload(result, "status")["database"] == migrated_db.name

    # ... and the other way round, to show which one was read.
    env = {
        "CHATDB_DATABASE_URL": UNREACHABLE.format(name="from_chatdb_env"),
        "DATABASE_URL": migrated_db.cli_url,
    }
    result = cli("status", "--connect-timeout", "0", env=env)
    assert result.exit_code == 3
    assert "from_chatdb_env" in error_line(result)

    # DATABASE_URL alone is used.
    result = cli("status", "--json", env={"DATABASE_URL": migrated_db.cli_url})
    assert result.exit_code == 0, result.output
    assert json_payload(result, "status")["database"] == migrated_db.name

    # --database-url beats both variables.
    env = {
        "CHATDB_DATABASE_URL": UNREACHABLE.format(name="from_chatdb_env"),
        "DATABASE_URL": UNREACHABLE.format(name="from_db_url"),
    }
    result = cli("status", "--json", "--connect-timeout", "0", "--database-url", migrated_db.cli_url, env=env)
    assert result.exit_code == 0, result.output
    assert json_payload(result, "status")["database"] == migrated_db.name
    result = cli("--database-url", migrated_db.cli_url, "--connect-timeout", "0", "status", "--json", env=env)
    assert result.exit_code == 0, result.output
    assert json_payload(result, "status")["database"] == migrated_db.name


# --- 3. URL forms ----------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_both_url_schemes_work(migrated_db, cli, scheme):
    assert migrated_db.cli_url.startswith("postgresql://")
    url = scheme + "://" + migrated_db.cli_url.removeprefix("postgresql://")
    result = cli("status", "--json", "--database-url", url)
    assert result.exit_code == 0, result.output
    assert json_payload(result, "status")["database"] == migrated_db.name


def test_query_parameters_pass_through(empty_db, cli):
    assert "?" in empty_db.cli_url  # the test server's socket is given as ?host=...
    harmless = empty_db.cli_url + "&application_name=x&connect_timeout=5&sslmode=disable"
    status = cli("migrate", "status", "--json", "--database-url", harmless)
    assert status.exit_code == 0, status.output
    assert json_payload(status, "migrate status")["current"] is None

    # A parameter with a visible effect reaches the server: read-only sessions cannot migrate.
    read_only = empty_db.cli_url + "&options=-c%20default_transaction_read_only%3Don"
    refused = cli("migrate", "--database-url", read_only)
    assert refused.exit_code == 1, refused.output
    assert "read-only" in error_line(refused)
    assert version_of(empty_db) is None

    postgres_scheme = "postgres://" + harmless.removeprefix("postgresql://")
    assert cli("migrate", "--database-url", postgres_scheme).exit_code == 0
    assert version_of(empty_db) == HEAD


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u:pw@localhost/db",
        "postgresql://u:pw@localhost:abc/db",
        "postgresql://u:pw@[::1/db",
        "postgresql://u:pw@127.0.0.1:99999/db",
        "postgresql://u:pw@127.0.0.1:1/db?foo=bar",
        "postgresql://u:pw@127.0.0.1:1/db?sslmode=bogus",
        "not a url at all",
        "",
    ],
)
def test_bad_urls_exit_2_with_one_line(cli, url):
    result = cli("migrate", "status", "--database-url", url)
    assert result.exit_code == 2, result.output
    error_line(result)
    assert result.stdout == ""


@pytest.mark.parametrize("timeout", ["inf", "1e400", "100000"])
def test_an_impossible_connect_timeout_exits_2(cli, timeout):
    result = cli("status", "--connect-timeout", timeout, "--database-url", UNREACHABLE.format(name="x"))
    assert result.exit_code == 2, result.output
    assert "connect-timeout" in error_line(result)


def test_bad_url_in_the_environment_exits_2(cli):
    result = cli("status", env={"DATABASE_URL": "mysql://u@localhost/db"})
    assert result.exit_code == 2, result.output
    assert "mysql" in error_line(result)


def test_several_hosts_before_the_database_name_fail_over_as_libpq_does(migrated_db, cli):
    """libpq's multi-host address: the first host has no server, the second is the test's."""
    hosts = ",".join(quote(host, safe="") for host in ("/nonexistent-chatdb", migrated_db.url.query["host"]))
    url = f"postgresql://postgres@{hosts}/{migrated_db.name}"
    result = cli("status", "--json", "--database-url", url)
    assert result.exit_code == 0, result.output
    assert json_payload(result, "status")["database"] == migrated_db.name


@pytest.mark.parametrize("variable", ["CHATDB_DATABASE_URL", "DATABASE_URL"])
def test_an_empty_url_in_the_environment_exits_2_and_never_falls_back(migrated_db, cli, variable):
    """A CI system gives a missing secret as an empty variable: chatdb must not go on to
    the next source (here DATABASE_URL, or the embedded server) and check a database
    other than the one meant."""
    env = {variable: ""}
    if variable == "CHATDB_DATABASE_URL":
        env["DATABASE_URL"] = migrated_db.cli_url
    result = cli("verify-indexes", env=env)
    assert result.exit_code == 2, result.output
    assert error_line(result) == f"error: the database URL from {variable} is empty"
    assert f"unset {variable} to use the next source" in result.stderr
    assert "embedded" not in result.stderr


# --- 4. passwords are never printed ----------------------------------------------------------

PASSWORDS = [SECRET, "s3cr3t/Pa55@x:y"]


def with_password(template: str, password: str) -> str:
    """The template with PW replaced by the password, percent-encoded as URLs need."""
    return template.replace("PW", quote(password, safe=""))


def assert_password_hidden(result, password: str) -> None:
    shown = result.output
    for form in {password, with_password("PW", password)}:
        assert form not in shown, shown
    assert "***" in shown, shown


@pytest.mark.parametrize("password", PASSWORDS)
def test_unreachable_server_exits_3_and_masks_the_password(cli, password):
    url = with_password("postgresql://someone:PW@127.0.0.1:1/appdb", password)
    result = cli("status", "--database-url", url, "--connect-timeout", "0.5")
    assert result.exit_code == 3, result.output
    line = error_line(result)
    assert "gave up" in line
    assert "127.0.0.1" in line
    assert_password_hidden(result, password)


def test_unreachable_server_with_the_password_in_the_query(cli):
    url = f"postgresql://someone@127.0.0.1:1/appdb?password={SECRET}&sslmode=prefer"
    result = cli("--connect-timeout", "0.5", "migrate", "status", "--database-url", url)
    assert result.exit_code == 3, result.output
    assert "gave up" in error_line(result)
    assert_password_hidden(result, SECRET)


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize(
    "template",
    [
        "postgresql://someone:PW@db.example.com:abc/appdb",
        "postgres://someone:PW@db.example.com:abc/appdb?sslmode=require",
        "postgresql://someone@db.example.com:abc/appdb?password=PW",
    ],
)
def test_malformed_url_exits_2_and_masks_the_password(cli, template, password):
    result = cli("migrate", "--database-url", with_password(template, password))
    assert result.exit_code == 2, result.output
    error_line(result)
    for form in {password, with_password("PW", password)}:
        assert form not in result.output, result.output
    assert "someone" not in result.output  # a URL that cannot be used is not echoed at all


def test_json_errors_do_not_print_the_password(cli):
    url = f"postgresql://someone:{SECRET}@127.0.0.1:1/appdb"
    result = cli("status", "--json", "--database-url", url, "--connect-timeout", "0")
    assert result.exit_code == 3
    error_line(result)
    payload = json_payload(result, "status")
    assert payload["ok"] is False
    assert payload["exit_code"] == 3
    assert "gave up" in payload["error"]
    assert SECRET not in result.output


# --- 5. logins refused -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def password_server() -> Iterator[URL]:
    """A PostgreSQL of its own that requires a password (the session's server trusts local
    logins). Yields the URL of its ``postgres`` database, without a password."""
    import psycopg

    with scratch_folder("chatdb-test-pw-") as folder:
        server, url = embedded.scratch_server(folder / "pgdata")
        url = url.set(drivername="postgresql")
        try:
            with psycopg.connect(typed_url(url), autocommit=True) as connection:
                connection.execute("ALTER ROLE postgres PASSWORD 'right-pw'")
                (Path(server.pgdata) / "pg_hba.conf").write_text(
                    "local all all scram-sha-256\n"
                    "host all all 127.0.0.1/32 scram-sha-256\n"
                    "host all all ::1/128 scram-sha-256\n"
                )
                connection.execute("SELECT pg_reload_conf()")
            # The reload is asynchronous: wait until a login without a password is refused.
            deadline = time.monotonic() + 60
            while True:
                try:
                    psycopg.connect(typed_url(url)).close()
                except psycopg.OperationalError:
                    break
                assert time.monotonic() < deadline, "pg_hba.conf was never reloaded"
                time.sleep(0.05)
            yield url
        finally:
            server.cleanup()


def test_wrong_password_exits_3_at_once_and_is_never_printed(password_server, cli):
    wrong = typed_url(password_server.set(password=SECRET))
    result = cli("status", "--database-url", wrong, "--connect-timeout", "60")
    assert result.exit_code == 3, result.output
    line = error_line(result)
    assert "password authentication" in line
    assert "gave up" not in line  # refused logins are not retried
    assert_password_hidden(result, SECRET)


def test_wrong_password_in_the_query_is_never_printed(password_server, cli):
    wrong = typed_url(password_server.update_query_dict({"password": SECRET}))
    assert SECRET in wrong
    result = cli("migrate", "status", "--database-url", wrong, "--connect-timeout", "60")
    assert result.exit_code == 3, result.output
    line = error_line(result)
    assert "password authentication" in line
    assert "gave up" not in line
    assert SECRET not in result.output


def test_no_password_against_a_password_server_exits_3(password_server, cli):
    result = cli("status", "--database-url", typed_url(password_server), "--connect-timeout", "60")
    assert result.exit_code == 3, result.output
    assert "gave up" not in error_line(result)


def test_right_password_works_and_is_not_printed(password_server, cli):
    right = typed_url(password_server.set(password="right-pw"))
    result = cli("status", "--json", "--database-url", right)
    assert result.exit_code == 0, result.output
    payload = json_payload(result, "status")
    assert payload["user"] == "postgres"
    assert payload["revision"]["current"] is None
    assert "right-pw" not in result.output
    text_status = cli("migrate", "status", "--database-url", right)
    assert text_status.exit_code == 0, text_status.output
    assert "right-pw" not in text_status.output


def test_unknown_database_exits_3_at_once(pg_server, cli):
    url = typed_url(pg_server.url_for("chatdb_no_such_database"))
    result = cli("status", "--database-url", url, "--connect-timeout", "60")
    assert result.exit_code == 3, result.output
    line = error_line(result)
    assert "chatdb_no_such_database" in line
    assert "does not exist" in line
    assert "gave up" not in line


# --- 6. a database chatdb has not migrated ---------------------------------------------------------


def test_a_database_not_migrated_yet(empty_db, cli):
    url = empty_db.cli_url
    text_status = cli("migrate", "status", "--database-url", url)
    assert text_status.exit_code == 0, text_status.output
    assert re.search(r"current:\s+base", text_status.stdout), text_status.stdout
    for revision in REVISIONS:
        assert revision in text_status.stdout

    payload = json_payload(cli("migrate", "status", "--json", "--database-url", url), "migrate status")
    assert payload["ok"] is True
    assert payload["current"] is None
    assert payload["pending"] == REVISIONS
    assert payload["known"] is True
    assert payload["up_to_date"] is False

    check = cli("migrate", "status", "--check", "--database-url", url)
    assert check.exit_code == 1, check.output

    overview = cli("status", "--database-url", url)
    assert overview.exit_code == 0, overview.output
    assert "not migrated" in overview.stdout

    down = cli("migrate", "down", "-1", "--yes", "--database-url", url)
    assert down.exit_code == 1, down.output
    error_line(down)
    assert version_of(empty_db) is None


# --- 7. a database at a revision this chatdb does not know ---------------------------------------


@pytest.fixture
def future_db(migrated_db):
    migrated_db.execute("UPDATE chatdb_alembic_version SET version_num = 'ffff_future'")
    return migrated_db


@pytest.mark.parametrize(
    "args",
    [["migrate"], ["migrate", "up"], ["migrate", "status"], ["migrate", "down", "-1", "--yes"]],
    ids=" ".join,
)
def test_unknown_revision_exits_1(future_db, cli, args):
    result = cli(*args, "--database-url", future_db.cli_url)
    assert result.exit_code == 1, result.output
    assert "ffff_future" in error_line(result)
    assert version_of(future_db) == "ffff_future"
    assert table_exists(future_db, "conversations_archive")


def test_unknown_revision_in_json_and_status(future_db, cli):
    result = cli("migrate", "status", "--json", "--database-url", future_db.cli_url)
    assert result.exit_code == 1
    payload = json_payload(result, "migrate status")
    assert payload["ok"] is False
    assert payload["known"] is False
    assert payload["current"] == "ffff_future"
    assert payload["head"] == HEAD
    assert payload["up_to_date"] is False

    overview = cli("status", "--database-url", future_db.cli_url)
    assert overview.exit_code == 0, overview.output
    assert "ffff_future" in overview.stdout
    assert "unknown" in overview.stdout

    as_json = cli("status", "--json", "--database-url", future_db.cli_url)
    assert as_json.exit_code == 0, as_json.output
    revision = json_payload(as_json, "status")["revision"]
    assert revision["current"] == "ffff_future"
    assert revision["known"] is False
    assert revision["up_to_date"] is False


# --- 8. migrate down -------------------------------------------------------------------------------


@pytest.fixture
def db_with_archive_rows(migrated_db):
    """Row counts chosen so each table of the plan shows its own number."""
    migrated_db.execute(
        "INSERT INTO users (id) VALUES ('u1');"
        " INSERT INTO conversations_archive (id, user_id)"
        "  VALUES ('00000000-0000-4000-8000-0000000000a1', 'u1');"
        " INSERT INTO messages_archive (conversation_id, user_id, role, content)"
        "  SELECT '00000000-0000-4000-8000-0000000000a1', 'u1', 'user', 'old' FROM generate_series(1, 2);"
        " INSERT INTO chatdb_runs (command, outcome, finished_at)"
        "  SELECT 'archive', 'succeeded', now() FROM generate_series(1, 3)"
    )
    return migrated_db


ARCHIVE_ROWS = {"conversations_archive": 1, "messages_archive": 2, "chatdb_runs": 3}


def test_down_off_a_terminal_refuses_without_yes(db_with_archive_rows, cli):
    result = cli("migrate", "down", "0003", "--database-url", db_with_archive_rows.cli_url)
    assert result.exit_code == 1, result.output
    assert "--yes" in error_line(result)
    for table in ARCHIVE_ROWS:
        assert table_exists(db_with_archive_rows, table)
    assert db_with_archive_rows.scalar("SELECT count(*) FROM messages_archive") == 2
    assert version_of(db_with_archive_rows) == HEAD


def test_down_with_yes_shows_the_plan_with_row_counts(db_with_archive_rows, cli):
    result = cli("migrate", "down", "0003", "--yes", "--database-url", db_with_archive_rows.cli_url)
    assert result.exit_code == 0, result.output
    shown = result.output
    for table, rows in ARCHIVE_ROWS.items():
        match = re.search(rf"(?<![\w]){table}(?![\w])\W+(\d+)", shown)
        assert match, shown
        assert int(match.group(1)) == rows, shown
    assert "0003_chatbot_extensions" in shown
    for table in ARCHIVE_ROWS:
        assert not table_exists(db_with_archive_rows, table)
    assert table_exists(db_with_archive_rows, "messages")
    assert version_of(db_with_archive_rows) == "0003_chatbot_extensions"


def test_down_to_base_json(migrated_db, cli):
    migrated_db.execute("INSERT INTO users (id) VALUES ('u1'), ('u2')")
    result = cli("migrate", "down", "base", "--yes", "--json", "--database-url", migrated_db.cli_url)
    assert result.exit_code == 0, result.output
    payload = json_payload(result, "migrate down")
    assert payload["ok"] is True
    assert payload["current"] is None
    assert payload["previous"] == HEAD
    assert payload["undone"] == list(reversed(REVISIONS))
    rows = {entry["table"]: entry["rows"] for entry in payload["dropped_tables"]}
    assert set(rows) == {
        "users",
        "conversations",
        "messages",
        "conversations_archive",
        "messages_archive",
        "chatdb_runs",
        "chatdb_size_history",
    }
    assert all(is_int(count) for count in rows.values()), rows
    assert rows["users"] == 2
    assert rows["messages"] == 0
    for table in rows:
        assert not table_exists(migrated_db, table)
    assert version_of(migrated_db) is None


def test_down_to_an_unknown_revision_exits_2(migrated_db, cli):
    result = cli("migrate", "down", "nope", "--yes", "--database-url", migrated_db.cli_url)
    assert result.exit_code == 2, result.output
    assert "nope" in error_line(result)
    assert version_of(migrated_db) == HEAD


def test_down_when_already_at_the_target_changes_nothing(migrated_db, cli):
    result = cli("migrate", "down", "head", "--database-url", migrated_db.cli_url)
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.stdout
    assert version_of(migrated_db) == HEAD


# --- 9. the question on a real terminal ----------------------------------------------------------


def run_on_terminal(
    args: list[str], answer: str, timeout: float = 60.0, stdout: Path | None = None
) -> tuple[int, str, bool]:
    """Run the real ``chatdb`` with stdin, stdout and stderr on a pseudo-terminal (or
    stdout to the file ``stdout``); answer its question once it appears. Returns (exit
    code, everything shown, asked?)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    env = subprocess_env(TERM="xterm-256color", COLUMNS="160")
    try:
        with open(stdout, "wb") if stdout else contextlib.nullcontext(slave) as output:
            process = subprocess.Popen(
                [CHATDB, *args], stdin=slave, stdout=output, stderr=slave, env=env, start_new_session=True
            )
    finally:
        os.close(slave)
    screen = b""
    asked = False
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every end of the terminal's slave side is closed
                break
            if not data:
                break
            screen += data
            if not asked and b"[y/N]" in screen:
                asked = True
                os.write(master, answer.encode() + (b"" if answer == "\x04" else b"\r"))  # Ctrl-D alone
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # never asked, or never finished: fail below
            process.kill()
            code = process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    return code, screen.decode(errors="replace"), asked


def test_down_asks_on_a_terminal(db_with_archive_rows):
    args = ["migrate", "down", "0003", "--database-url", db_with_archive_rows.cli_url]

    declined, screen, asked = run_on_terminal(args, "n")
    assert asked, screen
    assert declined == 1, screen
    before_question = screen[: screen.index("[y/N]")]
    for table in ARCHIVE_ROWS:
        assert table in before_question  # the plan comes before the question
    assert re.search(r"\x1b\[(?:\d+;)*31m\s*error:", screen), repr(screen)  # one red line
    assert "Traceback" not in screen
    for table in ARCHIVE_ROWS:
        assert table_exists(db_with_archive_rows, table)
    assert version_of(db_with_archive_rows) == HEAD

    accepted, screen, asked = run_on_terminal(args, "y")
    assert asked, screen
    assert accepted == 0, screen
    assert version_of(db_with_archive_rows) == "0003_chatbot_extensions"
    assert not table_exists(db_with_archive_rows, "conversations_archive")


def test_end_of_input_at_the_question_cancels_on_a_line_of_its_own(db_with_archive_rows):
    args = ["migrate", "down", "-1", "--database-url", db_with_archive_rows.cli_url]
    cancelled, screen, asked = run_on_terminal(args, "\x04")  # Ctrl-D
    assert asked and cancelled == 1, screen
    after = screen[screen.index("[y/N]:") :]
    assert re.match(r"\[y/N\]: *\r?\n(\x1b\[[0-9;]*m)*error:", after), repr(after)
    assert "cancelled; nothing was changed" in after
    assert version_of(db_with_archive_rows) == HEAD


def test_asked_on_a_terminal_with_json_stdout_holds_only_the_json(db_with_archive_rows, tmp_path):
    printed = tmp_path / "out.json"
    args = ["migrate", "down", "-1", "--json", "--database-url", db_with_archive_rows.cli_url]
    accepted, screen, asked = run_on_terminal(args, "y", stdout=printed)
    assert asked and accepted == 0, screen
    raw = printed.read_text()
    assert raw.startswith("{") and raw.count("\n") == 1, repr(raw)
    assert json.loads(raw)["ok"] is True


# --- 10. migrate status ----------------------------------------------------------------------------


def test_migrate_status_at_head_and_behind(empty_db, cli):
    url = empty_db.cli_url
    to_0002 = cli("migrate", "--to", "0002", "--database-url", url)
    assert to_0002.exit_code == 0, to_0002.output
    assert version_of(empty_db) == "0002_messages"

    behind = cli("migrate", "status", "--json", "--database-url", url)
    assert behind.exit_code == 0, behind.output
    payload = json_payload(behind, "migrate status")
    assert payload["ok"] is True
    assert payload["current"] == "0002_messages"
    assert payload["head"] == HEAD
    assert payload["pending"] == REVISIONS[2:]
    assert payload["up_to_date"] is False

    checked = cli("migrate", "status", "--check", "--json", "--database-url", url)
    assert checked.exit_code == 1
    assert json_payload(checked, "migrate status")["ok"] is False
    assert cli("migrate", "status", "--check", "--database-url", url).exit_code == 1

    up = cli("migrate", "up", "--json", "--database-url", url)
    assert json_payload(up, "migrate")["applied"] == REVISIONS[2:]

    at_head = cli("migrate", "status", "--json", "--check", "--database-url", url)
    assert at_head.exit_code == 0, at_head.output
    payload = json_payload(at_head, "migrate status")
    assert payload == {
        "command": "migrate status",
        "ok": True,
        "current": HEAD,
        "head": HEAD,
        "pending": [],
        "known": True,
        "up_to_date": True,
        "unstamped": [],
    }
    text_status = cli("migrate", "status", "--check", "--database-url", url)
    assert text_status.exit_code == 0
    assert "Up to date" in text_status.stdout


# --- 11. history -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bogus", [UNREACHABLE.format(name="none"), "mysql://not/even/postgres"])
def test_history_needs_no_database(cli, bogus):
    env = {"DATABASE_URL": bogus, "CHATDB_DATABASE_URL": bogus}
    plain = cli("migrate", "history", env=env)
    assert plain.exit_code == 0, plain.output
    for revision in REVISIONS:
        assert revision in plain.stdout
    assert plain.stdout.index(REVISIONS[0]) < plain.stdout.index(HEAD)

    as_json = cli("migrate", "history", "--json", env=env)
    assert as_json.exit_code == 0, as_json.output
    payload = json_payload(as_json, "migrate history")
    assert payload["ok"] is True
    revisions = payload["revisions"]
    assert [r["id"] for r in revisions] == REVISIONS
    assert [r["down"] for r in revisions] == [None, *REVISIONS[:-1]]
    assert payload["head"] == revisions[-1]["id"] == HEAD
    assert all(r["message"] for r in revisions)


# --- 12. migrate sql -------------------------------------------------------------------------------


def test_sql_prints_the_migration_sql(cli):
    full = cli("migrate", "sql", env={"DATABASE_URL": UNREACHABLE.format(name="none")})
    assert full.exit_code == 0, full.output
    for fragment in ("CREATE TABLE conversations (", "CREATE INDEX CONCURRENTLY", "chatdb_alembic_version"):
        assert fragment in full.stdout

    partial = cli("migrate", "sql", "--from", "0002")
    assert partial.exit_code == 0, partial.output
    assert "CREATE TABLE conversations (" not in partial.stdout
    assert "CREATE TABLE messages (" not in partial.stdout
    assert "conversations_archive" in partial.stdout
    assert "chatdb_alembic_version" in partial.stdout

    unknown = cli("migrate", "sql", "--from", "zzz_nope")
    assert unknown.exit_code == 2, unknown.output
    assert "zzz_nope" in error_line(unknown)


# --- 13. migrate stamp -----------------------------------------------------------------------------


def test_stamp_proves_the_schema_before_recording_it(migrated_db, cli):
    url = migrated_db.cli_url
    on_head = cli("migrate", "stamp", "head", "--database-url", url)
    assert on_head.exit_code == 0, on_head.output
    assert version_of(migrated_db) == HEAD

    # Adopting tables that match: the revision is recorded.
    migrated_db.execute("DELETE FROM chatdb_alembic_version")
    assert "adopt them: `chatdb migrate stamp REV`" in cli("status", "--database-url", url).stdout
    adopted = cli("migrate", "stamp", "head", "--json", "--database-url", url)
    assert adopted.exit_code == 0, adopted.output
    payload = json_payload(adopted, "migrate stamp")
    assert payload["previous"] is None
    assert payload["current"] == HEAD
    assert version_of(migrated_db) == HEAD

    # An index is missing: refused, naming it, and nothing recorded.
    migrated_db.execute("DROP INDEX ix_messages_user_id_created_at; DELETE FROM chatdb_alembic_version")
    refused = cli("migrate", "stamp", "head", "--database-url", url)
    assert refused.exit_code == 1, refused.output
    assert "ix_messages_user_id_created_at" in error_line(refused)
    assert migrated_db.scalar("SELECT count(*) FROM chatdb_alembic_version") == 0


def test_stamp_an_unknown_revision_exits_2(migrated_db, cli):
    result = cli("migrate", "stamp", "nope_rev", "--database-url", migrated_db.cli_url)
    assert result.exit_code == 2, result.output
    assert "nope_rev" in error_line(result)


# --- 14. status ------------------------------------------------------------------------------------


def test_status_reports_revision_tables_and_runs(migrated_db, cli):
    migrated_db.execute(
        "INSERT INTO users (id) VALUES ('u1');"
        " INSERT INTO conversations (id, user_id) VALUES ('00000000-0000-4000-8000-000000000001', 'u1');"
        " INSERT INTO messages (conversation_id, user_id, role, content)"
        "  SELECT '00000000-0000-4000-8000-000000000001', 'u1', 'user', 'hi ' || n"
        "  FROM generate_series(1, 3) AS n;"
        " INSERT INTO chatdb_runs (command, outcome, finished_at)"
        "  VALUES ('purge', 'succeeded', now() + interval '1 second')"
    )
    result = cli("status", "--json", "--database-url", migrated_db.cli_url)
    assert result.exit_code == 0, result.output
    payload = json_payload(result, "status")
    assert payload["ok"] is True
    assert payload["server_version"] == migrated_db.scalar("SHOW server_version")
    assert payload["database"] == migrated_db.name
    assert payload["revision"]["current"] == payload["revision"]["head"] == HEAD
    assert payload["revision"]["up_to_date"] is True

    tables = {t["name"]: t for t in payload["tables"]}
    expected_rows = {
        "users": 1,
        "conversations": 1,
        "messages": 3,
        "conversations_archive": 0,
        "messages_archive": 0,
        "chatdb_runs": 1,
    }
    assert {name: tables[name]["rows"] for name in expected_rows} == expected_rows
    for entry in tables.values():
        assert is_int(entry["rows"]) and is_int(entry["total_bytes"]), entry
    assert tables["messages"]["total_bytes"] > 0

    (run,) = payload["runs"]
    assert run["command"] == "purge"
    assert run["outcome"] == "succeeded"
    started = dt.datetime.fromisoformat(run["started_at"])
    finished = dt.datetime.fromisoformat(run["finished_at"])
    assert started.tzinfo is not None and finished.tzinfo is not None
    assert started == migrated_db.scalar("SELECT started_at FROM chatdb_runs")
    assert finished == migrated_db.scalar("SELECT finished_at FROM chatdb_runs")

    text_status = cli("status", "--database-url", migrated_db.cli_url)
    assert text_status.exit_code == 0, text_status.output
    assert HEAD in text_status.stdout
    assert re.search(r"messages\W+3\b", text_status.stdout), text_status.stdout
    assert "purge" in text_status.stdout
    assert "succeeded" in text_status.stdout


# --- 15. version and help --------------------------------------------------------------------------


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"chatdb {chatdb.__version__}"


def every_command(cli) -> list[list[str]]:
    """Every command and subcommand, as `chatdb --help` and each group's own help list them
    (a command added later is found with the others)."""
    from test_help import listing

    found: list[list[str]] = []
    waiting: list[list[str]] = [[]]
    while waiting:
        command = waiting.pop(0)
        found.append(command)
        shown = cli(*command, "--help", env={"COLUMNS": "200"})
        assert shown.exit_code == 0, (command, shown.output)
        if "─ Commands ─" in shown.stdout:
            waiting.extend([*command, name] for name in listing(shown.stdout))
    return found


def test_every_commands_help_has_an_example(cli):
    """README: every command has `--help` with an example."""
    commands = every_command(cli)
    names = {" ".join(command) for command in commands}
    assert names >= {"", "archive", "archive restore", "purge", "verify-indexes", "bench", "doctor", "seed"}
    assert names >= {"migrate down", "status", "grants", "embedded url"}, names
    without = []
    for command in commands:
        result = cli(*command, "--help")
        assert result.exit_code == 0 and "Usage" in result.stdout, result.output
        if "Example" not in result.stdout:
            without.append(" ".join(["chatdb", *command]))
    assert without == []


def test_unknown_command_is_a_usage_error(cli):
    result = cli("no-such-command")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


# --- what --json says of seed and verify-indexes --------------------------------------------------


def test_seed_json_gives_its_counts_elapsed_time_and_rows_per_second(migrated_db, cli):
    """README: the summary (or --json) gives users, conversations, messages, elapsed time
    (`elapsed_seconds`) and rows/s (`rows_per_second`)."""
    sizes = {"users": 3, "conversations": 5, "messages": 17}
    result = cli(
        "seed", *(f"--{name}={count}" for name, count in sizes.items()), "--json",
        "--database-url", migrated_db.cli_url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json_payload(result, "seed")
    assert {name: payload[name] for name in sizes} == sizes
    assert {name: migrated_db.scalar(f"SELECT count(*) FROM {name}") for name in sizes} == sizes
    elapsed, rate = payload["elapsed_seconds"], payload["rows_per_second"]
    assert type(elapsed) is float and elapsed > 0 and is_int(rate), payload
    # The rate is the rows over the time, which --json gives to the millisecond.
    rows = sum(sizes.values())
    assert rows / (elapsed + 0.0005) - 1 <= rate <= rows / max(elapsed - 0.0005, 1e-6) + 1, payload


def test_verify_indexes_json_gives_the_revision_and_elapsed_seconds(migrated_db, cli):
    """README: `{"command": "verify-indexes", "ok", "revision": {"current", "head"},
    "passed", "failed", "elapsed_seconds", "checks"}`."""
    result = cli("verify-indexes", "--json", "--database-url", migrated_db.cli_url)
    assert result.exit_code == 0, result.output
    payload = json_payload(result, "verify-indexes")
    assert payload["ok"] is True
    assert payload["revision"] == {"current": HEAD, "head": HEAD}
    assert type(payload["elapsed_seconds"]) is float and payload["elapsed_seconds"] > 0
    assert is_int(payload["passed"]) and payload["failed"] == 0
    assert payload["passed"] == len(payload["checks"]) > 0
    assert {check["status"] for check in payload["checks"]} == {"ok"}


# --- a reader that goes once the pipe took the whole document ---------------------------------------


@pytest.mark.parametrize(
    "args, code",
    [
        pytest.param(["grants", "--app-role", "app", "--ops-role", "ops", "--json"], 0, id="grants"),
        pytest.param(["status", "--json", "--database-url", "{migrated}"], 0, id="status"),
        pytest.param(  # revisions pending: exit 1
            ["migrate", "status", "--check", "--json", "--database-url", "{empty}"], 1, id="migrate status"
        ),
    ],
)
def test_output_the_pipe_took_whole_was_delivered_and_the_exit_code_is_the_commands(
    migrated_db, empty_db, args, code
):
    """README, exit code 141: "Output that the pipe took whole before the reader went (a
    short --json document, written at once, into head -c 20) was delivered, and the command
    exits with its own code". The reader takes the first 20 bytes, as `head -c 20` does,
    and goes."""
    args = [arg.format(migrated=migrated_db.cli_url, empty=empty_db.cli_url) for arg in args]
    whole = subprocess.run([CHATDB, *args], capture_output=True, env=subprocess_env(), timeout=120)
    assert whole.returncode == code, whole.stderr
    read_end, write_end = os.pipe()
    assert len(whole.stdout) <= fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)  # it fits the pipe whole
    try:
        process = subprocess.Popen(
            [CHATDB, *args], stdout=write_end, stderr=subprocess.PIPE, env=subprocess_env()
        )
    finally:
        os.close(write_end)
    try:
        head = os.read(read_end, 20)
    finally:
        os.close(read_end)  # the reader is gone
    _, stderr = process.communicate(timeout=120)
    assert head == whole.stdout[:20]
    assert process.returncode == code, stderr
    assert stderr == whole.stderr


# --- 16. the embedded default ------------------------------------------------------------------------


def chatdb_process(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHATDB, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def test_the_embedded_default(tmp_path):
    home = Path(os.environ["CHATDB_HOME"])  # conftest's, so its teardown stops it as well
    env = subprocess_env(CHATDB_HOME=str(home))
    try:
        migrate = chatdb_process("migrate", env=env, cwd=tmp_path)
        log = home / "pgdata" / "log"
        assert migrate.returncode == 0, migrate.stderr + (log.read_text() if log.is_file() else "")
        announcements = [line for line in migrate.stderr.splitlines() if "embedded PostgreSQL" in line]
        assert len(announcements) == 1, migrate.stderr
        assert str(home) in announcements[0]
        assert HEAD in migrate.stdout

        status = chatdb_process("status", "--json", env=env, cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        stderr_lines = [line for line in status.stderr.splitlines() if line.strip()]
        assert len(stderr_lines) == 1 and "embedded PostgreSQL" in stderr_lines[0], status.stderr
        payload = json.loads(status.stdout)
        assert payload["command"] == "status" and payload["ok"] is True
        assert payload["revision"]["current"] == HEAD
        assert payload["database"] == "chatdb"

        assert (home / "pgdata" / "PG_VERSION").is_file()
        assert (home / "pgdata" / "postmaster.pid").is_file()
        assert not (tmp_path / ".chatdb").exists()

        url = chatdb_process("embedded", "url", env=env, cwd=tmp_path)
        assert url.returncode == 0, url.stderr
        again = chatdb_process(
            "migrate", "status", "--json", "--database-url", url.stdout.strip(), env=env, cwd=tmp_path
        )
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["current"] == HEAD
        assert "embedded PostgreSQL" not in again.stderr  # a URL was given
    finally:
        stop = chatdb_process("embedded", "stop", env=env, cwd=tmp_path)
    assert stop.returncode == 0, stop.stderr
    assert "Stopped" in stop.stdout
    assert not (home / "pgdata" / "postmaster.pid").exists()
    stopped_again = chatdb_process("embedded", "stop", env=env, cwd=tmp_path)
    assert stopped_again.returncode == 0, stopped_again.stderr
    assert "not running" in stopped_again.stdout


# --- 17. python -m chatdb ----------------------------------------------------------------------------


def test_python_dash_m_chatdb(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "chatdb", "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"chatdb {chatdb.__version__}"


# --- usage errors and silent servers, through the console script -------------------------------


def test_usage_errors_are_one_line_from_the_console_script():
    for args in (["seed", "--messages", "ten"], ["purge"], ["no-such-command"]):
        done = subprocess.run([CHATDB, *args], capture_output=True, text=True, env=subprocess_env())
        assert done.returncode == 2, done
        lines = done.stderr.splitlines()
        assert lines[0].startswith("error: ") and lines[1].startswith("hint: see `chatdb"), done.stderr
        assert len(lines) == 2 and "─" not in done.stderr and "Traceback" not in done.stderr


def test_usage_errors_with_json_print_the_one_json_object_too():
    args = ["purge", "--older-than", "1d", "--jobs", "0", "--json"]
    done = subprocess.run([CHATDB, *args], capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 2, done
    payload = json.loads(done.stdout)
    assert payload["command"] == "purge" and payload["ok"] is False and payload["exit_code"] == 2
    assert "--jobs" in payload["error"] and done.stderr.startswith("error: ")


@pytest.mark.parametrize(
    ("args", "command"),
    [(["--json", "status"], "status"), (["--yes", "purge", "--older-than", "9d"], "purge")],
)
def test_a_commands_option_before_its_name_says_where_it_goes(args, command):
    done = subprocess.run([CHATDB, *args], capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 2, done
    option = args[0]
    assert done.stderr.splitlines() == [
        f"error: {option} is an option of `chatdb {command}`: it goes after the command's name",
        f"hint: `chatdb {command} {option} ...`",
    ]
    if option == "--json":  # the one JSON object, for the command meant
        assert json.loads(done.stdout)["command"] == command


def test_an_option_no_command_takes_is_a_plain_usage_error():
    done = subprocess.run([CHATDB, "--bogus", "status"], capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 2, done
    assert done.stderr.splitlines()[0] == "error: No such option: --bogus", done.stderr


def test_a_server_that_accepts_and_never_answers_times_out_with_exit_3(cli):
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        started = time.monotonic()
        result = cli(
            "status", "--connect-timeout", "2", "--database-url", f"postgresql://ops@127.0.0.1:{port}/chat"
        )
        waited = time.monotonic() - started
    finally:
        listener.close()
    assert result.exit_code == 3
    assert "timeout expired" in result.stderr
    assert waited < 30  # bounded, not hanging (a generous bound: the machine is shared)


@pytest.mark.skipif(os.geteuid() != 0, reason="only as root does pg_ctl run as the server's own user")
def test_an_embedded_server_that_cannot_be_stopped_is_one_error_line(tmp_path):
    home = Path(os.environ["CHATDB_HOME"])
    env = subprocess_env(CHATDB_HOME=str(home))
    assert chatdb_process("embedded", "url", env=env, cwd=tmp_path).returncode == 0
    home.chmod(0o700)  # the server's own user can no longer reach its data folder
    try:
        stop = chatdb_process("embedded", "stop", env=env, cwd=tmp_path)
    finally:
        home.chmod(0o755)
    assert stop.returncode == 1, stop.stderr
    (line,) = stop.stderr.strip().splitlines()
    assert (
        line.startswith("error: could not stop the embedded PostgreSQL in ") and "pg_ctl exited 1" in line
    ), line
    assert chatdb_process("embedded", "stop", env=env, cwd=tmp_path).returncode == 0
