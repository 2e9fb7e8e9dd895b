"""What ``chatdb bench`` runs: the application's query patterns as pgbench scripts, the keys
they ask for, the mix, and the budgets of the specification.

Every script is compiled from the statements of ``chatdb.patterns`` (the ones
``verify-indexes`` EXPLAINs): nothing here spells a pattern's SQL. The only difference from
the application's own call is where its key comes from (see ``Keys``).
"""

from __future__ import annotations

import dataclasses
import math
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
from chatdb.errors import UsageError
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


# --- the mix -------------------------------------------------------------------------------

#: Close to the issue's history=40,recent=30,insert=30, with room for the two patterns that
#: seed 003's budgets need (one message; the query without the soft-delete filter).
DEFAULT_MIX: dict[str, int] = {
    "history": 35,
    "recent": 25,
    "insert": 25,
    "message": 10,
    "history-unfiltered": 5,
}
_WEIGHT = re.compile(r"[0-9]+")


def mix_text(mix: dict[str, int]) -> str:
    return ",".join(f"{name}={weight}" for name, weight in mix.items())


def parse_mix(raw: str) -> dict[str, int]:
    """``history=40,recent=30,insert=30``: pattern names with whole-number weights."""
    mix: dict[str, int] = {}
    expected = "expected PATTERN=WEIGHT pairs separated by commas, such as history=40,recent=30,insert=30"
    for part in raw.split(","):
        name, sep, weight = (piece.strip() for piece in part.partition("="))
        if not sep or not name or not _WEIGHT.fullmatch(weight):
            raise UsageError(f"invalid --mix {raw!r}: {expected}")
        _known(name, "--mix")
        if name in mix:
            raise UsageError(f"invalid --mix {raw!r}: {name} appears twice")
        if int(weight) > 1000:
            raise UsageError(f"invalid --mix {raw!r}: weights go up to 1000")
        mix[name] = int(weight)
    mix = {name: weight for name, weight in mix.items() if weight}
    if not mix:
        raise UsageError(f"invalid --mix {raw!r}: every weight is zero")
    return mix


def _known(name: str, option: str) -> Workload:
    if name not in WORKLOADS:
        raise UsageError(f"unknown pattern {name!r} in {option}: the patterns are {', '.join(WORKLOADS)}")
    return WORKLOADS[name]


# --- budgets -------------------------------------------------------------------------------

OVERHEAD = "overhead"
_PERCENTILE = re.compile(r"p([0-9]{1,2}(?:\.[0-9]{1,3})?)")


@dataclass(frozen=True)
class Budget:
    """A limit on one figure of one pattern. ``metric`` is a percentile (``p95``),
    ``max``, or ``overhead``: the soft-delete filter's cost, the median of ``history`` less
    the median of ``history-unfiltered`` (seed 003's "soft delete filtering overhead")."""

    pattern: str
    metric: str
    limit_ms: float
    source: str = "--budget"

    @property
    def key(self) -> str:
        return f"{self.pattern}.{self.metric}"

    @property
    def percentile(self) -> float | None:
        if self.metric == "max":
            return 100.0
        match = _PERCENTILE.fullmatch(self.metric)
        return float(match[1]) if match else None

    def describe(self) -> str:
        if self.metric == OVERHEAD:
            return f"soft-delete filter < {format_limit(self.limit_ms)}"
        return f"{self.metric} < {format_limit(self.limit_ms)}"


DEFAULT_BUDGETS: tuple[Budget, ...] = (
    Budget(
        "history", "p95", 50.0, "seed 003: 50 messages of a conversation < 50 ms (seed 000: p95 < 100 ms)"
    ),
    Budget("recent", "p95", 100.0, "seed 003: 20 conversations of a user < 100 ms"),
    Budget("insert", "p95", 50.0, "seed 000: message insert p95 < 50 ms"),
    Budget("message", "p95", 10.0, "seed 003: a single message < 10 ms"),
    Budget("history", OVERHEAD, 5.0, "seed 003: soft-delete filtering overhead < 5 ms"),
)

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(us|ms|s)")
_TO_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_latency(raw: str, option: str) -> float:
    """``50ms``, ``0.5s``, ``250us``: a latency in milliseconds, above zero."""
    match = _DURATION.fullmatch(raw.strip().lower())
    if not match:
        raise UsageError(f"invalid {option} {raw!r}: expected a number and a unit (us, ms, s), such as 50ms")
    value = float(match[1]) * _TO_MS[match[2]]
    if value <= 0:
        raise UsageError(f"invalid {option} {raw!r}: it must be above zero")
    return value


def parse_budget(raw: str) -> Budget:
    """``insert.p95=50ms``, ``message.max=20ms``, ``history.overhead=5ms``."""
    key, sep, value = (piece.strip() for piece in raw.partition("="))
    pattern, dot, metric = key.partition(".")
    expected = (
        "expected PATTERN.METRIC=DURATION, such as insert.p95=50ms (metrics: p50, p95, p99.9, max, overhead)"
    )
    if not sep or not dot or not pattern or not metric:
        raise UsageError(f"invalid --budget {raw!r}: {expected}")
    _known(pattern, "--budget")
    metric = metric.lower()
    percentile = _PERCENTILE.fullmatch(metric)
    if metric == OVERHEAD:
        if pattern != "history":
            raise UsageError(
                f"invalid --budget {raw!r}: only history has an overhead (its soft-delete filter)"
            )
    elif metric != "max" and (percentile is None or not 0 < float(percentile[1]) < 100):
        raise UsageError(f"invalid --budget {raw!r}: unknown metric {metric!r}; {expected}")
    return Budget(pattern, metric, parse_latency(value, f"--budget {key}"))


def budgets_for(mix: dict[str, int], overrides: Sequence[Budget]) -> list[Budget]:
    """The default budgets of the patterns in the mix, each replaced by an override of the
    same pattern and metric; overrides of other metrics are added."""
    for budget in overrides:
        if budget.pattern not in mix:
            raise UsageError(f"--budget {budget.key}: the mix does not run {budget.pattern}")
        if budget.metric == OVERHEAD and "history-unfiltered" not in mix:
            raise UsageError(f"--budget {budget.key}: the mix must run history-unfiltered to measure it")
    chosen: dict[str, Budget] = {}
    for budget in DEFAULT_BUDGETS:
        if budget.pattern in mix and (budget.metric != OVERHEAD or "history-unfiltered" in mix):
            chosen[budget.key] = budget
    for budget in overrides:
        chosen[budget.key] = budget
    return list(chosen.values())


def format_ms(value: float | None) -> str:
    """A latency for people: 0.42 ms, 12.3 ms, 250 ms, 1.5 s."""
    if value is None:
        return "-"
    if math.isinf(value):
        return "never"
    if value >= 1000:
        return f"{value / 1000:.3g} s"
    if value >= 100:
        return f"{value:.0f} ms"
    if value >= 10:
        return f"{value:.1f} ms"
    return f"{value:.2f} ms"


def format_limit(value: float) -> str:
    """A budget as it was given: 50 ms, 0.5 ms, 2 s."""
    return f"{value / 1000:g} s" if value >= 1000 else f"{value:g} ms"
