"""A real HTTP server on 127.0.0.1 that receives webhooks and answers as a test scripts."""

import asyncio
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when it arrived


@dataclass(frozen=True)
class Answer:
    status: int = 200
    # Seconds to wait before answering (longer than the deliverer's timeout: no answer).
    delay: float = 0.0
    location: str | None = None


class Receiver:
    """POST /<anything> is recorded; each path answers its scripted answers in turn, then
    its last one again (200 when none was scripted)."""

    def __init__(self) -> None:
        self.received: dict[str, list[Received]] = defaultdict(list)
        self._answers: dict[str, deque[Answer]] = {}
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> "Receiver":
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def script(self, path: str, *answers: Answer | int) -> str:
        """Answer `path` with these answers in turn (ints are statuses); its URL."""
        path = "/" + path.lstrip("/")
        self._answers[path] = deque(a if isinstance(a, Answer) else Answer(a) for a in answers)
        return self.url(path)

    def requests(self, url_or_path: str) -> list[Received]:
        path = "/" + url_or_path.split(f":{self.port}", 1)[-1].lstrip("/")
        return self.received[path]

    async def wait_for(self, url_or_path: str, count: int, timeout: float = 30.0) -> list[Received]:
        """Wait until `count` requests reached the path; a bounded wait, not a timing check."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests(url_or_path)) >= count)
        return self.requests(url_or_path)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received[request.path].append(
            Received(request.path, dict(request.headers), body, time.time())
        )
        async with self._arrived:
            self._arrived.notify_all()
        queue = self._answers.get(request.path)
        answer = Answer()
        if queue:
            answer = queue.popleft() if len(queue) > 1 else queue[0]
        if answer.delay:
            await asyncio.sleep(answer.delay)
        headers = {"Location": answer.location} if answer.location else None
        return web.Response(status=answer.status, text="noted", headers=headers)
