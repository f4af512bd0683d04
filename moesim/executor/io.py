"""N I/O threads reading experts from the store, demand reads before speculative ones.

Requests queue by (priority, arrival): priority 0 for demand misses, 1 for prefetches, which
is how the simulator's I/O resource orders them (``moesim.offload``). A read in flight for a
key is shared by every later request of that key. Each finished read records its bytes and
its start and end on the run clock, so the run file holds every transfer.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Transfer:
    key: int
    priority: int
    issued_s: float
    start_s: float = 0.0
    end_s: float = 0.0
    payload_bytes: int = 0
    file_bytes: int = 0
    thread: int = -1
    result: object = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


class IOPool:
    """``threads`` workers calling ``read(key)``; ``clock`` gives the run's time base."""

    def __init__(self, read, threads: int, clock=time.perf_counter):
        self._read = read
        self._clock = clock
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self.inflight: dict[int, Transfer] = {}
        self.log: list[Transfer] = []
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._work, args=(i,), daemon=True)
                         for i in range(int(threads))]
        for w in self._workers:
            w.start()

    def submit(self, key: int, priority: int, fresh: bool = False) -> Transfer:
        """Queue a read of ``key`` unless one is already in flight (and not ``fresh``: a miss
        on a key evicted while its prefetch was in flight reads it again); return it."""
        with self._lock:
            tr = self.inflight.get(key)
            if tr is not None and not fresh:
                return tr
            tr = Transfer(int(key), int(priority), self._clock())
            self.inflight[key] = tr
            self.log.append(tr)
        self._queue.put((priority, next(self._seq), tr))
        return tr

    def _work(self, index: int) -> None:
        while True:
            _, _, tr = self._queue.get()
            if tr is None:
                return
            tr.thread = index
            tr.start_s = self._clock()
            try:
                res = self._read(tr.key)
                tr.result = res
                tr.payload_bytes, tr.file_bytes = res.payload_bytes, res.file_bytes
            except BaseException as exc:  # handed to the waiting compute thread
                tr.error = exc
            tr.end_s = self._clock()
            with self._lock:
                if self.inflight.get(tr.key) is tr:
                    del self.inflight[tr.key]
            tr.done.set()

    def close(self) -> None:
        for _ in self._workers:
            self._queue.put((-1, next(self._seq), None))
        for w in self._workers:
            w.join()
