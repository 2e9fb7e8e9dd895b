"""`chatdb archive`, `archive restore` and `purge` as a user meets them: numbers in other
scripts' digits are bad input, a signal that comes after the last batch but before the
run records its outcome stops it, and one that comes once the run records its outcome
changes nothing (up to the process's exit), restore says what it restored (and refuses a
user who does not exist), the summaries' words agree with their counts, off a terminal
the plan is not counted, a lock conflict that outlasts the retries ends the run in one
line, and a run stopped by --max-runtime does not vacuum."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TestDatabase as Database
from sqlalchemy import create_engine, text

from chatdb import lifecycle
from chatdb.errors import UsageError

IDLE = 3  # idle conversations of user u1, two messages each


def populate(db, idle: int = IDLE) -> None:
    """User u1 with ``idle`` conversations idle for 200 days and more, two messages each,
    and a user with no conversations at all."""
    db.execute(
        "INSERT INTO users (id, email) VALUES ('u1', 'u1@example.com'), ('app-only', 'app@example.com')"
    )
    db.execute(
        "INSERT INTO conversations (user_id, title, created_at, updated_at)"
        " SELECT 'u1', 'chat ' || g, now() - interval '300 days', now() - make_interval(days => 200 + g)"
        " FROM generate_series(1, :n) g",
        n=idle,
    )
    db.execute(
        "INSERT INTO messages (conversation_id, user_id, role, content, created_at)"
        " SELECT c.id, c.user_id, 'user', 'hello ' || k, c.created_at"
        " FROM conversations c, generate_series(1, 2) k"
    )


def rows(db) -> dict[str, int]:
    return {
        table: db.scalar(f"SELECT count(*) FROM {table}")
        for table in ("conversations", "messages", "conversations_archive", "messages_archive")
    }


def one_error(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    return errors[0]


def chatdb(db, *args: str, **options) -> subprocess.Popen:
    """The console script in a process of its own (usage errors Typer reports go through
    it as they do for a user)."""
    return subprocess.Popen(
        [sys.executable, "-m", "chatdb", *args, "--database-url", db.cli_url],
        stdout=options.pop("stdout", subprocess.PIPE),
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        **options,
    )


# --- item: numbers are written in ASCII digits -------------------------------------------------

ARABIC_INDIC_90 = "\u0669\u0660"
FULLWIDTH_90 = "\uff19\uff10"
ARABIC_INDIC_12 = "\u0661\u0662"
ARABIC_INDIC_UUID = "-".join("\u0660" * n for n in (8, 4, 4, 4, 12))


@pytest.mark.parametrize(
    "args, option",
    [
        (("purge", "--older-than", f"{ARABIC_INDIC_90}d"), "--older-than"),
        (("purge", "--older-than", f"{FULLWIDTH_90}d"), "--older-than"),
        (("archive", "--older-than", f"1d{ARABIC_INDIC_12}h"), "--older-than"),
        (("purge", "--older-than", "90d", "--deleted-grace", f"{ARABIC_INDIC_90}d"), "--deleted-grace"),
        (("archive", "--older-than", "90d", "--max-runtime", f"{FULLWIDTH_90}m"), "--max-runtime"),
        (("purge", "--older-than", "90d", "--batch-size", ARABIC_INDIC_90), "--batch-size"),
        (("archive", "--older-than", "90d", "--jobs", FULLWIDTH_90[:1]), "--jobs"),
        (("archive", "restore", "--conversation", ARABIC_INDIC_UUID), "--conversation"),
        (("archive", "restore", "--conversation", "0000_000-0000-0000-0000-000000000001"), "--conversation"),
        (("archive", "restore", "--conversation", " 0000000-0000-0000-0000-000000000001"), "--conversation"),
    ],
)
def test_numbers_in_other_digits_are_bad_input(migrated_db, args, option):
    """Python reads Arabic-Indic or fullwidth digits as digits (int() makes 90 of them): a
    duration, a count or an id written so is refused with exit 2, and nothing runs."""
    db = migrated_db
    populate(db)
    before = rows(db)
    process = chatdb(db, *args)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2, stderr
    assert option in one_error(stderr)
    assert rows(db) == before
    assert db.scalar("SELECT count(*) FROM chatdb_runs") == 0


@pytest.mark.parametrize(
    "raw", [f"{ARABIC_INDIC_90}d", f"{FULLWIDTH_90}d", f"1d{ARABIC_INDIC_12}h", f"9{FULLWIDTH_90[1]}d"]
)
def test_the_duration_parser_takes_ascii_digits_only(raw):
    with pytest.raises(UsageError):
        lifecycle.parse_duration(raw, "--older-than")


def test_the_usual_spellings_of_a_conversation_id_still_work(cli, migrated_db):
    db = migrated_db
    populate(db)
    assert cli("archive", "--older-than", "100d", "--database-url", db.cli_url).exit_code == 0
    archived = sorted(
        str(i) for i in db.engine.connect().execute(text("SELECT id FROM conversations_archive")).scalars()
    )
    spellings = [archived[0].upper(), "{" + archived[1] + "}", archived[2].replace("-", "")]
    result = cli(
        "archive", "restore", *[a for s in spellings for a in ("--conversation", s)], "--json",
        "--database-url", db.cli_url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["done"]["conversations"] == IDLE


# --- item: a signal after the run recorded its outcome --------------------------------------------

_WRITE = {"x86_64": "1", "aarch64": "64"}.get(platform.machine())  # write(2)'s system call number


def _writing_to_stdout(pid: int) -> bool:
    """Whether the process is asleep in write(2) on its standard output."""
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return fields[:2] == [_WRITE, "0x1"]


@pytest.mark.skipif(
    _WRITE is None or not Path(f"/proc/{os.getpid()}/syscall").exists(),
    reason="needs Linux's /proc/PID/syscall on x86_64 or aarch64",
)
@pytest.mark.parametrize("signum, args", [(signal.SIGINT, ("--json",)), (signal.SIGTERM, ())])
def test_a_signal_after_the_outcome_is_recorded_changes_nothing(migrated_db, signum, args):
    """The run's work committed and its audit row says `succeeded`; the process is held as
    it prints its summary (its stdout is a full pipe), and a signal comes then. It prints
    its summary and exits 0, as the audit row says (it exited 130 or 143)."""
    db = migrated_db
    populate(db)
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    filler = b"x" * fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
    os.write(write_end, filler)  # the pipe is full: the first write to stdout waits
    try:
        process = chatdb(db, "purge", "--older-than", "90d", *args, stdout=write_end)
    finally:
        os.close(write_end)
    received: list[bytes] = []

    def drain() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            received.append(pipe.read())

    try:
        deadline = time.monotonic() + 60
        while db.scalar("SELECT count(*) FROM chatdb_runs WHERE outcome = 'succeeded'") == 0:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run did not record its outcome"
            time.sleep(0.02)
        while not _writing_to_stdout(process.pid):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the process never wrote its summary"
            time.sleep(0.02)
        process.send_signal(signum)
    finally:
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        _, stderr = process.communicate(timeout=60)
        reader.join(60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    output = received[0].removeprefix(filler).decode()
    if "--json" in args:
        summary = json.loads(output)
        assert summary["ok"] and summary["outcome"] == "succeeded"
        assert summary["done"]["conversations"] == IDLE
    else:
        assert "Run " in output and "deleted" in output, output
    assert db.scalar("SELECT outcome FROM chatdb_runs") == "succeeded"


# --- item: a signal just before or just after the run records its outcome --------------------------

#: The advisory lock that holds a run where a test wants it (see ``_held_at``).
HOLD = 4343


def _held_at(db, what: str) -> None:
    """Hold a run at the point ``what``, while a session of the test holds the advisory
    lock HOLD: "recording" holds the UPDATE that records the run's outcome (a trigger on
    chatdb_runs waits for the lock, whatever lock_timeout the run set); "commit" holds an
    archive batch at its COMMIT (a deferred trigger on conversations_archive)."""
    db.execute(
        "CREATE FUNCTION held() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN PERFORM set_config('lock_timeout', '0', true);"
        f" PERFORM pg_advisory_xact_lock_shared({HOLD}); RETURN NEW; END $$"
    )
    if what == "recording":
        db.execute(
            "CREATE TRIGGER held BEFORE UPDATE OF outcome ON chatdb_runs FOR EACH ROW"
            " WHEN (OLD.outcome = 'running' AND NEW.outcome <> 'running') EXECUTE FUNCTION held()"
        )
    else:
        db.execute(
            "CREATE CONSTRAINT TRIGGER held AFTER INSERT ON conversations_archive"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION held()"
        )


def _waiting(db, process: subprocess.Popen, condition: str) -> None:
    """Wait until a session of this database waits for a lock as ``condition`` (on
    pg_locks) says. (The server's other databases, copies of one template, have tables of
    the same oids, and other tests take advisory locks there.)"""
    deadline = time.monotonic() + 60
    while not db.scalar(
        "SELECT count(*) FROM pg_locks WHERE NOT granted"
        f" AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND {condition}"
    ):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"nothing waited for a lock ({condition})"
        time.sleep(0.02)


def _acknowledged(process: subprocess.Popen) -> None:
    """Read stderr until the run says it will stop: its handler has run."""
    assert process.stderr is not None
    for line in process.stderr:
        if "stopping after the current batch" in line:
            return
    raise AssertionError("the signal was not acknowledged")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_after_the_last_batch_before_the_outcome_is_recorded_stops_the_run(
    migrated_db, signum, code
):
    """The run's one batch commits, and the run is held as it checks that nothing is left
    (a session of the test holds conversations ACCESS EXCLUSIVE). A signal then comes
    before the outcome is recorded: the run stops as after any batch, its audit row says
    `interrupted`, its summary is printed whole and it exits 143 or 130 (it recorded
    `succeeded` and exited 0, though it had said it was stopping)."""
    db = migrated_db
    populate(db)
    _held_at(db, "commit")
    holder = db.engine.connect()
    holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": HOLD})
    table = db.engine.connect()
    process = chatdb(db, "archive", "--older-than", "100d", "--jobs", "1", "--json")
    try:
        _waiting(db, process, f"locktype = 'advisory' AND objid = {HOLD}")  # the batch, at COMMIT
        # Queued behind the batch: once the batch commits, the run's next read of
        # conversations waits for this session.
        locking = threading.Thread(
            target=table.execute, args=(text("LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE"),)
        )
        locking.start()
        _waiting(db, process, "relation = 'conversations'::regclass AND mode = 'AccessExclusiveLock'")
        holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": HOLD})
        locking.join(60)
        _waiting(db, process, "relation = 'conversations'::regclass AND mode = 'AccessShareLock'")
        assert db.scalar("SELECT counts->>'conversations' FROM chatdb_runs") == str(IDLE)
        process.send_signal(signum)
        _acknowledged(process)
        table.rollback()
        stdout, stderr = process.communicate(timeout=60)
    finally:
        table.close()
        holder.close()
        if process.poll() is None:
            process.kill()
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    summary = json.loads(stdout)
    assert (summary["ok"], summary["outcome"], summary["stopped_by"], summary["complete"]) == (
        False, "interrupted", "terminated" if signum == signal.SIGTERM else "interrupted", False,
    )  # fmt: skip
    assert summary["done"]["conversations"] == IDLE
    assert summary["remaining"]["conversations"] == 0
    assert db.scalar("SELECT outcome FROM chatdb_runs") == "interrupted"


def test_a_signal_while_the_run_records_its_outcome_changes_nothing(migrated_db):
    """The run has done its work and is held in the UPDATE that records `succeeded`. A
    SIGTERM then changes nothing: no word of stopping, the summary whole, exit 0 (it said
    it was stopping after the current batch, and went on)."""
    db = migrated_db
    populate(db)
    _held_at(db, "recording")
    holder = db.engine.connect()
    holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": HOLD})
    process = chatdb(db, "archive", "--older-than", "100d", "--jobs", "1", "--json")
    try:
        _waiting(db, process, f"locktype = 'advisory' AND objid = {HOLD}")
        process.send_signal(signal.SIGTERM)
        holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": HOLD})
        stdout, stderr = process.communicate(timeout=60)
    finally:
        holder.close()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "stopping" not in stderr and "Traceback" not in stderr
    summary = json.loads(stdout)
    assert (summary["ok"], summary["outcome"], summary["complete"]) == (True, "succeeded", True)
    assert summary["done"]["conversations"] == IDLE
    assert db.scalar("SELECT outcome FROM chatdb_runs") == "succeeded"


def _lock_file_open(pid: int, lock_file: Path) -> bool:
    """Whether the process has ``lock_file`` open (it is taking that file's lock)."""
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for descriptor in descriptors:
        try:
            if Path(os.readlink(descriptor)) == lock_file.resolve():
                return True
        except OSError:
            continue
    return False


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/fd").is_dir(), reason="needs Linux's /proc/PID/fd")
def test_a_signal_as_chatdb_exits_after_the_run_changes_nothing():
    """On the embedded database, chatdb's last step is the embedded server's hook at exit,
    which takes a file lock and rewrites the list of the server's clients. A SIGTERM that
    comes there, after the summary, changes nothing: exit 0, the summary whole, the list
    intact (chatdb was killed there, exit 143, and a kill in the middle of the rewrite
    left an empty list that every later command failed to read)."""
    import fasteners

    home = Path(os.environ["CHATDB_HOME"])  # conftest's: its teardown stops the server
    # Where the embedded server's lock file goes: a runtime folder as XDG wants it (the
    # user's own, mode 0700), else it is /tmp's, shared with every other run.
    runtime = home.parent / "runtime"
    runtime.mkdir(mode=0o700)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "CHATDB_DATABASE_URL", "PGPASSWORD", "PGSERVICE")
    }
    env |= {"XDG_RUNTIME_DIR": str(runtime), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "chatdb"]
    migrate = subprocess.run([*command, "migrate"], env=env, capture_output=True, text=True, timeout=180)
    assert migrate.returncode == 0, migrate.stderr
    url = subprocess.run([*command, "embedded", "url"], env=env, capture_output=True, text=True, timeout=60)
    assert url.returncode == 0, url.stderr
    engine = create_engine(url.stdout.strip().replace("postgresql://", "postgresql+psycopg://", 1))
    db = Database("chatdb", engine.url, engine)
    lock_file = runtime / "python_PostgresServer" / ".lockfile"
    clients = home / "pgdata" / ".handle_pids.json"
    exit_lock = fasteners.InterProcessLock(str(lock_file))
    process: subprocess.Popen | None = None
    try:
        populate(db)
        _held_at(db, "recording")
        holder = engine.connect()
        holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": HOLD})
        process = subprocess.Popen(
            [*command, "archive", "--older-than", "100d", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _waiting(db, process, f"locktype = 'advisory' AND objid = {HOLD}")
            # The run started the embedded server's handle long ago; its exit will wait
            # for this lock.
            assert exit_lock.acquire(timeout=60)
            holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": HOLD})
            deadline = time.monotonic() + 60
            while not _lock_file_open(process.pid, lock_file):
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "chatdb never reached the server's hook at exit"
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
        finally:
            if exit_lock.acquired:
                exit_lock.release()
            holder.close()
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        assert "Traceback" not in stderr
        summary = json.loads(stdout)
        assert (summary["ok"], summary["outcome"]) == (True, "succeeded")
        assert summary["done"]["conversations"] == IDLE
        assert db.scalar("SELECT outcome FROM chatdb_runs") == "succeeded"
        assert isinstance(json.loads(clients.read_text()), list)
        after = subprocess.run(
            [*command, "status", "--json"], env=env, capture_output=True, text=True, timeout=60
        )
        assert after.returncode == 0, after.stderr
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        engine.dispose()


def test_a_run_in_process_gets_its_signal_handlers_back(cli, migrated_db):
    """Only the console script ignores signals to its exit once the run is over: a program
    that runs the command in its own process (here Typer's runner) finds its handlers as
    they were."""
    db = migrated_db
    populate(db)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    result = cli("archive", "--older-than", "100d", "--json", "--database-url", db.cli_url)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outcome"] == "succeeded"
    assert {signum: signal.getsignal(signum) for signum in before} == before


# --- item: archive restore ---------------------------------------------------------------------------


def test_restore_of_a_user_who_does_not_exist_is_an_error(cli, migrated_db):
    db = migrated_db
    populate(db)
    assert cli("archive", "--older-than", "100d", "--database-url", db.cli_url).exit_code == 0
    before = rows(db)
    result = cli("archive", "restore", "--user", "no-such-user", "--database-url", db.cli_url)
    assert result.exit_code == 1, result.output
    assert "'no-such-user'" in one_error(result.stderr)
    assert len(result.stderr.splitlines()) == 1, result.stderr
    as_json = cli("archive", "restore", "--user", "no-such-user", "--json", "--database-url", db.cli_url)
    assert as_json.exit_code == 1
    error = json.loads(as_json.stdout)
    assert error["ok"] is False and error["exit_code"] == 1 and "'no-such-user'" in error["error"]
    assert rows(db) == before
    assert db.scalar("SELECT count(*) FROM chatdb_runs WHERE command = 'archive restore'") == 0


def test_restore_of_a_user_with_nothing_archived_says_so(cli, migrated_db):
    db = migrated_db
    populate(db)
    result = cli("archive", "restore", "--user", "app-only", "--database-url", db.cli_url)
    assert result.exit_code == 0, result.output
    assert result.stdout == "Nothing to restore: user 'app-only' has no conversations in the archive.\n"
    as_json = cli("archive", "restore", "--user", "app-only", "--json", "--database-url", db.cli_url)
    assert as_json.exit_code == 0, as_json.output
    summary = json.loads(as_json.stdout)
    assert summary["ok"] and summary["done"] == {"conversations": 0, "messages": 0}


def test_restore_json_counts_what_was_restored(cli, migrated_db):
    """A script reading `done.conversations` learns how many conversations came back."""
    db = migrated_db
    populate(db)
    assert cli("archive", "--older-than", "100d", "--database-url", db.cli_url).exit_code == 0
    result = cli("archive", "restore", "--user", "u1", "--json", "--database-url", db.cli_url)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["done"] == {"conversations": IDLE, "messages": 2 * IDLE}
    assert summary["planned"] == {"conversations": IDLE, "messages": 2 * IDLE}
    assert rows(db)["conversations"] == IDLE and rows(db)["conversations_archive"] == 0
    # README: restore's --json gives run_id, outcome, complete, stopped_by, batches too.
    run_id = db.scalar("SELECT id FROM chatdb_runs WHERE command = 'archive restore'")
    assert (summary["run_id"], summary["outcome"], summary["complete"], summary["stopped_by"]) == (
        run_id, "succeeded", True, None,
    )  # fmt: skip
    assert type(summary["batches"]) is int and 1 <= summary["batches"] <= IDLE


# --- item: polish ------------------------------------------------------------------------------------


def test_counts_agree_with_their_words(cli, migrated_db, tmp_path):
    db = migrated_db
    populate(db, idle=1)
    url = ("--database-url", db.cli_url)
    archived = cli("archive", "--older-than", "100d", "--export", str(tmp_path / "a.jsonl"), *url)
    assert archived.exit_code == 0, archived.output
    assert "1 batch in " in archived.stdout and "; 1 conversation exported." in archived.stdout
    # README: the summary reports the longest transaction and how many took over 250 ms.
    assert re.search(r"longest transaction \d+ ms, [01] over 250 ms;", archived.stdout), archived.stdout
    conversation = str(db.scalar("SELECT id FROM conversations_archive"))
    restored = cli("archive", "restore", "--conversation", conversation, *url)
    assert restored.exit_code == 0, restored.output
    assert "1 batch in " in restored.stdout
    again = cli("archive", "restore", "--conversation", conversation, *url)
    assert again.exit_code == 0, again.output
    assert "0 batches in " in again.stdout
    assert "1 of the given conversations was already in the hot tables." in again.stdout
    nowhere = cli("archive", "restore", "--conversation", "00000000-0000-0000-0000-000000000001", *url)
    assert nowhere.exit_code == 1
    assert "1 of the given conversations is in neither" in one_error(nowhere.stderr)


@pytest.mark.parametrize("command", [("archive",), ("purge",)])
def test_off_a_terminal_the_plan_is_not_counted(cli, migrated_db, command):
    """README: counting the plan costs a scan, so off a terminal, without a question or a
    progress bar, `planned` is null; `remaining` is null for a run that went to the end.
    The transactions' figures are there all the same."""
    db = migrated_db
    populate(db)
    result = cli(*command, "--older-than", "100d", "--json", "--database-url", db.cli_url)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["planned"] is None and summary["remaining"] is None, summary
    assert summary["done"]["conversations"] == IDLE and summary["complete"] is True
    longest, slow, batches = (
        summary["longest_transaction_seconds"], summary["slow_transactions"], summary["batches"],
    )  # fmt: skip
    assert type(longest) is float and longest > 0 and type(slow) is int and type(batches) is int
    assert 0 <= slow <= batches and (slow == 0 or longest >= 0.25), summary
    dry = cli(*command, "--older-than", "100d", "--dry-run", "--json", "--database-url", db.cli_url)
    assert json.loads(dry.stdout)["planned"]["conversations"] == 0  # a dry run counts


@pytest.mark.parametrize("command", [("purge",), ("archive", "restore")])
def test_help_describes_only_the_commands_own_options(cli, command):
    """--export is archive's: the --jobs help of purge and restore does not mention it."""
    result = cli(*command, "--help")
    assert result.exit_code == 0
    assert "--jobs" in result.stdout and "--export" not in result.stdout
    archive = " ".join(cli("archive", "--help").stdout.replace("│", " ").split())
    assert "its own connection (an --export runs one at a time)" in archive


@pytest.mark.parametrize(
    "heartbeat, age",
    [
        ("now() + interval '30 s'", "last heartbeat 0 s ago"),
        ("now() - interval '3 hours'", "3 h ago (stalled?)"),
    ],
)
def test_a_refused_run_names_a_sane_heartbeat_age(cli, migrated_db, heartbeat, age):
    """The holder's heartbeat may be stamped after the refused run's clock (its
    transaction started first, or the clock stepped): the age is never negative."""
    db = migrated_db
    holder = db.engine.connect()
    try:
        # The guard, held as a run holds it, and the row of the run holding it.
        holder.execute(text("SELECT pg_advisory_xact_lock(:a, :b)"), {"a": 0x63686174, "b": 0x6C696665})
        db.execute(f"INSERT INTO chatdb_runs (command, heartbeat_at) VALUES ('purge', {heartbeat})")
        result = cli("purge", "--older-than", "90d", "--json", "--database-url", db.cli_url)
    finally:
        holder.rollback()
        holder.close()
    assert result.exit_code == 1, result.output
    error = json.loads(result.stdout)["error"]
    assert "another archive or purge run is in progress" in error
    assert age in error and " -" not in error, error


# --- item: a lock conflict that outlasts the retries -------------------------------------------------


def test_a_lock_conflict_that_outlasts_the_retries_ends_the_run_with_one_line_and_exit_1(cli, migrated_db):
    """README: "lock timeouts and deadlocks are retried with backoff, and a persistent one
    ends the run with a clear message (exit 1)". Another session holds the archive's
    messages table in SHARE mode for the whole run: every batch waits out its lock_timeout
    on it, is tried again smaller, and the last attempt gives up. The run moved nothing,
    its audit row says it failed and why, and the error is one line."""
    db = migrated_db
    populate(db)
    before = rows(db)
    holder = db.engine.connect()
    holder.begin()
    holder.execute(text("LOCK TABLE messages_archive IN SHARE MODE"))
    try:
        result = cli("archive", "--older-than", "100d", "--json", "--yes", "--database-url", db.cli_url)
    finally:
        holder.rollback()
        holder.close()
    assert result.exit_code == 1, result.output
    line = one_error(result.stderr)
    # The README's words: tried 6 times, then the server's own message, without the excerpt of
    # the statement that the driver adds to it (LINE 1: ... ^).
    assert line == (
        "error: archive idle conversations: gave up after 6 attempts: canceling statement due to lock timeout"
    ), line
    hint = result.stderr.splitlines()[1:]
    assert len(hint) == 1 and hint[0].startswith("hint: another session held a lock"), result.stderr
    error = json.loads(result.stdout)
    assert (error["ok"], error["exit_code"], error["error"]) == (False, 1, line.removeprefix("error: "))
    assert rows(db) == before
    with db.engine.connect() as connection:
        run = connection.execute(text("SELECT outcome, error, counts FROM chatdb_runs")).one()
    assert run.outcome == "failed" and run.error == error["error"], run
    assert run.counts["conversations"] == 0 and run.counts["complete"] is False


# --- item: a run stopped by --max-runtime does not vacuum ---------------------------------------------


def test_a_run_stopped_by_max_runtime_does_not_vacuum_and_exits_0(cli, migrated_db):
    """README: "A run stopped early does not vacuum", and a --max-runtime stop exits 0.
    Each batch's COMMIT takes 1.1 s (a deferred trigger sleeps), so the first batch ends
    past a --max-runtime of 1 s: the run stops after it, having changed the tables, and
    --vacuum vacuums none of them. That one transaction is counted as over 250 ms."""
    db = migrated_db
    populate(db)
    db.execute(
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN PERFORM pg_sleep(1.1); RETURN NULL; END $$"
    )
    db.execute(
        "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON conversations_archive"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
    )
    args = ("archive", "--older-than", "100d", "--batch-size", "1", "--jobs", "1", "--max-runtime", "1s")
    result = cli(*args, "--vacuum", "--json", "--database-url", db.cli_url)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["ok"], out["outcome"], out["complete"], out["stopped_by"]) == (
        True, "succeeded", False, "max-runtime",
    )  # fmt: skip
    assert out["done"]["conversations"] == 1 and out["remaining"]["conversations"] == IDLE - 1
    assert out["vacuum"]["vacuumed"] == [] and out["vacuum"]["stopped_by"] is None, out["vacuum"]
    vacuums = db.scalar(
        "SELECT sum(vacuum_count) FROM pg_stat_all_tables WHERE relid = ANY(ARRAY["
        "'conversations', 'messages', 'conversations_archive', 'messages_archive']::regclass[])"
    )
    assert vacuums == 0
    # The one batch took its COMMIT's 1.1 s at least: the longest, and over 250 ms.
    assert (out["batches"], out["slow_transactions"]) == (1, 1), out
    assert type(out["longest_transaction_seconds"]) is float and out["longest_transaction_seconds"] >= 1.1
    text_run = cli(*args, "--vacuum", "--database-url", db.cli_url)
    assert text_run.exit_code == 0, text_run.output
    assert re.search(r"1 batch in [\d.]+ s, longest transaction \d{4,} ms, 1 over 250 ms\.", text_run.stdout)
    assert "Stopped (max-runtime)" in text_run.stdout and "VACUUM (ANALYZE) done" not in text_run.stdout


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry run"])
@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("archive.json", "the file name must end in .jsonl or .jsonl.gz"),
        ("plain-file/archive.jsonl", "plain-file is not a folder"),
    ],
)
def test_an_export_file_chatdb_cannot_write_is_refused_before_anything_runs(
    cli, migrated_db, tmp_path, target, says, dry_run
):
    populate(migrated_db)
    (tmp_path / "plain-file").write_text("")
    export = tmp_path / target
    args = ("--dry-run",) if dry_run else ("--yes",)
    result = cli(
        "archive",
        "--older-than",
        "100d",
        "--export",
        str(export),
        *args,
        "--database-url",
        migrated_db.cli_url,
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].endswith(says), result.stderr
    assert migrated_db.scalar("SELECT count(*) FROM chatdb_runs") == 0
    assert migrated_db.scalar("SELECT count(*) FROM conversations_archive") == 0
