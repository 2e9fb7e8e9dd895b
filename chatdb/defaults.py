"""Defaults that the data layer applies and the CLI's help states, declared once in a
module that imports nothing but ``math``: every command's ``--help`` shows them without importing the
data layer (SQLAlchemy, psycopg; ``tests/integration/test_startup.py``). The modules that
apply them import them from here under their own names."""

import math

#: Seconds to keep retrying a server that does not answer (``db.connect()``,
#: ``--connect-timeout``).
DEFAULT_CONNECT_TIMEOUT = 10.0

# --- archive, restore and purge (chatdb.lifecycle) ---------------------------------------
#: The most conversations in one batch (``--batch-size``).
DEFAULT_BATCH_SIZE = 1000
#: Batches in flight at once, each on a connection of its own (``--jobs``).
DEFAULT_JOBS = 2
MAX_JOBS = 8
DEFAULT_DELETED_GRACE = "30d"

# --- seed (chatdb.seed) ------------------------------------------------------------------
DEFAULT_SEED = 42
DEFAULT_USERS = 20
DEFAULT_CONVERSATIONS = 100
DEFAULT_MESSAGES = 1_000
DEFAULT_DAYS = 365

# --- migrate (chatdb.revisions) ----------------------------------------------------------
#: The revision before the first: an empty schema.
BASE = "base"

# --- bench (chatdb.bench) ----------------------------------------------------------------
DEFAULT_CLIENTS = 100
DEFAULT_SECONDS = 60
#: The patterns of chatdb/patterns.py and their weights: close to history=40,recent=30,
#: insert=30, with room for the two patterns that seed 003's budgets need (one message; the
#: query without the soft-delete filter).
DEFAULT_MIX: dict[str, int] = {
    "history": 35,
    "recent": 25,
    "insert": 25,
    "message": 10,
    "history-unfiltered": 5,
}

# --- doctor's vacuum check, and archive's and purge's summaries --------------------------
#: A table needs VACUUM from this share of dead rows among all its rows ...
DEAD_RATIO = 0.2
#: ... and at least this many dead rows.
DEAD_ROWS = 1000


def needs_vacuum(dead: int, live: int, dead_ratio: float = DEAD_RATIO, dead_rows: int = DEAD_ROWS) -> bool:
    """The rule of doctor's vacuum check (and of archive's and purge's summaries): at least
    ``dead_rows`` dead rows, and at least ``dead_ratio`` of all rows, live and dead."""
    return dead >= dead_limit(live + dead, dead_ratio, dead_rows)


def dead_limit(rows: int, dead_ratio: float = DEAD_RATIO, dead_rows: int = DEAD_ROWS) -> int:
    """The dead rows from which a table of ``rows`` rows (live and dead) needs VACUUM."""
    return max(dead_rows, math.ceil(dead_ratio * max(rows, 0)))
