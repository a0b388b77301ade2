"""Safe tar extraction (legacy package import, device server uploads) and streamed tar creation (client uploads).

Extraction never calls `TarFile.extract`: it writes regular files, directories and symbolic
links itself, so it works the same on every Python this package supports, with or without the
`tarfile.data_filter` of Python 3.10.12 / 3.11.4 (Debian 12 and Raspberry Pi OS ship 3.11.2,
which lacks it). Every entry is checked before anything is written: no absolute paths, no `..`,
no links that leave the directory, no hard links, device files, FIFOs or sparse files, names
the file system can hold, a cap on the total size and the entry count. Files get the modes the
`data` filter gives them (no setuid, setgid or sticky bit, no write for group or others);
ownership and times in the archive are ignored.

tarfile holds an entry's extended headers (PAX records, GNU long names, sparse maps) in memory
while it reads them. So the archive is decompressed here, not by tarfile, and read through a
counting layer: the header bytes before each entry are capped at `MAX_HEADER_BYTES`, and the
decompressed stream at `max_bytes`, whatever the archive declares.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import gzip
import io
import lzma
import os
import posixpath
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from arachne_mlflow.errors import ArachneError, UnsafeArchiveError

DEFAULT_MAX_BYTES = 4 * 1024**3
DEFAULT_MAX_MEMBERS = 10_000
# Extended header data (PAX records, GNU long names and links) before one entry, and PAX global headers.
MAX_HEADER_BYTES = 64 * 1024
MAX_NAME_BYTES = 1024  # an entry's whole name (and a link's target)
MAX_PART_BYTES = 255  # one component of it (the file systems' NAME_MAX)
_BLOCK = 512
_CHUNK = 1 << 20
# tarfile reads its input a record at a time, so entry data can be read before the entry is seen.
_READ_AHEAD = 4 * tarfile.RECORDSIZE
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)
_COMPRESSIONS = (
    (b"\x1f\x8b", lambda file: gzip.GzipFile(fileobj=file, mode="rb")),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)
# What writing an entry that passed the checks can still meet, because of the entries before it.
_CONFLICTS = {
    errno.EEXIST: "is given twice, or both as a file and as a directory",
    errno.EISDIR: "is given twice, or both as a file and as a directory",
    errno.ENOTDIR: "lies under a name that is a file, not a directory",
    errno.ELOOP: "goes through a loop of symbolic links",
    errno.ENAMETOOLONG: "is too long for the file system",
}


def safe_extract(
    source: str | os.PathLike | BinaryIO,
    dest: str | os.PathLike,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> list[str]:
    """Extract a (possibly gzip, bzip2 or xz compressed) tar into `dest`, streaming; return the entry names.

    `source` is a path or a readable binary stream (read once, front to back). Raises
    `UnsafeArchiveError` on the first entry that is unsafe or over a limit; what was already
    written stays in `dest`, which the caller owns and removes.
    """
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    names: list[str] = []
    with contextlib.ExitStack() as stack:
        if isinstance(source, (str, os.PathLike)):
            source = stack.enter_context(open(source, "rb"))
        stream = _TarStream(source, max_bytes)
        try:
            tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|"))
            for member in tar:
                if member.size < 0:
                    raise UnsafeArchiveError(f"archive entry {member.name[:200]!r} has a negative size")
                stream.entry(member)
                if len(names) >= max_members:
                    raise UnsafeArchiveError(f"archive has more than {max_members} entries")
                if sum(len(k) + len(v) for k, v in tar.pax_headers.items()) > MAX_HEADER_BYTES:
                    raise UnsafeArchiveError(f"archive's PAX global headers exceed {MAX_HEADER_BYTES} bytes")
                name = _checked_name(member, dest)
                total += member.size
                if total > max_bytes:
                    raise UnsafeArchiveError(f"archive content exceeds the limit of {max_bytes} bytes")
                _write(tar, member, dest, name)
                names.append(member.name)
        except ArachneError:
            raise
        except (tarfile.TarError, ValueError) as err:  # tarfile raises ValueError for some malformed headers
            raise UnsafeArchiveError(f"not a readable tar archive: {err}") from err
        except EOFError as err:
            raise UnsafeArchiveError(f"archive is truncated: {err}") from err
    _check_links(dest)
    return names


class _TarStream:
    """The uncompressed tar that tarfile reads, counted as it goes.

    Bytes that are not the data of an entry already read count as header bytes until the next
    entry begins (`entry`): PAX and GNU extension headers, sparse maps, the header blocks
    themselves. A header that declares gigabytes is refused after `MAX_HEADER_BYTES`, while
    tarfile is still reading it.
    """

    def __init__(self, source: BinaryIO, max_bytes: int):
        self._source = _decompressed(source)
        self._max_bytes = max_bytes
        self._read = 0
        self._data = 0  # bytes of entry data announced and not read yet
        self._header = 0  # other bytes read since the last entry began

    def entry(self, member: tarfile.TarInfo) -> None:
        """Account for `member`: its data (and padding) is what tarfile reads next."""
        self._header = 0
        if member.isreg():
            self._data += -(-member.size // _BLOCK) * _BLOCK

    def read(self, size: int = -1) -> bytes:
        try:
            chunk = self._source.read1(size if size > 0 else _CHUNK)
        except ArachneError:  # the upload's own limits (size, stall)
            raise
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as err:
            raise UnsafeArchiveError(f"archive's compressed data is corrupt: {err}") from err
        self._read += len(chunk)
        if self._read > self._max_bytes:
            raise UnsafeArchiveError(f"archive exceeds the limit of {self._max_bytes} bytes once decompressed")
        data = min(len(chunk), self._data)
        self._data -= data
        self._header += len(chunk) - data
        if self._header > MAX_HEADER_BYTES + _READ_AHEAD:
            raise UnsafeArchiveError(
                f"archive entry headers (PAX records, GNU long names, sparse maps) exceed {MAX_HEADER_BYTES} bytes"
            )
        return chunk


def _decompressed(source: BinaryIO) -> BinaryIO:
    """`source`, or a decompressing reader over it when it starts with a gzip, bzip2 or xz header."""
    if not hasattr(source, "peek"):
        source = io.BufferedReader(source)  # type: ignore[arg-type]
    magic = source.peek(6)[:6]
    for prefix, opener in _COMPRESSIONS:
        if magic.startswith(prefix):
            return opener(source)
    return source


def _checked_name(member: tarfile.TarInfo, dest: Path) -> str:
    """The entry's name, normalized, once the entry is known to be safe to write under `dest`."""
    name = member.name
    if not name or "\0" in name:
        raise UnsafeArchiveError(f"archive entry {name!r} has an empty name or a NUL byte in it")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"archive entry {name!r} has an absolute path")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise UnsafeArchiveError(f"archive entry {name!r} contains '..'")
    if len(os.fsencode(name)) > MAX_NAME_BYTES or any(len(os.fsencode(part)) > MAX_PART_BYTES for part in parts):
        raise UnsafeArchiveError(
            f"archive entry {name[:80]!r}... has a name over {MAX_NAME_BYTES} bytes or a component over "
            f"{MAX_PART_BYTES} bytes"
        )
    if member.islnk():
        raise UnsafeArchiveError(
            f"archive entry {name!r} is a hard link ({member.linkname!r}): model directories need none; "
            "archive the file itself"
        )
    if not ((member.type in _FILE_TYPES and not member.issparse()) or member.isdir() or member.issym()):
        raise UnsafeArchiveError(f"archive entry {name!r} is a device file, FIFO, sparse file or other special file")
    name = posixpath.normpath(name)
    target = Path(os.path.realpath(dest / name))
    if not _inside(target, dest):
        raise UnsafeArchiveError(f"archive entry {name!r} would be written outside the directory")
    if member.issym():
        link = member.linkname
        if not link or "\0" in link or os.path.isabs(link) or len(os.fsencode(link)) > MAX_NAME_BYTES:
            raise UnsafeArchiveError(f"archive entry {name!r} links to an absolute, empty or too long path ({link!r})")
        if not _inside(Path(os.path.realpath(target.parent / link)), dest):
            raise UnsafeArchiveError(f"archive entry {name!r} links outside the directory ({link!r})")
    return name


