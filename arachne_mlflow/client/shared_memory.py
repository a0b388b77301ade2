"""Inputs through system shared memory, for a client on the device server's own machine.

`DeviceClient(shared_memory=True)` (or `ARACHNE_SHARED_MEMORY=1`) with a loopback host: the
client creates one POSIX shared memory object of its own (`/arachne-<pid>-<random>`, mode 0600),
registers it with the server (Triton's system shared memory extension, `serve --shm-regions`),
writes each request's inputs into it and sends only their description; the outputs come back in
the answer as binary data. The object grows (a new one, registered anew) when a request needs more;
`close()` unregisters and removes it. Linux only (/dev/shm).
"""

from __future__ import annotations

import mmap
import os
import secrets
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from arachne_mlflow.protocol import codec
from arachne_mlflow.protocol.shared_memory import BYTE_SIZE, OFFSET, REGION

SHM_DIRECTORY = "/dev/shm"
_ALIGN = 64
_MIN_BYTES = 1024**2


class InputRegion:
    """The client's shared memory object for inputs, registered with the server as one region."""

    def __init__(self, register: Any, unregister: Any):
        self._register, self._unregister = register, unregister  # (name, key, byte_size) / (name)
        self.name: str | None = None
        self._map: mmap.mmap | None = None
        self._finalizer: Any = None

    def request(self, inputs: Mapping[str, Any]) -> bytes:
        """The JSON of an infer request whose inputs are written into the region (grown if needed)."""
        tensors = [(name, *codec.tensor_bytes(np.asarray(value)), np.shape(value)) for name, value in inputs.items()]
        offsets, end = [], 0
        for _, _, blob, _ in tensors:
            offsets.append(end)
            end += -(-len(memoryview(blob).cast("B")) // _ALIGN) * _ALIGN
        self.ensure(end)
        entries = []
        for (name, datatype, blob, shape), offset in zip(tensors, offsets):
            blob = memoryview(blob).cast("B")
            self._map[offset : offset + len(blob)] = blob  # type: ignore[index]
            params = {REGION: self.name, BYTE_SIZE: len(blob), OFFSET: offset}
            entries.append({"name": name, "datatype": datatype, "shape": list(shape), "parameters": params})
        return orjson.dumps({"inputs": entries, "parameters": {"binary_data_output": True}})

    def ensure(self, byte_size: int) -> None:
        """Have a registered object of at least `byte_size` bytes (a new one when it must grow)."""
        if self._map is None or len(self._map) < byte_size:
            self._grow(max(byte_size, _MIN_BYTES))

    def _grow(self, byte_size: int) -> None:
        self.close()
        key = f"/arachne-{os.getpid()}-{secrets.token_hex(6)}"
        path = os.path.join(SHM_DIRECTORY, key[1:])
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, byte_size)
            self._map = mmap.mmap(fd, byte_size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self._finalizer = weakref.finalize(self, _remove, path, self._map)
        try:
            self._register(key[1:], key, byte_size)
        except BaseException:
            self._finalizer()
            self._finalizer, self._map = None, None
            raise
        self.name = key[1:]

    def close(self) -> None:
        """Unregister (best effort: the server may be gone) and remove the object."""
        if self.name is not None:
            name, self.name = self.name, None
            try:
                self._unregister(name)
            except Exception:  # noqa: BLE001 (the object goes whatever the server says)
                pass
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer, self._map = None, None


def _remove(path: str, mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
