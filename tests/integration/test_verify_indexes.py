"""``chatdb verify-indexes`` against real databases: a clean database passes, and each
fault injected into a fresh migrated database is found, named and fails the run; the
statements the finding gives as its fix then make the database clean again.

Oracles are written out here (index names, the faults' SQL, the words a finding must
say) rather than recomputed with chatdb's own code.
"""

from __future__ import annotations

import json
import re
import uuid
from xml.etree import ElementTree

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from chatdb import migrations

REVISIONS = [revision.id for revision in migrations.chain()]
HEAD = REVISIONS[-1]

#: Every index on chatdb's tables at head, constraints' included.
HEAD_INDEXES = {
    "conversations": {
        "conversations_pkey",
        "idx_conversations_user_status_updated",
        "idx_conversations_updated_id",
        "idx_conversations_deleted_id",
    },
    "messages": {
        "messages_pkey",
        "idx_messages_conversation_created",
        "idx_messages_conversation_owner",
        "ix_messages_user_id_created_at",
        "idx_messages_deleted_id",
    },
    "conversations_archive": {
        "conversations_archive_pkey",
        "idx_conversations_archive_user_id",
        "idx_conversations_archive_updated_id",
        "idx_conversations_archive_deleted_id",
    },
    "messages_archive": {
        "messages_archive_pkey",
        "idx_messages_archive_conversation_created",
        "idx_messages_archive_deleted_id",
    },
    "chatdb_runs": {"chatdb_runs_pkey", "idx_chatdb_runs_started_at", "uq_chatdb_runs_one_running"},
    "chatdb_size_history": {"chatdb_size_history_pkey", "idx_chatdb_size_history_recorded_at"},
}
PATTERN_INDEXES = {
    "idx_conversations_user_status_updated",
    "idx_messages_conversation_created",
    "idx_conversations_updated_id",
    "idx_conversations_archive_updated_id",
    "idx_conversations_deleted_id",
    "idx_messages_deleted_id",
    "ix_messages_user_id_created_at",
}
FOREIGN_KEY_COVERS = {
    "idx_conversations_user_status_updated",
    "idx_messages_conversation_created",
    "ix_messages_user_id_created_at",
    "idx_conversations_archive_user_id",
    "idx_messages_archive_conversation_created",
}


# --- helpers --------------------------------------------------------------------------------


def verify(cli, database, *options: str) -> tuple[int, dict]:
    result = cli("verify-indexes", "--database-url", database.cli_url, "--json", *options)
    assert "Traceback" not in result.output, result.output
    payload = json.loads(result.stdout)
    assert payload["command"] == "verify-indexes"
    assert payload["ok"] is (result.exit_code == 0), result.stdout
    return result.exit_code, payload


def failed(payload: dict) -> list[dict]:
    return [check for check in payload["checks"] if check["status"] == "fail"]


def finding(payload: dict, index: str | None, check: str) -> dict:
    """The failing check of that kind on that index (exactly one)."""
    found = [c for c in failed(payload) if c["index"] == index and c["check"] == check]
    assert len(found) == 1, json.dumps(failed(payload), indent=1)
    return found[0]


def run_sql(database, script: str) -> None:
    """Run each statement on its own, outside a transaction block (as CONCURRENTLY needs),
    skipping ``--`` comment lines."""
    with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for line in script.splitlines():
            if line.strip() and not line.startswith("--"):
                connection.execute(text(line))


def assert_clean(cli, database) -> dict:
    code, payload = verify(cli, database)
    assert code == 0, json.dumps(failed(payload), indent=1)
    assert failed(payload) == []
    return payload


# --- clean databases ------------------------------------------------------------------------


