"""A running attempt's output on its way to the database as numbered log chunks.

The runner hands each piece of output it keeps to `JobLog.feed`; the pool takes what
gathered every flush interval and writes it as chunks, and writes the rest with the result.
`JobLog` itself holds no I/O: it buffers, numbers and reconciles.
"""

import asyncio
import uuid
from dataclasses import dataclass, field

from app.models import LogChunk
from app.worker.runner import STREAMS, Stream

# A chunk holds at most this many characters; a burst of output becomes several chunks.
MAX_CHUNK_CHARS = 64 * 1024


@dataclass
class Pending:
    stream: Stream
    parts: list[str] = field(default_factory=list)
    size: int = 0


def _storable(text: str) -> str:
    # PostgreSQL text cannot hold NUL; the stored output replaces it the same way.
    return text.replace("\x00", "\ufffd")


class JobLog:
    """One attempt's output not yet written, and how much of each stream was seen.

    `stored` is what earlier workers already wrote of this attempt, per stream: a worker
    that re-attaches reads the container's output from its start, and skips that much.
    """

    def __init__(
        self, job_id: uuid.UUID, attempt: int, *, stored: dict[str, int] | None = None
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        # Characters of each stream of this attempt stored or pending.
        self.seen: dict[str, int] = {stream: (stored or {}).get(stream, 0) for stream in STREAMS}
        self._skip = dict(self.seen)
        self._pending: list[Pending] = []
        # The seq of the next chunk; read from the database before the first write.
        self.next_seq: int | None = None
        self._output = asyncio.Event()
        self._closed = asyncio.Event()

    def feed(self, stream: Stream, text: str) -> None:
        """The runner's output sink: `text` is the next output kept of `stream`."""
        skip = self._skip[stream]
        if skip:
            cut = min(skip, len(text))
            self._skip[stream] -= cut
            text = text[cut:]
        if not text:
            return
        self.seen[stream] += len(text)
        self._add(stream, _storable(text))

    def reconcile(self, stdout: str, stderr: str) -> None:
        """Add what the final output holds beyond what was fed (a last line the follower
        missed), so the chunks of the attempt add up to its stored output."""
        for stream, text in zip(STREAMS, (stdout, stderr), strict=True):
            if len(text) > self.seen[stream]:
                self._add(stream, text[self.seen[stream] :])
                self.seen[stream] = len(text)

    def _add(self, stream: Stream, text: str) -> None:
        while text:
            last = self._pending[-1] if self._pending else None
            if last is None or last.stream != stream or last.size >= MAX_CHUNK_CHARS:
                last = Pending(stream)
                self._pending.append(last)
            room = MAX_CHUNK_CHARS - last.size
            piece, text = text[:room], text[room:]
            last.parts.append(piece)
            last.size += len(piece)
        self._output.set()

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def take(self) -> list[Pending]:
        """Everything pending, oldest first; `restore` it if it could not be written."""
        taken, self._pending = self._pending, []
        self._output.clear()
        return taken

    def restore(self, taken: list[Pending]) -> None:
        self._pending[:0] = taken
        if self._pending:
            self._output.set()

    def chunks(self, taken: list[Pending]) -> list[LogChunk]:
        """Rows for what was taken, numbered from `next_seq`; `advance` once written."""
        assert self.next_seq is not None, "next_seq must be read before the first write"
        return [
            LogChunk(
                job_id=self.job_id,
                seq=self.next_seq + index,
                attempt=self.attempt,
                stream=pending.stream,
                data="".join(pending.parts),
            )
            for index, pending in enumerate(taken)
        ]

    def advance(self, written: int) -> None:
        assert self.next_seq is not None
        self.next_seq += written

    # -- the flusher's pace --------------------------------------------------------------------

    def close(self) -> None:
        """The run ended: the flusher stops; what is pending goes with the result."""
        self._closed.set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def next_flush(self, interval: float) -> bool:
        """Wait until output is pending and `interval` has passed since; False once closed."""
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            output = asyncio.ensure_future(self._output.wait())
            try:
                await asyncio.wait((output, closed), return_when=asyncio.FIRST_COMPLETED)
            finally:
                output.cancel()
            if closed.done():
                return False
            await asyncio.wait((closed,), timeout=interval)
            return not closed.done()
        finally:
            closed.cancel()
