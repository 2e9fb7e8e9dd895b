"""Every table's COPY stream, made from the plan and the content pools: what the
generator child runs (``child``), and ``load`` copies.

Users and conversations travel as COPY text, messages as COPY binary. The messages' COPY
columns, their order, their encodings and the rows' field count all come from one
declaration, ``chatdb.schema.SEEDED_MESSAGE_COLUMNS``; the loop below fills each
message's values by name (``MESSAGE_VALUES``) and never spells a column order.
"""

from __future__ import annotations

import datetime as dt
import operator
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from chatdb import schema
from chatdb.seed import content, copy_encoder
from chatdb.seed.distributions import MESSAGE_SOFT_DELETED_SHARE, Plan, message_times, user_joined_before
from chatdb.seed.request import SeedRequest

_CHUNK_MESSAGES = 2_500
_CHUNK_LINES = 5_000

#: The values the seed makes for each message; a column of ``SEEDED_MESSAGE_COLUMNS``
#: takes one of them.
MESSAGE_VALUES = (
    "id",
    "conversation_id",
    "user_id",
    "role",
    "content",
    "metadata",
    "created_at",
    "tool_calls",
    "tool_results",
    "deleted_at",
)
# Their slots in a message's value list; slot 0 holds the row's field count.
_ID, _CONVERSATION, _USER, _ROLE, _CONTENT, _METADATA, _CREATED, _CALLS, _RESULTS, _DELETED = range(1, 11)
# Values the loop packs inline, each in the one encoding it packs.
_PACKED = {"id": "uuid", "created_at": "timestamptz", "deleted_at": "timestamptz"}


class MessageLayout:
    """The messages' binary COPY rows, as a declaration of columns says: the COPY column
    list, the field count, the encoder of each value, and ``pick``, which turns a value
    list (the field count, then ``MESSAGE_VALUES`` in order) into the row's fields."""

    def __init__(self, declaration: Sequence[schema.SeededColumn]) -> None:
        if not declaration:
            raise ValueError("the seed declares no column of messages")
        slots = {value: slot for slot, value in enumerate(MESSAGE_VALUES, start=1)}
        self.columns = tuple(column.name for column in declaration)
        self.field_count = copy_encoder.field_count(len(declaration))
        self._encoders: dict[str, Callable[[Any], bytes]] = {}
        encodings: dict[str, str] = {}  # a value may go into several columns, in one encoding
        picked = [0]
        for column in declaration:
            value = column.value or column.name
            where = f"chatdb.schema.SEEDED_MESSAGE_COLUMNS: {column.name}"
            if column.name not in schema.messages.c:
                raise ValueError(f"{where}: messages has no such column")
            if self.columns.count(column.name) > 1:
                raise ValueError(f"{where}: declared twice")
            if value not in slots:
                raise ValueError(f"{where}: no value {value!r}; the seed makes {', '.join(MESSAGE_VALUES)}")
            if column.encoding not in copy_encoder.ENCODERS:
                raise ValueError(
                    f"{where}: no encoding {column.encoding!r}; there are {', '.join(copy_encoder.ENCODERS)}"
                )
            if _PACKED.get(value, column.encoding) != column.encoding:
                raise ValueError(f"{where}: the seed packs {value!r} as {_PACKED[value]}")
            if encodings.setdefault(value, column.encoding) != column.encoding:
                raise ValueError(f"{where}: {value!r} is encoded as {encodings[value]} for another column")
            self._encoders[value] = copy_encoder.ENCODERS[column.encoding]
            picked.append(slots[value])
        self.pick: Callable[[Sequence[bytes | None]], tuple[bytes, ...]] = operator.itemgetter(*picked)

    def encode(self, value: str, raw: Any) -> bytes | None:
        """``raw`` in the encoding of the column ``value`` goes into; None when no column
        takes ``value`` (its slot is never picked)."""
        encoder = self._encoders.get(value)
        return encoder(raw) if encoder else None

    def values(self, **known: Any) -> list[bytes | None]:
        """A value list for one kind of message, with the values all of its kind share."""
        slots: list[bytes | None] = [self.field_count] + [None] * len(MESSAGE_VALUES)
        for value, raw in known.items():
            slots[MESSAGE_VALUES.index(value) + 1] = self.encode(value, raw)
        return slots


