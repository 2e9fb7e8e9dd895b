"""Running pgbench: a phase at a rate, the phase during a --while command, and the cost
of carrying keys; each read back from pgbench's per-transaction log."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL

from chatdb.bench import pgbench, stats, workload
from chatdb.bench.model import BenchRequest, CommandOutcome, Phase, Progress
from chatdb.bench.workload import Budget, Keys
from chatdb.db import mask_argument, mask_text
from chatdb.errors import EXIT_USAGE, StateError, UsageError

#: A transaction already this late when its turn comes is skipped, and counts as missed:
#: a run that falls behind its schedule does not queue up without end.
MIN_LATENCY_LIMIT_MS = 1000.0
#: pgbench runs this long past the transactions measured (see phase).
GRACE_SECONDS = 1
#: The longest a --while command is measured.
MAX_WHILE_SECONDS = 86_400
#: Transactions of the key-cost measurement, and the cost above which it is worth a note.
KEY_COST_TRANSACTIONS = 600
KEY_COST_NOTICEABLE_MS = 0.1
_ABORTED = re.compile(r"client \d+ script (\d+) aborted")


@dataclass
class Context:
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


def aborted(errors: Sequence[str]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for line in errors:
        match = _ABORTED.search(line)
        if match:
            counts[int(match[1])] = counts.get(int(match[1]), 0) + 1
    return counts


def wait(ctx: Context, running: pgbench.Running, label: str, total: float | None) -> None:
    while running.poll() is None:
        ctx.tick(label, running.started, total)
        time.sleep(0.1)


def phase(ctx: Context, name: str, rate: float, label: str) -> Phase:
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
        wait(ctx, running, label, seconds + ctx.grace_seconds)
        errors = running.check()
    finally:
        running.kill()
    logged = list(pgbench.read_log(invocation.log_prefix))
    limit_us = ctx.latency_limit_ms * 1000
    first = min((scheduled(t, limit_us) for t in logged), default=0)
    window = [t for t in logged if scheduled(t, limit_us) < first + seconds * 1_000_000]
    patterns = stats.figures(ctx.names, window, seconds, aborted(errors))
    stats.judge(patterns, ctx.budgets)
    return Phase("alone", rate, seconds, patterns, errors, log=invocation.log_prefix)


def scheduled(t: pgbench.Transaction, limit_us: float) -> float:
    """When a transaction was due: a skipped one is logged as it is skipped, once it is
    later than the latency limit."""
    return t.scheduled_us if t.outcome != "skipped" else t.end_us - limit_us


def during(ctx: Context, rate: float, argv: tuple[str, ...]) -> Phase:
    """The same load, measured from the start to the end of a chatdb command."""
    invocation = ctx.invocation(
        "during", rate=rate, seconds=MAX_WHILE_SECONDS, latency_limit_ms=ctx.latency_limit_ms, progress=True
    )
    shown = tuple(mask_argument(argument) for argument in argv)
    label = f"during `{' '.join(shown)}`"
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
        env = {**os.environ, "CHATDB_DATABASE_URL": chatdb_url(ctx.url)}
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
    outcome = CommandOutcome(
        shown, child.returncode, seconds, mask_text(tail(out_path)), mask_text(tail(err_path))
    )
    window = (started_wall * 1_000_000, ended_wall * 1_000_000)
    limit_us = ctx.latency_limit_ms * 1000
    transactions = [
        t for t in pgbench.read_log(invocation.log_prefix) if window[0] <= scheduled(t, limit_us) <= window[1]
    ]
    patterns = stats.figures(ctx.names, transactions, seconds, aborted(errors))
    stats.judge(patterns, ctx.budgets)
    return Phase("during", rate, seconds, patterns, errors, outcome, invocation.log_prefix)


def folder(stack: ExitStack, log_dir: Path | None) -> Path:
    """Where pgbench's scripts and logs go: --log-dir, else a folder deleted at the end."""
    if log_dir is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chatdb-bench-")))
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot use --log-dir {log_dir}: {exc.strerror or exc}") from None
    return log_dir


def tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_text(errors="replace")
    except OSError:
        return ""
    return data[-limit:]


def chatdb_url(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def rehearse(url: URL, argv: tuple[str, ...]) -> None:
    """Run a --while archive or purge as a dry run first, before anything is measured, so
    that its bad input (``purge --older-than 90x``) is refused at once (exit 2) rather
    than after the first measurement. Other commands are run as they are."""
    if argv[0] not in ("archive", "purge") or argv[1:2] == ("restore",):
        return
    env = {**os.environ, "CHATDB_DATABASE_URL": chatdb_url(url)}
    done = subprocess.run(
        [sys.executable, "-m", "chatdb", *argv, "--dry-run"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode == EXIT_USAGE:
        said = [line[len("error: ") :] for line in done.stderr.splitlines() if line.startswith("error: ")]
        shown = shlex.join(mask_argument(argument) for argument in argv)
        raise UsageError(f"--while {shown}: {mask_text(said[0]) if said else 'bad input'}")


def key_cost(ctx: Context, keys: Keys) -> float:
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
        wait(ctx, running, "measuring the cost of carrying keys", None)
        errors = running.check()
    finally:
        running.kill()
    if errors:
        raise StateError(f"pgbench failed: {errors[0]}")
    key, plain = stats.figures(["key", "bare"], list(pgbench.read_log(invocation.log_prefix)), 1.0)
    if key.p50_ms is None or plain.p50_ms is None:
        raise StateError("pgbench measured no transaction of the key lookup")
    return key.p50_ms - plain.p50_ms
