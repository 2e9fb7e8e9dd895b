"""The ``chatdb`` console script as a process in a shell. Real processes and real pipes;
nothing of chatdb is mocked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHATDB = str(Path(sys.executable).with_name("chatdb"))
HEAD = "0005_messages_owner_index"


def environment(**extra: str) -> dict[str, str]:
    """No database configured, and no CHATDB_HOME unless given: chatdb looks for .chatdb/."""
    unset = ("DATABASE_URL", "CHATDB_DATABASE_URL", "PGPASSWORD", "PGSERVICE", "CHATDB_HOME")
    return {**{key: value for key, value in os.environ.items() if key not in unset}, **extra}


def chatdb(*args: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHATDB, *args], cwd=cwd, env=environment(**extra), capture_output=True, text=True, timeout=180
    )


# --- a closed pipe --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--json", "--database-url", "{url}"],
        ["status", "--database-url", "{url}"],  # a Rich table
        ["migrate", "sql"],  # no database
        ["grants", "--app-role", "app", "--ops-role", "ops", "--json"],
        ["--version"],
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_a_reader_that_went_away_ends_chatdb_quietly_with_141(migrated_db, tmp_path, args):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before chatdb writes a byte (`chatdb ... | true`)
    try:
        done = subprocess.run(
            [CHATDB, *(arg.format(url=migrated_db.cli_url) for arg in args)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=environment(CHATDB_HOME=str(tmp_path / "home")),
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


def test_a_usage_error_whose_json_finds_no_reader_reports_the_error_only(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [CHATDB, "purge", "--json"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=environment(),
            text=True,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141
    assert done.stderr.splitlines() == [
        "error: Missing option '--older-than'.",
        "hint: see `chatdb purge --help`",
    ]
