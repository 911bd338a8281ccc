"""Prefetch of the next batches to the device, with exact iterator checkpoints.

While the jitted step ``t`` runs, a background thread draws batch ``t+1`` (``t+2``, ...) from the
data iterator, does the host work (bucketing, packing, reference-cache lookup) and places it on
the mesh (:func:`jaxpref.parallel.shard_batch`), so the device never waits for Python between
steps. The step loop (:func:`jaxpref.training.loop.run_steps`) reads the per-step wait as the
``data_wait_s`` metric: near zero means the input pipeline keeps up.

Resuming stays exact: the iterator has already run ahead by up to ``depth`` batches when step
``t`` is checkpointed, so each item carries the iterator state taken *right after its own batch
was drawn* (:attr:`Prefetched.iterator_state`), and the loop saves that state, never the live
iterator's. A resumed run therefore starts at batch ``t+1`` whether or not prefetching was on.

Errors raised while drawing or placing a batch (a bad row, a shape error) are re-raised in the
training thread at the step that would have used that batch, with their original traceback.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class Prefetched:
    """One step's input.

    Attributes:
      host: the host batch as the iterator yielded it (row ids for error reports live here).
      placed: ``place(host)``: what the step function consumes (device arrays).
      iterator_state: ``it.get_state()`` right after ``host`` was drawn; what a checkpoint of
        this step must save so that resuming continues with the next batch.
    """

    host: Any
    placed: Any
    iterator_state: Any


class _Failure:
    """A producer-side exception carried through the queue to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """``next()`` gives :class:`Prefetched` items in iterator order, ``depth`` of them prepared ahead.

    ``depth == 0`` draws and places synchronously in the caller's thread (no thread at all);
    the items are identical either way. Use as a context manager, or call :meth:`close`, so the
    background thread stops when the loop ends early.

    Args:
      it: the data iterator; must have ``get_state()`` (``None`` is recorded otherwise).
        After construction only the prefetcher may touch it.
      place: ``place(host_batch) -> step input``, run in the background thread (thread-safe JAX
        calls such as ``device_put`` are fine there).
      depth: batches prepared ahead of the one being consumed.
    """

    def __init__(self, it: Iterator, place: Callable[[Any], Any] | None = None, depth: int = 2):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self._it = it
        self._place = place or (lambda x: x)
        self.depth = depth
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._produce, name="jaxpref-prefetch", daemon=True)
            self._thread.start()

    def _draw(self) -> Prefetched:
        host = next(self._it)
        get_state = getattr(self._it, "get_state", None)
        state = get_state() if get_state is not None else None
        return Prefetched(host=host, placed=self._place(host), iterator_state=state)

    def _produce(self) -> None:
        while not self._stop.is_set():
            try:
                item: Prefetched | _Failure = self._draw()
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
                item = _Failure(err)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failure):
                return

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Prefetched:
        if self._queue is None:
            return self._draw()
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if self._thread is not None and not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread stopped without producing a batch") from None
        if isinstance(item, _Failure):
            self._queue.put(item)  # a second next() raises again instead of hanging
            raise item.error
        return item

    def close(self) -> None:
        """Stops and joins the background thread (idempotent); pending batches are dropped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
