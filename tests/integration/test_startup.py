"""A command imports only what it runs: `chatdb --version` imports not even Typer, and help
imports no database library. The console script runs as a process with Python's own
record of what it imports (PYTHONPROFILEIMPORTTIME); no clock is read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatdb import db
from chatdb.cli import connect

CHATDB = str(Path(sys.executable).with_name("chatdb"))
DATABASE_LIBRARIES = {"sqlalchemy", "psycopg", "alembic", "faker"}


def imported(*args: str) -> set[str]:
    """The top-level packages `chatdb ARGS` imported."""
    return {module.split(".")[0] for module in imported_modules(*args)}


def imported_modules(*args: str) -> set[str]:
    """Every module `chatdb ARGS` imported."""
    done = subprocess.run(
        [CHATDB, *args],
        env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    modules = [
        line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")
    ]
    assert modules, done.stderr[-2000:]
    return set(modules)


def test_version_is_answered_before_typer_is_imported():
    assert not imported("--version") & {"typer", "rich", "click", *DATABASE_LIBRARIES}


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["migrate", "--help"],
        ["migrate", "down", "--help"],
        ["migrate", "sql", "--help"],
        ["seed", "--help"],
        ["archive", "--help"],
        ["archive", "restore", "--help"],
        ["purge", "--help"],
        ["verify-indexes", "--help"],
        ["status", "--help"],
        ["grants", "--help"],
        ["doctor", "--help"],
        ["bench", "--help"],
        ["embedded", "--help"],
        ["embedded", "url", "--help"],
    ],
    ids=" ".join,
)
def test_help_imports_no_database_library(args):
    packages = imported(*args)
    assert "typer" in packages
    assert not packages & DATABASE_LIBRARIES


def test_a_command_that_needs_them_imports_them():
    """The record above does see these imports: `migrate history` reads the migration chain
    through Alembic."""
    assert {"sqlalchemy", "alembic"} <= imported("migrate", "history")


def test_the_help_states_the_connect_timeout_the_data_layer_applies():
    """--connect-timeout's default is declared once, in ``chatdb.defaults``, so that help
    needs no SQLAlchemy; it is the data layer's."""
    assert connect.DEFAULT_CONNECT_TIMEOUT == db.DEFAULT_CONNECT_TIMEOUT


def test_purge_imports_neither_alembic_nor_the_doctor(migrated_db):
    """purge checks the revision with one query, and judges the dead rows it left by
    doctor's rule from ``chatdb.defaults``: it imports neither Alembic nor the doctor."""
    modules = imported_modules(
        "purge", "--older-than", "36500d", "--yes", "--json", "--database-url", migrated_db.cli_url
    )
    assert {"chatdb.lifecycle", "chatdb.lifecycle.vacuuming", "sqlalchemy"} <= modules
    assert not {m for m in modules if m.split(".")[0] == "alembic" or m.startswith("chatdb.doctor")}


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["purge", "--older-than", "36500d", "--jobs", "3", "--batch-size", "50", "--dry-run"],
        ["seed", "--users", "2", "--conversations", "2", "--messages", "4", "--days", "3", "--seed", "5"],
        ["doctor", "--threshold", "dead_rows=10"],
    ],
    ids=" ".join,
)
def test_plain_option_values_are_converted_without_pydantic(migrated_db, args):
    """Typer converts option values through pydantic, about a tenth of a second of every
    start; chatdb converts the plain ones itself (``chatdb.cli.values``)."""
    modules = imported(*args, "--connect-timeout", "5", "--database-url", migrated_db.cli_url)
    assert "typer" in modules and "pydantic" not in modules


def test_status_imports_neither_alembic_nor_the_doctor_nor_the_lifecycle(migrated_db):
    """status checks the revision with one query, and records its size sample through
    chatdb.size_history: what it imports is the data layer it runs."""
    modules = imported_modules("status", "--database-url", migrated_db.cli_url)
    assert {"chatdb.status", "chatdb.size_history", "sqlalchemy"} <= modules
    assert not {
        m
        for m in modules
        if m.split(".")[0] == "alembic" or m.startswith(("chatdb.doctor", "chatdb.lifecycle"))
    }
