"""chatdb doctor as it is deployed: as the operations role that `chatdb grants` makes (with
and without pg_monitor), and through PgBouncer in transaction pooling mode."""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
import servers
from conftest import scratch_folder
from sqlalchemy import text
from test_doctor import one, wait_for
from test_production import leftover_session_state, need, without_maintain

OPS = "chatdb_doctor_ops"
APP = "chatdb_doctor_app"
SEED = ("--users", "20", "--conversations", "200", "--messages", "2000", "--days", "365")


@pytest.fixture(scope="module")
def roles(pg_server) -> Iterator[None]:
    with pg_server.admin.connect() as connection:
        for role in (OPS, APP):
            connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
            connection.execute(text(f'CREATE ROLE "{role}" LOGIN'))
    yield
    with pg_server.admin.connect() as connection:
        for role in (OPS, APP):
            connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))


@pytest.fixture(scope="module")
def pooler(pg_server, roles) -> Iterator[servers.PgBouncer]:
    url = pg_server.url
    host = url.query.get("host") or url.host or "localhost"
    run_as = None
    if os.geteuid() == 0:
        run_as = pwd.getpwuid(os.stat(host).st_uid).pw_name if host.startswith("/") else "postgres"
    with ExitStack() as stack:
        folder = stack.enter_context(scratch_folder("chatdb-test-doctor-pgbouncer-"))
        yield need(
            lambda: stack.enter_context(
                servers.pgbouncer(
                    folder, host=host, port=url.port or 5432, run_as=run_as, roles=("postgres", OPS)
                )
            )
        )


def as_role(database, role: str) -> str:
    return database.url.set(drivername="postgresql", username=role).render_as_string(hide_password=False)


def grant(cli, database) -> list[str]:
    """Every statement `chatdb grants` prints, run as a superuser (as its comment says the
    last one must be)."""
    result = cli("grants", "--app-role", APP, "--ops-role", OPS, "--database", database.name)
    assert result.exit_code == 0, result.output
    statements = [line for line in result.stdout.splitlines() if line and not line.startswith("--")]
    for statement in statements:
        database.execute(statement)
    return statements


def doctor(cli, url: str, *args: str) -> dict:
    result = cli("doctor", "--json", *args, "--database-url", url)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_grants_print_what_doctor_needs(cli):
    result = cli("grants", "--app-role", "chatbot", "--ops-role", "ops", "--json")
    roles = json.loads(result.stdout)["roles"]
    assert [role["kind"] for role in roles] == ["application", "operations", "monitoring"]
    assert roles[2]["statements"] == ["GRANT pg_monitor TO ops;"]
    assert "pg_read_all_stats" in roles[2]["may"] and "bt_index_check(regclass, boolean)" in roles[2]["may"]
    assert (
        "GRANT SELECT, INSERT, DELETE ON TABLE public.chatdb_size_history TO ops;" in roles[1]["statements"]
    )
    text_ = cli("grants", "--app-role", "chatbot", "--ops-role", "ops").stdout
    assert text_.rstrip().endswith("GRANT pg_monitor TO ops;")  # last, on its own


def test_the_operations_role_runs_doctor_and_without_pg_monitor_says_so_once(migrated_db, roles, cli):
    assert cli("seed", *SEED, "--database-url", migrated_db.cli_url).exit_code == 0
    grant(cli, migrated_db)
    ops = as_role(migrated_db, OPS)
    payload = doctor(cli, ops, "--older-than", "180d")
    privileges = [c for c in payload["checks"] if c["area"] == "privileges"]
    assert [c["status"] for c in privileges] == ["ok"], privileges
    assert "pg_monitor" in privileges[0]["detail"]
    skipped = [c for c in payload["checks"] if c["status"] == "skipped"]
    assert [c["area"] for c in skipped] == ["statements"], skipped  # pg_stat_statements is not loaded
    assert payload["recorded"] is True
    assert migrated_db.scalar("SELECT count(*) FROM chatdb_size_history WHERE command = 'doctor'") == 8

    # Without pg_monitor: said once, the run goes on, and hidden sessions are named as such.
    migrated_db.execute(f'REVOKE pg_monitor FROM "{OPS}"')
    with migrated_db.engine.connect() as other:  # another role's session, idle
        other.execute(text("SELECT 1")).scalar()
        other.commit()
        result = cli("doctor", "--json", "--database-url", ops)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    (note,) = [c for c in payload["checks"] if c["area"] == "privileges"]
    assert note["status"] == "skipped" and "not a member of pg_monitor" in note["detail"]
    assert "chatdb grants" in note["detail"]
    assert sum("pg_monitor" in c["detail"] for c in payload["checks"]) == 1
    idle = next(c for c in payload["checks"] if c["check"] == "idle in transaction")
    assert "of other roles hidden" in idle["detail"]
    assert payload["ok"] is True


