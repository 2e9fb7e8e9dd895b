"""Every chatdb command at several sizes of the same database: what grows with the data.

    python bench/bench_scale.py [--sizes 1000000,10000000] [--older-than Nd] [--runs 3]
        [--bench-rate 200] [--bench-seconds 20] [--bench-clients 10] [--bench-runs 3]
        [--parts reads,deep,writes,restore,daily,bench]

Seeds every size in the same shape (a user per 100 messages, a conversation per 20, over
365 days; smallest first), then runs every command as a whole child process, Python start
included, and records its wall time, throughput, peak RSS and, for the runs that change
data, the longest transaction and how many took over 250 ms (from their --json). The
parts (--parts measures some of them; the seed always):

- `chatdb seed` itself (its peak RSS covers the generator child it forks: see
  ``_harness.run``);
- reads: on the seeded databases, `chatdb migrate` (a no-op at head: what checking
  costs), `status`, `verify-indexes`, `doctor --older-than N` (catalog and statistics
  only; with how many checks warned or failed), `archive --older-than N --dry-run` and
  `purge --older-than N --dry-run` (its default grace of 30 days, as typed), --runs
  rounds, each round every command at every size in turn, so that drift on a shared
  machine hits sizes alike (median time, largest RSS); each dry run's count is checked
  against a count at its own cutoffs;
- deep: `chatdb doctor --deep --older-than N` once per size: it reads every page of the
  tables and indexes (pgstattuple and amcheck, created on each database) and counts
  retention exactly; its time, the bytes it read and their rate;
- writes: each on a fresh copy (CREATE DATABASE ... TEMPLATE, a CHECKPOINT before each):
  the plain `DELETE FROM conversations WHERE updated_at < now() - interval 'N days'` and
  the plain INSERT ... SELECT archive of bench_lifecycle.py, each in one transaction;
  `chatdb purge --older-than Nd` (grace period past every soft delete, so it deletes
  what the DELETE deletes) and `chatdb archive --older-than Nd`, with their ratio to
  those baselines and their batch counts; each run's count is checked against a count
  at its own cutoff (the baseline's, taken a little earlier, may differ by what became
  idle in between);
- restore: `chatdb archive restore` of 1,000 conversations named with --conversation,
  picked across the archive of the copy the archive run left (as many as the smallest
  size's archive holds, when that is fewer);
- daily: on the largest size, the steady-state daily job: on a copy purged at N+1 days
  and vacuumed (yesterday's run), the purge at N days, which takes one day's newly idle
  conversations; beside it the application's conversation-history query runs back to
  back, and its p95 is given alone and during the purge;
- bench: last, on the seeded databases themselves, `chatdb bench` at one fixed, modest
  rate (--bench-rate, for --bench-seconds, with --bench-clients), --bench-runs rounds of
  every size in turn: each pattern's median p95 and the runs that missed a budget. The
  rate is the same at every size, so the p95s compare the data's effect alone; bench
  leaves no rows behind.

Then one table: each figure at each size and the largest/smallest ratio, against what it
should be: linear in the data (about the ratio of the sizes) for work that reads the
data, flat (at most 1.2x) for work that does not. N defaults to the whole days that
leave about three quarters of the conversations idle past them (on the smallest size).

Every size's database lives until the end, and each copy until it is measured: at
10,000,000 messages a database takes about 5 GB, so 1M and 10M need about 11 GB.
Uses BENCH_DATABASE_URL (a role with CREATEDB) when set, else an embedded PostgreSQL in a
temporary folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from _harness import (  # run as a script: bench/ is on sys.path
    COMMAND,
    Reader,
    Scratch,
    idle,
    lifecycle_command,
    moving,
    plain_archive,
    run,
)
from _scale_table import Table
from sqlalchemy import text

RESTORE = 1_000
#: What is measured after seeding, in this order (see the module's docstring).
PARTS = ("reads", "deep", "writes", "restore", "daily", "bench")
#: chatdb bench at a modest fixed rate, one that a 1M-message database on two shared
#: cores serves within every budget: the p95s, not the capacity, are compared.
BENCH_RATE = 200
BENCH_SECONDS = 20
BENCH_CLIENTS = 10


def parse_sizes(raw: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in raw.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of whole numbers: {raw!r}") from None
    if not sizes or sizes[0] < 100:
        raise argparse.ArgumentTypeError("each size must be at least 100 messages (a user per 100)")
    return sizes


def parse_days(raw: str) -> int:
    if not raw.endswith("d") or not raw[:-1].isascii() or not raw[:-1].isdigit() or int(raw[:-1]) < 1:
        raise argparse.ArgumentTypeError(f"expected whole days such as 90d, not {raw!r}")
    return int(raw[:-1])


def seeded(scratch: Scratch, table: Table, size: int) -> tuple[str, str]:
    """The database of ``size`` messages, seeded and measured: its name, the server's version."""
    print(f"seeding {size:,} messages ...", flush=True)
    base, (seconds, rss, _) = scratch.seeded(f"scale_{size}", size)
    table.add("seed", "time", "s", "linear", size, seconds)
    table.add("seed", "messages/s", "/s", "rate", size, size / seconds)
    table.add("seed (with its generator)", "peak RSS", "bytes", "flat", size, rss, aim=1.1)
    engine = scratch.engine(base)
    with engine.connect() as connection:
        # what doctor --deep reads with: pgstattuple (exact bloat) and amcheck (integrity)
        connection.execute(text("CREATE EXTENSION IF NOT EXISTS pgstattuple"))
        connection.execute(text("CREATE EXTENSION IF NOT EXISTS amcheck"))
        connection.commit()
        database_bytes, index_bytes = connection.execute(
            text(
                "SELECT pg_database_size(current_database()),"
                " (SELECT sum(pg_indexes_size(oid)) FROM pg_class"
                "  WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace)"
            )
        ).one()
        server = connection.execute(text("SHOW server_version")).scalar_one()
    engine.dispose()
    table.add("database (after VACUUM)", "size", "bytes", "linear", size, database_bytes)
    table.add("indexes, all tables", "size", "bytes", "linear", size, int(index_bytes))
    return base, server


