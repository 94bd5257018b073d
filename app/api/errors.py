"""Domain exceptions and validation errors become HTTP answers here, and only here."""

import json
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.errors import (
    IdempotencyKeyReused,
    InvalidCursor,
    JobAlreadyFinished,
    JobdockError,
    JobNotFound,
    JobStillActive,
    QueueFull,
    QuotaExceeded,
)
from app.models import JobCreate

ERROR_STATUS: dict[type[JobdockError], int] = {
    JobNotFound: status.HTTP_404_NOT_FOUND,
    JobAlreadyFinished: status.HTTP_409_CONFLICT,
    JobStillActive: status.HTTP_409_CONFLICT,
    QueueFull: status.HTTP_503_SERVICE_UNAVAILABLE,
    QuotaExceeded: status.HTTP_429_TOO_MANY_REQUESTS,
}
# Domain errors about one input: answered as 422 in the shape of FastAPI's validation
# errors, so every 422 a client meets parses the same way.
INPUT_ERRORS: dict[type[JobdockError], tuple[str, str]] = {
    InvalidCursor: ("query", "cursor"),
    IdempotencyKeyReused: ("header", "Idempotency-Key"),
}

JOB_FIELDS = ", ".join(JobCreate.model_fields)


class EscapedJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a 422 echoes the input, which may hold lone surrogates
    that UTF-8 cannot encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


def _actionable(error: dict[str, Any], *, batch: bool) -> dict[str, Any]:
    """Say what to do about one validation error, in words a caller can act on."""
    error = dict(error)
    # ctx holds the raised exception object, which says nothing once serialized.
    error.pop("ctx", None)
    if error.get("type") == "extra_forbidden":
        loc = error.get("loc") or ("?",)
        if batch and len(loc) == 2:
            error["msg"] = f"unknown field {loc[-1]!r}; a batch has only the field 'jobs'"
        else:
            error["msg"] = f"unknown field {loc[-1]!r}; a job may set only: {JOB_FIELDS}"
    elif isinstance(error.get("msg"), str):
        error["msg"] = error["msg"].removeprefix("Value error, ")
    return error


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    batch = request.url.path.endswith("/jobs/batch")
    errors = [_actionable(error, batch=batch) for error in exc.errors()]
    return EscapedJSONResponse(
        {"detail": jsonable_encoder(errors)}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT
    )


async def domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, JobdockError)
    loc = next((loc for kind, loc in INPUT_ERRORS.items() if isinstance(exc, kind)), None)
    if loc is not None:
        error = {"type": "value_error", "loc": list(loc), "msg": exc.message, "input": None}
        return JSONResponse({"detail": [error]}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)
    code = next(
        (code for kind, code in ERROR_STATUS.items() if isinstance(exc, kind)),
        status.HTTP_500_INTERNAL_SERVER_ERROR,
    )
    headers = (
        {"Retry-After": str(exc.retry_after_seconds)}
        if isinstance(exc, QueueFull | QuotaExceeded)
        else None
    )
    return JSONResponse({"detail": exc.message}, status_code=code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(JobdockError, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
