"""Secrets and connection input: a password is never shown, on any stream, the JSON
included; a URL that cannot be used exits 2 with one line that does not echo it; a bad
port or connection parameter exits 2; waiting for a server shows on a terminal and nowhere
else; ``--connect-timeout`` states its default.

"Never shown" is checked against a corpus of passwords chosen to break parsers and
maskers. The oracle: no output holds the password, or any piece of it longer than two
characters (for the percent-encoded form, the pieces that hold a ``%``). For passwords
too short to have such pieces, and for the words ``postgres``/``postgresql`` that the
scheme itself contains, the meaningful check is structural: the URL is shown exactly as
``user:***@host...`` with its scheme intact, and a URL that cannot be used is not echoed at
all (its user name never appears).

Connections go to real servers: nothing listening on a free local port, the session's
server, and a server of this module's own that requires passwords (the session's server
trusts local logins), with a role given each password of the corpus.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from conftest import CliResult, scratch_folder
from psycopg import sql
from psycopg.conninfo import make_conninfo
from servers import free_port

from chatdb import db, embedded
from chatdb.errors import UsageError

CHATDB = str(Path(sys.executable).with_name("chatdb"))

PASSWORDS = [
    "@",
    "%40",
    ":",
    "/",
    "#",
    "?",
    "Zx9 Qw8 Jv7",  # spaces
    "пароль-密码-ключ🔑",  # beyond ASCII
    "postgres",  # the scheme's own words
    "postgresql",
    "p",  # one character
    "Vq7#xK2@" * 25,  # 200 characters, with a raw "@" and "#"
    "O'Re\"il\\ly",  # quotes and a backslash (libpq's keyword/value quoting)
]
assert len(PASSWORDS[-2]) == 200
SCHEME_WORDS = {"postgres", "postgresql"}

#: URLs that cannot be used, with the password percent-encoded ({pw}) or raw ({raw}).
MALFORMED = [
    "postgres//someone:{pw}@localhost/chat",
    "postgresql:/someone:{pw}@localhost/chat",
    "postgresql://someone:{pw}@localhost:abc/chat",
    "postgresql://someone:{pw}@localhost:99999/chat",
    "postgresql://someone:{pw}@localhost/chat?port=abc",
    "postgresql://someone:{pw}@localhost/chat?port=5432&port=5433",
    "postgresql://someone@localhost:abc/chat?password={pw}",
    "postgresql://someone:{raw}@localhost:abc/chat",
    "postgresql://someone:{raw}@localhost:99999/chat",
    "postgres//someone:{raw}@localhost/chat",
]


def encoded(password: str) -> str:
    return quote(password, safe="")


def keyword_string(password: str) -> str:
    """A libpq keyword/value string, quoted as libpq reads it."""
    return make_conninfo("", host="localhost", user="someone", password=password)


def pieces(password: str) -> set[str]:
    """What must never be shown: every piece of three characters of the password, and of
    its percent-encoded form those that hold a '%' and are not one whole escape ("%40" is
    the one character "@", and a hint about encoding shows it). A password of one or two
    characters has no such pieces: for those the checks are structural."""
    if len(password) < 3:
        return set()
    found = {password[i : i + 3] for i in range(len(password) - 2)}
    form = encoded(password)
    found |= {
        form[i : i + 3]
        for i in range(len(form) - 2)
        if "%" in form[i : i + 3] and not re.fullmatch(r"%[0-9A-F]{2}", form[i : i + 3])
    }
    return found


def shown(result) -> str:
    """Everything printed, with the strings of a JSON document on stdout decoded (JSON
    escapes a quote or a backslash, which would hide it from a plain search)."""
    text = result.stdout + "\n" + result.stderr
    if result.stdout.strip().startswith("{"):
        payload = json.loads(result.stdout)
        text += "\n" + "\n".join(str(value) for value in payload.values())
    return text


def assert_not_shown(result, password: str, public: tuple[str, ...] = ()) -> None:
    """No piece of the password in what the command showed. ``public`` are texts of the URL
    that are no secret (a socket folder whose random name may hold a piece by chance)."""
    text = shown(result)
    for known in public:
        text = text.replace(known, "<public>")
    assert "Traceback" not in text, text
    # Masking by structure replaces the password where it stands; masking by searching
    # for its characters left "***ostgresql://" or "***ql://" behind.
    assert not re.search(r"\*\*\*\w|\w\*\*\*", text), text
    if password in SCHEME_WORDS:
        visible = re.sub(r"postgres(ql)?://|PostgreSQL", "", text)
        assert password not in visible, text
        return
    for piece in pieces(password):
        assert piece not in text, (piece, text)


def error_line(result) -> str:
    """The one ``error:`` line on stderr (a ``hint:`` line may follow); never a traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert lines[-1] == errors[0] or (lines[-1].startswith("hint:") and lines[-2] == errors[0]), result.stderr
    return errors[0]


