"""`chatdb bench` against the suite's real server (and its PgBouncer): verdicts and exit
codes, the capacity search, --while, the reports, the refusals, and that nothing of bench's
remains and no other row changes, also after a SIGKILL. Runs last a second or two."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote
from xml.etree import ElementTree

import psycopg
import pytest
from conftest import _test_database
from psycopg import sql
from servers import free_port
from sqlalchemy import text
from test_production import pooler  # noqa: F401  (the suite's PgBouncer, a fixture)
from test_secrets import password_server  # noqa: F401  (a server that asks for passwords, a fixture)

from chatdb import db, migrations
from chatdb import seed as seed_module
from chatdb.bench import pgbench, workload
from chatdb.schema import VERSION_TABLE

CHATDB = (sys.executable, "-m", "chatdb")
TABLES = ["users", "conversations", "messages", "conversations_archive", "messages_archive", "chatdb_runs"]
#: Budgets no run misses, even on a busy machine.
GENEROUS = [arg for b in workload.DEFAULT_BUDGETS for arg in ("--budget", f"{b.key}=60s")]


def generous(mix: str) -> list[str]:
    """--mix and generous budgets for the patterns it runs."""
    names = workload.parse_mix(mix)
    budgets = workload.budgets_for(names, [])
    return ["--mix", mix, *(arg for b in budgets for arg in ("--budget", f"{b.key}=60s"))]


QUICK = ("--clients", "3", "--duration", "1s")
#: Long enough for each pattern of the default mix, history-unfiltered's 5% included.
FULL = ("--clients", "3", "--duration", "2s", "--rate", "100")
BENCH_USERS = f"SELECT count(*) FROM users WHERE id ~ '{workload.USER_ID_PATTERN}'"


@pytest.fixture(scope="module")
def seeded_template(pg_server, template_db) -> Iterator[str]:
    name = f"chatdb_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    url = pg_server.create_database(name, template_db)
    engine = db.connect(db.Database(url, "test"))
    try:
        seed_module.seed(engine, seed_module.SeedRequest(40, 300, 3000, 365, 42))
    finally:
        engine.dispose()
    yield name
    pg_server.drop_database(name)


@pytest.fixture
def seeded_db(pg_server, seeded_template):
    yield from _test_database(pg_server, seeded_template)


def bench(cli, database, *args: str):
    return cli("bench", "--database-url", database.cli_url, *args)


def payload(result) -> dict:
    assert "Traceback" not in result.output, result.output
    return json.loads(result.stdout)


def one_error(result) -> str:
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def checksums(database) -> dict[str, str]:
    """Every row of every table chatdb knows, as one digest per table."""
    return {
        table: database.scalar(
            f"SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {table} t"
        )
        for table in TABLES
    }


# --- verdicts, reports, shapes -----------------------------------------------------------------


def test_a_run_at_a_rate_reports_every_pattern_in_json(seeded_db, cli):
    result = bench(cli, seeded_db, *FULL, "--json", *GENEROUS)
    assert result.exit_code == 0, result.output
    report = payload(result)
    assert (report["command"], report["ok"], report["rate_tps"], report["capacity_tps"]) == (
        "bench",
        True,
        100,
        None,
    )
    assert report["mix"] == workload.DEFAULT_MIX and report["left_out"] == []
    assert isinstance(report["key_cost_ms"], float) and report["pgbench"].startswith("pgbench (PostgreSQL)")
    [phase] = report["phases"]
    assert (phase["name"], phase["command"], phase["judged"], phase["errors"]) == ("alone", None, True, [])
    assert [p["pattern"] for p in phase["patterns"]] == list(workload.DEFAULT_MIX)
    for pattern in phase["patterns"]:
        assert set(pattern) == {
            "pattern", "transactions", "tps", "p50_ms", "p95_ms", "p99_ms", "max_ms",
            "failures", "skipped", "budgets", "histogram",
        }  # fmt: skip
        assert pattern["failures"] == 0
        assert (
            sum(bucket["count"] for bucket in pattern["histogram"])
            == pattern["transactions"] + pattern["skipped"]
        )
        if pattern["transactions"]:
            assert pattern["p50_ms"] <= pattern["p95_ms"] <= pattern["p99_ms"] <= pattern["max_ms"]
        for budget in pattern["budgets"]:
            assert set(budget) == {"metric", "limit_ms", "value_ms", "status"}
            assert (budget["limit_ms"], budget["status"]) == (60_000, "ok")
    assert sum(p["transactions"] for p in phase["patterns"]) > 0
    budgets = {(p["pattern"], b["metric"]) for p in phase["patterns"] for b in p["budgets"]}
    assert budgets == {(b.pattern, b.metric) for b in workload.DEFAULT_BUDGETS}


def test_a_missed_budget_exits_1_and_fails_its_junit_case(seeded_db, cli, tmp_path):
    junit = tmp_path / "bench.xml"
    budgets = [*generous("history=1,recent=1"), "--budget", "recent.p95=1us"]
    result = bench(
        cli, seeded_db, *QUICK, "--rate", "40", "--mix", "history=1,recent=1", "--junit", str(junit), *budgets
    )
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.stdout and "recent.p95" in result.stdout
    suite = ElementTree.parse(junit).getroot()
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    failed = {name for name, case in cases.items() if case.find("failure") is not None}
    assert failed == {"recent p95 < 0.001 ms"}
    assert "recent: p95" in cases["recent p95 < 0.001 ms"].find("failure").get("message")
    assert {"history p95 < 60 s", "history transactions succeed", "recent transactions succeed"} <= set(cases)
    assert suite.get("failures") == "1"


def test_generous_budgets_pass_with_a_clean_junit_and_a_self_contained_html(seeded_db, cli, tmp_path):
    junit, html = tmp_path / "bench.xml", tmp_path / "bench.html"
    result = bench(cli, seeded_db, *FULL, "--junit", str(junit), "--html", str(html), *GENEROUS)
    assert result.exit_code == 0, result.output
    assert "OK: every budget held at 100 tps." in result.stdout
    assert "Latency distribution" in result.stdout and "insert" in result.stdout
    suite = ElementTree.parse(junit).getroot()
    assert suite.get("failures") == "0" and int(suite.get("tests")) == len(workload.DEFAULT_BUDGETS) + 5
    page = html.read_text()
    assert page.count("<svg") == len(workload.DEFAULT_MIX)
    assert "<script" not in page and "src=" not in page and "href=" not in page
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")


def test_percentiles_equal_an_independent_computation_over_pgbench_log(seeded_db, cli, tmp_path):
    """PostgreSQL's percentile_disc over pgbench's own log lines gives every figure bench
    reports: those of the transactions due in the two seconds from the first one (pgbench
    runs a second longer, so that none it ran late is missing)."""
    result = bench(cli, seeded_db, "--clients", "4", "--duration", "2s", "--rate", "100", "--json",
                   "--log-dir", str(tmp_path), *GENEROUS)  # fmt: skip
    assert result.exit_code == 0, result.output
    [phase] = payload(result)["phases"]
    files = pgbench.log_files(Path(phase["log"]))
    assert files
    lines = "".join(path.read_text() for path in files)
    with seeded_db.engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TEMPORARY TABLE log (client int, no int, latency text, script int, epoch bigint,"
                " micros bigint, lag bigint)"
            )
        )
        raw = connection.connection.dbapi_connection
        with raw.cursor().copy("COPY log FROM STDIN (DELIMITER ' ')") as copy:
            copy.write(lines)
        assert connection.execute(text("SELECT count(*) FROM log WHERE latency !~ '^[0-9]+$'")).scalar() == 0
        due = "epoch * 1000000 + micros - latency::bigint"
        computed = connection.execute(
            text(
                "SELECT script, count(*), percentile_disc(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY ms),"
                " max(ms) FROM (SELECT script, latency::float8 / 1000 AS ms FROM log"
                f"  WHERE {due} < (SELECT min({due}) FROM log) + 2000000) l"
                " GROUP BY script ORDER BY script"
            )
        ).all()
        assert connection.execute(text(f"SELECT max({due}) - min({due}) FROM log")).scalar() > 2_000_000
    reported = phase["patterns"]
    assert len(computed) == len(reported)
    for (script, count, (p50, p95, p99), top), pattern in zip(computed, reported, strict=True):
        assert pattern["pattern"] == list(workload.DEFAULT_MIX)[script]
        assert pattern["transactions"] == count
        for value, mine in ((p50, "p50_ms"), (p95, "p95_ms"), (p99, "p99_ms"), (top, "max_ms")):
            assert pattern[mine] == (round(value, 3) if value != float("inf") else None)


# --- the capacity search -------------------------------------------------------------------------


def test_the_capacity_search_reports_the_highest_rate_that_held(seeded_db, cli):
    args = (*QUICK, "--min-capacity", "20", "--max-rate", "40", "--json")
    report = payload(bench(cli, seeded_db, *args, *generous("history=1,insert=1")))
    assert report["ok"] is True, report
    assert [(s["rate_tps"], s["ok"]) for s in report["steps"]] == [(20, True), (40, True)]
    assert (report["capacity_tps"], report["capacity_capped"], report["rate_tps"]) == (40, True, 40)
    [phase] = report["phases"]
    assert phase["rate_tps"] == 40
    assert all(b["status"] == "ok" for p in phase["patterns"] for b in p["budgets"])


def test_a_capacity_below_min_capacity_exits_1(seeded_db, cli, tmp_path):
    junit = tmp_path / "bench.xml"
    args = (*QUICK, "--min-capacity", "20", "--max-rate", "40", "--mix", "history=1", "--junit", str(junit))
    result = bench(cli, seeded_db, *args, "--budget", "history.p95=1us")
    assert result.exit_code == 1, result.output
    assert "no rate tried held every budget" in result.stdout and "below --min-capacity 20" in result.stdout
    failures = [
        case.get("name")
        for case in ElementTree.parse(junit).iter("testcase")
        if case.find("failure") is not None
    ]
    assert failures == ["history p95 < 0.001 ms", "capacity at least 20 tps"]
    report = payload(bench(cli, seeded_db, *args[:-2], "--json", "--budget", "history.p95=1us"))
    assert (report["ok"], report["capacity_tps"]) == (False, None)
    assert report["steps"] == [
        {"rate_tps": 20, "ok": False, "tps": report["steps"][0]["tps"], "missed": ["history.p95"]}
    ]


# --- --while ---------------------------------------------------------------------------------------


def test_while_measures_again_during_the_command_and_reports_its_outcome(seeded_db, cli):
    idle = seeded_db.scalar(
        "SELECT count(*) FROM conversations WHERE updated_at < now() - interval '180 days'"
    )
    assert idle > 0
    args = (*QUICK, "--rate", "60", "--while", "purge --older-than 180d", "--json")
    args += (*generous("history=1,recent=1,insert=1"),)
    report = payload(bench(cli, seeded_db, *args))
    assert report["ok"] is True, report
    alone, during = report["phases"]
    assert (alone["name"], alone["judged"], during["name"], during["judged"]) == (
        "alone",
        False,
        "during",
        True,
    )
    command = during["command"]
    assert (command["line"], command["exit_code"]) == ("purge --older-than 180d", 0)
    assert command["seconds"] > 0 and "deleted" in command["stdout"]
    assert during["seconds"] == command["seconds"]
    for pattern in during["patterns"]:
        assert {"shift_p95_ms", "shift_p99_ms"} <= set(pattern)
    assert (
        seeded_db.scalar("SELECT count(*) FROM conversations WHERE updated_at < now() - interval '180 days'")
        == 0
    )
    assert seeded_db.scalar("SELECT outcome FROM chatdb_runs WHERE command = 'purge'") == "succeeded"


def test_a_failing_while_command_fails_the_run_with_its_error(seeded_db, cli):
    command = "archive restore --user nobody-here"
    result = bench(cli, seeded_db, *QUICK, "--rate", "30", "--while", command, *generous("history=1"))
    assert result.exit_code == 1, result.output
    assert f"`{command}` ran for" in result.stdout and "exited 1" in result.stdout
    assert "nobody-here" in result.stdout  # the command's own error line
    assert "the --while command did not succeed" in result.stdout


@pytest.mark.parametrize(
    ("command", "says"),
    [("purge --older-than 90x", "invalid --older-than '90x'"), ("archive", "--older-than is required")],
)
def test_a_while_archive_or_purge_with_bad_input_is_refused_before_anything_is_measured(
    seeded_db, cli, command, says
):
    result = bench(cli, seeded_db, "--clients", "2", "--duration", "60s", "--rate", "30", "--while", command)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: --while {command}: {says}"), result.stderr
    assert result.stdout == ""  # nothing was measured
    assert seeded_db.scalar(BENCH_USERS) == 0


#: A --while command's passwords: one in a URL's user info, with a space (a word of its own
#: however it was quoted), one in an ``sslpassword`` parameter.
WHILE_PASSWORD, WHILE_SSLPASSWORD = "Zx9 Qw8-Jv7", "Ss1-Other-Pw"


def _no_password_in(what: str, shown: str) -> None:
    for piece in (WHILE_PASSWORD, *WHILE_PASSWORD.split(), WHILE_SSLPASSWORD):
        assert piece not in shown, f"{what}: {shown}"


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_while_command_is_shown_with_its_passwords_masked(seeded_db, cli, tmp_path, as_json):
    """The command bench shows (the table, its outcome line, --json, the JUnit and HTML
    reports) is the --while command with every password masked; what --log-dir keeps
    holds none either. The command tries to connect to a port where nothing listens, and
    says so with its URL masked (exit 3)."""
    port = free_port()
    url = f"postgresql://x:{WHILE_PASSWORD}@127.0.0.1:{port}/db?sslpassword={WHILE_SSLPASSWORD}"
    command = f"purge --older-than 300d --connect-timeout 1 --database-url '{url}'"
    masked = f"postgresql://x:***@127.0.0.1:{port}/db?sslpassword=***"
    junit, html, logs = tmp_path / "bench.xml", tmp_path / "bench.html", tmp_path / "logs"
    args = (*QUICK, "--rate", "30", "--while", command, *generous("history=1"))
    args += ("--junit", str(junit), "--html", str(html), "--log-dir", str(logs))
    result = bench(cli, seeded_db, *args, *(["--json"] if as_json else []))
    assert result.exit_code == 1, result.output  # the command failed
    _no_password_in("stdout", result.stdout)
    _no_password_in("stderr", result.stderr)
    for path in (junit, html, *sorted(logs.iterdir())):
        _no_password_in(str(path), path.read_text(errors="replace"))
    if as_json:
        line = payload(result)["phases"][1]["command"]
        assert line["line"] == f"purge --older-than 300d --connect-timeout 1 --database-url '{masked}'"
        assert line["exit_code"] == 3 and f"cannot connect to {masked}" in line["stderr"], line
    else:
        assert f"--database-url '{masked}'` ran for" in result.stdout, result.stdout
        assert f"cannot connect to {masked}" in result.stdout  # the command's own error line
    assert f"--database-url {masked}` exited 3" in junit.read_text()
    assert f"--database-url {masked}`:" in html.read_text()


def test_a_while_command_runs_with_the_password_it_was_given(seeded_db, cli, password_server):  # noqa: F811
    """What is masked is only what is shown: the command runs with its password, against a
    server that asks for it (a masked one would fail to log in, exit 3)."""
    with psycopg.connect(password_server["admin"], autocommit=True) as connection:
        connection.execute(
            sql.SQL("ALTER ROLE chatdb_secret PASSWORD {}").format(sql.Literal(WHILE_PASSWORD))
        )
    socket = quote(password_server["socket"], safe="")
    url = f"postgresql://chatdb_secret:{quote(WHILE_PASSWORD, safe='')}@/chatdb_secrets?host={socket}"
    args = (*QUICK, "--rate", "30", "--json", *generous("history=1"))
    result = bench(cli, seeded_db, *args, "--while", f"status --json --database-url '{url}'")
    _no_password_in("output", result.output)
    command = payload(result)["phases"][1]["command"]
    assert command["exit_code"] == 0, command
    assert '"user": "chatdb_secret"' in command["stdout"], command
    assert command["line"] == (
        f"status --json --database-url 'postgresql://chatdb_secret:***@/chatdb_secrets?host={socket}'"
    )


@pytest.mark.parametrize(
    ("command", "shown", "says"),
    [
        (  # the URL where purge takes no argument: refused by the dry run, which echoes it
            f"purge --older-than 300d 'postgresql://x:{WHILE_SSLPASSWORD}@127.0.0.1:1/db'",
            "--while purge --older-than 300d 'postgresql://x:***@127.0.0.1:1/db': ",
            "unexpected extra argument",
        ),
        (
            f"PGPASSWORD='{WHILE_PASSWORD}' purge --older-than 300d",
            "invalid --while \"'PGPASSWORD=***' purge --older-than 300d\"",
            "not a chatdb command",
        ),
        (
            f"purge --older-than 300d --database-url 'postgresql://x:{WHILE_SSLPASSWORD}@127.0.0.1:1/db",
            'invalid --while "purge --older-than 300d --database-url \'postgresql://x:***@127.0.0.1:1/db"',
            "No closing quotation",
        ),
    ],
    ids=["refused-by-dry-run", "not-a-command", "unclosed-quote"],
)
def test_a_refused_while_command_is_named_without_its_password(seeded_db, cli, command, shown, says):
    result = bench(cli, seeded_db, "--clients", "2", "--duration", "60s", "--rate", "30", "--while", command)
    assert result.exit_code == 2, result.output
    _no_password_in("output", result.output)
    error = one_error(result)
    assert shown in error and says in error, error


# --- bench's own rows ---------------------------------------------------------------------------


def test_a_run_leaves_no_row_of_its_own_and_changes_no_other(seeded_db, cli):
    before = checksums(seeded_db)
    report = payload(bench(cli, seeded_db, *QUICK, "--rate", "60", "--json", *generous("insert=3,history=1")))
    assert report["ok"] is True, report
    removed = report["bench_rows_removed"]
    written = next(p for p in report["phases"][0]["patterns"] if p["pattern"] == "insert")["transactions"]
    assert written > 0 and removed["messages"] >= written  # and those pgbench ran past the window
    assert (removed["runs"], removed["users"], removed["conversations"]) == (1, 3, 3)
    assert seeded_db.scalar(BENCH_USERS) == 0
    assert checksums(seeded_db) == before


def _wait_until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.1)


def test_after_sigkill_cleanup_removes_the_leftovers_and_nothing_else(seeded_db, cli, tmp_path):
    before = checksums(seeded_db)
    process = subprocess.Popen(
        [*CHATDB, "bench", "--database-url", seeded_db.cli_url, "--clients", "2", "--rate", "20",
         "--duration", "300s", *generous("insert=1")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # what a killed run leaves of its pgbench logs
    )  # fmt: skip
    try:
        _wait_until(
            lambda: seeded_db.scalar("SELECT count(*) FROM messages WHERE user_id ~ '^bench-'") > 0,
            "it wrote",
        )
    finally:
        process.kill()
        process.wait()
    sessions = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'chatdb bench'"
        " AND datname = current_database()"
    )
    # pgbench dies with chatdb, and the server ends the sessions of both.
    _wait_until(lambda: seeded_db.scalar(sessions) == 0, "the killed run's sessions ended", timeout=20)
    assert seeded_db.scalar(BENCH_USERS) == 2
    result = bench(cli, seeded_db, "--cleanup", "--json")
    assert result.exit_code == 0, result.output
    cleaned = payload(result)
    assert cleaned["cleanup"]["users"] == 2 and cleaned["cleanup"]["messages"] > 0 and cleaned["running"] == 0
    assert seeded_db.scalar(BENCH_USERS) == 0
    assert checksums(seeded_db) == before


def test_cleanup_leaves_a_run_that_is_still_going_alone(seeded_db, cli):
    token = "00c0ffee"
    seeded_db.execute(f"INSERT INTO users (id) VALUES ('{workload.user_id(token, 0)}'), ('bench-press-fan')")
    with seeded_db.engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_xact_lock(:a, :b)"), {"a": 0x62656E63, "b": int(token, 16)})
        report = payload(bench(cli, seeded_db, "--cleanup", "--json"))
        assert (report["cleanup"]["users"], report["running"]) == (0, 1)
        holder.rollback()
    report = payload(bench(cli, seeded_db, "--cleanup", "--json"))
    assert (report["cleanup"]["users"], report["running"]) == (1, 0)
    assert seeded_db.scalar("SELECT array_agg(id) FROM users WHERE id LIKE 'bench-%'") == ["bench-press-fan"]


# --- who may run it, and where ------------------------------------------------------------------


@pytest.fixture
def reader_role(pg_server, seeded_db) -> Iterator[str]:
    """A role that may read the chat tables and nothing more."""
    role = f"chatdb_bench_reader_{os.getpid()}"
    with pg_server.admin.connect() as connection:
        connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        connection.execute(text(f'CREATE ROLE "{role}" LOGIN'))
    seeded_db.execute(f'GRANT SELECT ON users, conversations, messages, {VERSION_TABLE} TO "{role}"')
    yield role
    seeded_db.execute(f'REVOKE ALL ON ALL TABLES IN SCHEMA public FROM "{role}"')
    with pg_server.admin.connect() as connection:
        connection.execute(text(f'REVOKE ALL ON DATABASE "{seeded_db.name}" FROM "{role}"'))
        connection.execute(text(f'DROP ROLE "{role}"'))


def test_a_role_that_may_not_insert_runs_the_reads_and_says_so(seeded_db, reader_role, cli):
    url = seeded_db.url.set(drivername="postgresql", username=reader_role).render_as_string(
        hide_password=False
    )
    args = ("bench", "--database-url", url, *QUICK, "--rate", "30", *generous("history=1,recent=1,insert=1"))
    report = payload(cli(*args, "--json"))
    assert report["ok"] is True, report
    assert report["left_out"] == [
        {"pattern": "insert", "reason": f"role {reader_role} may not INSERT into users"}
    ]
    assert "insert" not in report["mix"] and "insert" not in [
        p["pattern"] for p in report["phases"][0]["patterns"]
    ]
    result = cli(*args)
    assert f"insert left out: role {reader_role} may not INSERT into users" in result.stdout


def test_through_pgbouncer_in_transaction_mode(seeded_db, pooler, cli):  # noqa: F811
    """Through a transaction pooler, with more clients than the server has connections: the
    pooler multiplexes them, so the server's limit does not apply."""
    limit = seeded_db.scalar("SELECT current_setting('max_connections')::int")
    args = ("--clients", str(limit + 10), "--duration", "1s", "--rate", "30", "--json")
    args += (*generous("history=1,recent=1,insert=1"),)
    result = cli("bench", "--database-url", pooler.url(seeded_db.name), *args)
    assert result.exit_code == 0, result.output
    report = payload(result)
    assert report["ok"] is True and report["bench_rows_removed"]["users"] == limit + 10
    assert sum(p["transactions"] for p in report["phases"][0]["patterns"]) > 0
    assert seeded_db.scalar(BENCH_USERS) == 0
    direct = bench(cli, seeded_db, *args)
    assert direct.exit_code == 2 and "max_connections is" in one_error(direct)


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--mix", "history=40,chat=10"], "unknown pattern 'chat' in --mix"),
        (["--mix", "history:40"], "invalid --mix"),
        (["--budget", "insert.p95=fast"], "invalid --budget insert.p95"),
        (["--budget", "chat.p95=5ms"], "unknown pattern 'chat' in --budget"),
        (["--budget", "insert.median=5ms"], "unknown metric 'median'"),
        (["--mix", "history=1", "--budget", "insert.p95=5ms"], "the mix does not run insert"),
        (["--duration", "0s"], "invalid --duration '0s'"),
        (["--duration", "-5s"], "invalid --duration '-5s'"),
        (["--duration", "90x"], "such as 60s or 5m"),
        (["--rate", "0"], "--rate must be a number of transactions per second above zero"),
        (["--rate", "-5"], "--rate must be a number of transactions per second above zero"),
        (["--min-capacity", "-1"], "--min-capacity must be"),
        (["--rate", "10", "--min-capacity", "5"], "give it or --rate, not both"),
        (["--min-capacity", "50", "--max-rate", "10"], "--min-capacity is above --max-rate"),
        (["--while", "bench --rate 5"], "not a chatdb command to run beside bench"),
        (["--while", "frobnicate"], "not a chatdb command to run beside bench"),
        (["--while", "purge 'unclosed"], "invalid --while"),
        (["--while", ""], "--while needs a chatdb command"),
        (["--junit", "/nonexistent/bench.xml"], "cannot write --junit /nonexistent/bench.xml"),
        (["--html", "/dev/null/bench.html"], "cannot write --html /dev/null/bench.html"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(migrated_db, cli, args, says):
    result = bench(cli, migrated_db, *args)
    assert result.exit_code == 2, result.output
    assert says in one_error(result)


def test_too_many_clients_names_the_server_limit(seeded_db, cli):
    result = bench(cli, seeded_db, "--clients", "100000", "--rate", "10")
    assert result.exit_code == 2
    line = one_error(result)
    assert "--clients 100000 is more than the server allows: max_connections is" in line and "in use" in line


@pytest.mark.parametrize(
    ("revision", "says"),
    [
        (None, "no chatdb schema"),
        ("0003", "the database is at revision 0003_chatbot_extensions, behind head"),
    ],
)
def test_a_database_below_head_is_refused(empty_db, cli, revision, says):
    if revision is not None:
        migrations.upgrade(empty_db.engine, revision)
    result = bench(cli, empty_db, "--clients", "2", "--rate", "10")
    assert result.exit_code == 1
    assert says in one_error(result)
    assert "run `chatdb migrate` first" in result.stderr


def test_a_database_without_messages_is_refused_for_reads(migrated_db, cli):
    result = bench(cli, migrated_db, "--clients", "2", "--rate", "10")
    assert result.exit_code == 1
    assert "holds no messages" in one_error(result)
    assert migrated_db.scalar(BENCH_USERS) == 0


def test_missing_pgbench_is_one_line_naming_the_package(seeded_db, cli, monkeypatch, tmp_path):
    monkeypatch.setattr(pgbench, "search_path", lambda: [])
    monkeypatch.setenv("PATH", str(tmp_path))
    result = bench(cli, seeded_db, "--clients", "2", "--rate", "10")
    assert result.exit_code == 1
    assert "pgbench is not installed" in one_error(result) and "postgresql-client" in result.stderr
    assert seeded_db.scalar(BENCH_USERS) == 0


def test_json_errors_are_one_document(migrated_db, cli):
    result = bench(cli, migrated_db, "--json", "--rate", "0")
    assert result.exit_code == 2
    assert payload(result)["ok"] is False and payload(result)["exit_code"] == 2


def test_the_help_lists_the_patterns_and_the_default_budgets(cli):
    result = cli("bench", "--help")
    assert result.exit_code == 0
    flat = " ".join(result.stdout.split())
    for name in workload.WORKLOADS:
        assert name in flat
    for budget in workload.DEFAULT_BUDGETS:
        assert f"{budget.key}=" in flat


def _long_bench(url: str) -> subprocess.Popen:
    """A bench of inserts for five minutes, to stop."""
    return subprocess.Popen(
        [*CHATDB, "bench", "--database-url", url, "--clients", "2", "--rate", "20",
         "--duration", "300s", *generous("insert=1")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_sigterm_stops_pgbench_and_removes_the_rows(seeded_db):
    process = _long_bench(seeded_db.cli_url)
    try:
        _wait_until(
            lambda: seeded_db.scalar("SELECT count(*) FROM messages WHERE user_id ~ '^bench-'") > 0,
            "it wrote",
        )
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert "terminated" in stderr and "Traceback" not in stderr
    assert seeded_db.scalar(BENCH_USERS) == 0
    sessions = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'chatdb bench'"
        " AND datname = current_database()"
    )
    _wait_until(lambda: seeded_db.scalar(sessions) == 0, "pgbench's sessions ended", timeout=20)


def _children(pid: int, name: str) -> list[int]:
    """The processes called ``name`` whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm, after = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
            if int(after.split()[1]) == pid and comm == name:
                found.append(int(entry.name))
    return found


def test_the_password_is_never_on_pgbenchs_command_line(seeded_db):
    """A command line is visible to every user of the machine (ps, /proc): pgbench gets the
    password in its environment, which only its own user can read. (Its command line also
    shows the latency limit that README's bench section gives.)"""
    url = db.parse_url(seeded_db.cli_url)
    secret = url.password or "S3cr3t-Pw"  # the test server trusts local connections
    given = url._replace(password=secret).render_as_string(hide_password=False)
    process = _long_bench(given)
    try:
        _wait_until(lambda: _children(process.pid, "pgbench"), "pgbench started")
        for child in _children(process.pid, "pgbench"):
            command_line = (Path("/proc") / str(child) / "cmdline").read_bytes()
            assert secret.encode() not in command_line, command_line
            # A transaction due later than ten times the largest budget (60 s) is skipped.
            assert b"--latency-limit=600000\x00" in command_line, command_line
            assert f"PGPASSWORD={secret}".encode() in (Path("/proc") / str(child) / "environ").read_bytes()
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    finally:
        process.kill()
