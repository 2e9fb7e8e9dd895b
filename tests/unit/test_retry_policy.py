"""What a batch does after it failed, without a database: the retry policy's decisions,
and the export file's side (``ExportSession``), which comes first and may forbid a retry.

Errors are psycopg's own classes wrapped as SQLAlchemy wraps them, told apart by their
SQLSTATE; the export file is a real file (docs/architecture.md, "Timeouts and retries"
and "When a batch fails while the run is alive")."""

from __future__ import annotations

import os

import psycopg
import pytest
from psycopg import errors
from sqlalchemy.exc import DBAPIError

from chatdb.errors import StateError
from chatdb.lifecycle.export import ExportFile
from chatdb.lifecycle.export_session import ExportSession, outcome_unknown
from chatdb.lifecycle.retry import MAX_ATTEMPTS, RETRYABLE, Decision, RetryPolicy, sqlstate


def failure(orig: Exception) -> DBAPIError:
    """A driver error as SQLAlchemy raises it."""
    return DBAPIError.instance("COMMIT", None, orig, psycopg.Error)


RETRIED = {
    "55P03": errors.LockNotAvailable,
    "40P01": errors.DeadlockDetected,
    "40001": errors.SerializationFailure,
    "57014": errors.QueryCanceled,
    "23503": errors.ForeignKeyViolation,
}


def test_the_retried_errors():
    assert set(RETRIED) == RETRYABLE
    for code, kind in RETRIED.items():
        assert sqlstate(failure(kind("retried"))) == code


@pytest.mark.parametrize("code", sorted(RETRIED))
def test_a_retryable_error_is_retried_until_the_last_attempt(code):
    policy = RetryPolicy()
    decisions = [policy.decide(code, attempt, cancelled=False) for attempt in range(1, MAX_ATTEMPTS + 1)]
    assert decisions == [Decision.RETRY] * (MAX_ATTEMPTS - 1) + [Decision.GIVE_UP]
    assert MAX_ATTEMPTS == 6


@pytest.mark.parametrize(
    "orig",
    [
        errors.UniqueViolation("duplicate key"),
        errors.InsufficientPrivilege("permission denied"),
        errors.AdminShutdown("terminating connection"),
        errors.ConnectionFailure("connection failure"),
        psycopg.OperationalError("server closed the connection unexpectedly"),  # no SQLSTATE
    ],
)
def test_any_other_error_is_the_runs_at_once(orig):
    code = sqlstate(failure(orig))
    assert all(
        RetryPolicy().decide(code, attempt, cancelled=False) is Decision.RAISE for attempt in (1, 5, 6)
    )


@pytest.mark.parametrize("code", sorted(RETRIED))
def test_a_batch_cancelled_by_a_second_signal_is_never_retried(code):
    assert RetryPolicy().decide(code, 1, cancelled=True) is Decision.RAISE


def test_a_retried_batch_waits_longer_each_time_and_halves():
    policy = RetryPolicy()
    assert [policy.backoff(attempt) for attempt in range(1, MAX_ATTEMPTS)] == [0.2, 0.4, 0.8, 1.6, 3.0]
    assert policy.backoff(20) == 3.0
    assert [policy.smaller(size) for size in (1000, 51, 3, 2, 1)] == [500, 25, 1, 1, 1]


def test_a_policy_of_fewer_attempts_gives_up_sooner():
    policy = RetryPolicy(max_attempts=2)
    assert policy.decide("55P03", 1, cancelled=False) is Decision.RETRY
    assert policy.decide("55P03", 2, cancelled=False) is Decision.GIVE_UP


# --- the export file's side -----------------------------------------------------------------


@pytest.mark.parametrize(
    "code, unknown",
    [
        *[(code, True) for code in (None, "08006", "08003", "57P01", "57P02")],
        *[(code, False) for code in ("40001", "55P03", "57014", "23505", "XX000")],
    ],
)
def test_which_errors_leave_a_commits_outcome_unknown(code, unknown):
    assert outcome_unknown(code) is unknown