def reads(scratch: Scratch, table: Table, bases: dict[int, str], days: int, runs: int) -> None:
    """The read-only commands on each seeded database, ``runs`` rounds, each round every
    command at every size in turn (so that drift on a shared machine hits sizes and
    commands alike): median time, largest RSS. Checks each dry run's count against a
    count at its own cutoffs."""
    print(f"migrate, status, verify-indexes, doctor, dry runs at every size, rounds: {runs} ...", flush=True)
    archive, purge = (f"{command} --older-than {days}d --dry-run" for command in ("archive", "purge"))
    doctor = f"doctor --older-than {days}d"
    commands = {
        "migrate (at head)": ["migrate"],
        "status": ["status"],
        "verify-indexes": ["verify-indexes"],
        doctor: [*doctor.split(), "--json"],
        archive: [*archive.split(), "--json"],
        purge: [*purge.split(), "--json"],
    }
    samples: dict[tuple[str, int], list[tuple[float, int, str]]] = {
        (label, size): [] for label in commands for size in bases
    }
    scratch.checkpoint()
    for _ in range(runs):
        for label, arguments in commands.items():
            for size, base in bases.items():
                command = [*COMMAND, *arguments, "--database-url", scratch.target(base)]
                # doctor exits 1 when a check fails; its --json is printed all the same
                samples[label, size].append(run(command, accept=(0, 1) if label == doctor else (0,)))
    for (label, size), results in samples.items():
        seconds = statistics.median(t for t, _, _ in results)
        table.add(label, "time", "s", "linear" if label in (archive, purge) else "flat", size, seconds)
        table.add(label, "peak RSS", "bytes", "flat", size, max(r for _, r, _ in results))
        if label == doctor:
            table.add(
                label, "findings (warn, fail)", "count", "info", size, findings(json.loads(results[-1][2]))
            )
    for size, base in bases.items():
        for command, label in (("archive", archive), ("purge", purge)):
            report = json.loads(samples[label, size][0][2])
            what = f"at {size:,}: the {command} dry run counted"
            check_count(scratch, base, what, command, report, "planned")


