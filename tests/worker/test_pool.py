"""WorkerPool logic with a fake runner and a real SQLite database.

No assertion here measures time: waits are bounded by generous deadlines and the checks
are on counts, states and the order in which things happened.
"""

import asyncio
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from app import store
from app.db import SessionFactory, create_engine, create_session_factory
from app.errors import EngineError, EngineUnreachable, ImageNotFound
from app.models import AppliedLimits, Job, JobCreate, JobResult, JobState
from app.settings import MIB, Settings
from app.worker import pool as pool_module
from app.worker.pool import WorkerPool, result_of, should_retry
from app.worker.runner import (
    ContainerRun,
    JobSpec,
    LabelledContainer,
    OnCreated,
    OnOutput,
    StopReason,
)

DEADLINE = 30.0
TERMINAL = {s for s in JobState if s.is_terminal}

Behaviour = Callable[[JobSpec, asyncio.Event], Awaitable[ContainerRun]]


def limits_for(spec: JobSpec, output_limit_bytes: int = MIB) -> AppliedLimits:
    return AppliedLimits(
        cpu_shares=spec.cpu_shares,
        memory_bytes=spec.memory_mb * MIB,
        memory_swap_bytes=spec.memory_mb * MIB,
        pids_limit=256,
        timeout_seconds=spec.timeout_seconds,
        output_limit_bytes=output_limit_bytes,
        network_mode="none",
    )


def container_run(
    *,
    stop_reason: StopReason = StopReason.exited,
    exit_code: int | None = 0,
    oom_killed: bool = False,
    stdout: str = "",
    stderr: str = "",
    output_truncated: bool = False,
    memory_mb: int = 64,
    output_limit_bytes: int = MIB,
) -> ContainerRun:
    return ContainerRun(
        stop_reason=stop_reason,
        exit_code=exit_code,
        oom_killed=oom_killed,
        stdout=stdout,
        stderr=stderr,
        output_truncated=output_truncated,
        limits=AppliedLimits(
            cpu_shares=1024,
            memory_bytes=memory_mb * MIB,
            memory_swap_bytes=memory_mb * MIB,
            pids_limit=256,
            timeout_seconds=30,
            output_limit_bytes=output_limit_bytes,
            network_mode="none",
        ),
    )


async def finish_at_once(spec: JobSpec, cancel: asyncio.Event) -> ContainerRun:
    return container_run(stdout=f"ran {spec.job_id}\n")


class FakeRunner:
    """Implements the pool's JobRunner protocol and records what the pool asked of it."""

    def __init__(self, behaviour: Behaviour = finish_at_once) -> None:
        self.behaviour = behaviour
        self.specs: list[JobSpec] = []
        self.active = 0
        self.max_active = 0
        self.started: defaultdict[uuid.UUID, asyncio.Event] = defaultdict(asyncio.Event)
        self.cancel_seen: dict[uuid.UUID, bool] = {}
        self.interrupted: set[uuid.UUID] = set()
        self.containers: list[LabelledContainer] = []
        self.list_error: EngineError | None = None
        self.removed: list[str] = []
        self.attached: list[tuple[str, uuid.UUID]] = []
        self.detached: set[uuid.UUID] = set()
        self.engine_up = True
        # Each run's output sink, for behaviours that print while they run.
        self.sinks: dict[uuid.UUID, OnOutput] = {}

    async def run(
        self,
        spec: JobSpec,
        *,
        cancel: asyncio.Event,
        detach: asyncio.Event,
        on_created: OnCreated,
        on_output: OnOutput | None = None,
    ) -> ContainerRun:
        self.specs.append(spec)
        if on_output is not None:
            self.sinks[spec.job_id] = on_output
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await on_created(f"fake-{spec.job_id}", limits_for(spec))
            self.started[spec.job_id].set()
            result = await self.behaviour(spec, cancel)
            self.cancel_seen[spec.job_id] = cancel.is_set()
            return result
        except asyncio.CancelledError:
            self.interrupted.add(spec.job_id)
            if detach.is_set():
                self.detached.add(spec.job_id)
            raise
        finally:
            self.active -= 1

    async def attach(
        self,
        container_id: str,
        spec: JobSpec,
        *,
        cancel: asyncio.Event,
        detach: asyncio.Event,
        running_for: float,
        on_output: OnOutput | None = None,
    ) -> ContainerRun:
        self.attached.append((container_id, spec.job_id))
        if on_output is not None:
            self.sinks[spec.job_id] = on_output
        return await self.behaviour(spec, cancel)

    async def engine_answers(self) -> bool:
        return self.engine_up

    async def list_job_containers(self) -> list[LabelledContainer]:
        if self.list_error is not None:
            raise self.list_error
        return list(self.containers)

    async def remove_container(self, container_id: str) -> None:
        self.removed.append(container_id)


