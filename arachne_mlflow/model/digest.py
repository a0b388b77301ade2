"""A content digest of a model's files, computed the same way by the client and the device server.

The client compares its digest with the one the server stored to skip uploading a model the
server already has; names and sizes are hashed too, so renaming a file changes the digest.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20


def files_digest(root: str | os.PathLike, names: Iterable[str]) -> str:
    """`sha256:<hex>` over the files `names` (relative to `root`), in sorted order."""
    root = Path(root)
    digest = hashlib.sha256()
    for name in sorted(set(names)):
        path = root / name
        digest.update(name.encode() + b"\0" + path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class FileHashes:
    """`files_digest` of some files and each file's own sha256 (hex), from one read of each file."""

    digest: str
    sha256: dict[str, str]


def hash_files(root: str | os.PathLike, names: Iterable[str]) -> FileHashes:
    """`files_digest` and each file's sha256 in one pass: a signed model's install reads its files once."""
    root = Path(root)
    digest = hashlib.sha256()
    each = {}
    for name in sorted(set(names)):
        path = root / name
        digest.update(name.encode() + b"\0" + path.stat().st_size.to_bytes(8, "little"))
        own = hashlib.sha256()
        with open(path, "rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
                own.update(chunk)
        each[name] = own.hexdigest()
    return FileHashes("sha256:" + digest.hexdigest(), each)


def tree_files(root: str | os.PathLike) -> list[str]:
    """Every regular file under `root`, as sorted relative POSIX paths."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.is_symlink())
