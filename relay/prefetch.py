"""Items of an iterator produced on a thread of its own, a bounded number ahead of the reader.

`outbox reconcile` reads the next page of rows from PostgreSQL while it checks the current
ones against Kafka: the server's work and the wait for it overlap with the checking. The
thread owns whatever its iterator uses (a psycopg connection is never used by two threads at
once). Leaving the `with` block, by the end, an error or Ctrl-C, stops the thread and joins
it; an error raised on the thread is raised again in the reader, after the items before it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from typing import Generic, TypeVar

T = TypeVar("T")

#: How long a blocked thread waits before it looks again whether it was asked to stop.
_POLL = 0.05


class _End:
    """The iterator is exhausted."""


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetch(Generic[T]):
    """Iterate ITEMS() on a thread, at most DEPTH items ahead. CANCEL, if given, is called from
    the reader's thread when the producer is still busy at the exit (e.g. a connection's
    cancel_safe: a statement in flight ends at once instead of at its own pace)."""

    def __init__(
        self,
        items: Callable[[], Generator[T, None, None]],
        *,
        depth: int = 2,
        cancel: Callable[[], object] | None = None,
        name: str = "prefetch",
    ):
        self._items = items
        self._queue: queue.Queue[T | _End | _Raised] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._cancel = cancel
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def __enter__(self) -> Prefetch[T]:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __iter__(self) -> Iterator[T]:
        while True:  # bounded: the producer ends with _End or _Raised, or stop() is called
            item = self._queue.get()
            if isinstance(item, _End):
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item

    def stop(self) -> None:
        """Ask the thread to stop, make room for it to see that, and join it."""
        self._stop.set()
        self._drain()
        if not self._thread.is_alive():
            return
        self._thread.join(0.5)
        if self._thread.is_alive() and self._cancel is not None:
            try:
                self._cancel()
            except Exception:  # noqa: BLE001 - the join below is what matters
                pass
        while self._thread.is_alive():  # bounded: the producer looks at _stop between items
            self._drain()
            self._thread.join(_POLL)

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def _put(self, item: T | _End | _Raised) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            with closing(self._items()) as items:
                for item in items:
                    if not self._put(item):
                        return
            self._put(_End())
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, raised there
            self._put(_Raised(exc))