# -- helpers -----------------------------------------------------------------------------


async def submit(
    session_factory: SessionFactory, settings: Settings, command: list[str] | None = None
) -> Job:
    async with session_factory() as session:
        job, _ = await store.create_job(
            session=session,
            job_in=JobCreate(image="jobdock-test-busybox:latest", command=command or ["true"]),
            settings=settings,
        )
    return job


async def get(session_factory: SessionFactory, job_id: uuid.UUID) -> Job:
    async with session_factory() as session:
        return await store.get_job(session=session, job_id=job_id)


async def wait_for_state(
    session_factory: SessionFactory, job_id: uuid.UUID, states: set[JobState] = TERMINAL
) -> Job:
    """Bounded wait for a job to reach one of `states`; not a timing check."""
    async with asyncio.timeout(DEADLINE):
        while True:
            job = await get(session_factory, job_id)
            if job.state in states:
                return job
            await asyncio.sleep(0.05)


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(DEADLINE):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"still not true after {DEADLINE} s: {what}") from None


async def wait_event(event: asyncio.Event, what: str) -> None:
    try:
        async with asyncio.timeout(DEADLINE):
            await event.wait()
    except TimeoutError:
        raise AssertionError(f"did not happen within {DEADLINE} s: {what}") from None


@asynccontextmanager
async def running(pool: WorkerPool) -> AsyncIterator[WorkerPool]:
    await pool.start()
    try:
        yield pool
    finally:
        await pool.stop(grace_seconds=0)


def make_pool(
    session_factory: SessionFactory,
    runner: FakeRunner,
    settings: Settings,
    *,
    worker_id: str = "pool-a",
    concurrency: int = 2,
) -> WorkerPool:
    return WorkerPool(
        session_factory=session_factory,
        runner=runner,
        settings=settings,
        worker_id=worker_id,
        concurrency=concurrency,
    )


# -- concurrency and claiming ------------------------------------------------------------


async def test_never_more_than_concurrency_runs_at_once(
    settings: Settings, session_factory: SessionFactory
) -> None:
    gate = asyncio.Event()

    async def held(spec: JobSpec, cancel: asyncio.Event) -> ContainerRun:
        await gate.wait()
        await asyncio.sleep(0.01)  # keep later jobs overlapping too
        return container_run()

    runner = FakeRunner(held)
    jobs = [await submit(session_factory, settings) for _ in range(10)]
    pool = make_pool(session_factory, runner, settings, concurrency=3)
    async with running(pool):
        await wait_until(lambda: runner.active == 3, "three jobs running")
        # Several poll intervals and a wake-up in which a broken pool would start a 4th.
        pool.wake()
        await asyncio.sleep(settings.poll_interval_seconds * 3)
        assert runner.active == 3
        assert len(runner.specs) == 3
        assert len(pool.running_job_ids) == 3
        gate.set()
        finished = [await wait_for_state(session_factory, job.id) for job in jobs]

    assert [job.state for job in finished] == [JobState.succeeded] * len(jobs)
    assert runner.max_active == 3
    assert Counter(spec.job_id for spec in runner.specs) == Counter(job.id for job in jobs)


