"""What the lifecycle and scale benchmarks share.

A scratch server (BENCH_DATABASE_URL, a role with CREATEDB, when set, else an embedded
PostgreSQL in a temporary folder) with seeded databases and copies of them (CREATE
DATABASE ... TEMPLATE, a CHECKPOINT before each contender); chatdb's commands run as
whole child processes, Python start included, with their peak RSS; the plain SQL
baselines; and a concurrent reader running the application's conversation-history query.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

from chatdb import db, embedded, patterns, schema
from chatdb.lifecycle.guard import GUARD_KEY

CHATDB = Path(sys.executable).with_name("chatdb")
COMMAND = [str(CHATDB)] if CHATDB.exists() else [sys.executable, "-m", "chatdb"]


#: Starts the measured command and reports on file descriptor argv[1] its peak RSS (kB,
#: from wait4) and its wall seconds, then exits with its exit code: see ``run``.
SPAWN = """
import os, sys, time
report, command = int(sys.argv[1]), sys.argv[2:]
started = time.perf_counter()
pid = os.posix_spawnp(command[0], command, os.environ)
_, status, usage = os.wait4(pid, 0)
elapsed = time.perf_counter() - started
os.write(report, f"{usage.ru_maxrss} {elapsed}".encode())
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run(
    command: list[str],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    accept: tuple[int, ...] = (0,),
) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and stdout of one child process (in ``env`` and
    ``cwd`` when given), which must exit
    with one of the ``accept`` codes (``chatdb doctor`` and ``chatdb bench`` exit 1 on a
    finding or a missed budget, and still print their --json).

    The peak RSS is ``ru_maxrss`` from ``os.wait4``. On Linux, wait4 fills its rusage as
    ``getrusage(RUSAGE_BOTH)`` of the child (kernel/exit.c, ``wait_task_zombie``): the
    larger of the child's own peak and the peak of every descendant it reaped itself. So
    for ``chatdb seed``, which forks a generator child and reaps it with ``waitpid``, this
    is the larger of the parent's and the generator's peaks. (``getrusage(RUSAGE_CHILDREN)``
    here would give the same only for the largest child this process ever reaped, mixing
    one run with the next.)

    The child's peak also counts the memory of the process that started it, before its
    exec: a forked child starts with its parent's resident pages, and a vforked one (as
    ``subprocess`` and ``posix_spawn`` start them) runs in its parent's memory until the
    exec, which records that memory's peak as the child's. Waited for from here, every
    command would weigh at least as much as this benchmark at its largest (the history
    reader's conversation ids make it over 100 MB at 10M messages). So a bare Python
    (``-I -S``, a few MB) starts the command, waits for it and reports its figures
    (``SPAWN``); the wall time is its, around the command alone.
    """
    report, write = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", SPAWN, str(write), *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(write,),
        env=env,
        cwd=cwd,
    )
    os.close(write)
    stdout, stderr = process.communicate()
    with os.fdopen(report, "rb") as figures:
        kilobytes, elapsed = figures.read().split()
    if process.returncode not in accept:
        raise SystemExit(f"{command[:3]} failed ({process.returncode}): {stderr.decode()}")
    return float(elapsed), int(kilobytes) * 1024, stdout.decode()


def alternate(commands: dict[str, list[str]], runs: int) -> dict[str, list[tuple[float, str]]]:
    """Each command ``runs`` times, in rounds that alternate them so that drift on a shared
    machine hits them alike: each run's wall seconds and stdout."""
    samples: dict[str, list[tuple[float, str]]] = {label: [] for label in commands}
    for _ in range(runs):
        for label, command in commands.items():
            elapsed, _, stdout = run(command)
            samples[label].append((elapsed, stdout))
    return samples


def print_medians(seconds: dict[str, list[float]], notes: dict[str, str] | None = None) -> list[float]:
    """A line per label: the median and the fastest wall seconds (and its note); returns
    the medians, in order."""
    width = max(len(label) for label in seconds) + 2
    for label, values in seconds.items():
        print(
            f"{label:{width}s} median {statistics.median(values):.3f} s  min {min(values):.3f} s"
            f"  ({len(values)} runs){(notes or {}).get(label, '')}"
        )
    return [statistics.median(values) for values in seconds.values()]


def start_baselines(target: str) -> dict[str, list[str]]:
    """The least a command does: `chatdb --version` (Python start and imports, no
    database), and `chatdb migrate status` on ``target`` (connecting, reading the revision)."""
    return {
        "chatdb --version": [*COMMAND, "--version"],
        "chatdb migrate status": [*COMMAND, "migrate", "status", "--database-url", target],
    }


def lifecycle_command(command: str, older_than: str, target: str, *extra: str) -> list[str]:
    """``chatdb archive`` or ``chatdb purge`` off a terminal, with --json; a purge's grace
    period set past every soft delete, so that it deletes exactly what the plain DELETE
    deletes."""
    arguments = [*COMMAND, *command.split(), "--older-than", older_than, "--yes", "--json"]
    arguments += ["--database-url", target, *extra]
    if command == "purge":
        arguments += ["--deleted-grace", "36500d"]
    return arguments


class Reader(threading.Thread):
    """The application's conversation-history query, back to back, timing each: of a
    conversation picked at random among the rows of ``KEYS``, by ``statement``."""

    KEYS = "SELECT id FROM conversations"

    def __init__(self, target: str) -> None:
        super().__init__(daemon=True)
        self.engine = create_engine(db.parse_url(target), connect_args={"prepare_threshold": None})
        with self.engine.connect() as connection:
            self.keys = connection.execute(text(self.KEYS)).all()
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def statement(self, key: Any) -> Any:
        return patterns.conversation_history(key[0])

    def run(self) -> None:
        rng = random.Random(1)
        with self.engine.connect() as connection:
            while not self.stop.is_set():
                statement = self.statement(rng.choice(self.keys))
                started = time.perf_counter()
                connection.execute(statement).all()
                connection.commit()
                self.latencies.append(time.perf_counter() - started)
                time.sleep(0.001)
        self.engine.dispose()

    def p95_ms(self) -> float:
        return statistics.quantiles(self.latencies, n=100)[94] * 1000


#: The two keys of the guard's advisory lock (pg_locks' classid and objid).
GUARD = dict(zip(("guard_1", "guard_2"), GUARD_KEY, strict=True))


class Stalls(threading.Thread):
    """What held a batch of chatdb's open past 250 ms.

    It reads ``pg_stat_activity`` every 10 ms on its own connection (a superuser's, or a
    pg_monitor member's, which sees every session). For each open transaction of a chatdb
    session it keeps its age, what its session waited on at each sample (``CPU`` when on
    nothing), and whether the checkpointer was meanwhile syncing a checkpoint's files to
    disk (``DataFileSync``): then every session that must write WAL waits for the disk,
    whatever its size. The guard's transaction, open the whole run by design (it holds the
    advisory lock, and no snapshot), is left out.

    On a Citus cluster (``workers``: their URLs) a batch's statements run on a worker: the
    workers' checkpoints count too, and what their sessions that serve the coordinator
    (``citus_internal``) waited on meanwhile is kept beside the batch's own waits."""

    SLOW = 0.25
    SQL = (
        "SELECT backend_type, pid, xact_start, extract(epoch FROM clock_timestamp() - xact_start),"
        " coalesce(wait_event, CASE WHEN state = 'active' THEN 'CPU' ELSE 'client' END)"
        " FROM pg_stat_activity a WHERE backend_type = 'checkpointer'"
        " OR application_name LIKE 'chatdb %' AND NOT EXISTS (SELECT FROM pg_locks l"
        " WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.classid = :guard_1 AND l.objid = :guard_2)"
    )

    WORKER_SQL = (
        "SELECT backend_type, coalesce(wait_event, CASE WHEN state = 'active' THEN 'CPU' ELSE 'client' END)"
        " FROM pg_stat_activity"
        " WHERE backend_type = 'checkpointer' OR application_name LIKE 'citus_internal%'"
    )

    def __init__(self, url: Any, workers: Sequence[Any] = ()) -> None:
        super().__init__(daemon=True)
        self.engine = create_engine(url, isolation_level="AUTOCOMMIT")
        self.workers = [create_engine(worker, isolation_level="AUTOCOMMIT") for worker in workers]
        self.stop = threading.Event()
        #: (pid, xact_start): (longest age seen, its session's waits, checkpoint sync seen,
        #: the workers' sessions' waits meanwhile)
        self.transactions: dict[tuple[int, Any], list[Any]] = {}

    def run(self) -> None:
        with self.engine.connect() as connection, ExitStack() as stack:
            others = [stack.enter_context(worker.connect()) for worker in self.workers]
            while not self.stop.is_set():
                rows = connection.execute(text(self.SQL), GUARD).all()
                syncing = any(r[0] == "checkpointer" and r[4] == "DataFileSync" for r in rows)
                remote: Counter[str] = Counter()
                for other in others:
                    for kind, wait in other.execute(text(self.WORKER_SQL)).all():
                        if kind == "checkpointer":
                            syncing = syncing or wait == "DataFileSync"
                        elif wait != "client":
                            remote[wait] += 1
                for kind, pid, started, age, wait in rows:
                    if kind != "client backend" or started is None:
                        continue
                    seen = self.transactions.setdefault((pid, started), [0.0, Counter(), False, Counter()])
                    seen[0] = max(seen[0], float(age))
                    seen[1][wait] += 1
                    seen[2] = seen[2] or syncing
                    seen[3].update(remote)
                time.sleep(0.01)
        self.engine.dispose()
        for worker in self.workers:
            worker.dispose()

    def summary(self) -> str:
        """The transactions seen open past 250 ms: how many overlapped a checkpoint's sync,
        and what their sessions waited on most."""
        slow = [seen for seen in self.transactions.values() if seen[0] > self.SLOW]
        if not slow:
            return "none seen open past 250 ms"
        synced = sum(1 for seen in slow if seen[2])
        waits: Counter[str] = Counter()
        remote: Counter[str] = Counter()
        for seen in slow:
            waits.update(seen[1])
            remote.update(seen[3])
        line = (
            f"{len(slow)} seen open past 250 ms (longest {max(s[0] for s in slow) * 1000:.0f} ms), "
            f"{synced} of them while a checkpoint's files were synced to disk; their sessions "
            f"waited on: {_shares(waits)}"
        )
        if self.workers:
            line += f"; the workers' sessions meanwhile on: {_shares(remote)}"
        return line


def _shares(counts: Counter[str]) -> str:
    """The three most frequent, with their shares: ``WALWrite 84%, CPU 11%, ...``."""
    total = sum(counts.values())
    return ", ".join(f"{what} {n / total:.0%}" for what, n in counts.most_common(3)) if total else "nothing"


def columns(table: str) -> str:
    return ", ".join(column.name for column in getattr(schema, table).c)


def idle(days: int) -> str:
    return f"updated_at < now() - interval '{days} days'"


def moving(days: int) -> str:
    """The conversations an archive at ``days`` moves."""
    return f"SELECT id FROM conversations WHERE {idle(days)} AND deleted_at IS NULL"


def plain_archive(chosen: str) -> list[str]:
    """The plain archive of the conversations ``chosen`` selects: INSERT ... SELECT both
    tables, then DELETE (its cascade deletes the messages)."""
    return [
        f"INSERT INTO conversations_archive ({columns('conversations')})"
        f" SELECT {columns('conversations')} FROM conversations WHERE id IN ({chosen})",
        f"INSERT INTO messages_archive ({columns('messages')}) SELECT {columns('messages')}"
        f" FROM messages WHERE conversation_id IN ({chosen})",
        f"DELETE FROM conversations WHERE id IN ({chosen})",
    ]


class Scratch:
    """A server for benchmark databases; ``close()`` drops every one it created."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="chatdb-bench-"))
        os.chmod(self.workdir, 0o755)
        raw = os.environ.get("BENCH_DATABASE_URL")
        self.server = None
        if raw:
            self.url = db.parse_url(raw)
        else:
            self.server, self.url = embedded.scratch_server(self.workdir / "pgdata")
        self.admin = create_engine(self.url, isolation_level="AUTOCOMMIT")
        self.created: list[str] = []

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self.admin.connect() as connection:
            for name in reversed(self.created):
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.admin.dispose()
        if self.server is not None:
            self.server.cleanup()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def target(self, name: str) -> str:
        """The URL of database ``name``, as a user would type it."""
        return self.url.set(database=name, drivername="postgresql").render_as_string(hide_password=False)

    def engine(self, name: str, **options: Any) -> Engine:
        return create_engine(self.url.set(database=name), **options)

    def settings(self) -> str:
        """The server's version and the settings that decide how its writes reach the disk:
        a checkpoint that a run forces (past ``max_wal_size``) or WAL buffers it fills
        (``wal_buffers``) hold batches open, whatever their size."""
        names = ("shared_buffers", "wal_buffers", "max_wal_size", "checkpoint_timeout", "synchronous_commit")
        with self.admin.connect() as connection:
            version = connection.execute(text("SHOW server_version")).scalar_one()
            shown = [f"{name} {connection.execute(text(f'SHOW {name}')).scalar_one()}" for name in names]
        return f"PostgreSQL {version.split()[0]}: {', '.join(shown)}"

    def checkpoint(self) -> None:
        with self.admin.connect() as connection:
            connection.execute(text("CHECKPOINT"))

    def database(self, name: str, template: str | None = None) -> str:
        with self.admin.connect() as connection:
            clause = f' TEMPLATE "{template}"' if template else ""
            connection.execute(text(f'CREATE DATABASE "{name}"{clause}'))
        self.created.append(name)
        # Each contender starts on a quiet server: no earlier copy left for autovacuum to
        # clean up, and no checkpoint owed.
        self.checkpoint()
        return self.target(name)

    def drop(self, name: str) -> None:
        with self.admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def vacuum(self, name: str) -> None:
        engine = self.engine(name, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(text("VACUUM ANALYZE"))
        engine.dispose()

    def seeded(self, label: str, messages: int) -> tuple[str, tuple[float, int, str]]:
        """A database migrated to head and seeded with ``messages`` messages in the shape
        of every benchmark (a user per 100 messages, a conversation per 20, over 365
        days), vacuumed and analyzed: its name, and the seed's run (see ``run``)."""
        name = f"chatdb_bench_{os.getpid()}_{label}"
        target = self.database(name)
        subprocess.run([*COMMAND, "migrate", "--database-url", target], check=True, capture_output=True)
        sizes = ["--users", str(messages // 100), "--conversations", str(messages // 20)]
        sizes += ["--messages", str(messages), "--days", "365"]
        seed = run([*COMMAND, "seed", "--database-url", target, *sizes])
        self.vacuum(name)
        engine = self.engine(name)
        with engine.connect() as connection:
            found = connection.execute(text("SELECT count(*) FROM messages")).scalar_one()
        engine.dispose()
        assert found == messages, f"expected {messages:,} messages, found {found:,}"
        return name, seed

    def idle_days(self, name: str, share: float = 0.75) -> int:
        """Whole days of idleness past which about ``share`` of the conversations lie."""
        engine = self.engine(name)
        with engine.connect() as connection:
            age = connection.execute(
                text(
                    "SELECT extract(day FROM now() - percentile_disc(:share)"
                    " WITHIN GROUP (ORDER BY updated_at)) FROM conversations"
                ),
                {"share": share},
            ).scalar_one()
        engine.dispose()
        return int(age)

    def lifecycle(
        self,
        command: str,
        template: str,
        label: str,
        older_than: str,
        reader: bool = False,
        keep: bool = False,
    ) -> tuple[float, int, dict[str, Any], Reader | None]:
        """``chatdb archive`` or ``purge`` on a fresh copy of ``template``, beside the
        concurrent reader when asked: wall seconds, peak RSS, its --json (with the key
        ``stalls``: ``Stalls.summary()``), the reader. The copy is dropped unless ``keep``
        (then it is ``{template}_{label}``)."""
        target = self.database(f"{template}_{label}", template)
        watcher = None
        if reader:
            watcher = Reader(target)
            watcher.start()
        stalls = Stalls(self.url)
        stalls.start()
        elapsed, rss, stdout = run(lifecycle_command(command, older_than, target))
        stalls.stop.set()
        stalls.join()
        if watcher is not None:
            watcher.stop.set()
            watcher.join()
        if not keep:
            self.drop(f"{template}_{label}")
        return elapsed, rss, {**json.loads(stdout), "stalls": stalls.summary()}, watcher

    def plain_sql(
        self,
        template: str,
        label: str,
        sessions: list[list[str]],
        reader: bool = False,
        setup: tuple[str, ...] = (),
    ) -> tuple[float, float, int, Reader | None]:
        """Each session's statements in one transaction, the sessions at once, each from a
        fresh Python process like the other contenders, after the ``setup`` statements, on
        a fresh copy of ``template``: (wall seconds, seconds inside the database (the
        slowest session's), messages gone from the hot table, the concurrent reader if
        any)."""
        target = self.database(f"{template}_{label}", template)
        engine = create_engine(db.parse_url(target))
        with engine.connect() as connection:
            for statement in setup:
                connection.execute(text(statement))
            connection.commit()
            before = connection.execute(text("SELECT count(*) FROM messages")).scalar_one()
        watcher = None
        if reader:
            watcher = Reader(target)
            watcher.start()
        code = (
            "import sys, time; from sqlalchemy import create_engine, text; "
            "e = create_engine(sys.argv[1]); c = e.connect(); t = time.perf_counter(); "
            "[c.execute(text(s)) for s in sys.argv[2:]]; c.commit(); print(time.perf_counter() - t)"
        )
        address = db.parse_url(target).render_as_string(hide_password=False)
        started = time.perf_counter()
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", code, address, *statements],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for statements in sessions
        ]
        outputs = [process.communicate() for process in processes]
        elapsed = time.perf_counter() - started
        if watcher is not None:
            watcher.stop.set()
            watcher.join()
        for process, (_, err) in zip(processes, outputs, strict=True):
            if process.returncode != 0:
                raise SystemExit(f"plain SQL ({label}) failed: {err}")
        with engine.connect() as connection:
            after = connection.execute(text("SELECT count(*) FROM messages")).scalar_one()
        engine.dispose()
        self.drop(f"{template}_{label}")
        return elapsed, max(float(out) for out, _ in outputs), before - after, watcher

    def quiet_p95(self, template: str, seconds: float = 5) -> float:
        """The reader's p95 (ms) on a copy of ``template`` with nothing else running."""
        name = f"{template}_quiet"
        watcher = Reader(self.database(name, template))
        watcher.start()
        time.sleep(seconds)
        watcher.stop.set()
        watcher.join()
        self.drop(name)
        return watcher.p95_ms()
