"""The export file of `chatdb archive --export` holds each archived conversation exactly
once whatever stops the run and whenever: a crash of the server (a real immediate
shutdown of a server of its own), SIGKILL of chatdb between the fsync of a batch's lines
and its COMMIT, the first batch into an empty file included; and a target that is not a
regular file is refused before anything starts."""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import conftest
import pytest
import servers
from conftest import scratch_folder
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool
from test_lifecycle import _OTHER, _commits_held, _exported, _start, engine_for, ids, populate, run_json

from chatdb import lifecycle, migrations

CHATDB = (sys.executable, "-m", "chatdb")


def lines_of(export: Path, start: int = 0, end: int | None = None) -> list[dict]:
    """The export's lines between two byte offsets (each batch's lines are whole lines,
    and in ``.gz`` whole gzip members)."""
    raw = export.read_bytes()[start:end]
    raw = gzip.decompress(raw) if export.name.endswith(".gz") else raw
    return [json.loads(line) for line in raw.decode().splitlines()]


def conversations_in(lines: list[dict]) -> list[uuid.UUID]:
    return [uuid.UUID(line["conversation"]["id"]) for line in lines]


def assert_exactly(db, lines: list[dict], moved: set, moved_messages: set) -> None:
    """``lines`` hold each conversation of ``moved`` once, as it is in the archive, with
    exactly the messages of ``moved_messages``."""
    exported = conversations_in(lines)
    assert len(exported) == len(set(exported)), "a conversation is in the export twice"
    assert set(exported) == moved
    assert {uuid.UUID(m["id"]) for line in lines for m in line["messages"]} == moved_messages
    rows = {
        uuid.UUID(row["id"]): row
        for row in (
            json.loads(raw)
            for raw in ids(db, "SELECT (to_jsonb(c) - 'archived_at')::text FROM conversations_archive c")
        )
    }
    assert all(rows[uuid.UUID(line["conversation"]["id"])] == line["conversation"] for line in lines)


def exactly_the_archive(db, export: Path, kept: int = 0) -> list[dict]:
    """The export's lines after its first ``kept`` ones are exactly the archive tables:
    each archived conversation once, with its messages, as it is there."""
    lines = lines_of(export)[kept:]
    archived = ids(db, "SELECT id FROM conversations_archive")
    assert_exactly(db, lines, archived, ids(db, "SELECT id FROM messages_archive"))
    return lines


def last_run(db) -> dict:
    return db.scalar("SELECT to_jsonb(r) FROM chatdb_runs r ORDER BY id DESC LIMIT 1")


# --- a server of its own, to crash ------------------------------------------------------------------


def need(make):
    """Start a part, or skip (fail in CI) with the reason it cannot be had."""
    try:
        return make()
    except servers.Unavailable as missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run every crash test: {missing}")
        pytest.skip(str(missing))


def _engine(server: servers.DebianPostgres, database: str = "postgres", **options) -> Engine:
    url = server.socket_url(database).replace("postgresql://", "postgresql+psycopg://")
    return create_engine(url, **options)


def _admin(server: servers.DebianPostgres, sql: str) -> None:
    """One statement, outside a transaction, on a connection of its own (the server may
    have crashed since the last one)."""
    engine = _engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text(sql))
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def crash_server() -> Iterator[servers.DebianPostgres]:
    """A PostgreSQL that the tests crash (`pg_ctl stop -m immediate`): the suite's own
    server is shared by every test. Its WAL writer waits 10 s between rounds, so that a
    transaction committed with synchronous_commit = off is surely lost by a crash that
    follows at once (with the default 200 ms it is lost mostly, not always)."""
    with ExitStack() as stack:
        folder = stack.enter_context(scratch_folder("chatdb-test-crash-"))
        server = need(lambda: stack.enter_context(servers.debian_postgres(folder)))
        _admin(server, "ALTER SYSTEM SET wal_writer_delay = '10s'")
        _admin(server, "SELECT pg_reload_conf()")
        _admin(server, "CREATE DATABASE crash_template")
        engine = _engine(server, "crash_template")
        try:
            migrations.upgrade(engine)
        finally:
            engine.dispose()
        yield server


_crash_dbs = itertools.count()