async def test_two_pools_sharing_a_database_run_every_job_exactly_once(
    settings: Settings, session_factory: SessionFactory
) -> None:
    gate = asyncio.Event()

    async def held(spec: JobSpec, cancel: asyncio.Event) -> ContainerRun:
        await gate.wait()
        await asyncio.sleep(0.005)
        return container_run()

    jobs = [await submit(session_factory, settings) for _ in range(30)]
    # The second pool has its own engine on the same file, as a second process would.
    engine_b = create_engine(settings.database_url)
    runner_a, runner_b = FakeRunner(held), FakeRunner(held)
    pool_a = make_pool(session_factory, runner_a, settings, worker_id="pool-a", concurrency=4)
    pool_b = make_pool(
        create_session_factory(engine_b), runner_b, settings, worker_id="pool-b", concurrency=4
    )
    try:
        async with running(pool_a), running(pool_b):
            # Both pools full before any job ends: both take part in the race.
            await wait_until(
                lambda: runner_a.active == 4 and runner_b.active == 4, "both pools full"
            )
            gate.set()
            finished = [await wait_for_state(session_factory, job.id) for job in jobs]
    finally:
        await engine_b.dispose()

    ran_by_a = Counter(spec.job_id for spec in runner_a.specs)
    ran_by_b = Counter(spec.job_id for spec in runner_b.specs)
    assert ran_by_a + ran_by_b == Counter(job.id for job in jobs)  # each exactly once
    assert not ran_by_a.keys() & ran_by_b.keys()
    for job in finished:
        assert job.state is JobState.succeeded
        assert job.attempt == 1
        assert job.worker_id == ("pool-a" if job.id in ran_by_a else "pool-b")
        assert job.container_id == f"fake-{job.id}"
    assert runner_a.max_active <= 4
    assert runner_b.max_active <= 4


