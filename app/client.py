"""A small synchronous HTTP client for the Jobdock API, used by the `jobdock` CLI.

It speaks only the public REST contract (JSON over HTTP, server-sent events for live
logs) and turns every failure into a `ClientError` whose message a person can act on.
"""

import contextlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from httpx_sse import SSEError, connect_sse

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATES = frozenset({"succeeded", "failed", "timed_out", "cancelled"})

# How long one GET /jobs/{id}?wait= may block on the server; the client waits a bit longer.
WAIT_CHUNK_SECONDS = 10.0
# Never ask the server more often than this while waiting, even if it ignores `wait`.
MIN_POLL_SECONDS = 0.5
REQUEST_TIMEOUT_SECONDS = 30.0
# Reconnects of a live log stream that broke before its `end` event.
STREAM_RECONNECTS = 5
RECONNECT_BASE_SECONDS = 0.2


class ClientError(Exception):
    """A request failed; `message` says why, `status` is the HTTP status if there was one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class ServerUnreachable(ClientError):
    """No Jobdock answers at the URL (refused, timed out, or not HTTP)."""


@dataclass(frozen=True)
class LogEvent:
    """One piece of output from a live log stream."""

    offset: int | None
    stream: str
    text: str


@dataclass(frozen=True)
class EndEvent:
    """The last event of a live log stream: how the job ended."""

    state: str
    exit_code: int | None
    error: str | None


def error_message(response: httpx.Response) -> str:
    """The server's explanation of a 4xx/5xx answer, in one or a few lines."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return f"HTTP {response.status_code}" + (f": {text}" if text else "")
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        message = detail
    elif isinstance(detail, list):
        message = "; ".join(_validation_line(item) for item in detail)
    else:
        message = json.dumps(body)
    retry_after = response.headers.get("Retry-After")
    if retry_after:
        message += f" (retry after {retry_after} s)"
    return message


def _validation_line(item: Any) -> str:
    """`field.path: message` for one entry of FastAPI's 422 detail list."""
    if not isinstance(item, dict):
        return str(item)
    loc = [str(part) for part in item.get("loc", [])]
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    message = str(item.get("msg", "invalid"))
    return f"{'.'.join(loc)}: {message}" if loc else message


def _segment(job_id: str) -> str:
    """A job id as one path segment, whatever a user typed."""
    return quote(job_id, safe="")


