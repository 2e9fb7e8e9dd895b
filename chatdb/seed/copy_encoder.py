"""PostgreSQL's COPY formats, as the seed writes them.

Binary format (PostgreSQL's documentation of COPY, "Binary Format"): an 11-byte signature,
a 32-bit flags word and a 32-bit header extension length; then each row as a 16-bit field
count and, per field, a 32-bit length (-1 for NULL) and the value in its type's binary
representation (what the type's ``send`` function writes); then a 16-bit -1. Integers are
big-endian. The messages travel in it: ids and timestamps are packed, not formatted by
Python and parsed again by the server.

Text format: a line per row, fields separated by tabs, backslash escapes, ``\\N`` for NULL.
Users and conversations travel in it.
"""

from __future__ import annotations

import datetime as dt
import json
import struct
import uuid
from collections.abc import Callable, Sequence
from typing import Any

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = b"\xff\xff"
NULL = b"\xff\xff\xff\xff"
#: The length words of the fixed-size values the seed packs inline.
UUID_LENGTH = b"\x00\x00\x00\x10"
TIMESTAMP_LENGTH = b"\x00\x00\x00\x08"
#: timestamptz travels as microseconds since 2000-01-01 00:00 UTC; this is that instant
#: in Unix microseconds.
POSTGRES_EPOCH_US = 946_684_800_000_000
#: A timestamp field whole: its length word and the microseconds.
TIMESTAMP_FIELD = struct.Struct(">iq")

_POSTGRES_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_LENGTH = struct.Struct(">i")
_JSONB_VERSION = b"\x01"


def field_count(count: int) -> bytes:
    """What starts a row: its number of fields."""
    return struct.pack(">h", count)


def row(fields: Sequence[bytes]) -> bytes:
    """One row from its encoded fields."""
    return field_count(len(fields)) + b"".join(fields)


def _sized(data: bytes) -> bytes:
    return _LENGTH.pack(len(data)) + data


def text_field(value: str | None) -> bytes:
    """text, varchar and char: the UTF-8 bytes."""
    return NULL if value is None else _sized(value.encode())


def jsonb_field(value: Any) -> bytes:
    """jsonb: a version byte (1) and the JSON text. The text is the one the seed has
    always written (``", "`` and ``": "`` as separators, non-ASCII as is), so that the
    same seed gives byte-identical rows."""
    if value is None:
        return NULL
    return _sized(_JSONB_VERSION + json.dumps(value, ensure_ascii=False, separators=(", ", ": ")).encode())


def uuid_field(value: str | uuid.UUID | None) -> bytes:
    """uuid: its 16 bytes."""
    if value is None:
        return NULL
    if isinstance(value, uuid.UUID):
        return UUID_LENGTH + value.bytes
    data = bytes.fromhex(value.replace("-", ""))  # faster than uuid.UUID(), once per conversation
    if len(data) != 16:
        raise ValueError(f"not a UUID: {value!r}")
    return UUID_LENGTH + data


def timestamptz_field(value: dt.datetime | None) -> bytes:
    """timestamptz: microseconds since 2000-01-01 00:00 UTC, a signed 64-bit integer."""
    if value is None:
        return NULL
    if value.tzinfo is None:
        raise ValueError(f"a timestamptz needs a timezone-aware datetime, not {value!r}")
    return TIMESTAMP_FIELD.pack(8, (value - _POSTGRES_EPOCH) // dt.timedelta(microseconds=1))


def _integer(size: int, code: str) -> Callable[[int | None], bytes]:
    packer = struct.Struct(f">i{code}")

    def encode(value: int | None) -> bytes:
        return NULL if value is None else packer.pack(size, value)

    encode.__doc__ = f"a {size * 8}-bit signed integer."
    return encode


int2_field = _integer(2, "h")
int4_field = _integer(4, "i")
int8_field = _integer(8, "q")


def bool_field(value: bool | None) -> bytes:
    """boolean: one byte, 1 or 0."""
    return NULL if value is None else _sized(b"\x01" if value else b"\x00")


#: The encodings a column's declaration may name (``chatdb.schema.SeededColumn``).
ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "uuid": uuid_field,
    "text": text_field,
    "jsonb": jsonb_field,
    "timestamptz": timestamptz_field,
    "int2": int2_field,
    "int4": int4_field,
    "int8": int8_field,
    "bool": bool_field,
}


# --- the text format ---------------------------------------------------------------------------

TEXT_NULL = "\\N"


def text_escape(value: str) -> str:
    """Escape text for COPY's text format."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def text_json(value: Any) -> str:
    """A JSON value in COPY's text format, as the seed has always written it."""
    return text_escape(json.dumps(value, ensure_ascii=False, separators=(", ", ": ")))


class TextClock:
    """Formats instants, given as microseconds before the anchor, as COPY text timestamptz."""

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
