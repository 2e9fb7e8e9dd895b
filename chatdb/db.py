"""Choosing the database, masking secrets, and the one engine factory.

Order of precedence: ``--database-url`` > ``CHATDB_DATABASE_URL`` > ``DATABASE_URL`` >
the embedded PostgreSQL (see ``chatdb.embedded``).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import parse_qsl, quote_plus

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


EXPECTED_URL = "postgresql://user:password@host:port/dbname"

# SQLAlchemy's reading of a URL, which is what the connection uses: the scheme, then an
# optional ``user[:password]@`` in which the password runs to the *first* ``@`` (libpq
# reads it the same way), then ``host[:port]``, ``/dbname`` and ``?query``.
_SCHEME = re.compile(r"(?P<scheme>[\w+]+)://")
_USERINFO = re.compile(r"[^:/]*(?::[^@]*)?@")
_KEYWORDS = re.compile(r"\s*\w+\s*=")  # host=... password=...: a libpq keyword/value string
_ASCII_DIGITS = re.compile(r"[0-9]+")


def parse_url(raw: str, source: str = "--database-url") -> URL:
    """Parse a PostgreSQL URL as hosting providers print them, for the psycopg 3 driver.

    ``source`` names where the URL came from. A URL that cannot be used is reported by
    what is wrong with it, never by echoing it: its password may be anywhere in it."""
    raw = raw.strip()
    if not raw:
        raise UsageError(f"the database URL from {source} is empty")
    scheme = _SCHEME.match(raw)
    if scheme is None:
        if _KEYWORDS.match(raw):
            raise _malformed(source, "it is a libpq keyword/value string, not a URL", shape=True)
        raise _malformed(source, "it does not start with postgresql:// or postgres://", shape=True)
    if scheme["scheme"] not in _ACCEPTED_SCHEMES:
        raise UsageError(
            f"unsupported database URL scheme {scheme['scheme']!r} from {source}: "
            "use postgresql:// (or postgres://)"
        )
    _check_location(raw[scheme.end() :], source)
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):
        raise _malformed(source, shape=True) from None
    url = url.set(drivername=_DRIVER)
    _check_ports(url, source)
    return url


def _malformed(source: str, problem: str | None = None, *, shape: bool = False) -> UsageError:
    """The one line for a URL that cannot be used: where it came from and what is wrong,
    never the URL itself. ``shape``: it is not a URL at all, so show what one looks like."""
    message = f"malformed database URL from {source}"
    if problem:
        message += f": {problem}"
    if shape:
        message += f" (expected {EXPECTED_URL})"
    return UsageError(message)


def _check_location(rest: str, source: str) -> None:
    """Refuse what would put part of a password where it is shown (a raw ``@``) and a port
    that is not a number, before the URL is read. ``rest`` follows ``scheme://``."""
    userinfo = _USERINFO.match(rest)
    after = rest[userinfo.end() :] if userinfo else rest
    location, _, query = after.partition("?")
    # The userinfo ends at the first "@", so any later "@" means one in the password (or
    # the user name) that was not percent-encoded: the rest of it would be read as host,
    # port, database or parameter, and shown.
    if "@" in location or any("@" in key for key, _ in parse_qsl(query, keep_blank_values=True)):
        raise _malformed(source, "an '@' after the user name and password (write an '@' in them as %40)")
    host_port = location.partition("/")[0]
    if host_port.startswith("["):
        close = host_port.find("]")
        if close < 0:
            raise _malformed(source, "an IPv6 address in [ ] is not closed")
        after_host = host_port[close + 1 :]
        if after_host and not after_host.startswith(":"):
            raise _malformed(source, "something other than :port follows the IPv6 address")
        port = after_host[1:] if after_host else ""
    else:
        port = host_port.partition(":")[2]
    _check_port(port, source)


def _check_port(port: str, source: str) -> None:
    if not port:
        return
    if not _ASCII_DIGITS.fullmatch(port):
        raise _malformed(source, "a port is not a number")
    if not 1 <= int(port) <= 65535:
        raise _malformed(source, f"port {int(port)} is out of range (1 to 65535)")


def _check_ports(url: URL, source: str) -> None:
    """The ``host`` and ``port`` query parameters, as the driver will combine them."""
    if "host" not in url.query and "port" not in url.query:
        return
    ports = url.query.get("port", ())
    for port in (ports,) if isinstance(ports, str) else ports:
        for number in port.split(","):
            _check_port(number, source)
    try:
        _, params = _dialect().create_connect_args(url)
    except ArgumentError:
        raise _malformed(
            source,
            "its host and port parameters do not pair up (give one port, or one per host: "
            "host=h1,h2&port=p1,p2 or host=h1:p1&host=h2:p2)",
        ) from None
    for port in str(params.get("port", "")).split(","):
        _check_port(port, source)


