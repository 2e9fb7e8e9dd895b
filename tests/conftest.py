"""Test harness: a real PostgreSQL server and a fresh database per test.

The server is ``TEST_DATABASE_URL`` when set (its role needs CREATEDB), else an embedded
PostgreSQL started for the session in a temporary folder. A template database migrated
to head is cloned for each test that wants a migrated database (``CREATE DATABASE ...
TEMPLATE``, a file copy, much faster than migrating again).
"""

from __future__ import annotations

import inspect
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

# pytest-xdist starts its workers with COLUMNS=80 and LINES=24 in the environment, which
# Rich would take as the fixed size of the consoles chatdb makes on import. Tests that
# want a width set COLUMNS themselves.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _variable in ("COLUMNS", "LINES"):
        os.environ.pop(_variable, None)

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from typer.testing import CliRunner

from chatdb import db, embedded, migrations
from chatdb.cli import app

#: Fixtures that every test process makes for itself: a test that needs nothing more may
#: run in any of them.
_EVERY_PROCESS = frozenset({"pg_server", "template_db"})


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """With ``TEST_DATABASE_URL`` the suite runs in one process: its tests share that one
    server, and some of them create roles and change its settings."""
    if os.environ.get("TEST_DATABASE_URL") and getattr(config.option, "numprocesses", None):
        config.option.numprocesses = 0
        config.option.dist = "no"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups, in each worker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests that share a server of their own (a session or module fixture of this
    suite: the Citus cluster, PgBouncer, the TLS server, the German-speaking server) run in
    one process, so that each such server starts once (pytest-xdist's ``--dist
    loadgroup``). Tests that share any such fixture, directly or through others, form one
    group."""
    tests = Path(__file__).parent
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent[key] != key:
            key = parent[key]
        return key

    shared: dict[pytest.Item, list[str]] = {}
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        keys = []
        for name, definitions in fixtures.name2fixturedefs.items() if fixtures else ():
            definition = definitions[-1]
            if name in _EVERY_PROCESS or definition.scope not in ("session", "module"):
                continue
            if not Path(inspect.getfile(definition.func)).is_relative_to(tests):
                continue  # a plugin's fixture (tmp_path_factory, Faker's)
            key = name if definition.scope == "session" else f"{item.module.__name__}.{name}"  # type: ignore[attr-defined]
            keys.append(parent.setdefault(key, key))
        for other in keys[1:]:  # a group is named after its first fixture by name
            first, second = sorted((root(other), root(keys[0])))
            parent[second] = first
        if keys:
            shared[item] = keys
    for item, keys in shared.items():
        item.add_marker(pytest.mark.xdist_group(root(keys[0])))


@dataclass
class PgServer:
    """A server the tests may create and drop databases on."""

    url: URL  # SQLAlchemy URL (psycopg driver) of the maintenance database
    admin: Engine  # AUTOCOMMIT engine on that database

    def url_for(self, name: str) -> URL:
        return self.url.set(database=name)

    def create_database(self, name: str, template: str = "template0") -> URL:
        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        with self.admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass
class TestDatabase:
    """One fresh database for one test."""

    name: str
    url: URL  # SQLAlchemy URL with the psycopg driver
    engine: Engine

    @property
    def cli_url(self) -> str:
        """The URL as a user would type it (postgresql://...), password included."""
        return self.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def scalar(self, sql: str, **params):
        with self.engine.connect() as connection:
            return connection.execute(text(sql), params).scalar()

    def execute(self, sql: str, **params) -> None:
        with self.engine.begin() as connection:
            connection.execute(text(sql), params)

    def wait_for_query(self, prefix: str, timeout: float = 60) -> None:
        """Wait until a session on this database is running a statement that starts with
        ``prefix`` (to interrupt a command at a known point)."""
        deadline = time.monotonic() + timeout
        with self.engine.connect() as connection:
            while time.monotonic() < deadline:
                running = connection.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND state = 'active' AND starts_with(query, :prefix)"
                    ),
                    {"prefix": prefix},
                ).scalar()
                connection.rollback()
                if running:
                    return
                time.sleep(0.02)
        raise AssertionError(f"no session started {prefix!r} within {timeout} s")


@contextmanager
def scratch_folder(prefix: str) -> Iterator[Path]:
    """A temporary folder outside pytest's numbered ones, which concurrent pytest runs
    prune: a server's data must not vanish under it."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    with scratch_folder("chatdb-test-pg-") as folder:
        yield from _pg_server(folder)


def _pg_server(folder: Path) -> Iterator[PgServer]:
    raw = os.environ.get("TEST_DATABASE_URL")
    server = None
    if raw:
        url = db.parse_url(raw)
    else:
        server, url = embedded.scratch_server(folder / "pgdata")
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        yield PgServer(url, admin)
    finally:
        admin.dispose()
        if server is not None:
            server.cleanup()


_names = itertools.count()


def _unique(prefix: str) -> str:
    return f"chatdb_{prefix}_{os.getpid()}_{next(_names)}"


@pytest.fixture(scope="session")
def template_db(pg_server: PgServer) -> Iterator[str]:
    """A database migrated to head, used as the template of ``migrated_db``."""
    name = _unique("template")
    url = pg_server.create_database(name)
    engine = db.connect(db.Database(url, "test"))
    try:
        migrations.upgrade(engine)
    finally:
        engine.dispose()
    try:
        yield name
    finally:
        pg_server.drop_database(name)


def _test_database(pg_server: PgServer, template: str) -> Iterator[TestDatabase]:
    name = _unique("test")
    url = pg_server.create_database(name, template)
    engine = create_engine(url, connect_args={"prepare_threshold": None})
    try:
        yield TestDatabase(name, url, engine)
    finally:
        engine.dispose()
        pg_server.drop_database(name)


@pytest.fixture
def empty_db(pg_server: PgServer) -> Iterator[TestDatabase]:
    """A fresh, empty database."""
    yield from _test_database(pg_server, "template0")


@pytest.fixture
def migrated_db(pg_server: PgServer, template_db: str) -> Iterator[TestDatabase]:
    """A fresh database at head."""
    yield from _test_database(pg_server, template_db)


@pytest.fixture
def second_migrated_db(pg_server: PgServer, template_db: str) -> Iterator[TestDatabase]:
    """Another fresh database at head, for tests that compare two."""
    yield from _test_database(pg_server, template_db)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test reads the developer's database settings or writes into the checkout, and
    no embedded server a test started outlives it. The embedded server's home is a scratch
    folder outside pytest's: pytest narrows the permissions of its own folders when
    another pytest starts, and a server running as its own user would lose its data."""
    for variable in ("CHATDB_DATABASE_URL", "DATABASE_URL", "PGPASSWORD", "PGSERVICE"):
        monkeypatch.delenv(variable, raising=False)
    with scratch_folder("chatdb-test-home-") as folder:
        home = folder / "chatdb-home"
        monkeypatch.setenv("CHATDB_HOME", str(home))
        try:
            yield
        finally:
            embedded.stop(home)


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def cli():
    """Run chatdb in-process: ``cli("migrate", "--database-url", url)``."""
    runner = CliRunner()

    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> CliResult:
        result = runner.invoke(app, list(args), input=input, env=env, catch_exceptions=False)
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run