async def test_wake_makes_an_idle_pool_claim_at_once(
    settings: Settings, session_factory: SessionFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    claims: list[Job | None] = []
    idle = asyncio.Event()
    real_claim = store.claim_next_job

    async def observed_claim(**kwargs: Any) -> Job | None:
        job = await real_claim(**kwargs)
        claims.append(job)
        if job is None:
            idle.set()
        return job

    monkeypatch.setattr(store, "claim_next_job", observed_claim)
    # Only wake() may wake this pool: no LISTEN for other processes' submissions.
    monkeypatch.setattr(pool_module, "is_postgresql", lambda _url: False)
    # Without a wake-up the next look at the queue is an hour away.
    slow = settings.model_copy(update={"poll_interval_seconds": 3600.0})
    runner = FakeRunner()
    pool = make_pool(session_factory, runner, slow)
    async with running(pool):
        await wait_event(idle, "the pool's first, empty claim")
        assert claims == [None]
        job = await submit(session_factory, settings)
        # Left alone the pool does not notice the job...
        await asyncio.sleep(settings.poll_interval_seconds * 3)
        assert claims == [None]
        assert (await get(session_factory, job.id)).state is JobState.queued
        # ... and wake() makes it look now.
        pool.wake()
        await wait_event(runner.started[job.id], "the woken pool runs the job")
        finished = await wait_for_state(session_factory, job.id)
    assert [c.id if c else None for c in claims[:2]] == [None, job.id]
    assert finished.state is JobState.succeeded


# -- cancellation ------------------------------------------------------------------------


async def until_cancelled(spec: JobSpec, cancel: asyncio.Event) -> ContainerRun:
    """Like a container that runs until killed; 'exits 0' if no cancel ever comes."""
    try:
        async with asyncio.timeout(DEADLINE):
            await cancel.wait()
    except TimeoutError:
        return container_run(exit_code=0)
    return container_run(stop_reason=StopReason.cancelled, exit_code=None)


async def test_request_cancel_sets_the_event_the_runner_sees(
    settings: Settings, session_factory: SessionFactory
) -> None:
    runner = FakeRunner(until_cancelled)
    job = await submit(session_factory, settings)
    pool = make_pool(session_factory, runner, settings)
    async with running(pool):
        assert pool.request_cancel(job.id) is False  # not running yet
        await wait_event(runner.started[job.id], "job started")
        assert pool.running_job_ids == [job.id]
        assert pool.request_cancel(uuid.uuid4()) is False
        assert pool.request_cancel(job.id) is True
        finished = await wait_for_state(session_factory, job.id)
        assert pool.request_cancel(job.id) is False  # done
    assert finished.state is JobState.cancelled, finished.error
    assert runner.cancel_seen.get(job.id) is True
    assert finished.exit_code is None
    assert finished.error is not None and "cancel" in finished.error


async def test_cancel_requested_in_the_database_reaches_the_runner(
    settings: Settings, session_factory: SessionFactory
) -> None:
    runner = FakeRunner(until_cancelled)
    job = await submit(session_factory, settings)
    pool = make_pool(session_factory, runner, settings)
    async with running(pool):
        await wait_event(runner.started[job.id], "job started")
        async with session_factory() as session:
            asked = await store.cancel_job(session=session, job_id=job.id)
        assert asked.state is JobState.running
        assert asked.cancel_requested is True
        # The pool learns of it through its heartbeat, not through request_cancel.
        finished = await wait_for_state(session_factory, job.id)
    assert finished.state is JobState.cancelled, finished.error
    assert runner.cancel_seen.get(job.id) is True


# -- graceful stop -----------------------------------------------------------------------


async def test_stop_lets_a_short_job_finish_and_leaves_a_long_one_for_re_attach(
    settings: Settings, session_factory: SessionFactory
) -> None:
    release_short = asyncio.Event()

    async def by_command(spec: JobSpec, cancel: asyncio.Event) -> ContainerRun:
        if spec.command == ["short"]:
            await release_short.wait()
            # Still running when stop() starts to wait: only the grace lets it finish.
            await asyncio.sleep(0.3)
            return container_run(stdout="short done\n")
        await asyncio.Event().wait()  # outlasts any grace; only task cancellation ends it
        raise AssertionError("unreachable")

    runner = FakeRunner(by_command)
    short = await submit(session_factory, settings, ["short"])
    long = await submit(session_factory, settings, ["long"])
    waiting = await submit(session_factory, settings, ["never"])
    pool = make_pool(session_factory, runner, settings, concurrency=2)
    await pool.start()
    try:
        await wait_event(runner.started[short.id], "short job started")
        await wait_event(runner.started[long.id], "long job started")
        stopping = asyncio.create_task(pool.stop(grace_seconds=2.0))
        await asyncio.sleep(0)  # stop has begun: no more claims
        release_short.set()  # the short job ends well inside the 2 s grace
        async with asyncio.timeout(DEADLINE):
            await stopping
    finally:
        await pool.stop(grace_seconds=0)

    short_job = await get(session_factory, short.id)
    long_job = await get(session_factory, long.id)
    assert short_job.state is JobState.succeeded
    assert short_job.stdout == "short done\n"
    # Past the grace the job is left running, still this worker's, for a re-attach.
    assert (long_job.state, long_job.worker_id) == (JobState.running, "pool-a")
    assert long_job.error is None
    assert runner.interrupted == {long.id}
    assert runner.detached == {long.id}
    assert pool.running_job_ids == []
    # Nothing new was claimed once stopping began, even though a slot came free.
    assert (await get(session_factory, waiting.id)).state is JobState.queued
    assert waiting.id not in {spec.job_id for spec in runner.specs}


async def test_stop_during_a_claim_does_not_strand_the_claimed_job(
    settings: Settings, session_factory: SessionFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    committed = asyncio.Event()
    proceed = asyncio.Event()
    real_claim = store.claim_next_job

    async def claim_then_pause(**kwargs: Any) -> Job | None:
        job = await real_claim(**kwargs)
        if job is not None:
            committed.set()
            # Stands for the awaits between the claim's commit and the pool holding the
            # job (the commit's own round trip, closing the session): stop() can land here.
            await proceed.wait()
        return job

    monkeypatch.setattr(store, "claim_next_job", claim_then_pause)
    runner = FakeRunner()
    job = await submit(session_factory, settings)
    pool = make_pool(session_factory, runner, settings)
    await pool.start()
    try:
        await wait_event(committed, "the job is claimed in the database")
        stopping = asyncio.create_task(pool.stop(grace_seconds=DEADLINE))
        await asyncio.sleep(0)  # stop() has begun
        proceed.set()
        async with asyncio.timeout(DEADLINE * 2):
            await stopping
    finally:
        await pool.stop(grace_seconds=0)

    after = await get(session_factory, job.id)
    # Run within the grace, or handed back to the queue; never left "running" under a
    # worker that has stopped, to end up failed as lost once the lease runs out.
    assert after.state is not JobState.running, (
        f"job claimed by {after.worker_id} during stop() is stranded in state running"
    )


# -- engine errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        EngineError("Docker engine error (500): something broke"),
        EngineUnreachable("Docker engine unreachable: no such socket"),
        ImageNotFound("image 'nope:1' is not on the Docker engine and could not be pulled"),
    ],
    ids=["engine-error", "engine-unreachable", "image-not-found"],
)
async def test_engine_errors_fail_the_job_with_their_message(
    settings: Settings, session_factory: SessionFactory, error: EngineError
) -> None:
    async def fails(spec: JobSpec, cancel: asyncio.Event) -> ContainerRun:
        raise error

    runner = FakeRunner(fails)
    job = await submit(session_factory, settings)
    async with running(make_pool(session_factory, runner, settings)):
        finished = await wait_for_state(session_factory, job.id)
    assert finished.state is JobState.failed
    assert finished.error == error.message
    assert finished.exit_code is None
    assert len(runner.specs) == 1


