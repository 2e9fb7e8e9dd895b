"""The export file protocol, the file's side, against real files and without a database.

What the database would hold of the file (the run's audit row: the committed length, the
hash of the bytes before it, the intent of the batch being written) is kept here in a
``Record``, written exactly when a run writes it: the intent before a batch's lines reach
the file, the length and tail with the batch's commit. A run that stops anywhere leaves
the file and the record; the next run's ``repair`` must leave exactly the committed
batches (docs/architecture.md, "The next run's repair")."""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import pytest

from chatdb.errors import StateError, UsageError
from chatdb.lifecycle import ExportFile, check_export


@dataclass
class Record:
    """What the audit row of the last run exporting to the file says."""

    committed: int | None = None
    tail: str | None = None
    intent: dict[str, Any] | None = None


def start(path, record: Record) -> ExportFile:
    """A run starting: repair the file, then record it as the run's audit row does."""
    export = ExportFile(path)
    export.repair(record.committed, record.tail, record.intent)
    recorded = export.recorded(b"")
    record.committed, record.tail, record.intent = recorded["export_bytes"], recorded["export_tail"], None
    return export


def lines(first: int, count: int = 3) -> list[str]:
    return [
        f'{{"conversation": {{"id": {n}, "title": "chat number {n}"}}, "messages": []}}'
        for n in range(first, first + count)
    ]


def batch(
    export: ExportFile, record: Record, rows: list[str], *, commit: bool = True, written: int | None = None
) -> bytes:
    """One batch: its intent recorded, its lines (or their first ``written`` bytes)
    appended, and, with ``commit``, its commit recorded."""
    data = export.encode(rows)
    record.intent = export.intent(data)
    after = export.recorded(data)
    export.write(data if written is None else data[:written])
    if commit:
        record.committed, record.tail, record.intent = after["export_bytes"], after["export_tail"], None
        export.committed()
    return data


def encode(path, rows: list[str]) -> bytes:
    data = "".join(row + "\n" for row in rows).encode()
    return gzip.compress(data) if path.name.endswith(".gz") else data


