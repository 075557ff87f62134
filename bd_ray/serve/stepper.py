"""The model thread of an engine replica: steps one :class:`~bd_ray.speculative.batch.BatchEngine`
continuously while it has requests, and hands each row's stream chunks to whoever waits for them.

The asyncio event loop never touches the engine: it posts ``submit`` and ``cancel`` operations
(:meth:`EngineStepper.submit`, :meth:`EngineStepper.cancel`), which the model thread applies
between engine steps, so a cancelled row (client gone) leaves the batch and frees its slot in both
caches before the next step. Chunks go back through a per-row ``sink`` callable, called on the
model thread (the replica's sink is ``loop.call_soon_threadsafe(queue.put_nowait, ...)``).

One thread runs every forward of the shared models: query capture for ``snapkv`` patches the
model config for the duration of a prefill, which is not safe alongside another forward.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable

from bd_ray.speculative.batch import BatchEngine
from bd_ray.speculative.rows import Row

__all__ = ["EngineStepper", "Sink"]

log = logging.getLogger("ray.serve")

#: Receives a row's chunks (``StreamChunk``; the one with ``result`` set is the last), or an
#: exception when the row failed (it is then out of the engine).
Sink = Callable[[Any], None]


class EngineStepper:
    """Owns ``engine`` and the thread that steps it (see the module docstring).

    Args:
        engine: the replica's batched engine; used only on the model thread from here on.
    """

    def __init__(self, engine: BatchEngine) -> None:
        self.engine = engine
        self._ops: deque[tuple[str, Row, Sink | None]] = deque()
        self._cv = threading.Condition()
        self._sinks: dict[Row, Sink] = {}
        self._stopped = False
        self._stats: dict = engine.stats()
        self._thread = threading.Thread(target=self._run, name="bd-ray-model", daemon=True)
        self._thread.start()

    # ---- called from any thread -----------------------------------------------------------------
    def submit(self, row: Row, sink: Sink) -> None:
        """Queue ``row`` for the engine; its chunks (or an exception) go to ``sink``."""
        self._post("submit", row, sink)

    def cancel(self, row: Row) -> None:
        """Drop ``row`` before the next step (no-op once it has finished)."""
        self._post("cancel", row, None)

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict:
        """The engine's counters (:meth:`BatchEngine.stats`) as of the end of the latest step."""
        return dict(self._stats)

    def _post(self, op: str, row: Row, sink: Sink | None) -> None:
        with self._cv:
            self._ops.append((op, row, sink))
            self._cv.notify()

    # ---- the model thread -----------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                while not self._ops and not engine.has_work and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    return
                ops = list(self._ops)
                self._ops.clear()
            for op, row, sink in ops:
                self._apply(op, row, sink)
            if engine.has_work:
                try:
                    engine.step()
                except Exception as exc:  # noqa: BLE001 -- a failed step fails the rows in it, not the replica
                    log.exception("engine step failed; failing its %d requests", len(self._sinks))
                    self._fail_all(exc)
            self._stats = engine.stats()     # before delivery: a finished row is out of the counts
            self._deliver()

    def _apply(self, op: str, row: Row, sink: Sink | None) -> None:
        if op == "submit":
            try:
                self.engine.submit(row)
            except Exception as exc:  # noqa: BLE001 -- e.g. a request larger than kv_cache_bytes
                sink(exc)
                return
            self._sinks[row] = sink
        elif row in self._sinks:
            del self._sinks[row]
            self.engine.cancel(row)

    def _deliver(self) -> None:
        for row, sink in list(self._sinks.items()):
            while row.outbox:
                chunk = row.outbox.popleft()
                sink(chunk)
                if chunk.result is not None:
                    del self._sinks[row]
                    break

    def _fail_all(self, exc: Exception) -> None:
        for row, sink in list(self._sinks.items()):
            try:
                self.engine.cancel(row)
            except Exception:  # noqa: BLE001
                log.exception("cancelling a failed row")
            sink(exc)
        self._sinks.clear()
