"""Liveness: answers while the process is up."""

from fastapi import APIRouter
from pydantic import BaseModel

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


@router.get("/healthz", operation_id="healthz")
async def healthz() -> Health:
    return Health(status="ok")
