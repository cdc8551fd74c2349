"""A person predicts a CSV file from a ready deployment's page in headless Chromium, against
the real stack (worker, runtime, model process): progress bar, then a download whose rows
are the model's own predictions; a file that does not fit says which line."""

import csv
import io

import numpy
import pytest

from deployments.allowlist import corpus
from tests.conftest import OUTPUT, SKLEARN_PIN, dump
from tests.test_browser import browser, files, page  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_a_person_predicts_a_csv_file_and_downloads_it_with_predictions(
    stack,
    live_server,
    page,
    tmp_path,
    settings,  # noqa: F811
):
    settings.SERVEML_CSV_BATCH_ROWS = 500  # a dozen batches, so the bar moves
    model = corpus.random_forest()
    model_path, requirements_path = files(tmp_path, dump(model), SKLEARN_PIN)
    page.goto(f"{live_server.url}/deployments/new")
    page.set_input_files("#id_model_file", model_path)
    page.set_input_files("#id_requirements_file", requirements_path)
    page.fill("#id_name", "iris by the spreadsheet")
    page.click("#deploy-form button[type=submit]")
    page.wait_for_selector("[data-status=ready]", timeout=240_000)

    rows = numpy.round(numpy.random.default_rng(7).uniform(0.1, 7.9, size=(6_000, 4)), 1)
    source = tmp_path / "flowers.csv"
    source.write_text(
        "sepal length,sepal width,petal length,petal width\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
    )
    page.set_input_files("#csv-file", str(source))
    page.check("#csv-probabilities")
    # Every value the bar shows, as the page sets it.
    page.evaluate(
        """window.__bar = [];
        new MutationObserver(() => window.__bar.push(document.getElementById('csv-progress').value))
          .observe(document.getElementById('csv-progress'), {attributes: true, attributeFilter: ['value']});"""
    )
    page.click("#csv-form button[type=submit]")
    page.wait_for_selector("#csv-progress", state="visible")
    page.wait_for_selector("#csv-download", state="visible", timeout=120_000)
    assert page.evaluate(
        "[document.getElementById('csv-progress').value, document.getElementById('csv-progress').max]"
    ) == [
        6_000,
        6_000,
    ]
    assert "6,000 of 6,000 rows" in page.inner_text("#csv-count")
    bar = page.evaluate("window.__bar")
    assert any(0 < value < 6_000 for value in bar), f"the bar never showed a part done: {bar}"
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "csv-predicted.png"), full_page=True)
    with page.expect_download() as download:
        page.click("#csv-download")
    assert download.value.suggested_filename == "flowers-predictions.csv"
    table = list(csv.reader(io.StringIO(download.value.path().read_text())))

    assert table[0] == [
        "sepal length",
        "sepal width",
        "petal length",
        "petal width",
        "prediction",
        "probability_0",
        "probability_1",
        "probability_2",
    ]
    body = table[1:]
    assert len(body) == 6_000
    assert numpy.array([[float(v) for v in line[:4]] for line in body]).tolist() == rows.tolist()
    assert [int(line[4]) for line in body] == model.predict(rows).tolist()
    assert numpy.allclose([[float(v) for v in line[5:]] for line in body], model.predict_proba(rows))

    # A file that does not fit: refused by line number, nothing to download.
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c,d\n" + "1,2,3,4\n" * 15 + "1,2,3\n")
    page.set_input_files("#csv-file", str(bad))
    page.click("#csv-form button[type=submit]")
    page.wait_for_selector("#csv-errors", state="visible")
    assert "line 17: expected 4 values, got 3." in page.inner_text("#csv-errors")
    assert page.locator("#csv-download").is_hidden()
