"""`chatdb seed` throughput and memory, against a naive baseline measured in the same run.

    python bench/bench_seed.py                      # 1,000,000 messages / 50,000 conversations / 10,000 users
    python bench/bench_seed.py --messages 100000    # smaller sizes keep the same proportions

In each round (three by default, alternating, medians reported: the machines are shared
and noisy), on a fresh database migrated to head (a copy of one template), end to end
with Python start included:

- chatdb:   `chatdb seed --users U --conversations C --messages M` as a subprocess;
- baseline: a subprocess that generates the equivalent rows (same plan, same content
  pools) as Python objects and loads them with one client-side COPY per table using
  psycopg's ``write_row``, straight into the constrained tables, in one transaction.

Prints messages/s for both, the ratio, and each process's peak RSS. The memory check runs
chatdb at 100,000 and at the requested size: peak RSS should be flat.
Uses BENCH_DATABASE_URL (a role with CREATEDB) when set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import uuid

# --- the baseline (runs in its own process) ----------------------------------------------------


def naive_load(url: str, users: int, conversations: int, messages: int, seed: int) -> None:
    import random

    import psycopg
    from faker import Faker
    from psycopg.types.json import Jsonb

    from chatdb import seed as chatdb_seed
    from chatdb.seed import content, distributions

    request = chatdb_seed.SeedRequest(users, conversations, messages, chatdb_seed.DEFAULT_DAYS, seed)
    fake = Faker("en_US")
    fake.seed_instance(seed)
    content_rng = random.Random(seed ^ 0x5EED)
    turns = content.build_turns(content_rng, fake)
    user_metadata = content.user_metadata_pool(content_rng)
    plan = distributions.Plan(request)
    with psycopg.connect(url) as connection:
        anchor = connection.execute("SELECT now()").fetchone()[0]

        def at(before_us: int) -> dt.datetime:
            return anchor - dt.timedelta(microseconds=before_us)

        with connection.cursor() as cursor:
            with cursor.copy("COPY users (id, email, name, created_at) FROM STDIN") as copy:
                for number in range(users):
                    name = fake.name()
                    copy.write_row(
                        (
                            f"{request.user_prefix}{number:07d}",
                            f"{name.replace(' ', '.').lower()}.{seed}.{number}@example.com",
                            name,
                            at(400 * 86_400_000_000),
                        )
                    )
            columns = "id, user_id, status, created_at, updated_at, title, metadata, deleted_at"
            with cursor.copy(f"COPY conversations ({columns}) FROM STDIN") as copy:
                for c in plan.conversations(len(turns)):
                    copy.write_row(
                        (
                            uuid.UUID(c.id),
                            c.user_id,
                            c.status,
                            at(c.created_before),
                            at(c.last_before),
                            turns[c.first_turn].title,
                            None if c.metadata is None else Jsonb({"source": "web"}),
                            at(c.deleted_before) if c.deleted_before is not None else None,
                        )
                    )
            columns = (
                "id, conversation_id, user_id, role, content, metadata, created_at, tool_calls, tool_results"
            )
            with cursor.copy(f"COPY messages ({columns}) FROM STDIN") as copy:
                rng = plan.message_rng()
                for c in plan.conversations(len(turns)):
                    conversation_id = uuid.UUID(c.id)
                    turn = turns[c.first_turn]
                    for position, before in enumerate(distributions.message_times(c, rng)):
                        if position % 2 == 0:
                            meta = user_metadata[int(rng.random() * len(user_metadata))]
                            row = ("user", turn[0], Jsonb(meta) if meta else None, None, None)
                        else:
                            row = (
                                "assistant",
                                turn[2],
                                Jsonb(turn[3]),
                                Jsonb(turn[4]) if turn[4] else None,
                                Jsonb(turn[5]) if turn[5] else None,
                            )
                            turn = turns[int(rng.random() * len(turns))]
                        copy.write_row(
                            (
                                uuid.uuid4(),
                                conversation_id,
                                c.user_id,
                                row[0],
                                row[1],
                                row[2],
                                at(before),
                                row[3],
                                row[4],
                            )
                        )
        connection.commit()


def main() -> None:
    parser = argparse.ArgumentParser(description="chatdb seed benchmark")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--naive", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each contender; medians are reported")
    parser.add_argument("--skip-memory", action="store_true", help="skip the 100,000-message memory run")
    args = parser.parse_args()
    messages = args.messages
    conversations, users = messages // 20, messages // 100
    if args.naive:
        naive_load(args.naive, users, conversations, messages, seed=7)
        return

    # Imported here: the baseline's own process (above) starts without them.
    from _harness import COMMAND, Scratch, run  # bench/ is on sys.path

    from chatdb import db, migrations

    scratch = Scratch()
    template = f"chatdb_bench_template_{os.getpid()}"

    def fresh(label: str) -> str:
        return scratch.database(f"chatdb_bench_{os.getpid()}_{label}", template)

    def drop(target: str) -> None:
        scratch.drop(target.rsplit("/", 1)[1].split("?", 1)[0])

    def chatdb_seed(size: int, label: str) -> tuple[float, int]:
        target = fresh(f"chatdb_{size}_{label}")
        command = [*COMMAND, "seed", "--database-url", target, "--seed", "7"]
        command += ["--users", str(size // 100), "--conversations", str(size // 20), "--messages", str(size)]
        try:
            return run(command)[:2]
        finally:
            drop(target)

    def naive(label: str) -> tuple[float, int]:
        target = fresh(f"naive_{label}")
        try:
            return run([sys.executable, __file__, "--messages", str(messages), "--naive", target])[:2]
        finally:
            drop(target)

    try:
        scratch.database(template)
        engine = db.connect(db.Database(scratch.url.set(database=template), "bench"))
        migrations.upgrade(engine)
        engine.dispose()

        ours_runs, base_runs = [], []
        for number in range(args.rounds):  # alternating, so drift hits both alike
            ours_runs.append(chatdb_seed(messages, str(number)))
            base_runs.append(naive(str(number)))
        ours = statistics.median(seconds for seconds, _ in ours_runs)
        base = statistics.median(seconds for seconds, _ in base_runs)
        ours_rss = max(rss for _, rss in ours_runs)
        print(f"size: {users:,} users, {conversations:,} conversations, {messages:,} messages")
        for label, runs in (("chatdb seed", ours_runs), ("naive COPY", base_runs)):
            seconds = statistics.median(t for t, _ in runs)
            print(
                f"{label:12s} {seconds:7.2f} s  {messages / seconds:9,.0f} messages/s"
                f"  peak RSS {max(r for _, r in runs) / 2**20:6.0f} MB"
                f"  (runs: {', '.join(f'{t:.2f}' for t, _ in runs)} s)"
            )
        print(f"speed-up: {base / ours:.2f}x the naive baseline, medians (target >= 3x, aim 4x)")
        if not args.skip_memory and messages > 100_000:
            _, small_rss = chatdb_seed(100_000, "memory")
            print(
                f"peak RSS: {small_rss / 2**20:.0f} MB at 100,000 messages, {ours_rss / 2**20:.0f} MB at "
                f"{messages:,} (target < 250 MB, flat)"
            )
    finally:
        scratch.close()


if __name__ == "__main__":
    main()
