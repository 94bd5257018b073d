"""The dashboard at /ui, end to end: a real `jobdock serve`, a real Docker engine, and
Debian's Chromium driven by Playwright (headless).

Screenshots go to JOBDOCK_TEST_ARTIFACTS (default tests/artifacts/).
"""

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect

from tests.api.test_auth import bearer, create_key
from tests.support.databases import database_url_for
from tests.support.service import Service

CHROMIUM = Path(os.environ.get("JOBDOCK_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(
    os.environ.get("JOBDOCK_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "artifacts")
)
# Generous: a job runs in well under a second, but CI machines can be slow.
JOB_TIMEOUT_MS = 30_000
JOB_URL = re.compile(r"/ui/#/jobs/([0-9a-f-]{36})$")


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install chromium` (Debian) to run these")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh browser context (its own sessionStorage) whose page must raise no script
    error and break no Content Security Policy rule."""
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    page.set_default_timeout(10_000)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            problems.append(f"CSP: {message.text}")

    page.on("console", on_console)
    yield page
    await context.close()
    assert problems == []


@pytest.fixture(scope="module")
async def open_service(
    tmp_path_factory: pytest.TempPathFactory, test_image: str
) -> AsyncIterator[Service]:
    """A service without API keys, with two embedded workers."""
    async with Service(tmp_path_factory.mktemp("ui"), workers=2) as svc:
        yield svc


def screenshot_path(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name


async def submit_from_form(page: Page, image: str, command: str, labels: str = "") -> str:
    """Fills the submit form, sends it, and answers the id of the job page it lands on."""
    await page.get_by_role("link", name="Submit a job").click()
    form = page.locator("#submit-form")
    await form.locator("[name=image]").fill(image)
    await form.locator("[name=command]").fill(command)
    await form.locator("[name=labels]").fill(labels)
    await form.get_by_role("button", name="Submit").click()
    await expect(page).to_have_url(JOB_URL)
    match = JOB_URL.search(page.url)
    assert match is not None
    return match.group(1)


async def test_static_files_are_served_and_left_out_of_the_schema(
    open_service: Service,
) -> None:
    client = open_service.client
    redirect = await client.get("/ui")
    assert redirect.status_code == 307 and redirect.headers["location"] == "ui/"
    index = await client.get("/ui/")
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    assert "script-src 'self'" in index.headers["content-security-policy"]
    for name, media_type in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = await client.get(f"/ui/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type)
    for name in ("index.html", "../ui.py", "..%2Fui.py", "nothing.js"):
        assert (await client.get(f"/ui/static/{name}")).status_code == 404
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert not [path for path in paths if path.startswith("/ui")]


async def test_submit_from_the_form_watch_it_succeed_and_see_its_output(
    page: Page, open_service: Service, test_image: str
) -> None:
    await page.goto(f"{open_service.url}/ui")
    job_id = await submit_from_form(
        page,
        test_image,
        "sh -c 'echo \"hello from the dashboard\"; echo to stderr >&2; sleep 0.5; echo done'",
        labels="suite=ui\nkind=demo",
    )
    await expect(page.locator("#job-state")).to_have_text("succeeded", timeout=JOB_TIMEOUT_MS)
    log = page.locator("#job-log")
    await expect(log).to_contain_text("hello from the dashboard")
    await expect(log).to_contain_text("done")
    await expect(log.locator(".stream-stderr")).to_have_text("to stderr\n")
    await expect(page.locator("#log-status")).to_have_text("(complete)")
    await expect(page.locator("#job-exit-code")).to_have_text("0")
    await expect(page.locator("#job-cancel")).to_be_hidden()
    fields = page.locator("#job-fields")
    for text in ("Started", "Finished", "Ran", "suite=ui", "kind=demo", test_image):
        await expect(fields).to_contain_text(text)
    await page.screenshot(path=screenshot_path("dashboard-job.png"), full_page=True)

    # What the form sent is what the API stored: the command split like a shell would.
    job = await open_service.get(job_id)
    assert job["command"] == [
        "sh",
        "-c",
        'echo "hello from the dashboard"; echo to stderr >&2; sleep 0.5; echo done',
    ]
    assert job["labels"] == {"suite": "ui", "kind": "demo"}
    assert job["stdout"] == "hello from the dashboard\ndone\n"

    # The jobs table lists it, and a click on its row opens it again.
    await page.get_by_role("link", name="Jobs", exact=True).click()
    row = page.locator(f"tr[data-job-id='{job_id}']")
    await expect(row).to_contain_text("succeeded")
    await expect(row).to_contain_text("suite=ui")
    await expect(page.locator("#stat-queued")).to_have_text(re.compile(r"^(\d+|—)$"))
    await page.screenshot(path=screenshot_path("dashboard-jobs.png"), full_page=True)
    await row.locator("td").nth(2).click()
    await expect(page).to_have_url(re.compile(f"#/jobs/{job_id}$"))


async def test_filters_by_state_image_and_label(
    page: Page, open_service: Service, test_image: str
) -> None:
    failed = await open_service.run(
        image=test_image, command=["sh", "-c", "exit 3"], labels={"team": "red"}
    )
    passed = await open_service.run(image=test_image, command=["true"], labels={"team": "blue"})
    assert (failed["state"], passed["state"]) == ("failed", "succeeded")
    rows = page.locator("#jobs-body tr")

    await page.goto(f"{open_service.url}/ui/#/?label=team:red")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-job-id", failed["id"])
    await expect(rows.first.locator("td.num").first).to_have_text("3")

    await page.locator("#filters select[name=state]").select_option("succeeded")
    await expect(page).to_have_url(re.compile(r"#/\?state=succeeded&label=team%3Ared$"))
    await expect(page.locator("#jobs-empty")).to_have_text("No job matches these filters.")

    await page.locator("#filters-clear").click()
    # The cleared list is shown (its route has run, and set the form from the URL) before
    # the next filter is typed: typed sooner, the route would clear it again.
    await expect(page).to_have_url(re.compile(r"#/$"))
    await expect(page.locator("#jobs-empty")).to_be_hidden()
    await page.locator("#filters [name=image]").fill("no-such-image:latest")
    await page.locator("#filters").get_by_role("button", name="Filter").click()
    await expect(page.locator("#jobs-empty")).to_be_visible()
    await expect(rows).to_have_count(0)

    # A bad filter is the API's 422, shown as it says, not swallowed.
    await page.goto(f"{open_service.url}/ui/#/?label=nocolon")
    await expect(page.locator("#errors")).to_contain_text("must be key:value")


async def test_cancel_a_running_job_from_its_page(
    page: Page, open_service: Service, test_image: str
) -> None:
    await page.goto(f"{open_service.url}/ui/")
    job_id = await submit_from_form(page, test_image, "sh -c 'echo started; sleep 60'")
    await expect(page.locator("#job-state")).to_have_text("running", timeout=JOB_TIMEOUT_MS)
    await expect(page.locator("#job-log")).to_contain_text("started")
    cancel = page.locator("#job-cancel")
    await expect(cancel).to_be_visible()
    await cancel.click()
    await expect(page.locator("#job-state")).to_have_text("cancelled", timeout=JOB_TIMEOUT_MS)
    await expect(cancel).to_be_hidden()
    await expect(page.locator("#job-error")).not_to_have_text("—")
    assert (await open_service.get(job_id))["state"] == "cancelled"


async def test_a_submission_the_api_refuses_shows_why(page: Page, open_service: Service) -> None:
    await page.goto(f"{open_service.url}/ui/#/submit")
    form = page.locator("#submit-form")
    await form.locator("[name=image]").fill("busybox")
    await form.locator("[name=command]").fill('["sh", "-c", "echo hi"]')
    await expect(page.locator("#command-preview")).to_have_text('["sh","-c","echo hi"]')
    await form.locator("[name=memory_mb]").fill("99999999")
    await form.get_by_role("button", name="Submit").click()
    await expect(page.locator("#errors")).to_contain_text("memory_mb may be at most")
    await expect(page).to_have_url(re.compile(r"#/submit$"))


async def test_with_api_keys_the_page_asks_for_one_and_keeps_it(
    page: Page, tmp_path: Path, test_image: str
) -> None:
    url = await database_url_for(tmp_path)
    key = create_key(url, "dashboard", "--admin")
    async with Service(tmp_path, workers=0) as svc:
        # No workers: the job stays queued, and shows in the table.
        queued = await svc.client.post("/jobs", json={"image": test_image}, headers=bearer(key))
        assert queued.status_code == 202, queued.text
        job_id = queued.json()["id"]

        await page.goto(f"{svc.url}/ui/")
        panel = page.locator("#key-panel")
        await expect(panel).to_be_visible()
        await expect(page.locator("#key-message")).to_contain_text("needs an API key")
        await expect(page.locator("#jobs-body tr")).to_have_count(0)

        await page.locator("#key-input").fill("jdk_not-a-key")
        await panel.get_by_role("button", name="Use this key").click()
        await expect(page.locator("#key-message")).to_contain_text("was refused")

        await page.locator("#key-input").fill(key)
        await panel.get_by_role("button", name="Use this key").click()
        await expect(panel).to_be_hidden()
        row = page.locator(f"tr[data-job-id='{job_id}']")
        await expect(row).to_contain_text("queued")
        await expect(page.locator("#stat-queued")).to_have_text(re.compile(r"^(1|—)$"))

        # Kept for the browser session: a reload needs no key again.
        await page.reload()
        await expect(row).to_contain_text("queued")
        await expect(panel).to_be_hidden()
        stored = await page.evaluate("window.sessionStorage.getItem('jobdock.apiKey')")
        assert stored == key

        # The job page reads the job and its log with the key, and cancels it.
        await row.locator("a").click()
        await expect(page.locator("#job-state")).to_have_text("queued")
        await page.locator("#job-cancel").click()
        await expect(page.locator("#job-state")).to_have_text("cancelled")
        await expect(page.locator("#log-status")).to_have_text("(no output)")
        answer = await svc.client.get(f"/jobs/{job_id}", headers=bearer(key))
        assert answer.json()["state"] == "cancelled"


async def test_pages_through_the_table_with_the_cursor(
    page: Page, tmp_path: Path, test_image: str
) -> None:
    async with Service(tmp_path, workers=0) as svc:
        batch = {"jobs": [{"image": test_image, "labels": {"n": str(n)}} for n in range(55)]}
        assert (await svc.client.post("/jobs/batch", json=batch)).status_code == 202
        await page.goto(f"{svc.url}/ui/")
        rows = page.locator("#jobs-body tr")
        await expect(rows).to_have_count(50)
        await expect(page.locator("#page-newest")).to_be_disabled()
        await page.locator("#page-older").click()
        await expect(rows).to_have_count(5)
        await expect(page.locator("#page-older")).to_be_disabled()
        await page.locator("#page-newest").click()
        await expect(rows).to_have_count(50)