def incomplete(path) -> bytes:
    """The first half of one more line (in ``.gz``, of one more gzip member): what a
    write cut short leaves."""
    data = encode(path, lines(99, count=1))
    return data[: len(data) // 2]


def read(path) -> list[str]:
    raw = path.read_bytes()
    text = gzip.decompress(raw).decode() if path.name.endswith(".gz") else raw.decode()
    return text.splitlines()


@pytest.fixture(params=[".jsonl", ".jsonl.gz"])
def path(request, tmp_path):
    return tmp_path / f"archive{request.param}"


def test_committed_batches_are_appended_each_once(path):
    record = Record()
    export = start(path, record)
    batch(export, record, lines(0))
    batch(export, record, lines(3))
    export.close()
    assert read(path) == lines(0, 6)
    assert record.committed == path.stat().st_size
    # A run that follows keeps them all and appends after them.
    export = start(path, record)
    batch(export, record, lines(6))
    export.close()
    assert read(path) == lines(0, 9)


def test_a_batch_written_whole_that_never_committed_is_cut_off_by_the_next_run(path):
    record = Record()
    export = start(path, record)
    batch(export, record, lines(0))
    committed = path.read_bytes()
    batch(export, record, lines(3), commit=False)  # killed between the fsync and the COMMIT
    export.close()
    assert path.stat().st_size > len(committed)
    start(path, record).close()
    assert path.read_bytes() == committed


def test_a_write_cut_short_is_cut_off_by_the_next_run(path):
    record = Record()
    export = start(path, record)
    batch(export, record, lines(0))
    committed = path.read_bytes()
    data = batch(export, record, lines(3, count=20), commit=False, written=100)  # a full disk
    export.close()
    assert len(data) > 100 and path.stat().st_size == len(committed) + 100
    start(path, record).close()
    assert path.read_bytes() == committed


def test_a_prefix_too_short_to_identify_goes_as_an_incomplete_tail(path):
    record = Record()
    export = start(path, record)
    batch(export, record, lines(0))
    committed = path.read_bytes()
    batch(export, record, lines(3), commit=False, written=10)
    export.close()
    start(path, record).close()
    assert path.read_bytes() == committed


def test_the_first_batch_into_an_empty_file_is_cut_off_when_it_never_committed(path):
    record = Record()
    export = start(path, record)
    assert record.committed == 0  # an empty recorded length matches any file ...
    batch(export, record, lines(0), commit=False)
    export.close()
    start(path, record).close()
    assert path.read_bytes() == b""  # ... but only the intended batch's bytes are cut


def test_an_intent_recorded_before_anything_was_written_cuts_nothing(path):
    record = Record()
    export = start(path, record)
    batch(export, record, lines(0))
    committed = path.read_bytes()
    record.intent = export.intent(export.encode(lines(3)))  # stopped before the write
    export.close()
    start(path, record).close()
    assert path.read_bytes() == committed


def test_a_committed_batch_is_kept_whatever_followed_its_commit(path):
    record = Record()
    export = start(path, record)
    batch(export, record, lines(0))
    batch(export, record, lines(3))
    whole = path.read_bytes()
    export.close()
    start(path, record).close()
    assert path.read_bytes() == whole


def test_lines_followed_by_other_bytes_are_refused_and_left_as_they_are(path):
    record = Record()
    export = start(path, record)
    batch(export, record, lines(0))
    batch(export, record, lines(3), commit=False)
    export.close()
    with path.open("ab") as file:
        file.write(encode(path, lines(100)))  # someone appended after them
    before = path.read_bytes()
    with pytest.raises(StateError, match="never committed, and more follows them") as refused:
        start(path, record)
    assert refused.value.hint == "remove those bytes from the file, or export to a new file"
    assert path.read_bytes() == before


def test_bytes_that_are_not_the_intended_batch_are_never_cut(path):
    """After the committed length, complete lines that the intent does not describe
    (its head differs): a file the database knows nothing of past that point. Complete
    lines stay; only an incomplete tail goes."""
    record = Record()
    export = start(path, record)
    batch(export, record, lines(0))
    record.intent = export.intent(export.encode(lines(3)))
    export.close()
    other = ExportFile(path)
    other.write(other.encode(lines(50)))
    other.close()
    with path.open("ab") as file:
        file.write(incomplete(path))
    start(path, record).close()
    assert read(path) == lines(0) + lines(50)


def test_an_intent_recorded_at_another_length_describes_nothing_here(path):
    record = Record()
    export = start(path, record)
    batch(export, record, lines(0))
    batch(export, record, lines(3), commit=False)
    export.close()
    assert record.intent is not None
    record.intent["at"] = 0  # recorded when the file was empty
    start(path, record).close()
    assert read(path) == lines(0, 6)  # complete lines, kept


def test_lines_that_only_begin_like_the_intended_batch_are_not_it(tmp_path):
    """The same first bytes and the same length as the batch the run was about to
    write, but other bytes after them: not provably that batch, so kept."""
    path = tmp_path / "archive.jsonl"
    record = Record()
    export = start(path, record)
    batch(export, record, lines(0))
    intended = lines(3)
    record.intent = export.intent(export.encode(intended))
    export.write(export.encode([*intended[:-1], intended[-1].replace("chat", "talk")]))
    export.close()
    start(path, record).close()
    assert read(path) == [*lines(0, 5), lines(5, 1)[0].replace("chat", "talk")]


@pytest.mark.parametrize("change", ["replaced", "shorter", "unknown"])
def test_a_file_the_record_does_not_describe_keeps_every_complete_line(path, change):
    """Replaced (rotated and begun anew), shorter than recorded, or with no record at
    all: every complete line stays, and only an incomplete tail is cut."""
    record = Record()
    export = start(path, record)
    batch(export, record, lines(0))
    first = record.committed
    batch(export, record, lines(3))
    export.close()
    if change == "replaced":
        path.unlink()
        fresh = ExportFile(path)
        fresh.write(fresh.encode(lines(10, count=4)))
        fresh.close()
        kept = lines(10, count=4)
    elif change == "shorter":
        os.truncate(path, first)
        kept = lines(0)
    else:
        record = Record()
        kept = lines(0, 6)
    complete = path.read_bytes()
    with path.open("ab") as file:
        file.write(incomplete(path))
    start(path, record).close()
    assert path.read_bytes() == complete
    assert read(path) == kept


def test_damaged_gzip_data_in_the_middle_is_refused_never_cut(tmp_path):
    path = tmp_path / "archive.jsonl.gz"
    record = Record()
    export = start(path, record)
    batch(export, record, lines(0))
    batch(export, record, lines(3))
    export.close()
    raw = bytearray(path.read_bytes())
    raw[12:20] = b"\xff" * 8  # inside the first member's deflate data
    path.write_bytes(bytes(raw))
    with pytest.raises(StateError, match="the gzip data after byte 0 is damaged"):
        start(path, Record())
    assert path.read_bytes() == bytes(raw)


def test_each_batch_is_a_gzip_member_of_its_own(tmp_path):
    path = tmp_path / "archive.jsonl.gz"
    record = Record()
    export = start(path, record)
    sizes = [len(batch(export, record, lines(n))) for n in (0, 3, 6)]
    export.close()
    raw = path.read_bytes()
    assert len(raw) == sum(sizes)
    assert gzip.decompress(raw[: sizes[0]]).decode().splitlines() == lines(0)
    assert gzip.decompress(raw[sizes[0] :]).decode().splitlines() == lines(3, 6)


# --- within a run: a failed batch cut off at once, or settled by the database ---------------


def test_a_batch_that_failed_is_cut_off_at_once(path):
    record = Record()
    export = start(path, record)
    batch(export, record, lines(0))
    committed = path.read_bytes()
    batch(export, record, lines(3), commit=False)
    assert export.undo()
    assert path.read_bytes() == committed
    batch(export, record, lines(3))  # tried again: appended once
    export.close()
    assert read(path) == lines(0, 6)


@pytest.mark.parametrize("outcome", ["committed", "rolled back", "unknown"])
def test_a_batch_interrupted_during_its_commit_is_settled_by_what_the_database_says(path, outcome):
    record = Record()
    export = start(path, record)
    batch(export, record, lines(0))
    committed = path.read_bytes()
    data = batch(export, record, lines(3), commit=False)
    export.settle(
        {"committed": len(committed) + len(data), "rolled back": len(committed), "unknown": None}[outcome]
    )
    expected = {"committed": lines(0, 6), "rolled back": lines(0), "unknown": lines(0, 6)}[outcome]
    assert read(path) == expected
    assert export.end == (len(committed) + len(data) if outcome == "committed" else len(committed))
    export.close()


def test_the_audit_row_identifies_the_file_by_its_length_and_last_bytes(path):
    record = Record()
    export = start(path, record)
    batch(export, record, lines(0, count=10))
    export.close()
    raw = path.read_bytes()
    assert record.committed == len(raw)
    assert record.tail == hashlib.sha256(raw[-64:]).hexdigest()
    again = ExportFile(path)
    assert again.identity == {"export_path": str(path.resolve())}
    again.close()


# --- the target -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["archive.json", "archive.csv", "archive.gz", "archive.jsonl.bz2"])
def test_only_jsonl_and_jsonl_gz_are_written(tmp_path, name):
    with pytest.raises(UsageError, match=r"must end in \.jsonl or \.jsonl\.gz"):
        check_export(tmp_path / name)


def test_a_fifo_or_a_directory_is_refused_before_anything_starts(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    with pytest.raises(UsageError, match="is a FIFO"):
        ExportFile(fifo)
    with pytest.raises(UsageError, match="is a directory"):
        check_export(folder)
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "target.jsonl")
    check_export(link)  # a symbolic link to a new (or regular) file is fine
