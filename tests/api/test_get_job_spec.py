"""GET /jobs/{id} reads its own parameters (for speed) and declares them by hand: the spec
must say what FastAPI would say of the same parameters declared the usual way."""

from typing import Annotated, Any

from fastapi import FastAPI, Query

from app.api.jobs import WAIT_DESCRIPTION
from app.main import create_app
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


def test_get_job_declares_its_parameters_and_422_as_fastapi_would() -> None:
    spec = create_app(Settings(), run_workers=False).openapi()
    ours = spec["paths"]["/jobs/{job_id}"]["get"]
    usual = _usual_get_job_operation()
    assert ours["parameters"] == usual["parameters"]
    assert ours["responses"]["422"] == usual["responses"]["422"]
    assert "HTTPValidationError" in spec["components"]["schemas"]
