"""``chatdb seed``: realistic, deterministic fake chat data, loaded with COPY.

Determinism: every row (ids included) comes from ``random.Random`` streams derived from
``seed`` and from Faker (pinned) seeded with it; timestamps are offsets from an anchor,
the database clock at the start of the run. Two runs with the same seed and sizes differ
only by that anchor.

Speed: rows are written as COPY text built from pre-escaped pools of content, by a forked
child process, so that generating rows in Python and parsing them in PostgreSQL each
have a core. Into empty tables the load takes them over (the fast path): in one
transaction it drops their indexes and constraints, copies, and rebuilds every index and
constraint from ``chatdb.schema``. Tables that already hold rows are loaded with their
constraints in place, taking no lock stronger than an INSERT's. Either way the whole seed
is one transaction: interrupted, it leaves nothing.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import fcntl
import itertools
import json
import math
import os
import random
import signal
import struct
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.schema import CreateIndex
from sqlalchemy.sql.schema import ForeignKeyConstraint

from chatdb import migrations, privileges
from chatdb.errors import StateError, UsageError
from chatdb.schema import USER_MESSAGE_MAX_CHARS, conversations, messages

USER_PREFIX = "seed-"
DEFAULT_SEED = 42
DEFAULT_USERS = 20
DEFAULT_CONVERSATIONS = 100
DEFAULT_MESSAGES = 1_000
DEFAULT_DAYS = 365
MAX_DAYS = 36_500
#: Far past anything a machine seeds, and inside what the generator's counters hold.
MAX_COUNT = 10**12

ARCHIVED_SHARE = 0.08  # conversations the user hid in the UI (status = 'archived')
SOFT_DELETED_SHARE = 0.04  # conversations the user deleted (deleted_at set)
MESSAGE_SOFT_DELETED_SHARE = 0.01
SYSTEM_FIRST_SHARE = 0.10
_TURN_POOL = 4_000
_CHUNK_MESSAGES = 2_500

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class SeedRequest:
    users: int = DEFAULT_USERS
    conversations: int = DEFAULT_CONVERSATIONS
    messages: int = DEFAULT_MESSAGES
    days: int = DEFAULT_DAYS
    seed: int = DEFAULT_SEED

    def validate(self) -> None:
        for name in ("users", "conversations", "messages", "days"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be a positive whole number, not {getattr(self, name)}")
            if getattr(self, name) > MAX_COUNT:
                raise UsageError(f"--{name} must be at most {MAX_COUNT:,}, not {getattr(self, name):,}")
        if not 0 <= self.seed <= MAX_COUNT:
            raise UsageError(f"--seed must be between 0 and {MAX_COUNT:,}, not {self.seed:,}")
        if self.messages < self.conversations:
            raise UsageError(
                f"--messages ({self.messages}) must be at least --conversations "
                f"({self.conversations}): every conversation has at least one message"
            )
        if self.days > MAX_DAYS:
            raise UsageError(f"--days must be at most {MAX_DAYS}, not {self.days}")

    @property
    def user_prefix(self) -> str:
        return f"{USER_PREFIX}{self.seed}-"

    @property
    def rows(self) -> int:
        return self.users + self.conversations + self.messages


@dataclass(frozen=True)
class SeedResult:
    seed: int
    users: int
    conversations: int
    messages: int
    anchor: dt.datetime
    fast_path: bool
    elapsed: float

    @property
    def rows_per_second(self) -> float:
        return (self.users + self.conversations + self.messages) / self.elapsed if self.elapsed else 0.0


@dataclass(frozen=True)
class ResetResult:
    users: int
    conversations: int
    messages: int


# --- content ---------------------------------------------------------------------------------

_NOUNS = (
    "groceries", "dentist appointment", "car insurance", "electricity bill", "library books",
    "birthday present", "passport", "plants", "gym membership", "quarterly report", "slides",
    "invoice", "flight", "hotel", "vet appointment", "kitchen sink", "bike", "tax return",
    "team lunch", "photos", "recycling", "laundry", "oil change", "lease", "newsletter",
    "budget", "garden", "printer", "meeting notes", "wedding RSVP", "parcel", "prescription",
)  # fmt: skip
_MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini")
_VERBS = (
    "buy", "call", "email", "book", "pay", "fix", "clean", "schedule", "renew", "return",
    "pick up", "water", "review", "send", "prepare", "order", "cancel", "organise",
)  # fmt: skip
_WHEN = ("today", "tomorrow", "tonight", "this weekend", "on Monday", "next week", "before Friday")
_USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/126.0 Mobile Safari/537.36",
)
_SYSTEM_PROMPTS = (
    "You are a helpful assistant that manages the user's todo list. Use the tools to add, "
    "list, complete, update and delete tasks. Be brief and confirm every change.",
    "You are TaskBot. Keep answers short, use the task tools for every change, and never "
    "invent task numbers.",
)


def _copy_escape(value: str) -> str:
    """Escape text for COPY's text format."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