def test_a_freshly_migrated_database_passes_every_check(migrated_db, cli):
    payload = assert_clean(cli, migrated_db)
    checks = payload["checks"]
    assert all(set(c) == {"table", "index", "check", "status", "detail", "fix"} for c in checks)
    assert checks[0] == {
        "table": None,
        "index": None,
        "check": "revision",
        "status": "ok",
        "detail": f"at head {HEAD}",
        "fix": None,
    }
    for check in ("present", "definition", "valid", "duplicate", "redundant"):
        seen = {(c["table"], c["index"]) for c in checks if c["check"] == check}
        assert seen == {(t, i) for t, names in HEAD_INDEXES.items() for i in names}, check
    assert {c["index"] for c in checks if c["check"] == "query"} == PATTERN_INDEXES
    assert {c["index"] for c in checks if c["check"] == "foreign key"} == FOREIGN_KEY_COVERS
    assert payload["passed"] == len(checks) and payload["failed"] == 0


def test_a_seeded_database_passes_and_says_so(migrated_db, cli):
    seeded = cli(
        "seed",
        "--users",
        "30",
        "--conversations",
        "200",
        "--messages",
        "2000",
        "--database-url",
        migrated_db.cli_url,
    )
    assert seeded.exit_code == 0, seeded.output
    migrated_db.execute("ANALYZE")
    assert migrated_db.scalar("SELECT count(*) FROM messages") == 2000
    assert_clean(cli, migrated_db)
    human = cli("verify-indexes", "--database-url", migrated_db.cli_url)
    assert human.exit_code == 0, human.output
    assert human.stdout.startswith("OK: all "), human.stdout
    assert "checks passed" in human.stdout


def test_verify_changes_nothing(migrated_db, cli):
    def catalog():
        return migrated_db.scalar(
            "SELECT string_agg(c.relname || ':' || c.relkind::text, ',' ORDER BY c.relname) FROM pg_class c"
            " WHERE c.relnamespace IN ('public'::regnamespace)"
        )

    before = catalog()
    assert_clean(cli, migrated_db)
    assert catalog() == before
    assert migrated_db.scalar("SELECT count(*) FROM pg_class WHERE relpersistence = 't'") == 0


def test_a_role_that_may_only_read_and_write_chatdbs_tables_can_run_it(migrated_db, cli):
    """Such a role creates nothing but temporary tables; it cannot create in the schema."""
    if not migrated_db.scalar("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"):
        pytest.skip("the test server's role cannot create roles")
    role, password = f"chatdb_test_ops_{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    migrated_db.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'")
    try:
        migrated_db.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        migrated_db.execute(
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"'
        )
        assert not migrated_db.scalar("SELECT has_schema_privilege(:role, 'public', 'CREATE')", role=role)
        url = migrated_db.url.set(drivername="postgresql", username=role, password=password)

        result = cli("verify-indexes", "--database-url", url.render_as_string(hide_password=False))

        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("OK: all ")
    finally:
        migrated_db.execute(f'DROP OWNED BY "{role}"')
        migrated_db.execute(f'DROP ROLE "{role}"')


# --- one fault each -------------------------------------------------------------------------