MESSAGE_LAYOUT = MessageLayout(schema.SEEDED_MESSAGE_COLUMNS)

CONVERSATION_COLUMNS = (
    "id",
    "user_id",
    "status",
    "created_at",
    "updated_at",
    "title",
    "metadata",
    "deleted_at",
)


def all_chunks(
    request: SeedRequest,
    anchor: dt.datetime,
    user_columns: list[tuple[str, str]],
    layout: MessageLayout = MESSAGE_LAYOUT,
) -> Iterator[tuple[bytes, int]]:
    """Every table's COPY data in chunks, with rows so far; an empty chunk ends a table.
    ``user_columns`` pairs each users column with what fills it (``load`` chooses them)."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(request.seed)
    clock = copy_encoder.TextClock(anchor)
    # Users first: the parent copies them while this process builds the rest.
    done = 0
    for chunk in _user_lines(request, fake, clock, user_columns):
        if chunk:
            done += chunk.count("\n")
            yield chunk.encode(), done
    yield b"", done

    content_rng = random.Random(request.seed ^ 0x5EED)
    turns = content.build_turns(content_rng, fake)
    user_metadata = content.user_metadata_pool(content_rng)
    plan = Plan(request)

    yield from _conversation_chunks(request, plan, turns, clock)
    yield b"", request.conversations
    for data, written in message_chunks(plan, turns, user_metadata, clock.anchor_us, layout):
        if data:
            yield data, written
    yield b"", request.messages


def _user_lines(
    request: SeedRequest, fake, clock: copy_encoder.TextClock, columns: list[tuple[str, str]]
) -> Iterator[str]:
    rng = random.Random(request.seed ^ 0x05E25)
    firsts, lasts = content.user_name_pools(fake)
    escape = copy_encoder.text_escape
    lines = []
    for number in range(request.users):
        first, last = rng.choice(firsts), rng.choice(lasts)
        joined = clock(user_joined_before(request, rng))
        values = {
            "id": f"{request.user_prefix}{number:07d}",
            "name": escape(f"{first} {last}"),
            "email": escape(
                f"{first}.{last}.{request.seed}.{number}@{rng.choice(content.USER_EMAIL_DOMAINS)}".lower()
            ),
            "time": joined,
            "false": "f",
        }
        lines.append("\t".join(values[kind] for _, kind in columns) + "\n")
        if len(lines) >= _CHUNK_LINES:
            yield "".join(lines)
            lines.clear()
    yield "".join(lines)


def _conversation_chunks(
    request: SeedRequest, plan: Plan, turns: list[content.Turn], clock: copy_encoder.TextClock
) -> Iterator[tuple[bytes, int]]:
    """The conversations as COPY text, in ``CONVERSATION_COLUMNS`` order."""
    titles = [copy_encoder.text_escape(turn.title) for turn in turns]
    metadata = [copy_encoder.text_json(value) for value in content.CONVERSATION_METADATA]
    null = copy_encoder.TEXT_NULL
    lines: list[str] = []
    for index, c in enumerate(plan.conversations(len(turns))):
        deleted = clock(c.deleted_before) if c.deleted_before is not None else null
        meta = metadata[c.metadata] if c.metadata is not None else null
        lines.append(
            f"{c.id}\t{c.user_id}\t{c.status}\t{clock(c.created_before)}\t{clock(c.last_before)}"
            f"\t{titles[c.first_turn]}\t{meta}\t{deleted}\n"
        )
        if len(lines) == _CHUNK_LINES:
            yield "".join(lines).encode(), index + 1
            lines.clear()
    if lines:
        yield "".join(lines).encode(), request.conversations


@dataclass(frozen=True, slots=True)
class _EncodedTurn:
    """A turn's values, encoded once for all the messages that use it."""

    user: bytes | None
    reply: bytes | None
    metadata: bytes | None
    tool_calls: bytes | None
    tool_results: bytes | None