def json_error(result, command: str, code: int) -> str:
    payload = json.loads(result.stdout)
    assert result.stdout.strip().count("\n") == 0, result.stdout
    assert payload["command"] == command and payload["ok"] is False and payload["exit_code"] == code
    return payload["error"]


# --- the masking functions (no database) ---------------------------------------------------


@pytest.mark.parametrize("password", PASSWORDS)
def test_a_url_is_shown_with_its_password_replaced_whole(password):
    url = db.parse_url(f"postgresql://someone:{encoded(password)}@db.example.com:5432/appdb")
    assert url.password == password  # the password the connection uses
    assert db.mask_url(url) == "postgresql://someone:***@db.example.com:5432/appdb"
    in_query = db.parse_url(
        f"postgres://someone@db.example.com/appdb?sslmode=require&password={encoded(password)}"
    )
    assert in_query.query["password"] == password
    assert db.mask_url(in_query) == "postgresql://someone@db.example.com/appdb?password=***&sslmode=require"


@pytest.mark.parametrize("password", PASSWORDS)
def test_free_text_is_masked_by_structure(password):
    """Text chatdb did not write (a driver's message, a recorded argument) is masked where a
    password stands in a URL or a keyword/value string, and nowhere else."""
    keywords = keyword_string(password)
    text = f"could not use {keywords} (connecting as someone)"
    assert (
        db.mask_text(text) == "could not use host=localhost user=someone password=*** (connecting as someone)"
    )
    url = f"postgresql://someone:{encoded(password)}@db.example.com/appdb"
    text = f"cannot connect to {url}: Connection refused"
    assert (
        db.mask_text(text)
        == "cannot connect to postgresql://someone:***@db.example.com/appdb: Connection refused"
    )
    if not re.search(r"\s", password):  # a raw "@" too: the userinfo runs to the last "@"
        raw = f"cannot connect to postgresql://someone:{password}@db.example.com/appdb: refused"
        assert db.mask_text(raw) == "cannot connect to postgresql://someone:***@db.example.com/appdb: refused"


def test_masking_never_touches_what_is_not_a_password():
    for text in (
        "postgresql://someone@db.example.com/postgres",
        "postgres://p@db.example.com:5432/p?sslmode=require&application_name=p",
        "/var/backups/password=2024.jsonl",  # an export path is not a keyword string
        "expected postgresql://user@host:port/dbname",
    ):
        assert db.mask_text(text) == text


def test_a_raw_at_sign_in_the_password_is_refused_and_not_shown():
    """libpq and SQLAlchemy both end the userinfo at the *first* "@": connecting with this
    URL would use the password "Tr0ub" and the host "dor99@127.0.0.1" (shown before as
    ops:***@dor99@...). A host holding an "@" is never meant, so it is refused."""
    with pytest.raises(UsageError) as refused:
        db.parse_url("postgresql://ops:Tr0ub@dor99@127.0.0.1:55510/s4", "CHATDB_DATABASE_URL")
    message = refused.value.message
    assert message.startswith("malformed database URL from CHATDB_DATABASE_URL: ")
    assert "%40" in message
    assert "Tr0ub" not in message and "dor99" not in message and "ops" not in message
    encoded_at = db.parse_url("postgresql://ops:Tr0ub%40dor99@127.0.0.1:55510/s4")
    assert encoded_at.password == "Tr0ub@dor99" and encoded_at.host == "127.0.0.1"
    assert db.mask_url(encoded_at) == "postgresql://ops:***@127.0.0.1:55510/s4"


# --- malformed URLs, by flag and by both environment variables (no database) --------------


