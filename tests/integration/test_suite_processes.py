"""How the suite spreads over processes (tests/conftest.py, README "Development")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _pytest(*args: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "TEST_DATABASE_URL"} | env
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_suite_runs_in_four_processes():
    assert "created: 4/4 workers" in _pytest("tests/unit/test_durations.py")


def test_with_test_database_url_the_suite_runs_in_one_process():
    output = _pytest(
        "tests/unit/test_durations.py", TEST_DATABASE_URL="postgresql://postgres@localhost/postgres"
    )
    assert "workers" not in output
    assert " passed" in output


def test_tests_that_share_a_server_of_their_own_share_a_process():
    # --setup-plan: collected and scheduled by pytest-xdist's --dist loadgroup, which names
    # each test's group after an "@"; nothing is set up or run.
    output = _pytest(
        "-n",
        "2",
        "--setup-plan",
        "-v",
        "tests/integration/test_production.py",
        "tests/integration/citus/test_seed.py",
        "tests/integration/test_server_language.py",
        "tests/unit/test_durations.py",
    )
    groups: dict[str, set[str]] = {}
    for line in output.splitlines():
        if line.startswith("tests/") and "::" in line:
            nodeid = line.split()[0]
            test, _, group = nodeid.rpartition("@") if "@" in nodeid.rpartition("]")[2] else (nodeid, "", "-")
            groups.setdefault(test.split("::")[0], set()).add(group)
    (citus,) = groups["tests/integration/citus/test_seed.py"]  # one group: the cluster's
    assert citus != "-"
    assert groups["tests/integration/test_server_language.py"] == {"test_server_language.by_language"}
    assert groups["tests/unit/test_durations.py"] == {"-"}
    # PgBouncer's tests in one group (named after the first fixture they share, by name),
    # the TLS server's in another.
    assert {"pooler", "tls_server"} <= groups["tests/integration/test_production.py"]