FAULTS = [
    pytest.param(
        ["DROP INDEX idx_messages_conversation_created"],
        "idx_messages_conversation_created",
        "present",
        ["missing"],
        id="index dropped",
    ),
    pytest.param(
        [
            "DROP INDEX idx_conversations_user_status_updated",
            "CREATE INDEX idx_conversations_user_status_updated ON conversations"
            " (status, user_id, updated_at DESC)",
        ],
        "idx_conversations_user_status_updated",
        "definition",
        ["key columns in another order", "(status, user_id, updated_at DESC)"],
        id="columns in another order",
    ),
    pytest.param(
        [
            "DROP INDEX idx_messages_conversation_created",
            "CREATE INDEX idx_messages_conversation_created ON messages (conversation_id, created_at)",
        ],
        "idx_messages_conversation_created",
        "definition",
        ["created_at ASC, expected DESC"],
        id="ASC where DESC was declared",
    ),
    pytest.param(
        [
            "DROP INDEX idx_messages_conversation_created",
            "CREATE INDEX idx_messages_conversation_created ON messages"
            " (conversation_id, created_at DESC NULLS LAST)",
        ],
        "idx_messages_conversation_created",
        "definition",
        ["created_at NULLS LAST, expected NULLS FIRST"],
        id="NULLS order",
    ),
    pytest.param(
        [
            "DROP INDEX idx_messages_deleted_id",
            "CREATE INDEX idx_messages_deleted_id ON messages (deleted_at, id) WHERE deleted_at IS NULL",
        ],
        "idx_messages_deleted_id",
        "definition",
        ["partial WHERE deleted_at IS NULL, expected partial WHERE deleted_at IS NOT NULL"],
        id="predicate changed",
    ),
    pytest.param(
        [
            "DROP INDEX idx_conversations_deleted_id",
            "CREATE INDEX idx_conversations_deleted_id ON conversations (deleted_at, id)",
        ],
        "idx_conversations_deleted_id",
        "definition",
        ["no predicate, expected partial WHERE deleted_at IS NOT NULL"],
        id="predicate removed",
    ),
    pytest.param(
        [
            "DROP INDEX idx_conversations_updated_id",
            "CREATE INDEX idx_conversations_updated_id ON conversations (updated_at, id) INCLUDE (user_id)",
        ],
        "idx_conversations_updated_id",
        "definition",
        ["INCLUDE (user_id), expected no INCLUDE columns"],
        id="INCLUDE columns changed",
    ),
    pytest.param(
        [
            "DROP INDEX idx_conversations_archive_user_id",
            "CREATE INDEX idx_conversations_archive_user_id ON conversations_archive USING hash (user_id)",
        ],
        "idx_conversations_archive_user_id",
        "definition",
        ["access method hash, expected btree"],
        id="another access method",
    ),
    pytest.param(
        [
            "DROP INDEX ix_messages_user_id_created_at",
            "CREATE INDEX ix_messages_user_id_created_at ON messages"
            " (user_id varchar_pattern_ops, created_at)",
        ],
        "ix_messages_user_id_created_at",
        "definition",
        ["user_id operator class varchar_pattern_ops, expected text_ops"],
        id="operator class",
    ),
    pytest.param(
        [
            "DROP INDEX ix_messages_user_id_created_at",
            'CREATE INDEX ix_messages_user_id_created_at ON messages (user_id COLLATE "C", created_at)',
        ],
        "ix_messages_user_id_created_at",
        "definition",
        ['user_id collation "C", expected "default"'],
        id="collation",
    ),
    pytest.param(
        [
            "DROP INDEX uq_chatdb_runs_one_running",
            "CREATE INDEX uq_chatdb_runs_one_running ON chatdb_runs ((true)) WHERE outcome = 'running'",
        ],
        "uq_chatdb_runs_one_running",
        "definition",
        ["not unique, expected UNIQUE"],
        id="uniqueness dropped",
    ),
    pytest.param(
        ["CREATE INDEX idx_messages_conversation_copy ON messages (conversation_id, created_at DESC)"],
        "idx_messages_conversation_copy",
        "duplicate",
        ["exact duplicate of idx_messages_conversation_created"],
        id="exact duplicate added",
    ),
    pytest.param(
        ["CREATE INDEX idx_messages_conversation_id ON messages (conversation_id)"],
        "idx_messages_conversation_id",
        "redundant",
        ["left prefix of idx_messages_conversation_created"],
        id="left-prefix duplicate added",
    ),
    pytest.param(
        ["DROP INDEX idx_conversations_archive_user_id"],
        "idx_conversations_archive_user_id",
        "foreign key",
        ["conversations_archive_user_id_fkey (user_id)", "no valid, non-partial index starts with user_id"],
        id="foreign key's index dropped",
    ),
    pytest.param(
        ["CREATE INDEX idx_conversations_title ON conversations (title)"],
        "idx_conversations_title",
        "unexpected",
        ["not declared in chatdb/schema.py", "btree (title)"],
        id="unexpected extra index",
    ),
]


@pytest.mark.parametrize(("fault", "index", "check", "words"), FAULTS)
def test_each_fault_is_found_and_its_fix_repairs_it(migrated_db, cli, fault, index, check, words):
    run_sql(migrated_db, "\n".join(fault))

    code, payload = verify(cli, migrated_db)

    assert code == 1
    found = finding(payload, index, check)
    for word in words:
        assert word in found["detail"], found
    assert payload["failed"] == len(failed(payload)) >= 1
    run_sql(migrated_db, found["fix"])
    assert_clean(cli, migrated_db)


