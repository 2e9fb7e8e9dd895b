"""The ``chatdb`` console script as a process in a shell: a reader that goes away, where the
embedded database lives, and a CHATDB_HOME that cannot be a folder. Real processes, real
pipes and real embedded servers; nothing of chatdb is mocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import scratch_folder

CHATDB = str(Path(sys.executable).with_name("chatdb"))
HEAD = "0007_keys_with_user_id"


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
        ["--help"],  # Typer's help, on a Rich console of its own
        ["migrate", "--help"],
        ["status", "--help"],
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


# --- CHATDB_HOME that cannot be a folder ----------------------------------------------------


@pytest.mark.parametrize("inside", [False, True], ids=["a file", "inside a file"])
def test_chatdb_home_that_cannot_be_a_folder_is_one_line_and_exit_2(cli, tmp_path, monkeypatch, inside):
    file = tmp_path / "notes.txt"
    file.write_text("not a folder\n")
    home = file / "chatdb" if inside else file
    monkeypatch.setenv("CHATDB_HOME", str(home))
    for args in (["status"], ["migrate", "status", "--json"], ["embedded", "url"], ["embedded", "stop"]):
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.splitlines()
        assert len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith(f"error: CHATDB_HOME ({home}) "), lines[0]
        assert f"{file} is a file" in lines[0] if inside else "is a file" in lines[0]
        assert "pgdata" not in lines[0]  # no log file that cannot exist
        if "--json" in args:
            assert json.loads(result.stdout)["exit_code"] == 2
        else:
            assert result.stdout == ""
    assert file.read_text() == "not a folder\n"


# --- where the embedded database lives ------------------------------------------------------


def test_the_embedded_database_is_found_from_a_subfolder_and_a_new_one_is_announced():
    with scratch_folder("chatdb-test-project-") as project:
        project = project.resolve()
        found = [folder for folder in project.parents if (folder / ".chatdb").exists()]
        assert not found, f"{found[0]}/.chatdb would be found from every test folder: remove it"
        subfolder = project / "src" / "app"
        subfolder.mkdir(parents=True)
        home = project / ".chatdb"
        try:
            # Nothing here or above: a new database, and chatdb says so plainly.
            first = chatdb("status", "--json", cwd=project)
            assert first.returncode == 0, first.stderr
            assert first.stderr.splitlines() == [
                "chatdb: no database URL configured; created a new, empty embedded PostgreSQL in "
                f"{home} (no .chatdb/ found here or in any parent folder)"
            ]
            assert json.loads(first.stdout)["revision"]["current"] is None
            assert chatdb("migrate", cwd=project).returncode == 0
            # It has room for bench's default clients: bench goes past that check, to the
            # refusal of a database without messages.
            bench = chatdb("bench", "--rate", "10", "--duration", "1s", cwd=project)
            assert bench.returncode == 1, bench.stderr
            assert "holds no messages" in bench.stderr

            # From a subfolder: the same database, already migrated, and no new folder.
            second = chatdb("status", "--json", cwd=subfolder)
            assert second.returncode == 0, second.stderr
            assert second.stderr.splitlines() == [
                f"chatdb: no database URL configured; using the embedded PostgreSQL in {home}"
            ]
            assert json.loads(second.stdout)["revision"]["current"] == HEAD
            # The wheel's list of clients, left empty by a client killed while rewriting it,
            # does not stop the next command.
            (home / "pgdata" / ".handle_pids.json").write_text("")
            third = chatdb("status", "--json", cwd=subfolder)
            assert third.returncode == 0, third.stderr
            assert json.loads((home / "pgdata" / ".handle_pids.json").read_text()) == []
            url = chatdb("embedded", "url", cwd=subfolder)
            assert (url.returncode, url.stderr) == (0, ""), url.stderr
            assert str(home / "pgdata").replace("/", "%2F") in url.stdout
            assert [path.name for path in project.rglob(".chatdb")] == [".chatdb"]
        finally:
            stop = chatdb("embedded", "stop", cwd=subfolder)
        assert stop.stdout.strip() == f"Stopped the embedded PostgreSQL in {home}.", stop
        assert not (home / "pgdata" / "postmaster.pid").exists()

        # CHATDB_HOME still overrides what would be found.
        elsewhere = project / "elsewhere"
        stopped = chatdb("embedded", "stop", cwd=subfolder, CHATDB_HOME=str(elsewhere))
        assert stopped.stdout.strip() == f"The embedded PostgreSQL in {elsewhere} is not running.", stopped


def test_embedded_stop_where_there_is_none_says_so_and_creates_nothing():
    with scratch_folder("chatdb-test-nowhere-") as folder:
        folder = folder.resolve()
        assert not any((parent / ".chatdb").exists() for parent in folder.parents)
        done = chatdb("embedded", "stop", cwd=folder)
        assert done.returncode == 0, done.stderr
        assert "no .chatdb/ in this folder or any parent folder" in done.stdout
        assert list(folder.iterdir()) == []
