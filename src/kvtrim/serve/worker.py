"""One model worker: a thread that runs generation jobs from a bounded queue, batching where it can.

The event loop never runs the model: a request becomes a job, the worker thread runs it and hands
its events (text pieces, the final usage, an error) back to the request's ``asyncio.Queue``. A full
queue refuses the job at once (the server answers 429). A job carries a cancel flag, set when its
client disconnects or its deadline passes; the job checks it between tokens and stops.

Jobs that wait together and share a ``batch_key`` (the same stored context, on a cache that can be
batched) are taken together, up to ``max_batch``, and run by one ``run_batch`` call: one forward
per decoding step for all of them. Other jobs keep their place in the queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kvtrim.serve")

Emit = Callable[[tuple[str, Any]], None]


class QueueFull(Exception):
    """The worker's queue holds as many jobs as allowed."""


@dataclass
class Job:
    """A unit of model work: ``run(emit, cancelled)`` emits ``(kind, payload)`` events; jobs of one
    ``batch_key`` may instead run together through the worker's ``run_batch``."""

    run: Callable[[Emit, Callable[[], bool]], None]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    deadline: float = float("inf")
    batch_key: str | None = None
    payload: Any = None
    arrived: float = field(default_factory=time.perf_counter)
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set() or self.timed_out()

    def timed_out(self) -> bool:
        return time.monotonic() > self.deadline

    def emit(self, event: tuple[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class ModelWorker:
    """Runs jobs in submission order on one thread; at most ``queue_size`` wait at once."""

    def __init__(
        self,
        queue_size: int,
        max_batch: int = 1,
        run_batch: Callable[[Sequence[Job]], None] | None = None,
        on_cancelled: Callable[[Job], None] | None = None,
    ):
        self.queue_size, self.max_batch, self.run_batch = queue_size, max_batch, run_batch
        self.on_cancelled = on_cancelled  # told of each job cancelled before it ran
        self._waiting: deque[Job] = deque()
        self._ready = threading.Condition()
        self._stopping = False
        self.batches: dict[int, int] = {}  # batch size -> how many ran
        self._thread = threading.Thread(target=self._loop, name="kvtrim-model-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        with self._ready:
            return len(self._waiting)

    def submit(self, job: Job) -> Job:
        with self._ready:
            if len(self._waiting) >= self.queue_size:
                raise QueueFull
            self._waiting.append(job)
            self._ready.notify()
        return job

    def _take(self) -> list[Job] | None:
        """The next job, with the waiting jobs of its batch key; None once stopping."""
        with self._ready:
            while not self._waiting and not self._stopping:
                self._ready.wait()
            if self._stopping:
                return None
            first = self._waiting.popleft()
            jobs = [first]
            if first.batch_key is not None and self.run_batch is not None:
                for job in list(self._waiting):
                    if len(jobs) >= self.max_batch:
                        break
                    if job.batch_key == first.batch_key:
                        self._waiting.remove(job)
                        jobs.append(job)
            return jobs

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            live = []
            for job in jobs:
                if job.cancelled():
                    if self.on_cancelled is not None:
                        self.on_cancelled(job)
                    job.emit(("cancelled", None))
                else:
                    live.append(job)
            if not live:
                continue
            self.batches[len(live)] = self.batches.get(len(live), 0) + 1
            try:
                if len(live) == 1:
                    live[0].run(live[0].emit, live[0].cancelled)
                else:
                    assert self.run_batch is not None
                    self.run_batch(live)
            except Exception as err:  # reported to the requests as their error, the worker goes on
                log.exception("serve: a job failed")
                for job in live:
                    job.emit(("error", err))
            finally:
                for job in live:
                    job.emit(("end", None))

    def stop(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify_all()
        self._thread.join(timeout=30)