def _write(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, name: str) -> None:
    """Write one checked entry; a clash with an earlier entry is the archive's fault (400), not the server's."""
    path = os.path.join(dest, name)
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if member.isdir():
            _make_directory(path)
        elif member.issym():
            os.symlink(member.linkname, path)
        else:
            _write_file(tar.extractfile(member), path, member.size, _file_mode(member.mode))
    except OSError as err:
        if err.errno not in _CONFLICTS:
            raise
        raise UnsafeArchiveError(f"archive entry {member.name[:200]!r} {_CONFLICTS[err.errno]}") from err


def _make_directory(path: str) -> None:
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        if os.path.islink(path) or not os.path.isdir(path):
            raise  # a directory entry may repeat; a file or link of the same name may not


def _write_file(source: BinaryIO | None, path: str, size: int, mode: int) -> None:
    """Copy `size` bytes to a new file at `path` (never through a link, never over another file)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with open(descriptor, "wb") as target:
        left = size
        while left:
            chunk = source.read(min(_CHUNK, left)) if source is not None else b""
            if not chunk:
                raise UnsafeArchiveError(f"archive is truncated inside {os.path.basename(path)!r}")
            target.write(chunk)
            left -= len(chunk)
        os.fchmod(target.fileno(), mode)


def _file_mode(mode: int) -> int:
    """The mode tarfile's `data` filter gives a regular file: owner read/write, no high bits, no group/other write."""
    mode &= 0o755
    if not mode & 0o100:
        mode &= ~0o111
    return mode | 0o600


