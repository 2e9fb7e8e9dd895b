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

from _harness import COMMAND, Scratch, alternate, print_medians, start_baselines  # bench/ is on sys.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages in the large database")
    parser.add_argument("--small", type=int, default=10_000, help="messages in the small database")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    with Scratch() as scratch:
        targets: dict[int, str] = {}
        for size in (args.messages, args.small):
            name, (seconds, _, _) = scratch.seeded(f"verify_{size}", size)
            print(f"seeding {size:,} messages: {seconds:.1f} s", flush=True)
            targets[size] = scratch.target(name)
        commands = {
            f"verify-indexes, {size:,} messages": [*COMMAND, "verify-indexes", "--database-url", target]
            for size, target in targets.items()
        }
        samples = alternate({**commands, **start_baselines(targets[args.messages])}, args.runs)

    large, small, start, migrate_status = print_medians(
        {label: [seconds for seconds, _ in runs] for label, runs in samples.items()}
    )
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