def findings(report: dict[str, Any]) -> int:
    """What a doctor run found: its checks that warned or failed."""
    return report["counts"]["warn"] + report["counts"]["fail"]


def doctor_deep(scratch: Scratch, table: Table, size: int, base: str, days: int) -> None:
    """``chatdb doctor --deep`` once: it reads every page of chatdb's tables and indexes
    (pgstattuple, amcheck) and counts retention exactly, so it is linear in the data."""
    print(f"{size:,}: doctor --deep ...", flush=True)
    scratch.checkpoint()
    command = [*COMMAND, "doctor", "--deep", "--older-than", f"{days}d", "--json"]
    seconds, rss, stdout = run([*command, "--database-url", scratch.target(base)], accept=(0, 1))
    report = json.loads(stdout)
    label = f"doctor --deep --older-than {days}d (one run)"
    table.add(label, "time", "s", "linear", size, seconds)
    table.add(label, "read (pgstattuple, amcheck)", "bytes", "linear", size, report["deep_read_bytes"])
    table.add(label, "read/s", "bytes/s", "rate", size, report["deep_read_bytes"] / report["deep_seconds"])
    table.add(label, "peak RSS", "bytes", "flat", size, rss)
    table.add(label, "findings (warn, fail)", "count", "info", size, findings(report))


def expected(scratch: Scratch, base: str, command: str, report: dict[str, Any]) -> int:
    """The messages ``chatdb archive`` or ``chatdb purge`` takes from ``base`` at the
    cutoffs of ``report`` (the run's --json: its own, as it printed them), counted on
    ``base``, which no run changes: an archive moves the conversations idle since before
    the cutoff and not soft-deleted; a purge deletes those idle since before it or
    soft-deleted before the deleted cutoff, and the messages soft-deleted before that,
    in the hot and the archive tables."""
    params = {"cutoff": report["cutoff"]}
    idle = "c.updated_at < CAST(:cutoff AS timestamptz)"
    deleted = "< CAST(:deleted AS timestamptz)"
    if command == "archive":
        queries = [
            f"SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            f" WHERE {idle} AND c.deleted_at IS NULL"
        ]
    else:
        params["deleted"] = report["deleted_cutoff"]
        queries = [
            f"SELECT count(*) FROM {child} m JOIN {parent} c ON c.id = m.conversation_id"
            f" WHERE {idle} OR c.deleted_at {deleted} OR m.deleted_at {deleted}"
            for parent, child in (
                ("conversations", "messages"),
                ("conversations_archive", "messages_archive"),
            )
        ]
    engine = scratch.engine(base)
    with engine.connect() as connection:
        count = sum(connection.execute(text(query), params).scalar_one() for query in queries)
    engine.dispose()
    return int(count)


def check_count(
    scratch: Scratch, base: str, what: str, command: str, report: dict[str, Any], key: str
) -> None:
    """Warn when a run's (or a dry run's) messages differ from what its own cutoffs
    select. Two runs a minute apart take different cutoffs (now() less the age), so their
    counts may differ: only a count at the same cutoffs says whether one is wrong."""
    found = report[key]["messages"] + report[key]["archive_messages"]
    want = expected(scratch, base, command, report)
    if found != want:
        print(f"warning: {what} {found:,} messages; its cutoff ({report['cutoff']}) selects {want:,}")


