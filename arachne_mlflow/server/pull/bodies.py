"""Bodies of the tracking server's answers, read within bounds: a read returns what has arrived (however
little) and the total deadline and the follower's stop are checked after each (`deadline_http`), the size
is capped, only uncompressed bodies are taken, and a file download resumes where a dropped link stopped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import requests
import urllib3

from arachne_mlflow.errors import RegistryError, RegistryUnavailableError, UnsafeArchiveError
from arachne_mlflow.server.pull.deadline_http import Deadline

_CHUNK = 1 << 16  # the most one read takes (a read returns what has arrived, however little)
_IDENTITY = ("", "identity")  # the only content encoding taken (asked for with Accept-Encoding: identity)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


def response_range(response: requests.Response, have: int) -> tuple[int | None, int | None]:
    """Where the body starts in the file and the file's size (None if unknown); offset None: restart."""
    if response.status_code == 416:
        return None, None
    if response.status_code == 206:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != have:
            return None, None
        return have, int(match.group(3))
    length = response.headers.get("Content-Length", "")
    return 0, int(length) if length.isdigit() else None


def write_body(
    response: requests.Response, partial: Path, offset: int, path: str, max_bytes: int, bounds: Deadline
) -> int:
    """Append the body to `partial` from `offset`; the file's size afterwards. A broken link keeps what arrived."""
    size = offset
    with open(partial, "ab" if offset else "wb") as file:
        for chunk in body_chunks(response, bounds, f"the download of {path!r}"):
            size += len(chunk)
            if size > max_bytes:
                file.close()
                partial.unlink(missing_ok=True)
                raise UnsafeArchiveError(f"file {path!r} is over the limit of {max_bytes} bytes")
            file.write(chunk)
    return size


def read_capped(response: requests.Response, limit: int, route: str, bounds: Deadline) -> bytes:
    chunks, size = [], 0
    for chunk in body_chunks(response, bounds, f"{route}: the answer"):
        size += len(chunk)
        if size > limit:
            raise RegistryError(f"{route}: the tracking server's answer is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def body_chunks(response: requests.Response, bounds: Deadline, what: str) -> Iterator[bytes]:
    """The body as it arrives, each read returning what has come (however little), the bounds checked after each."""
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in _IDENTITY:
        raise RegistryError(f"{what} came encoded as {encoding[:40]!r}; only identity was asked for")
    while True:
        try:
            chunk = response.raw.read1(_CHUNK, decode_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as err:
            if bounds.check() is not None:
                raise expired(bounds, what) from err
            raise RegistryUnavailableError(f"{what}: the link dropped: {reason(err)} (resumed next time)") from err
        if bounds.check() is not None:  # (a cut link may look like a body's end)
            raise expired(bounds, what)
        if not chunk:
            return
        yield chunk


def expired(bounds: Deadline, what: str) -> RegistryUnavailableError:
    if bounds.expired == "stop":
        return RegistryUnavailableError(f"{what} was interrupted: the server is stopping")
    return RegistryUnavailableError(f"{what} ran out of time (tried again at the next check)")


def reason(err: BaseException) -> str:
    """The innermost cause of a requests error (`ConnectionRefusedError: ...`), not urllib3's wrappers of it."""
    inner = err.args[0] if err.args and isinstance(err.args[0], BaseException) else err
    inner = getattr(inner, "reason", None) or inner
    while inner.__cause__ is not None:
        inner = inner.__cause__
    return f"{type(inner).__name__}: {inner}"
