"""The framework limit: a bare FastAPI app served exactly as `jobdock serve` serves Jobdock.

    python -m bench.bare_app --port 8001

Same uvicorn options as app/cli.py serve (log level info, so access logs are on, and the
same graceful-shutdown timeout), the same logging (app.logs, JSON lines), one process.
"""

import argparse
from typing import Any

import uvicorn
from fastapi import FastAPI

from app.logs import configure_logging
from app.models import JobCreate
from app.settings import Settings

CONSTANT = {"status": "ok", "service": "bare", "answer": 42}

app = FastAPI(title="bare")


@app.get("/constant")
async def constant() -> dict[str, Any]:
    return CONSTANT


@app.post("/constant", status_code=202)
async def constant_post() -> dict[str, Any]:
    return CONSTANT


@app.post("/validated", status_code=202)
async def validated_post(job: JobCreate) -> dict[str, Any]:
    """The framework's share of a POST /jobs: the same body read and validated as JobCreate,
    and a constant answer (no key check, no queue cap, no write, no job in the answer)."""
    return CONSTANT


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    # Jobdock's own logging (app.logs: JSON lines on stderr, uvicorn's access log included),
    # configured as `jobdock serve` configures it.
    configure_logging(Settings(log_level=args.log_level))
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_config=None,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