@pytest.fixture
def crash_db(crash_server) -> Iterator[conftest.TestDatabase]:
    """A fresh database at head on the server the test crashes."""
    name = f"crash_{next(_crash_dbs)}"
    _admin(crash_server, f'CREATE DATABASE "{name}" TEMPLATE crash_template')
    engine = _engine(crash_server, name, connect_args={"prepare_threshold": None})
    try:
        yield conftest.TestDatabase(name, engine.url, engine)
    finally:
        engine.dispose()
        if not (crash_server.data / "postmaster.pid").exists():
            crash_server.start()  # the test failed while the server was down
        _admin(crash_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def crash(server: servers.DebianPostgres) -> None:
    """An immediate shutdown: the server's processes quit at once, writing nothing on the
    way out, as in a crash."""
    server.pg_ctl("-m", "immediate", "-w", "stop")


def recover(server: servers.DebianPostgres, db: conftest.TestDatabase) -> None:
    """Start the crashed server (it recovers from its WAL) and wait until it accepts."""
    db.engine.dispose()
    server.start()
    servers.wait_until_accepting(server.socket_url())


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_a_server_crash_after_the_first_batch_committed_leaves_each_conversation_once(
    cli, crash_server, crash_db, tmp_path, suffix
):
    """The server crashes right after the first batch into an empty export committed and
    was acknowledged. What chatdb was told is committed stays committed, so the file
    and the archive agree, and the rerun appends each remaining conversation once."""
    db = crash_db
    populate(db)
    db.execute("DELETE FROM conversations_archive")
    export = tmp_path / f"archive{suffix}"
    crashed: list[int] = []

    def crash_after_first_batch(done: lifecycle.Tally) -> None:
        if not crashed:
            crashed.append(done.conversations)
            crash(crash_server)

    engine = engine_for(db)
    try:
        plan = lifecycle.plan_archive(engine, lifecycle.parse_duration("60d"))
        options = lifecycle.RunOptions(jobs=1, progress=crash_after_first_batch)
        with pytest.raises(DBAPIError):
            lifecycle.archive(engine, plan, options, export)
    finally:
        engine.dispose()
    recover(crash_server, db)

    assert crashed == [lifecycle.FIRST_BATCH_SIZE]
    # Acknowledged, so committed: the first batch survived the crash, and its lines.
    assert len(ids(db, "SELECT id FROM conversations_archive")) == lifecycle.FIRST_BATCH_SIZE
    assert len(exactly_the_archive(db, export)) == lifecycle.FIRST_BATCH_SIZE

    out = run_json(cli, db, "archive", "--older-than", "60d", "--export", str(export))
    lines = exactly_the_archive(db, export)
    assert len(lines) == lifecycle.FIRST_BATCH_SIZE + out["exported"]
    assert not db.scalar(
        "SELECT count(*) FROM conversations WHERE updated_at < :c AND deleted_at IS NULL", c=out["cutoff"]
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_a_server_crash_during_the_commit_of_the_first_batch_leaves_each_conversation_once(
    cli, crash_server, crash_db, tmp_path, suffix
):
    """The server crashes after the first batch's lines reached an empty export file and
    before its COMMIT took effect: the batch is not archived, chatdb cannot learn it
    (its server is gone), and the rerun cuts those lines off before it appends."""
    db = crash_db
    populate(db)
    db.execute("DELETE FROM conversations_archive")
    export = tmp_path / f"archive{suffix}"
    # The first batch waits in its COMMIT (a deferred trigger waits for a lock the test holds).
    holding = ExitStack()
    held, _ = holding.enter_context(_commits_held(db))
    process = _start(db, "archive", "--older-than", "60d", "--export", str(export))
    held(process)
    assert len(_exported(export)) == lifecycle.FIRST_BATCH_SIZE  # fsynced before the COMMIT
    crash(crash_server)
    _, stderr = process.communicate(timeout=60)
    with contextlib.suppress(DBAPIError):
        holding.close()  # its connection died with the server
    assert process.returncode != 0 and "Traceback" not in stderr, stderr
    recover(crash_server, db)
    db.execute("DROP TRIGGER held_at_commit ON conversations_archive")

    assert not ids(db, "SELECT id FROM conversations_archive")
    assert last_run(db)["counts"]["export_bytes"] == 0
    assert len(_exported(export)) == lifecycle.FIRST_BATCH_SIZE  # lines of a batch that never committed

    out = run_json(cli, db, "archive", "--older-than", "60d", "--export", str(export))
    assert len(exactly_the_archive(db, export)) == out["exported"] > lifecycle.FIRST_BATCH_SIZE


# --- SIGKILL of chatdb between the fsync and the COMMIT --------------------------------------------


def _killed_at_the_first_commit(db, export: Path) -> list[uuid.UUID]:
    """Start an archive into ``export``, SIGKILL it once its first batch's lines are in the
    file and its COMMIT waits, and end that COMMIT's session as the server would end it.
    Returns the conversations of the batch, none of them archived."""
    archived = ids(db, "SELECT id FROM conversations_archive")
    with _commits_held(db) as (held, release):
        process = _start(db, "archive", "--older-than", "60d", "--export", str(export))
        backend = held(process)
        written = _exported(export)
        process.kill()
        process.wait()
        assert db.scalar("SELECT pg_terminate_backend(:p)", p=backend)
        release()
    deadline = time.monotonic() + 30
    while db.scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = :p", p=backend):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    db.execute("DROP TRIGGER held_at_commit ON conversations_archive")
    assert written and ids(db, "SELECT id FROM conversations_archive") == archived
    return written


@pytest.mark.parametrize(
    "suffix, then",
    [
        (".jsonl", "left as it is"),
        (".jsonl.gz", "left as it is"),
        (".jsonl", "write cut short"),
        (".jsonl.gz", "write cut short"),
        (".jsonl", "replaced in place"),
        (".jsonl", "rotated"),
    ],
)
def test_sigkill_between_the_fsync_and_the_commit_of_the_first_batch(
    cli, migrated_db, tmp_path, suffix, then
):
    """The first batch into a new export file was fsynced, then chatdb was killed before
    its COMMIT. The rerun cuts those lines off (all of them, or what a write cut short
    left), and appends each conversation once. A file that is no longer the one the run
    wrote (replaced with other lines, or rotated away and a new one begun) is never cut."""
    db = migrated_db
    populate(db)
    db.execute("DELETE FROM conversations_archive")
    export = tmp_path / f"a{suffix}"
    written = _killed_at_the_first_commit(db, export)
    assert len(written) == lifecycle.FIRST_BATCH_SIZE
    kept = 0
    if then == "write cut short":
        with export.open("r+b") as file:
            file.truncate(export.stat().st_size // 2)
    elif then == "replaced in place":
        inode = export.stat().st_ino
        export.write_bytes(_OTHER * 3)
        assert export.stat().st_ino == inode
        kept = 3
    elif then == "rotated":
        rotated = export.with_name(f"rotated{suffix}")
        export.rename(rotated)
        before = rotated.read_bytes()
        export.write_bytes(_OTHER * 2)
        kept = 2

    out = run_json(cli, db, "archive", "--older-than", "60d", "--export", str(export))
    lines = exactly_the_archive(db, export, kept=kept)
    assert len(lines) == out["exported"] > len(written)
    if kept:
        assert export.read_bytes().startswith(_OTHER * kept)
    if then == "rotated":
        assert rotated.read_bytes() == before


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry run"])
def test_lines_after_those_of_a_batch_that_never_committed_are_never_cut(cli, migrated_db, tmp_path, dry_run):
    """Something appended after the lines of a batch that never committed: cutting those
    lines would cut it too, so the run refuses, before it starts, saying where they are;
    a dry run refuses it the same way."""
    db = migrated_db
    populate(db)
    export = tmp_path / "a.jsonl"
    _killed_at_the_first_commit(db, export)
    archived = ids(db, "SELECT id FROM conversations_archive")
    with export.open("ab") as file:
        file.write(_OTHER)
    before = export.read_bytes()
    result = cli(
        "archive",
        "--older-than",
        "60d",
        "--export",
        str(export),
        "--database-url",
        db.cli_url,
        *(["--dry-run"] if dry_run else []),
    )
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "never committed" in errors[0], result.stderr
    assert f"bytes 0 to {len(before) - len(_OTHER):,}" in errors[0]
    assert export.read_bytes() == before
    assert ids(db, "SELECT id FROM conversations_archive") == archived
    assert db.scalar("SELECT count(*) FROM chatdb_runs") == 1  # the killed run's


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry run"])
def test_an_export_file_with_damaged_gzip_data_is_refused_before_anything_moves(
    cli, migrated_db, tmp_path, dry_run
):
    """chatdb appends only to an intact file; a dry run reads the file as the run would
    and refuses it the same way, rather than promise a run that will not start."""
    db = migrated_db
    populate(db)
    export = tmp_path / "a.jsonl.gz"
    raw = bytearray(gzip.compress(_OTHER, mtime=0) * 2)
    raw[12:20] = b"\xff" * 8  # inside the first member's deflate data
    export.write_bytes(bytes(raw))
    hot = ids(db, "SELECT id FROM conversations")
    args = ("archive", "--older-than", "60d", "--export", str(export), "--database-url", db.cli_url)
    result = cli(*args, *(["--dry-run"] if dry_run else []))
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: --export {export}: the gzip data after byte 0 is damaged;"
        " chatdb appends only to an intact file"
    ], result.stderr
    assert export.read_bytes() == bytes(raw)
    assert ids(db, "SELECT id FROM conversations") == hot
    assert db.scalar("SELECT count(*) FROM chatdb_runs") == 0


# --- targets that are not regular files ----------------------------------------------------------


def _chatdb(db, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CHATDB, *args, "--database-url", db.cli_url], capture_output=True, text=True, timeout=60, **kwargs
    )


def _one_error(process: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in process.stderr, process.stderr
    errors = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, process.stderr
    return errors[0]


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink to /dev/full", "in no folder"])
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry run"])
def test_an_export_target_that_is_not_a_regular_file_is_refused_before_anything_starts(
    migrated_db, tmp_path, kind, dry_run
):
    db = migrated_db
    populate(db)
    before = ids(db, "SELECT id FROM conversations")
    target = tmp_path / "archive.jsonl"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    elif kind == "in no folder":
        target = tmp_path / "missing" / "archive.jsonl"
    else:
        target.symlink_to("/dev/full")
    process = _chatdb(
        db,
        "archive",
        "--older-than",
        "60d",
        "--export",
        str(target),
        "--yes",
        *(["--dry-run"] if dry_run else []),
    )
    assert process.returncode == 2, process.stderr
    error = _one_error(process)
    assert str(target) in error or target.name in error, error
    if kind == "in no folder":
        assert error.endswith(f"{target.parent} does not exist"), error
    else:
        assert "regular file" in error or "directory" in error, error
    # Nothing started: no guard taken, no audit row, nothing moved.
    assert db.scalar("SELECT count(*) FROM chatdb_runs") == 0
    assert ids(db, "SELECT id FROM conversations") == before


def test_a_symlink_to_a_regular_file_is_a_fine_export_target(cli, migrated_db, tmp_path):
    db = migrated_db
    populate(db)
    db.execute("DELETE FROM conversations_archive")
    real = tmp_path / "real.jsonl"
    real.write_bytes(b"")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    out = run_json(cli, db, "archive", "--older-than", "60d", "--export", str(link))
    assert len(exactly_the_archive(db, real)) == out["exported"] > 0


def test_a_write_error_is_reported_even_when_cutting_the_batch_off_fails_too(cli, migrated_db, tmp_path):
    """The file cannot grow (the file size limit fails a write as a full disk does) and
    cannot be cut back either (append-only, as a file system gone read-only after an
    error would refuse): the error reported is the write's. The next run, once the file
    can be written, cuts the batch that failed off and the file is exact."""
    db = migrated_db
    populate(db)
    db.execute("DELETE FROM conversations_archive")
    export = tmp_path / "archive.jsonl"
    export.write_bytes(b"")
    if subprocess.run(["chattr", "+a", str(export)], capture_output=True).returncode != 0:
        pytest.skip("chattr +a is not available here (it needs root and a file system that has it)")
    try:
        process = _chatdb(
            db,
            "archive",
            "--older-than",
            "60d",
            "--batch-size",
            "5",
            "--export",
            str(export),
            # CPython ignores SIGXFSZ: a write past the limit fails with EFBIG.
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)),
        )
    finally:
        subprocess.run(["chattr", "-a", str(export)], check=True)
    assert process.returncode == 1, process.stderr
    assert _one_error(process) == f"error: cannot write --export {export}: File too large"
    run = last_run(db)
    assert run["outcome"] == "failed" and run["counts"]["export_bytes"] < export.stat().st_size
    assert len(ids(db, "SELECT id FROM conversations_archive")) == run["counts"]["exported"] > 0

    out = run_json(cli, db, "archive", "--older-than", "60d", "--export", str(export))
    assert len(exactly_the_archive(db, export)) == run["counts"]["exported"] + out["exported"]