def _check_links(dest: Path) -> None:
    """Every symlink, as extracted, must resolve to something inside `dest`.

    Each link was checked when it was written, but a later entry can change what an earlier
    link resolves to (`a -> x/..` is inside until `x -> .` arrives), so check the final tree.
    A link to nothing or into a loop is refused too: a model directory has no use for one.
    """
    for root, directories, files in os.walk(dest):  # does not descend into linked directories
        for entry in (*directories, *files):
            path = Path(root, entry)
            if not path.is_symlink():
                continue
            where = f"archive entry {path.relative_to(dest).as_posix()!r}"
            try:
                resolved = Path(os.path.realpath(path, strict=True))
            except OSError as err:
                raise UnsafeArchiveError(
                    f"{where} links to nothing or into a loop of links ({os.readlink(path)!r})"
                ) from err
            if not _inside(resolved, dest):
                raise UnsafeArchiveError(
                    f"{where} links outside the directory ({os.readlink(path)!r}, through links added later)"
                )


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def tar_size(root: str | os.PathLike, names: Iterable[str]) -> int:
    """The number of file bytes `stream_tar` sends (for a progress bar)."""
    return sum((Path(root) / name).stat().st_size for name in names)


def stream_tar(root: str | os.PathLike, names: Iterable[str]) -> Iterator[bytes]:
    """An uncompressed tar of the files `names` (relative to `root`), made chunk by chunk.

    Nothing is held whole in memory: each file is read in 1 MiB chunks as the consumer (an
    HTTP upload) asks for more. Links are followed, so the archive holds regular files only.
    """
    root = Path(root)
    for name in names:
        path = root / name
        size = path.stat().st_size
        info = tarfile.TarInfo(Path(name).as_posix())
        info.size, info.mode, info.mtime = size, 0o644, int(path.stat().st_mtime)
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        sent = 0
        with open(path, "rb") as file:
            while sent < size and (chunk := file.read(min(_CHUNK, size - sent))):
                sent += len(chunk)
                yield chunk
        if sent != size:
            raise OSError(f"{path} changed size while it was being sent")
        if size % _BLOCK:
            yield bytes(_BLOCK - size % _BLOCK)
    yield bytes(2 * _BLOCK)
