"""Request limits, checked before any route or parser sees the request.

A pure ASGI middleware, so it also covers bodies sent chunked and answers before FastAPI
reads anything:

- a body over `max_body_bytes` answers 413, by its `Content-Length` up front or by counting
  a chunked body as it arrives (reading stops there);
- a POST, PUT or PATCH that carries a body whose `Content-Type` is not `application/json`
  (or `application/*+json`) answers 415;
- a JSON body that could break the JSON parser, or that no route could take safely, answers
  422 in FastAPI's validation shape (`{"detail": [{"type": "json_invalid", "loc": ["body"],
  ...}]}`), like any other unparseable JSON: not UTF-8, nested deeper than
  `max_json_depth` (Python's parser would recurse until RecursionError), an integer longer
  than `MAX_INT_DIGITS` digits (Python refuses to convert those), or an object with a key
  twice (parsers disagree on which value wins).
- a query string with a NUL character answers 422: no filter holds one, and PostgreSQL
  cannot store or compare text with it.
"""

import json
import math
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic_core import from_json
from starlette.routing import Match

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON_MEDIA_TYPE = "application/json"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# A chunked body over the limit is read on to at most this many times the limit, then cut.
DRAIN_FACTOR = 4
# Python refuses int("1" * 4301) (sys.int_info.default_max_str_digits); no field needs more.
MAX_INT_DIGITS = 4300

# A JSON string, escapes included (unrolled, so it is linear on long strings).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_LONG_DIGITS = re.compile(rb"[0-9]{%d,}" % (MAX_INT_DIGITS + 1))


class _TooLarge(Exception):
    pass


