"""The commands as users run them: output, --json, exit codes, and every error as one line."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import scratch_folder

import chatdb
from chatdb import embedded, migrations

HEAD = migrations.head()
SECRET = "s3cr3t-Pa55"
CHATDB = Path(sys.executable).with_name("chatdb")


def one_error_line(result) -> str:
    """The command failed with exactly one error line (maybe a hint after it, maybe a plan
    before it), and no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert lines[lines.index(errors[0]) + 1 :] in ([], [lines[-1]]) and lines[-1].startswith(
        ("error: ", "hint: ")
    )
    assert "Traceback" not in result.output
    return errors[0]


def parse_json(result) -> dict:
    payload = json.loads(result.stdout)  # one object, nothing else on stdout
    assert isinstance(payload, dict)
    return payload


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CHATDB_DATABASE_URL")}
    env.update(extra)
    return env


# --- migrate ------------------------------------------------------------------------------------


def test_migrate_then_again_is_a_no_op(empty_db, cli):
    first = cli("migrate", "--database-url", empty_db.cli_url)
    assert first.exit_code == 0, first.output
    assert HEAD in first.stdout
    second = cli("migrate", "--database-url", empty_db.cli_url, "--json")
    assert second.exit_code == 0
    assert parse_json(second) | {"elapsed_seconds": 0} == {
        "command": "migrate",
        "ok": True,
        "previous": HEAD,
        "current": HEAD,
        "applied": [],
        "elapsed_seconds": 0,
    }


def test_migrate_json_lists_applied_revisions(empty_db, cli):
    payload = parse_json(cli("migrate", "--json", "--database-url", empty_db.cli_url))
    assert payload["applied"] == [r.id for r in migrations.chain()]
    assert payload["previous"] is None


def test_database_url_before_or_after_the_command(migrated_db, cli):
    before = cli("--database-url", migrated_db.cli_url, "migrate", "status", "--json")
    after = cli("migrate", "status", "--json", "--database-url", migrated_db.cli_url)
    assert parse_json(before)["current"] == parse_json(after)["current"] == HEAD
    # The option after the command name wins.
    bogus = "postgresql://nobody@127.0.0.1:1/none"
    winner = cli(
        "--database-url", bogus, "--connect-timeout", "0", "status", "--database-url", migrated_db.cli_url
    )
    assert winner.exit_code == 0, winner.output
    loser = cli(
        "--database-url", migrated_db.cli_url, "status", "--database-url", bogus, "--connect-timeout", "0"
    )
    assert loser.exit_code == 3


def test_precedence_of_url_sources(migrated_db, cli):
    bogus = "postgresql://nobody@127.0.0.1:1/none"
    via_chatdb_env = cli(
        "migrate", "status", "--json", env={"CHATDB_DATABASE_URL": migrated_db.cli_url, "DATABASE_URL": bogus}
    )
    assert parse_json(via_chatdb_env)["current"] == HEAD
    via_database_url = cli("migrate", "status", "--json", env={"DATABASE_URL": migrated_db.cli_url})
    assert parse_json(via_database_url)["current"] == HEAD
    option_wins = cli(
        "migrate",
        "status",
        "--json",
        "--database-url",
        migrated_db.cli_url,
        env={"CHATDB_DATABASE_URL": bogus},
    )
    assert parse_json(option_wins)["current"] == HEAD


def test_provider_url_forms_and_query_parameters(migrated_db, cli):
    url = migrated_db.cli_url
    assert url.startswith("postgresql://")
    heroku_style = "postgres://" + url.removeprefix("postgresql://")
    assert cli("migrate", "status", "--database-url", heroku_style).exit_code == 0
    with_params = url + "&application_name=from-url&connect_timeout=5"
    assert cli("migrate", "status", "--database-url", with_params).exit_code == 0


@pytest.mark.parametrize(
    "url",
    [f"mysql://u:{SECRET}@host/db", f"postgresql://u:{SECRET}@host:abc/db", "not a url", ""],
)
def test_bad_urls_exit_2_without_the_password(cli, url):
    result = cli("migrate", "status", "--database-url", url)
    assert result.exit_code == 2
    one_error_line(result)
    assert SECRET not in result.output