async def test_unexpected_runner_exception_fails_the_job_and_the_pool_goes_on(
    settings: Settings, session_factory: SessionFactory
) -> None:
    async def buggy(spec: JobSpec, cancel: asyncio.Event) -> ContainerRun:
        if spec.command == ["boom"]:
            raise RuntimeError("runner bug")
        return container_run()

    runner = FakeRunner(buggy)
    broken = await submit(session_factory, settings, ["boom"])
    fine = await submit(session_factory, settings, ["fine"])
    async with running(make_pool(session_factory, runner, settings, concurrency=1)):
        broken_job = await wait_for_state(session_factory, broken.id)
        fine_job = await wait_for_state(session_factory, fine.id)
    assert broken_job.state is JobState.failed
    assert broken_job.error is not None and "runner bug" in broken_job.error
    assert fine_job.state is JobState.succeeded


# -- result_of ---------------------------------------------------------------------------


def a_job(timeout_seconds: int = 7) -> Job:
    return Job(image="busybox", cpu_shares=1024, memory_mb=16, timeout_seconds=timeout_seconds)


def test_result_of_exit_zero_is_success() -> None:
    result = result_of(a_job(), container_run(exit_code=0, stdout="out", stderr="err"))
    assert result == JobResult(state=JobState.succeeded, exit_code=0, stdout="out", stderr="err")


@pytest.mark.parametrize("code", [1, 3, 255])
def test_result_of_non_zero_exit_is_failure_without_error(code: int) -> None:
    result = result_of(a_job(), container_run(exit_code=code, stderr="bad"))
    assert result == JobResult(state=JobState.failed, exit_code=code, stderr="bad", error=None)


