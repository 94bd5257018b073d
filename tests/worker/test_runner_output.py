"""ContainerRunner's output sink against the real engine: live, per stream, never past the cap."""

import asyncio
import time
from typing import Any, cast

import aiodocker
import aiohttp
import pytest
from aiodocker.stream import Message
from aiodocker.stream import Stream as AttachStream

from app.settings import Settings
from app.worker.runner import ContainerRun, ContainerRunner, JobSpec, OnOutput, Stream
from tests.worker.test_runner import (
    OUTPUT_LIMIT,
    RUN_DEADLINE,
    CreatedRecorder,
    Harness,
    harness,  # noqa: F401 (the fixture)
)


class Sink:
    def __init__(self) -> None:
        self.parts: list[tuple[float, Stream, str]] = []

    def __call__(self, stream: Stream, text: str) -> None:
        self.parts.append((time.monotonic(), stream, text))

    def text(self, stream: Stream) -> str:
        return "".join(text for _, s, text in self.parts if s == stream)


async def run_to_end(
    made: Harness, spec: JobSpec, on_output: OnOutput | None = None
) -> ContainerRun:
    async with asyncio.timeout(RUN_DEADLINE):
        return await made.runner.run(
            spec,
            cancel=asyncio.Event(),
            detach=asyncio.Event(),
            on_created=CreatedRecorder(made.docker),
            on_output=on_output,
        )


async def test_the_sink_sees_output_while_the_container_runs(harness: Harness) -> None:  # noqa: F811
    sink = Sink()
    spec = harness.spec("echo one; echo oops >&2; sleep 1.5; echo two")
    result = await run_to_end(harness, spec, sink)
    ended = time.monotonic()
    assert result.exit_code == 0
    assert sink.text("stdout") == result.stdout == "one\ntwo\n"
    assert sink.text("stderr") == result.stderr == "oops\n"
    first = next(at for at, stream, _ in sink.parts if stream == "stdout")
    # "one" came a good while before the run ended, not with the final reading.
    assert ended - first > 1.0


async def test_the_sink_gets_nothing_past_the_cap(harness: Harness) -> None:  # noqa: F811
    sink = Sink()
    spec = harness.spec("head -c 5000000 /dev/zero | tr '\\0' x; echo done >&2")
    result = await run_to_end(harness, spec, sink)
    assert result.output_truncated is True
    assert sink.text("stdout") == result.stdout == "x" * OUTPUT_LIMIT
    assert sink.text("stderr") == result.stderr == "done\n"


class FramedStream:
    """Stands in for an attach stream: hands out the engine's frames, then the end."""

    def __init__(self, frames: list[tuple[int, bytes]]) -> None:
        self.frames = [Message(number, data) for number, data in frames]
        self.closed = False

    async def read_out(self) -> Message | None:
        return self.frames.pop(0) if self.frames else None

    async def close(self) -> None:
        self.closed = True


async def read_frames(frames: list[tuple[int, bytes]], limit: int = 1024) -> tuple[Any, Sink]:
    runner = ContainerRunner(
        cast(aiodocker.Docker, None), Settings(output_limit_bytes=limit), "test-frames"
    )
    stream = FramedStream(frames)
    sink = Sink()
    outputs = await runner._read_attached(cast(AttachStream, stream), sink)
    assert stream.closed and not stream.frames
    return outputs, sink


async def test_attach_frames_are_decoded_per_stream_across_splits() -> None:
    euro = "€".encode()
    (stdout, stderr), sink = await read_frames(
        [
            (1, b"h\xc3"),  # "é" split across frames, with a stderr frame between
            (2, euro[:1]),
            (1, b"\xa9 "),
            (2, euro[1:] + b"!\n"),
            (1, euro[:2]),
            (1, euro[2:] + b"\n"),
            (1, b"bad \xff end"),  # invalid UTF-8 is replaced, not fatal
            (2, b"cut \xe2\x82"),  # cut off at the stream's end
        ]
    )
    assert stdout.text == "hé €\nbad \ufffd end"
    assert stderr.text == "€!\ncut \ufffd"
    assert sink.text("stdout") == stdout.text
    assert sink.text("stderr") == stderr.text
    assert not stdout.truncated and not stderr.truncated


async def test_attach_frames_past_the_cap_are_read_and_dropped() -> None:
    (stdout, stderr), sink = await read_frames(
        [(1, b"x" * 1020), (1, b"y" * 6), (2, b"err\n"), (1, b"z" * 6)], limit=1024
    )
    assert stdout.text == sink.text("stdout") == "x" * 1020 + "yyyy"
    assert stdout.truncated is True
    assert stderr.text == sink.text("stderr") == "err\n"
    assert stderr.truncated is False


async def test_a_failed_attach_stream_falls_back_to_the_logs(
    harness: Harness,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(self: ContainerRunner, stream: AttachStream, on_output: Any) -> Any:
        await stream.close()
        raise aiohttp.ClientPayloadError("connection lost")

    monkeypatch.setattr(ContainerRunner, "_read_attached", broken)
    spec = harness.spec("echo one; echo two >&2; printf three")
    result = await run_to_end(harness, spec)
    assert result.exit_code == 0
    assert (result.stdout, result.stderr) == ("one\nthree", "two\n")
