"""The ecosystem's own checks of the migration chain: pytest-alembic's built-in tests,
and squawk's lint of the SQL of every revision step.

pytest-alembic's plugin is off for the suite (pyproject.toml): its built-in tests are
imported here and run against a fresh database of the suite's server, through the
fixtures pytest-alembic lets a project provide (``alembic_config``, ``alembic_engine``).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import alembic.config
import pytest
from pytest_alembic import runner
from pytest_alembic.config import Config
from pytest_alembic.tests import (  # noqa: F401  (collected here as tests)
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)

from chatdb import migrations, schema

REVISIONS = [revision.id for revision in migrations.chain()]
CHECKOUT = Path(__file__).resolve().parents[2]


@pytest.fixture
def alembic_config() -> Config:
    config = alembic.config.Config()
    config.set_main_option("script_location", str(migrations.script_location()))
    return Config(alembic_config=config)


@pytest.fixture
def alembic_engine(empty_db):
    """pytest-alembic hands this Engine to alembic/env.py in config.attributes."""
    return empty_db.engine


@pytest.fixture
def alembic_runner(alembic_config, alembic_engine):
    with runner(config=alembic_config, engine=alembic_engine) as context:
        yield context


def test_pytest_alembic_runs_the_chain_with_chatdbs_version_table(alembic_runner, empty_db):
    alembic_runner.migrate_up_to("heads")
    assert alembic_runner.current == schema.HEAD_REVISION
    assert empty_db.scalar(f"SELECT version_num FROM {schema.VERSION_TABLE}") == schema.HEAD_REVISION
    assert empty_db.scalar("SELECT to_regclass('alembic_version') IS NULL") is True


# --- squawk ----------------------------------------------------------------------------------

SQUAWK = Path(sys.executable).with_name("squawk")  # from squawk-cli, in the test extra
SQUAWK_CONFIG = CHECKOUT / ".squawk.toml"
UP = list(zip(["base", *REVISIONS[:-1]], REVISIONS, strict=True))
STEPS = [*UP, *((end, start) for start, end in reversed(UP))]


def squawk(path: Path, *, downgrade: bool) -> subprocess.CompletedProcess:
    """Lint as .ci/run does: the rules .squawk.toml accepts, and for a downgrade step also
    its [chatdb] downgrade_excluded_rules (an --exclude replaces the file's list)."""
    args = [str(SQUAWK), "--config", str(SQUAWK_CONFIG), "--reporter", "gcc"]
    if downgrade:
        config = tomllib.loads(SQUAWK_CONFIG.read_text())
        rules = config["excluded_rules"] + config["chatdb"]["downgrade_excluded_rules"]
        args.append(f"--exclude={','.join(rules)}")
    return subprocess.run([*args, str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("start", "end"), STEPS, ids=[f"{start}-{end}" for start, end in STEPS])
def test_squawk_finds_nothing_in_a_revision_step(start, end, tmp_path):
    script = tmp_path / "step.sql"
    script.write_text(migrations.offline_sql(start, end))
    downgrade = (start, end) not in UP
    result = squawk(script, downgrade=downgrade)
    assert result.returncode == 0, result.stdout + result.stderr


def test_squawk_with_chatdbs_rules_still_finds_problems(tmp_path):
    """The lint is live: what the revisions avoid is still found."""
    script = tmp_path / "bad.sql"
    script.write_text(
        "CREATE INDEX CONCURRENTLY idx_messages_role ON messages (role);\n"
        "ALTER TABLE conversations DROP COLUMN title;\n"
    )
    result = squawk(script, downgrade=False)
    assert result.returncode == 1, result.stdout + result.stderr
    expected = ("prefer-robust-stmts", "require-statement-timeout", "require-lock-timeout", "ban-drop-column")
    for rule in expected:
        assert rule in result.stdout