def malformed_cases(password: str) -> Iterator[str]:
    for template in MALFORMED:
        yield template.format(pw=encoded(password), raw=password)
    yield keyword_string(password)


@pytest.mark.parametrize("password", PASSWORDS)
def test_malformed_urls_exit_2_and_are_never_echoed(cli, password):
    grants = ["grants", "--app-role", "chatbot", "--ops-role", "chatdb_ops"]
    for url in malformed_cases(password):
        runs = [
            ("--database-url", ["status", "--database-url", url], {}),
            ("--database-url", ["--database-url", url, "migrate", "status", "--json"], {}),
            ("--database-url", [*grants, "--database-url", url], {}),
            ("CHATDB_DATABASE_URL", ["status", "--json"], {"CHATDB_DATABASE_URL": url}),
            ("CHATDB_DATABASE_URL", grants, {"CHATDB_DATABASE_URL": url}),
            ("DATABASE_URL", ["migrate", "status"], {"DATABASE_URL": url}),
            ("DATABASE_URL", [*grants, "--json"], {"DATABASE_URL": url}),
        ]
        for source, args, env in runs:
            result = cli(*args, env=env)
            case = (url, args, env)
            assert result.exit_code == 2, (case, result.output)
            line = error_line(result)
            assert f"malformed database URL from {source}" in line, (case, line)
            if "--json" in args:
                command = (
                    "grants" if "grants" in args else ("migrate status" if "migrate" in args else "status")
                )
                assert json_error(result, command, 2) == line.removeprefix("error: ")
            else:
                assert result.stdout == ""
            assert "someone" not in shown(result), case  # nothing of the URL is echoed
            assert_not_shown(result, password)


def chatdb(*args: str) -> CliResult:
    done = subprocess.run([sys.executable, "-m", "chatdb", *args], capture_output=True, text=True, timeout=60)
    return CliResult(done.returncode, done.stdout, done.stderr)


# Spaces, a raw "@" and "#", quotes and a backslash: what could end a masked part early.
@pytest.mark.parametrize("password", [PASSWORDS[6], PASSWORDS[-2], PASSWORDS[-1]])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_url_given_where_no_argument_goes_is_never_echoed(password, as_json):
    """A URL typed without --database-url, or after an option that takes something else:
    the usage error names the argument, masked."""
    url = f"postgresql://someone:{password}@db.example.com/appdb"
    for args in (
        ["purge", "--older-than", "3d", url],
        ["status", "--connect-timeout", url],
        ["archive", "--older-than", url],
    ):
        # The real program: Typer's usage errors are rendered by chatdb's entry point.
        result = chatdb(*args, *(["--json"] if as_json else []))
        assert result.exit_code == 2, (args, result.output)
        line = error_line(result)
        assert_not_shown(result, password)
        if as_json:
            assert json_error(result, args[0], 2) == line.removeprefix("error: ")


# --- bad ports and parameters exit 2 with one line (item 4) --------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://ops:secret@127.0.0.1/chat?port=abc", "a port is not a number"),
        ("postgresql://ops:secret@127.0.0.1/chat?port=5432&port=5433", "host and port parameters"),
        ("postgresql://ops:secret@127.0.0.1/chat?host=a&host=b&port=5432", "host and port parameters"),
        ("postgresql://ops:secret@127.0.0.1/chat?host=a:x&host=b:5432", "host and port parameters"),
        ("postgresql://ops:secret@127.0.0.1/chat?host=a,b&port=1,99999", "port 99999 is out of range"),
        ("postgresql://ops:secret@127.0.0.1/chat?port=70000", "port 70000 is out of range"),
        ("postgres://u:secret@host:99999/db", "port 99999 is out of range"),
        ("postgres://u:secret@127.0.0.1:0/db", "port 0 is out of range"),
        ("postgres://u:secret@127.0.0.1:\uff15\uff14\uff13\uff12/db", "a port is not a number"),  # fullwidth
        ("postgres://u:secret@[::1:5432/db", "IPv6"),
        ("postgresql://ops:secret@127.0.0.1:1/chat?connect_timeout=abc", "connect_timeout"),
    ],
)
def test_bad_ports_and_parameters_exit_2_with_one_line(cli, url, says):
    for args in (["status", "--database-url", url], ["status", "--json", "--database-url", url]):
        result = cli(*args, "--connect-timeout", "0")
        assert result.exit_code == 2, result.output
        line = error_line(result)
        assert says in line, line
        assert "internal error" not in line and "resolve" not in line
        assert "secret" not in shown(result)


