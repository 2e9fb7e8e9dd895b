"""The export file protocol: ``archive --export FILE.jsonl[.gz]``.

The file holds every conversation the run moved, once, and nothing else, whatever stops
the run and whenever. This module is the file's side of the protocol (what is appended,
what identifies the file, what is cut back and when); the database's side is the run's
audit row (``chatdb.lifecycle.audit``), and a batch's use of both is
``chatdb.lifecycle.export_session``. See docs/architecture.md, "The export file"."""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import zlib
from pathlib import Path
from typing import Any

from chatdb.errors import StateError, UsageError

TAIL_BYTES = 64  # the export's last bytes, hashed in the audit row, identify the file

_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def check_export(path: Path) -> None:
    """Refuse an ``--export`` target that is not named FILE.jsonl or FILE.jsonl.gz, or that
    exists and is not a regular file (a symbolic link to one is fine): a FIFO would block
    the run, and a device cannot be cut back to what the database committed. A new file
    needs a folder chatdb may write in. Checked before anything starts, a dry run too."""
    name = path.name.lower()
    if not (name.endswith(".jsonl") or name.endswith(".jsonl.gz")):
        raise UsageError(f"--export {path}: the file name must end in .jsonl or .jsonl.gz")
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        folder = path.parent
        if not folder.is_dir():
            problem = "is not a folder" if folder.exists() else "does not exist"
            raise UsageError(f"cannot write --export {path}: {folder} {problem}") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write --export {path}: chatdb may not write in {folder}") from None
        return  # a new file
    except OSError as exc:
        raise UsageError(f"cannot write --export {path}: {exc.strerror}") from None
    _check_regular(path, mode)