def test_a_dropped_index_also_fails_its_query_and_foreign_key(migrated_db, cli):
    # Either index covers the owner foreign key; without both it is uncovered.
    migrated_db.execute("DROP INDEX idx_messages_conversation_created")
    migrated_db.execute("DROP INDEX idx_messages_conversation_owner")

    code, payload = verify(cli, migrated_db)

    assert code == 1
    assert (
        "history of a conversation"
        in finding(payload, "idx_messages_conversation_created", "query")["detail"]
    )
    key = finding(payload, "idx_messages_conversation_created", "foreign key")
    assert "fk_messages_conversation_owner (conversation_id, user_id)" in key["detail"]
    assert "CREATE INDEX CONCURRENTLY idx_messages_conversation_created" in key["fix"]


def test_a_pattern_that_needs_a_sort_fails_its_query_check(migrated_db, cli):
    run_sql(
        migrated_db,
        "DROP INDEX idx_conversations_updated_id\n"
        "CREATE INDEX idx_conversations_updated_id ON conversations (updated_at, id DESC)",
    )

    code, payload = verify(cli, migrated_db)

    assert code == 1
    assert "id DESC, expected ASC" in finding(payload, "idx_conversations_updated_id", "definition")["detail"]
    query = finding(payload, "idx_conversations_updated_id", "query")["detail"]
    assert "idle conversations, oldest first" in query
    assert "Sort" in query


def test_asc_desc_predicate_and_include_variants_are_not_duplicates(migrated_db, cli):
    run_sql(
        migrated_db,
        "CREATE INDEX extra_asc ON messages (conversation_id, created_at)\n"
        "CREATE INDEX extra_predicate ON messages (deleted_at, id) WHERE deleted_at > '2020-01-01'\n"
        "CREATE INDEX extra_include ON conversations (updated_at, id) INCLUDE (status)\n"
        "CREATE INDEX extra_pkey_copy ON conversations (id, user_id)",
    )

    code, payload = verify(cli, migrated_db)

    assert code == 1
    flagged = {(c["index"], c["check"]) for c in failed(payload) if c["check"] in ("duplicate", "redundant")}
    # Only the plain copy of the primary key's index is a duplicate; the primary key's own
    # index, which the copy duplicates, is never the one called redundant.
    assert flagged == {("extra_pkey_copy", "duplicate")}
    assert (
        "exact duplicate of conversations_pkey" in finding(payload, "extra_pkey_copy", "duplicate")["detail"]
    )
    unexpected = {c["index"] for c in failed(payload) if c["check"] == "unexpected"}
    assert unexpected == {"extra_asc", "extra_predicate", "extra_include", "extra_pkey_copy"}