class JobdockClient:
    """The Jobdock API at `base_url`, one method per operation."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = REQUEST_TIMEOUT_SECONDS,
        transport: httpx.BaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        try:
            self._http = httpx.Client(
                base_url=self.base_url, timeout=timeout, transport=transport, headers=headers
            )
        except httpx.InvalidURL as exc:
            raise ClientError(f"{base_url!r} is not a valid URL: {exc}") from exc

    def __enter__(self) -> "JobdockClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: httpx.QueryParams | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        extra: dict[str, Any] = {}
        if timeout is not None:
            extra["timeout"] = timeout
        try:
            with self._reaching():
                response = self._http.request(
                    method, path, params=params, json=json_body, headers=headers, **extra
                )
        except httpx.InvalidURL as exc:
            raise ClientError(f"invalid request URL: {exc}") from exc
        if response.is_error:
            raise ClientError(error_message(response), response.status_code)
        return response

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        """Turn httpx's transport failures into ServerUnreachable with a clear message."""
        try:
            yield
        except httpx.TimeoutException as exc:
            raise ServerUnreachable(
                f"Jobdock at {self.base_url} did not answer in time ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            raise ServerUnreachable(self._unreachable(exc)) from exc

    def _unreachable(self, exc: Exception) -> str:
        reason = str(exc) or type(exc).__name__
        return (
            f"cannot reach Jobdock at {self.base_url} ({reason}); "
            "is the service running? Set JOBDOCK_URL or pass --url"
        )

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise ClientError(
                f"the server answered HTTP {response.status_code} with a body that is not JSON"
            ) from exc

    def submit(
        self, job: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        body: dict[str, Any] = self._json(
            self._request("POST", "/jobs", json_body=job, headers=headers)
        )
        return body

    def get(self, job_id: str, *, wait: float | None = None) -> dict[str, Any]:
        params = None if wait is None else httpx.QueryParams({"wait": wait})
        timeout = None if wait is None else wait + REQUEST_TIMEOUT_SECONDS
        body: dict[str, Any] = self._json(
            self._request("GET", f"/jobs/{_segment(job_id)}", params=params, timeout=timeout)
        )
        return body

    def wait(
        self,
        job_id: str,
        *,
        on_state: Any = None,
        chunk_seconds: float = WAIT_CHUNK_SECONDS,
    ) -> dict[str, Any]:
        """Block until the job is terminal, with long polls of GET /jobs/{id}?wait=."""
        while True:
            started = time.monotonic()
            job = self.get(job_id, wait=chunk_seconds)
            if on_state is not None:
                on_state(job)
            if job.get("state") in TERMINAL_STATES:
                return job
            # A server that answers at once (no `wait` support) is not hammered.
            spent = time.monotonic() - started
            if spent < MIN_POLL_SECONDS:
                time.sleep(MIN_POLL_SECONDS - spent)

    def list_jobs(
        self,
        *,
        state: str | None = None,
        labels: Sequence[tuple[str, str]] = (),
        image: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        params: list[tuple[str, str | int | float | bool | None]] = []
        if state is not None:
            params.append(("state", state))
        params.extend(("label", f"{key}:{value}") for key, value in labels)
        if image is not None:
            params.append(("image", image))
        if limit is not None:
            params.append(("limit", limit))
        if cursor is not None:
            params.append(("cursor", cursor))
        body: dict[str, Any] = self._json(
            self._request("GET", "/jobs", params=httpx.QueryParams(params))
        )
        return body

    def iter_jobs(
        self,
        *,
        state: str | None = None,
        labels: Sequence[tuple[str, str]] = (),
        image: str | None = None,
        page_size: int = 100,
    ) -> Iterator[dict[str, Any]]:
        """Every matching job, newest first, following the cursor page by page."""
        cursor: str | None = None
        while True:
            page = self.list_jobs(
                state=state, labels=labels, image=image, limit=page_size, cursor=cursor
            )
            yield from page.get("items", [])
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def cancel(self, job_id: str) -> tuple[int, dict[str, Any]]:
        response = self._request("POST", f"/jobs/{_segment(job_id)}/cancel")
        body: dict[str, Any] = self._json(response)
        return response.status_code, body

    def delete(self, job_id: str) -> None:
        self._request("DELETE", f"/jobs/{_segment(job_id)}")

    def logs(self, job_id: str, *, stream: str = "all") -> str:
        response = self._request(
            "GET",
            f"/jobs/{_segment(job_id)}/logs",
            params=httpx.QueryParams({"follow": "false", "stream": stream}),
        )
        return response.text

    def follow_logs(
        self, job_id: str, *, stream: str = "all", offset: int | None = None
    ) -> Iterator[LogEvent | EndEvent]:
        """Live output until the job ends. A stream that breaks before its `end` event is
        reopened from the last event's id, so nothing is missed or repeated."""
        path = f"/jobs/{_segment(job_id)}/logs"
        opened = False
        reconnects = 0
        while True:
            params: dict[str, str | int] = {"follow": "true", "stream": stream}
            if offset is not None:
                params["offset"] = offset
            try:
                for event in self._sse(path, httpx.QueryParams(params)):
                    if event is None:
                        opened = True
                        continue
                    if isinstance(event, EndEvent):
                        yield event
                        return
                    if event.offset is not None:
                        offset = event.offset
                    reconnects = 0
                    yield event
            except ServerUnreachable:
                # Reconnect only to a service that answered before: a wrong URL fails at once.
                if not opened or reconnects >= STREAM_RECONNECTS:
                    raise
            else:
                if reconnects >= STREAM_RECONNECTS:
                    raise ClientError("the log stream kept closing before the job ended")
            reconnects += 1
            time.sleep(min(RECONNECT_BASE_SECONDS * 2**reconnects, 5.0))

    def _sse(self, path: str, params: httpx.QueryParams) -> Iterator[LogEvent | EndEvent | None]:
        """The events of one log stream; None first, once the stream is open."""
        # No read timeout: a quiet job may print nothing for a long time.
        timeout = httpx.Timeout(REQUEST_TIMEOUT_SECONDS, read=None)
        try:
            with (
                self._reaching(),
                connect_sse(self._http, "GET", path, params=params, timeout=timeout) as source,
            ):
                if source.response.is_error:
                    source.response.read()
                    raise ClientError(error_message(source.response), source.response.status_code)
                yield None
                for sse in source.iter_sse():
                    event = _parse_event(sse.event, sse.data, sse.id)
                    if event is not None:
                        yield event
        except SSEError as exc:
            raise ClientError(f"the server did not answer with an event stream: {exc}") from exc


def _parse_event(name: str, data: str, event_id: str | None) -> LogEvent | EndEvent | None:
    try:
        payload = json.loads(data) if data else {}
    except ValueError as exc:
        raise ClientError(f"the server sent a {name!r} event that is not JSON") from exc
    if not isinstance(payload, dict):
        return None
    if name == "log":
        offset = int(event_id) if event_id and event_id.isdigit() else None
        return LogEvent(
            offset=offset,
            stream=str(payload.get("stream", "stdout")),
            text=str(payload.get("text", "")),
        )
    if name == "end":
        exit_code = payload.get("exit_code")
        error = payload.get("error")
        return EndEvent(
            state=str(payload.get("state", "")),
            exit_code=exit_code if isinstance(exit_code, int) else None,
            error=error if isinstance(error, str) else None,
        )
    # Comments, keep-alives and events this client does not know are skipped.
    return None
