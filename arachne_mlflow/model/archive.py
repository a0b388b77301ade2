"""Safe tar extraction (legacy package import, device server uploads) and streamed tar creation (client uploads).

Every entry is checked before anything is written: no absolute paths, no `..`, no links that
leave the directory, no device files or FIFOs, and a cap on the total size and entry count, so
a hostile or broken archive is refused instead of writing outside the destination.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from arachne_mlflow.errors import UnsafeArchiveError

DEFAULT_MAX_BYTES = 4 * 1024**3
DEFAULT_MAX_MEMBERS = 10_000
_BLOCK = 512
_CHUNK = 1 << 20


def safe_extract(
    source: str | os.PathLike | BinaryIO,
    dest: str | os.PathLike,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> list[str]:
    """Extract a (possibly compressed) tar into `dest`, streaming; return the extracted names.

    `source` is a path or a readable binary stream (read once, front to back). Raises
    `UnsafeArchiveError` on the first entry that is unsafe or over a limit; what was already
    written stays in `dest`, which the caller owns and removes.
    """
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    names: list[str] = []
    try:
        if isinstance(source, (str, os.PathLike)):
            tar = tarfile.open(source, mode="r:*")
        else:
            tar = tarfile.open(fileobj=source, mode="r|*")
        with tar:
            for member in tar:
                if len(names) >= max_members:
                    raise UnsafeArchiveError(f"archive has more than {max_members} entries")
                _check_member(member, dest)
                total += member.size
                if total > max_bytes:
                    raise UnsafeArchiveError(f"archive content exceeds the limit of {max_bytes} bytes")
                tar.extract(member, dest, filter=_strict_filter)
                names.append(member.name)
    except tarfile.TarError as err:
        raise UnsafeArchiveError(f"not a readable tar archive: {err}") from err
    except EOFError as err:
        raise UnsafeArchiveError(f"archive is truncated: {err}") from err
    _check_links(dest)
    return names


def _check_member(member: tarfile.TarInfo, dest: Path) -> None:
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"archive entry {name!r} has an absolute path")
    if ".." in Path(name).parts:
        raise UnsafeArchiveError(f"archive entry {name!r} contains '..'")
    target = (dest / name).resolve()
    if not _inside(target, dest):
        raise UnsafeArchiveError(f"archive entry {name!r} would be written outside the directory")
    if member.issym() or member.islnk():
        base = target.parent if member.issym() else dest
        if os.path.isabs(member.linkname) or not _inside((base / member.linkname).resolve(), dest):
            raise UnsafeArchiveError(f"archive entry {name!r} links outside the directory ({member.linkname!r})")
    elif not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"archive entry {name!r} is a device file, FIFO or other special file")


def _check_links(dest: Path) -> None:
    """Every symlink, as extracted, must resolve inside `dest`.

    Each link was checked when it was written, but a later entry can change what an earlier
    link resolves to (`a -> x/..` is inside until `x -> .` arrives), so check the final tree.
    """
    for path in dest.rglob("*"):  # does not descend into linked directories
        if path.is_symlink() and not _inside(path.resolve(), dest):
            raise UnsafeArchiveError(
                f"archive entry {path.relative_to(dest).as_posix()!r} links outside the directory "
                f"({os.readlink(path)!r}, through links added later)"
            )


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _strict_filter(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
    """tarfile's own `data` filter on top of our checks (drops setuid bits and ownership)."""
    return tarfile.data_filter(member, path)


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
