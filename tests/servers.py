"""Real servers for the production tests, started on loopback from Debian's packages:
PgBouncer in transaction pooling mode, and a PostgreSQL with TLS on and a certificate made
by a test CA (the embedded PostgreSQL wheel is built without TLS).

Each helper raises ``Unavailable`` with the reason when its program is missing, so that a
test can skip saying why; ``.ci/run`` installs them, and CI must skip none.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg


class Unavailable(Exception):
    """A program a test needs is not installed."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _program(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise Unavailable(f"{name} is not installed (Debian package {package})")
    return found


def postgres_bin() -> Path:
    """The newest Debian PostgreSQL server binaries (/usr/lib/postgresql/<ver>/bin)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name)
    )
    if not found:
        raise Unavailable("PostgreSQL server binaries are not installed (Debian package postgresql)")
    return Path(found[-1]).parent


def _as(user: str | None, argv: list[str]) -> list[str]:
    """Run as ``user`` when root (PostgreSQL and PgBouncer refuse to run as root)."""
    if user is None or os.geteuid() != 0:
        return argv
    return ["runuser", "-u", user, "--", *argv]


def _service_user(preferred: str) -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(preferred)
    except KeyError:
        raise Unavailable(f"no system user {preferred!r} to run the server as") from None
    return preferred


def _give(path: Path, user: str | None) -> None:
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def wait_until_accepting(conninfo: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(conninfo, connect_timeout=2) as connection:
                connection.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# --- TLS -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA that signed the server's certificate
    other_ca: Path  # a CA that did not
    server_cert: Path
    server_key: Path


def make_certificates(folder: Path) -> Certificates:
    """A test CA, a server certificate it signs for localhost and 127.0.0.1, and a second,
    unrelated CA."""
    openssl = _program("openssl", "openssl")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=folder)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other-ca"):
        run("req", "-x509", *key, "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
            "-subj", f"/CN=chatdb test {name}")  # fmt: skip
    run("req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.ext")  # fmt: skip
    return Certificates(
        folder / "ca.crt", folder / "other-ca.crt", folder / "server.crt", folder / "server.key"
    )


# --- a locale for the server's messages -----------------------------------------------------


def message_locale(folder: Path, name: str = "de_DE") -> tuple[str, dict[str, str]]:
    """A UTF-8 locale ``name`` for a server's ``lc_messages``, and the environment the
    server needs to find it: an installed one as it is, else one made by ``localedef``
    into ``folder`` (found through LOCPATH, so nothing is installed on the machine)."""
    installed = subprocess.run(["locale", "-a"], capture_output=True, text=True).stdout.split()
    for candidate in installed:
        if candidate.lower().replace("-", "") == f"{name.lower()}.utf8":
            return candidate, {}
    localedef = _program("localedef", "libc-bin")
    if not Path("/usr/share/i18n/locales", name).is_file():
        raise Unavailable(f"the definition of the locale {name} is not installed (Debian package locales)")
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [localedef, "-i", name, "-f", "UTF-8", str(folder / f"{name}.UTF-8")], check=True, capture_output=True
    )
    folder.chmod(0o755)
    return f"{name}.UTF-8", {"LOCPATH": str(folder)}


# --- a Debian PostgreSQL ---------------------------------------------------------------------


@dataclass
class DebianPostgres:
    """A PostgreSQL server of Debian's package in a scratch folder, TCP on 127.0.0.1 with
    TLS required (hostssl), and a Unix socket in its data folder."""

    data: Path
    port: int
    certificates: Certificates
    user: str | None  # the system user it runs as (when the tests run as root)
    env: dict[str, str] = field(default_factory=dict)  # more environment for the server

    @property
    def socket_dir(self) -> Path:
        return self.data

    def url(self, database: str = "postgres", role: str = "postgres", **query: str) -> str:
        params = "&".join(f"{key}={value}" for key, value in query.items())
        return f"postgresql://{role}@localhost:{self.port}/{database}" + (f"?{params}" if params else "")

    def socket_url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def pg_ctl(self, *args: str) -> None:
        command = [str(postgres_bin() / "pg_ctl"), "-D", str(self.data), *args]
        subprocess.run(
            _as(self.user, command),
            check=True,
            capture_output=True,
            timeout=120,
            env={**os.environ, **self.env},
        )

    def start(self) -> None:
        self.pg_ctl("-l", str(self.data / "server.log"), "-w", "start")

    def start_in_background(self) -> None:
        self.pg_ctl("-l", str(self.data / "server.log"), "start")

    def stop(self) -> None:
        self.pg_ctl("-m", "fast", "-w", "stop")


@contextmanager
def debian_postgres(
    folder: Path, *, settings: str = "", env: dict[str, str] | None = None
) -> Iterator[DebianPostgres]:
    """``settings``: more lines for postgresql.conf; ``env``: more environment for the
    server (LOCPATH, for a locale made in a scratch folder)."""
    binaries = postgres_bin()
    user = _service_user("postgres")
    certificates = make_certificates(folder / "tls")
    data = folder / "pgdata"
    data.mkdir()
    _give(folder, user)
    _give(data, user)
    data.chmod(0o700)
    subprocess.run(
        _as(user, [str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]),
        check=True,
        capture_output=True,
    )
    key = data / "server.key"
    shutil.copy(certificates.server_key, key)
    shutil.copy(certificates.server_cert, data / "server.crt")
    for path in (key, data / "server.crt"):
        _give(path, user)
    key.chmod(0o600)
    port = free_port()
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(
            f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{data}'\n"
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
            "fsync = off\nmax_connections = 50\n" + settings
        )
    (data / "pg_hba.conf").write_text(
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n"
    )
    server = DebianPostgres(data, port, certificates, user, dict(env or {}))
    server.start()
    try:
        yield server
    finally:
        subprocess.run(
            _as(user, [str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
            capture_output=True,
            env={**os.environ, **server.env},
        )


# --- PgBouncer -------------------------------------------------------------------------------


@dataclass
class PgBouncer:
    port: int
    folder: Path
    process: subprocess.Popen

    def url(self, database: str, role: str = "postgres") -> str:
        return f"postgresql://{role}@127.0.0.1:{self.port}/{database}"

    @property
    def log(self) -> str:
        path = self.folder / "pgbouncer.log"
        return path.read_text() if path.exists() else ""


@contextmanager
def pgbouncer(
    folder: Path,
    *,
    host: str,
    port: int,
    run_as: str | None,
    roles: tuple[str, ...] = ("postgres", "ops", "app"),
    pool_size: int = 20,
) -> Iterator[PgBouncer]:
    """PgBouncer in transaction pooling mode on 127.0.0.1, in front of ``host``:``port``
    (a Unix socket folder or a host name). Logins are trusted for ``roles``."""
    program = _program("pgbouncer", "pgbouncer")
    listen = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "userlist.txt").write_text("".join(f'"{role}" ""\n' for role in roles))
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={host} port={port}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {listen}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {folder / 'userlist.txt'}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {pool_size}\nmax_client_conn = 500\n"
        f"logfile = {folder / 'pgbouncer.log'}\npidfile = {folder / 'pgbouncer.pid'}\n"
        # Fail fast on a server that is down, as the tests wait for it only so long.
        "server_login_retry = 1\nserver_connect_timeout = 5\n"
    )
    _give(folder, run_as if os.geteuid() == 0 else None)
    command = [program, str(folder / "pgbouncer.ini")]
    if run_as is not None and os.geteuid() == 0:
        command[1:1] = ["-u", run_as]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    bouncer = PgBouncer(listen, folder, process)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {process.stderr.read().decode()} {bouncer.log}")
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield bouncer
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- a Citus cluster -------------------------------------------------------------------------


def citus_bin() -> Path:
    """The Debian PostgreSQL binaries that have the Citus extension installed beside them
    (``.ci/build-citus.sh`` builds and installs it)."""
    binaries = postgres_bin()
    pg_config = binaries / "pg_config"
    if not pg_config.exists():
        raise Unavailable(f"{pg_config} is missing (Debian package postgresql-server-dev-*)")
    libdir = subprocess.run([str(pg_config), "--pkglibdir"], capture_output=True, text=True, check=True)
    if not (Path(libdir.stdout.strip()) / "citus.so").exists():
        raise Unavailable(
            f"Citus is not installed for PostgreSQL {binaries.parent.name} (.ci/build-citus.sh builds it)"
        )
    return binaries


@dataclass
class CitusNode:
    data: Path
    port: int

    def conninfo(self, database: str = "postgres") -> str:
        return f"host=localhost port={self.port} user=postgres dbname={database}"


@dataclass
class CitusCluster:
    """A Citus coordinator and its workers, each a Debian PostgreSQL on localhost with
    ``shared_preload_libraries = 'citus'``. Citus keeps its metadata per database, so
    :meth:`create_database` makes the database on every node and registers the workers."""

    coordinator: CitusNode
    workers: list[CitusNode]
    user: str | None

    @property
    def nodes(self) -> list[CitusNode]:
        return [self.coordinator, *self.workers]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@localhost:{self.coordinator.port}/{database}"

    def create_database(self, name: str, template: str | None = None) -> None:
        """``name`` on every node; a copy of ``template`` on each node when given (one that
        :meth:`make_template` made), else new, with Citus and the workers registered."""
        for node in self.nodes:
            with psycopg.connect(node.conninfo(), autocommit=True) as connection:
                if template is not None:
                    connection.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
                    continue
                connection.execute(f'CREATE DATABASE "{name}"')
            with psycopg.connect(node.conninfo(name), autocommit=True) as connection:
                connection.execute("CREATE EXTENSION citus")
        if template is not None:
            return
        with psycopg.connect(self.coordinator.conninfo(name), autocommit=True) as connection:
            connection.execute("SELECT citus_set_coordinator_host('localhost', %s)", (self.coordinator.port,))
            for worker in self.workers:
                connection.execute("SELECT citus_add_node('localhost', %s)", (worker.port,))

    def make_template(self, name: str) -> None:
        """Make database ``name`` a template on every node: the copies made from it agree
        across the nodes, as its metadata and shards do (a copy takes a file copy per node,
        where a new database takes Citus's set-up and chatdb's migration). No session may
        be in a template while it is copied, so its sessions (Citus's maintenance daemon
        among them) are ended and new ones refused."""
        for node in self.nodes:
            with psycopg.connect(node.conninfo(), autocommit=True) as connection:
                connection.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
                connection.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )
                deadline = time.monotonic() + 60
                while connection.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)
                ).fetchone() != (0,):
                    assert time.monotonic() < deadline, f"sessions stayed in {name}"
                    time.sleep(0.05)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` on every node. Each node's Citus maintenance daemon keeps sessions
        in the database on the other nodes, and opens them again when they end, so every
        node first refuses new sessions to it; then each drop ends the ones left."""
        for node in self.nodes:
            with psycopg.connect(node.conninfo(), autocommit=True) as connection:
                if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                    connection.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        for node in self.nodes:
            with psycopg.connect(node.conninfo(), autocommit=True) as connection:
                # FORCE waits 5 s for the sessions it ends; on a loaded machine one can take
                # longer to go, so the drop is tried again.
                for attempt in range(5):
                    try:
                        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                        break
                    except psycopg.errors.ObjectInUse:
                        if attempt == 4:
                            raise
                        time.sleep(1)