_UUID4_CLEAR = ~((0xF << 76) | (0x3 << 62))
# The version and variant bits, and the field's length word above the 128 bits of the
# UUID, so that ``to_bytes(20)`` gives the whole field.
_UUID4_FIELD = (0x4 << 76) | (0x2 << 62) | (16 << 128)


def message_chunks(
    plan: Plan,
    turns: list[content.Turn],
    user_metadata: list[dict | None],
    anchor_us: int,
    layout: MessageLayout = MESSAGE_LAYOUT,
) -> Iterator[tuple[bytes, int]]:
    """Every message as COPY binary rows, in chunks, with the number of messages so far.

    The hot loop: it runs once per message. Each kind of message (system prompt, user,
    assistant) keeps a value list holding what its messages share; per message the loop
    writes only what changes (ids and timestamps packed inline), and ``layout.pick``
    lays the values out in the declared column order. Each row is joined at once: a
    chunk of small pieces would hold more memory than the rows themselves.
    """
    encode = layout.encode
    encoded = [
        _EncodedTurn(
            encode("content", t.user),
            encode("content", t.reply),
            encode("metadata", t.metadata),
            encode("tool_calls", t.tool_calls),
            encode("tool_results", t.tool_results),
        )
        for t in turns
    ]
    prompts = [encode("content", prompt) for prompt in content.SYSTEM_PROMPTS]
    user_meta = [encode("metadata", m) for m in user_metadata]
    system = layout.values(role="system", metadata=None, tool_calls=None, tool_results=None, deleted_at=None)
    user = layout.values(role="user", tool_calls=None, tool_results=None)
    assistant = layout.values(role="assistant", deleted_at=None)
    null = copy_encoder.NULL
    pick = layout.pick

    rows: list[bytes] = [copy_encoder.HEADER]
    append = rows.append
    join = b"".join
    size = 0
    written = 0
    epoch = anchor_us - copy_encoder.POSTGRES_EPOCH_US  # the anchor, in PostgreSQL's epoch
    pack_time = copy_encoder.TIMESTAMP_FIELD.pack
    n_turns, n_meta, n_prompts = len(encoded), len(user_meta), len(prompts)
    rng = plan.message_rng()
    random_ = rng.random
    bits = rng.getrandbits
    clear, field = _UUID4_CLEAR, _UUID4_FIELD
    for c in plan.conversations(n_turns):
        system[_CONVERSATION] = user[_CONVERSATION] = assistant[_CONVERSATION] = encode(
            "conversation_id", c.id
        )
        system[_USER] = user[_USER] = assistant[_USER] = encode("user_id", c.user_id)
        times = message_times(c, rng)
        position = 0
        if c.system_first:
            system[_CONTENT] = prompts[int(random_() * n_prompts)]
            system[_ID] = ((bits(128) & clear) | field).to_bytes(20)
            system[_CREATED] = pack_time(8, epoch - times[0])
            append(join(pick(system)))
            position = 1
        turn = encoded[c.first_turn]
        length = c.length
        while position < length:
            before = times[position]
            if random_() < MESSAGE_SOFT_DELETED_SHARE:
                user[_DELETED] = pack_time(8, epoch - int(random_() * before))
            else:
                user[_DELETED] = null
            user[_ID] = ((bits(128) & clear) | field).to_bytes(20)
            user[_CONTENT] = turn.user
            user[_METADATA] = user_meta[int(random_() * n_meta)]
            user[_CREATED] = pack_time(8, epoch - before)
            append(join(pick(user)))
            position += 1
            if position == length:
                break
            assistant[_ID] = ((bits(128) & clear) | field).to_bytes(20)
            assistant[_CONTENT] = turn.reply
            assistant[_METADATA] = turn.metadata
            assistant[_CALLS] = turn.tool_calls
            assistant[_RESULTS] = turn.tool_results
            assistant[_CREATED] = pack_time(8, epoch - times[position])
            append(join(pick(assistant)))
            position += 1
            turn = encoded[int(random_() * n_turns)]
        written += length
        size += length
        if size >= _CHUNK_MESSAGES:
            yield b"".join(rows), written
            rows.clear()
            size = 0
    rows.append(copy_encoder.TRAILER)
    yield b"".join(rows), written
