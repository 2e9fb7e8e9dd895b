"""The seed's COPY data, byte for byte, without a database.

The same seed and sizes give the same rows on every machine and after every change to how
they are made: each table's stream is pinned by its SHA-256, for a fixed anchor. The
messages are laid out as when the digests were taken, each value the seed makes
(``rows.MESSAGE_VALUES``) in the column named like it, so a column added to
``SEEDED_MESSAGE_COLUMNS`` later leaves these digests as they are, unless the seed makes a
new value for it. Changing what the seed generates on purpose means computing them again,
and saying so.
"""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest

from chatdb import seed as seed_module
from chatdb.schema import SEEDED_MESSAGE_COLUMNS
from chatdb.seed import rows

ANCHOR = dt.datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=dt.UTC)
# How the users table's columns are filled: chatdb's own table, and an application's.
CHATDB_USERS = [("id", "id"), ("email", "email"), ("name", "name"), ("created_at", "time")]
APP_USERS = [
    ("id", "id"),
    ("name", "name"),
    ("email", "email"),
    ("email_verified", "false"),
    ("created_at", "time"),
    ("updated_at", "time"),
]

# The messages' layout when the digests were taken: each value the seed makes in the column
# named like it, as SEEDED_MESSAGE_COLUMNS declares that column.
DECLARED = {column.name: column for column in SEEDED_MESSAGE_COLUMNS}
MESSAGES = rows.MessageLayout([DECLARED[name] for name in rows.MESSAGE_VALUES])

CASES = {
    "seed 7, 25/120/1500 over a year": (
        seed_module.SeedRequest(25, 120, 1_500, 365, 7),
        CHATDB_USERS,
        (
            "38f3a352660ff4e5b20955bb88aba943729e6f35169dce73ebf78a9c89839e2e",
            "6d50b851cc307c1cea59eb50df799b3fcf6b68e5357ac804fb0ad954e57603aa",
            "549fafdc9f11b8a4aac53d33ce8999e866eaac077a28d1fa35a23e7ad86ee750",
        ),
    ),
    "seed 0, one message per conversation, one day": (
        seed_module.SeedRequest(3, 10, 10, 1, 0),
        CHATDB_USERS,
        (
            "80b36e20796d43a36b4e195925404bec330051cbdb7077e213ea6ea16a7627ae",
            "4110bc9d8bcbadfcdb9a302167456ec1807ba1787fbf4f3759a7c1700eafce81",
            "323df5289edf81a0d473151637c898f5f6fb963aadceb4718a933c15ce0f6e8b",
        ),
    ),
    "seed 42, 40/500/6000 over 90 days, an application's users": (
        seed_module.SeedRequest(40, 500, 6_000, 90, 42),
        APP_USERS,
        (
            "835b0a235d62f7512708a208bbb046478af75cc25f1ad5ada1ae197ee5b5d72a",
            "3bd9cd5d534cc88159f9ccef3c33f5ed5b2156d4a133b77a214b29a4df94678d",
            "67a0aee4d00de40a968a9b16cf7dd76933e778d9f2d106ef82985d6e5c3a3645",
        ),
    ),
}


def table_digests(request, user_columns) -> list[str]:
    """The SHA-256 of each table's COPY stream, in load order (users, conversations,
    messages); an empty chunk ends a table."""
    digests, current = [], hashlib.sha256()
    for chunk, _ in rows.all_chunks(request, ANCHOR, user_columns, MESSAGES):
        if not chunk:
            digests.append(current.hexdigest())
            current = hashlib.sha256()
        current.update(chunk)
    return digests


@pytest.mark.parametrize("case", CASES)
def test_the_generated_bytes_are_pinned(case):
    request, user_columns, expected = CASES[case]
    assert table_digests(request, user_columns) == list(expected)