def test_result_of_non_zero_exit_with_truncated_output_says_so() -> None:
    run = container_run(exit_code=2, output_truncated=True, output_limit_bytes=4096)
    result = result_of(a_job(), run)
    assert result.state is JobState.failed
    assert result.exit_code == 2
    assert result.output_truncated is True
    assert result.error is not None and "truncated" in result.error and "4096" in result.error


def test_result_of_oom_is_failure_naming_the_limit() -> None:
    run = container_run(exit_code=137, oom_killed=True, memory_mb=16)
    result = result_of(a_job(), run)
    assert result.state is JobState.failed
    assert result.exit_code == 137
    assert result.error is not None
    assert "out of memory" in result.error
    assert "16 MiB" in result.error


def test_result_of_timeout_names_the_seconds() -> None:
    run = container_run(stop_reason=StopReason.timed_out, exit_code=None, stdout="partial")
    result = result_of(a_job(timeout_seconds=7), run)
    assert result.state is JobState.timed_out
    assert result.exit_code is None
    assert result.stdout == "partial"
    assert result.error is not None and "7 s" in result.error


def test_result_of_cancelled() -> None:
    run = container_run(stop_reason=StopReason.cancelled, exit_code=None)
    result = result_of(a_job(), run)
    assert result.state is JobState.cancelled
    assert result.exit_code is None
    assert result.error is not None and "cancel" in result.error


def test_result_of_timeout_wins_over_oom() -> None:
    run = container_run(stop_reason=StopReason.timed_out, exit_code=None, oom_killed=True)
    assert result_of(a_job(), run).state is JobState.timed_out


# -- housekeeping ------------------------------------------------------------------------


async def claim(session_factory: SessionFactory, worker_id: str, lease_seconds: float) -> Job:
    async with session_factory() as session:
        job = await store.claim_next_job(
            session=session, worker_id=worker_id, lease_seconds=lease_seconds
        )
    assert job is not None
    return job


async def test_rescue_lost_jobs_ends_a_running_job_whose_lease_expired(
    settings: Settings, session_factory: SessionFactory
) -> None:
    lost = await submit(session_factory, settings)
    assert (await claim(session_factory, "dead-worker", lease_seconds=-60)).id == lost.id
    alive = await submit(session_factory, settings)
    assert (await claim(session_factory, "live-worker", lease_seconds=600)).id == alive.id
    queued = await submit(session_factory, settings)

    pool = make_pool(session_factory, FakeRunner(), settings)
    await pool.rescue_lost_jobs()

    lost_job = await get(session_factory, lost.id)
    assert lost_job.state is JobState.failed
    assert lost_job.error == store.LOST_WITH_WORKER
    assert lost_job.finished_at is not None
    assert (await get(session_factory, alive.id)).state is JobState.running
    assert (await get(session_factory, queued.id)).state is JobState.queued


async def test_remove_leftover_containers_removes_only_finished_jobs_containers(
    settings: Settings, session_factory: SessionFactory
) -> None:
    finished = await submit(session_factory, settings)
    await claim(session_factory, "other-worker", lease_seconds=600)
    async with session_factory() as session:
        assert await store.finish_job(
            session=session,
            job_id=finished.id,
            worker_id="other-worker",
            result=JobResult(state=JobState.succeeded, exit_code=0),
        )
    cancelled = await submit(session_factory, settings)
    async with session_factory() as session:
        await store.cancel_job(session=session, job_id=cancelled.id)
    running_job = await submit(session_factory, settings)
    assert (await claim(session_factory, "other-worker", lease_seconds=600)).id == running_job.id

    runner = FakeRunner()
    runner.containers = [
        LabelledContainer("c-finished", finished.id, 1, "other-worker"),
        LabelledContainer("c-cancelled", cancelled.id, 1, "other-worker"),
        LabelledContainer("c-running", running_job.id, 1, "other-worker"),
        LabelledContainer("c-unknown", uuid.uuid4(), 1, "someone-else"),
    ]
    pool = make_pool(session_factory, runner, settings)
    await pool.remove_leftover_containers()
    assert sorted(runner.removed) == ["c-cancelled", "c-finished"]


