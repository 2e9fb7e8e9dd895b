"""chatdb on a three-node Citus cluster next to one plain PostgreSQL server: cost and
correctness, not speed-up.

    python bench/bench_citus.py [--messages 1000000] [--older-than Nd]

Starts a coordinator and two workers on loopback ports the way the tests start them
(``tests/servers.py``: Debian's PostgreSQL with Citus, eight shards per table), but with
PostgreSQL's default ``shared_buffers`` (128MB) rather than the tests' 32MB. All three
share this machine's cores, so the cluster cannot be faster than one server here: the
figures say what distribution costs, and that the commands do exactly the same work.

On the cluster (the tables distributed by ``chatdb migrate``) and on a plain database of
the coordinator's server (the same PostgreSQL, without the extension), each seeded with
--messages messages in bench_lifecycle.py's shape (a user per 100 messages, a
conversation per 20, over 365 days), then on identical copies (CREATE DATABASE ...
TEMPLATE, on every node):

- `chatdb seed`: messages/s;
- `chatdb purge --older-than Nd` (the grace period past every soft delete) next to one
  plain `DELETE FROM conversations WHERE updated_at < ...` in one transaction (through
  the coordinator on the cluster; its cascade deletes the messages);
- `chatdb archive --older-than Nd` next to the plain INSERT ... SELECT archive of
  bench_lifecycle.py in one transaction;
- the longest transaction of each (chatdb's from its --json; a plain statement's is its
  whole run) and that the counts match;
- the application's conversation history (``chatdb.patterns.conversation_history``, with
  its ``user_id``, as the application passes it on Citus: a router query) back to back:
  its p95 alone and during the purge.

N defaults to the whole days that leave about three quarters of the conversations idle.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from _harness import (  # bench/ is on sys.path
    COMMAND,
    Reader,
    Stalls,
    lifecycle_command,
    moving,
    plain_archive,
    run,
)

from chatdb import db, patterns
from chatdb.schema import messages

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import servers  # the test harness's servers: the cluster as the tests start it


class History(Reader):
    """The application's conversation-history query with its ``user_id``, back to back."""

    KEYS = "SELECT id, user_id FROM conversations"

    def statement(self, key: Any) -> Any:
        return patterns.conversation_history(key[0]).where(messages.c.user_id == key[1])


