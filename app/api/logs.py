"""GET /jobs/{id}/logs: a job's output as stored, or followed live as server-sent events.

Workers store a running job's output as numbered chunks (`seq` 0, 1, 2, ... across its
attempts), so any API process can serve it. An `offset` is the seq of the first chunk
wanted; every answer says where to resume.
"""

import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import PlainTextResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from app import store
from app.api.deps import EventsDep, PrincipalDep, SessionDep, SessionFactoryDep, SettingsDep
from app.api.jobs import UNAUTHORIZED
from app.auth import owner_filter
from app.db import SessionFactory
from app.errors import JobNotFound
from app.events import JobEvents, wait_for_change
from app.models import ErrorBody, LogChunk
from app.store import logs as log_store

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=UNAUTHORIZED)

NEXT_OFFSET_HEADER = "Jobdock-Next-Offset"
# Chunks read per query while following; a long backlog is sent in pages.
PAGE_CHUNKS = 500
# Chunk numbers are 32-bit integers in the database.
MAX_OFFSET = 2**31 - 1

LogStream = Literal["stdout", "stderr", "all"]

DESCRIPTION = """\
A job's output, in chunks numbered from 0 across all its attempts.

**`follow=false`** (default): the stored output of the job's latest attempt as
`text/plain`, from chunk `offset` on. The `Jobdock-Next-Offset` header is the `offset` that
returns only what is stored after this answer.

**`follow=true`**: a `text/event-stream` of server-sent events, from chunk `offset` on, of
every attempt. Each chunk is an event `log` whose `data` is JSON
`{"seq", "attempt", "stream", "text"}` and whose `id` is the offset to resume from (`seq + 1`).
Output arrives while the job runs; a retried job is followed through its next attempts.
When the job has ended and all its output is sent, an event `end` with data
`{"state", "exit_code", "error"}` closes the stream. To resume after a dropped connection,
pass the last `id` received as `offset`, or as the `Last-Event-ID` header (which browsers'
`EventSource` sends by itself and which wins over `offset`): nothing is missed or repeated.
"""


def _event_data(**fields: Any) -> str:
    return json.dumps(fields, separators=(",", ":"))


def _log_event(chunk: LogChunk) -> ServerSentEvent:
    return ServerSentEvent(
        event="log",
        id=str(chunk.seq + 1),
        data=_event_data(
            seq=chunk.seq, attempt=chunk.attempt, stream=chunk.stream, text=chunk.data
        ),
    )


async def _follow(
    sessions: SessionFactory,
    events: JobEvents,
    job_id: uuid.UUID,
    *,
    offset: int,
    stream: str | None,
    poll_seconds: float,
    owner: uuid.UUID | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """Send chunks as they are stored until the job has ended and all are sent.

    Subscribed before each read and cleared before it, so a chunk stored between a read
    and the wait still wakes the loop; the poll is a fallback for a missed notification.
    """
    with events.subscribe(job_id) as changed:
        while True:
            changed.clear()
            async with sessions() as session:
                try:
                    # The state first: if the job had ended then, the chunks read next are
                    # all of them (the last ones are stored with the end state).
                    status = await log_store.get_log_status(
                        session=session, job_id=job_id, owner=owner
                    )
                except JobNotFound:
                    return  # deleted while followed
                chunks = await log_store.read_chunks(
                    session=session, job_id=job_id, offset=offset, stream=stream, limit=PAGE_CHUNKS
                )
            for chunk in chunks:
                yield _log_event(chunk)
                offset = chunk.seq + 1
            if len(chunks) == PAGE_CHUNKS:
                continue
            if status.state.is_terminal:
                yield ServerSentEvent(
                    event="end",
                    data=_event_data(
                        state=status.state.value, exit_code=status.exit_code, error=status.error
                    ),
                )
                return
            await wait_for_change(changed, poll_seconds)


@router.get(
    "/{job_id}/logs",
    operation_id="get_job_logs",
    summary="Get a job's output, or follow it live",
    description=DESCRIPTION,
    # No default media type: the 200 content types are listed below, errors are JSON.
    response_class=Response,
    responses={
        200: {
            "description": ("`text/plain` (follow=false) or `text/event-stream` (follow=true)"),
            "content": {
                "text/plain": {"schema": {"type": "string"}},
                # One server-sent event: `log` or `end`, its data JSON (see above).
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "required": ["event", "data"],
                        "properties": {
                            "event": {"type": "string", "enum": ["log", "end"]},
                            "data": {"type": "string"},
                            "id": {"type": "string"},
                        },
                    }
                },
            },
            "headers": {
                NEXT_OFFSET_HEADER: {
                    "description": "follow=false: the offset to resume from",
                    "schema": {"type": "integer"},
                }
            },
        },
        404: {"model": ErrorBody, "description": "No job has this id"},
    },
)
async def get_job_logs(
    job_id: str,
    principal: PrincipalDep,
    session: SessionDep,
    sessions: SessionFactoryDep,
    settings: SettingsDep,
    events: EventsDep,
    follow: Annotated[
        bool, Query(description="Stream output as server-sent events until the job ends")
    ] = False,
    stream: Annotated[LogStream, Query(description="Which output to return")] = "all",
    offset: Annotated[
        int,
        Query(ge=0, le=MAX_OFFSET, description="Seq of the first chunk wanted (a resume point)"),
    ] = 0,
    last_event_id: Annotated[
        int | None,
        Header(
            alias="Last-Event-ID",
            ge=0,
            le=MAX_OFFSET,
            description="The last event id received; resumes after it, instead of `offset`",
        ),
    ] = None,
) -> Response:
    uuid_ = store.parse_job_id(job_id)
    if last_event_id is not None:
        offset = last_event_id
    only = None if stream == "all" else stream
    owner = owner_filter(principal)
    # Checked first: another tenant's job is not found, and none of its chunks is read.
    status = await log_store.get_log_status(session=session, job_id=uuid_, owner=owner)
    if follow:
        await session.close()
        return EventSourceResponse(
            _follow(
                sessions,
                events,
                uuid_,
                offset=offset,
                stream=only,
                poll_seconds=settings.poll_interval_seconds,
                owner=owner,
            )
        )
    last = await log_store.last_seq(session=session, job_id=uuid_)
    chunks = (
        []
        if last is None
        else await log_store.read_chunks(
            session=session,
            job_id=uuid_,
            offset=offset,
            stream=only,
            attempt=status.attempt,
            up_to=last,
        )
    )
    next_offset = offset if last is None else max(offset, last + 1)
    return PlainTextResponse(
        "".join(chunk.data for chunk in chunks), headers={NEXT_OFFSET_HEADER: str(next_offset)}
    )