async def test_remove_leftover_containers_tolerates_an_engine_error(
    settings: Settings, session_factory: SessionFactory
) -> None:
    runner = FakeRunner()
    runner.list_error = EngineUnreachable("Docker engine unreachable: gone")
    pool = make_pool(session_factory, runner, settings)
    await pool.remove_leftover_containers()
    assert runner.removed == []


# -- re-attaching ------------------------------------------------------------------------


async def test_at_start_a_pool_takes_over_running_jobs_whose_containers_it_finds(
    settings: Settings, session_factory: SessionFactory
) -> None:
    orphan = await submit(session_factory, settings)
    assert (await claim(session_factory, "dead-worker", lease_seconds=600)).id == orphan.id
    other_attempt = await submit(session_factory, settings)
    assert (await claim(session_factory, "dead-worker", lease_seconds=600)).id == other_attempt.id

    runner = FakeRunner()
    runner.containers = [
        LabelledContainer("c-orphan", orphan.id, 1, "dead-worker"),
        # A container of an attempt the job is no longer on is never taken over.
        LabelledContainer("c-stale", other_attempt.id, 7, "dead-worker"),
    ]
    async with running(make_pool(session_factory, runner, settings, worker_id="new-worker")):
        done = await wait_for_state(session_factory, orphan.id)
    assert runner.attached == [("c-orphan", orphan.id)]
    assert runner.specs == []  # attached, never run again
    assert done.state is JobState.succeeded
    assert done.attempt == 1
    assert done.stdout == f"ran {orphan.id}\n"
    stale = await get(session_factory, other_attempt.id)
    assert (stale.state, stale.worker_id) == (JobState.running, "dead-worker")


async def test_later_a_pool_takes_over_only_jobs_whose_lease_expired(
    settings: Settings, session_factory: SessionFactory
) -> None:
    alive = await submit(session_factory, settings)
    assert (await claim(session_factory, "live-worker", lease_seconds=600)).id == alive.id
    expired = await submit(session_factory, settings)
    assert (await claim(session_factory, "dead-worker", lease_seconds=-1)).id == expired.id

    runner = FakeRunner()
    runner.containers = [
        LabelledContainer("c-alive", alive.id, 1, "live-worker"),
        LabelledContainer("c-expired", expired.id, 1, "dead-worker"),
    ]
    pool = make_pool(session_factory, runner, settings, worker_id="new-worker")
    await pool.reattach_containers(at_start=False)
    done = await wait_for_state(session_factory, expired.id)
    assert done.state is JobState.succeeded
    assert runner.attached == [("c-expired", expired.id)]
    assert (await get(session_factory, alive.id)).worker_id == "live-worker"
    await pool.stop(grace_seconds=0)


async def test_a_job_that_cannot_reach_the_engine_waits_in_the_queue(
    settings: Settings, session_factory: SessionFactory
) -> None:
    class EngineThatGoesDown(FakeRunner):
        """Like a real engine: while it is down, every run fails before any container."""

        tries = 0

        async def run(
            self,
            spec: JobSpec,
            *,
            cancel: asyncio.Event,
            detach: asyncio.Event,
            on_created: OnCreated,
            on_output: OnOutput | None = None,
        ) -> ContainerRun:
            self.tries += 1
            if not self.engine_up:
                raise EngineUnreachable("Docker engine unreachable: connection refused")
            return await super().run(
                spec, cancel=cancel, detach=detach, on_created=on_created, on_output=on_output
            )

    runner = EngineThatGoesDown(finish_at_once)
    runner.engine_up = False
    job = await submit(session_factory, settings)
    async with running(make_pool(session_factory, runner, settings)) as pool:
        await wait_until(lambda: runner.tries >= 1, "a first try that meets the outage")
        requeued = await wait_for_state(session_factory, job.id, {JobState.queued})
        assert (requeued.attempt, requeued.worker_id, requeued.error) == (0, None, None)
        # While the engine does not answer, the pool stops trying (a claim already under
        # way when the engine went down may still make one more try, and give it back).
        tries = runner.tries
        pool.wake()
        await asyncio.sleep(settings.poll_interval_seconds * 5)
        assert runner.tries <= tries + 1
        assert (await get(session_factory, job.id)).state in (JobState.queued, JobState.running)
        runner.engine_up = True
        done = await wait_for_state(session_factory, job.id)
    assert (done.state, done.attempt) == (JobState.succeeded, 1)
    assert done.stdout == f"ran {job.id}\n"


