"""One thread owns the engine: requests reach it through a command queue, tokens go back
to each request's asyncio queue."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from kimi_jax.inference.engine import Engine, Request


class Busy(Exception):
    """The queue of waiting requests is full (HTTP 429)."""


class Unavailable(Exception):
    """The engine thread has stopped (HTTP 503)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request's way through the engine: ``events`` receives ``("token", id)`` per token,
    then ``("done", finish_reason)`` or ``("error", message)``."""

    submit: Callable[[Engine], Request]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    request: Request | None = None
    finished: bool = False
    submitted_at: float = dataclasses.field(default_factory=time.perf_counter)

    def push(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class EngineWorker:
    """Runs ``engine`` on its own thread. At most ``max_slots + max_queue`` requests are
    held at once; more are refused with :class:`Busy`."""

    def __init__(self, engine: Engine, *, max_queue: int):
        self.engine = engine
        self.capacity = engine.max_slots + max_queue
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: set[Job] = set()  # held (submitted, not finished); guarded by _lock
        self._active: list[Job] = []  # in the engine; the engine thread's own
        self._lock = threading.Lock()
        self._stopping = False
        self.error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="kimi-jax-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def load(self) -> tuple[int, int]:
        """(requests held, of them running in a slot)."""
        with self._lock:
            jobs = list(self._jobs)
        running = sum(1 for j in jobs if j.request is not None and j.request.token_ids)
        return len(jobs), running

    def submit(self, job: Job) -> None:
        if not self.alive:
            raise Unavailable(self.error or "the engine has stopped")
        with self._lock:
            if len(self._jobs) >= self.capacity:
                raise Busy(f"{len(self._jobs)} requests are being served or waiting; try again shortly")
            self._jobs.add(job)
        self._commands.put(("submit", job))

    def cancel(self, job: Job) -> None:
        """Ends ``job`` (its client went away): its slot is freed on the engine thread."""
        if not job.finished:
            self._commands.put(("cancel", job))

    def stop(self) -> None:
        self._stopping = True
        self._commands.put(("stop", None))
        self._thread.join(timeout=30)

    # ---- the engine thread

    def _loop(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait() if self._active else self._commands.get()
            except queue.Empty:
                command = None
            while command is not None:
                kind, job = command
                if kind == "stop":
                    self._fail_all("the server is shutting down")
                    return
                if kind == "submit":
                    self._start(job)
                elif kind == "cancel" and job.request is not None and not job.finished:
                    self.engine.cancel(job.request)
                    self._finish(job, "cancelled")
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if not self._active:
                continue
            try:
                self.engine.step()
            except Exception as e:  # the step's donated state is gone: start over with an empty engine
                self.engine.reset()
                self._fail_all(f"the engine failed: {type(e).__name__}: {e}")
                continue
            for job in [j for j in self._active if j.request.done]:
                self._finish(job, job.request.finish_reason)

    def _start(self, job: Job) -> None:
        try:
            job.request = job.submit(self.engine)
        except Exception as e:
            self._finish(job, None, f"{type(e).__name__}: {e}")
        else:
            self._active.append(job)

    def _finish(self, job: Job, reason: str | None, error: str | None = None) -> None:
        job.finished = True
        if job in self._active:
            self._active.remove(job)
        with self._lock:
            self._jobs.discard(job)
        job.push("error", error) if error is not None else job.push("done", reason)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            self._finish(job, None, message)
