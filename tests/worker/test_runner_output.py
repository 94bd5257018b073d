"""ContainerRunner's output sink against the real engine: live, per stream, never past the cap."""

import asyncio
import time

from app.worker.runner import Stream
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


async def test_the_sink_sees_output_while_the_container_runs(harness: Harness) -> None:  # noqa: F811
    sink = Sink()
    spec = harness.spec("echo one; echo oops >&2; sleep 1.5; echo two")
    async with asyncio.timeout(RUN_DEADLINE):
        result = await harness.runner.run(
            spec,
            cancel=asyncio.Event(),
            detach=asyncio.Event(),
            on_created=CreatedRecorder(harness.docker),
            on_output=sink,
        )
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
    async with asyncio.timeout(RUN_DEADLINE):
        result = await harness.runner.run(
            spec,
            cancel=asyncio.Event(),
            detach=asyncio.Event(),
            on_created=CreatedRecorder(harness.docker),
            on_output=sink,
        )
    assert result.output_truncated is True
    assert sink.text("stdout") == result.stdout == "x" * OUTPUT_LIMIT
    assert sink.text("stderr") == result.stderr == "done\n"
