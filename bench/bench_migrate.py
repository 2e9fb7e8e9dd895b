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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from chatdb import db, embedded, migrations

ROOT = Path(__file__).resolve().parent.parent


def server_url(workdir: Path) -> tuple[URL, object | None]:
    raw = os.environ.get("BENCH_DATABASE_URL")
    if raw:
        return db.parse_url(raw), None
    server, url = embedded.scratch_server(workdir / "pgdata")
    return url, server


def chatdb_command() -> list[str]:
    script = Path(sys.executable).with_name("chatdb")
    return [str(script)] if script.exists() else [sys.executable, "-m", "chatdb"]


def timed(command: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="chatdb-bench-"))
    os.chmod(workdir, 0o755)
    url, server = server_url(workdir)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CHATDB_DATABASE_URL")}
    alembic = Path(sys.executable).with_name("alembic")
    samples: dict[str, list[float]] = {"chatdb migrate": [], "alembic upgrade head": []}
    try:
        for run in range(args.runs):
            for label in samples:
                name = f"chatdb_bench_{os.getpid()}_{run}_{label.split()[0]}"
                with admin.connect() as connection:
                    connection.execute(text(f'CREATE DATABASE "{name}"'))
                target = url.set(database=name)
                typed = target.set(drivername="postgresql").render_as_string(hide_password=False)
                if label == "chatdb migrate":
                    command = [*chatdb_command(), "migrate", "--database-url", typed]
                    samples[label].append(timed(command, env, workdir))
                else:
                    command = [str(alembic), "-c", str(ROOT / "alembic.ini"), "upgrade", "head"]
                    samples[label].append(timed(command, {**env, "CHATDB_DATABASE_URL": typed}, ROOT))
                engine = create_engine(target)
                assert migrations.status(engine).up_to_date, f"{label} did not reach head"
                engine.dispose()
                with admin.connect() as connection:
                    connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
        if server is not None:
            server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)

    ours = statistics.median(samples["chatdb migrate"])
    baseline = statistics.median(samples["alembic upgrade head"])
    for label, values in samples.items():
        print(
            f"{label:22s} median {statistics.median(values):.3f} s"
            f"  min {min(values):.3f} s  ({len(values)} runs)"
        )
    print(
        f"chatdb migrate, empty to head: {ours:.3f} s (aim: < 3 s); baseline/chatdb = {baseline / ours:.2f}x"
    )


if __name__ == "__main__":
    main()
