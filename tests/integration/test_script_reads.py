"""Each command reads the migration scripts at most once, and a command that only needs to
know the database is at head reads none (``schema.HEAD_REVISION``, one query).

Counted for real: a chatdb process whose file opens are watched by an audit hook."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import chatdb

WATCH = """
import atexit, collections, json, os, sys
from chatdb.revisions import script_location
versions = os.path.realpath(script_location() / "versions")
out = sys.argv[1]
opened = collections.Counter()
def watch(event, args):
    # Every import opens files: the cheap test first, realpath only for the candidates.
    if event == "open" and isinstance(args[0], str) and "versions" in args[0]:
        path = os.path.realpath(args[0])
        if path.startswith(versions + os.sep):
            opened[path] += 1
import chatdb
atexit.register(lambda: open(out, "w").write(json.dumps([chatdb.__file__, opened])))
sys.addaudithook(watch)
sys.argv = ["chatdb", *sys.argv[2:]]
from chatdb.cli import main
main()
"""


def script_reads(tmp_path, *args: str) -> Counter[str]:
    """How often a chatdb run of ``args`` opened each file of the versions folder (its
    source and its compiled form). The child finds the folder from the chatdb it imports,
    and runs outside the checkout, so that it imports the installed chatdb as the tests do."""
    out = tmp_path / "opened.json"
    result = subprocess.run(
        [sys.executable, "-c", WATCH, str(out), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    module, opened = json.loads(out.read_text())
    assert module == chatdb.__file__  # the same chatdb as the tests'
    return Counter(opened)


def test_a_migration_and_a_downgrade_read_each_script_once(empty_db, tmp_path):
    url = ("--database-url", empty_db.cli_url)
    for args in (
        ("migrate", *url),
        ("migrate", "down", "-2", "--yes", *url),
        ("migrate", "up", *url),
        ("migrate", "sql"),
    ):
        opened = script_reads(tmp_path, *args)
        assert opened, args  # the hook saw the scripts read
        assert max(opened.values()) == 1, (args, opened)


def test_commands_at_head_read_no_script(migrated_db, tmp_path):
    for args in (
        ("status", "--json"),
        ("migrate",),
        ("migrate", "status"),
        ("seed", "--users", "2", "--conversations", "2", "--messages", "4"),
    ):
        assert script_reads(tmp_path, *args, "--database-url", migrated_db.cli_url) == Counter(), args
