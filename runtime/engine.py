"""The one model a server runs, and the bounded first-come-first-served queue in front of it.

An `Engine` owns a model and its tokenizer on one worker thread: the thread loads them, then runs
generation jobs one after another. HTTP handlers (runtime/server.py) submit jobs and receive their
events through a callback; they never touch the model. One generation at a time because the model
has one KV cache, whose longest common prefix with the next prompt is reused (runtime/generate.py's
prefill): the turns of a conversation cost only their new tokens. The numba kernels already use every
core, so running two generations at once would not be faster anyway.

A job that is cancelled while waiting leaves the queue at once; a running one stops before its next
token (stream_generate's `cancel`).
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .generate import GenerationStats, stream_generate
from .sampling import SamplingParams

log = logging.getLogger("flashlm.engine")


class QueueFull(Exception):
    """Every queue slot is taken; `retry_after` is a whole-second estimate of when one frees up."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: one generation is running and the queue is full; "
                         f"retry in about {retry_after} s")
        self.retry_after = retry_after


class NotReady(Exception):
    """The model is still loading, failed to load, or the engine stopped."""


@dataclass
class GenerationRequest:
    prompt: list[int]                # token ids, already checked against the context length
    params: SamplingParams
    max_tokens: int
    stop: list[str] = field(default_factory=list)


# --- events a job reports, in order: Piece* then exactly one of Finished / Failed ---------------------
@dataclass
class Piece:
    text: str


@dataclass
class Finished:
    finish_reason: str               # stop | length | cancelled
    stats: GenerationStats
    queued_s: float                  # time spent waiting for the model


@dataclass
class Failed:
    error: Exception


class Job:
    def __init__(self, request: GenerationRequest, notify: Callable[[object], None]):
        self.request = request
        self.notify = notify         # called from the worker thread with Piece / Finished / Failed
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()


class Engine:
    def __init__(self, loader: Callable[[], tuple], *, queue_size: int = 4):
        """`loader()` returns (Model, Tokenizer); it runs on the worker thread, so a server can answer
        health checks while a large model loads."""
        if queue_size < 0:
            raise ValueError(f"queue size must be >= 0, got {queue_size}")
        self._loader = loader
        self.queue_size = queue_size
        self.model = None
        self.tokenizer = None
        self.name = ""
        self.state = "loading"       # loading | ready | failed | stopped
        self.error: BaseException | None = None
        self.load_seconds = 0.0
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._stopping = False
        self._mean_job_s = 1.0       # moving average of job durations, for Retry-After
        self._thread = threading.Thread(target=self._run, name="flashlm-engine", daemon=True)

    def start(self, on_ready: Callable[[], None] | None = None,
              on_failure: Callable[[BaseException], None] | None = None) -> None:
        self._on_ready, self._on_failure = on_ready, on_failure
        self._thread.start()

    # --- called from the HTTP side --------------------------------------------------------------------
    @property
    def ctx_len(self) -> int:
        return self.model.ctx_len

    @property
    def generation_config(self) -> dict:
        return self.model.folder.manifest.get("generation_config") or {}

    def status(self) -> dict:
        with self._cv:
            return {"state": self.state, "running": int(self._running is not None),
                    "queued": len(self._waiting), "queue_size": self.queue_size}

    def submit(self, request: GenerationRequest, notify: Callable[[object], None]) -> Job:
        """Queue a job, or raise QueueFull / NotReady without queueing anything."""
        job = Job(request, notify)
        with self._cv:
            if self.state != "ready" or self._stopping:
                raise NotReady(f"the model is {self.state if not self._stopping else 'stopping'}")
            busy = self._running is not None or self._waiting
            if busy and len(self._waiting) >= self.queue_size:
                ahead = len(self._waiting) + 1
                raise QueueFull(max(1, math.ceil(ahead * self._mean_job_s)))
            self._waiting.append(job)
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job: drop it from the queue if it waits, stop it before its next token if it runs.
        Harmless on a finished job."""
        job.cancelled.set()
        with self._cv:
            try:
                self._waiting.remove(job)
            except ValueError:
                return
        self._report(job, Finished("cancelled", GenerationStats(finish_reason="cancelled"),
                                   time.perf_counter() - job.submitted))

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job, let the worker finish its current token, and release the model."""
        with self._cv:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            if self._running is not None:
                self._running.cancelled.set()
            self._cv.notify_all()
        for job in waiting:
            job.cancelled.set()
            self._report(job, Failed(NotReady("the server is shutting down")))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the worker thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self.model, self.tokenizer = self._loader()
        except BaseException as e:       # reported to the caller (the CLI prints it); the thread ends
            log.debug("loading the model failed", exc_info=True)
            with self._cv:
                self.state, self.error = "failed", e
            if self._on_failure is not None:
                self._on_failure(e)
            return
        self.load_seconds = time.perf_counter() - t0
        self.name = self.model.folder.path.name.removesuffix(".flashlm")
        with self._cv:
            self.state = "ready" if not self._stopping else "stopped"
        log.info("model %s loaded in %.1f s", self.name, self.load_seconds)
        if self._on_ready is not None:
            self._on_ready()
        try:
            while True:
                with self._cv:
                    while not self._waiting and not self._stopping:
                        self._cv.wait()
                    if self._stopping:
                        break
                    job = self._running = self._waiting.popleft()
                try:
                    last = self._execute(job)
                finally:
                    with self._cv:
                        self._running = None
                # Reported once the engine is free, so a client that has its answer sees an idle /health.
                self._report(job, last)
        finally:
            with self._cv:
                self.state = "stopped"
            self.model.close()

    def _execute(self, job: Job) -> Finished | Failed:
        """Run a job, reporting its pieces; returns its last event for the caller to report."""
        req = job.request
        started = time.perf_counter()
        stats = GenerationStats(load_s=self.load_seconds)
        try:
            for piece in stream_generate(self.model, self.tokenizer, req.prompt, req.params,
                                         max_tokens=req.max_tokens, stop=req.stop, stats=stats,
                                         cancel=job.cancelled):
                self._report(job, Piece(piece))
        except Exception as e:
            log.exception("generation failed")
            self.model.reset()           # the KV cache may hold a half-written step: start clean
            return Failed(e)
        finally:
            elapsed = time.perf_counter() - started
            self._mean_job_s = 0.7 * self._mean_job_s + 0.3 * elapsed
        reason = "length" if stats.finish_reason == "context" else stats.finish_reason
        return Finished(reason, stats, started - job.submitted)

    def _report(self, job: Job, event) -> None:
        try:
            job.notify(event)
        except Exception:                # the listener is gone (e.g. its event loop closed): stop the job
            log.debug("job listener failed; cancelling", exc_info=True)
            job.cancelled.set()
