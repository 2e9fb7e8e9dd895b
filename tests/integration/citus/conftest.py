"""A Citus cluster for the tests of this folder: a coordinator and two workers of Debian's
PostgreSQL on loopback ports, started once for the session (``servers.citus_cluster``).
Without Citus installed these tests skip and say so; with ``CI=true`` they fail instead
(``.ci/run`` builds Citus with ``.ci/build-citus.sh``).

Citus keeps its metadata per database, so each test gets a database on every node, with
the extension and the workers registered (``citus_db``); ``citus_migrated_db`` is one that
``chatdb migrate`` has distributed. Both are copies, node by node, of templates made once
for the session.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import psycopg
import pytest
import servers
from conftest import TestDatabase, scratch_folder
from sqlalchemy import create_engine

from chatdb import db, migrations

_names = itertools.count()


@pytest.fixture(scope="session")
def citus_cluster() -> Iterator[servers.CitusCluster]:
    with ExitStack() as stack:
        folder = stack.enter_context(scratch_folder("chatdb-test-citus-"))
        try:
            cluster = stack.enter_context(servers.citus_cluster(folder))
        except servers.Unavailable as missing:
            if os.environ.get("CI"):
                pytest.fail(f"CI must run the Citus tests: {missing}")
            pytest.skip(f"no Citus cluster: {missing}")
        yield cluster


@dataclass
class CitusDatabase(TestDatabase):
    """A test database on the cluster, reached through the coordinator."""

    cluster: servers.CitusCluster | None = None


def _citus_database(cluster: servers.CitusCluster, template: str) -> Iterator[CitusDatabase]:
    name = f"chatdb_citus_{os.getpid()}_{next(_names)}"
    cluster.create_database(name, template)
    url = db.parse_url(cluster.url(name))
    engine = create_engine(url, connect_args={"prepare_threshold": None})
    try:
        yield CitusDatabase(name, url, engine, cluster)
    finally:
        engine.dispose()
        cluster.drop_database(name)


@pytest.fixture(scope="session")
def _citus_templates(citus_cluster: servers.CitusCluster) -> dict[str, str]:
    """Two templates on every node, made once: ``bare`` (Citus and the workers registered)
    and ``head`` (``chatdb migrate`` has distributed it). A test's database is a copy."""
    bare = f"chatdb_citus_bare_{os.getpid()}"
    head = f"chatdb_citus_head_{os.getpid()}"
    citus_cluster.create_database(bare)
    citus_cluster.create_database(head)
    engine = db.connect(db.Database(db.parse_url(citus_cluster.url(head)), "test"))
    try:
        migrations.upgrade(engine)
    finally:
        engine.dispose()
    for template in (bare, head):
        citus_cluster.make_template(template)
    return {"bare": bare, "head": head}


@pytest.fixture
def citus_db(
    citus_cluster: servers.CitusCluster, _citus_templates: dict[str, str]
) -> Iterator[CitusDatabase]:
    """A fresh database on the cluster, with Citus and both workers, and nothing else."""
    yield from _citus_database(citus_cluster, _citus_templates["bare"])


@pytest.fixture
def citus_migrated_db(
    citus_cluster: servers.CitusCluster, _citus_templates: dict[str, str]
) -> Iterator[CitusDatabase]:
    """A fresh database on the cluster that ``chatdb migrate`` has distributed."""
    yield from _citus_database(citus_cluster, _citus_templates["head"])


@pytest.fixture
def plain_db(citus_cluster: servers.CitusCluster) -> Iterator[TestDatabase]:
    """A database at head on the coordinator's server without the Citus extension: plain
    PostgreSQL of the same version, to compare with."""
    name = f"chatdb_plain_{os.getpid()}_{next(_names)}"
    with psycopg.connect(citus_cluster.coordinator.conninfo(), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    url = db.parse_url(citus_cluster.url(name))
    engine = create_engine(url, connect_args={"prepare_threshold": None})
    try:
        migrations.upgrade(engine)
        yield TestDatabase(name, url, engine)
    finally:
        engine.dispose()
        with psycopg.connect(citus_cluster.coordinator.conninfo(), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
