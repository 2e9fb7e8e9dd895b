"""What the second phase costs a lifecycle batch on a Citus cluster.

    python bench/bench_citus_commit.py [--messages 100000] [--transactions 500]

Starts a coordinator and two workers as bench_citus.py does, migrates and seeds a
database, then times transactions shaped like a batch's fixed part: one router write on
a worker (an UPDATE of one message, by its ``user_id``), then the update of an audit row
on the coordinator, with ``synchronous_commit`` on. The audit row is either in a plain
table of the coordinator (Citus commits the worker's write in one phase) or in
``chatdb_runs``, the Citus local table ``chatdb migrate`` makes of it (two phases: PREPARE
TRANSACTION on the worker, then COMMIT PREPARED). The two kinds alternate, so that the
machine's load weighs on both alike; the run is made with the nodes' ``fsync`` off (as
the tests and bench_citus.py run them) and on.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from _harness import COMMAND, run  # bench/ is on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import servers  # the test harness's servers: the cluster as the tests start it

WRITE = "UPDATE messages SET deleted_at = deleted_at WHERE user_id = %s AND id = %s"
AUDIT = {
    "one phase": "UPDATE bench_runs SET heartbeat_at = now(), counts = counts || jsonb_build_object("
    "'messages', coalesce((counts->>'messages')::bigint, 0) + 1) WHERE id = %s",
    "two phases": "UPDATE chatdb_runs SET heartbeat_at = now(), counts = counts || jsonb_build_object("
    "'messages', coalesce((counts->>'messages')::bigint, 0) + 1) WHERE id = %s",
}


def fsync(cluster: servers.CitusCluster, on: bool) -> None:
    for node in cluster.nodes:
        with psycopg.connect(node.conninfo(), autocommit=True) as connection:
            connection.execute(f"ALTER SYSTEM SET fsync = {'on' if on else 'off'}")
            connection.execute("SELECT pg_reload_conf()")
    time.sleep(1)


def measure(url: str, transactions: int) -> dict:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("DROP TABLE IF EXISTS bench_runs")
        connection.execute(
            "CREATE TABLE bench_runs (id bigint PRIMARY KEY, heartbeat_at timestamptz, counts jsonb)"
        )
        connection.execute("INSERT INTO bench_runs VALUES (1, now(), '{}')")
        row = connection.execute(
            "INSERT INTO chatdb_runs (command, outcome) VALUES ('bench', 'failed') RETURNING id"
        ).fetchone()
        assert row is not None
        ids = {"one phase": 1, "two phases": row[0]}
        keys = connection.execute("SELECT user_id, id FROM messages TABLESAMPLE BERNOULLI (5)").fetchall()
    times: dict[str, list[float]] = {kind: [] for kind in AUDIT}
    kinds = list(AUDIT)
    with psycopg.connect(url) as connection:
        for n in range(2 * transactions + 20):
            kind = kinds[n % 2]
            user, message = random.choice(keys)
            started = time.perf_counter()
            connection.execute("SELECT set_config('synchronous_commit', 'on', true)")
            connection.execute(WRITE, (user, message))
            connection.execute(AUDIT[kind], (ids[kind],))
            connection.commit()
            if n >= 20:  # the first ones open the connections to the workers
                times[kind].append((time.perf_counter() - started) * 1000)
    found = {}
    for kind, values in times.items():
        values.sort()
        found[kind] = {
            "median_ms": round(statistics.median(values), 2),
            "mean_ms": round(statistics.mean(values), 2),
            "p95_ms": round(values[int(0.95 * len(values))], 2),
        }
    found["second phase, median"] = {
        "ms": round(found["two phases"]["median_ms"] - found["one phase"]["median_ms"], 2)
    }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--transactions", type=int, default=500, help="of each kind, per fsync setting")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="chatdb-bench-citus-commit-"))
    folder.chmod(0o755)
    results = {}
    with servers.citus_cluster(folder, shared_buffers="128MB") as cluster:
        name = f"chatdb_bench_commit_{os.getpid()}"
        cluster.create_database(name)
        try:
            url = cluster.url(name)
            run([*COMMAND, "migrate", "--database-url", url])
            size = args.messages
            sizes = ["--users", str(size // 100), "--conversations", str(size // 20), "--messages", str(size)]
            run([*COMMAND, "seed", "--database-url", url, *sizes, "--days", "365", "--yes"])
            for on in (False, True):
                fsync(cluster, on)
                results[f"fsync {'on' if on else 'off'}"] = measure(url, args.transactions)
        finally:
            fsync(cluster, False)
            cluster.drop_database(name)
    print(
        f"{args.transactions} transactions of each kind, alternating, on {os.cpu_count()} cores"
        f" ({args.messages:,} messages): a router write on a worker, then the audit row"
    )
    for setting, found in results.items():
        print(f"{setting}:")
        for kind in AUDIT:
            values = found[kind]
            print(
                f"  {kind:11s} median {values['median_ms']:6.2f} ms  mean {values['mean_ms']:6.2f} ms"
                f"  p95 {values['p95_ms']:6.2f} ms"
            )
        print(f"  the second phase: {found['second phase, median']['ms']:+.2f} ms at the median")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
