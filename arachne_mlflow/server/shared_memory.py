"""System shared memory (Triton's extension): the regions a co-located client registered, by name.

A region names a POSIX shared memory object (`/name`, a file of /dev/shm) and a span of it. Only
such objects can be named: the key is allow-listed (a leading "/", then letters, digits, ".", "_",
"-"; no other slash, not "." or ".."), opened without following a symbolic link, and must be a
regular file. Only loopback peers may register (a region is only useful to a client on this
machine), and the server holds at most `max_regions` regions of at most `max_bytes` in all; the
extension is off while `max_regions` is 0.

Tensors are copied with `preadv`/`pwritev` on the object's descriptor, not through a mapping: an
owner that shrinks the object mid-request makes a read come up short (an error), where an access
to a mapping past the object's end would kill the server with SIGBUS. Before every copy the span is
checked against the region, the object's current size (`fstat`) and its name (an object its owner
removed or replaced is refused).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from arachne_mlflow.errors import ArachneError, InvalidInputError
from arachne_mlflow.protocol.shared_memory import RestMessage

SHM_DIRECTORY = "/dev/shm"
#: What `GET /v2` lists while the extension is on: Triton's name, and the name this project gives it.
EXTENSIONS = ["system_shared_memory", "shared_memory"]
_KEY = re.compile(r"/[A-Za-z0-9._-]{1,240}")
_NAME = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_MAX_INT = 2**63 - 1


class SharedMemoryError(InvalidInputError):
    """A region that cannot be registered or used (unknown, out of bounds, changed by its owner)."""


class SharedMemoryForbiddenError(ArachneError):
    """Shared memory is off, or asked for by a peer that is not on this machine."""

    status_code = 403


@dataclass
class _Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    writable: bool
    identity: tuple[int, int]  # (st_dev, st_ino) of the object when registered
    users: int = 0
    unregistered: bool = False


class SharedMemoryRegistry:
    """The registered regions; thread-safe (tensors are copied in the dataplane's threads)."""

    def __init__(self, max_regions: int = 0, max_bytes: int = 1024**3, directory: str = SHM_DIRECTORY):
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.directory = directory
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_regions > 0

    # -- registration ------------------------------------------------------------------------
    def register(self, name: Any, key: Any, offset: Any, byte_size: Any, peer: str | None) -> None:
        """Register `byte_size` bytes at `offset` of the object `key` as region `name`, for a client at `peer`."""
        self.check_allowed(peer)
        name, key = _checked_name(name), _checked_key(key)
        offset, byte_size = _checked_int("offset", offset), _checked_int("byte_size", byte_size)
        if byte_size == 0:
            raise SharedMemoryError("byte_size must be positive")
        fd, writable = self._open(key)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SharedMemoryError(f"{key!r} is not a shared memory object")
            if offset + byte_size > info.st_size:
                raise SharedMemoryError(
                    f"offset {offset} + byte_size {byte_size} runs past the end of {key!r} ({info.st_size} bytes)"
                )
            region = _Region(name, key, offset, byte_size, fd, writable, (info.st_dev, info.st_ino))
            self._add(region)
        except BaseException:
            os.close(fd)
            raise

    def _open(self, key: str) -> tuple[int, bool]:
        path = os.path.join(self.directory, key[1:])
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0)  # (a FIFO must not block the open)
        try:
            try:
                return os.open(path, os.O_RDWR | flags), True
            except PermissionError:
                return os.open(path, os.O_RDONLY | flags), False  # inputs only
        except FileNotFoundError as err:
            raise SharedMemoryError(f"no shared memory object {key!r}: create it before registering it") from err
        except OSError as err:
            raise SharedMemoryError(f"cannot open shared memory object {key!r}: {err.strerror}") from err

    def _add(self, region: _Region) -> None:
        with self._lock:
            if region.name in self._regions:
                raise SharedMemoryError(f"a region named {region.name!r} is already registered")
            if len(self._regions) >= self.max_regions:
                raise SharedMemoryError(f"the server holds at most {self.max_regions} shared memory regions")
            held = sum(r.byte_size for r in self._regions.values())
            if held + region.byte_size > self.max_bytes:
                raise SharedMemoryError(
                    f"registering {region.byte_size} bytes would pass the server's {self.max_bytes} bytes of "
                    f"shared memory ({held} registered)"
                )
            self._regions[region.name] = region

    def unregister(self, name: str | None = None) -> None:
        """Forget region `name` (unknown names are ignored, as Triton does), or every region; a region in
        use is closed when its last request is done with it."""
        with self._lock:
            names = list(self._regions) if name is None else [name] if name in self._regions else []
            for each in names:
                region = self._regions.pop(each)
                region.unregistered = True
                if region.users == 0:
                    os.close(region.fd)

    def close(self) -> None:
        """At shut-down: every region's descriptor closed."""
        self.unregister()

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            if name is not None and name not in self._regions:
                raise SharedMemoryError(f"no shared memory region named {name!r} is registered")
            regions = [self._regions[name]] if name is not None else list(self._regions.values())
            return [{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size} for r in regions]

    def check_enabled(self) -> None:
        if not self.enabled:
            raise SharedMemoryForbiddenError("system shared memory is off on this server (--shm-regions)")

    def check_allowed(self, peer: str | None) -> None:
        """Refuse unless the extension is on and `peer` (an address, or "unix") is on this machine."""
        self.check_enabled()
        if not _is_local(peer):
            raise SharedMemoryForbiddenError(f"shared memory regions are registered from this machine only, not {peer}")

    # -- tensors -----------------------------------------------------------------------------
    def rest_message(self, body: bytes, header_length: str | bytes | None) -> RestMessage:
        """A REST infer request that names regions, ready for the dataplane (refused while the extension is off)."""
        self.check_enabled()
        return RestMessage(body, header_length, self)

    def check_span(self, name: str, offset: int, byte_size: int) -> None:
        """Refuse a span that the region (or its object, now) does not hold: before memory is set aside for it."""
        with self._use(name, offset, byte_size, write=False):
            pass

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        """Fill `out` (a writable byte view) from region `name` at `offset`."""
        with self._use(name, offset, len(out), write=False) as (region, position):
            _read(region, position, out)

    def read(self, name: str, offset: int, byte_size: int) -> bytes:
        with self._use(name, offset, byte_size, write=False) as (region, position):
            buffer = bytearray(byte_size)  # (once the span is known to be in the region)
            _read(region, position, memoryview(buffer))
        return bytes(buffer)

    def write(self, name: str, offset: int, data: memoryview) -> None:
        """Write `data` into region `name` at `offset`."""
        with self._use(name, offset, len(data), write=True) as (region, position):
            done = 0
            while done < len(data):
                done += os.pwritev(region.fd, [data[done:]], position + done)

    @contextmanager
    def _use(self, name: str, offset: int, size: int, write: bool) -> Iterator[tuple[_Region, int]]:
        """The region, held open, and the object's position of `offset`, once the span is checked."""
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise SharedMemoryError(f"no shared memory region named {name!r} is registered")
            region.users += 1
        try:
            yield region, self._check_span(region, offset, size, write)
        finally:
            with self._lock:
                region.users -= 1
                if region.unregistered and region.users == 0:
                    os.close(region.fd)

    def _check_span(self, region: _Region, offset: int, size: int, write: bool) -> int:
        if write and not region.writable:
            raise SharedMemoryError(f"shared memory region {region.name!r} is read-only to the server")
        if offset + size > region.byte_size:
            raise SharedMemoryError(
                f"offset {offset} + byte_size {size} runs past the end of shared memory region {region.name!r} "
                f"({region.byte_size} bytes)"
            )
        position = region.offset + offset
        try:
            named = os.stat(os.path.join(self.directory, region.key[1:]), follow_symlinks=False)
        except FileNotFoundError as err:
            raise SharedMemoryError(
                f"the shared memory object {region.key!r} of region {region.name!r} was removed by its owner"
            ) from err
        if (named.st_dev, named.st_ino) != region.identity:
            raise SharedMemoryError(
                f"the shared memory object {region.key!r} of region {region.name!r} was replaced by another"
            )
        current = os.fstat(region.fd).st_size
        if position + size > current:
            raise SharedMemoryError(
                f"the shared memory object {region.key!r} of region {region.name!r} is now {current} bytes, "
                f"too small for {size} bytes at {position}"
            )
        return position