def writes(scratch: Scratch, table: Table, size: int, base: str, days: int) -> None:
    """The plain SQL baselines, then chatdb purge and archive, each on a fresh copy; the
    archive's copy is kept for the restore."""
    print(f"{size:,}: plain DELETE, plain INSERT ... SELECT, purge, archive ...", flush=True)
    baselines = {
        "purge": ("plain DELETE", [[f"DELETE FROM conversations WHERE {idle(days)}"]]),
        "archive": ("plain INSERT ... SELECT", [plain_archive(moving(days))]),
    }
    for command, (versus, sessions) in baselines.items():
        base_s, _, base_messages, _ = scratch.plain_sql(base, versus.split()[1].lower(), sessions)
        label = f"{versus} (one transaction)"
        table.add(label, "time", "s", "linear", size, base_s)
        table.add(label, "messages/s", "/s", "rate", size, base_messages / base_s)

        keep = command == "archive"
        seconds, rss, result, _ = scratch.lifecycle(command, base, command, f"{days}d", keep=keep)
        done = result["done"]["messages"] + result["done"]["archive_messages"]
        label = f"chatdb {command}"
        table.add(label, "time", "s", "linear", size, seconds)
        table.add(label, "messages/s", "/s", "rate", size, done / seconds)
        table.add(label, "peak RSS", "bytes", "flat", size, rss)
        table.add(label, "longest transaction", "ms", "flat", size, result["longest_transaction_seconds"])
        table.add(label, "over 250 ms", "count", "count", size, result["slow_transactions"])
        table.add(label, "batches", "count", "info", size, result["batches"])
        print(f"{label} at {size:,} messages, on the server: {result['stalls']}", flush=True)
        ratio = (done / seconds) / (base_messages / base_s)
        expect = "aim" if command == "purge" else "info"
        table.add(f"{label} / {versus}", "messages/s, end to end", "x", expect, size, ratio, aim=1.0)
        # The baseline took its own cutoff (now() when it ran), so its count may differ
        # by what became idle in between; the run is checked against its own cutoff.
        check_count(scratch, base, f"at {size:,}: chatdb {command} took", command, result, "done")


def restore(scratch: Scratch, table: Table, size: int, base: str, count: int) -> int:
    """``chatdb archive restore`` of ``count`` conversations named with --conversation,
    picked across the archive of the copy the archive run left (then dropped). Returns the
    count restored: fewer when a small database's archive holds fewer, so that every size
    restores as many."""
    print(f"{size:,}: archive restore ...", flush=True)
    archived = f"{base}_archive"
    engine = scratch.engine(archived)
    with engine.connect() as connection:
        ids = connection.execute(
            text("SELECT id FROM conversations_archive ORDER BY md5(id::text) LIMIT :n"), {"n": count}
        ).scalars()
        named = [option for i in ids for option in ("--conversation", str(i))]
    engine.dispose()
    if len(named) // 2 < count:
        count = len(named) // 2
        print(f"note: the archive at {size:,} messages holds {count:,} conversations; restoring that many")
    scratch.checkpoint()
    target = scratch.target(archived)
    seconds, rss, stdout = run([*COMMAND, "archive", "restore", *named, "--json", "--database-url", target])
    scratch.drop(archived)
    result = json.loads(stdout)
    if result["done"]["conversations"] != count:
        print(f"warning: restored {result['done']['conversations']:,} of {count:,} conversations")
    label = f"chatdb archive restore ({count:,} conversations)"
    table.add(label, "time", "s", "flat", size, seconds)
    table.add(label, "messages/s", "/s", "info", size, result["done"]["messages"] / seconds)
    table.add(label, "peak RSS", "bytes", "flat", size, rss)
    table.add(label, "longest transaction", "ms", "flat", size, result["longest_transaction_seconds"])
    return count


