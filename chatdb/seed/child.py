"""The generator process: runs the row generator in a forked child, and hands its chunks
to the parent through a pipe, each framed by its length and the rows so far."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
from collections.abc import Iterator

_FRAME = struct.Struct("<QQ")  # payload length, rows so far
_END = (1 << 64) - 1  # the length that marks the end of the stream


def in_child(chunks: Iterator[tuple[bytes, int]]) -> Iterator[tuple[bytes, int]]:
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