def _read(region: _Region, position: int, out: memoryview) -> None:
    done = 0
    while done < len(out):
        count = os.preadv(region.fd, [out[done:]], position + done)
        if count <= 0:
            raise SharedMemoryError(f"shared memory region {region.name!r} shrank while it was read")
        done += count


def _checked_name(name: Any) -> str:
    if type(name) is not str or not _NAME.fullmatch(name):
        raise SharedMemoryError(f"a region name is 1-128 letters, digits, '.', '_', ':', '-'; got {str(name)[:140]!r}")
    return name


def _checked_key(key: Any) -> str:
    """A POSIX shared memory name: "/" then allowed characters, nothing that names another directory."""
    if type(key) is not str or not _KEY.fullmatch(key) or key in ("/.", "/.."):
        raise SharedMemoryError(
            "the key must name a POSIX shared memory object: '/' then 1-240 letters, digits, '.', '_', '-'; "
            f"got {str(key)[:260]!r}"
        )
    return key


def _checked_int(what: str, value: Any) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_INT:
        raise SharedMemoryError(f"{what} must be a non-negative integer, got {str(value)[:40]!r}")
    return value


def _is_local(peer: str | None) -> bool:
    if peer is None:
        return False
    if peer == "unix":
        return True
    try:
        return ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return False


def grpc_peer_host(peer: str) -> str | None:
    """The host of a gRPC peer string (`ipv4:127.0.0.1:5`, `ipv6:[::1]:5`, `unix:...`)."""
    scheme, _, rest = unquote(peer).partition(":")
    if scheme == "unix":
        return "unix"
    if scheme == "ipv4":
        return rest.rpartition(":")[0]
    if scheme == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return None
