"""The migration chain as Alembic reads it, without a database."""

from __future__ import annotations

from alembic.config import Config
from alembic.script import ScriptDirectory

from chatdb import revisions, schema


def test_head_revision_is_the_head_alembic_reads_from_the_scripts():
    # status, seed, archive, purge and restore trust this constant without reading a script.
    config = Config()
    config.set_main_option("script_location", str(revisions.script_location()))
    assert ScriptDirectory.from_config(config).get_current_head() == schema.HEAD_REVISION
    assert revisions.load().head == schema.HEAD_REVISION


def test_the_chain_is_read_once_per_process():
    assert revisions.load() is revisions.load()
    assert revisions.load().script is revisions.load().script