def bench(
    scratch: Scratch, table: Table, bases: dict[int, str], rate: float, seconds: int, clients: int, runs: int
) -> None:
    """``chatdb bench`` at one fixed rate, ``runs`` rounds of every size in turn: each
    pattern's median p95 (latency from its scheduled start), which should not depend on
    the data (each pattern is an index lookup). It writes only rows of its own and
    removes them, so it runs last, on the seeded databases."""
    print(f"bench at {rate:g} tps at every size, rounds: {runs} ...", flush=True)
    label = f"bench --rate {rate:g} --clients {clients}"
    command = [
        *COMMAND,
        "bench",
        "--rate",
        f"{rate:g}",
        "--duration",
        f"{seconds}s",
        "--clients",
        str(clients),
    ]
    reports: dict[int, list[tuple[int, dict[str, Any]]]] = {size: [] for size in bases}
    for _ in range(runs):
        for size, base in bases.items():
            scratch.checkpoint()
            # bench exits 1 when a budget is missed; its --json is printed all the same
            _, rss, stdout = run([*command, "--json", "--database-url", scratch.target(base)], accept=(0, 1))
            reports[size].append((rss, json.loads(stdout)))
    for size, results in reports.items():
        phases = [report["phases"][0] for _, report in results]
        table.add(
            label, "tps achieved", "/s", "info", size, statistics.median(phase["tps"] for phase in phases)
        )
        for pattern in (pattern["pattern"] for pattern in phases[0]["patterns"]):
            p95 = statistics.median(
                found["p95_ms"]
                for phase in phases
                for found in phase["patterns"]
                if found["pattern"] == pattern
            )
            table.add(f"  {pattern}", f"p95, median of {runs}", "ms", "flat", size, p95 / 1000)
        missed = sorted(
            {
                f"{pattern['pattern']}.{budget['metric']}"
                for phase in phases
                for pattern in phase["patterns"]
                for budget in pattern["budgets"]
                if budget["status"] != "ok"
            }
        )
        table.add(
            label, "runs that missed a budget", "count", "count", size, sum(not r["ok"] for _, r in results)
        )
        if missed:
            print(f"note: at {size:,} messages bench missed {', '.join(missed)}")
        table.add(label, "peak RSS (with pgbench)", "bytes", "flat", size, max(rss for rss, _ in results))


def parse_parts(raw: str) -> list[str]:
    parts = [part.strip() for part in raw.split(",") if part.strip()]
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(PARTS)}, not {raw!r}")
    if "restore" in parts and "writes" not in parts:
        raise argparse.ArgumentTypeError("restore needs writes: it restores from the archive run's copy")
    return [part for part in PARTS if part in parts]


