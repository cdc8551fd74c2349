"""The live figures on a deployment's page in headless Chromium, with the real worker and runtime:
they update without a reload while the deployment is called, and stop once it is stopped."""

import httpx
import pytest

from deployments.allowlist import corpus
from tests.test_browser import browser, page  # noqa: F401  (fixtures)
from tests.test_end_to_end import ROWS, deploy, token, wait_ready  # noqa: F401  (token: a fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_a_person_sees_the_figures_and_the_chart_update_while_the_deployment_is_called(
    stack,
    live_server,
    page,  # noqa: F811
    token,  # noqa: F811
):
    state = wait_ready(stack, token, deploy(live_server, token, corpus.random_forest(), name="watched"))
    page.goto(f"{live_server.url}/deployments/{state['id']}")
    page.evaluate("window.__servemlNoReload = true")  # gone if the page reloads
    page.wait_for_selector("#figures[data-state=live]", timeout=20_000)
    before = int(page.get_attribute("#figures-total", "data-requests") or 0)  # verify's own call, maybe

    for _ in range(12):
        assert httpx.post(state["endpoint_url"], json={"data": ROWS[0].tolist()}, timeout=30).status_code == 200
    assert httpx.post(state["endpoint_url"], json={"data": [1.0]}, timeout=30).status_code == 400
    # The next poll (every 5 s) brings them: the totals, the version's row and the last hour's chart.
    page.wait_for_function(
        f"Number(document.querySelector('#figures-total')?.dataset.requests) >= {before + 13}", timeout=20_000
    )
    assert int(page.get_attribute("#figures-v1", "data-requests")) >= before + 13
    assert float(page.get_attribute("#chart-requests_per_second", "data-now")) > 0
    assert float(page.get_attribute("#chart-errors", "data-now")) >= 1
    assert page.locator("#chart-requests_per_second polyline").count() == 1
    assert page.evaluate("window.__servemlNoReload") is True, "the page reloaded instead of updating itself"

    stopped = httpx.delete(
        f"{live_server.url}/api/deployments/{state['id']}", headers={"Authorization": f"Token {token}"}
    )
    assert stopped.status_code == 200, stopped.text
    page.wait_for_selector("#figures[data-state=over]", timeout=20_000)
    assert page.get_attribute("#figures", "hx-get") is None  # no more polling