# --- connection errors, against real servers ------------------------------------------------


@pytest.mark.parametrize("key", ["sslpassword", "Password"])
def test_a_password_parameter_of_any_name_is_never_shown(cli, key):
    """The client key's passphrase (sslpassword), and a password parameter misspelt, which
    libpq refuses by repeating the URL."""
    url = f"postgresql://ops:hunter2@127.0.0.1:{free_port()}/chat?{key}=TopSecretKeyPass"
    for as_json in ([], ["--json"]):
        result = cli("status", *as_json, "--connect-timeout", "0", "--database-url", url)
        assert result.exit_code in (2, 3), result.output
        assert "hunter2" not in shown(result)
        assert "TopSecretKeyPass" not in shown(result), shown(result)


@pytest.mark.parametrize("password", PASSWORDS)
def test_unreachable_server_and_bad_parameters_never_show_the_password(cli, password):
    port = free_port()  # nothing listens there: connection refused
    display = f"postgresql://someone:***@127.0.0.1:{port}/appdb"
    forms = [f"postgresql://someone:{encoded(password)}@127.0.0.1:{port}/appdb"]
    if "@" not in password:  # typed raw, as people do; a raw "@" is refused (above)
        forms.append(f"postgresql://someone:{password}@127.0.0.1:{port}/appdb")
    for url in forms:
        for as_json in ([], ["--json"]):
            result = cli("status", *as_json, "--connect-timeout", "0", "--database-url", url)
            assert result.exit_code == 3, result.output
            assert f"cannot connect to {display}: Connection refused" in error_line(result)
            if as_json:
                assert display in json_error(result, "status", 3)
            assert_not_shown(result, password)
        for parameter, says in (
            ("sslmode=bogus", "sslmode"),
            ("connect_timeout=abc", "connect_timeout"),
            ("foo=bar", '"foo"'),
        ):
            result = cli(
                "--connect-timeout", "0", "migrate", "status", "--database-url", f"{url}?{parameter}"
            )
            assert result.exit_code == 2, result.output
            line = error_line(result)
            assert f"bad connection parameter for {display}?{parameter}" in line and says in line, line
            assert_not_shown(result, password)
    in_query = f"postgresql://someone@127.0.0.1:{port}/appdb?password={encoded(password)}&sslmode=disable"
    result = cli("status", "--json", "--connect-timeout", "0", "--database-url", in_query)
    assert result.exit_code == 3, result.output
    assert f"postgresql://someone@127.0.0.1:{port}/appdb?password=***&sslmode=disable" in error_line(result)
    assert_not_shown(result, password)


@pytest.mark.parametrize("password", PASSWORDS)
def test_grants_with_a_password_in_the_url_never_shows_it(cli, password):
    url = f"postgresql://someone:{encoded(password)}@db.example.com/chat_prod"
    for as_json in ([], ["--json"]):
        result = cli(
            "grants", "--app-role", "chatbot", "--ops-role", "chatdb_ops", *as_json, env={"DATABASE_URL": url}
        )
        assert result.exit_code == 0, result.output
        assert "GRANT CONNECT, TEMPORARY ON DATABASE chat_prod TO chatdb_ops;" in shown(result)
        assert_not_shown(result, password)


