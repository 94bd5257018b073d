"""The two busiest requests, answered ahead of FastAPI's routing.

`GET /jobs/{id}` without a query string and `POST /jobs` without an Idempotency-Key are
most of a busy service's traffic, and for them FastAPI's exception middleware, router,
request wrapper and body handling cost more than Jobdock's own work. This middleware sits
innermost of the app's own (inside the metrics and the request limits, which see these
requests as they see any) and runs the routes' own code in app.api.jobs; the routes stay
the reference, the spec, and what serves every other request.

- The body is parsed by pydantic-core at once, as JobCreate (FastAPI runs json.loads and
  then validates what it made). A body this refuses goes to FastAPI's route, which reads
  it again and answers the 422 (or, where the two parsers differ, such as a lone surrogate
  escape that json.loads takes and pydantic-core refuses, takes it).
- What the routes' code raises to answer an error (401, 404, 422 for a cap, 429, 503) is
  answered by the app's handler for it, as when a route raises it.
"""

from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette._exception_handler import _lookup_exception_handler
from starlette._utils import get_route_path  # the path as the router matches it
from starlette.requests import empty_receive

from app.api import jobs
from app.api.limits import ASGIApp, Receive, Scope, Send, replay_body
from app.errors import JobdockError
from app.models import JobCreate

# A body as FastAPI reads it for a JobCreate parameter, but parsed by pydantic-core at once
# (FastAPI runs json.loads, then validates the objects it made). Where the two could differ
# (a lone surrogate escape, which pydantic-core refuses and json.loads takes) this refuses,
# and the route decides.
_validate_job = JobCreate.__pydantic_validator__.validate_json
# What the routes raise to answer an error: each answered by the app's handler for it, the
# one that answers it when a route raises it.
ANSWERED = (HTTPException, JobdockError, RequestValidationError)


class HotRoutes:
    """The middleware, in front of `router`'s routes get_job and submit_job (app.api.jobs's
    router, included as it is): their paths are matched, and the route is left in the
    scope as the router leaves it."""

    def __init__(self, app: ASGIApp, *, router: APIRouter) -> None:
        self.app = app
        by_name = {route.name: route for route in router.routes if isinstance(route, APIRoute)}
        self._get_route = by_name[jobs.get_job.__name__]
        self._submit_route = by_name[jobs.submit_job.__name__]
        self._get_path = self._get_route.path_regex.match

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method = scope["method"]
            if method == "GET" and not scope.get("query_string"):
                found = self._get_path(get_route_path(scope))
                if found is not None:
                    await self._get(scope, receive, send, found["job_id"])
                    return
            elif method == "POST" and get_route_path(scope) == self._submit_route.path:
                await self._post(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _matched(self, scope: Scope, route: APIRoute, path_params: dict[str, str]) -> Request:
        """What the router leaves in the scope for a match (the metrics read the route)."""
        scope["route"] = route
        scope["endpoint"] = route.endpoint
        scope["path_params"] = path_params
        return Request(scope)

    async def _get(self, scope: Scope, receive: Receive, send: Send, job_id: str) -> None:
        request = self._matched(scope, self._get_route, {"job_id": job_id})
        try:
            response = await jobs.read_job(request, job_id)
        except ANSWERED as exc:
            response = await _handled(request, exc)
        await response(scope, empty_receive, send)

    async def _post(self, scope: Scope, receive: Receive, send: Send) -> None:
        body, receive = await _read_body(receive)
        if body is None:
            return  # the client went away
        request = self._matched(scope, self._submit_route, {})
        if "idempotency-key" in request.headers:
            await self.app(scope, receive, send)
            return
        try:
            job_in = _validate_job(body)
        except ValidationError:
            # FastAPI's route reads the body again and says what is wrong with it.
            await self.app(scope, receive, send)
            return
        try:
            job, committed = await jobs.queue_job(request, job_in)
        except ANSWERED as exc:
            response = await _handled(request, exc)
        else:
            # Queued: what fails from here on propagates, as it would from the route.
            response = await jobs.queued(request, job, committed)
        await response(scope, empty_receive, send)


async def _handled(request: Request, exc: Exception) -> Response:
    """The answer of the app's handler for `exc`, found by Starlette's own lookup, as the
    route's exception would get it."""
    # The app's handlers are all `async def (request, exc) -> Response` (app.api.errors,
    # FastAPI's own); Starlette's type also allows WebSocket and plain functions.
    handler: Any = _lookup_exception_handler(request.app.exception_handlers, exc)
    if handler is None:
        raise exc
    response: Response = await handler(request, exc)
    return response


async def _read_body(receive: Receive) -> tuple[bytes | None, Receive]:
    """The whole body (None if the client went away first), and a receive that replays it
    for the route."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, receive
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    return body, replay_body(body, receive)