def test_unreachable_server_exits_3_after_the_timeout(cli):
    result = cli(
        "status", "--database-url", f"postgresql://u:{SECRET}@127.0.0.1:1/db", "--connect-timeout", "0.5"
    )
    assert result.exit_code == 3
    line = one_error_line(result)
    assert "gave up after 0.5s" in line
    assert SECRET not in result.output
    assert "u:***@127.0.0.1" in line


def test_unknown_database_exits_3_at_once(migrated_db, cli):
    url = migrated_db.url.set(database="no_such_database_here")
    typed = url.set(drivername="postgresql").render_as_string(hide_password=False)
    result = cli("status", "--database-url", typed, "--connect-timeout", "30")
    assert result.exit_code == 3
    assert "does not exist" in one_error_line(result)
    assert "gave up" not in result.stderr


@pytest.fixture(scope="module")
def password_server():
    """A server of its own whose pg_hba.conf requires passwords."""
    with scratch_folder("chatdb-test-pw-") as folder:
        yield from _password_server(folder)


def _password_server(folder: Path):
    server, url = embedded.scratch_server(folder / "pgdata")
    url = url.set(drivername="postgresql")
    import psycopg

    with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as connection:
        connection.execute("ALTER ROLE postgres PASSWORD 'right-pw'")
        hba = Path(server.pgdata) / "pg_hba.conf"
        hba.write_text(
            "local all all scram-sha-256\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
        )
        connection.execute("SELECT pg_reload_conf()")
    yield url
    server.cleanup()


def test_wrong_password_exits_3_and_is_never_printed(password_server, cli):
    wrong = password_server.set(password=SECRET).render_as_string(hide_password=False)
    result = cli("status", "--database-url", wrong, "--connect-timeout", "30")
    assert result.exit_code == 3
    line = one_error_line(result)
    assert "password authentication failed" in line
    assert "gave up" not in line  # not retried
    assert SECRET not in result.output
    right = password_server.set(password="right-pw").render_as_string(hide_password=False)
    ok = cli("status", "--database-url", right, "--json")
    assert ok.exit_code == 0, ok.output
    assert "right-pw" not in ok.output


# --- database states ----------------------------------------------------------------------------


def test_unmigrated_database(empty_db, cli):
    status = cli("migrate", "status", "--json", "--database-url", empty_db.cli_url)
    assert status.exit_code == 0
    assert parse_json(status)["current"] is None
    assert cli("migrate", "status", "--check", "--database-url", empty_db.cli_url).exit_code == 1
    overview = cli("status", "--database-url", empty_db.cli_url)
    assert overview.exit_code == 0
    assert "not migrated" in overview.stdout
    down = cli("migrate", "down", "-1", "--yes", "--database-url", empty_db.cli_url)
    assert down.exit_code == 1
    one_error_line(down)
    seed = cli("seed", "--database-url", empty_db.cli_url)
    assert seed.exit_code == 1
    assert "chatdb migrate" in seed.stderr


def test_database_at_an_unknown_revision(migrated_db, cli):
    migrated_db.execute("UPDATE chatdb_alembic_version SET version_num = 'ffff_future'")
    for args in (["migrate"], ["migrate", "status"], ["migrate", "down", "-1", "--yes"], ["seed"]):
        result = cli(*args, "--database-url", migrated_db.cli_url)
        assert result.exit_code == 1, args
        assert "ffff_future" in one_error_line(result)
    status = cli("migrate", "status", "--json", "--database-url", migrated_db.cli_url)
    assert status.exit_code == 1
    assert parse_json(status) | {"head": None} == {
        "command": "migrate status",
        "ok": False,
        "current": "ffff_future",
        "head": None,
        "pending": [],
        "known": False,
        "up_to_date": False,
    }
    overview = cli("status", "--database-url", migrated_db.cli_url)
    assert overview.exit_code == 0
    assert "unknown" in overview.stdout


def test_status_check_with_pending_revisions(empty_db, cli):
    assert cli("migrate", "--to", "0002", "--database-url", empty_db.cli_url).exit_code == 0
    result = cli("migrate", "status", "--check", "--json", "--database-url", empty_db.cli_url)
    assert result.exit_code == 1
    payload = parse_json(result)
    assert payload["ok"] is False
    assert payload["pending"] == ["0003_chatbot_extensions", "0004_archive_and_audit"]
    assert cli("migrate", "up", "--database-url", empty_db.cli_url).exit_code == 0
    assert cli("migrate", "status", "--check", "--database-url", empty_db.cli_url).exit_code == 0


