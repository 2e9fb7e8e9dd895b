"""What ``chatdb bench`` runs: the application's query patterns as pgbench scripts and the
keys they ask for (the mix and the budgets of the specification are
``chatdb.bench.budgets``, whose names this module also offers).

Every script is compiled from the statements of ``chatdb.patterns`` (the ones
``verify-indexes`` EXPLAINs): nothing here spells a pattern's SQL. The only difference from
the application's own call is where its key comes from (see ``Keys``).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Integer, String, cast, func, literal, literal_column, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.sql import ClauseElement

from chatdb import patterns
from chatdb.bench.budgets import DEFAULT_BUDGETS as DEFAULT_BUDGETS
from chatdb.bench.budgets import OVERHEAD as OVERHEAD
from chatdb.bench.budgets import Budget as Budget
from chatdb.bench.budgets import budgets_for as budgets_for
from chatdb.bench.budgets import format_limit as format_limit
from chatdb.bench.budgets import format_ms as format_ms
from chatdb.bench.budgets import mix_text as mix_text
from chatdb.bench.budgets import parse_budget as parse_budget
from chatdb.bench.budgets import parse_latency as parse_latency
from chatdb.bench.budgets import parse_mix as parse_mix
from chatdb.defaults import DEFAULT_MIX as DEFAULT_MIX
from chatdb.schema import messages

#: pgbench reads ``:name`` as a variable; with this paramstyle SQLAlchemy doubles no ``%``.
_DIALECT = postgresql.dialect(paramstyle="named")

#: The users bench creates for its writes: ``bench-<token>-<client>``, the token being eight
#: hex digits of the run. Their conversations' ids are ``<token>-0000-4000-8000-<client>``.
USER_PREFIX = "bench-"
USER_ID_PATTERN = r"^bench-[0-9a-f]{8}-[0-9]+$"
_TOKEN = re.compile(r"[0-9a-f]{8}")

#: What the insert pattern writes: a user's message, as the application does.
MESSAGE_CONTENT = "chatdb bench: a user's message, written as the application writes one."

#: pgbench variables: the random key of a read, and the client's number (pgbench's own).
KEY_VARIABLE = "key"
CLIENT_VARIABLE = "client_id"
_KEY_SET = rf"\set {KEY_VARIABLE} random(0, 4294967295)"


@dataclass(frozen=True)
class Keys:
    """The keys a pattern asks for, as SQL expressions holding pgbench variables.

    Reads ask for rows of the database itself: a random message, found by the primary key
    from a random point of the uuid space, gives the conversation, user or message asked
    for. Every message is as likely to be picked, so a conversation is asked for in
    proportion to its messages and a user in proportion to theirs: heavy users more often,
    as in real traffic. The lookup is a scalar subquery inside the pattern's statement: one
    probe of ``messages_pkey``, no round trip of its own (its cost is measured at the start
    of every run and reported).

    Writes go to bench's own rows only: pgbench client N writes to the one conversation of
    user ``bench-<token>-N``, so a conversation is written by one client at a time.
    """

    token: str
    #: On Citus: messages drawn before the run (``sample_keys``), each a dict of
    #: ``KEY_COLUMNS``. A key looked up inside a statement would send it to every shard (a
    #: subquery over all of them, then no shard to prune to), so each read script holds
    #: one branch per message of the sample with its keys as literals, and pgbench picks
    #: one at random on the client: what reaches the server is the application's own
    #: router query. Empty: the keys are looked up in each statement, as above.
    sample: tuple[dict[str, Any], ...] = ()
    #: The message of the sample a statement is compiled for.
    chosen: dict[str, Any] | None = None

    # Each key stands where a pattern takes a value (a uuid, a user id): typed Any, as the
    # patterns are typed for the values the application passes them.

    def read(self, column: str) -> Any:
        if self.chosen is not None:
            return literal(self.chosen[column], messages.c[column].type)
        key = messages.alias("bench_key")
        start = cast(
            func.lpad(func.to_hex(literal_column(f":{KEY_VARIABLE}", Integer)), 8, "0")
            + "000000000000000000000000",
            UUID,
        )
        return (
            select(key.c[column])
            .where(key.c.id >= start)
            .order_by(key.c.id)
            .limit(1)
            .correlate(None)
            .scalar_subquery()
        )

    @property
    def owner(self) -> Any:
        """The user of the message read, for the patterns that take it only to be routed
        (on Citus); None when the keys are looked up in each statement."""
        return self.read("user_id") if self.chosen is not None else None

    @property
    def own_user(self) -> Any:
        client = literal_column(f":{CLIENT_VARIABLE}", Integer)
        return literal(f"{USER_PREFIX}{self.token}-", String).concat(client)

    @property
    def own_conversation(self) -> Any:
        client = literal_column(f":{CLIENT_VARIABLE}", Integer)
        return cast(
            literal(f"{self.token}-0000-4000-8000-", String).concat(func.lpad(func.to_hex(client), 12, "0")),
            UUID,
        )


def user_id(token: str, client: int) -> str:
    return f"{USER_PREFIX}{token}-{client}"


def conversation_id(token: str, client: int) -> str:
    return f"{token}-0000-4000-8000-{client:012x}"


def valid_token(token: str) -> bool:
    return bool(_TOKEN.fullmatch(token))


@dataclass(frozen=True)
class Workload:
    """One pattern as bench drives it."""

    name: str  # as in --mix and --budget
    title: str
    source: str  # the function of chatdb.patterns
    writes: bool
    statements: Callable[[Keys], Sequence[ClauseElement]]

    def script(self, keys: Keys) -> str:
        """The pgbench script: the pattern's statements compiled for PostgreSQL, keys as
        above, every other value a literal (``-M simple`` sends them as text). A writing
        pattern runs in one transaction, as ``patterns.add_message`` does."""
        lines = [f"-- chatdb bench: {self.title} (chatdb.patterns.{self.source})"]
        if not self.writes and keys.sample:
            lines.append(rf"\set {KEY_VARIABLE} random(0, {len(keys.sample) - 1})")
            for n, chosen in enumerate(keys.sample):
                lines.append(rf"\{'if' if n == 0 else 'elif'} :{KEY_VARIABLE} = {n}")
                statements = self.statements(dataclasses.replace(keys, chosen=chosen))
                lines += [compile_sql(statement) for statement in statements]
            return "\n".join([*lines, r"\endif"]) + "\n"
        if not self.writes:
            lines.append(_KEY_SET)
        sql = [compile_sql(statement) for statement in self.statements(keys)]
        if self.writes:
            sql = ["BEGIN;", *sql, "COMMIT;"]
        return "\n".join([*lines, *sql]) + "\n"


def compile_sql(statement: ClauseElement) -> str:
    """A statement as pgbench runs it: values inline, pgbench variables as ``:name``."""
    return str(statement.compile(dialect=_DIALECT, compile_kwargs={"literal_binds": True})) + ";"


#: Rows read by the history patterns: seed 003's "50 messages in a conversation".
HISTORY_LIMIT = 50
#: Rows of the recent-conversations pattern: seed 003's "20 conversations for a user".
RECENT_LIMIT = 20

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "history",
            f"a conversation's {HISTORY_LIMIT} newest messages",
            "conversation_history",
            False,
            lambda k: [
                patterns.conversation_history(k.read("conversation_id"), HISTORY_LIMIT, user_id=k.owner)
            ],
        ),
        Workload(
            "recent",
            f"a user's {RECENT_LIMIT} most recent active conversations",
            "recent_conversations",
            False,
            lambda k: [patterns.recent_conversations(k.read("user_id"), RECENT_LIMIT)],
        ),
        Workload(
            "insert",
            "add a message and bump its conversation's updated_at, one transaction",
            "add_message_statements",
            True,
            lambda k: patterns.add_message_statements(
                k.own_conversation, k.own_user, "user", MESSAGE_CONTENT
            ),
        ),
        Workload(
            "message",
            "one message by id",
            "message_by_id",
            False,
            lambda k: [patterns.message_by_id(k.read("id"), k.owner)],
        ),
        Workload(
            "history-unfiltered",
            "the history query without the soft-delete filter",
            "conversation_history",
            False,
            lambda k: [
                patterns.conversation_history(
                    k.read("conversation_id"), HISTORY_LIMIT, include_deleted=True, user_id=k.owner
                )
            ],
        ),
    )
}


#: The columns of a message that the read patterns take as keys.
KEY_COLUMNS = ("id", "conversation_id", "user_id")
#: How many messages a run on Citus draws its keys from.
SAMPLE_SIZE = 1000


def sample_keys(connection: Connection, estimate: int, size: int = SAMPLE_SIZE) -> tuple[dict[str, Any], ...]:
    """Up to ``size`` messages drawn at random, each as likely as any (so a conversation
    or a user is drawn in proportion to its messages, as the lookup above does). One
    read of every shard (``TABLESAMPLE BERNOULLI``, sized from the row estimate), with
    no LIMIT: on Citus one would favour the shards that answer first."""
    share = 100.0 if estimate <= 0 else min(100.0, 100.0 * 3 * size / estimate)
    sampled = messages.tablesample(func.bernoulli(share))
    rows = connection.execute(select(*(sampled.c[column] for column in KEY_COLUMNS))).all()
    if len(rows) < size and share < 100:
        rows = connection.execute(select(*(messages.c[column] for column in KEY_COLUMNS))).all()
    chosen = random.sample(rows, min(size, len(rows)))
    return tuple(dict(row._mapping) for row in chosen)


#: The carrier of the keys on its own, and the same query without the lookup: the
#: difference of their medians is what carrying a key costs a transaction.
def key_cost_scripts(keys: Keys) -> tuple[str, str]:
    start = keys.read("conversation_id")
    looked_up = f"{_KEY_SET}\n{compile_sql(select(start))}\n"
    computed = cast(func.lpad(func.to_hex(literal_column(f":{KEY_VARIABLE}", Integer)), 8, "0"), String)
    bare = f"{_KEY_SET}\n{compile_sql(select(computed))}\n"
    return looked_up, bare
