"""Database URLs without a database: how they are read, and how they are shown with every
password masked by its place in the URL."""

from __future__ import annotations

import pytest

from chatdb import db
from chatdb.bench import pgbench
from chatdb.errors import UsageError

PASSWORD = "s3cr3t/Pa55:x y&z=1"
ENCODED = "s3cr3t%2FPa55%3Ax%20y%26z%3D1"


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "postgresql+psycopg"])
def test_the_schemes_providers_print_are_read_for_psycopg(scheme):
    url = db.parse_url(f"  {scheme}://ops:{ENCODED}@db.example.com:6543/chat?sslmode=require  ")
    assert url.drivername == "postgresql+psycopg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "ops",
        PASSWORD,
        "db.example.com",
        6543,
        "chat",
    )
    assert url.query == {"sslmode": "require"}


@pytest.mark.parametrize(
    ("raw", "query"),
    [
        ("postgresql://ops@db1:5432,db2:5433/chat", {"host": "db1,db2", "port": "5432,5433"}),
        ("postgresql://ops@db1,db2/chat?sslmode=require", {"host": "db1,db2", "sslmode": "require"}),
        ("postgresql://ops@db1,db2:5433/chat", {"host": "db1,db2", "port": ",5433"}),
        ("postgresql://ops@[::1]:5432,[::2]/chat", {"host": "::1,::2", "port": "5432,"}),
    ],
)
def test_several_hosts_before_the_database_name_are_read_as_libpq_reads_them(raw, query):
    url = db.parse_url(raw)
    assert (url.username, url.host, url.port, url.database) == ("ops", None, None, "chat")
    assert dict(url.query) == query


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (f"postgresql://ops:{ENCODED}@db.example.com/chat", "postgresql://ops:***@db.example.com/chat"),
        ("postgresql://ops@db.example.com/chat", "postgresql://ops@db.example.com/chat"),
        (
            f"postgres://ops@db.example.com/chat?sslmode=verify-full&password={ENCODED}",
            "postgresql://ops@db.example.com/chat?password=***&sslmode=verify-full",
        ),
        (
            f"postgresql://ops:{ENCODED}@[::1]:5433/chat?application_name=nightly%20purge",
            "postgresql://ops:***@[::1]:5433/chat?application_name=nightly+purge",
        ),
        (
            "postgresql://ops@/chat?host=/run/postgresql&host=/tmp",
            "postgresql://ops@/chat?host=%2Frun%2Fpostgresql&host=%2Ftmp",
        ),
        (  # the client key's passphrase, and a password parameter misspelt
            f"postgresql://ops@db.example.com/chat?sslpassword={ENCODED}&Password={ENCODED}",
            "postgresql://ops@db.example.com/chat?Password=***&sslpassword=***",
        ),
    ],
)
def test_a_url_is_shown_with_its_passwords_masked(raw, shown):
    url = db.parse_url(raw)
    assert db.mask_url(url) == shown
    assert db.Database(url, "--database-url").display == shown
    assert PASSWORD not in shown and ENCODED not in shown


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (
            f"connecting to postgresql://ops:{ENCODED}@db/chat failed",
            "connecting to postgresql://ops:***@db/chat failed",
        ),
        (  # a raw "@" in the password: the userinfo runs to the last "@" of the word
            "see postgres://ops:Tr0ub@dor@db/chat",
            "see postgres://ops:***@db/chat",
        ),
        ("host=db user=ops password=hunter2 dbname=chat", "host=db user=ops password=*** dbname=chat"),
        # libpq's quoting: a quoted value runs to the quote that no backslash escapes
        ("host=db password='it\\'s a \\\\ secret' dbname=chat", "host=db password=*** dbname=chat"),
        (
            "postgresql://ops@db/chat?sslmode=require&password=hunter2",
            "postgresql://ops@db/chat?sslmode=require&password=***",
        ),
        ("PASSWORD = hunter2", "PASSWORD = ***"),
        ("host=db sslpassword=TopSecret password=hunter2", "host=db sslpassword=*** password=***"),
        (
            "postgresql://ops@db/chat?sslpassword=TopSecret&sslmode=require",
            "postgresql://ops@db/chat?sslpassword=***&sslmode=require",
        ),
    ],
)
def test_free_text_is_masked_where_a_password_stands(text, masked):
    assert db.mask_text(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://ops@db.example.com/chat",
        "the password of ops was changed",
        "/var/backups/old_password=2024.jsonl",
        "user:name@example.com wrote",
    ],
)
def test_free_text_without_a_password_is_left_as_it_is(text):
    assert db.mask_text(text) == text