# --- migrate down ----------------------------------------------------------------------------


def archive_tables_exist(db) -> bool:
    return db.scalar("SELECT to_regclass('conversations_archive') IS NOT NULL")


def test_down_refuses_off_a_terminal_without_yes(migrated_db, cli):
    result = cli("migrate", "down", "-1", "--database-url", migrated_db.cli_url)
    assert result.exit_code == 1
    assert "--yes" in one_error_line(result)
    assert archive_tables_exist(migrated_db)


def test_down_with_yes_shows_the_plan_and_drops(migrated_db, cli):
    migrated_db.execute("INSERT INTO chatdb_runs (command, outcome) VALUES ('purge', 'succeeded')")
    result = cli("migrate", "down", "-1", "--yes", "--database-url", migrated_db.cli_url)
    assert result.exit_code == 0, result.output
    for table in ("conversations_archive", "messages_archive", "chatdb_runs"):
        assert table in result.stderr
    assert not archive_tables_exist(migrated_db)
    assert migrated_db.scalar("SELECT version_num FROM chatdb_alembic_version") == "0003_chatbot_extensions"


def test_down_to_base_json(migrated_db, cli):
    migrated_db.execute("INSERT INTO users (id) VALUES ('u1'), ('u2')")
    payload = parse_json(
        cli("migrate", "down", "base", "--yes", "--json", "--database-url", migrated_db.cli_url)
    )
    assert payload["ok"] is True
    assert payload["current"] is None
    rows = {entry["table"]: entry["rows"] for entry in payload["dropped_tables"]}
    assert rows["users"] == 2
    assert rows["messages"] == 0


def test_down_to_an_unknown_revision_exits_2(migrated_db, cli):
    result = cli("migrate", "down", "nope", "--yes", "--database-url", migrated_db.cli_url)
    assert result.exit_code == 2
    one_error_line(result)


