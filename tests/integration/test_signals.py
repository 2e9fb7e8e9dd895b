"""A signal during a read (counting, planning, a dry run, status, checks) cancels the
statement in the server and exits at once; a chatdb killed outright leaves no statement
running either."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

COMMANDS = {
    "purge dry run": ["purge", "--older-than", "90d", "--dry-run"],
    "archive dry run": ["archive", "--older-than", "90d", "--dry-run"],
    "status": ["status"],
    "verify-indexes": ["verify-indexes"],
}


@contextmanager
def messages_locked(db) -> Iterator[None]:
    """Another session holds an ACCESS EXCLUSIVE lock on messages: any read of the table
    waits, as a long count would run."""
    ready, release = threading.Event(), threading.Event()

    def hold() -> None:
        with db.engine.begin() as connection:
            connection.exec_driver_sql("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            ready.set()
            release.wait(120)

    holder = threading.Thread(target=hold)
    holder.start()
    assert ready.wait(30)
    try:
        yield
    finally:
        release.set()
        holder.join()


def _chatdb_sessions(db) -> list[tuple[str, str]]:
    with db.engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.exec_driver_sql(
                "SELECT state, left(query, 60) FROM pg_stat_activity"
                " WHERE datname = current_database() AND starts_with(application_name, 'chatdb')"
            )
        ]


def _wait_until_gone(db, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (sessions := _chatdb_sessions(db)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sessions, f"chatdb's statement still runs in the server: {sessions}"


def _waiting_on_the_lock(db, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        with db.engine.connect() as connection:
            waiting = connection.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND starts_with(application_name, 'chatdb') AND wait_event_type = 'Lock'"
            ).scalar()
        if waiting:
            return
        time.sleep(0.05)
    raise AssertionError("chatdb never waited for the lock")


def _start(db, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "chatdb", *args, "--database-url", db.cli_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143)]


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize(("signum", "code"), SIGNALS, ids=["INT", "TERM"])
def test_a_signal_during_a_read_cancels_it_in_the_server_and_exits_at_once(migrated_db, name, signum, code):
    with messages_locked(migrated_db):
        process = _start(migrated_db, COMMANDS[name])
        _waiting_on_the_lock(migrated_db, process)
        process.send_signal(signum)
        # While the lock is still held: the statement was cancelled, not left to finish.
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == code, stderr
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert "Traceback" not in stderr
        _wait_until_gone(migrated_db)


def test_a_killed_chatdb_leaves_no_statement_running(migrated_db):
    """SIGKILL: nothing in chatdb runs, and the server notices the client is gone
    (client_connection_check_interval, set in each of chatdb's transactions)."""
    with messages_locked(migrated_db):
        process = _start(migrated_db, COMMANDS["purge dry run"])
        _waiting_on_the_lock(migrated_db, process)
        process.kill()
        process.wait()
        _wait_until_gone(migrated_db)


def test_chatdb_transactions_check_that_their_client_is_still_there(migrated_db):
    from chatdb import db

    engine = db.connect(db.Database(migrated_db.url, "test"))
    try:
        with engine.connect() as connection:
            inside = connection.exec_driver_sql("SHOW client_connection_check_interval").scalar()
            connection.commit()
        with engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT")
            outside = connection.exec_driver_sql("SHOW client_connection_check_interval").scalar()
    finally:
        engine.dispose()
    assert inside != "0"
    assert outside == "0"  # local to each transaction: a pooler's server connection keeps nothing
