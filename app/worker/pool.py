"""The worker pool: bounded concurrency, claiming, leases, cancellation and graceful stop.

The pool owns what runs when; every query goes through app.store and every engine call
through a JobRunner, so the pool itself holds neither SQL nor HTTP.
"""

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from app import store
from app.aio import finish_despite_cancel
from app.db import SessionFactory, is_postgresql, listen_for_submissions
from app.errors import EngineError, EngineUnreachable, ImageNotFound
from app.events import JobEvents
from app.metrics import Metrics
from app.models import AppliedLimits, Job, JobResult, JobState, LogChunk, utc_now
from app.settings import MIB, Settings
from app.store import logs as log_store
from app.webhooks import WebhookDeliverer
from app.worker.logs import JobLog
from app.worker.runner import (
    ContainerRun,
    JobSpec,
    LabelledContainer,
    OnCreated,
    OnOutput,
    StopReason,
)

logger = logging.getLogger(__name__)

INTERRUPTED = "interrupted: the worker shut down before the job finished"


class JobRunner(Protocol):
    """What the pool needs of an engine; ContainerRunner is the real one.

    `cancel` asks the runner to kill the container; `detach` (set before the run's task is
    cancelled) asks it to stop watching and leave the container running. `on_output` is
    called with each piece of output kept, as it is read (an attach reads from the start).
    """

    async def run(
        self,
        spec: JobSpec,
        *,
        cancel: asyncio.Event,
        detach: asyncio.Event,
        on_created: OnCreated,
        on_output: OnOutput | None = None,
    ) -> ContainerRun: ...

    async def attach(
        self,
        container_id: str,
        spec: JobSpec,
        *,
        cancel: asyncio.Event,
        detach: asyncio.Event,
        running_for: float,
        on_output: OnOutput | None = None,
    ) -> ContainerRun: ...

    async def engine_answers(self) -> bool: ...

    async def list_job_containers(self) -> list[LabelledContainer]: ...

    async def remove_container(self, container_id: str) -> None: ...


@dataclass
class RunningJob:
    job: Job
    task: "asyncio.Task[None]"
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    # Set at shutdown past the grace period: leave the container running for re-attach.
    detach: asyncio.Event = field(default_factory=asyncio.Event)
    # Re-attached jobs run even when every slot is taken: their containers already run.
    holds_slot: bool = True


def job_fields(job_id: uuid.UUID, worker_id: str | None, attempt: int | None) -> dict[str, object]:
    """A job event's fields for a structured log record (`extra=`): the JSON log carries
    them beside the message, so one job's lines are found by its id."""
    return {"job_id": str(job_id), "worker_id": worker_id, "attempt": attempt}


def spec_of(job: Job) -> JobSpec:
    return JobSpec(
        job_id=job.id,
        attempt=job.attempt,
        image=job.image,
        command=job.command,
        env=dict(job.env),
        working_dir=job.working_dir,
        cpu_shares=job.cpu_shares,
        memory_mb=job.memory_mb,
        timeout_seconds=job.timeout_seconds,
        stdin=job.stdin,
        cpus=job.cpus,
    )


def result_of(job: Job, run: ContainerRun) -> JobResult:
    """Decide a finished container's terminal state and the reason a caller reads."""
    output = {
        "stdout": run.stdout,
        "stderr": run.stderr,
        "output_truncated": run.output_truncated,
        "resources": run.resources,
    }
    truncated_note = (
        f"output truncated: only the first {run.limits.output_limit_bytes} bytes "
        "of each stream were kept"
    )
    if run.stop_reason is StopReason.cancelled:
        return JobResult(state=JobState.cancelled, error="cancelled while running", **output)
    if run.stop_reason is StopReason.timed_out:
        return JobResult(
            state=JobState.timed_out,
            error=f"timed out after {job.timeout_seconds} s; the container was killed",
            **output,
        )
    if run.oom_killed:
        return JobResult(
            state=JobState.failed,
            exit_code=run.exit_code,
            error=(
                "out of memory: the container was killed at its memory limit of "
                f"{run.limits.memory_bytes // MIB} MiB"
            ),
            **output,
        )
    if run.exit_code == 0:
        return JobResult(state=JobState.succeeded, exit_code=0, **output)
    return JobResult(
        state=JobState.failed,
        exit_code=run.exit_code,
        error=truncated_note if run.output_truncated else None,
        **output,
    )


