"""A bench run: checks, bench's own users, the phases and the capacity search, cleanup."""

from __future__ import annotations

import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL

from chatdb import citus, migrations, privileges
from chatdb.bench import pgbench, stats, workload
from chatdb.bench.stats import PatternFigures
from chatdb.bench.workload import Budget, Keys
from chatdb.errors import StateError, UsageError

#: Progress: (what runs, seconds elapsed, seconds in all or None when unknown).
Progress = Callable[[str, float, float | None], None]

DEFAULT_CLIENTS = 100
DEFAULT_SECONDS = 60
#: Where the capacity search starts (unless --min-capacity says), and how close it gets.
START_RATE = 100.0
MIN_RATE = 1.0
PRECISION = 0.10
#: A transaction already this late when its turn comes is skipped, and counts as missed:
#: a run that falls behind its schedule does not queue up without end.
MIN_LATENCY_LIMIT_MS = 1000.0
#: pgbench runs this long past the transactions measured (see _phase).
GRACE_SECONDS = 1
#: The longest a --while command is measured.
MAX_WHILE_SECONDS = 86_400
#: Transactions of the key-cost measurement, and the cost above which it is worth a note.
KEY_COST_TRANSACTIONS = 600
KEY_COST_NOTICEABLE_MS = 0.1
#: The advisory lock class of bench runs ("benc"); the run's token is the other half.
_LOCK_CLASS = 0x62656E63
_ABORTED = re.compile(r"client \d+ script (\d+) aborted")