def test_an_index_left_invalid_by_a_failed_concurrent_build(migrated_db, cli):
    # The only index covering messages_user_id_fkey, and the one serving a user's messages.
    name = "ix_messages_user_id_created_at"
    definition = f"{name} ON messages (user_id, created_at)"
    migrated_db.execute(f"DROP INDEX {name}")
    # A writer's open transaction makes the concurrent build wait for it; the build gives
    # up (lock_timeout counts only lock waits, so never earlier) and leaves its catalog
    # entry behind, invalid.
    with migrated_db.engine.connect() as writer:
        writer.execute(text("LOCK TABLE messages IN ROW EXCLUSIVE MODE"))
        with migrated_db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as builder:
            builder.execute(text("SET lock_timeout = '200ms'"))
            with pytest.raises(DBAPIError, match="lock timeout"):
                builder.execute(text(f"CREATE INDEX CONCURRENTLY {definition}"))
        writer.rollback()
    # Run again with IF NOT EXISTS, it says "already exists" and leaves it invalid.
    run_sql(migrated_db, f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {definition}")
    assert (
        migrated_db.scalar(f"SELECT indisvalid FROM pg_index WHERE indexrelid = '{name}'::regclass") is False
    )

    code, payload = verify(cli, migrated_db)

    assert code == 1
    invalid = finding(payload, name, "valid")
    assert "invalid" in invalid["detail"]
    assert finding(payload, name, "query")["status"] == "fail"
    assert "messages_user_id_fkey" in finding(payload, name, "foreign key")["detail"]
    assert {c["index"] for c in failed(payload)} == {name}
    run_sql(migrated_db, invalid["fix"])
    assert_clean(cli, migrated_db)


def test_a_database_behind_head_is_reported_first(migrated_db, cli):
    down = cli("migrate", "down", "-1", "--yes", "--database-url", migrated_db.cli_url)
    assert down.exit_code == 0, down.output

    code, payload = verify(cli, migrated_db)

    assert code == 1
    assert payload["checks"] == [
        {
            "table": None,
            "index": None,
            "check": "revision",
            "status": "fail",
            "detail": f"the database is at revision {REVISIONS[-2]}, 1 behind head "
            f"{HEAD}; indexes were not checked",
            "fix": "chatdb migrate",
        }
    ]
    human = cli("verify-indexes", "--database-url", migrated_db.cli_url)
    assert human.exit_code == 1
    assert "run `chatdb migrate`" in human.stdout
    assert cli("migrate", "--database-url", migrated_db.cli_url).exit_code == 0
    assert_clean(cli, migrated_db)


def test_a_database_chatdb_never_migrated_is_one_error_line(empty_db, cli):
    result = cli("verify-indexes", "--database-url", empty_db.cli_url)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: the database has no chatdb schema yet",
        "hint: run `chatdb migrate` first",
    ]


# --- options and reports --------------------------------------------------------------------


def test_allow_extra_accepts_an_unexpected_index_but_not_a_duplicate(migrated_db, cli):
    migrated_db.execute("CREATE INDEX idx_conversations_title ON conversations (title)")
    code, payload = verify(cli, migrated_db, "--allow-extra")
    assert code == 0, failed(payload)
    accepted = [c for c in payload["checks"] if c["index"] == "idx_conversations_title"]
    assert {c["check"]: c["status"] for c in accepted}["unexpected"] == "ok"

    migrated_db.execute("CREATE INDEX idx_conversations_title_copy ON conversations (title)")
    code, payload = verify(cli, migrated_db, "--allow-extra")
    assert code == 1
    assert [(c["index"], c["check"]) for c in failed(payload)] == [
        ("idx_conversations_title_copy", "duplicate")
    ]


def test_junit_report_counts_every_check_and_each_failure(migrated_db, cli, tmp_path):
    migrated_db.execute("DROP INDEX idx_conversations_archive_user_id")
    report = tmp_path / "verify-indexes.xml"

    code, payload = verify(cli, migrated_db, "--junit", str(report))

    assert code == 1
    root = ElementTree.parse(report).getroot()
    assert root.tag == "testsuites"
    assert int(root.get("tests")) == len(payload["checks"])
    assert int(root.get("failures")) == len(failed(payload)) == 2  # present, foreign key
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == len(payload["checks"])
    failures = {case.get("name"): case.find("failure") for case in cases if case.find("failure") is not None}
    assert set(failures) == {
        "present: idx_conversations_archive_user_id",
        "foreign key: idx_conversations_archive_user_id",
    }
    assert (
        "CREATE INDEX CONCURRENTLY idx_conversations_archive_user_id"
        in failures["present: idx_conversations_archive_user_id"].text
    )
    suites = {suite.get("name"): int(suite.get("failures")) for suite in root.findall("testsuite")}
    assert suites["verify-indexes conversations_archive"] == 2
    assert sum(suites.values()) == 2


def test_junit_report_of_a_clean_database_has_no_failures(migrated_db, cli, tmp_path):
    report = tmp_path / "report.xml"
    result = cli("verify-indexes", "--database-url", migrated_db.cli_url, "--junit", str(report))
    assert result.exit_code == 0, result.output
    root = ElementTree.parse(report).getroot()
    assert root.get("failures") == "0" and int(root.get("tests")) > 100
    assert root.findall(".//failure") == []