@cache
def _dialect():
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    return PGDialect_psycopg()


def configured_database(cli_url: str | None) -> Database | None:
    """The database a URL was given for, by precedence; None means the embedded default."""
    if cli_url is not None:  # given, even empty: an empty option is a mistake, not a default
        return Database(parse_url(cli_url, "--database-url"), "--database-url")
    for source in ("CHATDB_DATABASE_URL", "DATABASE_URL"):
        if value := os.environ.get(source):
            return Database(parse_url(value, source), source)
    return None


def resolve_database(cli_url: str | None) -> Database:
    """Pick the database by precedence. Starting the embedded server is left to the caller."""
    if (configured := configured_database(cli_url)) is not None:
        return configured
    from chatdb import embedded

    return Database(embedded.ensure_running(), "embedded")


def _values(value: str | tuple[str, ...]) -> tuple[str, ...]:
    """A query parameter's values: SQLAlchemy keeps a repeated parameter as a tuple."""
    return (value,) if isinstance(value, str) else value


def mask_url(url: URL) -> str:
    """The URL as chatdb shows it: its parsed parts, with the password of the userinfo and
    of a ``password`` parameter replaced by ***."""
    shown = url.set(drivername="postgresql", query={}).render_as_string(hide_password=True)
    if url.query:  # rendered as SQLAlchemy renders it, but a password is *** unencoded
        shown += "?" + "&".join(
            f"{quote_plus(key)}={'***' if key == 'password' else quote_plus(value)}"
            for key in sorted(url.query)
            for value in _values(url.query[key])
        )
    return shown


# In free text (a driver's message, a recorded argument) a URL's userinfo runs to the last
# "@" of its word, so that a password holding a raw "@" is covered whole; a ``password``
# keyword (libpq keyword/value string, or URL parameter) runs to its end, quoted or not.
_TEXT_USERINFO = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)\S*@", re.I)
_TEXT_PASSWORD = re.compile(r"(?P<head>(?:^|(?<=[\s?&]))password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|[^\s&]*)", re.I)


def mask_text(message: str) -> str:
    """Remove any password from free text by its place in the structure (the userinfo of a
    URL, a ``password=`` keyword or parameter), never by searching for the password's
    characters, which would also hide the same characters wherever else they appear."""
    message = _TEXT_USERINFO.sub(lambda m: m["head"] + "***@", message)
    return _TEXT_PASSWORD.sub(lambda m: m["head"] + "***", message)


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
    on_wait: Callable[[float], None] | None = None,
) -> Engine:
    """Create the engine and prove the server answers, retrying transient failures with
    backoff for up to ``connect_timeout`` seconds. Raises ConnectError otherwise.

    ``on_wait(waited)`` is called before each retry with the seconds waited so far, so that
    a caller can show that chatdb is waiting."""
    engine = create(database, application_name=application_name, connect_timeout=connect_timeout)
    started = time.monotonic()
    deadline = started + max(connect_timeout, 0.0)
    delay = 0.2
    while True:
        try:
            with engine.connect() as connection:
                # A pooler accepts a login while the server is down: only a query proves it.
                connection.exec_driver_sql("SELECT 1")
            return engine
        except DBAPIError as exc:
            message = describe_connect_error(exc)
            # psycopg refuses a parameter it reads itself (connect_timeout=abc, an unknown
            # option) with ProgrammingError; libpq's own refusals of a value come without a
            # SQLSTATE, so only their wording tells them apart.
            if isinstance(exc.orig, psycopg.ProgrammingError) or _URL_PROBLEM.match(message):
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
            if on_wait is not None:
                on_wait(time.monotonic() - started)
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


def describe_connect_error(exc: DBAPIError) -> str:
    """libpq's message, reduced to one line. libpq and psycopg name hosts, ports, users and
    databases in their messages, never the password (chatdb hands them the parts of the URL,
    not the URL); the structural mask is a second line of defence."""
    text = str(exc.orig).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # libpq repeats "connection to server at ... failed:" per address; keep the reason.
    reasons = []
    for line in lines:
        reason = line.rsplit("failed:", 1)[-1].strip() if "failed:" in line else line
        reason = reason.removeprefix("FATAL:").strip()
        if reason and reason not in reasons:
            reasons.append(reason)
    return mask_text("; ".join(reasons) or "unknown error")