@pytest.mark.parametrize(
    ("argument", "masked"),
    [
        ("postgresql://ops:hunter2@db/chat", "postgresql://ops:***@db/chat"),
        ("--database-url=postgres://ops:hun ter2@db/chat", "--database-url=postgres://ops:***@db/chat"),
        ("postgresql://ops:a/b:c@db/chat", "postgresql://ops:***@db/chat"),
        (
            "postgresql://db/chat?sslmode=require&password=hun ter2&sslpassword=k ey",
            "postgresql://db/chat?sslmode=require&password=***&sslpassword=***",
        ),
        ("PGPASSWORD=hun ter2", "PGPASSWORD=***"),
        ("sslpassword=hunter2", "sslpassword=***"),
        ("host=db password='hun ter2' dbname=chat", "host=db password=*** dbname=chat"),
        ("purge", "purge"),
        ("90d", "90d"),
        ("postgresql://ops@db/chat", "postgresql://ops@db/chat"),
    ],
)
def test_a_command_line_argument_is_masked_to_its_ends(argument, masked):
    """An argument is one word however it was quoted: a password in it is masked whole,
    spaces included."""
    assert db.mask_argument(argument) == masked


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("host=db password=hunter2", "a libpq keyword/value string"),
        ("db.example.com:5432/chat", "does not start with postgresql://"),
        ("mysql://ops:hunter2@db/chat", "unsupported database URL scheme 'mysql'"),
        ("postgresql://ops:hunter2@x@db/chat", "write an '@' in them as %40"),
        ("postgresql://ops:hunter2@db:54x2/chat", "a port is not a number"),
        ("postgresql://ops:hunter2@db:70000/chat", "port 70000 is out of range"),
        ("postgresql://ops:hunter2@[::1/chat", "an IPv6 address in [ ] is not closed"),
        ("postgresql://ops:hunter2@[::1]x/chat", "something other than :port follows"),
        ("postgresql://ops:hunter2@db/chat?host=a,b&port=1,2,3", "do not pair up"),
        ("postgresql://ops:hunter2/chat", "a port is not a number"),  # the password is never shown
        ("postgresql://ops:hunter2@db1:1,db2:x/chat", "a port is not a number"),
        ("postgresql://ops:hunter2@db1,,db2/chat", "a host of its list of hosts is empty"),
        ("postgresql://ops:hunter2@db1,db2/chat?host=db3", "both before the database name and as host="),
    ],
)
def test_a_url_that_cannot_be_used_is_refused_without_echoing_it(raw, says):
    with pytest.raises(UsageError) as refused:
        db.parse_url(raw, "DATABASE_URL")
    message = refused.value.message
    assert says in message
    assert "DATABASE_URL" in message
    assert "hunter2" not in message and "ops" not in message


@pytest.mark.parametrize(
    ("raw", "target"),
    [
        (
            "postgresql+psycopg://ops:S3cr3t@db:5433/chat?sslmode=require",
            "postgresql://ops@db:5433/chat?sslmode=require",
        ),
        ("postgresql://ops@/chat?host=/tmp&password=S3cr3t", "postgresql://ops@/chat?host=%2Ftmp"),
    ],
)
def test_pgbench_gets_the_password_in_its_environment_not_its_command_line(raw, target):
    assert pgbench.libpq_target(db.parse_url(raw)) == (target, {"PGPASSWORD": "S3cr3t"})


def test_bench_refuses_a_secret_libpq_takes_only_on_the_command_line():
    with pytest.raises(UsageError, match="sslpassword"):
        pgbench.libpq_target(db.parse_url("postgresql://ops@db/chat?sslpassword=S3cr3t"))