# COPY's binary format: each field is a 4-byte length (-1 for NULL) and the value in the
# type's binary representation.
_BIN_NULL = b"\xff\xff\xff\xff"
_BIN_UUID = b"\x00\x00\x00\x10"
_BIN_TIMESTAMP = b"\x00\x00\x00\x08"
_BIN_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_BIN_TRAILER = b"\xff\xff"
_POSTGRES_EPOCH_US = 946_684_800_000_000  # 2000-01-01 UTC, in Unix microseconds
_UUID4_CLEAR = ~((0xF << 76) | (0x3 << 62))
_UUID4_SET = (0x4 << 76) | (0x2 << 62)


def _bin_text(value: str) -> bytes:
    data = value.encode()
    return struct.pack(">i", len(data)) + data


def _bin_jsonb(value: object) -> bytes:
    if value is None:
        return _BIN_NULL
    data = b"\x01" + json.dumps(value, ensure_ascii=False, separators=(", ", ": ")).encode()
    return struct.pack(">i", len(data)) + data


_SYSTEM_PROMPTS_BIN = tuple(_bin_text(prompt) for prompt in _SYSTEM_PROMPTS)
_ROLES_BIN = {role: _bin_text(role) for role in ("user", "assistant", "system")}


def _json(value: object) -> str:
    return _copy_escape(json.dumps(value, ensure_ascii=False, separators=(", ", ": ")))


@dataclass(frozen=True)
class _Turn:
    """A user message and the assistant's answer, as COPY binary fields (length-prefixed),
    and the title as COPY text."""

    user: bytes
    title: str
    assistant: bytes
    metadata: bytes  # assistant metadata, jsonb
    tool_calls: bytes  # jsonb or NULL
    tool_results: bytes  # jsonb or NULL
    raw: tuple  # the same, as Python values (for benchmarks' naive baseline)


def _build_turns(rng: random.Random, fake) -> list[_Turn]:
    nouns = _NOUNS
    sentences = [fake.sentence(nb_words=rng.randint(6, 16)) for _ in range(1_500)]
    turns = []
    for number in range(_TURN_POOL):
        task = f"{rng.choice(_VERBS)} the {rng.choice(nouns)}"
        kind = rng.random()
        tools: list[str] = []
        if kind < 0.35:
            user = f"Add a task to {task} {rng.choice(_WHEN)}"
            tools = ["add_task"]
            reply = f"✅ I've created a new task: '{task.capitalize()}' (Task #{rng.randint(1, 400)})."
        elif kind < 0.55:
            user = rng.choice(
                ("What's on my list?", "Show me my tasks", f"What do I have {rng.choice(_WHEN)}?")
            )
            tools = ["list_tasks"]
            items = [
                f"{i + 1}. {rng.choice(_VERBS).capitalize()} the {rng.choice(nouns)}"
                for i in range(rng.randint(1, 6))
            ]
            reply = "Here are your tasks:\n" + "\n".join(items)
        elif kind < 0.68:
            user = f"Mark '{task}' as done"
            tools = ["list_tasks", "complete_task"]
            reply = f"Done! '{task.capitalize()}' is marked as complete. 🎉"
        elif kind < 0.76:
            user = f"Delete the task about the {rng.choice(nouns)}"
            tools = ["delete_task"]
            reply = "I've deleted that task. " + rng.choice(sentences)
        else:
            # Free-form questions: longer, no tools.
            user = " ".join(rng.choices(sentences, k=rng.choices((1, 2, 4, 8, 20), (40, 30, 18, 9, 3))[0]))
            if rng.random() < 0.5:
                user = user.rstrip(".") + "?"
            reply = "\n\n".join(
                " ".join(rng.choices(sentences, k=rng.randint(2, 6))) for _ in range(rng.randint(1, 4))
            )
        user = user[:USER_MESSAGE_MAX_CHARS]
        title = user if len(user) <= 60 else user[:57].rsplit(" ", 1)[0] + "..."
        metadata = {
            "tools_used": tools,
            "model": rng.choice(_MODELS),
            "processing_time_ms": int(rng.lognormvariate(7.0, 0.5)),
        }
        call_list = result_list = None
        if tools and rng.random() < 0.5:
            call_ids = [f"call_{number:05d}{i}" for i in range(len(tools))]
            call_list = [
                {
                    "id": cid,
                    "type": "function",
                    "function": {"name": tool, "arguments": json.dumps({"title": task})},
                }
                for cid, tool in zip(call_ids, tools, strict=True)
            ]
            result_list = [{"tool_call_id": cid, "output": {"status": "ok"}} for cid in call_ids]
        turns.append(
            _Turn(
                _bin_text(user),
                _copy_escape(title),
                _bin_text(reply),
                _bin_jsonb(metadata),
                _bin_jsonb(call_list),
                _bin_jsonb(result_list),
                (user, title, reply, metadata, call_list, result_list),
            )
        )
    return turns