def test_status_and_doctor_as_a_role_that_may_not_record_still_report(migrated_db, roles, cli):
    grant(cli, migrated_db)
    migrated_db.execute(f'REVOKE INSERT ON TABLE chatdb_size_history FROM "{OPS}"')
    result = cli("status", "--json", "--database-url", as_role(migrated_db, OPS))
    assert result.exit_code == 0, result.output
    assert migrated_db.scalar("SELECT count(*) FROM chatdb_size_history") == 0
    payload = doctor(cli, as_role(migrated_db, OPS))
    assert payload["recorded"] is False
    assert (
        "could not record a sample" in next(c for c in payload["checks"] if c["area"] == "growth")["detail"]
    )


def test_doctor_and_purge_vacuum_through_pgbouncer_in_transaction_mode(migrated_db, roles, pooler, cli):
    grant(cli, migrated_db)
    without_maintain(migrated_db, OPS)
    url = pooler.url(migrated_db.name, OPS)
    assert cli("seed", *SEED, "--database-url", migrated_db.cli_url).exit_code == 0
    payload = doctor(cli, url, "--size-limit", "1GB", "--older-than", "90d")
    assert payload["ok"] is True and payload["recorded"] is True
    assert not [c for c in payload["checks"] if c["status"] == "fail"]
    # The operations role owns no table (and here has no MAINTAIN): --vacuum skips each one
    # PostgreSQL would skip, and doctor's fix says who may run it.
    migrated_db.execute("ALTER TABLE messages SET (autovacuum_enabled = false)")
    purge = cli("purge", "--older-than", "60d", "--vacuum", "--json", "--database-url", url)
    assert purge.exit_code == 0, purge.output
    payload = json.loads(purge.stdout)
    assert payload["vacuum"]["vacuumed"] == [], payload["vacuum"]
    assert list(payload["vacuum"]["skipped"]) == ["conversations", "messages"], payload["vacuum"]
    owner = migrated_db.scalar("SELECT tableowner FROM pg_tables WHERE tablename = 'messages'")
    assert payload["vacuum"]["run_by"]["messages"].startswith(f"{owner} (the owner)"), payload["vacuum"]
    wait_for(
        migrated_db,
        "n_dead_tup >= :n FROM pg_stat_all_tables WHERE relname = 'messages'",
        n=payload["done"]["messages"],
    )
    dead = one(doctor(cli, url), "vacuum", "dead rows", "messages")
    assert dead["status"] == "warn", dead
    assert dead["fix"].startswith(f"VACUUM (ANALYZE) messages;  -- to be run by {owner} (the owner)"), dead
    # The database's owner may vacuum every table in it.
    migrated_db.execute(f'ALTER DATABASE "{migrated_db.name}" OWNER TO "{OPS}"')
    purge = cli("purge", "--older-than", "30d", "--vacuum", "--json", "--database-url", url)
    assert purge.exit_code == 0, purge.output
    vacuum = json.loads(purge.stdout)["vacuum"]
    assert vacuum["vacuumed"] == ["conversations", "messages"] and vacuum["skipped"] == {}, vacuum
    dead = one(doctor(cli, url), "vacuum", "dead rows", "messages")
    assert dead["status"] == "ok", dead
    assert leftover_session_state(pooler, migrated_db) == []
