"""GET /jobs/{id} and POST /jobs read their own parameters (for speed) and declare them by
hand: the spec must say what FastAPI would say of the same parameters declared the usual
way."""

from typing import Annotated, Any

from fastapi import FastAPI, Header, Query

from app.api.jobs import IDEMPOTENCY_KEY_DESCRIPTION, IDEMPOTENCY_KEY_PATTERN, WAIT_DESCRIPTION
from app.main import create_app
from app.models import JobCreate
from app.settings import Settings


def _usual_get_job_operation() -> dict[str, Any]:
    usual = FastAPI()

    @usual.get("/jobs/{job_id}")
    async def get_job(
        job_id: str,
        wait: Annotated[float | None, Query(ge=0, le=86400, description=WAIT_DESCRIPTION)] = None,
    ) -> None:
        return None

    operation: dict[str, Any] = usual.openapi()["paths"]["/jobs/{job_id}"]["get"]
    return operation


def _usual_submit_job_parameters() -> list[dict[str, Any]]:
    usual = FastAPI()

    @usual.post("/jobs")
    async def submit_job(
        job_in: JobCreate,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                pattern=IDEMPOTENCY_KEY_PATTERN,
                description=IDEMPOTENCY_KEY_DESCRIPTION,
            ),
        ] = None,
    ) -> None:
        return None

    parameters: list[dict[str, Any]] = usual.openapi()["paths"]["/jobs"]["post"]["parameters"]
    return parameters


def test_get_job_declares_its_parameters_and_422_as_fastapi_would() -> None:
    spec = create_app(Settings(), run_workers=False).openapi()
    ours = spec["paths"]["/jobs/{job_id}"]["get"]
    usual = _usual_get_job_operation()
    assert ours["parameters"] == usual["parameters"]
    assert ours["responses"]["422"] == usual["responses"]["422"]
    assert "HTTPValidationError" in spec["components"]["schemas"]


def test_submit_job_declares_its_idempotency_key_as_fastapi_would() -> None:
    spec = create_app(Settings(), run_workers=False).openapi()
    assert spec["paths"]["/jobs"]["post"]["parameters"] == _usual_submit_job_parameters()
