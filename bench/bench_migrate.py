"""Wall time of `chatdb migrate` from an empty database to head, Python start included.

Baseline, measured in the same run on the same server: a plain `alembic upgrade head`
from the checkout (the same migration chain through Alembic's own command line).

    python bench/bench_migrate.py [--runs 7]

Uses BENCH_DATABASE_URL (a role with CREATEDB) when set, else starts an embedded
PostgreSQL in a temporary folder. The aim is under 3 s.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from _harness import COMMAND, Scratch, print_medians, run  # bench/ is on sys.path

from chatdb import migrations

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CHATDB_DATABASE_URL")}
    alembic = Path(sys.executable).with_name("alembic")
    samples: dict[str, list[float]] = {"chatdb migrate": [], "alembic upgrade head": []}
    with Scratch() as scratch:
        for number in range(args.runs):
            for label in samples:
                name = f"chatdb_bench_{os.getpid()}_{number}_{label.split()[0]}"
                target = scratch.database(name)
                if label == "chatdb migrate":
                    elapsed, _, _ = run([*COMMAND, "migrate", "--database-url", target], env, scratch.workdir)
                else:
                    command = [str(alembic), "-c", str(ROOT / "alembic.ini"), "upgrade", "head"]
                    elapsed, _, _ = run(command, {**env, "CHATDB_DATABASE_URL": target}, ROOT)
                samples[label].append(elapsed)
                engine = scratch.engine(name)
                assert migrations.status(engine).up_to_date, f"{label} did not reach head"
                engine.dispose()
                scratch.drop(name)

    ours, baseline = print_medians(samples)
    print(
        f"chatdb migrate, empty to head: {ours:.3f} s (aim: < 3 s); baseline/chatdb = {baseline / ours:.2f}x"
    )


if __name__ == "__main__":
    main()
