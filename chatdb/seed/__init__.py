"""``chatdb seed``: realistic, deterministic fake chat data, loaded with COPY.

Determinism: every row (ids included) comes from ``random.Random`` streams derived from
``seed`` and from Faker (pinned) seeded with it; timestamps are offsets from an anchor,
the database clock at the start of the run. Two runs with the same seed and sizes differ
only by that anchor.

Speed: rows are written as COPY data built from pre-encoded pools of content, by a forked
child process, so that generating rows in Python and parsing them in PostgreSQL each
have a core. Into empty tables the load takes them over (the fast path): in one
transaction it drops their indexes and constraints, copies, and rebuilds every index and
constraint from ``chatdb.schema``. Tables that already hold rows are loaded with their
constraints in place, taking no lock stronger than an INSERT's. Either way the whole seed
is one transaction: interrupted, it leaves nothing.

The modules, in the order the data flows:

- ``request``: what to seed (``SeedRequest``) and what came of it;
- ``content``: what the chats say: turns, system prompts, metadata and name pools;
- ``distributions``: the plan: owners, lengths, times and lifecycle shares;
- ``copy_encoder``: COPY's binary and text formats;
- ``rows``: every table's COPY stream; the messages' columns come from
  ``chatdb.schema.SEEDED_MESSAGE_COLUMNS``;
- ``child``: the generator process, and the framed pipe to it;
- ``load``: the transaction (COPY, the fast path), ``reset`` and the counts.
"""

from chatdb.seed.distributions import (
    ARCHIVED_SHARE,
    MESSAGE_SOFT_DELETED_SHARE,
    SOFT_DELETED_SHARE,
    SYSTEM_FIRST_SHARE,
)
from chatdb.seed.load import reset, seed, seeded_counts, seeded_user_count
from chatdb.seed.request import (
    DEFAULT_CONVERSATIONS,
    DEFAULT_DAYS,
    DEFAULT_MESSAGES,
    DEFAULT_SEED,
    DEFAULT_USERS,
    MAX_COUNT,
    MAX_DAYS,
    USER_PREFIX,
    Progress,
    ResetResult,
    SeedRequest,
    SeedResult,
)

__all__ = [
    "ARCHIVED_SHARE",
    "DEFAULT_CONVERSATIONS",
    "DEFAULT_DAYS",
    "DEFAULT_MESSAGES",
    "DEFAULT_SEED",
    "DEFAULT_USERS",
    "MAX_COUNT",
    "MAX_DAYS",
    "MESSAGE_SOFT_DELETED_SHARE",
    "SOFT_DELETED_SHARE",
    "SYSTEM_FIRST_SHARE",
    "USER_PREFIX",
    "Progress",
    "ResetResult",
    "SeedRequest",
    "SeedResult",
    "reset",
    "seed",
    "seeded_counts",
    "seeded_user_count",
]