def run_in_terminal(args: list[str], answer: str) -> tuple[int, str]:
    """Run chatdb in a pseudo-terminal, answer its question, return (exit code, screen)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(str(CHATDB), [str(CHATDB), *args], clean_env())
    screen = b""
    deadline = time.monotonic() + 60
    answered = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if not ready:
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        screen += data
        if not answered and b"[y/N]" in screen:
            os.write(fd, answer.encode() + b"\n")
            answered = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), screen.decode(errors="replace")


def test_down_asks_on_a_terminal(migrated_db):
    declined, screen = run_in_terminal(["migrate", "down", "-1", "--database-url", migrated_db.cli_url], "n")
    assert "conversations_archive" in screen
    assert declined == 1
    assert archive_tables_exist(migrated_db)
    accepted, _ = run_in_terminal(["migrate", "down", "-1", "--database-url", migrated_db.cli_url], "y")
    assert accepted == 0
    assert not archive_tables_exist(migrated_db)


# --- history, sql, stamp, status -------------------------------------------------------------------


def test_history_needs_no_database(cli):
    env = {"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    plain = cli("migrate", "history", env=env)
    assert plain.exit_code == 0
    assert "0001_conversations" in plain.stdout
    payload = parse_json(cli("migrate", "history", "--json", env=env))
    assert [r["id"] for r in payload["revisions"]] == [r.id for r in migrations.chain()]
    assert payload["head"] == HEAD


def test_sql_prints_reviewable_sql(cli):
    full = cli("migrate", "sql")
    assert full.exit_code == 0
    for fragment in ("CREATE TABLE conversations (", "CREATE INDEX CONCURRENTLY", "chatdb_alembic_version"):
        assert fragment in full.stdout
    partial = cli("migrate", "sql", "--from", "0002")
    assert partial.exit_code == 0
    assert "CREATE TABLE conversations (" not in partial.stdout
    assert "ADD COLUMN IF NOT EXISTS title" in partial.stdout
    unknown = cli("migrate", "sql", "--from", "zzz")
    assert unknown.exit_code == 2


def test_stamp_checks_the_live_schema(migrated_db, cli):
    assert cli("migrate", "stamp", "head", "--database-url", migrated_db.cli_url).exit_code == 0
    migrated_db.execute("DROP INDEX ix_messages_user_id_created_at; DELETE FROM chatdb_alembic_version")
    result = cli("migrate", "stamp", "head", "--database-url", migrated_db.cli_url)
    assert result.exit_code == 1
    assert "ix_messages_user_id_created_at" in one_error_line(result)
    assert migrated_db.scalar("SELECT count(*) FROM chatdb_alembic_version") == 0


def test_status_reports_tables_and_runs(migrated_db, cli):
    migrated_db.execute(
        "INSERT INTO users (id) VALUES ('u1');"
        " INSERT INTO conversations (id, user_id) VALUES ('00000000-0000-4000-8000-000000000001', 'u1');"
        " INSERT INTO messages (conversation_id, user_id, role, content)"
        " SELECT '00000000-0000-4000-8000-000000000001', 'u1', 'user', 'hi' FROM generate_series(1, 3);"
        " INSERT INTO chatdb_runs (command, outcome, finished_at, counts)"
        " VALUES ('purge', 'succeeded', now(), '{\"conversations\": 2}')"
    )
    payload = parse_json(cli("status", "--json", "--database-url", migrated_db.cli_url))
    assert payload["revision"]["current"] == HEAD
    assert payload["revision"]["up_to_date"] is True
    assert payload["server_version"]
    tables = {t["name"]: t for t in payload["tables"]}
    assert tables["messages"]["rows"] == 3
    assert tables["users"]["owner"] == "chatdb"
    assert isinstance(tables["messages"]["total_bytes"], int) and tables["messages"]["total_bytes"] > 0
    (run,) = payload["runs"]
    assert run["command"] == "purge"
    assert run["outcome"] == "succeeded"
    assert run["counts"] == {"conversations": 2}
    assert "T" in run["started_at"] and run["started_at"].endswith("+00:00")
    text_output = cli("status", "--database-url", migrated_db.cli_url)
    assert "purge" in text_output.stdout
    assert "messages" in text_output.stdout


# --- help, version, the embedded default -------------------------------------------------------


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"chatdb {chatdb.__version__}"


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["migrate"],
        ["migrate", "up"],
        ["migrate", "down"],
        ["migrate", "status"],
        ["migrate", "history"],
        ["migrate", "stamp"],
        ["migrate", "sql"],
        ["status"],
        ["seed"],
        ["embedded", "stop"],
        ["embedded", "url"],
    ],
)
def test_every_command_has_help_with_an_example(cli, command):
    result = cli(*command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout


def test_python_dash_m(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "chatdb", "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"chatdb {chatdb.__version__}"


def test_the_embedded_default(tmp_path):
    home = tmp_path / "home"
    env = clean_env(CHATDB_HOME=str(home))
    try:
        migrate = subprocess.run(
            [str(CHATDB), "migrate"], env=env, capture_output=True, text=True, cwd=tmp_path
        )
        assert migrate.returncode == 0, migrate.stderr
        announcement = [line for line in migrate.stderr.splitlines() if "embedded PostgreSQL" in line]
        assert len(announcement) == 1
        assert str(home) in announcement[0]
        status = subprocess.run([str(CHATDB), "status", "--json"], env=env, capture_output=True, text=True)
        assert status.returncode == 0, status.stderr
        payload = json.loads(status.stdout)
        assert payload["revision"]["current"] == HEAD
        assert payload["database"] == "chatdb"
        assert (home / "pgdata" / "PG_VERSION").is_file()
    finally:
        stop = subprocess.run([str(CHATDB), "embedded", "stop"], env=env, capture_output=True, text=True)
    assert stop.returncode == 0
    assert "Stopped" in stop.stdout
    assert not (home / "pgdata" / "postmaster.pid").exists()


def test_sigterm_exits_143(migrated_db):
    # A seed big enough to still be running when the signal arrives.
    process = subprocess.Popen(
        [
            *(str(CHATDB), "seed", "--messages", "400000", "--conversations", "20000", "--users", "2000"),
            *("--database-url", migrated_db.cli_url),
        ],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    migrated_db.wait_for_query("COPY")
    process.terminate()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "error: terminated"
    assert migrated_db.scalar("SELECT count(*) FROM users") == 0
