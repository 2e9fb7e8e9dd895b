"""Choosing the database, masking secrets, and the one engine factory.

Order of precedence: ``--database-url`` > ``CHATDB_DATABASE_URL`` > ``DATABASE_URL`` >
the embedded PostgreSQL (see ``chatdb.embedded``).
"""

from __future__ import annotations

import errno
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
import psycopg.errors
from psycopg import pq
from psycopg.conninfo import make_conninfo
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from chatdb.defaults import DEFAULT_CONNECT_TIMEOUT
from chatdb.errors import ConnectError, UsageError

_ACCEPTED_SCHEMES = {"postgres", "postgresql", "postgresql+psycopg"}
_DRIVER = "postgresql+psycopg"


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
        hint = None if source.startswith("--") else f"give it a URL, or unset {source} to use the next source"
        raise UsageError(f"the database URL from {source} is empty", hint=hint)
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
    raw = raw[: scheme.end()] + _hosts_as_parameters(raw[scheme.end() :], source)
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


#: One host of a multi-host address: ``host``, ``host:port``, ``[IPv6]`` or ``[IPv6]:port``.
_ONE_HOST = re.compile(r"\[(?P<v6>[^\]]*)\](?::(?P<v6port>[^,]*))?|(?P<host>[^,:\[]*)(?::(?P<port>[^,]*))?")


def _hosts_as_parameters(rest: str, source: str) -> str:
    """libpq's multi-host address (``h1:p1,h2:p2/db``, for failover) in the form SQLAlchemy
    reads and libpq takes the same way: ``/db?host=h1,h2&port=p1,p2``. ``rest`` follows
    ``scheme://``; anything else is returned as it is."""
    userinfo = _USERINFO.match(rest)
    head = rest[: userinfo.end()] if userinfo else ""
    location, _, query = rest[len(head) :].partition("?")
    address, slash, path = location.partition("/")
    if "," not in address or "@" in address:
        return rest
    hosts, ports = [], []
    for entry in address.split(","):
        one = _ONE_HOST.fullmatch(entry)
        if one is None or not (one["v6"] or one["host"]):
            raise _malformed(source, "a host of its list of hosts is empty or not host[:port]")
        hosts.append(one["v6"] or one["host"])
        port = one["v6port"] if one["v6"] else one["port"]
        _check_port(port or "", source)
        ports.append(port or "")
    names = {key.lower() for key, _ in parse_qsl(query, keep_blank_values=True)}
    if names & {"host", "port"}:
        raise _malformed(source, "it lists hosts both before the database name and as host= or port=")
    parameters = f"host={','.join(hosts)}"  # still percent-encoded, as the query's values are
    if any(ports):
        parameters += f"&port={','.join(ports)}"
    return f"{head}{slash}{path}?{parameters}{'&' + query if query else ''}"