def _user_metadata_pool(rng: random.Random) -> list[dict | None]:
    """Client details on about one user message in five, as in seed 002's example."""
    pool: list[dict | None] = [None] * 96
    for _ in range(24):
        pool.append(
            {"ip_address": f"203.0.113.{rng.randint(1, 254)}", "user_agent": rng.choice(_USER_AGENTS)}
        )
    return pool


# --- time ------------------------------------------------------------------------------------


class _Clock:
    """Formats instants, given as microseconds before the anchor, as COPY timestamptz."""

    def __init__(self, anchor: dt.datetime) -> None:
        self.anchor_us = int(anchor.timestamp()) * 1_000_000 + anchor.microsecond
        self.dates: dict[int, str] = {}
        self.hms = [f"{h:02d}:{m:02d}:{s:02d}" for h in range(24) for m in range(60) for s in range(60)]

    def date(self, day: int) -> str:
        text = self.dates[day] = (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()
        return text

    def __call__(self, before_us: int) -> str:
        day, in_day = divmod(self.anchor_us - before_us, 86_400_000_000)
        second, micros = divmod(in_day, 1_000_000)
        date = self.dates.get(day) or self.date(day)
        return f"{date} {self.hms[second]}.{micros:06d}+00"


_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def _uuid(rng: random.Random) -> str:
    """A version-4 UUID from ``rng`` (the message loop inlines the same formatting)."""
    h = rng.randbytes(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


# --- the plan --------------------------------------------------------------------------------


class _Plan:
    """Who owns each conversation and how long it is: heavy-tailed, exact totals."""

    def __init__(self, request: SeedRequest) -> None:
        # Memory stays flat in the data: per conversation, only two int arrays (no Python
        # object per row: a list of floats or tuples per conversation cost 90 MB at 10M
        # messages).
        rng = random.Random(request.seed)
        self.request = request
        # A few heavy users and many light ones (Zipf-like weights over shuffled users).
        order = array("i", range(request.users))
        rng.shuffle(order)
        weights = (1.0 / (rank + 1) ** 1.07 for rank in range(request.users))
        cumulative = array("d", itertools.accumulate(weights))
        total = cumulative[-1]
        owners = array("i", bytes(4 * request.conversations))
        for index in range(request.conversations):
            owners[index] = order[bisect.bisect_left(cumulative, rng.random() * total)]
        self.owners = owners
        del order, cumulative
        # Lengths: one message each, the rest spread with a long tail (log-normal shares).
        # Two passes over the same draws: their sum gives the scale, then each length is
        # the step of the running total's floor, so the lengths add up exactly.
        extra = request.messages - request.conversations
        start = rng.getstate()
        scale = extra / math.fsum(rng.lognormvariate(0.0, 1.1) for _ in range(request.conversations))
        rng.setstate(start)
        lengths = array("i", bytes(4 * request.conversations))
        running = 0.0
        assigned = 0
        for index in range(request.conversations):
            running += rng.lognormvariate(0.0, 1.1) * scale
            whole = min(int(running), extra) - assigned
            lengths[index] = 1 + whole
            assigned += whole
        lengths[-1] += extra - assigned  # what rounding left over, at most one message
        self.lengths = lengths
        self.conversation_seed = rng.getrandbits(64)
        self.message_seed = rng.getrandbits(64)

    def conversations(self, turns: int) -> Iterator[_Conversation]:
        """Every conversation's row, in order. Each pass over the conversations walks the
        same random stream from its start, so every pass sees the same conversations."""
        rng = random.Random(self.conversation_seed)
        for index in range(self.request.conversations):
            yield _conversation(self, index, rng, turns)

    def message_rng(self) -> random.Random:
        return random.Random(self.message_seed)


@dataclass
class _Conversation:
    """What the conversations row needs; messages fill in between ``first`` and ``last``."""

    id: str
    user_id: str
    length: int
    system_first: bool
    first_turn: int
    created_before: int  # microseconds before the anchor
    first_before: int  # the first message
    last_before: int  # the last message: updated_at
    status: str
    deleted_before: int | None
    metadata: str


# The assistant answers in seconds; the user comes back after minutes, hours or, now and
# then, days (log-normal, median e**4.5 s = 90 s).
_CONVERSATION_METADATA = tuple(_json({"source": source}) for source in ("web", "ios", "android"))
_ANSWER_SECONDS = (0.5, 25.0)
_RETURN_MU, _RETURN_SIGMA, _RETURN_CAP = 4.5, 1.8, 20 * 86_400.0


def _return_gaps() -> tuple[float, ...]:
    """4096 draws from a fixed stream: picking from a table is cheaper than exp(gauss())
    per gap, and as deterministic."""
    rng = random.Random(0x6A95)
    return tuple(min(math.exp(rng.gauss(_RETURN_MU, _RETURN_SIGMA)), _RETURN_CAP) for _ in range(4096))


_RETURN_GAPS = _return_gaps()


def _conversation(plan: _Plan, index: int, rng: random.Random, turns: int) -> _Conversation:
    """One conversation's row, in constant time (the messages' own times come later, in
    ``_message_times``, scaled to fit between its first and last message)."""
    length = plan.lengths[index]
    system_first = length >= 2 and rng.random() < SYSTEM_FIRST_SHARE
    answers = (length - int(system_first)) // 2
    returns = max(length - 1 - answers, 0)
    span_seconds = answers * 8.0 + returns * 90.0 * math.exp(rng.gauss(0.0, 1.0))
    span = max(int(span_seconds * 1_000_000), (length - 1) * 1_000)
    window = plan.request.days * 86_400_000_000
    span = min(span, window // 2)
    last_before = min(int(rng.random() ** 1.6 * window), window - span)  # recent activity is denser
    first_before = last_before + span
    deleted_before = int(rng.random() * last_before) if rng.random() < SOFT_DELETED_SHARE else None
    return _Conversation(
        id=_uuid(rng),
        user_id=f"{plan.request.user_prefix}{plan.owners[index]:07d}",
        length=length,
        system_first=system_first,
        first_turn=int(rng.random() * turns),
        created_before=first_before + int(rng.uniform(0.0, 5.0) * 1_000_000),
        first_before=first_before,
        last_before=last_before,
        status="archived" if rng.random() < ARCHIVED_SHARE else "active",
        deleted_before=deleted_before,
        metadata=_CONVERSATION_METADATA[int(rng.random() * 3)] if rng.random() < 0.5 else "\\N",
    )


def _message_times(c: _Conversation, rng: random.Random) -> list[int]:
    """Each message's microseconds before the anchor, strictly decreasing (oldest first),
    from ``first_before`` to ``last_before`` exactly."""
    if c.length == 1:
        return [c.first_before]
    random_ = rng.random
    low, width = _ANSWER_SECONDS[0], _ANSWER_SECONDS[1] - _ANSWER_SECONDS[0]
    gaps = [
        low + random_() * width if (position - c.system_first) % 2 else _RETURN_GAPS[int(random_() * 4096)]
        for position in range(1, c.length)
    ]
    # Scale the gaps to the span, keeping each at least a millisecond.
    span = c.first_before - c.last_before
    spare = span - 1_000 * len(gaps)
    scale = spare / sum(gaps)
    times = [c.first_before]
    before = c.first_before
    for gap in gaps[:-1]:
        before -= 1_000 + int(gap * scale)
        times.append(before)
    times.append(c.last_before)
    return times


# --- the load --------------------------------------------------------------------------------


def seeded_user_count(connection: Connection, prefix: str = USER_PREFIX) -> int:
    return int(
        connection.execute(
            text("SELECT count(*) FROM users WHERE starts_with(id, :prefix)"), {"prefix": prefix}
        ).scalar_one()
    )


def seed(engine: Engine, request: SeedRequest, progress: Progress | None = None) -> SeedResult:
    """Load one seed, whole, in one transaction."""
    request.validate()
    migrations.require_head(engine)
    started = time.perf_counter()
    report = progress or (lambda phase, done, total: None)
    with engine.connect() as connection, connection.begin():
        privileges.require_table_privileges(
            connection,
            [(p, t) for t in ("users", "conversations", "messages") for p in ("SELECT", "INSERT")],
            "seed writes users, conversations and messages",
        )
        if seeded_user_count(connection, request.user_prefix):
            raise StateError(
                f"seed {request.seed} is already loaded (users {request.user_prefix}*)",
                hint="pass --reset to replace it, or another --seed to add different data",
            )
        anchor = connection.execute(text("SELECT now()")).scalar_one().astimezone(dt.UTC)
        user_columns = _user_columns(connection)
        connection.execute(text("SET LOCAL synchronous_commit = off"))
        connection.execute(text("SET LOCAL maintenance_work_mem = '256MB'"))
        fast = _take_over_if_empty(connection)
        _load(connection, request, anchor, user_columns, report)
        if fast:
            report("indexes", 0, 1)
            _rebuild(connection)
            report("indexes", 1, 1)
    return SeedResult(
        seed=request.seed,
        users=request.users,
        conversations=request.conversations,
        messages=request.messages,
        anchor=anchor,
        fast_path=fast,
        elapsed=time.perf_counter() - started,
    )


def _user_columns(connection: Connection) -> list[tuple[str, str]]:
    """The users columns the seed fills: chatdb's own, and the application's usual ones.
    A NOT NULL column without a default that the seed cannot fill is refused up front."""
    rows = connection.execute(
        text(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,"
            " a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> ''"
            " FROM pg_attribute a WHERE a.attrelid = to_regclass('users')"
            " AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
        )
    ).all()
    fillable = {
        "id": "id",
        "email": "email",
        "name": "name",
        "created_at": "time",
        "createdAt": "time",
        "updated_at": "time",
        "updatedAt": "time",
        "email_verified": "false",
        "emailVerified": "false",
    }
    chosen, missing = [], []
    for name, type_name, not_null, has_default in rows:
        if name in fillable and not (fillable[name] == "false" and type_name != "boolean"):
            chosen.append((name, fillable[name]))
        elif not_null and not has_default:
            missing.append(f"{name} ({type_name})")
    if missing:
        raise StateError("the users table has required columns the seed cannot fill: " + ", ".join(missing))
    return chosen


def _take_over_if_empty(connection: Connection) -> bool:
    """When the hot tables are empty, lock them and drop their indexes and constraints for
    the load (``_rebuild`` puts them back before commit). Returns whether it did.

    Tables that hold rows are never locked beyond what INSERT takes. The take-over runs
    in a savepoint: if the tables turn out not to be empty once locked, or something
    else depends on their keys, rolling back to it releases the lock and restores them.
    """
    empty = text("SELECT NOT EXISTS (SELECT 1 FROM conversations) AND NOT EXISTS (SELECT 1 FROM messages)")
    if not connection.execute(empty).scalar_one():
        return False
    if privileges.not_owned(connection, ("conversations", "messages")):
        return False  # dropping constraints and indexes is for the tables' owner
    savepoint = connection.begin_nested()
    try:
        connection.execute(text("SET LOCAL lock_timeout = '10s'"))
        connection.execute(text("LOCK TABLE conversations, messages IN ACCESS EXCLUSIVE MODE"))
        if not connection.execute(empty).scalar_one():
            savepoint.rollback()
            return False
        quote = connection.dialect.identifier_preparer.quote
        for table in (messages, conversations):
            for constraint in _droppable(table):
                connection.execute(
                    text(
                        f"ALTER TABLE {quote(table.name)} DROP CONSTRAINT IF EXISTS {quote(constraint.name)}"
                    )
                )
            for index in table.indexes:
                connection.execute(text(f"DROP INDEX IF EXISTS {quote(index.name)}"))
    except DBAPIError:
        savepoint.rollback()
        return False
    savepoint.commit()
    return True


def _droppable(table):
    """Foreign keys first, then the keys they reference."""
    keys = [c for c in table.constraints if isinstance(c, ForeignKeyConstraint)]
    return keys + [
        c for c in table.constraints if c.__visit_name__ in ("primary_key_constraint", "unique_constraint")
    ]


def _rebuild(connection: Connection) -> None:
    """Recreate, from chatdb.schema, what ``_take_over_if_empty`` dropped.

    The DDL is rendered by the dialect's DDL compiler rather than through AddConstraint,
    which would mark the metadata's constraints as not to be rendered inline, changing
    ``schema.metadata`` for the rest of the process.
    """
    compiler = connection.dialect.ddl_compiler(connection.dialect, None)
    quote = connection.dialect.identifier_preparer.quote

    def add(constraint) -> None:
        definition = compiler.process(constraint)
        connection.execute(text(f"ALTER TABLE {quote(constraint.table.name)} ADD {definition}"))

    for table in (conversations, messages):
        for constraint in reversed(_droppable(table)):
            if not isinstance(constraint, ForeignKeyConstraint):
                add(constraint)
        for index in table.indexes:
            connection.execute(CreateIndex(index))
    for table in (conversations, messages):
        for constraint in _droppable(table):
            if isinstance(constraint, ForeignKeyConstraint):
                add(constraint)


def _copy(
    connection: Connection, table: str, columns: list[str], chunks: Iterator[bytes], *, binary: bool = False
) -> None:
    raw = connection.connection.driver_connection
    quoted = ", ".join(f'"{c}"' for c in columns)
    options = " (FORMAT binary)" if binary else ""
    with raw.cursor() as cursor, cursor.copy(f'COPY "{table}" ({quoted}) FROM STDIN{options}') as copy:
        for chunk in chunks:
            copy.write(chunk)


_MESSAGE_COLUMNS = ["id", "conversation_id", "user_id", "role", "content", "metadata", "created_at"]
_MESSAGE_COLUMNS += ["tool_calls", "tool_results", "deleted_at"]
_CONVERSATION_COLUMNS = [
    "id",
    "user_id",
    "status",
    "created_at",
    "updated_at",
    "title",
    "metadata",
    "deleted_at",
]


def _load(
    connection: Connection,
    request: SeedRequest,
    anchor: dt.datetime,
    user_columns: list[tuple[str, str]],
    report: Progress,
) -> None:
    """COPY users, conversations and messages, generated by a child process."""
    frames = _in_child(_all_chunks(request, anchor, user_columns))
    offsets = (0, request.users, request.users + request.conversations)
    for (table, columns), offset in zip(
        (
            ("users", [name for name, _ in user_columns]),
            ("conversations", _CONVERSATION_COLUMNS),
            ("messages", _MESSAGE_COLUMNS),
        ),
        offsets,
        strict=True,
    ):

        def rows(table: str = table, offset: int = offset) -> Iterator[bytes]:
            for chunk, done in frames:
                if not chunk:  # the end of this table
                    return
                yield chunk
                report(table, offset + done, request.rows)

        # Messages travel in COPY's binary format: ids and timestamps are packed, not
        # formatted as text by Python and parsed again by the server.
        _copy(connection, table, columns, rows(), binary=table == "messages")
    for _ in frames:  # reach the end of the stream, and the child's exit status
        raise RuntimeError("the generator produced more tables than expected")


def _all_chunks(
    request: SeedRequest, anchor: dt.datetime, user_columns: list[tuple[str, str]]
) -> Iterator[tuple[bytes, int]]:
    """Every table's COPY text in chunks, with rows so far; an empty chunk ends a table."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(request.seed)
    clock = _Clock(anchor)
    # Users first: the parent copies them while this process builds the rest.
    done = 0
    for chunk in _user_rows(request, fake, clock, user_columns):
        if chunk:
            done += chunk.count("\n")
            yield chunk.encode(), done
    yield b"", done

    content_rng = random.Random(request.seed ^ 0x5EED)
    turns = _build_turns(content_rng, fake)
    user_metadata = [_bin_jsonb(m) for m in _user_metadata_pool(content_rng)]
    plan = _Plan(request)

    lines: list[str] = []
    for index, c in enumerate(plan.conversations(len(turns))):
        deleted = clock(c.deleted_before) if c.deleted_before is not None else "\\N"
        lines.append(
            f"{c.id}\t{c.user_id}\t{c.status}\t{clock(c.created_before)}\t{clock(c.last_before)}"
            f"\t{turns[c.first_turn].title}\t{c.metadata}\t{deleted}\n"
        )
        if len(lines) == 5_000:
            yield "".join(lines).encode(), index + 1
            lines.clear()
    if lines:
        yield "".join(lines).encode(), request.conversations
    yield b"", request.conversations

    for chunk, written in _message_chunks(request, plan, turns, user_metadata, clock):
        if chunk:
            yield chunk, written
    yield b"", request.messages


def _message_chunks(
    request: SeedRequest, plan: _Plan, turns: list[_Turn], user_metadata: list[bytes], clock: _Clock
) -> Iterator[tuple[bytes, int]]:
    """Every message as COPY binary rows, in chunks, with the number of messages so far.
    The hot loop: it runs once per message, so ids and timestamps are packed inline."""
    rows: list[bytes] = [_BIN_HEADER]
    append = rows.append
    size = 0
    written = 0
    epoch = clock.anchor_us - _POSTGRES_EPOCH_US  # the anchor, in PostgreSQL's epoch
    pack_time = struct.Struct(">q").pack
    n_turns, n_meta = len(turns), len(user_metadata)
    user_role, assistant_role = _ROLES_BIN["user"], _ROLES_BIN["assistant"]
    rng = plan.message_rng()
    random_ = rng.random
    bits = rng.getrandbits
    clear, set_ = _UUID4_CLEAR, _UUID4_SET
    for c in plan.conversations(n_turns):
        owner = _BIN_UUID + bytes.fromhex(c.id.replace("-", "")) + _bin_text(c.user_id)
        times = _message_times(c, rng)
        position = 0
        if c.system_first:
            prompt = _SYSTEM_PROMPTS_BIN[int(random_() * len(_SYSTEM_PROMPTS_BIN))]
            append(
                b"\x00\x0a"
                + _BIN_UUID
                + ((bits(128) & clear) | set_).to_bytes(16)
                + owner
                + _ROLES_BIN["system"]
                + prompt
                + _BIN_NULL
                + _BIN_TIMESTAMP
                + pack_time(epoch - times[0])
                + _BIN_NULL * 3
            )
            position = 1
        turn = turns[c.first_turn]
        length = c.length
        while position < length:
            before = times[position]
            if random_() < MESSAGE_SOFT_DELETED_SHARE:
                deleted = _BIN_TIMESTAMP + pack_time(epoch - int(random_() * before))
            else:
                deleted = _BIN_NULL
            append(
                b"\x00\x0a"
                + _BIN_UUID
                + ((bits(128) & clear) | set_).to_bytes(16)
                + owner
                + user_role
                + turn.user
                + user_metadata[int(random_() * n_meta)]
                + _BIN_TIMESTAMP
                + pack_time(epoch - before)
                + _BIN_NULL
                + _BIN_NULL
                + deleted
            )
            position += 1
            if position == length:
                break
            append(
                b"\x00\x0a"
                + _BIN_UUID
                + ((bits(128) & clear) | set_).to_bytes(16)
                + owner
                + assistant_role
                + turn.assistant
                + turn.metadata
                + _BIN_TIMESTAMP
                + pack_time(epoch - times[position])
                + turn.tool_calls
                + turn.tool_results
                + _BIN_NULL
            )
            position += 1
            turn = turns[int(random_() * n_turns)]
        written += length
        size += length
        if size >= _CHUNK_MESSAGES:
            yield b"".join(rows), written
            rows.clear()
            size = 0
    append(_BIN_TRAILER)
    yield b"".join(rows), written


_FRAME = struct.Struct("<QQ")  # payload length, rows so far
_END = (1 << 64) - 1  # the length that marks the end of the stream


def _in_child(chunks: Iterator[tuple[bytes, int]]) -> Iterator[tuple[bytes, int]]:
    """Run a generator in a forked child and yield what it yields, through a pipe.

    The generator is CPU-bound Python; in a child it gets a core of its own while this
    process feeds the server, instead of taking turns with the COPY for the GIL. The
    child ignores SIGINT (this process handles Ctrl-C and stops it) and leaves with
    ``os._exit``, touching nothing it inherited.
    """
    if not hasattr(os, "fork"):
        yield from chunks
        return
    read_fd, write_fd = os.pipe()
    with contextlib.suppress(OSError, AttributeError):  # a bigger pipe: fewer wake-ups
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    pid = os.fork()
    if pid == 0:  # the child
        status = 1
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            os.close(read_fd)
            with open(write_fd, "wb", buffering=0, closefd=True) as pipe:
                for chunk, written in chunks:
                    pipe.write(_FRAME.pack(len(chunk), written) + chunk)
                pipe.write(_FRAME.pack(_END, 0))
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    finished = False
    try:
        with open(read_fd, "rb", buffering=1 << 20, closefd=True) as pipe:
            while True:
                header = pipe.read(_FRAME.size)
                if len(header) < _FRAME.size:
                    break
                length, written = _FRAME.unpack(header)
                if length == _END:
                    finished = True
                    break
                yield pipe.read(length), written
    finally:
        if not finished:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if not finished or status != 0:
        raise RuntimeError(f"the message generator stopped unexpectedly (status {status})")


def _user_rows(request: SeedRequest, fake, clock: _Clock, columns: list[tuple[str, str]]) -> Iterator[str]:
    rng = random.Random(request.seed ^ 0x05E25)
    firsts = [fake.first_name() for _ in range(300)]
    lasts = [fake.last_name() for _ in range(300)]
    domains = ("example.com", "example.org", "example.net")
    window = request.days * 86_400_000_000
    lines = []
    for number in range(request.users):
        first, last = rng.choice(firsts), rng.choice(lasts)
        joined = clock(window + int(rng.uniform(1, 90) * 86_400_000_000))
        values = {
            "id": f"{request.user_prefix}{number:07d}",
            "name": _copy_escape(f"{first} {last}"),
            "email": _copy_escape(f"{first}.{last}.{request.seed}.{number}@{rng.choice(domains)}".lower()),
            "time": joined,
            "false": "f",
        }
        lines.append("\t".join(values[kind] for _, kind in columns) + "\n")
        if len(lines) >= 5_000:
            yield "".join(lines)
            lines.clear()
    yield "".join(lines)


def reset(engine: Engine) -> ResetResult:
    """Delete every seeded user (ids starting with ``seed-``) and, by cascade, everything of
    theirs. Never touches a row of a user whose id lacks the prefix."""
    migrations.require_head(engine)
    with engine.connect() as connection, connection.begin():
        privileges.require_table_privileges(
            connection,
            [("SELECT", "users"), ("DELETE", "users")],
            "seed --reset deletes the seeded users, and everything of theirs by cascade",
        )
        counts = _seeded_counts(connection)
        # When the seed owns every conversation (hot and archived), truncating is exact
        # and far faster than cascading row by row.
        others = connection.execute(
            text(
                "SELECT EXISTS (SELECT 1 FROM conversations WHERE NOT starts_with(user_id, :p))"
                " OR EXISTS (SELECT 1 FROM conversations_archive WHERE NOT starts_with(user_id, :p))"
            ),
            {"p": USER_PREFIX},
        ).scalar_one()
        truncatable = connection.execute(
            text(
                "SELECT bool_and(has_table_privilege(to_regclass(t), 'TRUNCATE'))"
                " FROM unnest(CAST(:tables AS text[])) AS t"
            ),
            {"tables": ["messages_archive", "conversations_archive", "messages", "conversations"]},
        ).scalar_one()
        if not others and counts.conversations and truncatable:
            connection.execute(text("SET LOCAL lock_timeout = '10s'"))
            connection.execute(
                text("TRUNCATE messages_archive, conversations_archive, messages, conversations")
            )
        connection.execute(text("DELETE FROM users WHERE starts_with(id, :p)"), {"p": USER_PREFIX})
    return counts


def seeded_counts(engine: Engine) -> ResetResult:
    """What ``reset`` would delete."""
    migrations.require_head(engine)
    with engine.connect() as connection:
        return _seeded_counts(connection)


def _seeded_counts(connection: Connection) -> ResetResult:
    users, conversations_, messages_ = connection.execute(
        text(
            "SELECT (SELECT count(*) FROM users WHERE starts_with(id, :p)),"
            " (SELECT count(*) FROM conversations WHERE starts_with(user_id, :p)),"
            " (SELECT count(*) FROM messages WHERE starts_with(user_id, :p))"
        ),
        {"p": USER_PREFIX},
    ).one()
    return ResetResult(int(users), int(conversations_), int(messages_))