@pytest.fixture(scope="module")
def password_server() -> Iterator[dict[str, str]]:
    """A PostgreSQL of this module's own that asks every role but the superuser for its
    password, with a database ``chatdb_secrets``, a role ``chatdb_wrong`` whose password is
    none of the corpus, and a role ``chatdb_secret`` whose password each test sets."""
    with scratch_folder("chatdb-test-secrets-") as folder:
        server, url = embedded.scratch_server(folder / "pgdata")
        socket_dir = url.query["host"]
        admin = f"host={socket_dir} user={embedded.SUPERUSER} dbname=postgres"
        try:
            with psycopg.connect(admin, autocommit=True) as connection:
                connection.execute("CREATE DATABASE chatdb_secrets")
                connection.execute("CREATE ROLE chatdb_wrong LOGIN PASSWORD 'Gq4-not-in-the-corpus'")
                connection.execute("CREATE ROLE chatdb_secret LOGIN")
                (Path(server.pgdata) / "pg_hba.conf").write_text(
                    f"local all {embedded.SUPERUSER} trust\n"
                    "local all all scram-sha-256\n"
                    "host all all 127.0.0.1/32 scram-sha-256\n"
                )
                connection.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 60  # the reload is asynchronous
            while True:
                try:
                    psycopg.connect(f"host={socket_dir} user=chatdb_wrong dbname=chatdb_secrets").close()
                except psycopg.OperationalError:
                    break
                assert time.monotonic() < deadline, "pg_hba.conf was never reloaded"
                time.sleep(0.05)
            yield {"admin": admin, "socket": socket_dir}
        finally:
            server.cleanup()


@pytest.mark.parametrize("password", PASSWORDS)
def test_logins_with_the_password_never_show_it(password_server, cli, password):
    with psycopg.connect(password_server["admin"], autocommit=True) as connection:
        connection.execute(sql.SQL("ALTER ROLE chatdb_secret PASSWORD {}").format(sql.Literal(password)))
    socket_dir = quote(password_server["socket"], safe="")
    public = (socket_dir, password_server["socket"])

    def url(role: str, database: str = "chatdb_secrets", query: str = "") -> str:
        return f"postgresql://{role}:{encoded(password)}@/{database}?host={socket_dir}{query}"

    def display(role: str, database: str = "chatdb_secrets", query: str = "") -> str:
        return f"postgresql://{role}:***@/{database}?host={socket_dir}{query}"

    # The wrong password: refused at once (exit 3), by the server itself.
    for as_json in ([], ["--json"]):
        result = cli("status", *as_json, "--connect-timeout", "30", "--database-url", url("chatdb_wrong"))
        assert result.exit_code == 3, result.output
        line = error_line(result)
        assert f"cannot connect to {display('chatdb_wrong')}: password authentication failed" in line, line
        assert_not_shown(result, password, public)

    # The right one: the command works and shows no password, in text or JSON.
    for args in (["status", "--json"], ["migrate", "status"]):
        result = cli(*args, "--database-url", url("chatdb_secret"))
        assert result.exit_code == 0, result.output
        assert_not_shown(result, password, public)
    assert json.loads(cli("status", "--json", "--database-url", url("chatdb_secret")).stdout)["user"] == (
        "chatdb_secret"
    )

    # Past the login: an unknown database, and a setting the server refuses.
    result = cli(
        "status", "--connect-timeout", "30", "--database-url", url("chatdb_secret", "chatdb_nowhere")
    )
    assert result.exit_code == 3, result.output
    assert f"{display('chatdb_secret', 'chatdb_nowhere')}: database" in error_line(result)
    assert_not_shown(result, password, public)
    refused = "&options=-c%20work_mem%3Dlots"
    result = cli("status", "--json", "--database-url", url("chatdb_secret", query=refused))
    assert result.exit_code == 2, result.output
    assert "work_mem" in error_line(result)
    assert_not_shown(result, password, public)

    # By environment variable, with the password in the query instead.
    in_query = f"postgresql://chatdb_secret@/chatdb_nowhere?host={socket_dir}&password={encoded(password)}"
    for variable in ("CHATDB_DATABASE_URL", "DATABASE_URL"):
        result = cli("status", "--json", env={variable: in_query})
        assert result.exit_code == 3, result.output
        assert "password=***" in error_line(result)
        assert_not_shown(result, password, public)


# --- waiting for a server (item 11) ---------------------------------------------------------


def subprocess_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "CHATDB_DATABASE_URL", "PGPASSWORD", "PGSERVICE", "NO_COLOR")
    }
    env.update(TERM="xterm-256color", COLUMNS="200")
    return env


def run_on_terminal(args: list[str], on_screen=None, timeout: float = 60.0) -> tuple[int, str]:
    """Run the real ``chatdb`` with stdout and stderr on a pseudo-terminal; call
    ``on_screen(screen)`` whenever more output arrives. Returns (exit code, all output)."""
    master, slave = os.openpty()
    try:
        process = subprocess.Popen(
            [CHATDB, *args],
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=slave,
            env=subprocess_env(),
            start_new_session=True,
        )
    finally:
        os.close(slave)
    screen = b""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not data:
                break
            screen += data
            if on_screen is not None:
                on_screen(screen.decode(errors="replace"))
        code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    return code, screen.decode(errors="replace")


