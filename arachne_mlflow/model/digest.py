"""A content digest of a model's files, computed the same way by the client and the device server.

The client compares its digest with the one the server stored to skip uploading a model the
server already has; names and sizes are hashed too, so renaming a file changes the digest.
The server's digest of a stored version (`tree_digest`) also covers its symbolic links (their
targets), so "the same digest" means the loader would read exactly the same bytes; for a tree
without links it equals the client's `files_digest` of the same files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
# In place of a size: no regular file has it, so a link's entry cannot read as a file's.
_LINK = b"\xff" * 8


def files_digest(root: str | os.PathLike, names: Iterable[str]) -> str:
    """`sha256:<hex>` over the files `names` (relative to `root`, links followed), in sorted order."""
    root = Path(root)
    digest = hashlib.sha256()
    for name in sorted(set(names)):
        _add_file(digest, root / name, name)
    return "sha256:" + digest.hexdigest()


def tree_digest(root: str | os.PathLike) -> str:
    """`sha256:<hex>` over every regular file and symbolic link under `root` (links not followed).

    A link adds its name and its target; what it points to is hashed under its own name (a stored
    version's links stay inside it), so two trees with equal digests load the same bytes.
    """
    root = Path(root)
    digest = hashlib.sha256()
    for name, is_link in _tree_entries(root):
        if is_link:
            target = os.fsencode(os.readlink(root / name))
            digest.update(name.encode() + b"\0" + _LINK + len(target).to_bytes(8, "little") + target)
        else:
            _add_file(digest, root / name, name)
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
    """Every regular file under `root`, as sorted relative POSIX paths (links not followed)."""
    return [name for name, is_link in _tree_entries(Path(root)) if not is_link]


def _tree_entries(root: Path) -> list[tuple[str, bool]]:
    """(relative POSIX path, is a symbolic link) of every regular file and link under `root`, sorted."""
    found = []
    for folder, directories, files in os.walk(root):  # does not descend into linked directories
        for entry in (*directories, *files):
            path = Path(folder, entry)
            if path.is_symlink() or (entry in files and path.is_file()):
                found.append((path.relative_to(root).as_posix(), path.is_symlink()))
    return sorted(found)


def _add_file(digest: Any, path: Path, name: str) -> None:
    digest.update(name.encode() + b"\0" + path.stat().st_size.to_bytes(8, "little"))
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