class Run:
    """A run's export file with one committed batch, and what the database would say."""

    def __init__(self, path) -> None:
        self.file = ExportFile(path)
        self.file.repair(None, None, None)
        self.file.write(self.file.encode(['{"conversation": 1}']))
        self.file.committed()
        self.committed = path.read_bytes()
        self.path = path
        self.guard = True
        self.database_says: int | DBAPIError | None = None
        self.asked = 0

    def committed_length(self) -> int | None:
        self.asked += 1
        if isinstance(self.database_says, DBAPIError):
            raise self.database_says
        return self.database_says

    def session(self) -> ExportSession:
        return ExportSession(self.file, self.committed_length, lambda: self.guard)

    def written(self, session: ExportSession, committing: bool = False) -> bytes:
        data = self.file.encode(['{"conversation": 2}', '{"conversation": 3}'])
        session.write(data)
        if committing:
            session.commit()
        return data


@pytest.fixture
def run(tmp_path):
    run = Run(tmp_path / "archive.jsonl")
    yield run
    run.file.close()


def test_nothing_written_nothing_to_undo_and_the_policy_decides(run):
    session = run.session()
    assert session.failed(failure(errors.LockNotAvailable("lock timeout")))
    assert session.failed(KeyboardInterrupt())  # the batch raises it anyway
    assert run.path.read_bytes() == run.committed
    assert run.asked == 0


@pytest.mark.parametrize("committing", [False, True])
def test_lines_of_a_batch_that_rolled_back_are_cut_at_once_and_it_may_be_retried(run, committing):
    """Before the COMMIT, or a COMMIT that failed with a SQLSTATE saying so."""
    session = run.session()
    run.written(session, committing)
    assert session.failed(failure(errors.SerializationFailure("could not serialize")))
    assert run.path.read_bytes() == run.committed
    assert run.asked == 0


def test_lines_that_could_not_be_cut_are_never_written_again(run):
    session = run.session()
    run.written(session)
    reader, writer = os.pipe()
    kept = run.file.file
    run.file.file = open(writer, "ab", buffering=0)  # noqa: SIM115 - a file that cannot be cut
    try:
        assert not session.failed(failure(errors.LockNotAvailable("lock timeout")))
    finally:
        run.file.file.close()
        os.close(reader)
        run.file.file = kept
    assert run.path.read_bytes() != run.committed  # left for the next run to cut


def test_a_run_that_lost_its_guard_leaves_the_file_to_the_next_run(run):
    session = run.session()
    data = run.written(session)
    run.guard = False
    assert session.failed(failure(errors.LockNotAvailable("lock timeout")))  # retried, and stopped there
    assert run.path.read_bytes() == run.committed + data
    session = run.session()
    run.written(session)
    assert not session.failed(KeyboardInterrupt())
    assert run.path.read_bytes() == run.committed + data * 2


@pytest.mark.parametrize(
    "orig",
    [psycopg.OperationalError("server closed the connection"), errors.AdminShutdown("terminating")],
)
@pytest.mark.parametrize("outcome", ["committed", "rolled back", "cannot tell"])
def test_a_commit_whose_outcome_is_unknown_is_settled_by_the_database_and_never_retried(run, orig, outcome):
    session = run.session()
    data = run.written(session, committing=True)
    run.database_says = {
        "committed": len(run.committed) + len(data),
        "rolled back": len(run.committed),
        "cannot tell": failure(psycopg.OperationalError("no connection")),
    }[outcome]
    assert not session.failed(failure(orig))
    assert run.asked == 1
    expected = run.committed if outcome == "rolled back" else run.committed + data
    assert run.path.read_bytes() == expected


@pytest.mark.parametrize("outcome", ["committed", "rolled back"])
def test_a_signal_during_the_commit_is_settled_by_the_database(run, outcome):
    session = run.session()
    data = run.written(session, committing=True)
    run.database_says = len(run.committed) + (len(data) if outcome == "committed" else 0)
    assert not session.failed(KeyboardInterrupt())
    assert run.asked == 1
    assert run.path.read_bytes() == (run.committed + data if outcome == "committed" else run.committed)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), StateError("cannot write --export: disk full")])
def test_a_signal_or_a_write_error_before_the_commit_cuts_the_lines(run, error):
    session = run.session()
    run.written(session)
    assert not session.failed(error)
    assert run.path.read_bytes() == run.committed
    assert run.asked == 0