def test_waiting_is_shown_on_a_terminal_with_the_masked_url():
    port = free_port()
    args = [
        "status",
        "--connect-timeout",
        "2",
        "--database-url",
        f"postgresql://ops:Hx7-hunter2@127.0.0.1:{port}/chat",
    ]
    code, screen = run_on_terminal(args)
    assert code == 3, screen
    waiting = f"waiting for postgresql://ops:***@127.0.0.1:{port}/chat ("
    assert waiting in screen, repr(screen)
    assert re.search(re.escape(waiting) + r"\d s of 2 s\)", screen), repr(screen)
    assert "Hx7" not in screen and "hunter2" not in screen
    # The waiting line is erased before the one error line.
    after = screen[screen.rindex(waiting) :]
    assert "\x1b[2K" in after[: after.index("error:")], repr(after)
    assert "Traceback" not in screen


def test_waiting_is_silent_off_a_terminal():
    """A cron job sees the error line and nothing else."""
    port = free_port()
    args = [
        "status",
        "--connect-timeout",
        "1",
        "--database-url",
        f"postgresql://ops:Hx7-hunter2@127.0.0.1:{port}/chat",
    ]
    done = subprocess.run([CHATDB, *args], capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert done.returncode == 3, done
    assert done.stdout == ""
    assert done.stderr.startswith("error: cannot connect to ") and done.stderr.count("\n") == 1, done.stderr
    assert "waiting" not in done.stderr and "\x1b" not in done.stderr


@contextmanager
def forwarder(target: str) -> Iterator[tuple[int, threading.Event]]:
    """A TCP port on 127.0.0.1 where nothing listens until the event is set; from then on
    each connection is relayed to the Unix socket ``target`` (a real server)."""
    port = free_port()
    start = threading.Event()
    done = threading.Event()

    def relay(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        start.wait()
        if done.is_set():
            return
        with socket.create_server(("127.0.0.1", port)) as listener:
            listener.settimeout(0.2)
            while not done.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                server = socket.socket(socket.AF_UNIX)
                server.connect(target)
                for pair in ((client, server), (server, client)):
                    threading.Thread(target=relay, args=pair, daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port, start
    finally:
        done.set()
        start.set()
        thread.join(10)


def test_waiting_ends_and_is_erased_when_the_server_answers(empty_db):
    """The server comes up only once the waiting line is on the screen (no timing)."""
    socket_dir = empty_db.url.query.get("host")
    if not isinstance(socket_dir, str) or not socket_dir.startswith("/"):
        pytest.skip("relays to the test server's Unix socket (TEST_DATABASE_URL names none)")
    server_port = empty_db.scalar("SELECT current_setting('port')")
    with forwarder(f"{socket_dir}/.s.PGSQL.{server_port}") as (port, start):
        url = f"postgresql://{empty_db.url.username}:Hx7-hunter2@127.0.0.1:{port}/{empty_db.name}"
        waiting = f"waiting for postgresql://{empty_db.url.username}:***@127.0.0.1:{port}/{empty_db.name} ("

        def on_screen(screen: str) -> None:
            if waiting in screen:
                start.set()

        code, screen = run_on_terminal(
            ["status", "--connect-timeout", "60", "--database-url", url], on_screen
        )
    assert code == 0, screen
    assert waiting in screen, repr(screen)
    after = screen[screen.rindex(waiting) :]
    assert "\x1b[2K" in after[: after.index("PostgreSQL ")], repr(after)
    assert "Hx7" not in screen and "hunter2" not in screen


# --- --connect-timeout states its default (item 14) -----------------------------------------


@pytest.mark.parametrize("command", [[], ["status"], ["migrate", "status"]])
def test_connect_timeout_help_shows_its_default(cli, command):
    result = cli(*command, "--help")
    assert result.exit_code == 0, result.output
    flat = re.sub(r"[\s│]+", " ", result.stdout)
    assert re.search(r"--connect-timeout [^-]*\[default: 10\]", flat), flat