def _check_regular(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise UsageError(f"--export {path} is {kind}: give a regular file or a new path")


class ExportFile:
    """Moved conversations as JSON lines, one per conversation with its messages, in
    ``.jsonl`` or ``.jsonl.gz``, in a regular file. Each batch is appended (a gzip member
    of its own) and fsynced before the batch commits, and the batch's transaction records
    in the run's audit row how long the file is with it and a hash of its last bytes.
    Before the lines reach the file, the run records durably, in a transaction of its
    own, what it is about to append (``intent``): so the database always knows the
    file's committed length and what may follow it. A run that does not learn whether a
    batch committed (interrupted during its COMMIT) waits for the database to tell; when
    it cannot (SIGKILL, a crash of the server or of chatdb, a lost connection), the next
    run exporting to the same file cuts it back to the length the database committed,
    before it appends anything, if what follows is provably that batch (see ``repair``)."""

    def __init__(self, path: Path) -> None:
        check_export(path)
        self.path = path
        self.compressed = path.name.lower().endswith(".gz")
        try:
            # Opening changes nothing in the file: it is cut back only under the guard.
            # Non-blocking: a FIFO put in its place meanwhile fails or is refused below,
            # never waits for a reader. Unbuffered: a failed write leaves nothing behind
            # to be written later.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666)
        except OSError as exc:
            raise UsageError(f"cannot write --export {path}: {exc.strerror}") from None
        try:
            _check_regular(path, os.fstat(fd).st_mode)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        self.file = open(fd, "ab", buffering=0)  # noqa: SIM115 - open for the whole run
        self.identity = {"export_path": str(path.resolve())}
        self.end = 0  # the file's length with every batch known to have committed (see repair)
        self.tail = b""  # its last bytes, which identify it
        self.pending = b""  # the batch being written, after ``end``

    def repair(self, committed: int | None, tail: str | None, intent: dict[str, Any] | None) -> None:
        """Cut off what no committed batch wrote. ``committed`` and ``tail`` are the length
        of this file and the hash of its last bytes that the last run exporting to this
        path recorded (None: no run did), ``intent`` what that run recorded it was about
        to append after them (None: nothing). Runs under the guard: no other run appends
        meanwhile."""
        size = os.fstat(self.file.fileno()).st_size
        length = kept_length(self.path, size, committed, tail, intent)
        if length < size:
            self.file.truncate(length)
            os.fsync(self.file.fileno())
        self.end = length
        self.tail = _read_tail(self.path, length)

    def recorded(self, data: bytes) -> dict[str, Any]:
        """What the audit row records of the file once ``data`` is appended."""
        tail = (self.tail + data)[-TAIL_BYTES:]
        return {"export_bytes": self.end + len(data), "export_tail": _hash(tail)}

    def intent(self, data: bytes) -> dict[str, Any]:
        """What the audit row records, before ``data`` reaches the file, of what is about
        to follow the committed length: where it starts, its length, and hashes of its
        first bytes and of all of it."""
        return {
            "at": self.end,
            "bytes": len(data),
            "head": _hash(data[:TAIL_BYTES]),
            "hash": _hash(data),
        }

    def encode(self, lines: list[str]) -> bytes:
        data = "".join(line + "\n" for line in lines).encode()
        return gzip.compress(data, compresslevel=6, mtime=0) if self.compressed else data

    def write(self, data: bytes) -> None:
        """Append a batch's lines, after ``end``, durably."""
        self.pending = data
        view = memoryview(data)
        try:
            while view:
                view = view[self.file.write(view) :]
            os.fsync(self.file.fileno())
        except OSError as exc:
            raise StateError(
                f"cannot write --export {self.path}: {exc.strerror}",
                hint="the batch in flight rolled back; run the command again once the file can be written",
            ) from None

    def committed(self) -> None:
        """The batch just written committed."""
        self.end += len(self.pending)
        self.tail = (self.tail + self.pending)[-TAIL_BYTES:]
        self.pending = b""

    def undo(self) -> bool:
        """The batch being written did not commit: cut off whatever of it reached the file.
        False when the file cannot be cut (the error that stopped the batch is the one to
        report): the lines stay after the committed length, and the next run exporting
        to this file cuts them off, as the run recorded them (see ``intent``)."""
        try:
            self.file.truncate(self.end)
            os.fsync(self.file.fileno())
        except OSError:
            return False
        self.pending = b""
        return True

    def settle(self, committed: int | None) -> None:
        """The database says the file is ``committed`` bytes long with the batches that
        committed: keep the batch being written, or cut it off."""
        if committed == self.end + len(self.pending):
            self.committed()
        elif committed == self.end:
            self.undo()

    def close(self) -> None:
        self.file.close()


def kept_length(
    path: Path, size: int, committed: int | None, tail: str | None, intent: dict[str, Any] | None
) -> int:
    """How much of the export file at ``path``, ``size`` bytes long, a run keeps before it
    appends (``ExportFile.repair``, whose arguments these are); a StateError when it
    refuses the file. Reads the file, changes nothing: ``archive --dry-run`` asks it too."""
    # The file as that run left it committed (its bytes up to there end as recorded, an
    # empty start included), followed by nothing, or by the batch it was about to append,
    # whole or cut short, and nothing else: provably bytes of a batch that never
    # committed, which go. Anything else is not the file that run wrote.
    if committed is not None and committed <= size and _hash(_read_tail(path, committed)) == tail:
        written = _written(path, committed, size, intent)
        if committed + written == size:
            return committed
        if written:
            raise StateError(
                f"--export {path}: bytes {committed:,} to {committed + written:,} are the lines"
                " of a batch that never committed, and more follows them; chatdb cuts a file back"
                " only at its end",
                hint="remove those bytes from the file, or export to a new file",
            )
    # Not a file the database knows an unfinished run of: keep every complete line, cut
    # off only an incomplete tail.
    return complete_length(path, size, path.name.lower().endswith(".gz"))


def _read_tail(path: Path, length: int) -> bytes:
    with open(path, "rb") as existing:
        existing.seek(max(0, length - TAIL_BYTES))
        return existing.read(length - max(0, length - TAIL_BYTES))


def _written(path: Path, offset: int, size: int, intent: dict[str, Any] | None) -> int:
    """How many bytes after ``offset`` are provably (the start of) the batch that
    ``intent`` describes: all of it, or its first bytes and what followed of it before a
    write was cut short. 0 when they are not."""
    if not intent or intent.get("at") != offset:
        return 0
    total = int(intent["bytes"])
    length = min(size - offset, total)
    head = min(TAIL_BYTES, total)
    if length < head:
        return 0  # too short to tell: an incomplete line, which goes anyway
    with open(path, "rb") as existing:
        existing.seek(offset)
        start = existing.read(head)
        if _hash(start) != intent["head"]:
            return 0
        if length < total:
            return length  # a write cut short
        digest = hashlib.sha256(start)
        while chunk := existing.read(min(1 << 20, offset + total - existing.tell())):
            digest.update(chunk)
    return length if digest.hexdigest() == intent["hash"] else 0


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def complete_length(path: Path, size: int, compressed: bool) -> int:
    """The length of the complete part of a file ``size`` bytes long: up to the end of
    its last complete line in ``.jsonl``, of its last complete gzip member in ``.gz``.
    Damaged gzip data before the end is refused, never cut."""
    with open(path, "rb") as existing:
        if not compressed:
            # The end of the last complete line, read backwards from the end.
            position = size
            while position > 0:
                start = max(0, position - (1 << 20))
                existing.seek(start)
                newline = existing.read(position - start).rfind(b"\n")
                if newline >= 0:
                    return start + newline + 1
                position = start
            return 0
        good = position = 0
        decompressor = zlib.decompressobj(31)
        pending = b""
        while True:
            chunk = pending or existing.read(1 << 20)
            pending = b""
            if not chunk:
                return good  # an incomplete last member (or none) is cut off
            try:
                decompressor.decompress(chunk)
            except zlib.error:
                raise StateError(
                    f"--export {path}: the gzip data after byte {good:,} is damaged;"
                    " chatdb appends only to an intact file",
                    hint="export to a new file",
                ) from None
            position += len(chunk) - len(decompressor.unused_data)
            if decompressor.eof:
                good = position
                pending = decompressor.unused_data
                decompressor = zlib.decompressobj(31)
