"""A real browser for the pages: Debian's Chromium driven by Playwright, on the e2e stack.

`make test` installs Chromium when it is missing (`scripts/ensure-chromium`); Playwright never
downloads a browser here. Without Chromium or Playwright the browser tests skip, saying why.
Screenshots go to `$LLM_BATCH_TEST_OUTPUT/screenshots` (default `.work/test-output`).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import AirflowStack

CHROMIUM = os.environ.get("LLM_BATCH_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1440, "height": 900}


def screenshot_dir() -> Path:
    base = Path(os.environ.get("LLM_BATCH_TEST_OUTPUT", REPO_ROOT / ".work" / "test-output"))
    path = base / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


# Package scope: Playwright's sync API runs an event loop in this thread until it is closed;
# closing it with the browser tests keeps later tests free to call asyncio.run().
@pytest.fixture(scope="package")
def chromium() -> Iterator[Any]:
    """The system Chromium, launched headless once per session."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser test skipped: playwright is not installed (make venv installs it)")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(
            f"browser test skipped: no Chromium at {CHROMIUM} (make test installs Debian's "
            "chromium as root; or set LLM_BATCH_CHROMIUM)"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def browser_page(chromium: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh page (its own cookies) at 1440x900; a screenshot is kept if the test fails."""
    context = chromium.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        yield page
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            shoot(page, f"FAILED-{request.node.name}")
        context.close()


def shoot(page: Any, name: str) -> Path:
    """Save a full-page screenshot named after `name` and return its path."""
    path = screenshot_dir() / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png")
    page.screenshot(path=str(path), full_page=True)
    return path


def log_in(page: Any, stack: AirflowStack) -> None:
    """Log in to the Airflow UI as the stack's admin, as a person would."""
    page.goto(f"{stack.airflow_url}/")
    page.get_by_label(re.compile("username", re.I)).fill(stack.stack.airflow_username)
    page.get_by_label(re.compile("password", re.I)).fill(stack.stack.airflow_password or "")
    page.get_by_role("button", name=re.compile("sign in|log in|login", re.I)).click()
    page.wait_for_url(re.compile(r"^(?!.*login).*$"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
