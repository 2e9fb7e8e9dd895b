"""The seed's binary COPY encoder, checked by a small reader of PostgreSQL's binary COPY
format (no database; tests/integration/test_seed_command.py loads the same fields with a real COPY).

The format, from PostgreSQL's documentation of COPY: the signature ``PGCOPY\\n\\377\\r\\n\\0``,
a 32-bit flags word, a 32-bit header extension length and the extension; then per row a
16-bit field count and, per field, a 32-bit length (-1 for NULL) and the value's bytes;
then a 16-bit -1. Everything big-endian.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import struct
import uuid

import pytest
from faker import Faker
from sqlalchemy import String, Text
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP, UUID

from chatdb import schema
from chatdb.schema import SeededColumn
from chatdb.seed import SeedRequest, content, copy_encoder, rows
from chatdb.seed.distributions import Plan

SIGNATURE = b"PGCOPY\n\xff\r\n\x00"


def read_copy(data: bytes) -> list[list[bytes | None]]:
    """The rows of a binary COPY stream, each a list of raw field values (None for NULL)."""
    assert data[:11] == SIGNATURE
    flags, extension = struct.unpack_from(">ii", data, 11)
    assert flags == 0
    offset = 19 + extension
    result = []
    while True:
        (count,) = struct.unpack_from(">h", data, offset)
        offset += 2
        if count == -1:
            assert offset == len(data), "bytes after the trailer"
            return result
        fields: list[bytes | None] = []
        for _ in range(count):
            (length,) = struct.unpack_from(">i", data, offset)
            offset += 4
            if length == -1:
                fields.append(None)
                continue
            assert length >= 0 and offset + length <= len(data)
            fields.append(data[offset : offset + length])
            offset += length
        result.append(fields)


POSTGRES_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def _jsonb(raw: bytes):
    assert raw[:1] == b"\x01", "jsonb's binary format starts with version 1"
    return json.loads(raw[1:].decode())


DECODERS = {
    "uuid": lambda raw: uuid.UUID(bytes=raw),
    "text": lambda raw: raw.decode(),
    "jsonb": _jsonb,
    "timestamptz": lambda raw: POSTGRES_EPOCH + dt.timedelta(microseconds=struct.unpack(">q", raw)[0]),
    "int2": lambda raw: struct.unpack(">h", raw)[0],
    "int4": lambda raw: struct.unpack(">i", raw)[0],
    "int8": lambda raw: struct.unpack(">q", raw)[0],
    "bool": lambda raw: {b"\x01": True, b"\x00": False}[raw],
}


def decode(encodings: list[str], fields: list[bytes | None]) -> list:
    assert len(fields) == len(encodings)
    return [None if raw is None else DECODERS[e](raw) for e, raw in zip(encodings, fields, strict=True)]


SAMPLE = [
    ("uuid", uuid.UUID("0b5a3c1e-7d2f-4e8a-9c4b-1f2e3d4c5b6a")),
    ("uuid", "5f0c1d2e-3a4b-4c5d-8e6f-7a8b9c0d1e2f"),
    ("text", "héllo\twörld\n\\N ✅ 🎉"),
    ("text", ""),
    ("jsonb", {"tools_used": ["add_task"], "model": "gpt-4o", "ok": True, "n": 1.5, "emoji": "🎉"}),
    ("jsonb", [1, "two", None]),
    ("timestamptz", dt.datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=dt.UTC)),
    ("timestamptz", dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)),  # before the epoch
    ("timestamptz", dt.datetime(2025, 3, 4, 7, 6, 7, tzinfo=dt.timezone(dt.timedelta(hours=2)))),
    ("int2", -32768),
    ("int4", 2**31 - 1),
    ("int8", -(2**63)),
    ("bool", True),
    ("bool", False),
]


def test_a_row_round_trips_through_the_reader():
    encodings = [encoding for encoding, _ in SAMPLE]
    values = [value for _, value in SAMPLE]
    fields = [copy_encoder.ENCODERS[encoding](value) for encoding, value in SAMPLE]
    nulls = [copy_encoder.ENCODERS[encoding](None) for encoding in encodings]
    stream = copy_encoder.HEADER + copy_encoder.row(fields) + copy_encoder.row(nulls) + copy_encoder.TRAILER
    first, second = read_copy(stream)
    expected = [uuid.UUID(v) if isinstance(v, str) and e == "uuid" else v for e, v in SAMPLE]
    assert decode(encodings, first) == expected
    assert decode(encodings, second) == [None] * len(values)


def test_the_header_trailer_and_field_count():
    assert copy_encoder.HEADER == SIGNATURE + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
    assert copy_encoder.TRAILER == b"\xff\xff"
    assert copy_encoder.field_count(10) == b"\x00\x0a"
    assert struct.pack(">i", -1) == copy_encoder.NULL


def test_jsonb_keeps_the_seeds_spelling():
    # The seed's rows must stay byte-identical: the JSON text is part of them.
    body = b'\x01{"a": [1, 2], "b": "\xc3\xa9"}'
    assert copy_encoder.jsonb_field({"a": [1, 2], "b": "é"}) == struct.pack(">i", len(body)) + body


@pytest.mark.parametrize(
    "encoding, value",
    [
        ("timestamptz", dt.datetime(2025, 1, 1)),  # naive: which instant is it?
        ("uuid", "not-a-uuid"),
        ("uuid", "0b5a3c1e-7d2f-4e8a-9c4b"),
    ],
)
def test_values_that_are_not_what_the_type_holds_are_refused(encoding, value):
    with pytest.raises(ValueError):
        copy_encoder.ENCODERS[encoding](value)


# --- the messages' layout, from chatdb.schema.SEEDED_MESSAGE_COLUMNS -----------------------------

TYPE_ENCODINGS = (
    (UUID, "uuid"),
    (JSONB, "jsonb"),
    (TIMESTAMP, "timestamptz"),
    (String, "text"),
    (Text, "text"),
)


def test_the_declaration_matches_the_messages_table():
    declared = {column.name: column for column in schema.SEEDED_MESSAGE_COLUMNS}
    for column in schema.messages.columns:
        if not column.nullable and column.server_default is None:
            assert column.name in declared, f"{column.name} is NOT NULL without a default: seed must fill it"
        if column.name in declared:
            encoding = next(e for kind, e in TYPE_ENCODINGS if isinstance(column.type, kind))
            assert declared[column.name].encoding == encoding, column.name
    layout = rows.MESSAGE_LAYOUT
    assert layout.columns == tuple(declared)
    assert layout.field_count == struct.pack(">h", len(declared))


ANCHOR_US = 1_741_064_767_890_123  # 2025-03-04 05:06:07.890123 UTC, in Unix microseconds


def seeded_messages(declaration, request: SeedRequest) -> list[dict]:
    """The messages the seed generates for ``request``, laid out as ``declaration`` says,
    decoded by the reader into one dict per row."""
    fake = Faker("en_US")
    fake.seed_instance(request.seed)
    content_rng = random.Random(request.seed ^ 0x5EED)
    turns = content.build_turns(content_rng, fake)
    user_metadata = content.user_metadata_pool(content_rng)
    layout = rows.MessageLayout(declaration)
    chunks = rows.message_chunks(Plan(request), turns, user_metadata, ANCHOR_US, layout)
    stream = b"".join(chunk for chunk, _ in chunks)
    names = [c.name for c in declaration]
    encodings = [c.encoding for c in declaration]
    return [dict(zip(names, decode(encodings, row), strict=True)) for row in read_copy(stream)]


REQUEST = SeedRequest(users=5, conversations=40, messages=600, days=30, seed=3)


def test_the_seeded_messages_decode_into_chat_rows():
    messages = seeded_messages(schema.SEEDED_MESSAGE_COLUMNS, REQUEST)
    assert len(messages) == REQUEST.messages
    anchor = dt.datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=dt.UTC)
    conversations = set()
    for message in messages:
        assert message["id"].version == 4
        assert message["role"] in schema.ROLES
        assert message["user_id"].startswith("seed-3-")
        assert anchor - dt.timedelta(days=30) <= message["created_at"] <= anchor
        assert message["deleted_at"] is None or message["created_at"] <= message["deleted_at"] <= anchor
        if message["role"] == "user":
            assert len(message["content"]) <= schema.USER_MESSAGE_MAX_CHARS
        if message["role"] == "assistant":
            assert set(message["metadata"]) == {"tools_used", "model", "processing_time_ms"}
        else:
            assert message["tool_calls"] is None and message["tool_results"] is None
        conversations.add(message["conversation_id"])
    assert len(conversations) == REQUEST.conversations
    assert len({message["id"] for message in messages}) == REQUEST.messages


def test_the_declared_order_and_columns_decide_the_rows_and_nothing_else():
    # Reversed, and without tool_results: the rows follow the declaration, and every
    # value stays what it was (the random streams do not depend on the layout).
    declaration = [c for c in reversed(schema.SEEDED_MESSAGE_COLUMNS) if c.name != "tool_results"]
    layout = rows.MessageLayout(declaration)
    assert layout.columns == tuple(c.name for c in declaration)
    assert layout.field_count == struct.pack(">h", len(declaration))
    reordered = seeded_messages(declaration, REQUEST)
    usual = seeded_messages(schema.SEEDED_MESSAGE_COLUMNS, REQUEST)
    assert reordered == [{k: v for k, v in m.items() if k != "tool_results"} for m in usual]


def test_a_column_may_take_a_value_named_otherwise():
    # The declaration names the value when it is not the column's own (a column renamed
    # by a migration keeps its data with one edit there), and a value may fill several
    # columns.
    declaration = [
        SeededColumn("id", "uuid"),
        SeededColumn("role", "text"),
        SeededColumn("content", "text", value="role"),
        SeededColumn("deleted_at", "timestamptz", value="created_at"),
        SeededColumn("created_at", "timestamptz"),
    ]
    messages = seeded_messages(declaration, REQUEST)
    assert len(messages) == REQUEST.messages
    assert all(m["content"] == m["role"] for m in messages)
    assert all(m["deleted_at"] == m["created_at"] for m in messages)
    assert {m["role"] for m in messages} == set(schema.ROLES)


@pytest.mark.parametrize(
    "declaration, complaint",
    [
        ([SeededColumn("colour", "text")], "no such column"),
        ([SeededColumn("role", "varchar")], "no encoding"),
        ([SeededColumn("created_at", "text")], "packs 'created_at' as timestamptz"),
        ([SeededColumn("role", "text"), SeededColumn("role", "text")], "declared twice"),
        (
            [SeededColumn("content", "text"), SeededColumn("metadata", "jsonb", "content")],
            "as text for another",
        ),
        ([SeededColumn("content", "text", "sentiment")], "no value 'sentiment'"),
        ([], "no column"),
    ],
)
def test_a_declaration_the_seed_cannot_follow_is_refused(declaration, complaint):
    with pytest.raises(ValueError, match=complaint):
        rows.MessageLayout(declaration)
