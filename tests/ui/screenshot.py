"""Takes the README's screenshot of the dashboard (docs/dashboard.png): a real service with
a few jobs in several states, shown by headless Chromium.

    .venv/bin/python -m tests.ui.screenshot [docs/dashboard.png]

Needs a Docker engine (`make engine`), the test image (`make test-image`) and Debian's
chromium.
"""

import asyncio
import sys
import tempfile
from pathlib import Path

from playwright.async_api import async_playwright, expect

from tests.support.images import TEST_IMAGE
from tests.support.service import Service
from tests.ui.test_dashboard import CHROMIUM, CHROMIUM_ARGS

JOBS: list[dict[str, object]] = [
    {"command": ["sh", "-c", "echo building; sleep 0.3; echo ok"], "labels": {"team": "ml"}},
    {"command": ["sh", "-c", "echo tests; exit 1"], "labels": {"team": "web", "kind": "ci"}},
    {"command": ["sleep", "5"], "timeout_seconds": 1, "labels": {"kind": "nightly"}},
    {"command": ["sh", "-c", "seq 3 | sort -r"], "labels": {"team": "ml"}},
    {"command": ["sleep", "30"], "labels": {"kind": "cancel-me"}},
    {"command": ["sh", "-c", "echo hello from jobdock"]},
    {"command": ["sh", "-c", "for i in 1 2 3; do echo step $i; sleep 20; done"]},
    {"command": ["sh", "-c", "sleep 20; echo training done"], "labels": {"team": "ml"}},
    {"command": ["sh", "-c", "echo report"], "labels": {"kind": "nightly"}, "priority": -5},
]


async def take(path: Path) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        async with Service(Path(workdir), workers=2) as svc:
            ids = []
            for job in JOBS:
                ids.append((await svc.submit(image=TEST_IMAGE, **job))["id"])
                await asyncio.sleep(0.4)
            await svc.wait(ids[2])
            await svc.client.post(f"/jobs/{ids[4]}/cancel")
            await svc.wait(ids[5])
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(
                    executable_path=CHROMIUM, args=CHROMIUM_ARGS
                )
                page = await browser.new_page(viewport={"width": 1280, "height": 580})
                await page.goto(f"{svc.url}/ui/")
                await expect(page.locator("#jobs-body tr")).to_have_count(len(JOBS))
                await expect(page.locator("#stat-workers")).not_to_have_text("—")
                await page.screenshot(path=path)
                await browser.close()
            for job_id in ids:
                await svc.client.post(f"/jobs/{job_id}/cancel")


if __name__ == "__main__":
    asyncio.run(take(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png")))