@pytest.mark.parametrize(
    ("attempt", "max_attempts", "codes", "result", "infrastructure", "expected"),
    [
        pytest.param(
            1,
            3,
            None,
            JobResult(state=JobState.failed, exit_code=3),
            False,
            True,
            id="any-non-zero",
        ),
        pytest.param(
            3,
            3,
            None,
            JobResult(state=JobState.failed, exit_code=3),
            False,
            False,
            id="attempts-used",
        ),
        pytest.param(
            1,
            3,
            [75],
            JobResult(state=JobState.failed, exit_code=3),
            False,
            False,
            id="code-not-listed",
        ),
        pytest.param(
            1, 3, [3], JobResult(state=JobState.failed, exit_code=3), False, True, id="code-listed"
        ),
        pytest.param(
            1,
            3,
            [75],
            JobResult(state=JobState.failed, error="engine"),
            True,
            True,
            id="engine-failure",
        ),
        pytest.param(
            1,
            3,
            None,
            JobResult(state=JobState.failed, error="no image"),
            False,
            False,
            id="image-missing",
        ),
        pytest.param(1, 3, None, JobResult(state=JobState.timed_out), False, False, id="timed-out"),
        pytest.param(1, 3, None, JobResult(state=JobState.cancelled), False, False, id="cancelled"),
        pytest.param(
            1,
            3,
            None,
            JobResult(state=JobState.succeeded, exit_code=0),
            False,
            False,
            id="succeeded",
        ),
    ],
)
def test_should_retry(
    attempt: int,
    max_attempts: int,
    codes: list[int] | None,
    result: JobResult,
    infrastructure: bool,
    expected: bool,
) -> None:
    job = Job(
        image="busybox",
        cpu_shares=1024,
        memory_mb=64,
        timeout_seconds=30,
        attempt=attempt,
        max_attempts=max_attempts,
        retry_on_exit_codes=codes,
    )
    assert should_retry(job, result, infrastructure=infrastructure) is expected


async def test_leftover_containers_of_unknown_jobs_are_removed_only_if_ours_and_old(
    settings: Settings, session_factory: SessionFactory
) -> None:
    long_ago = time.time() - settings.leftover_grace_seconds - 60
    runner = FakeRunner()
    runner.containers = [
        LabelledContainer("c-ours-old", uuid.uuid4(), 1, "w", instance="inst-a", created=long_ago),
        LabelledContainer(
            "c-ours-new", uuid.uuid4(), 1, "w", instance="inst-a", created=time.time()
        ),
        LabelledContainer("c-theirs", uuid.uuid4(), 1, "w", instance="inst-b", created=long_ago),
        LabelledContainer("c-unlabelled", uuid.uuid4(), 1, "w", created=long_ago),
    ]
    pool = WorkerPool(
        session_factory=session_factory,
        runner=runner,
        settings=settings,
        worker_id="pool-a",
        concurrency=1,
        instance_id="inst-a",
    )
    await pool.remove_leftover_containers()
    assert runner.removed == ["c-ours-old"]
