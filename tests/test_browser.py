"""A person's path in headless Chromium: sign in, upload, watch the page go ready
without reloading, try the endpoint from the page."""

import json
import os
import shutil

import pytest

from deployments.allowlist import corpus
from tests.conftest import OUTPUT, SKLEARN_PIN, dump

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    # Playwright's sync API drives an event loop in this thread; the live server's
    # ORM calls run in their own threads, so Django's async guard does not apply here.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()
    if previous is None:
        del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]


@pytest.fixture
def page(browser, live_server, user):
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", "correct-horse-42")
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")
    yield page
    context.close()


def files(tmp_path, model_bytes: bytes, requirements: str):
    model, reqs = tmp_path / "model.pkl", tmp_path / "requirements.txt"
    model.write_bytes(model_bytes)
    reqs.write_text(requirements)
    return str(model), str(reqs)


def test_a_person_deploys_from_the_browser_and_tries_the_endpoint(stack, live_server, page, tmp_path):
    model = corpus.random_forest()
    model_path, requirements_path = files(tmp_path, dump(model), SKLEARN_PIN)
    page.click("text=New deployment")
    page.set_input_files("#id_model_file", model_path)
    page.set_input_files("#id_requirements_file", requirements_path)
    page.fill("#id_name", "iris in the browser")
    page.click("#deploy-form button[type=submit]")
    page.wait_for_selector("#status")
    # Marks this document: if the page reloads, the mark is gone.
    page.evaluate("window.__servemlNoReload = true")
    page.wait_for_selector("[data-status=deploying], [data-status=queued]", timeout=20_000)
    page.wait_for_selector("[data-status=ready]", timeout=240_000)
    assert page.evaluate("window.__servemlNoReload") is True, "the status page reloaded instead of updating itself"
    assert page.locator(".timeline li.done").count() == 6

    endpoint = page.inner_text("#endpoint-url")
    assert endpoint.startswith(stack.runtime_url)
    assert endpoint in page.inner_text("#curl-example")

    row = [6.7, 3.0, 5.2, 2.3]
    page.fill("#try-form textarea", json.dumps({"data": row}))
    page.click("#try-form button")
    page.wait_for_selector("#try-answer")
    answer = json.loads(page.inner_text("#try-answer"))
    assert answer == {"prediction": int(model.predict([row])[0]), "model_type": "RandomForestClassifier"}
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "ready-page.png"), full_page=True)


def test_a_person_sees_why_an_upload_was_refused(live_server, page, tmp_path):
    model_path, requirements_path = files(tmp_path, b"this is just text, not a model\n", SKLEARN_PIN)
    page.goto(f"{live_server.url}/deployments/new")
    page.set_input_files("#id_model_file", model_path)
    page.set_input_files("#id_requirements_file", requirements_path)
    page.click("#deploy-form button[type=submit]")
    error = page.inner_text(".field.has-error .error")
    assert "not a model file ServeML can read" in error


def test_a_person_stops_a_deployment_from_its_page(stack, live_server, page, tmp_path):
    model_path, requirements_path = files(tmp_path, dump(corpus.logistic_regression()), SKLEARN_PIN)
    page.goto(f"{live_server.url}/deployments/new")
    page.set_input_files("#id_model_file", model_path)
    page.set_input_files("#id_requirements_file", requirements_path)
    page.click("#deploy-form button[type=submit]")
    page.wait_for_selector("[data-status=ready]", timeout=240_000)
    endpoint = page.inner_text("#endpoint-url")
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("text=Stop deployment")
    page.wait_for_selector("[data-status=stopped]")
    import httpx

    assert httpx.post(endpoint, json={"data": [1, 2, 3, 4]}).status_code == 404