def parse_runs(raw: str) -> int:
    if not raw.isascii() or not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of runs, at least 1, not {raw!r}")
    return int(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=[1_000_000, 10_000_000],
        help="messages in each database, comma-separated (default: 1000000,10000000)",
    )
    parser.add_argument(
        "--older-than",
        type=parse_days,
        help="the retention age in whole days, e.g. 90d (default: the days that leave about "
        "three quarters of the conversations idle past them)",
    )
    parser.add_argument("--runs", type=parse_runs, default=3, help="runs of each read-only command; medians")
    parser.add_argument(
        "--bench-rate", type=float, default=BENCH_RATE, help=f"chatdb bench's --rate (default {BENCH_RATE:g})"
    )
    parser.add_argument(
        "--bench-seconds",
        type=parse_runs,
        default=BENCH_SECONDS,
        help=f"chatdb bench's --duration in seconds (default {BENCH_SECONDS})",
    )
    parser.add_argument(
        "--bench-clients",
        type=parse_runs,
        default=BENCH_CLIENTS,
        help=f"chatdb bench's --clients (default {BENCH_CLIENTS})",
    )
    parser.add_argument(
        "--bench-runs", type=parse_runs, default=3, help="rounds of chatdb bench at every size; medians"
    )
    parser.add_argument(
        "--parts",
        type=parse_parts,
        default=list(PARTS),
        help=f"what to measure after seeding, comma-separated (default: all of {','.join(PARTS)}); "
        "restore needs writes (it restores from the archive run's copy)",
    )
    args = parser.parse_args()
    sizes: list[int] = args.sizes
    parts: list[str] = args.parts
    days: int | None = args.older_than
    count = RESTORE
    table = Table()
    scratch = Scratch()
    daily: dict[str, float] | None = None
    bases: dict[int, str] = {}
    try:
        print(scratch.settings(), flush=True)
        for size in sizes:
            bases[size], server = seeded(scratch, table, size)
        if days is None:
            days = scratch.idle_days(bases[sizes[0]])
        if "reads" in parts:
            reads(scratch, table, bases, days, args.runs)
        for size, base in bases.items():
            if "deep" in parts:
                doctor_deep(scratch, table, size, base, days)
            if "writes" in parts:
                writes(scratch, table, size, base, days)
            if "restore" in parts:
                count = restore(scratch, table, size, base, count)
        if "daily" in parts:
            print(f"{sizes[-1]:,}: the daily purge ...", flush=True)
            daily = daily_job(scratch, bases[sizes[-1]], days)
        if "bench" in parts:
            bench(
                scratch,
                table,
                bases,
                args.bench_rate,
                args.bench_seconds,
                args.bench_clients,
                args.bench_runs,
            )
    finally:
        scratch.close()

    print()
    print(
        f"PostgreSQL {server}; each size seeded with a user per 100 messages and a conversation per 20, "
        f"over 365 days; retention {days}d; "
        f"read-only commands: median of {args.runs}; measured: {','.join(parts)}"
    )
    table.print(sizes)
    if daily is None:
        return
    print()
    print(
        f"daily job at {sizes[-1]:,} messages (after a purge at {days + 1}d, vacuumed): "
        f"chatdb purge --older-than {days}d took {daily['conversations']:,.0f} conversations and "
        f"{daily['messages']:,.0f} messages in {daily['seconds']:.2f} s "
        f"({daily['messages'] / daily['seconds']:,.0f} messages/s), "
        f"peak RSS {daily['rss'] / 2**20:.0f} MB, longest transaction {daily['longest'] * 1000:.0f} ms, "
        f"{daily['slow']:.0f} over 250 ms"
    )
    print(
        f"conversation history p95: {daily['p95_alone']:.2f} ms alone, {daily['p95_during']:.2f} ms "
        f"during the daily purge ({daily['queries']:,.0f} queries)"
    )


def daily_job(scratch: Scratch, base: str, days: int) -> dict[str, float]:
    """The steady-state daily purge: yesterday's (at days + 1), a VACUUM as autovacuum
    would have run since, then today's (at days), beside the conversation-history reader."""
    name = f"{base}_daily"
    target = scratch.database(name, base)
    run(lifecycle_command("purge", f"{days + 1}d", target))
    scratch.vacuum(name)
    scratch.checkpoint()
    alone = Reader(target)
    alone.start()
    time.sleep(5)
    alone.stop.set()
    alone.join()
    during = Reader(target)
    during.start()
    elapsed, rss, stdout = run(lifecycle_command("purge", f"{days}d", target))
    during.stop.set()
    during.join()
    scratch.drop(name)
    result = json.loads(stdout)
    return {
        "seconds": elapsed,
        "rss": rss,
        "conversations": result["done"]["conversations"] + result["done"]["archive_conversations"],
        "messages": result["done"]["messages"] + result["done"]["archive_messages"],
        "longest": result["longest_transaction_seconds"],
        "slow": result["slow_transactions"],
        "p95_alone": alone.p95_ms(),
        "p95_during": during.p95_ms() if len(during.latencies) > 1 else float("nan"),
        "queries": len(during.latencies),
    }


if __name__ == "__main__":
    main()
