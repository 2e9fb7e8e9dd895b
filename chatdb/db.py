"""Choosing the database, masking secrets, and the one engine factory.

Order of precedence: ``--database-url`` > ``CHATDB_DATABASE_URL`` > ``DATABASE_URL`` >
the embedded PostgreSQL (see ``chatdb.embedded``).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import psycopg
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from chatdb.errors import ConnectError, UsageError

DEFAULT_CONNECT_TIMEOUT = 10.0

_ACCEPTED_SCHEMES = {"postgres", "postgresql", "postgresql+psycopg"}
_DRIVER = "postgresql+psycopg"

# libpq messages for failures worth waiting out (a server starting, restarting or
# waking up); anything else (wrong password, unknown database, TLS) fails at once.
_TRANSIENT = (
    "connection refused",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "no such file or directory",  # a Unix socket not created yet
    "timeout expired",
    "server closed the connection unexpectedly",
    "could not receive data from server",
    "too many connections",
    # PgBouncer accepts the login and reports the server's absence on the first query.
    "pgbouncer cannot connect to server",
    "server login has been failing",
)


# libpq's (and the server's, for `options`) refusals of the URL's own parameters: a bad
# port, an unknown parameter, a value a parameter does not take.
_URL_PROBLEM = re.compile(r"(connection is bad: )?invalid [\w ]*(option|value|number|method)\b")


@dataclass(frozen=True)
class Database:
    """Where chatdb connects, and how it was chosen (for the one-line announcement)."""

    url: URL
    source: str  # "--database-url", "CHATDB_DATABASE_URL", "DATABASE_URL" or "embedded"

    @property
    def display(self) -> str:
        return mask_url(self.url)


def parse_url(raw: str) -> URL:
    """Parse a PostgreSQL URL as hosting providers print it, for the psycopg 3 driver."""
    raw = raw.strip()
    if not raw:
        raise UsageError("the database URL is empty")
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise UsageError(
            f"malformed database URL: {mask_text(raw)} (expected postgresql://user:password@host:port/dbname)"
        ) from None
    if url.drivername not in _ACCEPTED_SCHEMES:
        raise UsageError(
            f"unsupported database URL scheme {url.drivername!r}: use postgresql:// (or postgres://)"
        )
    return url.set(drivername=_DRIVER)


def configured_database(cli_url: str | None) -> Database | None:
    """The database a URL was given for, by precedence; None means the embedded default."""
    if cli_url is not None:  # given, even empty: an empty option is a mistake, not a default
        return Database(parse_url(cli_url), "--database-url")
    for source in ("CHATDB_DATABASE_URL", "DATABASE_URL"):
        if value := os.environ.get(source):
            return Database(parse_url(value), source)
    return None


def resolve_database(cli_url: str | None) -> Database:
    """Pick the database by precedence. Starting the embedded server is left to the caller."""
    if (configured := configured_database(cli_url)) is not None:
        return configured
    from chatdb import embedded

    return Database(embedded.ensure_running(), "embedded")


def mask_url(url: URL | str) -> str:
    """The URL with its password (in the userinfo or the query) replaced by ***."""
    if isinstance(url, str):
        return mask_text(url)
    shown = url.set(drivername="postgresql")
    if "password" in shown.query:
        shown = shown.update_query_dict({"password": "***"})
    return shown.render_as_string(hide_password=True)


_USERINFO_PASSWORD = re.compile(r"(?P<head>[a-z0-9+.-]+://[^:/@\s]*:)(?P<secret>[^@\s]*)@", re.I)
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<secret>[^&\s]*)", re.I)


def mask_text(message: str, url: URL | None = None) -> str:
    """Remove any password from a message: URL userinfo, ``password=`` parameters, and the
    literal password of ``url`` (raw and percent-encoded) wherever it appears."""
    message = _USERINFO_PASSWORD.sub(lambda m: m["head"] + "***@", message)
    message = _QUERY_PASSWORD.sub(lambda m: m["head"] + "***", message)
    if url is not None:
        secrets = [url.password, url.query.get("password")]
        for secret in secrets:
            if isinstance(secret, str) and secret:
                for form in {secret, quote(secret, safe=""), unquote(secret)}:
                    message = message.replace(form, "***")
    return message


def create(
    database: Database,
    *,
    application_name: str = "chatdb",
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> Engine:
    """The one engine factory. No server-side prepared statements, so that chatdb also
    works through a transaction-pooling PgBouncer."""
    connect_args: dict[str, object] = {"prepare_threshold": None}
    if "application_name" not in database.url.query:
        connect_args["application_name"] = application_name[:63]
    if "connect_timeout" not in database.url.query:
        # A host that accepts the connection and never answers must not hang chatdb;
        # libpq treats values below 2 seconds as 2.
        connect_args["connect_timeout"] = max(2, math.ceil(connect_timeout))
    engine = create_engine(database.url, connect_args=connect_args, pool_pre_ping=False)
    event.listen(engine, "connect", _learn_client_check)
    event.listen(engine, "begin", _check_client_in_transaction)
    return engine


# A backend whose client vanished (SIGKILL, a lost host) notices only when it next talks
# to it: a long count, or one waiting for a lock, would run on for minutes. PostgreSQL 14's
# client_connection_check_interval makes it look while the statement runs. It is set in
# each transaction (set_config(..., true)), so a pooler's server connection keeps nothing.
CLIENT_CHECK_INTERVAL = "2s"


def _learn_client_check(dbapi_connection: Any, record: Any) -> None:
    """Whether the server has the setting (14+) and its platform supports it (Linux):
    tried once per connection, in a transaction rolled back."""
    supported = dbapi_connection.info.server_version >= 140000
    if supported:
        try:
            dbapi_connection.execute(
                "SELECT set_config('client_connection_check_interval', %s, true)", (CLIENT_CHECK_INTERVAL,)
            )
        except psycopg.Error:
            supported = False
        dbapi_connection.rollback()
    record.info["client_check"] = supported


def _check_client_in_transaction(connection: Any) -> None:
    if connection.info.get("client_check"):
        connection.exec_driver_sql(
            "SELECT set_config('client_connection_check_interval', %(interval)s, true)",
            {"interval": CLIENT_CHECK_INTERVAL},
        )


def connect(
    database: Database,
    *,
    application_name: str = "chatdb",
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> Engine:
    """Create the engine and prove the server answers, retrying transient failures with
    backoff for up to ``connect_timeout`` seconds. Raises ConnectError otherwise."""
    engine = create(database, application_name=application_name, connect_timeout=connect_timeout)
    deadline = time.monotonic() + max(connect_timeout, 0.0)
    delay = 0.2
    while True:
        try:
            with engine.connect() as connection:
                # A pooler accepts a login while the server is down: only a query proves it.
                connection.exec_driver_sql("SELECT 1")
            return engine
        except DBAPIError as exc:
            message = describe_connect_error(exc, database.url)
            if _URL_PROBLEM.match(message):
                engine.dispose()
                reason = message.removeprefix("connection is bad: ")
                raise UsageError(
                    f"bad connection parameter for {database.display}: {reason}",
                    hint="check the URL (its port and query parameters) and any PG* environment variables",
                ) from None
            remaining = deadline - time.monotonic()
            if not is_transient(exc) or remaining <= 0:
                engine.dispose()
                waited = f" (gave up after {connect_timeout:g}s)" if is_transient(exc) else ""
                raise ConnectError(
                    f"cannot connect to {database.display}: {message}{waited}", hint=_connect_hint(message)
                ) from None
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)


def _connect_hint(message: str) -> str | None:
    lowered = message.lower()
    if "certificate" in lowered or "ssl" in lowered:
        return (
            "check the TLS parameters of the URL: sslmode, and sslrootcert (the file of the CA "
            "that signed the server's certificate)"
        )
    return None


def is_transient(exc: DBAPIError) -> bool:
    text = str(exc.orig).lower()
    return any(marker in text for marker in _TRANSIENT)


def describe_connect_error(exc: DBAPIError, url: URL) -> str:
    """libpq's message, reduced to one line, with any secret removed."""
    text = str(exc.orig).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # libpq repeats "connection to server at ... failed:" per address; keep the reason.
    reasons = []
    for line in lines:
        reason = line.rsplit("failed:", 1)[-1].strip() if "failed:" in line else line
        reason = reason.removeprefix("FATAL:").strip()
        if reason and reason not in reasons:
            reasons.append(reason)
    return mask_text("; ".join(reasons) or "unknown error", url)