def _check_port(port: str, source: str) -> None:
    if not port:
        return
    if not _ASCII_DIGITS.fullmatch(port):
        # Not shown: in `postgresql://user:password/db` (no @host) the password is the port.
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
        # Set, even empty: an empty variable is a missing secret (a CI system gives one so),
        # and falling through to the embedded server would check a throwaway database.
        if (value := os.environ.get(source)) is not None:
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
    the value of every parameter named like a password (``password``, ``sslpassword``, in
    any case: a misspelt one is a secret too) replaced by ***."""
    shown = url.set(drivername="postgresql", query={}).render_as_string(hide_password=True)
    if url.query:  # rendered as SQLAlchemy renders it, but a password is *** unencoded
        shown += "?" + "&".join(
            f"{quote_plus(key)}={'***' if _is_password(key) else quote_plus(value)}"
            for key in sorted(url.query)
            for value in _values(url.query[key])
        )
    return shown


def _is_password(key: str) -> bool:
    return "password" in key.lower()


# In free text (a driver's message, a recorded argument) a URL's userinfo runs to the last
# "@" of its word, so that a password holding a raw "@" is covered whole; a keyword named
# like a password (``password``, ``sslpassword``: libpq keyword/value string, or URL
# parameter) runs to its end, quoted or not.
_TEXT_USERINFO = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)\S*@", re.I)
_TEXT_PASSWORD = re.compile(
    r"(?P<head>(?:^|(?<=[\s?&]))\w*password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|[^\s&]*)", re.I
)


def mask_text(message: str) -> str:
    """Remove any password from free text by its place in the structure (the userinfo of a
    URL, a ``password=`` keyword or parameter), never by searching for the password's
    characters, which would also hide the same characters wherever else they appear."""
    message = _TEXT_USERINFO.sub(lambda m: m["head"] + "***@", message)
    return _TEXT_PASSWORD.sub(lambda m: m["head"] + "***", message)


# One argument of a command line is one word however it was quoted: there a URL's
# userinfo runs to the last "@" of the argument, a URL parameter named like a password to
# the next "&", and an argument that starts with a word named like a password
# (``PGPASSWORD=...``) is that word's value to its end, spaces and all.
_ARGUMENT_USERINFO = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/@]*:).*@", re.I | re.S)
_ARGUMENT_PARAMETER = re.compile(r"(?P<head>[?&]\w*password\s*=)[^&]*", re.I)
_ARGUMENT_ASSIGNMENT = re.compile(r"^(?P<head>\s*\w*password\s*=).*", re.I | re.S)


def mask_argument(argument: str) -> str:
    """One argument of a command line as chatdb shows it (``--while "purge --database-url
    postgresql://ops:***@host/db"``): as mask_text, except that what is masked runs to the
    ends of the argument rather than to the next space."""
    argument = _ARGUMENT_USERINFO.sub(lambda m: m["head"] + "***@", argument)
    argument = _ARGUMENT_PARAMETER.sub(lambda m: m["head"] + "***", argument)
    argument = _ARGUMENT_ASSIGNMENT.sub(lambda m: m["head"] + "***", argument)
    return mask_text(argument)


def create(
    database: Database,
    *,
    application_name: str = "chatdb",
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> Engine:
    """The one engine factory. No server-side prepared statements, so that chatdb also
    works through a transaction-pooling PgBouncer."""
    connect_args: dict[str, object] = {
        "prepare_threshold": None,
        **_libpq_defaults(database, application_name, connect_timeout),
    }
    engine = create_engine(database.url, connect_args=connect_args, pool_pre_ping=False)
    event.listen(engine, "connect", _learn_client_check)
    event.listen(engine, "begin", _check_client_in_transaction)
    return engine


def _libpq_defaults(
    database: Database, application_name: str, connect_timeout: float
) -> dict[str, str | int]:
    """The connection parameters chatdb adds where the URL does not give them."""
    added: dict[str, str | int] = {}
    if "application_name" not in database.url.query:
        added["application_name"] = application_name[:63]
    if "connect_timeout" not in database.url.query:
        # A host that accepts the connection and never answers must not hang chatdb;
        # libpq treats values below 2 seconds as 2.
        added["connect_timeout"] = max(2, math.ceil(connect_timeout))
    return added


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
    added = _libpq_defaults(database, application_name, connect_timeout)
    started = time.monotonic()
    deadline = started + max(connect_timeout, 0.0)
    delay = 0.2
    refused: _Failure | None = None  # a refusal by a server that answers, asked again once
    while True:
        try:
            with engine.connect() as connection:
                # A pooler accepts a login while the server is down: only a query proves it.
                connection.exec_driver_sql("SELECT 1")
            return engine
        except DBAPIError as exc:
            failure = _diagnose(exc, database, added)
        if failure.kind == USAGE:
            engine.dispose()
            raise UsageError(
                f"bad connection parameter for {database.display}: "
                + failure.message.removeprefix("connection is bad: "),
                hint="check the URL (its port and query parameters) and any PG* environment variables",
            )
        if failure.kind == REFUSED:
            if refused is None:
                # The server answered and turned the connection away; it may have become
                # ready between that and PQping's look: ask once more, at once.
                refused = failure
                continue
            failure = refused
        remaining = deadline - time.monotonic()
        if failure.kind != TRANSIENT or remaining <= 0:
            engine.dispose()
            waited = f" (gave up after {connect_timeout:g}s)" if failure.kind == TRANSIENT else ""
            raise ConnectError(
                f"cannot connect to {database.display}: {failure.message}{waited}", hint=failure.hint
            )
        refused = None
        if on_wait is not None:
            on_wait(time.monotonic() - started)
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 2.0)


# How a failure to connect is told, never by the server's words (a server may speak any
# language, lc_messages): psycopg reports no SQLSTATE for a connection that could not be
# made, so libpq's PQping says whether a server answered and whether it was one not
# accepting connections yet (57P03, which libpq reads itself).
USAGE = "usage"  # a connection parameter is wrong: exit 2
TRANSIENT = "transient"  # worth waiting out: a server starting, restarting, waking up
REFUSED = "refused"  # a server that answers turned the connection away
FINAL = "final"  # anything else: a wrong password, an unknown database, TLS

# Errors after the login that a server or pooler sends while it cannot serve yet: class 08
# (connection exception; PgBouncer's "cannot connect to server"), admin_shutdown,
# crash_shutdown, cannot_connect_now, too_many_connections.
_TRANSIENT_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")

# A failure with no server behind it is libpq's own, in words made in this process (a
# Python process keeps the C locale for messages): a server not there yet is one of these;
# anything else (TLS, a host name that does not resolve) is final.
_UNREACHABLE = (
    os.strerror(errno.ECONNREFUSED).lower(),
    os.strerror(errno.ENOENT).lower(),  # a Unix socket not created yet
    "timeout expired",
    "server closed the connection unexpectedly",
    "could not receive data from server",
)


@dataclass(frozen=True)
class _Failure:
    kind: str
    message: str  # one line, masked
    hint: str | None = None


def _diagnose(exc: DBAPIError, database: Database, added: dict[str, str | int]) -> _Failure:
    orig = exc.orig
    message = describe_connect_error(exc)
    if isinstance(orig, psycopg.ProgrammingError):  # psycopg refused a parameter it reads itself
        return _Failure(USAGE, message)
    if isinstance(orig, psycopg.errors.ConnectionTimeout):
        return _Failure(TRANSIENT, message)
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate:
        transient = sqlstate.startswith(_TRANSIENT_SQLSTATES)
        return _Failure(TRANSIENT if transient else FINAL, message)
    conninfo = _conninfo(database, added)
    pgconn = getattr(orig, "pgconn", None)
    if pgconn is not None and (pgconn.used_password or pgconn.needs_password):
        # Asked for a password: past the checks by which a server not ready refuses.
        return _refusal(FINAL, message, database, conninfo)
    answer = pq.PGconn.ping(conninfo.encode())
    if answer == pq.Ping.NO_ATTEMPT:  # libpq refused the parameters without trying
        return _Failure(USAGE, message)
    if answer == pq.Ping.REJECT:  # 57P03: starting, shutting down, in recovery
        return _Failure(TRANSIENT, message)
    if answer == pq.Ping.NO_RESPONSE:
        lowered = message.lower()
        if any(words in lowered for words in _UNREACHABLE):
            return _Failure(TRANSIENT, message)
        return _Failure(FINAL, message, _connect_hint(lowered))
    return _refusal(REFUSED, message, database, conninfo)


def _refusal(kind: str, message: str, database: Database, conninfo: str) -> _Failure:
    """A server's refusal; a usage error when it refuses the URL's ``options`` (a setting
    it does not take): the same connection without them succeeds."""
    if "options" in database.url.query:
        try:
            psycopg.connect(make_conninfo(conninfo, options="")).close()
        except psycopg.Error:
            return _Failure(kind, message)
        return _Failure(USAGE, message)
    return _Failure(kind, message)


def _conninfo(database: Database, added: dict[str, str | int]) -> str:
    """The libpq connection string of ``database``, as the engine's connections get it."""
    _, params = _dialect().create_connect_args(database.url)
    return make_conninfo("", **params, **added)


def _connect_hint(lowered: str) -> str | None:
    if "certificate" in lowered or "ssl" in lowered:
        return (
            "check the TLS parameters of the URL: sslmode, and sslrootcert (the file of the CA "
            "that signed the server's certificate)"
        )
    return None


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
