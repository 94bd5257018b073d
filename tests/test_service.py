"""End to end: a real `jobdock serve` process, a real engine, a real SQLite file."""

from tests.support.service import Service


async def test_healthz_answers(service: Service) -> None:
    response = await service.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_success_with_stdout(service: Service, test_image: str) -> None:
    job = await service.run(image=test_image, command=["sh", "-c", "echo hi"])
    assert job["state"] == "succeeded"
    assert job["exit_code"] == 0
    assert job["stdout"] == "hi\n"
    assert job["error"] is None
