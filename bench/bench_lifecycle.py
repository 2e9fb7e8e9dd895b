"""`chatdb purge` and `chatdb archive` on a seeded database, against one plain DELETE.

    python bench/bench_lifecycle.py [--messages 1000000] [--older-than 90d]

Seeds 1,000,000 messages in 50,000 conversations for 10,000 users over 365 days, picks
the retention age (whole days) that leaves about three quarters of the conversations
idle past it (or takes --older-than), then on identical copies (CREATE DATABASE ...
TEMPLATE) measures, end to end with Python start included:

- the baseline: one `DELETE FROM conversations WHERE updated_at < <cutoff>` in one
  transaction (its cascade deletes the messages), at the cutoff the purge took from the
  database clock (now() - N days), so that both delete the same set;
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

from _harness import Scratch, columns, idle, moving, plain_archive  # run as a script: bench/ is on sys.path
from sqlalchemy import text


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

    scratch = Scratch()
    try:
        print(scratch.settings(), flush=True)
        print(f"seeding {args.messages:,} messages ...", flush=True)
        big, _ = scratch.seeded("big", args.messages)
        if args.older_than is None:
            args.older_than = f"{scratch.idle_days(big)}d"
        days = int(args.older_than.rstrip("d"))
        purge_s, purge_rss, purge, reader = scratch.lifecycle(
            "purge", big, "purge", args.older_than, reader=True
        )
        # The plain DELETE at the purge's own cutoff (read from its database clock): a
        # conversation that passes the age between the two runs must not make them differ.
        delete_s, delete_db_s, delete_messages, delete_reader = scratch.plain_sql(
            big,
            "delete",
            [[f"DELETE FROM conversations WHERE updated_at < '{purge['cutoff']}'::timestamptz"]],
            reader=True,
        )
        naive_archive_s, naive_archive_db_s, naive_archived, _ = scratch.plain_sql(
            big, "insert_select", [plain_archive(moving(days))]
        )
        archive_s, archive_rss, archived, _ = scratch.lifecycle("archive", big, "archive", args.older_than)
        # With as many sessions at once as chatdb archive runs, each taking its share of
        # the conversations: the plain archive, and the least any archive can cost (the
        # messages written to a table with no index, no constraint and no foreign key,
        # and deleted with their conversations as the plain DELETE deletes them).
        jobs = archived["jobs"]

        def share(k: int) -> str:
            return f"{moving(days)} AND get_byte(uuid_send(id), 15) % {jobs} = {k}"

        split_archive_s, split_archive_db_s, _, _ = scratch.plain_sql(
            big, "insert_select_split", [plain_archive(share(k)) for k in range(jobs)]
        )
        _, floor_db_s, _, _ = scratch.plain_sql(
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
        p95_quiet = scratch.quiet_p95(big)

        engine = scratch.engine(big)
        with engine.connect() as connection:
            idle_share = connection.execute(
                text(f"SELECT avg(CASE WHEN {idle(days)} THEN 1.0 ELSE 0 END) FROM conversations")
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
                f"{out['slow_transactions']} over 250 ms; on the server, {out['stalls']}"
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
            small, _ = scratch.seeded("small", args.messages // 10)
            _, small_purge_rss, _, _ = scratch.lifecycle("purge", small, "purge", args.older_than)
            _, small_archive_rss, _, _ = scratch.lifecycle("archive", small, "archive", args.older_than)
            print(
                f"peak RSS: purge {small_purge_rss / 2**20:.0f} MB at {args.messages // 10:,} messages, "
                f"{purge_rss / 2**20:.0f} MB at {args.messages:,}; "
                f"archive {small_archive_rss / 2**20:.0f} MB "
                f"and {archive_rss / 2**20:.0f} MB"
            )
    finally:
        scratch.close()


if __name__ == "__main__":
    main()
