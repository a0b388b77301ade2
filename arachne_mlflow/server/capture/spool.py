"""One model's spool directory: segment files, the newest open for appends (protocol/capture_format.py).

Only the server's user may read it: the directories are 0700 and the files 0600, whatever the
umask. Opening a spool cuts a torn tail off its open segment (a writer killed mid-record), so new
records follow the last whole one. Rolling fsyncs and closes the open segment and creates the next,
empty one at once: every segment but the newest is closed, and closed segments never change. A
lock serialises the writer thread's appends with the routes' rollover and delete.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from arachne_mlflow.errors import ConflictError, ModelNotFoundError
from arachne_mlflow.protocol import capture_format
from arachne_mlflow.protocol.capture_format import HEADER, segment_name, segment_sequence
from arachne_mlflow.server.records import sync_directory

_logger = logging.getLogger(__name__)
DIR_MODE = 0o700
MAX_WRITE_PARTS = 512  # buffers per writev (the system's limit is 1024 or more)
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """`path` created if missing, and made 0700 (its parents are left as they are)."""
    path.mkdir(mode=DIR_MODE, exist_ok=True)
    os.chmod(path, DIR_MODE)
    return path


class Spool:
    """The segments of one model's spool, appended to by one writer."""

    def __init__(self, directory: Path) -> None:
        self.directory = private_dir(directory)
        self.lock = threading.Lock()
        self._fd = -1
        self._open_name = ""
        self.open_bytes = 0  # size of the open segment
        self.closed_bytes = 0  # sizes of the closed segments
        self.opened_at = time.monotonic()
        self.dirty = False  # appended to since the last fsync
        self._reopen()

    # -- writing (the writer thread, holding `lock`) ---------------------------------------
    def append(self, parts: list, size: int) -> None:
        """One record (`parts`, `size` bytes in all) at the end of the open segment, in one write."""
        if len(parts) > MAX_WRITE_PARTS:
            parts = [b"".join(parts)]
        written = os.writev(self._fd, parts)
        if written < size:  # (a regular file takes it whole, short of a full disk)
            rest = memoryview(b"".join(parts))
            while written < size:
                written += os.write(self._fd, rest[written:])
        self.open_bytes += size
        self.dirty = True

    def sync(self) -> None:
        if self.dirty:
            os.fsync(self._fd)
            self.dirty = False

    def roll(self) -> str | None:
        """Close the open segment if it holds records and open the next; the closed segment's name."""
        if self.open_bytes == 0:
            return None
        closed = self._open_name
        self.sync()
        os.close(self._fd)
        self._fd = -1
        self.closed_bytes += self.open_bytes
        self._create(segment_name(segment_sequence(closed) + 1))
        return closed

    def total_bytes(self) -> int:
        return self.closed_bytes + self.open_bytes

    def recount(self) -> None:
        """Read the closed segments' sizes from disk again (delivery may delete them directly)."""
        self.closed_bytes = sum(_size(path) for path in self.closed())

    def drop_oldest(self) -> int:
        """Delete the oldest closed segment; how many records it held (0 when there is none)."""
        closed = capture_format.closed_segments(self.directory)
        if not closed:
            return 0
        records = count_records(closed[0])
        self.delete(closed[0])
        return records

    def delete(self, path: Path) -> None:
        """Remove a closed segment (delivered, or over the budget)."""
        size = _size(path)
        path.unlink(missing_ok=True)
        self.closed_bytes = max(0, self.closed_bytes - size)

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1

    # -- reading (the routes) --------------------------------------------------------------
    def closed(self) -> list[Path]:
        return capture_format.closed_segments(self.directory)

    def closed_segment(self, name: str) -> Path:
        """The closed segment called `name` (an allow-listed name); 404 if absent, 409 if it is the open one."""
        segment_sequence(name)
        if name == self._open_name:
            raise ConflictError(f"segment {name} is still open for appends: roll it over first")
        path = self.directory / name
        if not path.is_file():
            raise ModelNotFoundError(f"no closed capture segment {name} in this spool")
        return path

    # -- helpers ---------------------------------------------------------------------------
    def _reopen(self) -> None:
        found = capture_format.segments(self.directory)
        self.closed_bytes = sum(_size(path) for path in found[:-1])
        if not found:
            self._create(segment_name(1))
            return
        newest = found[-1]
        valid = capture_format.valid_length(newest)
        if valid < _size(newest):
            _logger.warning("capture segment %s: cutting a torn tail at byte %d", newest, valid)
            os.truncate(newest, valid)
        self._fd = _open_append(newest)
        self._open_name = newest.name
        self.open_bytes = valid

    def _create(self, name: str) -> None:
        self._fd = _open_append(self.directory / name)
        self._open_name = name
        self.open_bytes = 0
        self.opened_at = time.monotonic()
        sync_directory(self.directory)


def count_records(path: Path) -> int:
    """How many whole records a segment holds (headers read, payloads skipped)."""
    count = 0
    size = _size(path)
    with open(path, "rb") as stream:
        while True:
            head = stream.read(HEADER.size)
            if len(head) < HEADER.size:
                return count
            _magic, length, _crc = HEADER.unpack(head)
            if stream.tell() + length > size:
                return count
            stream.seek(length, os.SEEK_CUR)
            count += 1


def _open_append(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
