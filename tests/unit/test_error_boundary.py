"""The error boundary: what a command raises becomes one line and its exit code."""

from __future__ import annotations

import psycopg
import pytest
import typer
from typer.core import TyperCommand

from chatdb.cli.boundary import TerminatedRead, error_boundary


def _exit_code(raise_first: BaseException, then: BaseException | None) -> int:
    """Run a command under the boundary that raises ``raise_first`` and, while the stack
    unwinds from it, ``then`` (a cleanup that failed)."""
    with pytest.raises(typer.Exit) as stopped, error_boundary(typer.Context(TyperCommand("seed"))):
        try:
            raise raise_first
        finally:
            if then is not None:
                raise then
    return stopped.value.exit_code


@pytest.mark.parametrize("signal, code", [(KeyboardInterrupt(), 130), (TerminatedRead(), 143)])
def test_a_signal_exits_with_its_code(signal, code, capsys):
    assert _exit_code(signal, None) == code


@pytest.mark.parametrize("signal, code", [(KeyboardInterrupt(), 130), (TerminatedRead(), 143)])
def test_a_cleanup_that_fails_after_a_signal_still_exits_as_the_signal(signal, code, capsys):
    # The rollback of a connection whose COPY the signal cut short fails this way.
    failed_rollback = psycopg.OperationalError("sending query failed: another command is already in progress")
    assert _exit_code(signal, failed_rollback) == code
    assert capsys.readouterr().err.strip().endswith(("interrupted", "terminated"))


def test_an_error_without_a_signal_is_still_an_error(capsys):
    assert _exit_code(RuntimeError("boom"), None) == 1
    assert "internal error: RuntimeError: boom" in capsys.readouterr().err


@pytest.mark.parametrize("debug", [False, True])
def test_an_internal_error_shows_its_traceback_only_with_chatdb_debug(debug, capsys, monkeypatch):
    """README: errors are one line, never a traceback; CHATDB_DEBUG=1 shows one for an
    internal error."""
    if debug:
        monkeypatch.setenv("CHATDB_DEBUG", "1")
    else:
        monkeypatch.delenv("CHATDB_DEBUG", raising=False)
    assert _exit_code(RuntimeError("boom"), None) == 1
    err = capsys.readouterr().err
    assert ("Traceback (most recent call last)" in err) is debug, err
    assert "internal error: RuntimeError: boom" in err
