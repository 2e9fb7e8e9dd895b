"""Wall time of `chatdb verify-indexes`, Python start included, on a seeded database of
1,000,000 messages and on one of 10,000: the cost must not grow with the data.

Baselines, measured in the same run: `chatdb --version` (the same Python start and
imports, no database) and `chatdb migrate status` on the large database (Python start,
connecting, and reading the revision: the least any database command does). Rounds
alternate the commands so that drift on a shared machine hits them alike; medians are
reported.

    python bench/bench_verify_indexes.py [--messages 1000000] [--small 10000] [--runs 7]

Uses BENCH_DATABASE_URL (a role with CREATEDB) when set, else starts an embedded
PostgreSQL in a temporary folder. Seeding the large database takes a while (about 15 s
on a quiet machine). The aim is under 2 s on the large database.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench_migrate import chatdb_command, server_url  # run as a script: bench/ is on sys.path
from sqlalchemy import create_engine, text

from chatdb import db, migrations


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(command[:2])} failed ({result.returncode}): {result.stdout}{result.stderr}"
        )
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages in the large database")
    parser.add_argument("--small", type=int, default=10_000, help="messages in the small database")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="chatdb-bench-"))
    os.chmod(workdir, 0o755)
    url, server = server_url(workdir)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CHATDB_DATABASE_URL")}
    created: list[str] = []
    targets: dict[int, str] = {}
    try:
        for size in (args.messages, args.small):
            name = f"chatdb_bench_verify_{os.getpid()}_{size}"
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            created.append(name)
            target = url.set(database=name)
            engine = db.connect(db.Database(target, "bench"))
            migrations.upgrade(engine)
            typed = target.set(drivername="postgresql").render_as_string(hide_password=False)
            seed = [*chatdb_command(), "seed", "--database-url", typed, "--messages", str(size)]
            seed += ["--conversations", str(size // 20), "--users", str(max(size // 100, 1))]
            print(f"seeding {size:,} messages: {timed(seed, env):.1f} s", flush=True)
            with engine.connect() as connection:
                connection.execute(text("ANALYZE"))
                connection.commit()
                count = connection.execute(text("SELECT count(*) FROM messages")).scalar_one()
            engine.dispose()
            assert count == size, f"expected {size:,} messages, found {count:,}"
            targets[size] = typed

        labels = {
            f"verify-indexes, {args.messages:,} messages": [
                *chatdb_command(),
                "verify-indexes",
                "--database-url",
                targets[args.messages],
            ],
            f"verify-indexes, {args.small:,} messages": [
                *chatdb_command(),
                "verify-indexes",
                "--database-url",
                targets[args.small],
            ],
            "chatdb --version": [*chatdb_command(), "--version"],
            "chatdb migrate status": [
                *chatdb_command(),
                "migrate",
                "status",
                "--database-url",
                targets[args.messages],
            ],
        }
        samples: dict[str, list[float]] = {label: [] for label in labels}
        for _ in range(args.runs):
            for label, command in labels.items():
                samples[label].append(timed(command, env))
    finally:
        for name in created:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        if server is not None:
            server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)

    for label, values in samples.items():
        print(
            f"{label:38s} median {statistics.median(values):.3f} s"
            f"  min {min(values):.3f} s  ({len(values)} runs)"
        )
    large, small, start, migrate_status = (statistics.median(values) for values in samples.values())
    print(
        f"chatdb verify-indexes on {args.messages:,} messages: {large:.3f} s (aim: < 2 s); "
        f"on {args.small:,}: {small:.3f} s; large/small = {large / small:.2f}x (aim: 1, within noise)"
    )
    print(
        f"verify-indexes / `chatdb --version` = {large / start:.2f}x; "
        f"verify-indexes / `chatdb migrate status` = {large / migrate_status:.2f}x "
        f"(its own work beyond connecting: {large - migrate_status:+.3f} s)"
    )


if __name__ == "__main__":
    main()
