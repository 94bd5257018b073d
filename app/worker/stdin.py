"""A job's standard input: attached before the container starts, written, then closed.

The container is created with an open stdin that closes when its one attached client
leaves (`StdinOnce`), so closing our end is what the program reads as end of file. The
writing runs beside the container and is never waited for: a program that exits without
reading its input leaves the write stuck until the runner cancels it at the container's
end, and the result never waits on it.
"""

import asyncio
import logging

import aiohttp
from aiodocker.containers import DockerContainer
from aiodocker.stream import Stream as AttachStream
from yarl import URL

logger = logging.getLogger(__name__)

# Written in pieces so a cancel lands between them rather than after one huge write.
STDIN_CHUNK_BYTES = 64 * 1024

# What the container's config needs for its stdin to be open and fed once.
STDIN_CONFIG = {"OpenStdin": True, "StdinOnce": True, "AttachStdin": True}


async def open_attach(
    container: DockerContainer, *, stdin: bool = False, stdout: bool = False, stderr: bool = False
) -> AttachStream:
    """A hijacked attach connection to a container, made before this returns.

    aiodocker's `container.attach()` inspects the container first to learn whether it has
    a TTY; Jobdock's containers never have one, so the stream is built here without that
    extra engine call. Every attach goes on its own connection.
    """
    params: dict[str, str | int] = {
        "detachKeys": "",
        "logs": 0,
        "stdin": int(stdin),
        "stdout": int(stdout),
        "stderr": int(stderr),
        "stream": 1,
    }
    url = URL(f"containers/{container.id}/attach").with_query(params)

    async def setup() -> tuple[URL, bytes | None, bool]:
        return url, None, False

    stream = AttachStream(container.docker, setup)
    try:
        # The hijacked connection is made on entering the stream's context.
        await stream.__aenter__()
    except BaseException:
        await stream.close()
        raise
    return stream


async def attach_stdin(container: DockerContainer) -> AttachStream:
    """Attach to a created container's stdin (before it starts, so no byte is missed)."""
    stream = await open_attach(container, stdin=True)
    transport = _transport(stream)
    if transport is not None:
        # Each write returns once every byte is with the kernel: a finished write leaves
        # nothing buffered here for a close to wait on (see write_stdin).
        transport.set_write_buffer_limits(high=0)
    return stream


async def write_stdin(stream: AttachStream, data: bytes, container_id: str) -> None:
    """Write the whole input, then close the stream: the program sees end of file.

    A program that closes its stdin or exits early ends the write; that is its business,
    not a failure of the job. A write cut short (cancelled, or the engine stopped reading)
    drops the connection with what is still buffered: a graceful close would wait for the
    buffer to drain, which the engine never does once the program is gone, and keep the
    socket open for good.
    """
    written = False
    try:
        for offset in range(0, len(data), STDIN_CHUNK_BYTES):
            await stream.write_in(data[offset : offset + STDIN_CHUNK_BYTES])
        written = True
    except (OSError, RuntimeError, aiohttp.ClientError) as exc:
        logger.debug("stdin of container %s not fully written: %r", container_id, exc)
    finally:
        if not written:
            _abort(stream)
        await stream.close()


def _transport(stream: AttachStream) -> asyncio.Transport | None:
    # aiodocker keeps the hijacked response to itself and only ever closes it gracefully.
    response: aiohttp.ClientResponse | None = stream._resp
    connection = response.connection if response is not None else None
    return None if connection is None else connection.transport


def _abort(stream: AttachStream) -> None:
    """Drop a stream's connection at once, unsent bytes and all."""
    transport = _transport(stream)
    if transport is not None:
        transport.abort()