def should_retry(job: Job, result: JobResult, *, infrastructure: bool) -> bool:
    """Whether a finished attempt gets another: failures only, while attempts remain.

    Engine failures always qualify; a non-zero exit when its code is in
    `retry_on_exit_codes` (any code if that is unset). Timeouts, cancels and missing
    images do not: another attempt would meet the same end.
    """
    if job.attempt >= job.max_attempts or result.state is not JobState.failed:
        return False
    if infrastructure:
        return True
    if result.exit_code is None or result.exit_code == 0:
        return False
    return job.retry_on_exit_codes is None or result.exit_code in job.retry_on_exit_codes


class WorkerPool:
    """Runs at most `concurrency` jobs at once from the shared queue."""

    def __init__(
        self,
        *,
        session_factory: SessionFactory,
        runner: JobRunner,
        settings: Settings,
        worker_id: str | None = None,
        concurrency: int | None = None,
        instance_id: str = "",
        events: JobEvents | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._sessions = session_factory
        self._runner = runner
        # Wakes callers in this process that wait on a job's end or follow its output.
        self.events = events or JobEvents()
        # Where the pool counts what it sees (the app's, or the worker process's, registry).
        self.metrics = metrics or Metrics(job_gauges=False)
        self._settings = settings
        self.worker_id = worker_id or settings.worker_id
        # This database's id, as labelled on the containers its workers create.
        self.instance_id = instance_id
        self.concurrency = concurrency if concurrency is not None else settings.workers
        self._slots = asyncio.Semaphore(self.concurrency)
        self._wakeup = asyncio.Event()
        self._running: dict[uuid.UUID, RunningJob] = {}
        self._claim_task: asyncio.Task[None] | None = None
        self._side_tasks: list[asyncio.Task[None]] = []
        # Removals of finished jobs' containers, still under way after their results were
        # recorded and their slots freed; at most `concurrency` at once.
        self._removals: set[asyncio.Task[None]] = set()
        self._stopping = False
        # Set when the engine could not be reached; claiming waits until it answers.
        self._engine_down = False
        # POSTs the webhooks of ended jobs; woken here when a job of this pool ends.
        self.webhooks = WebhookDeliverer(
            session_factory=session_factory, settings=settings, on_recorded=self.events.notify
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.concurrency == 0:
            return
        self._claim_task = self._spawn("claim", self._claim_loop)
        self._side_tasks = [
            self._spawn("heartbeat", self._heartbeat_loop),
            self._spawn("maintenance", self._maintenance_loop),
            self._spawn("webhooks", self.webhooks.run),
        ]
        if is_postgresql(self._settings.database_url):
            self._side_tasks.append(self._spawn("listen", self._listen_loop))
        logger.info("worker pool %s started with %d slots", self.worker_id, self.concurrency)

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Stop claiming, give running jobs the grace period, then leave the rest running.

        Jobs past the grace keep their containers and stay `running`: the next start of a
        worker on this engine re-attaches to them, and reads their whole output.
        """
        grace = self._settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        self._stopping = True
        self._wakeup.set()
        if self._claim_task is not None:
            self._claim_task.cancel()
            await asyncio.gather(self._claim_task, return_exceptions=True)
        jobs = [running.task for running in self._running.values()]
        if jobs:
            logger.info("waiting up to %g s for %d running jobs", grace, len(jobs))
            _, late = await asyncio.wait(jobs, timeout=grace) if grace > 0 else (set(), set(jobs))
            for running in list(self._running.values()):
                if running.task in late:
                    running.detach.set()
                    running.task.cancel()
            if late:
                logger.info("left %d running jobs for re-attach", len(late))
            await asyncio.gather(*jobs, return_exceptions=True)
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
        for task in self._side_tasks:
            task.cancel()
        await asyncio.gather(*self._side_tasks, return_exceptions=True)
        self._side_tasks.clear()
        logger.info("worker pool %s stopped", self.worker_id)

    def _spawn(
        self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]
    ) -> "asyncio.Task[None]":
        return asyncio.create_task(self._watched(name, loop), name=f"jobdock-{name}")

    async def _watched(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Keep a side loop alive: a failing pass is logged and the loop goes on."""
        while True:
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("%s loop failed; restarting it", name)
                await asyncio.sleep(1.0)

    # -- signals from the API --------------------------------------------------------------

    def wake(self) -> None:
        """A job was submitted: look for work now rather than at the next poll."""
        self._wakeup.set()

    async def engine_answers(self) -> bool:
        """Whether this pool's Docker engine answers (for readiness)."""
        return await self._runner.engine_answers()

    def request_cancel(self, job_id: uuid.UUID) -> bool:
        """Kill a job this pool is running; False if it runs elsewhere (or not at all)."""
        running = self._running.get(job_id)
        if running is None:
            return False
        running.cancel.set()
        return True

    @property
    def running_job_ids(self) -> list[uuid.UUID]:
        return list(self._running)

    @property
    def busy_slots(self) -> int:
        """How many of the pool's slots hold a job (a re-attached job may hold none)."""
        return sum(1 for running in self._running.values() if running.holds_slot)

    # -- claiming and running --------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping:
            if self._engine_down and not await self._runner.engine_answers():
                # Jobs stay queued until the engine is back; nothing is claimed to fail.
                await self._idle()
                continue
            self._engine_down = False
            await self._slots.acquire()
            self._wakeup.clear()
            claim = asyncio.ensure_future(self._claim())
            try:
                job = await asyncio.shield(claim)
            except asyncio.CancelledError:
                # stop() landed mid-claim, but the claim may still commit: a job it took
                # is started, so stop() gives it the grace like any other job instead of
                # leaving it "running" under this worker until its lease runs out.
                job = None
                with contextlib.suppress(Exception):
                    job = await claim
                if job is None:
                    self._slots.release()
                else:
                    self._start_job(job)
                raise
            except BaseException:
                self._slots.release()
                raise
            if job is None:
                self._slots.release()
                await self._idle()
                continue
            self._start_job(job)

    async def _idle(self) -> None:
        """Wait for a wake-up, or the poll interval."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._wakeup.wait(), timeout=self._settings.poll_interval_seconds
            )

    async def _claim(self) -> Job | None:
        async with self._sessions() as session:
            return await store.claim_next_job(
                session=session,
                worker_id=self.worker_id,
                lease_seconds=self._settings.lease_seconds,
            )

    def _start_job(
        self, job: Job, *, container_id: str | None = None, holds_slot: bool = True
    ) -> None:
        task = asyncio.create_task(self._run_job(job, container_id), name=f"jobdock-job-{job.id}")
        self._running[job.id] = RunningJob(job=job, task=task, holds_slot=holds_slot)

        def _release(_: "asyncio.Task[None]") -> None:
            self._running.pop(job.id, None)
            if holds_slot:
                self._slots.release()

        task.add_done_callback(_release)

    async def _run_job(self, job: Job, container_id: str | None) -> None:
        running = self._running[job.id]
        created = container_id is not None
        result: JobResult | None = JobResult(state=JobState.failed, error=INTERRUPTED)
        infrastructure = False
        log = JobLog(job.id, job.attempt)
        flusher: asyncio.Task[None] | None = None
        run: ContainerRun | None = None
        # The container and its limits: recorded while the job runs once it has run for a
        # log flush interval, and with the result (the final inspect's limits), so a job
        # shorter than that costs one write fewer.
        container: tuple[str, AppliedLimits] | None = None
        recording: asyncio.Task[None] | None = None

        async def record_later(new_container_id: str, limits: AppliedLimits) -> None:
            await asyncio.sleep(self._settings.log_flush_interval_seconds)
            await finish_despite_cancel(self._record_container(job, new_container_id, limits))

        async def on_created(new_container_id: str, limits: AppliedLimits) -> None:
            nonlocal created, container, recording
            created = True
            container = (new_container_id, limits)
            recording = asyncio.create_task(record_later(new_container_id, limits))

        fields = job_fields(job.id, self.worker_id, job.attempt)
        # The engine call under way, for jobdock_engine_errors_total{operation}.
        operation = "run" if container_id is None else "attach"
        try:
            if container_id is not None:
                # The container's output is read from its start again: skip what is stored.
                log = JobLog(job.id, job.attempt, stored=await self._stored_output(job))
            flusher = asyncio.create_task(self._flush_log(log), name=f"jobdock-log-{job.id}")
            if container_id is None:
                logger.info(
                    "job %s attempt %d: starting %s", job.id, job.attempt, job.image, extra=fields
                )
                if job.started_at is not None:
                    # A first attempt waited from its submission, a retry from its backoff's end.
                    waited_since = job.created_at if job.attempt <= 1 else job.run_after
                    self.metrics.job_started(waited_since, job.started_at)
                run = await self._runner.run(
                    spec_of(job),
                    cancel=running.cancel,
                    detach=running.detach,
                    on_created=on_created,
                    on_output=log.feed,
                )
            else:
                logger.info(
                    "job %s attempt %d: re-attached to its container",
                    job.id,
                    job.attempt,
                    extra=fields,
                )
                started = job.started_at or utc_now()
                run = await self._runner.attach(
                    container_id,
                    spec_of(job),
                    cancel=running.cancel,
                    detach=running.detach,
                    running_for=(utc_now() - started).total_seconds(),
                    on_output=log.feed,
                )
            result = result_of(job, run)
        except EngineUnreachable as exc:
            self.metrics.engine_error(operation)
            self._engine_down = True
            # Before its container existed the job did not start: it waits in the queue
            # for the engine rather than failing.
            result = None if not created else JobResult(state=JobState.failed, error=exc.message)
            infrastructure = True
        except ImageNotFound as exc:
            # The engine had no such image and could not pull it.
            self.metrics.engine_error("pull")
            result = JobResult(state=JobState.failed, error=exc.message)
        except EngineError as exc:
            self.metrics.engine_error(operation)
            result = JobResult(state=JobState.failed, error=exc.message)
            infrastructure = True
        except asyncio.CancelledError:
            if running.detach.is_set():
                result = None
                logger.info("job %s: left running for re-attach", job.id, extra=fields)
            raise
        except Exception as exc:
            logger.exception("job %s: unexpected failure", job.id, extra=fields)
            result = JobResult(state=JobState.failed, error=f"internal error: {exc!r}")
        finally:
            await finish_despite_cancel(self._stop_flushing(log, flusher))
            if recording is not None:
                recording.cancel()
                await asyncio.gather(recording, return_exceptions=True)
            if result is not None and container is not None:
                container_id_, limits = container
                result.container_id = container_id_
                result.limits = run.limits if run is not None else limits
            if result is not None:
                await self._record(job, result, infrastructure=infrastructure, log=log)
            elif not running.detach.is_set():
                await self._release(job)
            if run is not None and run.removal is not None:
                await finish_despite_cancel(self._removing(run.removal))

    async def _removing(self, removal: "asyncio.Task[None]") -> None:
        """Let a recorded job's container removal finish without holding the job's slot,
        unless `concurrency` removals are under way already (then wait for one to end).

        The result is stored before the container goes, so a caller sees the job end one
        removal sooner; should this process die first, the leftover container of a
        finished job is removed at the next start (remove_leftover_containers).
        """
        self._removals.add(removal)
        removal.add_done_callback(self._removals.discard)
        while len(self._removals) > self.concurrency:
            await asyncio.wait(self._removals, return_when=asyncio.FIRST_COMPLETED)

    async def _record_container(self, job: Job, container_id: str, limits: AppliedLimits) -> None:
        async with self._sessions() as session:
            await store.record_container(
                session=session,
                job_id=job.id,
                worker_id=self.worker_id,
                container_id=container_id,
                limits=limits,
            )

    async def _release(self, job: Job) -> None:
        """Give a job that never started back to the queue, as if it had not been claimed."""

        async def write() -> None:
            async with self._sessions() as session:
                await store.release_job(session=session, job_id=job.id, worker_id=self.worker_id)
            logger.warning(
                "job %s: back in the queue, the engine cannot be reached",
                job.id,
                extra=job_fields(job.id, self.worker_id, job.attempt),
            )

        await finish_despite_cancel(write())

    async def _record(
        self, job: Job, result: JobResult, *, infrastructure: bool, log: JobLog | None = None
    ) -> None:
        """Write the outcome, or queue the next attempt; shielded so shutdown cannot lose it.

        The attempt's output not yet written goes in the same transaction as log chunks."""
        retry = should_retry(job, result, infrastructure=infrastructure)

        async def write() -> None:
            chunks, number_chunks = self._last_chunks(log, result)
            async with self._sessions() as session:
                if retry:
                    written = await store.retry_job(
                        session=session,
                        job=job,
                        worker_id=self.worker_id,
                        result=result,
                        run_after=self._next_run_after(job.attempt),
                        chunks=chunks,
                        number_chunks=number_chunks,
                    )
                else:
                    written = await store.finish_job(
                        session=session,
                        job_id=job.id,
                        worker_id=self.worker_id,
                        result=result,
                        chunks=chunks,
                        number_chunks=number_chunks,
                    )
            self.events.notify(job.id)
            if written and not retry and job.callback_url is not None:
                self.webhooks.wake()
            if written and not retry:
                self.metrics.job_finished(result.state, job.started_at, utc_now())
            fields = job_fields(job.id, self.worker_id, job.attempt)
            if not written:
                logger.warning(
                    "job %s: result dropped, this worker no longer holds it", job.id, extra=fields
                )
            elif retry:
                logger.info(
                    "job %s: attempt %d of %d %s (exit %s); retrying",
                    job.id,
                    job.attempt,
                    job.max_attempts,
                    result.state,
                    result.exit_code,
                    extra=fields,
                )
            else:
                logger.info(
                    "job %s: %s (exit %s)", job.id, result.state, result.exit_code, extra=fields
                )

        await finish_despite_cancel(write())

    # -- output as log chunks --------------------------------------------------------------

    async def _stored_output(self, job: Job) -> dict[str, int]:
        """How much of each stream of the job's current attempt is stored already."""
        async with self._sessions() as session:
            return await log_store.stored_sizes(session=session, job_id=job.id, attempt=job.attempt)

    async def _flush_log(self, log: JobLog) -> None:
        """Write a running job's new output as log chunks, every flush interval.

        One INSERT per interval with output, whatever the number of lines; the waiters of
        the job (here, and on PostgreSQL in every API process) are woken after it.
        """
        while await log.next_flush(self._settings.log_flush_interval_seconds):
            taken = log.take()
            try:
                async with self._sessions() as session:
                    if log.next_seq is None:
                        log.next_seq = await log_store.next_seq(session=session, job_id=log.job_id)
                    chunks = log.chunks(taken)
                    held = await log_store.append_chunks(
                        session=session,
                        job_id=log.job_id,
                        worker_id=self.worker_id,
                        chunks=chunks,
                    )
            except Exception as exc:
                # Kept for the next round, or for the result's transaction.
                log.restore(taken)
                logger.warning(
                    "job %s: could not store its output yet: %r",
                    log.job_id,
                    exc,
                    extra=job_fields(log.job_id, self.worker_id, log.attempt),
                )
                continue
            if not held:
                logger.warning(
                    "job %s: output not stored, this worker no longer holds it",
                    log.job_id,
                    extra=job_fields(log.job_id, self.worker_id, log.attempt),
                )
                return
            log.advance(len(chunks))
            self.events.notify(log.job_id)

    async def _stop_flushing(self, log: JobLog, flusher: "asyncio.Task[None] | None") -> None:
        """End the flusher, after the write it may be making: the rest goes with the result."""
        log.close()
        if flusher is not None:
            await asyncio.gather(flusher, return_exceptions=True)

    def _last_chunks(self, log: JobLog | None, result: JobResult) -> tuple[list[LogChunk], bool]:
        """The attempt's output not yet stored, including any final tail that only the
        result's reading of the output has (so the chunks add up to the stored output).

        True with them when no flush has read the job's next seq: they are numbered from 0,
        and the store counts them from the job's next free seq in the result's own write
        (whatever earlier attempts, releases or workers stored), with no query of its own."""
        if log is None:
            return [], False
        log.reconcile(result.stdout, result.stderr)
        taken = log.take()
        if not taken:
            return [], False
        if log.next_seq is not None:
            return log.chunks(taken), False
        log.next_seq = 0
        try:
            return log.chunks(taken), True
        finally:
            log.next_seq = None

    async def _listen_loop(self) -> None:
        # Raises when the connection drops; _watched logs it and listens again.
        await listen_for_submissions(self._settings.database_url, self.wake)

    # -- leases and housekeeping -----------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.heartbeat_interval_seconds)
            job_ids = self.running_job_ids
            if not job_ids:
                continue
            async with self._sessions() as session:
                held = await store.renew_leases(
                    session=session,
                    worker_id=self.worker_id,
                    job_ids=job_ids,
                    lease_seconds=self._settings.lease_seconds,
                )
            for job_id in job_ids:
                running = self._running.get(job_id)
                if running is None:
                    continue
                if job_id not in held:
                    logger.warning(
                        "job %s: lease lost; stopping its container",
                        job_id,
                        extra=job_fields(job_id, self.worker_id, running.job.attempt),
                    )
                    running.cancel.set()
                elif held[job_id]:
                    running.cancel.set()

    async def _maintenance_loop(self) -> None:
        interval = min(self._settings.lease_seconds, 15.0)
        at_start = True
        while True:
            # One listing of the engine serves both passes of this round.
            containers = await self._list_job_containers()
            if containers is not None:
                await self.reattach_containers(at_start=at_start, containers=containers)
            at_start = False
            await self.rescue_lost_jobs()
            await self.purge_finished_jobs()
            if containers is not None:
                await self.remove_leftover_containers(containers=containers)
            await asyncio.sleep(interval)

    async def _list_job_containers(self) -> list[LabelledContainer] | None:
        """This engine's labelled containers, or None (logged) if the engine cannot say."""
        try:
            return await self._runner.list_job_containers()
        except EngineError as exc:
            self.metrics.engine_error("list_containers")
            logger.warning("cannot list job containers: %s", exc.message)
            return None

    async def reattach_containers(
        self, *, at_start: bool, containers: list[LabelledContainer] | None = None
    ) -> None:
        """See to their end the jobs whose containers run on this engine with no worker.

        At start every running job's container on this engine is taken over: one worker
        serves one engine, so they are an earlier run's of this worker. Later, only those
        whose lease expired are. `containers` is the engine's listing, if already made.
        """
        if containers is None and (containers := await self._list_job_containers()) is None:
            return
        for container in containers:
            if container.job_id in self._running or self._stopping:
                continue
            async with self._sessions() as session:
                job = await store.take_over_job(
                    session=session,
                    job_id=container.job_id,
                    attempt=container.attempt,
                    worker_id=self.worker_id,
                    lease_seconds=self._settings.lease_seconds,
                    only_if_lease_expired=not at_start,
                )
            if job is None:
                continue
            holds_slot = not self._slots.locked()
            if holds_slot:
                await self._slots.acquire()
            self._start_job(job, container_id=container.container_id, holds_slot=holds_slot)

    async def rescue_lost_jobs(self) -> None:
        async with self._sessions() as session:
            rescued = await store.rescue_lost_jobs(
                session=session, next_run_after=self._next_run_after
            )
        for job_id, state in rescued:
            self.events.notify(job_id)
            if state.is_terminal:
                self.metrics.job_finished(state)
            # The lost worker and attempt are the store's to know; the id finds the job.
            logger.warning(
                "job %s: %s; now %s",
                job_id,
                store.LOST_WITH_WORKER,
                state,
                extra=job_fields(job_id, None, None),
            )
        if rescued:
            self.webhooks.wake()

    async def purge_finished_jobs(self) -> int:
        """Delete jobs (and their logs) finished longer ago than the retention."""
        if not self._settings.retention:
            return 0
        cutoff = utc_now() - self._settings.retention
        total = 0
        while True:
            async with self._sessions() as session:
                purged = await store.purge_finished_jobs(session=session, finished_before=cutoff)
            total += purged
            if purged < store.PURGE_BATCH_SIZE:
                break
        if total:
            logger.info("purged %d jobs finished before %s", total, cutoff.isoformat())
        return total

    def _next_run_after(self, failed_attempt: int) -> datetime:
        """Exponential backoff with jitter, so retries of many jobs do not come in waves."""
        delay = min(
            self._settings.retry_backoff_max_seconds,
            self._settings.retry_backoff_seconds * 2 ** (failed_attempt - 1),
        )
        return utc_now() + timedelta(seconds=delay * random.uniform(0.5, 1.0))

    async def remove_leftover_containers(
        self, *, containers: list[LabelledContainer] | None = None
    ) -> None:
        """Remove containers of this database's jobs that no longer run anywhere.

        That is: containers of finished or queued jobs, and containers labelled with this
        database's instance id whose job it no longer knows, once older than the grace.
        Containers of other installations sharing the engine are left alone. `containers`
        is the engine's listing, if already made.
        """
        if containers is None and (containers := await self._list_job_containers()) is None:
            return
        candidates = [c for c in containers if c.job_id not in self._running]
        async with self._sessions() as session:
            states = await store.get_states(session=session, job_ids=[c.job_id for c in candidates])
        now = time.time()
        for container in candidates:
            state = states.get(container.job_id)
            if state is JobState.running:
                continue
            if state is None and not (
                self.instance_id
                and container.instance == self.instance_id
                and now - container.created > self._settings.leftover_grace_seconds
            ):
                continue
            logger.info(
                "removing leftover container of job %s",
                container.job_id,
                extra=job_fields(container.job_id, container.worker_id, container.attempt),
            )
            await self._runner.remove_container(container.container_id)