@contextmanager
def citus_cluster(folder: Path, workers: int = 2, shared_buffers: str = "32MB") -> Iterator[CitusCluster]:
    """A coordinator and ``workers`` workers on loopback ports, trusting local logins.
    The nodes reach each other over TCP on localhost, as Citus requires. The tests keep
    ``shared_buffers`` small, for three servers on a small machine; a benchmark passes
    PostgreSQL's default."""
    binaries = citus_bin()
    user = _service_user("postgres")
    _give(folder, user)
    nodes = []
    for index in range(workers + 1):
        data = folder / f"node{index}"
        data.mkdir()
        _give(data, user)
        data.chmod(0o700)
        subprocess.run(
            _as(user, [str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]),
            check=True,
            capture_output=True,
        )
        port = free_port()
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {port}\nunix_socket_directories = '{data}'\n"
                "shared_preload_libraries = 'citus'\n"
                # Eight shards per table keep a test's database quick to build while
                # each worker holds several.
                f"shared_buffers = {shared_buffers}\nmax_connections = 100\nfsync = off\n"
                "citus.shard_count = 8\n"
            )
        nodes.append(CitusNode(data, port))
    started: list[CitusNode] = []
    pg_ctl = str(binaries / "pg_ctl")
    try:
        for node in nodes:
            log = str(node.data / "server.log")
            command = [pg_ctl, "-D", str(node.data), "-l", log, "-w", "start"]
            subprocess.run(_as(user, command), check=True, capture_output=True, timeout=120)
            started.append(node)
        yield CitusCluster(nodes[0], nodes[1:], user)
    finally:
        for node in started:
            subprocess.run(
                _as(user, [pg_ctl, "-D", str(node.data), "-m", "immediate", "-w", "stop"]),
                capture_output=True,
            )
