"""chatdb bench's pgbench scripts hold the application's own statements (chatdb.patterns),
and its figures are read from pgbench's log as an independent computation reads them."""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Iterator

import pytest
from conftest import _test_database
from sqlalchemy import literal_column, text

from chatdb import db, patterns
from chatdb import seed as seed_module
from chatdb.bench import capacity, pgbench, runner, stats, workload
from chatdb.bench.rows import create_rows
from chatdb.errors import UsageError

TOKEN = "0badcafe"


@pytest.fixture(scope="module")
def seeded_template(pg_server, template_db) -> Iterator[str]:
    """A migrated database with 40 users, 300 conversations and 3,000 messages (some
    soft-deleted), cloned for each test that wants one."""
    name = f"chatdb_benchscripts_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    url = pg_server.create_database(name, template_db)
    engine = db.connect(db.Database(url, "test"))
    try:
        seed_module.seed(engine, seed_module.SeedRequest(40, 300, 3000, 365, 42))
        with engine.begin() as connection:
            connection.execute(
                text("UPDATE messages SET deleted_at = now() WHERE id IN (SELECT id FROM messages LIMIT 300)")
            )
    finally:
        engine.dispose()
    yield name
    pg_server.drop_database(name)


@pytest.fixture
def seeded_db(pg_server, seeded_template):
    yield from _test_database(pg_server, seeded_template)


def sql_commands(script: str) -> list[str]:
    """The SQL commands of a pgbench script (meta-commands and comments left out)."""
    body = "\n".join(line for line in script.splitlines() if not line.startswith(("--", "\\")))
    return [command.strip() + ";" for command in re.split(r";[ \t]*(?:\n|$)", body) if command.strip()]


def placeholder(name: str):
    return literal_column(f":{name.upper()}")


# --- the scripts hold the patterns' statements -----------------------------------------------


READS = {
    # workload name: (the pattern's statement, given its key, and the key's column in messages)
    "history": (lambda key: patterns.conversation_history(key, 50), "conversation_id"),
    "recent": (lambda key: patterns.recent_conversations(key, 20), "user_id"),
    "message": (lambda key: patterns.message_by_id(key), "id"),
    "history-unfiltered": (
        lambda key: patterns.conversation_history(key, 50, include_deleted=True),
        "conversation_id",
    ),
}


@pytest.mark.parametrize("name", list(READS))
def test_a_read_script_is_the_pattern_with_its_key_looked_up(name):
    """The script's one SQL command is the pattern's statement as chatdb.patterns builds it,
    the only difference being the key: a lookup where the application passes a value."""
    statement, column = READS[name]
    script = workload.WORKLOADS[name].script(workload.Keys(TOKEN))
    [command] = sql_commands(script)
    lookup = workload.compile_sql(workload.Keys(TOKEN).read(column)).removesuffix(";")
    expected = workload.compile_sql(statement(placeholder("key")))
    assert lookup in command
    assert command.replace(lookup, ":KEY") == expected
    assert "\\set key random(0, 4294967295)" in script.splitlines()


def test_the_insert_script_is_add_message_in_one_transaction():
    keys = workload.Keys(TOKEN)
    script = workload.WORKLOADS["insert"].script(keys)
    commands = sql_commands(script)
    conversation = workload.compile_sql(keys.own_conversation).removesuffix(";")
    user = workload.compile_sql(keys.own_user).removesuffix(";")
    expected = [
        workload.compile_sql(statement)
        for statement in patterns.add_message_statements(
            placeholder("conversation"), placeholder("user"), "user", workload.MESSAGE_CONTENT
        )
    ]
    assert commands[0] == "BEGIN;" and commands[-1] == "COMMIT;"
    assert [
        c.replace(conversation, ":CONVERSATION").replace(f"({user})", ":USER") for c in commands[1:-1]
    ] == expected


def substituted(command: str, **variables: int) -> str:
    """What pgbench sends under -M simple: each :variable replaced by its value's text."""
    for name, value in variables.items():
        command = command.replace(f":{name}", str(value))
    return command


@pytest.mark.parametrize("name", list(READS))
def test_a_read_script_returns_what_the_pattern_returns(seeded_db, name):
    """Run as pgbench runs it (the key variable substituted), the script returns exactly
    the rows that the pattern returns for the message found independently here: the first
    message id at or after the point the key names in the uuid space."""
    statement, column = READS[name]
    [command] = sql_commands(workload.WORKLOADS[name].script(workload.Keys(TOKEN)))
    answered = 0
    with seeded_db.engine.connect() as connection:
        rows = connection.execute(text("SELECT id, conversation_id, user_id FROM messages")).all()
        ordered = sorted(rows, key=lambda row: row.id.bytes)
        for key in (0, 1_234_567_890, 2_000_000_000, 3_000_000_000, 4_000_000_000, 4_294_967_295):
            start = uuid.UUID(f"{key:08x}" + "0" * 24)
            found = next((row for row in ordered if row.id.bytes >= start.bytes), None)
            expected = connection.execute(statement(getattr(found, column))).all() if found else []
            got = connection.exec_driver_sql(substituted(command, key=key)).all()
            assert [tuple(row) for row in got] == [tuple(row) for row in expected]
            answered += bool(got)
    assert answered >= 3, "the keys found (almost) nothing to compare"


