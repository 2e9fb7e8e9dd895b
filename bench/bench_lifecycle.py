"""`chatdb purge` and `chatdb archive` on a seeded database, against one plain DELETE.

    python bench/bench_lifecycle.py [--messages 1000000] [--older-than 90d]

Seeds 1,000,000 messages in 50,000 conversations for 10,000 users over 365 days, picks
the retention age (whole days) that leaves about three quarters of the conversations
idle past it (or takes --older-than), then on identical copies (CREATE DATABASE ...
TEMPLATE) measures, end to end with Python start included:

- the baseline: one `DELETE FROM conversations WHERE updated_at < now() - interval
  'N days'` in one transaction (its cascade deletes the messages);
- `chatdb purge --older-than Nd` (the grace period set past every soft delete, so it
  deletes exactly the same rows): messages/s, the ratio to the baseline, and its longest
  transaction. Both run beside the same concurrent reader, the application's
  conversation-history query back to back, whose p95 is reported for each and with
  nothing else running;
- `chatdb archive --older-than Nd`: messages moved/s and the ratio to the baseline, next
  to one plain INSERT ... SELECT archive, to the same split between as many sessions at
  once as chatdb archive runs, and to the least any archive with that many sessions can
  cost (the same messages written to a table with no index, constraint or foreign key,
  and deleted with their conversations);
- peak RSS of the purge and archive processes here and on a database of a tenth the
  size: memory stays flat.

Uses BENCH_DATABASE_URL (a role with CREATEDB) when set, else an embedded PostgreSQL in a
temporary folder.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

from sqlalchemy import create_engine, text

from chatdb import db, embedded, patterns, schema

CHATDB = Path(sys.executable).with_name("chatdb")
COMMAND = [str(CHATDB)] if CHATDB.exists() else [sys.executable, "-m", "chatdb"]


def run(command: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes, from wait4) and stdout of one child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(process.stdout.read()))
    reader.start()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    reader.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{command[:3]} failed ({process.returncode}): {process.stderr.read().decode()}")
    return elapsed, usage.ru_maxrss * 1024, b"".join(chunks).decode()


class Reader(threading.Thread):
    """The application's conversation-history query, back to back, timing each."""

    def __init__(self, target: str) -> None:
        super().__init__(daemon=True)
        self.engine = create_engine(db.parse_url(target), connect_args={"prepare_threshold": None})
        with self.engine.connect() as connection:
            self.ids = list(connection.execute(text("SELECT id FROM conversations")).scalars())
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        rng = random.Random(1)
        with self.engine.connect() as connection:
            while not self.stop.is_set():
                statement = patterns.conversation_history(rng.choice(self.ids))
                started = time.perf_counter()
                connection.execute(statement).all()
                connection.commit()
                self.latencies.append(time.perf_counter() - started)
                time.sleep(0.001)
        self.engine.dispose()

    def p95_ms(self) -> float:
        return statistics.quantiles(self.latencies, n=100)[94] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument(
        "--older-than",
        help="the retention age (default: whole days that leave about three quarters of the "
        "conversations idle past it)",
    )
    parser.add_argument("--skip-memory", action="store_true", help="skip the smaller database for memory")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="chatdb-bench-"))
    os.chmod(workdir, 0o755)
    raw = os.environ.get("BENCH_DATABASE_URL")
    server = None
    if raw:
        url = db.parse_url(raw)
    else:
        server, url = embedded.scratch_server(workdir / "pgdata")
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    created: list[str] = []

    def database(name: str, template: str | None = None) -> str:
        with admin.connect() as connection:
            clause = f' TEMPLATE "{template}"' if template else ""
            connection.execute(text(f'CREATE DATABASE "{name}"{clause}'))
        created.append(name)
        # Each contender starts on a quiet server: no earlier copy left for autovacuum to
        # clean up, and no checkpoint owed.
        with admin.connect() as connection:
            connection.execute(text("CHECKPOINT"))
        return url.set(database=name, drivername="postgresql").render_as_string(hide_password=False)

    def drop(name: str) -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def seeded(label: str, messages: int) -> str:
        name = f"chatdb_bench_{os.getpid()}_{label}"
        target = database(name)
        subprocess.run([*COMMAND, "migrate", "--database-url", target], check=True, capture_output=True)
        sizes = ["--users", str(messages // 100), "--conversations", str(messages // 20)]
        sizes += ["--messages", str(messages), "--days", "365"]
        subprocess.run([*COMMAND, "seed", "--database-url", target, *sizes], check=True, capture_output=True)
        engine = create_engine(url.set(database=name), isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(text("VACUUM ANALYZE"))
        engine.dispose()
        return name

    def lifecycle(command: str, template: str, label: str, reader: bool = False):
        target = database(f"{template}_{label}", template)
        args_ = [
            *COMMAND,
            command,
            "--older-than",
            args.older_than,
            "--yes",
            "--json",
            "--database-url",
            target,
        ]
        if command == "purge":
            args_ += ["--deleted-grace", "36500d"]
        watcher = None
        if reader:
            watcher = Reader(target)
            watcher.start()
        elapsed, rss, stdout = run(args_)
        if watcher is not None:
            watcher.stop.set()
            watcher.join()
        drop(f"{template}_{label}")
        return elapsed, rss, json.loads(stdout), watcher

    def plain_sql(
        template: str,
        label: str,
        sessions: list[list[str]],
        reader: bool = False,
        setup: tuple[str, ...] = (),
    ):
        """Each session's statements in one transaction, the sessions at once, each from a
        fresh Python process like the other contenders, after the ``setup`` statements:
        (wall seconds, seconds inside the database (the slowest session's), messages gone
        from the hot table, the concurrent reader if any)."""
        target = database(f"{template}_{label}", template)
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
        drop(f"{template}_{label}")
        return elapsed, max(float(out) for out, _ in outputs), before - after, watcher

    def columns(table: str) -> str:
        return ", ".join(column.name for column in getattr(schema, table).c)

    def quiet_p95(template: str) -> float:
        target = database(f"{template}_quiet", template)
        watcher = Reader(target)
        watcher.start()
        time.sleep(5)
        watcher.stop.set()
        watcher.join()
        return watcher.p95_ms()

    try:
        print(f"seeding {args.messages:,} messages ...", flush=True)
        big = seeded("big", args.messages)
        if args.older_than is None:
            probe = create_engine(url.set(database=big))
            with probe.connect() as connection:
                age = connection.execute(
                    text(
                        "SELECT extract(day FROM now() - percentile_disc(0.75)"
                        " WITHIN GROUP (ORDER BY updated_at)) FROM conversations"
                    )
                ).scalar_one()
            probe.dispose()
            args.older_than = f"{int(age)}d"
        days = int(args.older_than.rstrip("d"))
        idle = f"updated_at < now() - interval '{days} days'"
        delete_s, delete_db_s, delete_messages, delete_reader = plain_sql(
            big, "delete", [[f"DELETE FROM conversations WHERE {idle}"]], reader=True
        )
        moving = f"SELECT id FROM conversations WHERE {idle} AND deleted_at IS NULL"

        def plain_archive(chosen: str) -> list[str]:
            return [
                f"INSERT INTO conversations_archive ({columns('conversations')})"
                f" SELECT {columns('conversations')} FROM conversations WHERE id IN ({chosen})",
                f"INSERT INTO messages_archive ({columns('messages')}) SELECT {columns('messages')}"
                f" FROM messages WHERE conversation_id IN ({chosen})",
                f"DELETE FROM conversations WHERE id IN ({chosen})",
            ]

        naive_archive_s, naive_archive_db_s, naive_archived, _ = plain_sql(
            big, "insert_select", [plain_archive(moving)]
        )
        purge_s, purge_rss, purge, reader = lifecycle("purge", big, "purge", reader=True)
        archive_s, archive_rss, archived, _ = lifecycle("archive", big, "archive")
        # With as many sessions at once as chatdb archive runs, each taking its share of
        # the conversations: the plain archive, and the least any archive can cost (the
        # messages written to a table with no index, no constraint and no foreign key,
        # and deleted with their conversations as the plain DELETE deletes them).
        jobs = archived["jobs"]

        def share(k: int) -> str:
            return f"{moving} AND get_byte(uuid_send(id), 15) % {jobs} = {k}"

        split_archive_s, split_archive_db_s, _, _ = plain_sql(
            big, "insert_select_split", [plain_archive(share(k)) for k in range(jobs)]
        )
        _, floor_db_s, _, _ = plain_sql(
            big,
            "bare",
            [
                [
                    f"INSERT INTO bare_messages ({columns('messages')}) SELECT {columns('messages')}"
                    f" FROM messages WHERE conversation_id IN ({share(k)})",
                    f"DELETE FROM conversations WHERE id IN ({share(k)})",
                ]
                for k in range(jobs)
            ],
            setup=("CREATE TABLE bare_messages (LIKE messages_archive INCLUDING DEFAULTS)",),
        )
        p95_quiet = quiet_p95(big)

        engine = create_engine(url.set(database=big))
        with engine.connect() as connection:
            idle_share = connection.execute(
                text(f"SELECT avg(CASE WHEN {idle} THEN 1.0 ELSE 0 END) FROM conversations")
            ).scalar_one()
        engine.dispose()

        delete_rate = delete_messages / delete_db_s  # inside the database

        def line(
            label: str, wall: float, inside: float, messages: int, versus: float | None, aim: str
        ) -> None:
            ratio = f"  {messages / wall / versus:.2f}x end to end" if versus else ""
            ratio += f", {messages / inside / delete_rate:.2f}x in the database" if versus else ""
            print(
                f"{label:36s} {wall:6.2f} s ({inside:6.2f} s in the database) {messages:>9,} messages "
                f"{messages / wall:>9,.0f}/s{ratio}{aim}"
            )

        baseline_rate = delete_messages / delete_s
        print(
            f"database: {args.messages:,} messages, {idle_share:.0%} of the conversations idle past {days}d"
        )
        line("plain DELETE (one transaction)", delete_s, delete_db_s, delete_messages, None, "")
        line(
            "chatdb purge",
            purge_s,
            purge["elapsed_seconds"],
            purge["done"]["messages"],
            baseline_rate,
            "  (aim >= 1.0x)",
        )
        line(
            "plain INSERT ... SELECT archive",
            naive_archive_s,
            naive_archive_db_s,
            naive_archived,
            baseline_rate,
            "",
        )
        line(
            f"plain INSERT ... SELECT, {jobs} sessions",
            split_archive_s,
            split_archive_db_s,
            naive_archived,
            baseline_rate,
            "",
        )
        line(
            "chatdb archive",
            archive_s,
            archived["elapsed_seconds"],
            archived["done"]["messages"],
            baseline_rate,
            f"  (aim >= 0.5x); {naive_archive_s / archive_s:.2f}x the plain INSERT ... SELECT,"
            f" {split_archive_s / archive_s:.2f}x in {jobs} sessions",
        )
        print(
            f"archive floor in the database: the {naive_archived:,} messages written to a bare table "
            f"(no index, no constraint, no foreign key) and deleted, {jobs} sessions at once, "
            f"{floor_db_s:.2f} s: at most {naive_archived / floor_db_s / delete_rate:.2f}x "
            f"for any archive that runs {jobs} at a time"
        )
        for label, out in (("purge", purge), ("archive", archived)):
            print(
                f"{label}: {out['batches']:,} transactions ({out['jobs']} at a time), "
                f"longest {out['longest_transaction_seconds'] * 1000:.0f} ms, "
                f"{out['slow_transactions']} over 250 ms"
            )
        print(
            f"conversation history p95 of a concurrent reader: {reader.p95_ms():.2f} ms during the purge "
            f"({len(reader.latencies):,} queries), {delete_reader.p95_ms():.2f} ms during the plain DELETE "
            f"({len(delete_reader.latencies):,}), {p95_quiet:.2f} ms with neither"
        )
        if purge["done"]["messages"] != delete_messages:
            print(
                f"warning: the purge deleted {purge['done']['messages']:,} messages, "
                f"the DELETE {delete_messages:,}"
            )
        if not args.skip_memory:
            small = seeded("small", args.messages // 10)
            _, small_purge_rss, _, _ = lifecycle("purge", small, "purge")
            _, small_archive_rss, _, _ = lifecycle("archive", small, "archive")
            print(
                f"peak RSS: purge {small_purge_rss / 2**20:.0f} MB at {args.messages // 10:,} messages, "
                f"{purge_rss / 2**20:.0f} MB at {args.messages:,}; "
                f"archive {small_archive_rss / 2**20:.0f} MB "
                f"and {archive_rss / 2**20:.0f} MB"
            )
    finally:
        with admin.connect() as connection:
            for name in reversed(created):
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        if server is not None:
            server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