def is_json_media_type(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == JSON_MEDIA_TYPE or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def _depth_exceeds(outside_strings: bytes, max_depth: int) -> bool:
    """Whether arrays and objects nest deeper than `max_depth` in a body with its strings
    taken out."""
    brackets = _NOT_BRACKET.sub(b"", outside_strings)
    depth = 0
    for char in brackets:
        if char in b"[{":
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


def _keys_if_finite(value: Any) -> int | None:
    """How many keys the objects in a parsed JSON value have in all; None if it holds a
    number that is not finite."""
    keys = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            keys += len(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            return None
    return keys


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> None:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} appears twice in one object")
        seen.add(key)


class _NotFinite(ValueError):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        shown = text if len(text) <= 20 else text[:20] + "..."
        raise _NotFinite(f"the JSON number {shown} is out of range")
    return value


def _no_constant(text: str) -> float:
    raise _NotFinite(f"{text} is not JSON")


def json_body_problem(body: bytes, max_depth: int) -> str | None:
    """Why this JSON body must be refused before parsing, or None to let the route parse it."""
    if not body.strip():
        return None
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the body is not valid UTF-8 (byte {exc.start})"
    outside_strings = _JSON_STRING.sub(b"", body)
    if _depth_exceeds(outside_strings, max_depth):
        return f"JSON nested deeper than {max_depth} levels"
    if _LONG_DIGITS.search(outside_strings):
        return f"JSON number with more than {MAX_INT_DIGITS} digits"
    # The usual body, checked at once: pydantic-core parses it (keeping one value of a key
    # that appears twice), and no key appeared twice if its objects hold as many keys as
    # the body has colons outside its strings (each separates a key from its value). What
    # pydantic-core refuses, or what this finds, is parsed again by the check below, which
    # says what is wrong (or leaves it to the route).
    try:
        parsed = from_json(body, allow_inf_nan=False)
    except ValueError:
        pass
    else:
        if _keys_if_finite(parsed) == outside_strings.count(b":"):
            return None
    try:
        json.loads(
            body,
            object_pairs_hook=_no_duplicate_keys,
            parse_float=_finite_float,
            parse_constant=_no_constant,
        )
    except _NotFinite as exc:
        return str(exc)
    except ValueError as exc:
        if "twice" in str(exc):
            return f"JSON object with a duplicate key: {exc}"
        # Other syntax errors are the route's to report, with their position.
    except RecursionError:
        return f"JSON nested deeper than {max_depth} levels"
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _answer(send: Send, status: int, content: Any) -> None:
    body = json.dumps(content, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _invalid(loc: list[str], msg: str, kind: str = "json_invalid") -> dict[str, Any]:
    """One entry in FastAPI's 422 shape, so every 422 a client meets parses the same way."""
    return {"detail": [{"type": kind, "loc": loc, "msg": msg, "input": None}]}


class RequestLimits:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_json_depth: int = 32) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth

    def _too_large(self) -> dict[str, str]:
        return {"detail": f"the request body may be at most {self.max_body_bytes} bytes"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if b"\x00" in unquote_to_bytes(bytes(scope.get("query_string", b""))):
            msg = "the query string must not contain a NUL character (%00)"
            await _answer(send, 422, _invalid(["query"], msg, "value_error"))
            return
        length_header = _header(scope, b"content-length")
        length: int | None = None
        if length_header is not None:
            try:
                length = int(length_header)
            except ValueError:
                await _answer(send, 400, {"detail": "Content-Length is not a number"})
                return
            if length > self.max_body_bytes:
                await _answer(send, 413, self._too_large())
                return
        has_body = (length or 0) > 0 or (
            length is None and _header(scope, b"transfer-encoding") is not None
        )
        if not has_body:
            await self.app(scope, receive, send)
            return
        content_type = _header(scope, b"content-type") or ""
        if scope["method"] in BODY_METHODS and not is_json_media_type(content_type):
            shown = content_type or "none"
            detail = f"the body must be {JSON_MEDIA_TYPE}, not {shown}"
            await _answer(send, 415, {"detail": detail})
            return
        try:
            body = await self._read_body(receive)
        except _TooLarge:
            await _answer(send, 413, self._too_large())
            return
        if body is None:
            return  # the client went away: nobody to answer
        if is_json_media_type(content_type):
            problem = json_body_problem(body, self.max_json_depth)
            if problem is not None:
                await _answer(send, 422, _invalid(["body"], problem))
                return
        await self.app(scope, replay_body(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            more = bool(message.get("more_body", False))
            if size > self.max_body_bytes:
                # Read on (and drop) a bounded rest, so a client that sends its whole body
                # before reading the answer gets the 413 rather than a reset connection.
                while more and size <= DRAIN_FACTOR * self.max_body_bytes:
                    message = await receive()
                    size += len(message.get("body", b""))
                    more = message["type"] == "http.request" and bool(message.get("more_body"))
                raise _TooLarge
            chunks.append(chunk)
            if not more:
                return b"".join(chunks)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """The body already read, then whatever the server says next (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _error_response(description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/ErrorBody"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def install_request_limits(app: FastAPI, *, max_body_bytes: int, max_json_depth: int = 32) -> None:
    """Add the middleware, and its 413 and 415 answers to every operation that takes a body."""
    app.add_middleware(RequestLimits, max_body_bytes=max_body_bytes, max_json_depth=max_json_depth)
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                if isinstance(operation, dict) and "requestBody" in operation:
                    responses = operation.setdefault("responses", {})
                    responses.setdefault(
                        "413", _error_response(f"The body is over {max_body_bytes} bytes")
                    )
                    responses.setdefault(
                        "415", _error_response(f"The body is not {JSON_MEDIA_TYPE}")
                    )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

    async def method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
        """405 with an `Allow` of every method the path has, not only its first route's."""
        allowed: set[str] = set()
        template: str | None = None  # the path of the first route that matches, as documented
        for route in app.router.routes:
            match, _ = route.matches({**request.scope, "method": "GET"})
            path = getattr(route, "path", None)
            if match is not Match.NONE and template in (None, path):
                template = path
                allowed.update(getattr(route, "methods", None) or ())
        allow = ", ".join(sorted(allowed))
        return JSONResponse({"detail": "Method Not Allowed"}, 405, headers={"Allow": allow})

    app.add_exception_handler(405, method_not_allowed)