def test_the_insert_script_writes_only_the_clients_own_conversation(seeded_db):
    engine = seeded_db.engine
    before = seeded_db.scalar("SELECT count(*) FROM messages")
    create_rows(engine, TOKEN, 3)
    commands = sql_commands(workload.WORKLOADS["insert"].script(workload.Keys(TOKEN)))
    with engine.connect() as connection:
        connection.exec_driver_sql("UPDATE conversations SET updated_at = now() - interval '1 day'")
        connection.commit()
        for command in commands:
            connection.exec_driver_sql(substituted(command, client_id=2))
    mine = workload.conversation_id(TOKEN, 2)
    assert seeded_db.scalar("SELECT count(*) FROM messages") == before + 1
    assert (
        seeded_db.scalar(
            "SELECT count(*) FROM messages WHERE conversation_id = :c AND user_id = :u AND role = 'user'",
            c=mine,
            u=workload.user_id(TOKEN, 2),
        )
        == 1
    )
    bumped = seeded_db.scalar(
        "SELECT array_agg(id::text) FROM conversations WHERE updated_at > now() - interval '1 hour'"
    )
    assert bumped == [mine]


# --- the key carrier, the mix, the budgets ---------------------------------------------------


def test_reads_ask_for_heavy_users_more_often(seeded_db):
    """A key picks a message, so a user is asked for in proportion to their messages."""
    lookup = workload.compile_sql(workload.Keys(TOKEN).read("user_id")).removesuffix(";")
    asked: dict[str, int] = {}
    with seeded_db.engine.connect() as connection:
        for key in range(0, 4_294_967_295, 4_294_967_295 // 3000):
            user = connection.exec_driver_sql(f"SELECT {substituted(lookup, key=key)}").scalar()
            asked[user] = asked.get(user, 0) + 1
        owned = dict(connection.execute(text("SELECT user_id, count(*) FROM messages GROUP BY 1")).all())
    heavy = sorted(owned, key=owned.get)[-5:]
    light = sorted(owned, key=owned.get)[:5]
    assert sum(asked.get(u, 0) for u in heavy) > 2 * sum(asked.get(u, 0) for u in light)
    assert sum(owned[u] for u in heavy) > 2 * sum(owned[u] for u in light)


def test_mix_and_budgets_parse():
    assert workload.parse_mix("history=40, recent=30,insert=30") == {
        "history": 40,
        "recent": 30,
        "insert": 30,
    }
    assert workload.parse_mix("history=1,insert=0") == {"history": 1}
    budget = workload.parse_budget("insert.p99.9=0.5s")
    assert (budget.pattern, budget.metric, budget.limit_ms, budget.percentile) == (
        "insert",
        "p99.9",
        500.0,
        99.9,
    )
    assert workload.parse_budget("message.max=250us").limit_ms == 0.25
    chosen = workload.budgets_for({"history": 1, "insert": 1}, [workload.parse_budget("insert.p95=10ms")])
    assert {(b.key, b.limit_ms) for b in chosen} == {("history.p95", 50.0), ("insert.p95", 10.0)}


@pytest.mark.parametrize(
    "call",
    [
        lambda: workload.parse_mix("history:40"),
        lambda: workload.parse_mix("history=40,chat=10"),
        lambda: workload.parse_mix("history=4,history=5"),
        lambda: workload.parse_mix("history=0"),
        lambda: workload.parse_mix("history=-1"),
        lambda: workload.parse_budget("insert.p95"),
        lambda: workload.parse_budget("insert.p95=fast"),
        lambda: workload.parse_budget("insert.p95=0ms"),
        lambda: workload.parse_budget("insert.p100=5ms"),
        lambda: workload.parse_budget("insert.mean=5ms"),
        lambda: workload.parse_budget("recent.overhead=5ms"),
        lambda: workload.budgets_for({"history": 1}, [workload.parse_budget("insert.p95=5ms")]),
        lambda: workload.budgets_for({"history": 1}, [workload.parse_budget("history.overhead=5ms")]),
    ],
)
def test_bad_mixes_and_budgets_are_usage_errors(call):
    with pytest.raises(UsageError):
        call()


# --- pgbench's log and the figures --------------------------------------------------------------


def test_log_lines_parse():
    done = pgbench.parse_line("3 17 2241 1 1175850568 995598 3005\n")
    assert (done.client, done.script, done.latency_us, done.outcome, done.lag_us) == (
        3,
        1,
        2241,
        "done",
        3005,
    )
    assert done.end_us == 1175850568_995598 and done.scheduled_us == 1175850568_995598 - 2241
    assert pgbench.parse_line("0 83 skipped 0 1412881037 914578 5217\n").outcome == "skipped"
    assert pgbench.parse_line("0 0 failed 0 1499414498 84905 9\n").outcome == "failed"
    assert pgbench.parse_line("0 0 serialization 2 1499414498 84905 9\n").outcome == "failed"
    assert pgbench.parse_line("0 199 2241 0 1175850568") is None  # cut short by a kill


def test_nearest_rank_percentiles():
    values = [float(v) for v in range(1, 101)]
    assert [stats.percentile(values, p) for p in (50, 95, 99, 99.9, 100)] == [50, 95, 99, 100, 100]
    assert stats.percentile([7.0], 95) == 7.0 and stats.percentile([], 95) is None
    assert stats.percentile([1.0, 2.0, math.inf], 50) == 2.0


def test_budgets_judge_the_figures():
    log = [
        pgbench.Transaction(0, script, latency, "done", 0, 0)
        for script, latencies in ((0, range(1000, 101_000, 1000)), (1, range(500, 50_500, 500)))
        for latency in latencies
    ]
    log.append(pgbench.Transaction(0, 1, None, "skipped", 0, 0))
    figures = stats.figures(["history", "history-unfiltered"], log, 10.0)
    stats.judge(figures, workload.budgets_for({"history": 1, "history-unfiltered": 1}, []))
    history, unfiltered = figures
    assert (history.transactions, history.p50_ms, history.p95_ms, history.max_ms) == (100, 50.0, 95.0, 100.0)
    assert (unfiltered.transactions, unfiltered.skipped, unfiltered.max_ms) == (100, 1, math.inf)
    results = {r.metric: (r.value_ms, r.status) for r in history.budgets}
    assert results["p95"] == (95.0, stats.FAIL)
    assert results["overhead"] == (50.0 - 25.5, stats.FAIL)
    assert sum(bucket.count for bucket in unfiltered.histogram) == 101
    assert unfiltered.histogram[-1].count == 1  # the skipped one, past every bound


def test_a_budget_of_a_pattern_that_ran_no_transaction_has_no_data_and_is_missed():
    log = [pgbench.Transaction(0, 0, 1000, "done", 0, 0) for _ in range(20)]  # history-unfiltered: none
    figures = stats.figures(["history", "history-unfiltered"], log, 1.0)
    stats.judge(figures, workload.budgets_for({"history": 9, "history-unfiltered": 1}, []))
    history, unfiltered = figures
    results = {r.metric: (r.value_ms, r.status) for r in history.budgets}
    assert results["overhead"] == (None, stats.NO_DATA)
    assert not history.ok  # not measured, so not held
    assert unfiltered.transactions == 0


def test_the_capacity_search_closes_in_on_the_highest_rate_that_holds():
    """Doubling while every budget holds, then narrowing: it ends within 10% of the true
    limit, having tried it from both sides; and it looks down when the first rate fails."""

    def search(limit: float, **options) -> tuple[float | None, list[float]]:
        request = runner.BenchRequest(**options)
        rate = request.min_capacity or capacity.START_RATE
        if request.max_rate is not None:
            rate = min(rate, request.max_rate)
        tried, lo, hi = [], None, None
        while rate is not None:
            tried.append(rate)
            if rate <= limit:
                lo = rate
            else:
                hi = rate
            rate = capacity.next_rate(lo, hi, request)
        return lo, tried

    found, tried = search(1234)
    assert 1234 / 1.1 <= found <= 1234 and tried[:5] == [100, 200, 400, 800, 1600]
    assert search(1234, max_rate=500) == (500, [100, 200, 400, 500])
    found, tried = search(30)
    assert 30 / 1.1 <= found <= 30 and tried[:3] == [100, 50, 25]
    assert search(0.5) == (None, [100, 50, 25, 12, 6, 3, 1.5, 1])
    assert search(300, min_capacity=500) == (None, [500])


# --- the patterns bench added to chatdb.patterns ---------------------------------------------


def test_message_by_id_and_the_history_without_the_soft_delete_filter(seeded_db):
    with seeded_db.engine.connect() as connection:
        deleted = connection.execute(
            text("SELECT id, conversation_id FROM messages WHERE deleted_at IS NOT NULL LIMIT 1")
        ).one()
        live = connection.execute(text("SELECT id FROM messages WHERE deleted_at IS NULL LIMIT 1")).scalar()
        assert connection.execute(patterns.message_by_id(live)).one().id == live
        assert connection.execute(patterns.message_by_id(deleted.id)).all() == []
        filtered = {
            row.id for row in connection.execute(patterns.conversation_history(deleted.conversation_id, 1000))
        }
        everything = {
            row.id
            for row in connection.execute(
                patterns.conversation_history(deleted.conversation_id, 1000, include_deleted=True)
            )
        }
    assert deleted.id in everything - filtered
    assert filtered < everything