@dataclass(frozen=True)
class BenchRequest:
    clients: int = DEFAULT_CLIENTS
    rate: float | None = None
    min_capacity: float | None = None
    max_rate: float | None = None
    seconds: int = DEFAULT_SECONDS
    mix: dict[str, int] = field(default_factory=lambda: dict(workload.DEFAULT_MIX))
    budgets: tuple[Budget, ...] = ()  # overrides of the defaults
    while_command: tuple[str, ...] | None = None
    log_dir: Path | None = None  # keep pgbench's scripts and logs there

    def validate(self) -> list[Budget]:
        """Refuse impossible requests (UsageError); return the budgets that apply."""
        if self.clients < 1:
            raise UsageError(f"--clients must be at least 1, not {self.clients}")
        if self.seconds < 1:
            raise UsageError("--duration must be at least one second")
        for option, value in (("--rate", self.rate), ("--min-capacity", self.min_capacity)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UsageError(
                    f"{option} must be a number of transactions per second above zero, not {value:g}"
                )
        if self.max_rate is not None and not (math.isfinite(self.max_rate) and self.max_rate > 0):
            raise UsageError(f"--max-rate must be above zero, not {self.max_rate:g}")
        if self.rate is not None and self.min_capacity is not None:
            raise UsageError("--min-capacity applies to the capacity search: give it or --rate, not both")
        if self.rate is not None and self.max_rate is not None:
            raise UsageError("--max-rate bounds the capacity search: give it or --rate, not both")
        if self.min_capacity is not None and self.max_rate is not None and self.min_capacity > self.max_rate:
            raise UsageError("--min-capacity is above --max-rate: the search could never reach it")
        if self.while_command is not None and not self.while_command:
            raise UsageError('--while needs a chatdb command, such as "purge --older-than 90d"')
        return workload.budgets_for(self.mix, self.budgets)


@dataclass(frozen=True)
class CommandOutcome:
    """The --while command: how it ended and what it said."""

    argv: tuple[str, ...]
    exit_code: int
    seconds: float
    stdout: str
    stderr: str


@dataclass
class Phase:
    name: str  # "alone" or "during"
    rate_tps: float
    seconds: float
    patterns: list[PatternFigures]
    errors: list[str] = field(default_factory=list)
    command: CommandOutcome | None = None
    log: Path | None = None  # pgbench's log files are this path with a suffix

    @property
    def ok(self) -> bool:
        return not self.errors and all(p.ok for p in self.patterns)

    @property
    def tps(self) -> float:
        return sum(p.transactions for p in self.patterns) / self.seconds if self.seconds > 0 else 0.0

    def missed(self) -> list[str]:
        """What went wrong, by budget key (``insert.p95``) or ``pattern.failures``."""
        missed = []
        for p in self.patterns:
            if p.failures:
                missed.append(f"{p.pattern}.failures")
            missed += [r.budget.key for r in p.budgets if r.status != stats.OK]
        return missed


@dataclass(frozen=True)
class Step:
    """One rate the capacity search tried."""

    rate_tps: float
    ok: bool
    tps: float
    missed: list[str]


@dataclass(frozen=True)
class Removed:
    users: int = 0
    conversations: int = 0
    messages: int = 0
    runs: int = 0  # runs whose rows were removed
    running: int = 0  # runs still going, whose rows were left alone

    def __add__(self, other: Removed) -> Removed:
        return Removed(
            self.users + other.users,
            self.conversations + other.conversations,
            self.messages + other.messages,
            self.runs + other.runs,
            self.running + other.running,
        )


@dataclass
class BenchResult:
    request: BenchRequest
    budgets: list[Budget]
    mix: dict[str, int]  # as run: without what was left out
    left_out: dict[str, str]  # pattern -> why
    pgbench: str
    rate_tps: float  # the rate of the figures reported
    capacity_tps: float | None  # without --rate: the highest rate that held (None: none did)
    capacity_capped: bool  # the search stopped at --max-rate, still holding
    steps: list[Step]
    phases: list[Phase]
    key_cost_ms: float | None
    messages_estimate: int
    users_created: int
    removed: Removed  # bench's own rows, at the end
    leftovers: Removed  # rows of earlier runs that died, removed at the start

    @property
    def judged(self) -> Phase:
        """Budgets apply to the figures measured while the --while command ran, if any."""
        return self.phases[-1]

    @property
    def capacity_ok(self) -> bool:
        minimum = self.request.min_capacity
        if self.request.rate is not None:
            return True
        if minimum is None:
            return self.capacity_tps is not None
        return self.capacity_tps is not None and self.capacity_tps >= minimum

    @property
    def command_ok(self) -> bool:
        command = self.judged.command
        return command is None or command.exit_code == 0

    @property
    def ok(self) -> bool:
        return self.judged.ok and self.capacity_ok and self.command_ok


# --- checks --------------------------------------------------------------------------------


def _check_clients(connection: Connection, clients: int) -> None:
    """Refuse more clients than the server has connections for. Through a pooler (which
    multiplexes clients onto fewer server connections) the server's limit does not apply:
    a pooler answers the startup with a backend key of its own, not the server's pid."""
    if (
        connection.connection.dbapi_connection.info.backend_pid
        != connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
    ):
        return
    maximum, superuser_reserved, reserved, usable_reserved, in_use = connection.execute(
        text(
            "SELECT current_setting('max_connections')::int,"
            " CASE WHEN r.rolsuper THEN 0 ELSE current_setting('superuser_reserved_connections')::int END,"
            " coalesce(current_setting('reserved_connections', true), '0')::int,"
            " r.rolsuper OR CASE WHEN to_regrole('pg_use_reserved_connections') IS NULL THEN false"
            "  ELSE pg_has_role(current_user, 'pg_use_reserved_connections', 'MEMBER') END,"
            " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int"
            " FROM pg_roles r WHERE r.rolname = current_user"
        )
    ).one()
    closed = superuser_reserved + (0 if usable_reserved else reserved)
    free = maximum - closed - in_use - 1  # one more connection holds the run's guard
    if clients > free:
        held = f", {closed} reserved for other roles" if closed else ""
        raise UsageError(
            f"--clients {clients} is more than the server allows: max_connections is {maximum}{held}, "
            f"{in_use} in use, and bench holds one more; at most {max(free, 0)} clients",
            hint="lower --clients, or run through a connection pooler such as PgBouncer",
        )


def _write_blocker(connection: Connection) -> str | None:
    """Why the insert pattern cannot run as this role, or None."""
    role = connection.execute(text("SELECT current_user")).scalar_one()
    for privilege, table in (
        ("INSERT", "users"),
        ("DELETE", "users"),
        ("INSERT", "conversations"),
        ("UPDATE", "conversations"),
        ("INSERT", "messages"),
    ):
        granted = connection.execute(
            text("SELECT has_table_privilege(to_regclass(:table), :privilege)"),
            {"table": table, "privilege": privilege},
        ).scalar()
        if not granted:
            return f"role {role} may not {privilege} {'into' if privilege == 'INSERT' else 'on'} {table}"
    columns = _user_columns(connection)
    if isinstance(columns, str):
        return columns
    return None


_FILL = {"S": "text", "B": "false", "D": "now", "N": "zero"}


def _user_columns(connection: Connection) -> list[tuple[str, str]] | str:
    """The columns of users, besides id, that need a value: (name, how to fill it), or why
    bench cannot fill one. The application's users table may hold more than chatdb's."""
    rows = connection.execute(
        text(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typcategory"
            " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
            " WHERE a.attrelid = to_regclass('users') AND a.attnum > 0 AND NOT a.attisdropped"
            " AND a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''"
            " AND a.attname <> 'id' ORDER BY a.attnum"
        )
    ).all()
    columns = []
    for name, type_name, category in rows:
        if category not in _FILL:
            return f"users has a required column {name} ({type_name}) that bench cannot fill"
        columns.append((name, _FILL[category]))
    return columns


# --- bench's own rows ----------------------------------------------------------------------


class _Guard:
    """Marks a run as alive: a transaction-level advisory lock on the run's token, held in
    an open transaction on a connection of its own (as archive and purge do), so it dies
    with the process, also through a transaction pooler. Cleanup removes only the rows of
    runs whose lock is free."""

    def __init__(self, engine: Engine) -> None:
        self.connection = engine.connect()
        self.token: str | None = None

    def acquire(self) -> str:
        for _ in range(20):
            token = secrets.token_hex(4)
            self.connection.begin()
            self.connection.execute(
                text("SELECT set_config('idle_in_transaction_session_timeout', '0', true)")
            )
            if _try_lock(self.connection, token):
                self.token = token
                return token
            self.connection.rollback()
        raise StateError("could not take a run token: too many bench runs at once")

    def release(self) -> None:
        try:
            if self.connection.in_transaction():
                self.connection.rollback()
        finally:
            self.connection.close()


def _try_lock(connection: Connection, token: str) -> bool:
    objid = int(token, 16)
    objid -= (1 << 32) if objid >= (1 << 31) else 0
    return bool(
        connection.execute(
            text("SELECT pg_try_advisory_xact_lock(:a, :b)"), {"a": _LOCK_CLASS, "b": objid}
        ).scalar()
    )


def _create_rows(engine: Engine, token: str, clients: int) -> int:
    """One user and one conversation per pgbench client, in one transaction."""
    with engine.connect() as connection, connection.begin():
        columns = _user_columns(connection)
        assert not isinstance(columns, str)
        quote = connection.dialect.identifier_preparer.quote
        user = "'bench-' || :token || '-' || g"
        values = {
            "text": lambda name: f"{user} || '@bench.invalid'" if "mail" in name.lower() else user,
            "false": lambda name: "false",
            "now": lambda name: "now()",
            "zero": lambda name: "0",
        }
        names = ", ".join(["id", *(quote(name) for name, _ in columns)])
        filled = ", ".join([user, *(values[kind](name) for name, kind in columns)])
        connection.execute(
            text(f"INSERT INTO users ({names}) SELECT {filled} FROM generate_series(0, :last) g"),
            {"token": token, "last": clients - 1},
        )
        connection.execute(
            text(
                "INSERT INTO conversations (id, user_id, title)"
                " SELECT CAST(:token || '-0000-4000-8000-' || lpad(to_hex(g), 12, '0') AS uuid),"
                f" {user}, 'chatdb bench' FROM generate_series(0, :last) g"
            ),
            {"token": token, "last": clients - 1},
        )
    return clients


def _remove_run(connection: Connection, token: str) -> Removed:
    """Delete the users of one run and, by cascade, everything of theirs."""
    # On Citus, users is written after the counts read the distributed tables.
    citus.sequential(connection)
    prefix = f"{workload.USER_PREFIX}{token}-"
    mine = "starts_with(user_id, :prefix) AND user_id ~ :pattern"
    params = {"prefix": prefix, "pattern": workload.USER_ID_PATTERN}
    conversations, messages_ = connection.execute(
        text(
            f"SELECT (SELECT count(*) FROM conversations WHERE {mine}),"
            f" (SELECT count(*) FROM messages WHERE {mine})"
        ),
        params,
    ).one()
    users = connection.execute(
        text("DELETE FROM users WHERE starts_with(id, :prefix) AND id ~ :pattern"), params
    ).rowcount
    return Removed(users, int(conversations), int(messages_), 1 if users else 0)


def cleanup(engine: Engine, *, keep: str | None = None) -> Removed:
    """Remove what bench runs that died (SIGKILL, a lost host) left behind: their users and,
    by cascade, everything of theirs. Runs still going are left alone."""
    migrations.require_head(engine)
    with engine.connect() as connection:
        tokens = (
            connection.execute(
                text("SELECT DISTINCT substr(id, 7, 8) FROM users WHERE id ~ :pattern"),
                {"pattern": workload.USER_ID_PATTERN},
            )
            .scalars()
            .all()
        )
        connection.rollback()
    removed = Removed()
    for token in tokens:
        if token == keep or not workload.valid_token(token):
            continue
        with engine.connect() as connection, connection.begin():
            if not _try_lock(connection, token):
                removed += Removed(running=1)
                continue
            removed += _remove_run(connection, token)
    return removed


# --- running pgbench -------------------------------------------------------------------------


@dataclass
class _Context:
    program: Path
    target: str
    env: dict[str, str]
    folder: Path
    request: BenchRequest
    names: list[str]  # pattern of each script, by pgbench's script number
    scripts: list[tuple[Path, int]]
    budgets: list[Budget]
    url: URL
    progress: Progress | None

    def invocation(self, name: str, **options) -> pgbench.Invocation:
        clients = options.pop("clients", self.request.clients)
        options.setdefault("scripts", self.scripts)
        return pgbench.Invocation(
            program=self.program,
            target=self.target,
            env=self.env,
            folder=self.folder,
            clients=clients,
            threads=min(clients, os.cpu_count() or 1),
            name=name,
            **options,
        )

    def tick(self, label: str, started: float, total: float | None) -> None:
        if self.progress is not None:
            self.progress(label, time.monotonic() - started, total)

    @property
    def latency_limit_ms(self) -> float:
        return max(MIN_LATENCY_LIMIT_MS, 10 * max((b.limit_ms for b in self.budgets), default=0))

    #: How long pgbench runs on after the transactions measured: by then those it ran
    #: up to a second late have run too (a run later than that misses any budget).
    grace_seconds = GRACE_SECONDS


def _aborted(errors: Sequence[str]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for line in errors:
        match = _ABORTED.search(line)
        if match:
            counts[int(match[1])] = counts.get(int(match[1]), 0) + 1
    return counts


def _wait(ctx: _Context, running: pgbench.Running, label: str, total: float | None) -> None:
    while running.poll() is None:
        ctx.tick(label, running.started, total)
        time.sleep(0.1)


def _phase(ctx: _Context, name: str, rate: float, label: str) -> Phase:
    """The load at ``rate``: the transactions scheduled in the --duration seconds from the
    first one. pgbench runs on for a second after them: when its time is up, a client
    stops after its transaction in flight, and those it was running late for would be
    missing from the log, the latest of all."""
    seconds = ctx.request.seconds
    invocation = ctx.invocation(
        name, rate=rate, seconds=seconds + ctx.grace_seconds, latency_limit_ms=ctx.latency_limit_ms
    )
    running = pgbench.Running(invocation)
    try:
        _wait(ctx, running, label, seconds + ctx.grace_seconds)
        errors = running.check()
    finally:
        running.kill()
    logged = list(pgbench.read_log(invocation.log_prefix))
    limit_us = ctx.latency_limit_ms * 1000
    first = min((_scheduled(t, limit_us) for t in logged), default=0)
    window = [t for t in logged if _scheduled(t, limit_us) < first + seconds * 1_000_000]
    patterns = stats.figures(ctx.names, window, seconds, _aborted(errors))
    stats.judge(patterns, ctx.budgets)
    return Phase("alone", rate, seconds, patterns, errors, log=invocation.log_prefix)


def _scheduled(t: pgbench.Transaction, limit_us: float) -> float:
    """When a transaction was due: a skipped one is logged as it is skipped, once it is
    later than the latency limit."""
    return t.scheduled_us if t.outcome != "skipped" else t.end_us - limit_us


def _during(ctx: _Context, rate: float, argv: tuple[str, ...]) -> Phase:
    """The same load, measured from the start to the end of a chatdb command."""
    invocation = ctx.invocation(
        "during", rate=rate, seconds=MAX_WHILE_SECONDS, latency_limit_ms=ctx.latency_limit_ms, progress=True
    )
    label = f"during `{' '.join(argv)}`"
    running = pgbench.Running(invocation)
    child = None
    try:
        while not running.measuring():
            if running.poll() is not None:
                running.check()
                raise StateError("pgbench stopped before the --while command could start")
            ctx.tick(label, running.started, None)
            time.sleep(0.05)
        out_path, err_path = ctx.folder / "while.out", ctx.folder / "while.err"
        env = {**os.environ, "CHATDB_DATABASE_URL": _chatdb_url(ctx.url)}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            started_wall, started = time.time(), time.monotonic()
            child = pgbench.popen_tied(
                [sys.executable, "-m", "chatdb", *argv],
                signum=signal.SIGTERM,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
            )
        while child.poll() is None:
            if running.poll() is not None:
                break  # pgbench ended (its clients aborted): what it measured is reported
            ctx.tick(label, started, None)
            time.sleep(0.1)
        child.wait()
        ended_wall, seconds = time.time(), time.monotonic() - started
        grace = time.monotonic() + ctx.grace_seconds
        while running.poll() is None and time.monotonic() < grace:
            ctx.tick(label, started, None)
            time.sleep(0.1)
        running.finish_now()
        errors = running.check()
    finally:
        running.kill()
        if child is not None and child.poll() is None:
            child.terminate()  # chatdb's commands finish their batch in flight, then stop
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
    outcome = CommandOutcome(argv, child.returncode, seconds, _tail(out_path), _tail(err_path))
    window = (started_wall * 1_000_000, ended_wall * 1_000_000)
    limit_us = ctx.latency_limit_ms * 1000
    transactions = [
        t
        for t in pgbench.read_log(invocation.log_prefix)
        if window[0] <= _scheduled(t, limit_us) <= window[1]
    ]
    patterns = stats.figures(ctx.names, transactions, seconds, _aborted(errors))
    stats.judge(patterns, ctx.budgets)
    return Phase("during", rate, seconds, patterns, errors, outcome, invocation.log_prefix)


def _folder(stack: ExitStack, log_dir: Path | None) -> Path:
    """Where pgbench's scripts and logs go: --log-dir, else a folder deleted at the end."""
    if log_dir is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chatdb-bench-")))
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot use --log-dir {log_dir}: {exc.strerror or exc}") from None
    return log_dir


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_text(errors="replace")
    except OSError:
        return ""
    return data[-limit:]


def _chatdb_url(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _key_cost(ctx: _Context, keys: Keys) -> float:
    """What carrying a key costs a transaction: the median of the lookup on its own less
    the median of the same query without it, one client, unloaded."""
    looked_up, bare = workload.key_cost_scripts(keys)
    paths = [ctx.folder / "key.sql", ctx.folder / "bare.sql"]
    for path, script in zip(paths, (looked_up, bare), strict=True):
        path.write_text(script)
    invocation = ctx.invocation(
        "keys", clients=1, transactions=KEY_COST_TRANSACTIONS, scripts=[(p, 1) for p in paths]
    )
    running = pgbench.Running(invocation)
    try:
        _wait(ctx, running, "measuring the cost of carrying keys", None)
        errors = running.check()
    finally:
        running.kill()
    if errors:
        raise StateError(f"pgbench failed: {errors[0]}")
    key, plain = stats.figures(["key", "bare"], list(pgbench.read_log(invocation.log_prefix)), 1.0)
    if key.p50_ms is None or plain.p50_ms is None:
        raise StateError("pgbench measured no transaction of the key lookup")
    return key.p50_ms - plain.p50_ms


def _next_rate(lo: float | None, hi: float | None, request: BenchRequest) -> float | None:
    """The capacity search: double while every budget holds, halve while none does, then
    narrow the highest rate that held and the lowest that did not to within 10%."""
    if hi is None:
        assert lo is not None
        if request.max_rate is not None and lo >= request.max_rate:
            return None
        return min(lo * 2, request.max_rate) if request.max_rate is not None else lo * 2
    if lo is None:
        # Below --min-capacity already: the verdict is known, the rest would be detail.
        if request.min_capacity is not None or hi <= MIN_RATE:
            return None
        return max(_round(hi / 2), MIN_RATE)
    if hi / lo <= 1 + PRECISION:
        return None
    middle = _round(math.sqrt(lo * hi))
    return middle if lo < middle < hi else None


def _round(rate: float) -> float:
    """Two significant digits: 1,131 tps is tried as 1,100."""
    if rate <= 0:
        return rate
    digits = 1 - math.floor(math.log10(rate))
    return round(rate, digits) if digits > 0 else float(round(rate, digits))


def _search(ctx: _Context) -> tuple[list[Step], Phase, float | None, bool]:
    request = ctx.request
    rate = request.min_capacity or START_RATE
    if request.max_rate is not None:
        rate = min(rate, request.max_rate)
    steps: list[Step] = []
    lo = hi = None
    best: Phase | None = None
    lowest_failed: Phase | None = None
    while True:
        number = len(steps) + 1
        phase = _phase(ctx, f"step{number}", rate, f"step {number}: {rate:,.6g} tps")
        steps.append(Step(rate, phase.ok, phase.tps, phase.missed()))
        if phase.ok:
            lo, best = rate, phase
        else:
            hi = rate
            if lowest_failed is None or rate < lowest_failed.rate_tps:
                lowest_failed = phase
        following = _next_rate(lo, hi, request)
        if following is None:
            break
        rate = following
    capped = request.max_rate is not None and lo is not None and lo >= request.max_rate
    if best is not None:
        return steps, best, lo, capped
    assert lowest_failed is not None
    return steps, lowest_failed, None, False


# --- the run ---------------------------------------------------------------------------------


def run(engine: Engine, request: BenchRequest, progress: Progress | None = None) -> BenchResult:
    budgets = request.validate()
    migrations.require_head(engine)
    program = pgbench.locate()
    mix = dict(request.mix)
    left_out: dict[str, str] = {}
    with engine.connect() as connection:
        privileges.require_table_privileges(
            connection,
            [("SELECT", "messages"), ("SELECT", "conversations")],
            "bench reads the application's conversations and messages",
        )
        _check_clients(connection, request.clients)
        if "insert" in mix:
            blocker = _write_blocker(connection)
            if blocker is not None:
                left_out["insert"] = blocker
                del mix["insert"]
        reads = any(not workload.WORKLOADS[name].writes for name in mix)
        estimate = connection.execute(
            text("SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = to_regclass('messages')")
        ).scalar_one()
        if reads and not connection.execute(text("SELECT EXISTS (SELECT 1 FROM messages)")).scalar_one():
            raise StateError(
                "the database holds no messages for the read patterns to ask for",
                hint="seed it (`chatdb seed`), or bench only the writes: --mix insert=1",
            )
        connection.rollback()
    if not mix:
        raise StateError(f"nothing to run: the mix holds only insert, and {left_out['insert']}")
    budgets = [b for b in budgets if b.pattern in mix]
    target, env = pgbench.libpq_target(engine.url)
    env.setdefault("PGAPPNAME", "chatdb bench")
    if "connect_timeout" not in engine.url.query:
        env["PGCONNECT_TIMEOUT"] = "10"
    guard = _Guard(engine)
    token = None
    created = 0
    try:
        token = guard.acquire()
        leftovers = cleanup(engine, keep=token)
        if "insert" in mix:
            created = _create_rows(engine, token, request.clients)
        keys = Keys(token)
        with ExitStack() as stack:
            folder = _folder(stack, request.log_dir)
            names, scripts = [], []
            for name, weight in mix.items():
                path = folder / f"{name}.sql"
                path.write_text(workload.WORKLOADS[name].script(keys))
                names.append(name)
                scripts.append((path, weight))
            ctx = _Context(
                program, target, env, folder, request, names, scripts, budgets, engine.url, progress
            )
            key_cost = _key_cost(ctx, keys) if reads else None
            steps: list[Step] = []
            capacity, capped = None, False
            if request.rate is not None:
                alone = _phase(ctx, "alone", request.rate, f"alone at {request.rate:,.6g} tps")
                rate = request.rate
            else:
                steps, alone, capacity, capped = _search(ctx)
                rate = alone.rate_tps
            phases = [alone]
            if request.while_command is not None:
                phases.append(_during(ctx, rate, request.while_command))
    finally:
        removed = Removed()
        try:
            if token is not None and created:
                with engine.connect() as connection, connection.begin():
                    removed = _remove_run(connection, token)
        finally:
            guard.release()
    return BenchResult(
        request=request,
        budgets=budgets,
        mix=mix,
        left_out=left_out,
        pgbench=pgbench.version(program),
        rate_tps=rate,
        capacity_tps=capacity,
        capacity_capped=capped,
        steps=steps,
        phases=phases,
        key_cost_ms=key_cost,
        messages_estimate=int(estimate),
        users_created=created,
        removed=removed,
        leftovers=leftovers,
    )
