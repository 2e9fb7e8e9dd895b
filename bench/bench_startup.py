"""Start-up of chatdb's commands, whole processes, against the floors they stand on.

A small job is mostly Python starting, so each command imports only what it runs. Every
command below runs as a child process, Python's start included, its output read and
thrown away; the rounds take the commands in turn, so that a drift of a shared machine's
speed touches them alike. Printed: the median wall and CPU seconds of each, and the ratio
of each chatdb command to its floor, measured in the same run:

- `chatdb --version` to `python -c pass`, and to `python -c 'import re'`, what the
  console script that pip writes imports before chatdb: it is answered before Typer is
  imported;
- `chatdb --help` to the same page drawn by a bare Typer app (the root's options, ten
  commands): what Typer pays to print it (Typer, Rich and Rich's Markdown);
- `chatdb status --help` to a command's help in that app, with status's options (Typer
  also converts the options it parses, through pydantic);
- `chatdb purge --help` to the same: its defaults come from `chatdb.defaults`, and it
  imports no data layer;
- `chatdb status`, `chatdb purge --dry-run` and a `chatdb purge` with nothing to do on a
  migrated database to `python -c 'import sqlalchemy, psycopg'`, and to what a data
  command cannot do without: those, Typer and Rich imported and one query run through
  SQLAlchemy on a new connection.

    python bench/bench_startup.py [--runs 21]

Uses BENCH_DATABASE_URL (a role with CREATEDB) when set, else starts an embedded
PostgreSQL in a temporary folder. The aims: --version and --help under 0.1 s, or --help
within 1.1x of Typer's own help where Typer alone costs more; a data command within 1.2x
of what it cannot do without, and of the data layer it calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from _harness import COMMAND, Scratch  # run as a script: bench/ is on sys.path

from chatdb import db

PYTHON = sys.executable

#: chatdb's help drawn by a bare Typer app: the root's options, ten commands with a summary
#: as long as chatdb's, and a command with status's options.
TYPER_APP = '''
from typing import Annotated
import typer
app = typer.Typer()
Url = Annotated[str | None, typer.Option("--database-url", help="The URL of the database to use.")]
Timeout = Annotated[float | None, typer.Option("--connect-timeout", min=0, help="Seconds to wait.")]
@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
    url: Url = None,
    timeout: Timeout = None,
) -> None:
    """An app."""
def command(name):
    def run(
        json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
        url: Url = None,
        timeout: Timeout = None,
    ) -> None:
        """What this command does, in one paragraph as long as the summary of one of chatdb's
        commands, which says what it changes and for whom, in about twenty words."""
    app.command(name)(run)
for name in ("migrate", "seed", "archive", "purge", "verify-indexes", "status", "grants",
             "doctor", "bench", "embedded"):
    command(name)
app()
'''

#: What a data command cannot do without: parse (Typer), render (Rich), and a query on a
#: new connection (SQLAlchemy, psycopg).
PLAIN_QUERY = (
    "import sys, typer, rich.console; from sqlalchemy import create_engine, text; "
    "e = create_engine(sys.argv[1]); c = e.connect(); c.execute(text('SELECT 1')).scalar(); c.close()"
)


def run(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of one child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    errors = process.stderr.read().decode() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed: {errors}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()

    # Byte-compiled, as an installed chatdb is: the warm-up runs write what is missing.
    unset = ("DATABASE_URL", "CHATDB_DATABASE_URL", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    with Scratch() as scratch:
        typed = scratch.database(f"chatdb_bench_{os.getpid()}_startup")
        plain = db.parse_url(typed).render_as_string(hide_password=False)
        subprocess.run(
            [*COMMAND, "migrate", "--database-url", typed], env=env, check=True, capture_output=True
        )
        commands = {
            "python -c pass": [PYTHON, "-c", "pass"],
            "python -c 'import re'": [PYTHON, "-c", "import re"],
            "python -c 'import typer'": [PYTHON, "-c", "import typer"],
            "python -c 'import typer, rich.console'": [PYTHON, "-c", "import typer, rich.console"],
            "python -c 'import sqlalchemy, psycopg'": [PYTHON, "-c", "import sqlalchemy, psycopg"],
            "Typer app --help": [PYTHON, "-c", TYPER_APP, "--help"],
            "Typer app status --help": [PYTHON, "-c", TYPER_APP, "status", "--help"],
            "Typer, Rich, SQLAlchemy: SELECT 1": [PYTHON, "-c", PLAIN_QUERY, plain],
            "chatdb --version": [*COMMAND, "--version"],
            "chatdb --help": [*COMMAND, "--help"],
            "chatdb status --help": [*COMMAND, "status", "--help"],
            "chatdb purge --help": [*COMMAND, "purge", "--help"],
            "chatdb status": [*COMMAND, "status", "--database-url", typed],
            "chatdb purge --dry-run": [
                *COMMAND,
                "purge",
                "--older-than",
                "365d",
                "--dry-run",
                "--database-url",
                typed,
            ],
            "chatdb purge, nothing to do": [
                *COMMAND,
                "purge",
                "--older-than",
                "365d",
                "--yes",
                "--database-url",
                typed,
            ],
        }
        samples: dict[str, list[tuple[float, float]]] = {label: [] for label in commands}
        for command in commands.values():  # a warm-up each: files in the page cache
            run(command, env)
        for _ in range(args.runs):
            for label, command in commands.items():
                samples[label].append(run(command, env))

    wall = {label: statistics.median(w for w, _ in values) for label, values in samples.items()}
    cpu = {label: statistics.median(c for _, c in values) for label, values in samples.items()}
    print(f"medians of {args.runs} runs, whole processes")
    print(f"{'':40s} {'wall s':>8s} {'cpu s':>8s}")
    for label in commands:
        print(f"{label:40s} {wall[label]:8.3f} {cpu[label]:8.3f}")
    print()
    print(f"{'ratio (wall, cpu)':60s}")
    for ours, floor in (
        ("chatdb --version", "python -c pass"),
        ("chatdb --version", "python -c 'import re'"),
        ("chatdb --help", "Typer app --help"),
        ("chatdb status --help", "Typer app status --help"),
        ("chatdb purge --help", "Typer app status --help"),
        ("chatdb status", "python -c 'import sqlalchemy, psycopg'"),
        ("chatdb status", "Typer, Rich, SQLAlchemy: SELECT 1"),
        ("chatdb purge --dry-run", "python -c 'import sqlalchemy, psycopg'"),
        ("chatdb purge --dry-run", "Typer, Rich, SQLAlchemy: SELECT 1"),
        ("chatdb purge, nothing to do", "Typer, Rich, SQLAlchemy: SELECT 1"),
    ):
        ratios = f"{wall[ours] / wall[floor]:5.2f}x {cpu[ours] / cpu[floor]:5.2f}x"
        print(f"{ours} / {floor}:".ljust(62) + ratios)


if __name__ == "__main__":
    main()