def test_junit_report_to_an_unwritable_place_is_a_usage_error(migrated_db, cli, tmp_path):
    result = cli(
        "verify-indexes", "--database-url", migrated_db.cli_url, "--junit", str(tmp_path / "no" / "such.xml")
    )
    assert result.exit_code == 2
    # Refused before the checks run, naming the option and why.
    assert result.stderr.startswith(f"error: cannot write --junit {tmp_path / 'no' / 'such.xml'}: "), (
        result.stderr
    )


def test_findings_table_names_the_index_the_fault_and_the_statements(migrated_db, cli):
    run_sql(
        migrated_db,
        "DROP INDEX idx_messages_conversation_created\n"
        "CREATE INDEX idx_messages_conversation_created ON messages (conversation_id, created_at)",
    )

    result = cli("verify-indexes", "--database-url", migrated_db.cli_url)

    assert result.exit_code == 1
    rows = [line for line in result.stdout.splitlines() if "idx_messages_conversation_created" in line]
    assert any("definition" in row and "created_at ASC, expected DESC" in row for row in rows), result.stdout
    assert "DROP INDEX CONCURRENTLY idx_messages_conversation_created;" in result.stdout
    create = "CREATE INDEX CONCURRENTLY idx_messages_conversation_created ON messages"
    assert f"{create} (conversation_id, created_at DESC);" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("FAILED: 1 of ")


def test_an_unreachable_server_exits_3_with_one_json_object(cli):
    result = cli(
        "verify-indexes",
        "--database-url",
        "postgresql://nobody@127.0.0.1:1/chat",
        "--connect-timeout",
        "0",
        "--json",
    )
    assert result.exit_code == 3
    payload = json.loads(result.stdout)
    assert payload["command"] == "verify-indexes" and payload["ok"] is False
    assert payload["error"].startswith("cannot connect to postgresql://nobody@127.0.0.1:1/chat")


def test_each_fix_statement_comes_out_whole_at_any_width(migrated_db, cli):
    run_sql(
        migrated_db,
        "DROP INDEX idx_messages_conversation_created\n"
        "CREATE INDEX idx_messages_conversation_created ON messages (conversation_id, created_at)\n"
        "DROP INDEX idx_conversations_archive_user_id\n"
        "CREATE INDEX idx_conversations_title ON conversations (title)",
    )
    code, payload = verify(cli, migrated_db)
    assert code == 1
    statements = {line for check in failed(payload) for line in (check["fix"] or "").splitlines()}
    statements = {line for line in statements if not line.startswith("--")}
    assert "DROP INDEX CONCURRENTLY idx_messages_conversation_created;" in statements  # the oracle holds
    ansi = re.compile(r"\x1b\[[0-9;]*m")

    for width in (60, 80, 120, 250, None):  # None: not a terminal (a CI log)
        env = {"COLUMNS": str(width), "TTY_COMPATIBLE": "1"} if width else {"TTY_COMPATIBLE": "0"}
        result = cli("verify-indexes", "--database-url", migrated_db.cli_url, env=env)
        assert result.exit_code == 1, result.output
        shown = ansi.sub("", result.stdout)
        words = set(shown.split())
        flowing = " ".join(shown.split())
        for statement in statements:
            # No line break inside a word, and nothing between the words (a table's border).
            assert set(statement.split()) <= words, (width, statement, shown)
            assert " ".join(statement.split()) in flowing, (width, statement, shown)
        if width:
            assert max(map(len, shown.splitlines())) <= max(width, *map(len, words)), shown

    # What the terminal shows at 60 columns, pasted into psql as it is, repairs the database.
    result = cli(
        "verify-indexes", "--database-url", migrated_db.cli_url, env={"COLUMNS": "60", "TTY_COMPATIBLE": "1"}
    )
    pasted = ansi.sub("", result.stdout)
    script = pasted[pasted.index("-- To fix") : pasted.index("FAILED")]
    sql = " ".join(line for line in script.splitlines() if not line.startswith("--"))
    run_sql(
        migrated_db, "\n".join(f"{statement.strip()};" for statement in sql.split(";") if statement.strip())
    )
    assert_clean(cli, migrated_db)
