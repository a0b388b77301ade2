"""Field capture for one server: each model's rules, its sampler and spool, the writer, the counters.

A model's rules are the device's (set through the capture route, kept in
`<store>/.capture/<model>/rules.json`) where it has some, else its MLmodel's (`arachne.capture`,
read when the version loads). Nothing exists on disk, and no thread runs, until a model with rules
keeps its first sample or rules are set on the device.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from arachne_mlflow.errors import ArachneError, InvalidInputError
from arachne_mlflow.model.capture_rules import CaptureRules, parse_rules
from arachne_mlflow.model.names import check_name
from arachne_mlflow.protocol.capture_format import Sample
from arachne_mlflow.server.capture.sampler import CAPPED, SKIPPED, Sampler
from arachne_mlflow.server.capture.shadow import BUSY, ERROR, Candidate, ShadowRunner
from arachne_mlflow.server.capture.spool import FILE_MODE, Spool, private_dir
from arachne_mlflow.server.capture.writer import CaptureWriter, Pending, SampleQueue, tensor_bytes
from arachne_mlflow.server.metrics import CaptureCounts

_logger = logging.getLogger(__name__)

CAPTURE_DIR = ".capture"  # under the store root; not a model name, so the store leaves it alone
RULES_FILE = "rules.json"
MAX_RULES_BYTES = 16 * 1024
ROLLOVER_WAIT = 5.0
_OFF = "off"  # (a device rules file that turns capture off for a model whose MLmodel asks for it)


class Capture:
    """Field capture under `store_root`; `model_rules(name)` gives a loaded model's MLmodel rules
    (None when it has none or is not loaded), `check_installed(name)` raises unless the model is
    installed (rules are set only for one that is), `shadow_use(name)` holds a served model for a
    shadow run (the store's `use`; without it a shadow rule counts `shadow_error`). `seed` makes
    sampling repeatable (tests)."""

    def __init__(
        self,
        store_root: Path,
        model_rules: Callable[[str], CaptureRules | None],
        check_installed: Callable[[str], Any],
        device: str | None = None,
        seed: int | None = None,
        queue: SampleQueue | None = None,
        writer_options: dict[str, float] | None = None,
        shadow_use: Callable[[str], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.root = Path(store_root) / CAPTURE_DIR
        self.device = device or platform.node()
        self.counts = CaptureCounts()
        self.queue = queue if queue is not None else SampleQueue()
        self._model_rules = model_rules
        self._check_installed = check_installed
        self._seed = seed
        self._writer_options = writer_options or {}
        self._writer: CaptureWriter | None = None
        self._shadow_use = shadow_use
        self._shadow: ShadowRunner | None = None
        self._shadowless: set[str] = set()
        self._lock = threading.Lock()
        self._samplers: dict[str, Sampler] = {}
        self._spools: dict[str, Spool] = {}
        self.device_rules: dict[str, CaptureRules | None] = self._read_device_rules()

    # -- the infer path --------------------------------------------------------------------
    def offer(
        self,
        name: str,
        revision: str,
        model_rules: CaptureRules | None,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
    ) -> None:
        """Keep this answered request if the rules say so; never waits for the disk, never copies a
        request it does not keep (one it keeps is copied only where its arrays could change later)."""
        rules = self.device_rules.get(name, model_rules)
        if rules is None:
            return
        sampler = self._samplers.get(name) or self._sampler(name)
        verdict = sampler.decide(rules, outputs)
        if verdict is SKIPPED:
            return
        if verdict is CAPPED:
            self.counts.add_dropped(name, "cap")
            return
        meta = {"rate": repr(rules.rate)}
        if rules.shadow is not None:  # (the answer is compared, so it is kept until then whatever keep_outputs says)
            self._offer_shadow(
                Sample(name, revision, self.device, time.time(), detached(inputs), detached(outputs), meta), rules
            )
            return
        kept = detached(outputs) if rules.keep_outputs else {}
        self._queue(Sample(name, revision, self.device, time.time(), detached(inputs), kept, meta), rules)

    def _offer_shadow(self, sample: Sample, rules: CaptureRules) -> None:
        """Hand a candidate to the shadow runner (which never waits either); it keeps it only if it disagrees."""
        runner = self._shadow or self._start_shadow()
        if runner is None:
            self._shadow_failed(sample.model)
            return
        if not runner.offer(Candidate(sample, rules), tensor_bytes(sample.inputs, sample.outputs)):
            self.counts.add_dropped(sample.model, BUSY)

    def _keep_shadowed(self, candidate: Candidate, sample: Sample) -> None:
        """A candidate the shadow disagreed with: counted against the caps now, then queued for the writer."""
        if not self._sampler(sample.model).take(candidate.rules):
            self.counts.add_dropped(sample.model, "cap")
            return
        self._queue(sample, candidate.rules)

    def _queue(self, sample: Sample, rules: CaptureRules) -> None:
        if not self.queue.offer(Pending(sample, rules), tensor_bytes(sample.inputs, sample.outputs)):
            self.counts.add_dropped(sample.model, "queue_full")
            return
        if self._writer is None:
            self._start_writer()

    def close(self) -> None:
        """Run the queued shadow candidates, write what is queued and close every spool."""
        if self._shadow is not None:
            self._shadow.close()
        if self._writer is not None:
            self._writer.close()
        with self._lock:
            for spool in self._spools.values():
                with spool.lock:
                    spool.close()
            self._spools.clear()

    # -- rules -----------------------------------------------------------------------------
    def rules(self, name: str) -> dict[str, Any]:
        """The rules in force for `name` and where they come from (device, model or none)."""
        check_name(name)
        if name in self.device_rules:
            rules, source = self.device_rules[name], "device"
        else:
            rules = self._model_rules(name)
            source = "model" if rules is not None else "none"
        return {"model": name, "source": source, "rules": None if rules is None else rules.to_dict()}

    def set_rules(self, name: str, data: Any) -> dict[str, Any]:
        """Set the device's rules for `name` (`{}` or null: capture off, whatever its MLmodel says)."""
        self._check_installed(name)
        rules = parse_rules(data, f"capture rules of model {name!r}")
        directory = private_dir(private_dir(self.root) / name)
        text = _OFF if rules is None else json.dumps(rules.to_dict())
        _write_private(directory / RULES_FILE, text)
        self.device_rules[name] = rules
        return self.rules(name)

    def clear_rules(self, name: str) -> dict[str, Any]:
        """Forget the device's rules for `name`: its MLmodel's apply again."""
        check_name(name)
        (self.root / name / RULES_FILE).unlink(missing_ok=True)
        self.device_rules.pop(name, None)
        return self.rules(name)

    # -- segments (the delivery routes) ----------------------------------------------------
    def segments(self, name: str) -> list[dict[str, Any]]:
        """The closed segments of `name`'s spool, oldest first, with their sizes."""
        spool = self._existing_spool(name)
        if spool is None:
            return []
        return [{"name": path.name, "bytes": path.stat().st_size} for path in spool.closed()]

    def segment_path(self, name: str, segment: str) -> Path:
        spool = self._existing_spool(name)
        if spool is None:
            raise _no_spool(name)
        return spool.closed_segment(segment)

    def delete_segment(self, name: str, segment: str) -> None:
        spool = self._existing_spool(name)
        if spool is None:
            raise _no_spool(name)
        with spool.lock:
            spool.delete(spool.closed_segment(segment))

    def rollover(self, name: str) -> str | None:
        """Close `name`'s open segment now if it holds records, once the samples already kept are
        written (waiting at most `ROLLOVER_WAIT` seconds): a drain then gets everything kept before it."""
        if self._shadow is not None:
            self._shadow.join(ROLLOVER_WAIT)
        if self._writer is not None:
            self.queue.join(ROLLOVER_WAIT)
        spool = self._existing_spool(name)
        if spool is None:
            return None
        with spool.lock:
            return spool.roll()

    def uploaded(self, name: str, count: int) -> None:
        """Count `count` samples of `name` delivered (the delivery side calls this)."""
        self.counts.add_uploaded(name, count)

    # -- helpers ---------------------------------------------------------------------------
    def spool(self, name: str) -> Spool:
        """`name`'s spool, created (0700) if it does not exist."""
        with self._lock:
            spool = self._spools.get(name)
            if spool is None:
                spool = self._spools[name] = Spool(private_dir(self.root) / name)
            return spool

    def _existing_spool(self, name: str) -> Spool | None:
        check_name(name)
        if name not in self._spools and not (self.root / name).is_dir():
            return None
        return self.spool(name)

    def _sampler(self, name: str) -> Sampler:
        with self._lock:
            return self._samplers.setdefault(name, Sampler(self._seed))

    def _start_writer(self) -> None:
        with self._lock:
            if self._writer is None:
                self._writer = CaptureWriter(self.queue, self.spool, self._counted, **self._writer_options)

    def _start_shadow(self) -> ShadowRunner | None:
        if self._shadow_use is None:
            return None
        with self._lock:
            if self._shadow is None:
                self._shadow = ShadowRunner(self._shadow_use, self._keep_shadowed, self.counts.add_dropped)
            return self._shadow

    def _shadow_failed(self, name: str) -> None:
        self.counts.add_dropped(name, ERROR)
        if name not in self._shadowless:
            self._shadowless.add(name)
            _logger.warning("capture of model %r: its rules name a shadow model, and no model store runs one", name)

    def _counted(self, name: str, captured: int, dropped: int, reason: str) -> None:
        if captured:
            self.counts.add_captured(name, captured)
        if dropped:
            self.counts.add_dropped(name, reason, dropped)

    def _read_device_rules(self) -> dict[str, CaptureRules | None]:
        found: dict[str, CaptureRules | None] = {}
        if not self.root.is_dir():
            return found
        for path in sorted(self.root.glob(f"*/{RULES_FILE}")):
            name = path.parent.name
            try:
                found[name] = _read_rules_file(path, name)
            except (ArachneError, OSError, ValueError) as err:
                _logger.error("capture rules of model %r in %s are not used (capture stays off): %s", name, path, err)
                found[name] = None
        return found


def detached(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`tensors`, each copied unless nothing can change its data once the answer is sent: an array
    that owns its data, or a view of immutable bytes (a request body) is kept as it is; a view of a
    buffer someone may write again (a shared-memory region, a reused buffer) is copied."""
    return {name: array if _settled(array) else array.copy() for name, array in tensors.items()}


def _settled(array: np.ndarray) -> bool:
    base: Any = array
    while isinstance(base, np.ndarray):
        if base.base is None:
            return True
        base = base.base
    if isinstance(base, memoryview):
        return base.readonly and isinstance(base.obj, bytes)
    return isinstance(base, bytes)


def _read_rules_file(path: Path, name: str) -> CaptureRules | None:
    if path.stat().st_size > MAX_RULES_BYTES:
        raise InvalidInputError(f"{path} is larger than {MAX_RULES_BYTES} bytes")
    text = path.read_text()
    if text == _OFF:
        return None
    return parse_rules(json.loads(text), f"capture rules of model {name!r} ({path})")


def _write_private(path: Path, text: str) -> None:
    """`text` into `path` (0600), whole or not at all."""
    partial = path.with_name(path.name + ".tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        with os.fdopen(fd, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _no_spool(name: str) -> ArachneError:
    from arachne_mlflow.errors import ModelNotFoundError

    return ModelNotFoundError(f"model {name!r} has no capture spool on this device")