class Target:
    """Databases on the cluster (``citus``) or plain ones on the coordinator's server."""

    def __init__(self, cluster: servers.CitusCluster, citus: bool) -> None:
        self.cluster = cluster
        self.citus = citus
        self.created: list[str] = []

    @property
    def nodes(self) -> list[servers.CitusNode]:
        return self.cluster.nodes if self.citus else [self.cluster.coordinator]

    def url(self, name: str) -> str:
        return self.cluster.url(name)

    def stalls(self) -> Stalls:
        """A started ``Stalls`` on the coordinator, watching the workers too on the cluster."""

        def url(node: servers.CitusNode) -> Any:
            return db.parse_url(f"postgresql://postgres@localhost:{node.port}/postgres")

        workers = self.cluster.workers if self.citus else []
        stalls = Stalls(url(self.cluster.coordinator), [url(worker) for worker in workers])
        stalls.start()
        return stalls

    def create(self, name: str) -> str:
        if self.citus:
            self.cluster.create_database(name)
        else:
            self._admin(self.cluster.coordinator, f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return self.url(name)

    def copy(self, name: str, template: str) -> str:
        """A copy of ``template`` on every node: Citus's metadata names nodes, not
        databases, so the copies make a cluster database of their own."""
        for node in self.nodes:
            with psycopg.connect(node.conninfo(), autocommit=True) as connection:
                for _ in range(50):
                    # Citus's maintenance daemon and cached connections stay in the template.
                    connection.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = %s AND pid <> pg_backend_pid()",
                        (template,),
                    )
                    try:
                        connection.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
                        break
                    except psycopg.errors.ObjectInUse:
                        time.sleep(0.2)
                else:
                    raise SystemExit(f"could not copy {template} on port {node.port}")
                connection.execute("CHECKPOINT")
        self.created.append(name)
        return self.url(name)

    def drop(self, name: str) -> None:
        for node in self.nodes:
            self._admin(node, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        for name in reversed(self.created):
            self.drop(name)

    @staticmethod
    def _admin(node: servers.CitusNode, statement: str) -> None:
        with psycopg.connect(node.conninfo(), autocommit=True) as connection:
            connection.execute(statement)


def scalar(url: str, query: str) -> object:
    with psycopg.connect(url) as connection:
        row = connection.execute(query).fetchone()
        assert row is not None
        return row[0]


def plain_sql(url: str, statements: list[str]) -> float:
    """The statements in one transaction: its seconds."""
    with psycopg.connect(url) as connection:
        started = time.perf_counter()
        for statement in statements:
            connection.execute(statement)
        connection.commit()
        return time.perf_counter() - started


def measure(target: Target, label: str, size: int, older_than: str | None) -> dict:
    print(f"{label}: seeding {size:,} messages ...", flush=True)
    base = f"chatdb_bench_citus_{os.getpid()}_{label}"
    url = target.create(base)
    run([*COMMAND, "migrate", "--database-url", url])
    sizes = ["--users", str(size // 100), "--conversations", str(size // 20), "--messages", str(size)]
    seed_s, _, _ = run([*COMMAND, "seed", "--database-url", url, *sizes, "--days", "365", "--yes"])
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")
        if older_than is None:
            row = connection.execute(
                "SELECT extract(day FROM now() - percentile_disc(0.75) WITHIN GROUP (ORDER BY updated_at))"
                " FROM conversations"
            ).fetchone()
            assert row is not None
            older_than = f"{int(row[0])}d"
    days = int(older_than.rstrip("d"))
    out: dict = {"seed_s": seed_s, "older_than": older_than}

    quiet = History(target.url(base))
    quiet.start()
    time.sleep(5)
    quiet.stop.set()
    quiet.join()
    out["p95_quiet_ms"] = quiet.p95_ms()

    copy = target.copy(f"{base}_delete", base)
    before = scalar(copy, "SELECT count(*) FROM messages")
    out["delete_s"] = plain_sql(
        copy, [f"DELETE FROM conversations WHERE updated_at < now() - interval '{days} days'"]
    )
    out["delete_messages"] = before - scalar(copy, "SELECT count(*) FROM messages")
    target.drop(f"{base}_delete")

    copy = target.copy(f"{base}_insert", base)
    out["insert_s"] = plain_sql(copy, plain_archive(moving(days)))
    out["insert_messages"] = scalar(copy, "SELECT count(*) FROM messages_archive")
    target.drop(f"{base}_insert")

    copy = target.copy(f"{base}_purge", base)
    reader = History(copy)
    reader.start()
    stalls = target.stalls()
    out["purge_s"], _, stdout = run(lifecycle_command("purge", older_than, copy))
    stalls.stop.set()
    stalls.join()
    reader.stop.set()
    reader.join()
    out["purge"] = {**json.loads(stdout), "stalls": stalls.summary()}
    out["p95_purge_ms"] = reader.p95_ms()
    out["p95_purge_queries"] = len(reader.latencies)
    target.drop(f"{base}_purge")

    copy = target.copy(f"{base}_archive", base)
    stalls = target.stalls()
    out["archive_s"], _, stdout = run(lifecycle_command("archive", older_than, copy))
    stalls.stop.set()
    stalls.join()
    out["archive"] = {**json.loads(stdout), "stalls": stalls.summary()}
    target.drop(f"{base}_archive")
    target.drop(base)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--older-than", help="the retention age (default: about three quarters idle)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="chatdb-bench-citus-"))
    folder.chmod(0o755)
    results = {}
    with servers.citus_cluster(folder, shared_buffers="128MB") as cluster:
        for label, citus in (("plain", False), ("citus", True)):
            target = Target(cluster, citus)
            try:
                results[label] = measure(target, label, args.messages, args.older_than)
                args.older_than = results[label]["older_than"]
            finally:
                target.close()
    report(results, args.messages)


def report(results: dict, size: int) -> None:
    plain, citus = results["plain"], results["citus"]
    print(
        f"\n{datetime.date.today()} on {platform.node()} ({os.cpu_count()} cores): {size:,} messages, "
        f"purge and archive at {plain['older_than']}. The coordinator and both workers share these "
        "cores: the question is cost and correctness, not speed-up."
    )

    def line(label: str, seconds: float, count: int, versus: float | None, longest: float | None) -> None:
        rate = count / seconds
        ratio = f"  {rate / versus:.2f}x" if versus else ""
        held = f"  longest transaction {longest * 1000:,.0f} ms" if longest is not None else ""
        print(f"  {label:42s} {seconds:7.2f} s {count:>9,} messages {rate:>9,.0f}/s{ratio}{held}")

    for label, out in (("one PostgreSQL server", plain), ("Citus, 3 nodes", citus)):
        print(f"{label}:")
        line("chatdb seed (COPY, one transaction)", out["seed_s"], size, None, out["seed_s"])
        base = out["delete_messages"] / out["delete_s"]
        line("plain DELETE (one transaction)", out["delete_s"], out["delete_messages"], None, out["delete_s"])
        purge = out["purge"]
        line(
            "chatdb purge (x the plain DELETE)",
            out["purge_s"],
            purge["done"]["messages"],
            base,
            purge["longest_transaction_seconds"],
        )
        line(
            "plain INSERT ... SELECT archive", out["insert_s"], out["insert_messages"], None, out["insert_s"]
        )
        archive = out["archive"]
        line(
            "chatdb archive (x the plain INSERT ... SELECT)",
            out["archive_s"],
            archive["done"]["messages"],
            out["insert_messages"] / out["insert_s"],
            archive["longest_transaction_seconds"],
        )
        print(
            f"  {purge['batches']:,} purge and {archive['batches']:,} archive transactions, "
            f"{purge['slow_transactions'] + archive['slow_transactions']} over 250 ms; history p95 "
            f"{out['p95_quiet_ms']:.2f} ms alone, {out['p95_purge_ms']:.2f} ms during the purge "
            f"({out['p95_purge_queries']:,} queries)"
        )
        print(f"  purge, on the servers: {purge['stalls']}")
        print(f"  archive, on the servers: {archive['stalls']}")
        if purge["done"]["messages"] != out["delete_messages"]:
            print(
                f"  warning: purge deleted {purge['done']['messages']:,},"
                f" the DELETE {out['delete_messages']:,}"
            )
        if archive["done"]["messages"] != out["insert_messages"]:
            print(
                f"  warning: archive moved {archive['done']['messages']:,},"
                f" the plain {out['insert_messages']:,}"
            )
    print("Citus / one server (throughput):")
    for label, key in (
        ("seed", "seed_s"),
        ("chatdb purge", "purge_s"),
        ("chatdb archive", "archive_s"),
        ("plain DELETE", "delete_s"),
        ("plain INSERT ... SELECT", "insert_s"),
    ):
        print(f"  {label:26s} {plain[key] / citus[key]:.2f}x")
    print(
        json.dumps(
            {k: {n: v for n, v in out.items() if n not in ("purge", "archive")} for k, out in results.items()}
        )
    )


if __name__ == "__main__":
    main()
