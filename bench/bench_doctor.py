"""Wall time of `chatdb doctor`, Python start included, on a seeded database of 1,000,000
messages and on one of 10,000: by default it reads the catalog and the statistics only,
so its cost must not grow with the data. Then `chatdb doctor --deep` on both: its time,
and what it read.

Baselines, measured in the same run: `chatdb --version` (the same Python start and
imports, no database) and `chatdb migrate status` on the large database (Python start,
connecting, and reading the revision). Rounds alternate the commands so that drift on a
shared machine hits them alike; medians are reported. Each database gets eight weeks of
hourly size samples first (as `status` and `doctor` runs would leave), and the
pgstattuple and amcheck extensions, so that every check runs.

What --deep read is the server's own count of the blocks the run touched
(pg_stat_database: blks_hit + blks_read), and the bytes doctor says pgstattuple and
amcheck read.

    python bench/bench_doctor.py [--messages 1000000] [--small 10000] [--runs 7] [--deep-runs 3]

Uses BENCH_DATABASE_URL (a role with CREATEDB) when set, else starts an embedded
PostgreSQL in a temporary folder. The aims: under 2 s on the large database, and within
1.2 times the small database's time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _harness import COMMAND, Scratch, alternate, print_medians, run, start_baselines  # bench/ is on sys.path
from sqlalchemy import text

#: Eight weeks of hourly samples of the eight rows a run records.
HISTORY = """
INSERT INTO chatdb_size_history (recorded_at, command, table_name, row_estimate, total_bytes)
SELECT now() - make_interval(hours => h), 'bench', t, CASE WHEN t IS NULL THEN NULL ELSE 1000 END,
       1000000000 - h * 10000
FROM generate_series(1, 24 * 56) AS h,
     unnest(ARRAY[NULL, 'users', 'conversations', 'messages', 'conversations_archive',
                  'messages_archive', 'chatdb_runs', 'chatdb_size_history']) AS t
"""


def blocks(engine) -> int:
    """Blocks this database's sessions have touched, as the server counts them."""
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_stat_clear_snapshot()"))
        return int(
            connection.execute(
                text("SELECT blks_hit + blks_read FROM pg_stat_database WHERE datname = current_database()")
            ).scalar_one()
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages in the large database")
    parser.add_argument("--small", type=int, default=10_000, help="messages in the small database")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--deep-runs", type=int, default=3)
    args = parser.parse_args()

    deep: dict[int, list[tuple[float, dict, int]]] = {}
    with Scratch() as scratch:
        targets: dict[int, str] = {}
        engines = {}
        for size in (args.messages, args.small):
            name, (seconds, _, _) = scratch.seeded(f"doctor_{size}", size)
            print(f"seeding {size:,} messages: {seconds:.1f} s", flush=True)
            engine = engines[size] = scratch.engine(name)
            with engine.connect() as connection:
                connection.execute(text(HISTORY))
                connection.execute(text("CREATE EXTENSION IF NOT EXISTS pgstattuple"))
                connection.execute(text("CREATE EXTENSION IF NOT EXISTS amcheck"))
                connection.commit()
                connection.execute(text("ANALYZE"))
                connection.commit()
                total = connection.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
            print(f"  database size {total / 2**20:,.0f} MB", flush=True)
            targets[size] = scratch.target(name)

        def doctor(size: int, *extra: str) -> list[str]:
            return [*COMMAND, "doctor", "--json", *extra, "--database-url", targets[size]]

        commands = {f"doctor, {size:,} messages": doctor(size) for size in (args.messages, args.small)}
        samples = alternate({**commands, **start_baselines(targets[args.messages])}, args.runs)
        for size in (args.messages, args.small):
            deep[size] = []
            for _ in range(args.deep_runs):
                before = blocks(engines[size])
                elapsed, _, stdout = run(doctor(size, "--deep"))
                time.sleep(1)  # the server's block counts reach pg_stat_database a moment later
                deep[size].append((elapsed, json.loads(stdout), blocks(engines[size]) - before))
        for engine in engines.values():
            engine.dispose()

    inside = {
        label: statistics.median(json.loads(stdout)["elapsed_seconds"] for _, stdout in samples[label])
        for label in commands
    }
    large, small, start, migrate_status = print_medians(
        {label: [seconds for seconds, _ in runs] for label, runs in samples.items()},
        {label: f"  (in doctor: {seconds:.3f} s)" for label, seconds in inside.items()},
    )
    print(
        f"chatdb doctor on {args.messages:,} messages: {large:.3f} s (aim: <= 2 s); "
        f"on {args.small:,}: {small:.3f} s; large/small = {large / small:.2f}x (aim: <= 1.2x)"
    )
    print(
        f"doctor / `chatdb --version` = {large / start:.2f}x; doctor / `chatdb migrate status` = "
        f"{large / migrate_status:.2f}x (its own work beyond connecting: {large - migrate_status:+.3f} s)"
    )
    for size, runs in deep.items():
        elapsed = statistics.median(run[0] for run in runs)
        payload = runs[len(runs) // 2][1]
        touched = statistics.median(run[2] for run in runs) * 8192
        print(
            f"doctor --deep on {size:,} messages: median {elapsed:.2f} s ({len(runs)} runs); its deep checks "
            f"{payload['deep_seconds']:.2f} s; pgstattuple and amcheck read "
            f"{payload['deep_read_bytes'] / 2**20:,.1f} MB; the server counted "
            f"{touched / 2**20:,.1f} MB of blocks touched (8 kB each)"
        )


if __name__ == "__main__":
    main()
