"""Wake-ups for callers waiting on a job: GET /jobs/{id}?wait= and live log streams.

A `JobEvents` hub lives in each process. The worker pool notifies it in-process whenever a
job's state or output changes; on PostgreSQL the same writes also send NOTIFY on
`JOB_EVENTS_CHANNEL`, and `listen()` relays them to the hub of every API process. Waiters
still re-read the database now and then, so a lost notification only delays an answer.
"""

import asyncio
import contextlib
import uuid
from collections.abc import Iterator


class JobEvents:
    """Per-job events that anyone may wait on and anyone may set."""

    def __init__(self) -> None:
        self._waiters: dict[uuid.UUID, set[asyncio.Event]] = {}

    @contextlib.contextmanager
    def subscribe(self, job_id: uuid.UUID) -> Iterator[asyncio.Event]:
        """An event set on every change of the job, for as long as the block runs.

        Subscribe before reading the job, clear the event before each read: a change that
        lands between the read and the wait then still wakes the waiter.
        """
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[job_id]

    def notify(self, job_id: uuid.UUID) -> None:
        for event in self._waiters.get(job_id, ()):
            event.set()

    def notify_all(self) -> None:
        """Wake every waiter, e.g. after notifications may have been missed."""
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()

    def on_notification(self, payload: str) -> None:
        """A NOTIFY payload (a job id) from another process."""
        try:
            job_id = uuid.UUID(payload)
        except ValueError:
            return
        self.notify(job_id)


async def wait_for_change(event: asyncio.Event, timeout: float) -> bool:
    """Wait for `event` at most `timeout` seconds; True if it was set."""
    if timeout <= 0:
        return event.is_set()
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
