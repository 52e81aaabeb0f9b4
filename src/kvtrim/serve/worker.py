"""One model worker: a thread that runs generation jobs one at a time from a bounded queue.

The event loop never runs the model: a request becomes a job, the worker thread runs it and hands
its events (text pieces, the final usage, an error) back to the request's ``asyncio.Queue``. A full
queue refuses the job at once (the server answers 429). A job carries a cancel flag, set when its
client disconnects or its deadline passes; the job checks it between tokens and stops.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kvtrim.serve")

Emit = Callable[[tuple[str, Any]], None]


class QueueFull(Exception):
    """The worker's queue holds as many jobs as allowed."""


@dataclass
class Job:
    """A unit of model work: ``run(emit, cancelled)`` emits ``(kind, payload)`` events."""

    run: Callable[[Emit, Callable[[], bool]], None]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    deadline: float = float("inf")
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set() or time.monotonic() > self.deadline

    def emit(self, event: tuple[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class ModelWorker:
    """Runs jobs in submission order on one thread; at most ``queue_size`` wait at once."""

    def __init__(self, queue_size: int):
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._loop, name="kvtrim-model-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    def submit(self, job: Job) -> Job:
        try:
            self._jobs.put_nowait(job)
        except queue.Full as err:
            raise QueueFull from err
        return job

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled():
                job.emit(("cancelled", None))
                continue
            try:
                job.run(job.emit, job.cancelled)
            except Exception as err:  # reported to the request as its error, the worker goes on
                job.emit(("error", err))
            finally:
                job.emit(("end", None))

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)
