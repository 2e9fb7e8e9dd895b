"""chatdb doctor against the suite's real server: each check driven into its warning or
failure and back, the JSON and JUnit shapes, --deep, the growth history and the
lifecycle's --vacuum."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import signal
import subprocess
import sys
import time
from xml.etree import ElementTree

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from chatdb import doctor, migrations
from chatdb.schema import HEAD_REVISION

SEED = ("--users", "20", "--conversations", "200", "--messages", "2000", "--days", "365")
KEYS = {"area", "object", "check", "status", "value", "threshold", "detail", "fix", "node"}


def run(cli, database, *args: str):
    """chatdb doctor --json; (exit code, payload)."""
    result = cli("doctor", "--json", *args, "--database-url", database.cli_url)
    assert result.stdout.count("\n") == 1, result.output
    assert "Traceback" not in result.output
    return result.exit_code, json.loads(result.stdout)


def found(payload, area: str, check: str | None = None, obj: str | None = None) -> list[dict]:
    return [
        c
        for c in payload["checks"]
        if c["area"] == area
        and (check is None or c["check"] == check)
        and (obj is None or c["object"] == obj)
    ]


def one(payload, area: str, check: str, obj: str | None = None) -> dict:
    (finding,) = found(payload, area, check, obj)
    return finding


def wait_for(database, condition: str, timeout: float = 30, **params) -> None:
    """Wait until the statistics say ``condition`` (they reach other sessions once the
    session that changed them reports; a closed session reports as it exits)."""
    deadline = time.monotonic() + timeout
    with database.engine.connect() as connection:
        while True:
            connection.execute(text("SELECT pg_stat_clear_snapshot()"))
            if connection.execute(text(f"SELECT {condition}"), params).scalar():
                return
            connection.rollback()
            assert time.monotonic() < deadline, f"the statistics never said {condition}"
            time.sleep(0.05)


@pytest.fixture
def seeded(migrated_db, cli):
    result = cli("seed", *SEED, "--database-url", migrated_db.cli_url)
    assert result.exit_code == 0, result.output
    migrated_db.execute("ANALYZE")
    return migrated_db


# --- shape ------------------------------------------------------------------------------------


def test_a_healthy_database_json_shape_and_every_area(seeded, cli):
    code, payload = run(cli, seeded)
    assert code == 0, payload
    assert payload["command"] == "doctor" and payload["ok"] is True
    assert payload["revision"] == HEAD_REVISION
    checks = payload["checks"]
    assert all(set(c) == KEYS for c in checks), checks[0]
    assert {c["status"] for c in checks} <= {"ok", "warn", "fail", "skipped"}
    assert not [c for c in checks if c["status"] == "fail"]
    statuses = ("ok", "warn", "fail", "skipped")
    assert payload["counts"] == {s: sum(c["status"] == s for c in checks) for s in statuses}
    areas = {c["area"] for c in checks}
    assert {"schema", "vacuum", "bloat", "indexes", "statements", "connections", "wraparound"} <= areas
    assert {"cache", "growth", "retention", "replication"} <= areas
    assert "integrity" not in areas  # --deep only
    # Without pg_stat_statements loaded: one line saying how to enable it.
    (statements,) = found(payload, "statements")
    assert statements["status"] == "skipped"
    assert "shared_preload_libraries" in statements["detail"]
    # Never VACUUM FULL; an ACCESS EXCLUSIVE lock only where it says so.
    for check in checks:
        assert "VACUUM FULL" not in (check["fix"] or "")
    # The run recorded the sizes: each tracked table and the database.
    assert payload["recorded"] is True
    assert seeded.scalar("SELECT count(*) FROM chatdb_size_history WHERE command = 'doctor'") == 8
    assert seeded.scalar("SELECT count(*) FROM chatdb_size_history WHERE table_name IS NULL") == 1


def test_the_human_report_groups_by_area_and_lists_fixes_below(seeded, cli):
    seeded.execute("ALTER TABLE messages SET (autovacuum_enabled = false); DELETE FROM messages")
    wait_for(seeded, "n_dead_tup >= 2000 FROM pg_stat_all_tables WHERE relname = 'messages'")
    result = cli("doctor", "--database-url", seeded.cli_url)
    assert result.exit_code == 0, result.output
    shown = result.stdout
    assert shown.index("vacuum") < shown.index("wraparound") < shown.index("growth")
    assert "-- To fix, run each statement on its own" in shown
    assert "VACUUM (ANALYZE) messages;" in shown
    assert "WARNINGS:" in shown.splitlines()[-1]
    strict = cli("doctor", "--strict", "--database-url", seeded.cli_url)
    assert strict.exit_code == 1, strict.output
    assert "FAILED:" in strict.stdout.splitlines()[-1]


def test_a_junit_report_that_cannot_be_written_is_refused_before_any_check(seeded, cli, tmp_path):
    target = tmp_path / "no" / "doctor.xml"
    result = cli("doctor", "--junit", str(target), "--database-url", seeded.cli_url)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: cannot write --junit {target}: "), result.stderr
    assert seeded.scalar("SELECT count(*) FROM chatdb_size_history") == 0  # doctor did not run


def test_junit_report(seeded, cli, tmp_path):
    seeded.execute("CREATE INDEX idx_extra_role ON messages (role)")
    report = tmp_path / "doctor.xml"
    code, payload = run(cli, seeded, "--junit", str(report))
    assert code == 0
    root = ElementTree.parse(report).getroot()
    assert root.tag == "testsuites"
    suites = {suite.get("name"): suite for suite in root}
    assert "doctor indexes" in suites and "doctor vacuum" in suites
    assert int(root.get("tests")) == len(payload["checks"])
    assert root.get("failures") == "0"  # warnings pass, saying so, without --strict
    cases = [case for suite in root for case in suite]
    extra = next(case for case in cases if case.get("name") == "index use: idx_extra_role")
    assert extra.find("system-out").text.startswith("warn: ")
    assert "DROP INDEX CONCURRENTLY idx_extra_role;" in extra.find("system-out").text
    skipped = next(case for case in cases if case.get("name") == "pg_stat_statements")
    assert skipped.find("skipped") is not None
    cli("doctor", "--json", "--strict", "--junit", str(report), "--database-url", seeded.cli_url)
    strict = ElementTree.parse(report).getroot()
    assert int(strict.get("failures")) == payload["counts"]["warn"] > 0
    failure = next(
        case for suite in strict for case in suite if case.get("name") == "index use: idx_extra_role"
    ).find("failure")
    assert failure is not None and "How to fix" in failure.text


# --- 1. vacuum ---------------------------------------------------------------------------------


def test_dead_rows_after_a_purge_warn_until_vacuum(seeded, cli):
    seeded.execute("ALTER TABLE messages SET (autovacuum_enabled = false)")
    purge = cli("purge", "--older-than", "30d", "--database-url", seeded.cli_url)
    assert purge.exit_code == 0, purge.output
    # The purge's summary says it left a table needing VACUUM, and how to do it now.
    assert "Left tables needing VACUUM:" in purge.stdout
    assert "VACUUM (ANALYZE) messages;" in purge.stdout
    deleted = seeded.scalar("SELECT (counts->>'messages')::int FROM chatdb_runs WHERE command = 'purge'")
    assert deleted > 1000
    wait_for(seeded, "n_dead_tup >= :n FROM pg_stat_all_tables WHERE relname = 'messages'", n=deleted)

    _, payload = run(cli, seeded)
    dead = one(payload, "vacuum", "dead rows", "messages")
    assert dead["status"] == "warn"
    assert dead["value"] >= deleted > dead["threshold"]
    assert dead["fix"].startswith("VACUUM (ANALYZE) messages;")
    assert "autovacuum is off for this table" in dead["detail"]
    assert f"purge run {seeded.scalar('SELECT id FROM chatdb_runs')} removed" in dead["detail"]

    with seeded.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM (ANALYZE) messages"))
    wait_for(seeded, "n_dead_tup = 0 FROM pg_stat_all_tables WHERE relname = 'messages'")
    _, payload = run(cli, seeded)
    dead = one(payload, "vacuum", "dead rows", "messages")
    assert dead["status"] == "ok", dead
    assert "(manual)" in dead["detail"]


def test_purge_and_archive_with_vacuum_leave_nothing_to_vacuum(seeded, cli):
    seeded.execute("ALTER TABLE messages SET (autovacuum_enabled = false)")
    seeded.execute("ALTER TABLE conversations SET (autovacuum_enabled = false)")
    archive = cli("archive", "--older-than", "60d", "--vacuum", "--json", "--database-url", seeded.cli_url)
    assert archive.exit_code == 0, archive.output
    vacuum = json.loads(archive.stdout)["vacuum"]
    assert vacuum["vacuumed"] == ["conversations", "messages", "conversations_archive", "messages_archive"]
    assert vacuum["skipped"] == {} and vacuum["run_by"] == {} and vacuum["stopped_by"] is None
    assert json.loads(archive.stdout)["ok"] is True
    purge = cli("purge", "--older-than", "30d", "--vacuum", "--database-url", seeded.cli_url)
    assert purge.exit_code == 0, purge.output
    assert "VACUUM (ANALYZE) done on conversations, messages" in purge.stdout
    assert "Left tables needing VACUUM" not in purge.stdout
    wait_for(
        seeded, "sum(n_dead_tup) = 0 FROM pg_stat_all_tables WHERE relname IN ('messages', 'conversations')"
    )
    _, payload = run(cli, seeded)
    assert all(c["status"] == "ok" for c in found(payload, "vacuum", "dead rows")), found(payload, "vacuum")
    # --vacuum is recorded with the run's arguments.
    assert seeded.scalar("SELECT bool_and((arguments->>'vacuum')::bool) FROM chatdb_runs") is True


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_findings_are_a_table_on_a_wide_terminal_and_one_after_the_other_on_a_narrow_one(seeded, cli):
    seeded.execute("ALTER TABLE messages SET (autovacuum_enabled = false)")
    purge = cli("purge", "--older-than", "30d", "--database-url", seeded.cli_url)
    assert purge.exit_code == 0, purge.output
    shown = {}
    for width in (60, 200):
        result = cli(
            "doctor", "--database-url", seeded.cli_url, env={"COLUMNS": str(width), "TTY_COMPATIBLE": "1"}
        )
        assert result.exit_code == 0, result.output
        shown[width] = ANSI.sub("", result.stdout)
    wide, narrow = shown[200], shown[60]
    # Wide: one table, a row per finding, between its borders.
    assert "┃" in wide
    assert re.search(r"│ *messages *│ *dead rows *│ *warn *│", wide), wide
    # Narrow: no table; each finding on a line of its own, then its detail, indented.
    assert not set("┃│━─") & set(narrow), narrow
    lines = narrow.splitlines()
    at = lines.index("vacuum messages: dead rows warn (1,500 / 1,000)")
    assert lines[at + 1].startswith("  1,500 dead rows (75% of the table) wait for VACUUM")
    words = narrow.split()
    assert all(len(line) <= max([60, *map(len, line.split())]) for line in lines), narrow
    assert len(words) > 100
    # Both end with the same fix, whole.
    for text_ in (wide, narrow):
        assert "\nVACUUM (ANALYZE) messages;" in text_


PURGE_VACUUM = (sys.executable, "-m", "chatdb", "purge", "--older-than", "30d", "--vacuum")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_vacuum_in_the_server_and_the_summary_says_so(seeded, signum, code):
    """The VACUUM waits behind a lock another session holds; the signal cancels it in the
    server, and the purge, already recorded, keeps its outcome."""
    with seeded.engine.connect() as blocker:
        blocker.execute(text("LOCK TABLE conversations IN SHARE UPDATE EXCLUSIVE MODE"))
        process = subprocess.Popen(
            [*PURGE_VACUUM, "--database-url", seeded.cli_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            seeded.wait_for_query("VACUUM (ANALYZE)")
            process.send_signal(signum)
            stdout, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        blocker.rollback()
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert f"VACUUM stopped ({'interrupted' if code == 130 else 'terminated'})" in stdout
    assert "Left tables needing VACUUM" not in stdout  # the stop's own line says what to do
    assert "deleted" in stdout  # the run's own summary
    assert seeded.scalar("SELECT outcome FROM chatdb_runs") == "succeeded"
    assert seeded.scalar("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'VACUUM%'") == 0


# --- 2. bloat, 3. integrity (--deep) -----------------------------------------------------------


def test_bloat_estimated_from_statistics_warns_after_a_large_purge(seeded, cli):
    seeded.execute("ALTER TABLE messages SET (autovacuum_enabled = false)")
    seeded.execute("DELETE FROM messages WHERE created_at < now() - interval '30 days'")
    seeded.execute("ANALYZE messages")
    _, payload = run(cli, seeded, "--threshold", "bloat_bytes=16kB")
    table = one(payload, "bloat", "table bloat", "messages")
    assert table["status"] == "warn", table
    assert table["value"] >= table["threshold"] >= 16 * 1024
    assert "(estimated)" in table["detail"]
    assert "pg_repack --no-order --table=public.messages" in table["fix"]
    assert "ACCESS EXCLUSIVE" in table["fix"]
    indexes = [c for c in found(payload, "bloat", "index bloat") if c["status"] == "warn"]
    assert indexes, found(payload, "bloat", "index bloat")
    assert all(c["fix"].startswith("REINDEX INDEX CONCURRENTLY ") for c in indexes)
    # Back: with the default thresholds (100 MB) a small table is never nagged about.
    _, payload = run(cli, seeded)
    assert all(c["status"] == "ok" for c in found(payload, "bloat")), found(payload, "bloat")


def test_deep_on_a_healthy_database(seeded, cli):
    seeded.execute("CREATE EXTENSION pgstattuple; CREATE EXTENSION amcheck")
    code, payload = run(cli, seeded, "--deep", "--older-than", "180d")
    assert code == 0, [c for c in payload["checks"] if c["status"] != "ok"]
    integrity = found(payload, "integrity")
    indexes = seeded.scalar(
        "SELECT count(*) FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid"
        " WHERE t.relname IN ('conversations', 'messages', 'conversations_archive', 'messages_archive',"
        " 'chatdb_runs', 'chatdb_size_history')"
    )
    assert len(integrity) == indexes
    assert all(c["status"] == "ok" and c["detail"].endswith("intact") for c in integrity)
    bloat = found(payload, "bloat")
    assert all("(measured with pgstat" in c["detail"] or c["detail"].startswith("empty") for c in bloat)
    assert not any("((" in c["detail"] or "))" in c["detail"] for c in bloat)
    assert payload["deep_read_bytes"] >= seeded.scalar("SELECT pg_relation_size('messages')")
    assert payload["deep_seconds"] > 0
    retention = one(payload, "retention", "outlook", "archive --older-than 180d")
    assert "~" not in retention["detail"]  # counted, not estimated


def test_deep_without_the_extensions_skips_saying_why(seeded, cli):
    code, payload = run(cli, seeded, "--deep")
    assert code == 0
    (amcheck,) = found(payload, "integrity")
    assert amcheck["status"] == "skipped" and "CREATE EXTENSION amcheck" in amcheck["detail"]
    (note,) = [c for c in found(payload, "bloat") if c["status"] == "skipped"]
    assert "pgstattuple is not installed" in note["detail"]
    assert one(payload, "bloat", "table bloat", "messages")["detail"].endswith("(estimated)")


def test_deep_finds_a_corrupt_index(seeded, cli):
    """An index whose operator class's comparison changed after the build is out of order,
    as corruption leaves one: amcheck says so, and doctor fails."""
    seeded.execute("CREATE EXTENSION amcheck")
    seeded.execute(
        "CREATE FUNCTION test_cmp(text, text) RETURNS int LANGUAGE sql IMMUTABLE"
        "  AS 'SELECT bttextcmp($1, $2)';"
        " CREATE OPERATOR CLASS test_ops FOR TYPE text USING btree AS OPERATOR 1 <, OPERATOR 2 <=,"
        "  OPERATOR 3 =, OPERATOR 4 >=, OPERATOR 5 >, FUNCTION 1 test_cmp(text, text);"
        " CREATE INDEX idx_titles ON conversations (title test_ops);"
        " CREATE OR REPLACE FUNCTION test_cmp(text, text) RETURNS int LANGUAGE sql IMMUTABLE"
        "  AS 'SELECT bttextcmp($2, $1)'"
    )
    code, payload = run(cli, seeded, "--deep")
    assert code == 1
    assert payload["ok"] is False
    broken = one(payload, "integrity", "btree", "idx_titles")
    assert broken["status"] == "fail"
    assert "idx_titles" in broken["detail"] and "invariant" in broken["detail"]
    assert broken["fix"].startswith("REINDEX INDEX CONCURRENTLY idx_titles;")
    seeded.execute("DROP INDEX idx_titles")
    code, payload = run(cli, seeded, "--deep")
    assert code == 0 and not found(payload, "integrity", obj="idx_titles")


# --- 4. index use ------------------------------------------------------------------------------


def test_an_unused_undeclared_index_and_declared_ones(seeded, cli):
    seeded.execute("CREATE INDEX idx_extra_role ON messages (role)")
    _, payload = run(cli, seeded)
    extra = one(payload, "indexes", "index use", "idx_extra_role")
    assert extra["status"] == "warn" and extra["value"] == 0
    size = seeded.scalar("SELECT pg_size_pretty(pg_relation_size('idx_extra_role'))")
    assert "not declared in chatdb/schema.py" in extra["detail"]
    assert size.replace("bytes", "B") in extra["detail"] or "kB" in extra["detail"]
    assert extra["fix"].startswith("DROP INDEX CONCURRENTLY idx_extra_role;")
    assert "since the statistics began (never reset)" in extra["detail"]
    # A declared index never scanned: a warning naming its pattern, and never "drop it".
    history = one(payload, "indexes", "index use", "idx_messages_conversation_created")
    assert history["status"] == "warn"
    assert "history of a conversation" in history["detail"] and "keep it" in history["detail"]
    assert history["fix"] is None
    # A constraint's index is used by every write.
    assert one(payload, "indexes", "index use", "messages_pkey")["status"] == "ok"

    # Scanned: back to ok (the reset time is named once the statistics were reset).
    seeded.execute("SELECT pg_stat_reset()")
    with seeded.engine.connect() as connection:
        connection.execute(text("SET enable_seqscan = off"))
        connection.execute(text("SELECT count(*) FROM messages WHERE role = 'system'")).scalar()
    seeded.engine.dispose()  # the session reports its statistics as it ends
    wait_for(seeded, "idx_scan > 0 FROM pg_stat_all_indexes WHERE indexrelname = 'idx_extra_role'")
    _, payload = run(cli, seeded)
    extra = one(payload, "indexes", "index use", "idx_extra_role")
    assert extra["status"] == "ok" and extra["value"] >= 1
    assert "since the statistics were reset at" in extra["detail"]


# --- 6. connections, 11. long transactions ---------------------------------------------------


def test_a_session_idle_in_a_transaction(seeded, cli):
    limits = ("--threshold", "idle_in_transaction_seconds=0", "--threshold", "long_transaction_seconds=0")
    with seeded.engine.connect().execution_options(isolation_level="REPEATABLE READ") as idle:
        idle.execute(text("SET application_name = 'stuck worker'"))
        idle.commit()
        idle.execute(text("SELECT count(*) FROM messages")).scalar()  # and then nothing
        pid = idle.execute(text("SELECT pg_backend_pid()")).scalar()
        _, payload = run(cli, seeded, *limits)
        stuck = one(payload, "connections", "idle in transaction", f"pid {pid}")
        assert stuck["status"] == "warn"
        assert "stuck worker" in stuck["detail"] and "user postgres" in stuck["detail"]
        assert "holds back vacuum" in stuck["detail"]  # its snapshot
        assert stuck["fix"].startswith(f"SELECT pg_terminate_backend({pid});  -- ends that session")
        long = one(payload, "connections", "long transaction", f"pid {pid}")
        assert long["status"] == "warn" and "holds back vacuum" in long["detail"]
        idle.rollback()
    _, payload = run(cli, seeded, *limits)
    assert [c["status"] for c in found(payload, "connections", "idle in transaction")] == ["ok"]
    assert [c["status"] for c in found(payload, "connections", "long transaction")] == ["ok"]


def test_the_guard_of_a_lifecycle_run_is_named_not_blamed(seeded, cli):
    from chatdb import db, lifecycle

    engine = db.create(db.Database(seeded.url, "test"))
    guard = lifecycle.Guard(engine)
    try:
        assert guard.try_lock()
        pid = guard.connection.execute(text("SELECT pg_backend_pid()")).scalar()
        _, payload = run(cli, seeded, "--threshold", "idle_in_transaction_seconds=0")
        held = one(payload, "connections", "idle in transaction", f"pid {pid}")
        assert held["status"] == "ok" and "guard of a running chatdb" in held["detail"]
    finally:
        guard.release()
        engine.dispose()


def test_connections_in_use_and_the_longest_query(seeded, cli):
    code, payload = run(cli, seeded, "--threshold", "connections_warn=0")
    assert code == 0 and one(payload, "connections", "in use")["status"] == "warn"
    code, payload = run(cli, seeded, "--threshold", "connections_warn=0", "--threshold", "connections_fail=0")
    assert code == 1 and one(payload, "connections", "in use")["status"] == "fail"
    code, payload = run(cli, seeded)
    assert code == 0 and one(payload, "connections", "in use")["status"] == "ok"

    import threading

    sleeper = create_engine(seeded.url, connect_args={"prepare_threshold": None})

    def sleep() -> None:
        with sleeper.connect() as connection, contextlib.suppress(DBAPIError):  # cancelled below
            connection.execute(text("SELECT pg_sleep(60)"))

    thread = threading.Thread(target=sleep)
    thread.start()
    try:
        seeded.wait_for_query("SELECT pg_sleep")
        _, payload = run(cli, seeded, "--threshold", "long_query_seconds=0")
        (longest,) = found(payload, "connections", "longest query")
        assert longest["status"] == "warn" and "pg_sleep(60)" in longest["detail"]
        assert longest["fix"].startswith("SELECT pg_cancel_backend(")
        seeded.execute(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"
        )
    finally:
        thread.join(30)
        sleeper.dispose()
    _, payload = run(cli, seeded, "--threshold", "long_query_seconds=0")
    assert [c["status"] for c in found(payload, "connections", "longest query")] == ["ok"]


def test_another_sessions_query_is_shown_without_its_constants_or_passwords(seeded, cli):
    """A password in another session's running query (a role's, a dblink connection
    string's) never appears in doctor's output: its string constants show as '…', in
    every way PostgreSQL writes one."""
    import threading

    sleeper = create_engine(seeded.url, connect_args={"prepare_threshold": None})
    statement = (
        "SELECT pg_sleep(60), 'host=db password=hunter2-in-a-string',"
        " 'ALTER ROLE app PASSWORD ''hunter2-quoted''', E'it\\'s hunter2-escaped',"
        " $$hunter2-dollar-quoted$$, $pw$it's hunter2-tagged$pw$ /* password=hunter2-in-a-comment */"
    )

    def sleep() -> None:
        with sleeper.connect() as connection, contextlib.suppress(DBAPIError):  # cancelled below
            connection.execute(text(statement))

    thread = threading.Thread(target=sleep)
    thread.start()
    try:
        seeded.wait_for_query("SELECT pg_sleep")
        for args in (["--json"], []):
            result = cli("doctor", *args, "--all", "--threshold", "long_query_seconds=0",
                         "--database-url", seeded.cli_url)  # fmt: skip
            assert "hunter2" not in result.stdout + result.stderr
        _, payload = run(cli, seeded, "--threshold", "long_query_seconds=0")
        (longest,) = found(payload, "connections", "longest query")
        assert "SELECT pg_sleep(60), '…', '…', E'…', '…', '…' /*" in longest["detail"], longest["detail"]
        seeded.execute(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"
        )
    finally:
        thread.join(30)
        sleeper.dispose()


# --- 7. wraparound, 8. cache, 11. replication slots -------------------------------------------


def test_wraparound_ages_against_autovacuum_freeze_max_age(seeded, cli):
    code, payload = run(cli, seeded, "--threshold", "wraparound_ratio=0")
    assert code == 0
    database = one(payload, "wraparound", "transaction id age", seeded.name)
    assert database["status"] == "warn" and "autovacuum_freeze_max_age" in database["detail"]
    assert database["fix"].startswith("VACUUM (FREEZE, ANALYZE) ")
    assert one(payload, "wraparound", "transaction id age", "messages")["status"] == "warn"
    code, payload = run(cli, seeded, "--threshold", "wraparound_fail_age=1")
    assert code == 1 and one(payload, "wraparound", "transaction id age", "messages")["status"] == "fail"
    _, payload = run(cli, seeded)
    messages = one(payload, "wraparound", "transaction id age", "messages")
    assert messages["status"] == "ok"
    assert messages["threshold"] == int(seeded.scalar("SHOW autovacuum_freeze_max_age"))


def test_cache_hit_ratio(seeded, cli):
    trip = ("--threshold", "cache_hit_ratio=1", "--threshold", "cache_min_blocks=0")
    # The seed read index pages from disk (the template's), so not every block was a hit.
    wait_for(seeded, "sum(idx_blks_read) > 0 FROM pg_statio_all_tables WHERE relname = 'messages'")
    _, payload = run(cli, seeded, *trip)
    missed = one(payload, "cache", "index cache hit", "messages")
    assert missed["status"] == "warn" and missed["value"] < 1
    assert "not in shared_buffers" in missed["detail"]
    seeded.execute(
        "SELECT pg_stat_reset_single_table_counters(indexrelid) FROM pg_index"
        " WHERE indrelid = 'messages'::regclass"
    )
    _, payload = run(cli, seeded, *trip)
    assert one(payload, "cache", "index cache hit", "messages")["status"] == "ok"
    _, payload = run(cli, seeded)
    assert all(c["status"] == "ok" for c in found(payload, "cache"))


def test_an_inactive_replication_slot_retaining_wal(seeded, cli):
    slot = f"chatdb_test_{seeded.name[-12:]}"
    seeded.execute(f"SELECT pg_create_physical_replication_slot('{slot}', true)")
    try:
        _, payload = run(cli, seeded, "--threshold", "slot_retained_bytes=0")
        held = one(payload, "replication", "replication slot", slot)
        assert held["status"] == "warn" and "inactive" in held["detail"]
        assert held["fix"].startswith(f"SELECT pg_drop_replication_slot('{slot}');")
        _, payload = run(cli, seeded)
        assert one(payload, "replication", "replication slot", slot)["status"] == "ok"
    finally:
        seeded.execute(f"SELECT pg_drop_replication_slot('{slot}')")
    _, payload = run(cli, seeded, "--threshold", "slot_retained_bytes=0")
    assert not found(payload, "replication", "replication slot", slot)


# --- 9. growth --------------------------------------------------------------------------------

KB = 1 << 10


def test_status_and_doctor_record_sizes_run_after_run(migrated_db, cli):
    assert migrated_db.scalar("SELECT count(*) FROM chatdb_size_history") == 0
    for command in ("status", "status", "doctor"):
        result = cli(command, "--json", "--database-url", migrated_db.cli_url)
        assert result.exit_code == 0, result.output
    rows = migrated_db.scalar("SELECT count(*) FROM chatdb_size_history")
    assert rows == 3 * 8
    assert migrated_db.scalar("SELECT count(DISTINCT recorded_at) FROM chatdb_size_history") == 3
    with migrated_db.engine.connect() as connection:
        names = connection.execute(text("SELECT DISTINCT table_name FROM chatdb_size_history"))
        tables = set(names.scalars())
    assert tables == {None, "users", "conversations", "messages", "conversations_archive", "messages_archive",
                      "chatdb_runs", "chatdb_size_history"}  # fmt: skip


def test_samples_older_than_two_years_go_and_a_read_only_session_records_none(migrated_db, cli):
    """README, "Growth history": samples older than two years go when a run records one;
    a read-only standby runs status and doctor without recording. A session whose
    transactions are read-only (``default_transaction_read_only``, as every transaction
    on a hot standby is) stands for the standby."""
    migrated_db.execute(
        "INSERT INTO chatdb_size_history (recorded_at, command, table_name, row_estimate, total_bytes)"
        " SELECT now() - make_interval(days => d), 'test', 'messages', d, 8192"
        " FROM unnest(ARRAY[731, 729]) AS d"
    )
    # The samples' ages in days, as their row estimates.
    left = "SELECT array_agg(row_estimate ORDER BY 1) FROM chatdb_size_history WHERE command = 'test'"
    result = cli("status", "--json", "--database-url", migrated_db.cli_url)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["recorded"] is True
    assert migrated_db.scalar(left) == [729]  # the sample of 731 days ago went, not the one of 729
    samples = migrated_db.scalar("SELECT count(*) FROM chatdb_size_history")
    assert samples == 1 + 8

    read_only = (
        migrated_db.url.update_query_dict({"options": "-c default_transaction_read_only=on"})
        .set(drivername="postgresql")
        .render_as_string(hide_password=False)
    )
    for command in ("status", "doctor"):
        result = cli(command, "--json", "--database-url", read_only)
        assert result.exit_code == 0, (command, result.output)
        payload = json.loads(result.stdout)
        assert payload["ok"] is True and payload["recorded"] is False, (command, payload)
    assert migrated_db.scalar("SELECT count(*) FROM chatdb_size_history") == samples
    assert migrated_db.scalar(left) == [729]


def test_growth_per_day_and_week_and_the_projected_date_from_controlled_sizes(migrated_db, cli):
    """Samples 256 kB apart each day for two weeks before the one this run records (the
    real size): 256 kB per day, 1.75 MB per week, and a limit 2,560 kB above today's size
    is reached in about 10 days."""
    size = migrated_db.scalar("SELECT pg_database_size(current_database())")
    step = 256 * KB
    migrated_db.execute(
        "INSERT INTO chatdb_size_history (recorded_at, command, table_name, row_estimate, total_bytes)"
        " SELECT now() - make_interval(days => d), 'test', NULL, NULL, :size - d * :step"
        " FROM generate_series(1, 14) AS d",
        size=size,
        step=step,
    )
    # A table that shrank by 1,000 rows and 10,000 bytes a day, to what it holds now (nothing).
    migrated_db.execute(
        "INSERT INTO chatdb_size_history (recorded_at, command, table_name, row_estimate, total_bytes)"
        " SELECT now() - make_interval(days => d), 'test', 'messages', d * 1000,"
        "  pg_total_relation_size('messages') + d * 10000"
        " FROM generate_series(1, 14) AS d"
    )
    limit = size + 10 * step
    code, payload = run(cli, migrated_db, "--size-limit", f"{limit // KB}kB")
    assert code == 0
    database = one(payload, "growth", "growth", migrated_db.name)
    assert abs(database["value"] - step) < 32 * KB  # per day; the database grew a little since
    assert "/day" in database["detail"] and "/week" in database["detail"]
    projected = one(payload, "growth", "size limit", migrated_db.name)
    assert projected["status"] == "warn" and projected["threshold"] == limit // KB * KB
    assert abs(payload["growth"]["per_day"] - step) < 32 * KB
    reaches = dt.datetime.fromisoformat(payload["growth"]["reaches_limit"])
    days = (reaches - dt.datetime.fromisoformat(payload["growth"]["now"])).total_seconds() / 86400
    assert 8 <= days <= 12, days
    assert f"around {reaches:%Y-%m-%d}" in projected["detail"]
    daily = payload["growth"]["daily"]
    assert len(daily) == 14 and all(p["change"] is not None for p in daily[1:])
    assert len(payload["growth"]["weekly"]) >= 2
    messages = one(payload, "growth", "growth", "messages")
    assert messages["value"] == -10000
    assert "~0 rows (-1,000/day); -9.8 kB/day, -68.4 kB/week" in messages["detail"]

    # A limit beyond the warning horizon (90 days) is ok; one already passed fails.
    code, payload = run(cli, migrated_db, "--size-limit", f"{(size + 1000 * step) // KB}kB")
    assert code == 0 and one(payload, "growth", "size limit")["status"] == "ok"
    code, payload = run(cli, migrated_db, "--size-limit", "1MB")
    assert code == 1 and one(payload, "growth", "size limit")["status"] == "fail"
    # The chart, for people.
    shown = cli("doctor", "--size-limit", "2GB", "--database-url", migrated_db.cli_url)
    assert "Growth of the database, per day (UTC):" in shown.stdout
    assert "Growth of the database, per week:" in shown.stdout
    assert "█" in shown.stdout


def test_growth_needs_a_day_of_history(migrated_db, cli):
    # An earlier sample of today (UTC): the detail says how long samples have been kept,
    # from the first, not from the newest.
    migrated_db.execute(
        "INSERT INTO chatdb_size_history (recorded_at, command, table_name, row_estimate, total_bytes)"
        " SELECT greatest(date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',"
        "  now() - interval '30 minutes'), 'status', NULL, NULL, 1"
    )
    first_age = migrated_db.scalar(
        "SELECT extract(epoch FROM now() - min(recorded_at)) FROM chatdb_size_history"
    )
    _, payload = run(cli, migrated_db, "--size-limit", "10GB")
    database = one(payload, "growth", "growth", migrated_db.name)
    assert database["status"] == "ok" and database["value"] is None
    assert "not enough history yet" in database["detail"]
    number, unit = re.search(r"samples since (\d+) (s|min) ago", database["detail"]).groups()
    step = 60 if unit == "min" else 1
    assert float(first_age) // step * step <= int(number) * step <= float(first_age) + 120
    assert one(payload, "growth", "growth", "messages")["detail"].endswith(" now, ~0 rows")  # said once
    limit = one(payload, "growth", "size limit")
    assert limit["status"] == "ok" and "not enough history to project" in limit["detail"]


# --- 10. retention outlook ----------------------------------------------------------------------


def test_retention_outlook_now_within_7_and_30_days(migrated_db, cli):
    migrated_db.execute(
        "INSERT INTO users (id) VALUES ('u1');"
        " INSERT INTO conversations (user_id, updated_at)"
        " SELECT 'u1', now() - make_interval(days => d) FROM unnest(ARRAY[200, 190, 176, 175, 160]) AS d;"
        " INSERT INTO messages (conversation_id, user_id, role, content)"
        " SELECT id, user_id, 'user', 'hi' FROM conversations, generate_series(1, 3);"
        " ANALYZE"
    )
    _, payload = run(cli, migrated_db, "--older-than", "180d", "--deep")
    archive = one(payload, "retention", "outlook", "archive --older-than 180d")
    assert archive["value"] == 2
    assert archive["detail"].startswith(
        "due now: 2 conversations, 6 messages from the hot tables;"
        " within 7 days 4 and 12; within 30 days 5 and 15"
    )
    _, payload = run(cli, migrated_db, "--older-than", "180d")
    estimated = one(payload, "retention", "outlook", "purge --older-than 180d")
    assert "~" in estimated["detail"] and "--deep counts exactly" in estimated["detail"]

    # Without --older-than: the cutoffs of the latest runs, named.
    _, payload = run(cli, migrated_db)
    assert one(payload, "retention", "outlook")["status"] == "skipped"
    assert cli("archive", "--older-than", "185d", "--database-url", migrated_db.cli_url).exit_code == 0
    _, payload = run(cli, migrated_db, "--deep")
    run_id = migrated_db.scalar("SELECT id FROM chatdb_runs")
    after = one(payload, "retention", "outlook", f"archive --older-than 185d (as run {run_id})")
    assert after["value"] == 0 and "within 30 days 3 and 9" in after["detail"]


# --- usage and state ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, named",
    [
        (("--size-limit", "lots"), "--size-limit"),
        (("--size-limit", "0GB"), "--size-limit"),
        (("--older-than", "soon"), "--older-than"),
        (("--threshold", "nonsense=1"), "--threshold"),
        (("--threshold", "dead_ratio=2"), "--threshold"),
        (("--threshold", "dead_rows=many"), "--threshold 'dead_rows=many': 'many' is not a whole number"),
        (("--threshold", "dead_rows=1.5"), "--threshold 'dead_rows=1.5': '1.5' is not a whole number"),
        (("--threshold", "dead_ratio=x"), "--threshold 'dead_ratio=x': 'x' is not a number"),
        (("--threshold", "bloat_bytes=1XB"), "--threshold 'bloat_bytes=1XB': '1XB' is not a size"),
        (("--threshold", "dead_rows"), "--threshold"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(cli, args, named):
    result = cli("doctor", *args, "--database-url", "postgresql://nobody@127.0.0.1:1/none")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_a_database_behind_head_or_never_migrated(empty_db, cli):
    result = cli("doctor", "--database-url", empty_db.cli_url)
    assert result.exit_code == 1
    assert "no chatdb schema yet" in result.stderr
    migrations.upgrade(empty_db.engine, "0005")
    code, payload = run(cli, empty_db)
    assert code == 0
    revision = one(payload, "schema", "revision")
    assert revision["status"] == "warn" and "behind head" in revision["detail"]
    assert one(payload, "growth", "growth")["status"] == "skipped"
    assert payload["recorded"] is False


def test_help_lists_doctor_after_status_with_an_example(cli):
    listing = cli("--help").stdout
    commands = listing[listing.index("Commands") :]
    # In the order a user meets them (README, "Commands"): doctor after status and grants.
    assert commands.index("│ status") < commands.index("│ grants") < commands.index("│ doctor")
    assert commands.index("│ migrate") < commands.index("│ status")
    help_ = cli("doctor", "--help")
    assert help_.exit_code == 0 and "Example" in help_.stdout and "--threshold" in help_.stdout


def test_thresholds_parse_sizes_and_refuse_nonsense():
    limits = doctor.Thresholds().replace(["bloat_bytes=1.5GB", "dead_ratio=0.5", "dead_rows=10"])
    assert limits.bloat_bytes == 1.5 * (1 << 30) and limits.dead_ratio == 0.5 and limits.dead_rows == 10
    assert doctor.parse_size("512 MB", "--size-limit") == 512 << 20
    assert doctor.parse_size("8kB", "--size-limit") == 8192
